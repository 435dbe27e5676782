"""Hostile inputs for `python -m mmjax.data.build` (issue 13, items 5, 6 and 8): members, files,
rows and headers that declare far more than they hold, decompression and pixel bombs, deeply
nested JSON, over-long CSV fields, terminal escapes and bidi overrides in captions, and builds
that fail half-way. Every hostile input is built in a temporary folder from headers, holes of
sparse files and concatenated gzip members: no test allocates what the input declares."""

import gzip
import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import tracemalloc
import zlib

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data.build import dataset as build
from mmjax.data.build.dataset import BuildError, build_dataset
from mmjax.data.build.image_check import check_image

MIB = 1 << 20
BOMB = 200 * MIB  # what a hostile member, file or header declares
PEAK_LIMIT = 32 * MIB  # Python allocations while a build reads the hostile input


def _png(h: int = 12, w: int = 12, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def _header(name: str, size: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.type = size, kind
    return info.tobuf(format=tarfile.GNU_FORMAT)


def _member(name: str, data: bytes) -> bytes:
    return _header(name, len(data)) + data + b"\0" * (-len(data) % 512)


def _good_samples(count: int = 4) -> bytes:
    return b"".join(
        _member(f"ok{i}.png", _png(seed=i)) + _member(f"ok{i}.txt", b"a good sample")
        for i in range(count)
    )


def _hostile_shard(path, prefix: bytes, name: str, size: int, kind=tarfile.REGTYPE, gz=False):
    """`prefix` (whole members), then a header of `name` declaring `size` bytes of zeros that
    are a hole in the file, or 1 MiB gzip members of zeros concatenated (a valid .tar.gz)."""
    tail = size + (-size % 512) + 1024  # the declared data, its padding, the end of archive
    with open(path, "wb") as f:
        if not gz:
            f.write(prefix + _header(name, size, kind))
            f.truncate(f.tell() + tail)
            return
        f.write(gzip.compress(prefix + _header(name, size, kind)))
        zeros = gzip.compress(b"\0" * MIB)
        for _ in range(tail // MIB):
            f.write(zeros)
        f.write(gzip.compress(b"\0" * (tail % MIB)))


def _build_traced(tmp_path, name: str, **kwargs) -> tuple[dict, int]:
    """The report of a build and the peak of Python's allocations while it ran."""
    tracemalloc.start()
    try:
        report = build_dataset(
            name=name, data_dir=tmp_path / "d", val_fraction=0.0, max_bad_fraction=1.0, **kwargs
        )
        return report, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("gz", [False, True], ids=["tar", "tar.gz"])
def test_oversized_members_are_counted_not_read(tmp_path, gz):
    (shards := tmp_path / "shards").mkdir()
    prefix = _good_samples() + _member("big_txt.png", _png(seed=9))
    _hostile_shard(shards / "a.tar", prefix, "big_txt.txt", BOMB, gz=gz)
    _hostile_shard(shards / "b.tar", _member("big_png.txt", b"caption"), "big_png.png", BOMB, gz=gz)
    report, peak = _build_traced(tmp_path, "members", webdataset=shards / "*.tar")
    assert report["issues"] == {"caption_file_too_large": 1}
    assert report["skipped"] == {"no_valid_caption": 1, "file_too_large": 1}
    assert report["kept_images"] == 4
    assert peak < PEAK_LIMIT, f"{peak / MIB:.0f} MiB"


@pytest.mark.parametrize("kind", [tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME])
def test_oversized_tar_headers_stop_the_shard_only(tmp_path, kind):
    """tarfile reads a pax or GNU long-name header whole: one declaring 200 MiB ends its shard
    (counted) instead of being read."""
    (shards := tmp_path / "shards").mkdir()
    _hostile_shard(shards / "a.tar", _good_samples(2), "header", BOMB, kind=kind)
    (shards / "b.tar").write_bytes(_good_samples(3) + b"\0" * 1024)
    report, peak = _build_traced(tmp_path, "headers", webdataset=shards / "*.tar")
    assert report["issues"] == {"shard_unreadable": 1} and report["kept_images"] == 5
    assert "extension header of 209715200 bytes" in str(report["examples"])
    assert peak < PEAK_LIMIT, f"{peak / MIB:.0f} MiB"


def test_oversized_files_and_rows_in_folder_mode(tmp_path):
    (images := tmp_path / "images").mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(_png(seed=i))
    with open(images / "huge.png", "wb") as f:
        f.truncate(BOMB)  # a sparse file: 200 MiB of zeros, no disk used
    rows = [json.dumps({"image": n, "caption": n}).encode() for n in sorted(os.listdir(images))]
    with open(caps := tmp_path / "caps.jsonl", "wb") as f:
        f.write(b"\n".join(rows[:2]) + b'\n{"image": "0.png", "caption": "')
        f.truncate(f.tell() + BOMB)  # a 200 MiB line (its zeros are its caption)
        f.seek(0, os.SEEK_END)
        f.write(b'"}\n' + b"\n".join(rows[2:]) + b"\n")
    report, peak = _build_traced(tmp_path, "files", images_dir=images, captions_file=caps)
    assert report["skipped"] == {"file_too_large": 1}
    assert report["issues"] == {"row_too_large": 1}
    assert report["kept_images"] == 4
    assert peak < PEAK_LIMIT, f"{peak / MIB:.0f} MiB"
    examples = {e["reason"]: e for e in report["examples"]}
    assert examples["row_too_large"]["where"] == "caps.jsonl:3"
    assert "over --max-image-mib (64 MiB)" in examples["file_too_large"]["detail"]


def _png_header(width: int, height: int, depth: int, color: int, idat: bytes = b"") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _zero_png(width: int, height: int, depth: int, color: int) -> bytes:
    """A PNG of zeros, compressed row by row (the raw pixels never exist in memory)."""
    row = b"\0" * (1 + width * {0: 1, 2: 3, 6: 4}[color] * depth // 8)
    compress = zlib.compressobj(9)
    idat = b"".join([compress.compress(row) for _ in range(height)] + [compress.flush()])
    return _png_header(width, height, depth, color, idat)


def test_decoded_size_is_checked_before_decoding():
    # 9000 x 9000 16-bit RGBA, under PIL's own limit: PIL would hold 309 MiB (4 bytes a pixel).
    claims = _png_header(9000, 9000, 16, 6, zlib.compress(b"\0" * 64))
    checked = check_image(claims, max_side=512)
    assert checked.reason == "decoded_too_large", checked
    assert checked.detail.startswith("9000x9000 RGBA: 324000000 bytes")
    gray = _zero_png(600, 600, 16, 0)  # 2 bytes a pixel in PIL: 720,000 bytes
    assert check_image(gray, max_side=64, max_decoded_bytes=720_000).size == (64, 64)
    assert check_image(gray, max_side=64, max_decoded_bytes=719_999).reason == "decoded_too_large"


def test_a_large_16bit_png_is_decoded_in_bounded_memory(tmp_path):
    """6000 x 6000 16-bit grayscale (69 MiB decoded; 70 KB as a file) took 0.6 GB to normalise
    (int64 arithmetic on every pixel); now it is downscaled first, then converted."""
    (tmp_path / "big.png").write_bytes(_zero_png(6000, 6000, 16, 0))
    code = (
        "from mmjax.data.build.image_check import check_image\n"
        f"checked = check_image(open({str(tmp_path / 'big.png')!r}, 'rb').read(), max_side=512)\n"
        "assert checked.size == (512, 512) and '16bit' in checked.fixes, checked\n"
        # VmHWM, not ru_maxrss: that keeps the peak of the forked pytest process across exec.
        "print(open('/proc/self/status').read().split('VmHWM:')[1].split()[0])"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    peak_mib = int(done.stdout.split()[-1]) / 1024  # in kB
    # The decoded image and 64 MiB for the interpreter, PIL and numpy (about 30 here).
    assert peak_mib < 69 + 64, f"peak RSS {peak_mib:.0f} MiB"


def _deep(depth: int) -> str:
    return "[" * depth + "]" * depth


def test_deeply_nested_json_is_counted(tmp_path):
    (images := tmp_path / "images").mkdir()
    for i in range(3):
        (images / f"{i}.png").write_bytes(_png(seed=i))
    caps = tmp_path / "caps.jsonl"
    rows = [json.dumps({"image": f"{i}.png", "caption": "fine"}) for i in range(3)]
    rows.insert(1, '{"image": "0.png", "caption": ' + _deep(100_000) + "}")
    caps.write_text("\n".join(rows) + "\n")
    report = build_dataset(
        images_dir=images, captions_file=caps, name="deep", data_dir=tmp_path / "d"
    )
    assert report["issues"] == {"row_unparseable": 1} and report["kept_images"] == 3
    assert report["examples"][0]["detail"] == "nested too deeply"
    (shards := tmp_path / "shards").mkdir()
    deep_json = '{"caption": ' + _deep(100_000) + "}"
    samples = (
        _good_samples(3) + _member("deep.png", _png()) + _member("deep.json", deep_json.encode())
    )
    (shards / "a.tar").write_bytes(samples + b"\0" * 1024)
    report = build_dataset(
        webdataset=shards / "*.tar", name="deep_wds", data_dir=tmp_path / "d", max_bad_fraction=0.5
    )
    assert report["issues"] == {"sample_json_unparseable": 1}
    assert report["skipped"] == {"no_valid_caption": 1} and report["kept_images"] == 3


def _shards_of(tmp_path, count: int) -> str:
    (shards := tmp_path / f"shards{count}").mkdir(exist_ok=True)
    (shards / "a.tar").write_bytes(_good_samples(count) + b"\0" * 1024)
    return os.fspath(shards / "*.tar")


def test_a_failed_build_leaves_nothing_and_keeps_the_old_dataset(tmp_path, monkeypatch):
    data_dir = tmp_path / "d"

    def crash(*args, **kwargs):
        raise RuntimeError("killed half-way")

    with monkeypatch.context() as patch:
        patch.setattr(build, "check_image", crash)
        with pytest.raises(RuntimeError, match="half-way"):
            build_dataset(webdataset=_shards_of(tmp_path, 3), name="x", data_dir=data_dir)
    assert os.listdir(data_dir) == []  # neither x/ nor the temporary folder

    build_dataset(webdataset=_shards_of(tmp_path, 3), name="x", data_dir=data_dir)
    old_report = (data_dir / "x" / "build_report.json").read_text()
    with monkeypatch.context() as patch:
        patch.setattr(build, "check_image", crash)
        with pytest.raises(RuntimeError, match="half-way"):
            build_dataset(
                webdataset=_shards_of(tmp_path, 5), name="x", data_dir=data_dir, overwrite=True
            )
    # The old dataset is untouched by a build that crashed, or that stopped on bad images.
    with pytest.raises(BuildError, match=r"report: .*x/build_report.stopped.json"):
        build_dataset(
            webdataset=_shards_of(tmp_path, 4),
            name="x",
            data_dir=data_dir,
            overwrite=True,
            max_side=512,
            max_decoded_mib=1e-6,
        )
    assert sorted(os.listdir(data_dir)) == ["x"]
    assert (data_dir / "x" / "build_report.json").read_text() == old_report
    assert json.loads(old_report)["kept_images"] == 3
    report = build_dataset(
        webdataset=_shards_of(tmp_path, 6), name="x", data_dir=data_dir, overwrite=True
    )
    assert report["kept_images"] == 6 and sorted(os.listdir(data_dir)) == ["x"]
    assert sorted(os.listdir(data_dir / "x")) == ["1.0.0", "build_report.json"]


def test_csv_captions_past_the_csv_module_limit(tmp_path):
    """The csv module refuses fields over 131,072 characters: such a caption is truncated like
    any other; a field over --max-text-mib is counted and the other rows are kept."""
    (images := tmp_path / "images").mkdir()
    for i in range(4):
        (images / f"{i}.png").write_bytes(_png(seed=i))
    long_caption = "word " * 40_000  # 200,000 characters
    rows = ["image,caption", f'0.png,"{long_caption}"', "1.png,short"]
    rows += ['2.png,"' + "x" * (2 * MIB) + '"', "2.png,kept", "3.png,three"]
    (caps := tmp_path / "caps.csv").write_text("\n".join(rows) + "\n")
    report = build_dataset(
        images_dir=images, captions_file=caps, name="long", data_dir=tmp_path / "d"
    )
    assert report["kept_images"] == 4
    assert report["issues"] == {"caption_truncated": 1, "row_too_large": 1}


def test_terminal_escapes_and_bidi_controls_are_removed(tmp_path):
    (shards := tmp_path / "shards").mkdir()
    captions = {
        "a": ("\x1b[31mred\x1b[0m car", "red car"),
        "b": ("\u202egnp.exe\u202c photo", "gnp.exe photo"),
        "c": ("an \u2066isolated\u2069 word\x1b]0;title\x07", "an isolated word"),
        "d": ("plain text", "plain text"),
    }
    members = b"".join(
        _member(f"{k}.png", _png(seed=i)) + _member(f"{k}.txt", text.encode())
        for i, (k, (text, _)) in enumerate(captions.items())
    )
    (shards / "a.tar").write_bytes(members + b"\0" * 1024)
    report = build_dataset(
        webdataset=shards / "*.tar", name="clean", data_dir=tmp_path / "d", val_fraction=0.0
    )
    assert report["issues"] == {"caption_control_chars": 3}
    source = tfds.builder_from_directory(report["dataset_path"]).as_data_source("train")
    got = {row["id"].decode(): [c.decode() for c in row["captions"]] for row in source}
    assert got == {f"a/{k}": [clean] for k, (_, clean) in captions.items()}


@pytest.mark.parametrize("option", ["max_image_mib", "max_text_mib", "max_decoded_mib"])
@pytest.mark.parametrize("value", [0, -1.0, float("nan"), float("inf")])
def test_limits_must_be_positive_and_finite(tmp_path, option, value):
    flag = "--" + option.replace("_", "-")
    with pytest.raises(BuildError, match=f"{flag} must be a positive number of MiB"):
        build_dataset(
            webdataset=_shards_of(tmp_path, 1), name="x", data_dir=tmp_path / "d", **{option: value}
        )
    assert not (tmp_path / "d").exists()  # refused before anything is written
