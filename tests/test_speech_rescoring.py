"""Speech to text against its language-model prior: token dropout of the decoder's input, the
per-hypothesis CTC likelihood (checked against enumerating every frame path) and joint
CTC/attention rescoring of the beam's hypotheses."""

import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmjax.data.tokenizers import ByteTokenizer
from mmjax.losses.ctc import ctc_loss, ctc_nll
from mmjax.models.speech import SpeechToText, transcribe
from mmjax.tasks.speech_to_text import drop_tokens, joint_transcribe
from tests.test_speech import toy_model


def test_token_dropout_replaces_only_text_tokens_at_its_rate():
    rows = np.array([[1] + list(range(10, 60)) + [2] + [0] * 12] * 64, np.int32)
    out = np.asarray(drop_tokens(jax.random.key(0), jnp.asarray(rows), 0.3, 3, 264))
    text = rows >= 3
    np.testing.assert_array_equal(out[~text], rows[~text])  # BOS, EOT and PAD stay
    changed = out != rows
    assert 0.27 < changed[text].mean() < 0.33  # 3,200 text tokens: ±0.03 is > 3 sigma
    assert out[changed].min() >= 3 and out[changed].max() < 264
    again = drop_tokens(jax.random.key(0), jnp.asarray(rows), 0.3, 3, 264)
    np.testing.assert_array_equal(out, again)  # a pure function of the key: resumable
    np.testing.assert_array_equal(drop_tokens(jax.random.key(1), rows, 0.0, 3, 264), rows)


def brute_force_ctc_nll(logits_AV: np.ndarray, labels: list[int], blank: int) -> float:
    """-log of the summed probability of every frame path that collapses to `labels`."""
    x = logits_AV.astype(np.float64)
    logp = x - np.logaddexp.reduce(x, axis=-1, keepdims=True)
    a, v = logp.shape
    total = []
    for path in itertools.product(range(v), repeat=a):
        merged = [t for i, t in enumerate(path) if i == 0 or t != path[i - 1]]
        if [t for t in merged if t != blank] == labels:
            total.append(sum(logp[i, t] for i, t in enumerate(path)))
    return -float(np.logaddexp.reduce(total))


def test_ctc_nll_of_decoder_rows_matches_enumerating_every_path():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 1.5, (3, 5, 5)).astype(np.float32)  # 5 frames, ids 0..4, blank 0
    # Decoder rows [BOS=1, labels..., EOT=2, PAD=0...]; label 3 3 needs a blank in between.
    rows = np.array([[1, 3, 4, 2, 0, 0], [1, 3, 3, 2, 0, 0], [1, 4, 2, 0, 0, 0]], np.int32)
    nll, count = ctc_nll(jnp.asarray(logits), jnp.asarray(rows), pad_id=0, eot_id=2)
    labels = [[3, 4], [3, 3], [4]]
    expected = [brute_force_ctc_nll(logits[i], labels[i], blank=0) for i in range(3)]
    np.testing.assert_allclose(nll, expected, rtol=1e-4)
    np.testing.assert_array_equal(count, [2, 2, 1])
    mean = ctc_loss(jnp.asarray(logits), jnp.asarray(rows), 0, 2)
    np.testing.assert_allclose(mean, sum(expected) / 5, rtol=1e-4)


class ToyTokens:  # the toy model's ids: the byte tokenizer's specials in a 16-id vocabulary
    bos_id, eot_id, pad_id = ByteTokenizer.bos_id, ByteTokenizer.eot_id, ByteTokenizer.pad_id


@pytest.mark.slow  # three beam searches in one compile: ~40 s on the loaded 2 cores
def test_joint_rescoring_picks_the_best_mix_of_decoder_and_ctc_scores():
    model, beam, weights = toy_model(max_len=6), 4, (0.3, 1.0)
    audio = jnp.asarray(np.random.default_rng(0).normal(0, 0.1, (3, 3200)), jnp.float32)
    params = model.init(jax.random.key(1), audio, jnp.zeros((3, 6), jnp.int32))
    params = nn.meta.unbox(params)["params"]

    @jax.jit
    def run(params):
        tokens, scores = transcribe(model, params, audio, 6, beam, 1, 2, 0, all_beams=True)
        best, _ = transcribe(model, params, audio, 6, beam, 1, 2, 0)
        apply = lambda *a, **kw: model.apply({"params": params}, *a, **kw)
        feats = apply(audio, method=SpeechToText.features)
        logits = apply(apply(feats, method=SpeechToText.encode), method=SpeechToText.ctc_logits)
        joint = [joint_transcribe(model, params, audio, 6, beam, ToyTokens, w) for w in weights]
        return tokens, scores, best, logits, joint

    tokens, scores, best, logits, joint = jax.device_get(run(params))
    np.testing.assert_array_equal(tokens[:, 0], best)  # all_beams: best first
    picked = []
    for w, (rescored, alone) in zip(weights, joint, strict=True):
        np.testing.assert_array_equal(alone, best)
        for b in range(3):  # the reference: each hypothesis scored on its own
            ctc = [
                -float(ctc_nll(logits[b : b + 1], tokens[b, k][None], 0, 2)[0][0])
                for k in range(beam)
            ]
            mixed = [(1 - w) * float(scores[b, k]) + w * ctc[k] for k in range(beam)]
            picked.append(int(np.argmax(mixed)))
            np.testing.assert_array_equal(rescored[b], tokens[b, picked[-1]])
    assert max(picked) > 0, picked  # the CTC scores did reorder some beams
