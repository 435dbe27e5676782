"""A WAV (RIFF/WAVE) reader for uncompressed audio: PCM 8/16/24/32-bit integer and 32/64-bit
IEEE float, plain or WAVE_FORMAT_EXTENSIBLE, any number of channels and any sample rate.

Python's `wave` module reads only integer PCM, so the chunks are parsed here. Anything else
(empty, truncated, not RIFF/WAVE, compressed) is a `DataError` whose message says what is wrong
with the file.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

from mmjax.data import audio as audio_lib
from mmjax.errors import DataError

PCM, IEEE_FLOAT, EXTENSIBLE = 0x0001, 0x0003, 0xFFFE
_CONVERT = "convert it to PCM, e.g. `ffmpeg -i IN -c:a pcm_s16le OUT.wav`"


@dataclasses.dataclass(frozen=True)
class Wav:
    samples: np.ndarray  # float32 [N, C] in [-1, 1]
    sample_rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


def _chunks(data: bytes, path: str):
    """(chunk id, payload) of each chunk after the RIFF/WAVE header."""
    pos = 12
    while pos + 8 <= len(data):
        cid, size = struct.unpack_from("<4sI", data, pos)
        payload = data[pos + 8 : pos + 8 + size]
        if len(payload) < size:
            raise DataError(
                f"{path}: truncated WAV ({cid.decode('latin-1')!r} chunk says {size} bytes, "
                f"{len(payload)} are there)"
            )
        yield cid, payload
        pos += 8 + size + (size & 1)  # chunks are padded to an even size


def _format(payload: bytes, path: str) -> tuple[int, int, int, int, int]:
    """(format code, channels, sample rate, block align, bits per sample) of a fmt chunk."""
    if len(payload) < 16:
        raise DataError(f"{path}: malformed WAV (fmt chunk of {len(payload)} bytes)")
    code, channels, rate, _, block, bits = struct.unpack_from("<HHIIHH", payload)
    if code == EXTENSIBLE:
        if len(payload) < 26:
            raise DataError(f"{path}: malformed WAV (extensible fmt chunk too short)")
        code = struct.unpack_from("<H", payload, 24)[0]  # first two bytes of the sub-format GUID
    return code, channels, rate, block, bits


def _decode(raw: bytes, code: int, bits: int, channels: int) -> np.ndarray:
    """float32 [N, C] from the data chunk's bytes."""
    if code == IEEE_FLOAT:
        x = np.frombuffer(raw, "<f4" if bits == 32 else "<f8").astype(np.float32)
    elif bits == 8:  # unsigned, 128 = silence
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif bits == 24:
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3).astype(np.int32)
        v = b[:, 0] | (b[:, 1] << 8) | (b[:, 2] << 16)
        x = (np.where(v >= 1 << 23, v - (1 << 24), v) / float(1 << 23)).astype(np.float32)
    else:
        x = np.frombuffer(raw, f"<i{bits // 8}").astype(np.float64) / float(1 << (bits - 1))
        x = x.astype(np.float32)
    return x.reshape(-1, channels)


def read(path: str) -> Wav:
    """The samples and rate of the WAV file at `path`; DataError for anything it cannot read."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror or e})") from e
    if not data:
        raise DataError(f"{path}: empty file, not a WAV")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise DataError(f"{path}: not a WAV file (no RIFF/WAVE header)")
    fmt = raw = None
    for cid, payload in _chunks(data, path):
        if cid == b"fmt ":
            fmt = _format(payload, path)
        elif cid == b"data":
            raw = payload
            break
    if fmt is None:
        raise DataError(f"{path}: malformed WAV (no fmt chunk before the data)")
    if raw is None:
        raise DataError(f"{path}: truncated WAV (no data chunk)")
    code, channels, rate, block, bits = fmt
    supported = (code == PCM and bits in (8, 16, 24, 32)) or (
        code == IEEE_FLOAT and bits in (32, 64)
    )
    if not supported:
        kind = "compressed" if code not in (PCM, IEEE_FLOAT) else f"{bits}-bit"
        raise DataError(f"{path}: {kind} WAV (format 0x{code:04x}) is not supported; {_CONVERT}")
    if channels < 1 or rate < 1 or block != channels * bits // 8:
        raise DataError(
            f"{path}: malformed WAV ({channels} channels, {rate} Hz, block align {block})"
        )
    if not raw:
        raise DataError(f"{path}: the WAV has no samples")
    if len(raw) % block:
        raise DataError(f"{path}: truncated WAV (data ends inside a sample frame)")
    return Wav(_decode(raw, code, bits, channels), rate)


def read_mono(path: str, sample_rate: int) -> np.ndarray:
    """float32 [N]: the file mixed down to one channel and resampled to `sample_rate`."""
    wav = read(path)
    return audio_lib.resample(audio_lib.to_mono(wav.samples), wav.sample_rate, sample_rate)
