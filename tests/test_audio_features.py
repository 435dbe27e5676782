"""The speech front end (log-mel, SpecAugment), CER/WER and the CTC loss."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmjax.eval.edit_distance import cer, edit_distance, wer
from mmjax.losses.ctc import ctc_loss
from mmjax.models import audio_features as af

RATE, N_FFT, HOP, MELS = 16000, 400, 160, 40


def numpy_log_mel(audio_N: np.ndarray) -> np.ndarray:
    """An independent float64 reference: a loop over frames, numpy's FFT, Hann by formula."""
    frames = []
    window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann
    for start in range(0, len(audio_N) - N_FFT + 1, HOP):
        spectrum = np.fft.rfft(audio_N[start : start + N_FFT] * window)
        frames.append(np.abs(spectrum) ** 2)
    mel = np.stack(frames) @ af.mel_filterbank(RATE, N_FFT, MELS).astype(np.float64)
    log = np.log10(np.maximum(mel, 1e-10))
    return (np.maximum(log, log.max() - 8.0) + 4.0) / 4.0


def test_log_mel_matches_a_numpy_reference():
    rng = np.random.default_rng(0)
    audio_BN = rng.normal(0, 0.1, (2, 4000)).astype(np.float32)
    audio_BN[1, :2000] *= 0.01  # a quiet half: the 80 dB floor applies to some cells
    got = np.asarray(af.log_mel(jnp.asarray(audio_BN), RATE, N_FFT, HOP, MELS))
    assert got.shape == (2, af.num_frames(4000, N_FFT, HOP), MELS) == (2, 23, MELS)
    for b in range(2):
        np.testing.assert_allclose(got[b], numpy_log_mel(audio_BN[b].astype(np.float64)), atol=2e-4)


@pytest.mark.parametrize("hz", [300.0, 1000.0, 4000.0])
def test_a_sine_peaks_in_the_mel_bin_whose_centre_is_nearest(hz):
    t = np.arange(8000) / RATE
    audio = np.sin(2 * np.pi * hz * t).astype(np.float32)[None]
    feats = np.asarray(af.log_mel(jnp.asarray(audio), RATE, N_FFT, HOP, MELS))[0]
    centres = af.mel_to_hz(np.linspace(0, af.hz_to_mel(RATE / 2), MELS + 2))[1:-1]
    assert int(np.argmax(feats.mean(0))) == int(np.argmin(np.abs(centres - hz)))


def test_filterbank_triangles_peak_at_one_and_cover_the_band():
    bank = af.mel_filterbank(RATE, N_FFT, MELS)
    assert bank.shape == (N_FFT // 2 + 1, MELS) and bank.min() >= 0
    assert np.all(bank.max(0) > 0.5)  # every filter sees at least one FFT bin near its peak
    assert np.all(bank[1:-1].sum(1) > 0)  # every bin strictly inside the band is covered


def test_spec_augment_is_deterministic_and_masks_bands_of_bounded_width():
    x = jnp.ones((4, 50, 40))
    key = jax.random.key(3)
    a, mask_a = af.spec_augment(key, x, 2, 8, 2, 10)
    b, _ = af.spec_augment(key, x, 2, 8, 2, 10)
    np.testing.assert_array_equal(a, b)
    _, mask_c = af.spec_augment(jax.random.key(4), x, 2, 8, 2, 10)
    assert not np.array_equal(mask_a, mask_c)
    mask = np.asarray(mask_a)
    np.testing.assert_array_equal(np.asarray(a), np.where(mask, 0.0, 1.0))
    for row in mask:
        freq = row.all(axis=0)  # mel bins masked in every frame
        time = row.all(axis=1)  # frames masked in every bin
        assert freq.sum() <= 2 * 8 and time.sum() <= 2 * 10
        # every masked cell lies in a masked bin or frame
        np.testing.assert_array_equal(row, freq[None, :] | time[:, None])
    none, no_mask = af.spec_augment(key, x, 0, 8, 0, 10)
    assert not np.asarray(no_mask).any() and np.array_equal(none, x)


def test_edit_distance_cer_and_wer_against_hand_counts():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3 and edit_distance("abc", "") == 3
    assert edit_distance("红色圆形", "红色方形") == 1
    refs = ["a red circle", "one two"]
    hyps = ["a red circles", "one"]  # 1 insertion; 4 deletions (" two")
    assert cer(hyps, refs) == pytest.approx(5 / (12 + 7))
    assert wer(hyps, refs) == pytest.approx(2 / 5)  # circle->circles, two deleted
    assert cer(refs, refs) == 0.0 and cer([""] * 2, refs) == 1.0


def test_ctc_loss_is_the_optax_loss_per_target_token_and_ignores_eot_and_padding():
    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(size=(2, 12, 9)), jnp.float32)
    tokens = jnp.asarray([[1, 5, 6, 6, 2, 0, 0], [1, 7, 2, 0, 0, 0, 0]])  # BOS .. EOT PAD
    got = ctc_loss(logits, tokens, pad_id=0, eot_id=2)
    labels = jnp.asarray([[5, 6, 6, 0], [7, 0, 0, 0]])
    label_pad = jnp.asarray([[0, 0, 0, 1], [0, 1, 1, 1]], jnp.float32)
    nll = optax.ctc_loss(logits, jnp.zeros((2, 12)), labels, label_pad, blank_id=0)
    assert float(got) == pytest.approx(float(nll.sum() / 4), rel=1e-5)


def test_ctc_collapse_merges_repeats_then_drops_blanks():
    from mmjax.models.speech import ctc_collapse

    assert ctc_collapse(np.array([0, 5, 5, 0, 5, 6, 6, 0, 0]), blank=0) == [5, 5, 6]
    assert ctc_collapse(np.array([7, 7, 7]), blank=0) == [7]
    assert ctc_collapse(np.array([0, 0]), blank=0) == []
