"""The WAV reader and the resampler: every PCM width, float, extensible, stereo, odd rates, and
the files it must refuse with a message naming the problem."""

import struct
import wave

import numpy as np
import pytest

from mmjax.data import audio, wav
from mmjax.errors import DataError

RATE = 8000


def sine(n: int, hz: float = 440.0, rate: int = RATE) -> np.ndarray:
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(n) / rate)


def riff(fmt: bytes, data: bytes, extra_chunks: bytes = b"") -> bytes:
    body = b"WAVE" + struct.pack("<4sI", b"fmt ", len(fmt)) + fmt + extra_chunks
    body += struct.pack("<4sI", b"data", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(body)) + body


def fmt_chunk(code: int, channels: int, rate: int, bits: int, extensible_code: int | None = None):
    block = channels * bits // 8
    head = struct.pack("<HHIIHH", code, channels, rate, rate * block, block, bits)
    if extensible_code is None:
        return head
    guid = (
        struct.pack("<H", extensible_code)
        + b"\x00\x00\x00\x00\x10\x00\x80\x00\x00\xaa\x00\x38\x9b\x71"
    )
    return head + struct.pack("<HHI", 22, bits, 0x3) + guid


def write(tmp_path, name: str, content: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content)
    return str(path)


@pytest.mark.parametrize("bits", [8, 16, 24, 32])
def test_integer_pcm_of_every_width_reads_back(tmp_path, bits):
    x = sine(400)
    if bits == 8:
        raw = np.clip(np.rint(x * 128 + 128), 0, 255).astype(np.uint8).tobytes()
    elif bits == 24:
        v = np.rint(x * (1 << 23)).astype(np.int32)
        raw = np.stack([v & 0xFF, (v >> 8) & 0xFF, (v >> 16) & 0xFF], 1).astype(np.uint8).tobytes()
    else:
        raw = np.rint(x * (1 << (bits - 1))).astype(f"<i{bits // 8}").tobytes()
    path = write(tmp_path, "a.wav", riff(fmt_chunk(1, 1, RATE, bits), raw))
    got = wav.read(path)
    assert got.sample_rate == RATE and got.samples.shape == (400, 1)
    np.testing.assert_allclose(got.samples[:, 0], x, atol=1.5 / (1 << (bits - 1)))


def test_stdlib_written_stereo_16_bit_at_44k_is_mixed_down_and_resampled(tmp_path):
    left, right = sine(4410, 440, 44100), sine(4410, 440, 44100) * 0.5
    frames = np.rint(np.stack([left, right], 1) * 32767).astype("<i2")
    path = str(tmp_path / "s.wav")
    with wave.open(path, "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(frames.tobytes())
    assert wav.read(path).samples.shape == (4410, 2)
    mono = wav.read_mono(path, 16000)
    assert len(mono) == 1600  # 0.1 s
    expected = 0.75 * sine(1600, 440, 16000)
    np.testing.assert_allclose(mono[100:-100], expected[100:-100], atol=5e-3)


@pytest.mark.parametrize("bits", [32, 64])
def test_ieee_float_and_extensible_formats(tmp_path, bits):
    x = sine(300).astype(f"<f{bits // 8}")
    plain = write(tmp_path, "f.wav", riff(fmt_chunk(3, 1, RATE, bits), x.tobytes()))
    ext = write(tmp_path, "e.wav", riff(fmt_chunk(0xFFFE, 1, RATE, bits, 3), x.tobytes()))
    # a LIST chunk of odd size before the data: skipped, with its pad byte
    listed = riff(
        fmt_chunk(3, 1, RATE, bits), x.tobytes(), struct.pack("<4sI", b"LIST", 3) + b"abc\x00"
    )
    for path in (plain, ext, write(tmp_path, "l.wav", listed)):
        np.testing.assert_allclose(wav.read(path).samples[:, 0], x, atol=1e-7)


def test_resampling_a_sine_keeps_its_frequency_and_removes_what_aliases():
    x = sine(8000, 1000, 8000)  # 1 s of 1 kHz at 8 kHz
    up = audio.resample(x, 8000, 22050)
    assert len(up) == 22050
    spectrum = np.abs(np.fft.rfft(up[1000:-1000] * np.hanning(len(up) - 2000)))
    freqs = np.fft.rfftfreq(len(up) - 2000, 1 / 22050)
    assert abs(freqs[np.argmax(spectrum)] - 1000) < 5
    # 7 kHz at 22.05 kHz -> 8 kHz: above the new Nyquist (4 kHz), so filtered out, not folded
    high = audio.resample(sine(22050, 7000, 22050), 22050, 8000)
    assert np.sqrt(np.mean(high[200:-200] ** 2)) < 0.01


@pytest.mark.parametrize(
    "content, words",
    [
        (b"", "empty"),
        (b"hello, this is text and not audio at all", "not a WAV"),
        (riff(fmt_chunk(1, 1, RATE, 16), b""), "no samples"),
        (riff(fmt_chunk(1, 1, RATE, 16), b"\x00\x01" * 50)[:-20], "truncated"),
        (riff(fmt_chunk(1, 2, RATE, 16), b"\x00\x01\x02"), "truncated"),
        (riff(fmt_chunk(0x55, 1, RATE, 16), b"\x00" * 20), "compressed"),  # MP3 in WAV
        (riff(fmt_chunk(0xFFFE, 1, RATE, 16, 0x11), b"\x00" * 20), "compressed"),  # IMA ADPCM
        (riff(fmt_chunk(1, 1, RATE, 12), b"\x00" * 20), "12-bit"),
        (b"RIFF\x04\x00\x00\x00WAVE", "no fmt chunk"),
        (riff(fmt_chunk(1, 1, RATE, 16), b"")[:-8], "no data chunk"),
    ],
)
def test_unreadable_files_are_refused_with_the_reason(tmp_path, content, words):
    path = write(tmp_path, "bad.wav", content)
    with pytest.raises(DataError, match=words) as e:
        wav.read(path)
    assert path in str(e.value)
