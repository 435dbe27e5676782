"""Waveform helpers shared by the speech dataset, the input pipeline and `mmjax.transcribe`:
resampling, mixing down to mono, and int16 <-> float conversion."""

from __future__ import annotations

import math

import numpy as np

# The rate every speech model here reads (log-mel front end, `mmjax.models.audio_features`).
MODEL_RATE = 16_000


def resample(audio: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """float32 [N'] of mono `audio` [N] resampled from `rate_in` to `rate_out` Hz.

    Polyphase filtering (scipy's `resample_poly`: upsample by p, a Kaiser-windowed low-pass at
    the lower of the two Nyquist frequencies, downsample by q, with p/q = rate_out/rate_in
    reduced), so content above the new Nyquist frequency is removed rather than aliased.
    """
    if rate_in <= 0 or rate_out <= 0:
        raise ValueError(f"sample rates must be positive, got {rate_in} -> {rate_out}")
    audio = np.asarray(audio, np.float32)
    if rate_in == rate_out or audio.size == 0:
        return audio.copy()
    from scipy.signal import resample_poly  # scipy comes with scikit-learn

    g = math.gcd(rate_in, rate_out)
    return resample_poly(audio, rate_out // g, rate_in // g).astype(np.float32)


def to_mono(audio_NC: np.ndarray) -> np.ndarray:
    """float32 [N]: the mean of the channels of [N, C] samples (or [N] as it is)."""
    audio_NC = np.asarray(audio_NC, np.float32)
    return audio_NC if audio_NC.ndim == 1 else audio_NC.mean(axis=1)


def to_int16(audio: np.ndarray) -> np.ndarray:
    """float samples in [-1, 1] as int16 (clipped)."""
    return np.clip(np.rint(np.asarray(audio) * 32767.0), -32768, 32767).astype(np.int16)


def from_int16(samples: np.ndarray) -> np.ndarray:
    return np.asarray(samples, np.float32) / 32768.0
