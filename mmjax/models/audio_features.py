"""The speech front end, in JAX so it runs on device inside the jitted step: log-mel
spectrograms (framing + rfft + a constant mel filterbank) and SpecAugment masks.

Shapes: B batch, N samples, F frames, M mel bins, Q = n_fft // 2 + 1 frequency bins.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np


def hz_to_mel(hz):
    """The HTK mel scale: 2595·log10(1 + f/700)."""
    return 2595.0 * np.log10(1.0 + np.asarray(hz, np.float64) / 700.0)


def mel_to_hz(mel):
    return 700.0 * (10.0 ** (np.asarray(mel, np.float64) / 2595.0) - 1.0)


@functools.cache
def mel_filterbank(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """float32 [Q, M]: triangular filters with centres equally spaced on the mel scale from 0 Hz
    to Nyquist, each peaking at 1 (a read-only constant of the compiled step)."""
    freqs_Q = np.arange(n_fft // 2 + 1) * sample_rate / n_fft
    edges = mel_to_hz(np.linspace(0.0, hz_to_mel(sample_rate / 2), n_mels + 2))
    low, centre, high = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (freqs_Q[None] - low) / (centre - low)
    falling = (high - freqs_Q[None]) / (high - centre)
    bank_MQ = np.maximum(0.0, np.minimum(rising, falling))
    bank = bank_MQ.T.astype(np.float32)
    bank.setflags(write=False)
    return bank


def num_frames(num_samples: int, n_fft: int, hop: int) -> int:
    """Frames of a clip of `num_samples` (no centring: frame f covers f·hop .. f·hop + n_fft)."""
    if num_samples < n_fft:
        raise ValueError(f"a clip of {num_samples} samples is shorter than one frame ({n_fft})")
    return 1 + (num_samples - n_fft) // hop


def log_mel(audio_BN: jax.Array, sample_rate: int, n_fft: int, hop: int, n_mels: int) -> jax.Array:
    """float32 [B, F, M]: Whisper-style normalised log-mel features of waveforms in [-1, 1].

    Periodic Hann window, power spectrum, mel filterbank, log10 (floored at 1e-10), then per
    example: values more than 8 (80 dB) below the example's maximum are raised to it, and
    (x + 4) / 4 brings the range to about [-1, 1].
    """
    f = num_frames(audio_BN.shape[1], n_fft, hop)
    index_FK = np.arange(f)[:, None] * hop + np.arange(n_fft)[None]
    window_K = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    frames_BFK = audio_BN.astype(jnp.float32)[:, index_FK] * window_K.astype(np.float32)[None, None]
    spectrum_BFQ = jnp.fft.rfft(frames_BFK, axis=-1)
    power_BFQ = jnp.square(spectrum_BFQ.real) + jnp.square(spectrum_BFQ.imag)
    bank_QM = mel_filterbank(sample_rate, n_fft, n_mels)
    mel_BFM = jnp.einsum("bfq,qm->bfm", power_BFQ, bank_QM, precision=jax.lax.Precision.HIGHEST)
    log_BFM = jnp.log10(jnp.maximum(mel_BFM, 1e-10))
    peak_B11 = jnp.max(log_BFM, axis=(1, 2), keepdims=True)
    return (jnp.maximum(log_BFM, peak_B11 - 8.0) + 4.0) / 4.0


def _band_masks(key: jax.Array, b: int, size: int, count: int, max_width: int) -> jax.Array:
    """bool [B, size]: the union of `count` bands per row, each of a width uniform in
    0..max_width (clipped to `size`) starting uniformly where it fits."""
    if count == 0 or max_width == 0:
        return jnp.zeros((b, size), bool)
    k_width, k_start = jax.random.split(key)
    width_BC = jax.random.randint(k_width, (b, count), 0, min(max_width, size) + 1)
    start_BC = jnp.floor(jax.random.uniform(k_start, (b, count)) * (size - width_BC + 1))
    start_BC = start_BC.astype(jnp.int32)
    pos = jnp.arange(size)[None, None]
    inside_BCS = (pos >= start_BC[..., None]) & (pos < (start_BC + width_BC)[..., None])
    return jnp.any(inside_BCS, axis=1)


def spec_augment(
    key: jax.Array,
    features_BFM: jax.Array,
    freq_masks: int,
    freq_width: int,
    time_masks: int,
    time_width: int,
) -> tuple[jax.Array, jax.Array]:
    """(features with masked cells set to 0, bool mask [B, F, M] of those cells): SpecAugment's
    frequency and time masking (Park et al. 2019), a pure function of `key`."""
    b, f, m = features_BFM.shape
    k_freq, k_time = jax.random.split(key)
    freq_BM = _band_masks(k_freq, b, m, freq_masks, freq_width)
    time_BF = _band_masks(k_time, b, f, time_masks, time_width)
    mask_BFM = freq_BM[:, None, :] | time_BF[:, :, None]
    return jnp.where(mask_BFM, 0.0, features_BFM), mask_BFM
