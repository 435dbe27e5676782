"""Tests for `python -m mmjax.data.build`: user image-caption folders / WebDataset -> tfds."""

import io
import json
import os
import struct
import subprocess
import sys
import tarfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from mmjax.data.build import captions as build_captions
from mmjax.data.build import dataset as build
from mmjax.data.build import image_check
from mmjax.data.build.dataset import BuildError, build_dataset
from mmjax.data.build.tally import Tally

REPO = Path(__file__).resolve().parents[1]


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encode(img: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _jsonl(path: Path, rows: list) -> Path:
    lines = [
        r if isinstance(r, bytes) else json.dumps(r, ensure_ascii=False).encode() for r in rows
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def _counts(spec: str) -> dict[str, int]:
    """`"a=1 b=2"` -> `{"a": 1, "b": 2}`: expected report counters, compactly."""
    return {k: int(v) for k, v in (item.split("=") for item in spec.split())}


def _build(tmp_path: Path, name: str, **kwargs) -> dict:
    return build_dataset(name=name, data_dir=tmp_path / "d", **kwargs)


def _argv(**options) -> list[str]:
    return [x for k, v in options.items() for x in (f"--{k.replace('_', '-')}", os.fspath(v))]


def _read(data_dir: Path, name: str, split: str) -> list[dict]:
    builder = tfds.builder_from_directory(os.fspath(data_dir / name / "1.0.0"))
    source = builder.as_data_source(split)
    return [
        {
            "id": source[i]["id"].decode(),
            "captions": [c.decode() for c in source[i]["captions"]],
            "image": source[i]["image"],
        }
        for i in range(len(source))
    ]


@pytest.fixture
def folder(tmp_path):
    """Ten RGB PNGs (two in a subfolder), their pixels, and a jsonl with captions."""
    images, pixels = tmp_path / "images", {}
    (images / "sub").mkdir(parents=True)
    for i in range(10):
        rel = f"sub/{i}.png" if i < 2 else f"{i}.png"
        pixels[rel] = _rgb(16 + i, 20, seed=i)
        Image.fromarray(pixels[rel]).save(images / rel)
    rows = [{"image": rel, "caption": f"photo {rel}"} for rel in pixels]
    rows += [{"image": "./3.png", "captions": ["一只猫在沙发上", "  a  cat\ton a sofa "]}]
    rows += [{"image": "sub/0.png", "caption": "последний"}]
    return images, pixels, _jsonl(tmp_path / "caps.jsonl", rows)


def test_jsonl_round_trip(folder, tmp_path):
    images, pixels, caps = folder
    report = _build(tmp_path, "my_set", images_dir=images, captions_file=caps, val_fraction=0.2)
    out = tmp_path / "d" / "my_set"
    assert report["dataset_path"] == os.fspath(out / "1.0.0")
    assert sorted(os.listdir(out)) == ["1.0.0", "build_report.json"]  # no spool/temp left
    assert json.loads((out / "build_report.json").read_text())["kept_images"] == 10
    train, val = (_read(tmp_path / "d", "my_set", split) for split in ("train", "validation"))
    assert (len(train), len(val)) == (8, 2)
    for split, rows in [("train", train), ("validation", val)]:
        captions = sum(len(r["captions"]) for r in rows)
        assert report["splits"][split] == {"images": len(rows), "captions": captions}
    assert sum(s["captions"] for s in report["splits"].values()) == 10 + 2 + 1
    for split in (train, val):
        assert [r["id"] for r in split] == sorted(r["id"] for r in split)
    assert sorted(r["id"] for r in train + val) == sorted(pixels)
    by_id = {r["id"]: r for r in train + val}
    for rel, array in pixels.items():
        assert by_id[rel]["image"].dtype == np.uint8
        np.testing.assert_array_equal(by_id[rel]["image"], array)
    assert by_id["3.png"]["captions"] == ["photo 3.png", "一只猫在沙发上", "a cat on a sofa"]
    assert by_id["sub/0.png"]["captions"] == ["photo sub/0.png", "последний"]
    info = tfds.builder_from_directory(report["dataset_path"]).info
    assert set(info.features) == {"image", "captions", "id"}
    assert info.features["image"].shape == (None, None, 3)
    assert info.disable_shuffling


def test_split_is_seeded(folder, tmp_path):
    images, _, caps = folder
    val_ids = {}
    for name, seed in [("a", 0), ("b", 0), ("c", 1)]:
        _build(tmp_path, name, images_dir=images, captions_file=caps, val_fraction=0.3, seed=seed)
        val_ids[name] = [r["id"] for r in _read(tmp_path / "d", name, "validation")]
    assert len(val_ids["a"]) == 3
    assert val_ids["a"] == val_ids["b"]
    assert val_ids["a"] != val_ids["c"]
    # Rounding: at least one validation image, never all; none for val_fraction 0.
    counts = [build.split_validation(n, 0.05, 0).sum() for n in (1, 2, 10, 30, 100)]
    assert counts == [0, 1, 1, 2, 5]
    assert build.split_validation(5, 0.99, 0).sum() == 4
    assert build.split_validation(5, 0.0, 0).sum() == 0


@pytest.mark.parametrize("fmt", ["csv", "tsv"])
def test_csv_tsv_several_captions(tmp_path, fmt):
    sep = "," if fmt == "csv" else "\t"
    rows = [
        ["id", "caption", "image"],
        ["1", "a dog", "a.jpg"],
        ["2", '"quoted, with sep\nand newline"' if fmt == "csv" else "quoted", "b.jpg"],
        ["3", "一只狗", "a.jpg"],
        ["4", "   ", "b.jpg"],
        ["5"],
    ]
    text = "\n".join(sep.join(r) for r in rows) + "\n"
    path = tmp_path / f"caps.{fmt}"
    path.write_text(text, encoding="utf-8")
    tally = Tally()
    entries = build_captions.parse_captions(os.fspath(path), tally, 1 << 20)
    assert entries["a.jpg"].captions == ["a dog", "一只狗"]
    expected_b = "quoted, with sep and newline" if fmt == "csv" else "quoted"
    assert entries["b.jpg"].captions == [expected_b]
    assert tally.issues == {"caption_empty": 1, "row_missing_field": 1}
    missing_row = [e for e in tally.examples if e["reason"] == "row_missing_field"]
    assert missing_row[0]["where"] == f"caps.{fmt}:{7 if fmt == 'csv' else 6}"
    path.write_text(f"image{sep}text\na.jpg{sep}x\n")
    with pytest.raises(BuildError, match="header must name"):
        build_captions.parse_captions(os.fspath(path), tally, 1 << 20)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims a huge size: PIL refuses it on open, before decoding anything."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))


def test_bad_items_are_counted_and_good_ones_kept(tmp_path):
    images, outside = tmp_path / "images", tmp_path / "outside"
    images.mkdir()
    outside.mkdir()
    good = {f"g{i}.png": _rgb(12, 12, i) for i in range(12)}
    for rel, array in good.items():
        Image.fromarray(array).save(images / rel)
    Image.fromarray(_rgb(12, 12, 99)).save(outside / "secret.png")
    (images / "link.png").symlink_to(outside / "secret.png")
    (images / "empty.png").write_bytes(b"")
    (images / "garbage.png").write_bytes(b"not an image at all")
    (images / "truncated.png").write_bytes(_encode(Image.fromarray(_rgb(64, 64, 5)))[:400])
    (images / "bomb.png").write_bytes(_png_header_only(20000, 20000))
    Image.fromarray(_rgb(10, 110, 1)).save(images / "wide.png")
    Image.fromarray(_rgb(5, 20, 1)).save(images / "tiny.png")
    Image.fromarray(_rgb(12, 12, 1)).save(images / "nocap.png")
    Image.fromarray(_rgb(12, 12, 1)).save(images / "unreferenced.png")
    bad = "missing empty garbage truncated bomb wide tiny ../outside/secret link".split()
    rows = (
        [{"image": rel, "caption": "good"} for rel in good]
        + [{"image": f"{rel}.png", "caption": "bad"} for rel in bad]
        + [{"image": "/etc/hostname", "caption": "absolute"}]
        + [
            {"image": "nocap.png", "captions": ["   ", ""]},
            b'{"image": "g0.png", "caption": "bad utf8 \xff\xfe"}',
            {"image": "g1.png", "caption": "x" * 1500},
            {"image": "g2.png", "caption": "tab\tnul\x00bell\x07 end"},
            {"image": "g3.png", "captions": ["ok", 5]},
            {"image": "nul\x00.png", "caption": "a path no file system accepts"},
            {"caption": "row without image"},
            {"image": "g4.png"},
            b"this is not json",
            b"[1, 2]",
        ]
    )
    caps = _jsonl(tmp_path / "caps.jsonl", rows)
    options = {"images_dir": images, "captions_file": caps, "val_fraction": 0.0}
    report = _build(tmp_path, "bad", **options, max_bad_fraction=1.0)
    assert report["skipped"] == _counts(
        "path_outside_images=3 undecodable=2 missing_file=1 empty_file=1 too_many_pixels=1 "
        "extreme_aspect_ratio=1 too_small=1 no_valid_caption=1"
    )
    assert report["issues"] == _counts(
        "caption_empty=2 row_missing_field=2 row_unparseable=2 caption_not_utf8=1 "
        "caption_truncated=1 caption_control_chars=1 caption_not_text=1 path_invalid=1"
    )
    assert report["total_images"] == 23 == report["kept_images"] + report["skipped_images"]
    assert report["kept_images"] == 12 and report["unreferenced_files"] == 1
    lines = [e["where"] for e in report["examples"] if e["reason"] == "row_missing_field"]
    assert lines == ["caps.jsonl:29", "caps.jsonl:30"]
    train = {r["id"]: r for r in _read(tmp_path / "d", "bad", "train")}
    assert sorted(train) == sorted(good)  # nothing good lost, nothing bad (or outside) let in
    for rel, array in good.items():
        np.testing.assert_array_equal(train[rel]["image"], array)
    assert train["g0.png"]["captions"] == ["good"]
    assert train["g1.png"]["captions"] == ["good", "x" * 1000]
    assert train["g2.png"]["captions"] == ["good", "tab nulbell end"]
    assert train["g3.png"]["captions"] == ["good", "ok"]


def test_modes_are_normalised_to_rgb8(tmp_path):
    (images := tmp_path / "images").mkdir()
    gray = _rgb(10, 12, 0)[..., 0]
    Image.fromarray(gray).save(images / "gray.png")
    rgba = np.concatenate([_rgb(10, 12, 1), np.zeros((10, 12, 1), np.uint8)], axis=-1)
    rgba[:5, :, 3] = 255  # top half opaque, bottom half transparent
    Image.fromarray(rgba).save(images / "rgba.png")
    la = [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 3])]
    Image.merge("LA", la).save(images / "la.png")
    wide = np.tile(np.array([0, 257, 32896, 65535], dtype=np.uint16), (10, 3))
    Image.fromarray(wide).save(images / "sixteen.png")
    palette = Image.fromarray(_rgb(10, 12, 2)).quantize(8)
    palette.save(images / "palette.png")
    palette.save(images / "palette_t.png", transparency=0)
    Image.new("CMYK", (12, 10), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(_rgb(10, 20, 3)).save(images / "rotated.jpg", exif=exif)
    Image.fromarray(_rgb(40, 80, 4)).save(images / "big.png")
    Image.fromarray(_rgb(10, 12, 5)).save(images / "lossless.webp", lossless=True)
    names = sorted(os.listdir(images))
    caps = _jsonl(tmp_path / "c.jsonl", [{"image": n, "caption": n} for n in names])
    options = {"images_dir": images, "captions_file": caps, "val_fraction": 0.0}
    report = _build(tmp_path, "modes", **options, max_side=32)
    assert report["kept_images"] == len(names) == 10
    assert report["normalised"] == _counts(
        "transparency=3 grayscale=2 16bit=1 palette=1 cmyk=1 exif_rotated=1 downscaled=1 "
        "reencoded=1"
    )
    out = {r["id"]: r["image"] for r in _read(tmp_path / "d", "modes", "train")}
    for image in out.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3
    np.testing.assert_array_equal(out["gray.png"], np.stack([gray] * 3, axis=-1))
    np.testing.assert_array_equal(out["rgba.png"][:5], rgba[:5, :, :3])
    assert (out["rgba.png"][5:] == 255).all()  # transparent -> white
    np.testing.assert_array_equal(out["la.png"][:5, :, 0], rgba[:5, :, 0])
    assert (out["la.png"][5:] == 255).all()
    np.testing.assert_array_equal(out["sixteen.png"][0, :4, 0], [0, 1, 128, 255])
    np.testing.assert_array_equal(out["palette.png"], np.asarray(palette.convert("RGB")))
    transparent = np.asarray(palette) == 0
    assert transparent.any() and (out["palette_t.png"][transparent] == 255).all()
    assert out["cmyk.jpg"].shape == (10, 12, 3)
    np.testing.assert_allclose(out["cmyk.jpg"].mean(axis=(0, 1)), [255, 0, 0], atol=3)
    assert out["rotated.jpg"].shape == (20, 10, 3)  # width and height swapped
    assert out["big.png"].shape == (16, 32, 3)  # longer side = max_side, aspect kept
    np.testing.assert_array_equal(out["lossless.webp"], _rgb(10, 12, 5))


def test_plain_rgb_jpeg_and_png_bytes_are_kept():
    jpeg = _encode(Image.fromarray(_rgb(10, 12, 0)), "JPEG")
    png = _encode(Image.fromarray(_rgb(10, 12, 0)))
    for data in (jpeg, png):
        checked = image_check.check_image(data, max_side=64)
        assert checked.data is data and checked.fixes == () and checked.size == (12, 10)
    assert image_check.check_image(png, max_side=8).fixes == ("downscaled",)
    # A JPEG above max_side is decoded at reduced scale (draft) and still re-encoded.
    big = _encode(Image.fromarray(np.full((48, 64, 3), 200, np.uint8)), "JPEG")
    checked = image_check.check_image(big, max_side=32)
    assert (checked.fixes, checked.size) == (("downscaled",), (32, 24))
    assert abs(np.asarray(Image.open(io.BytesIO(checked.data))).astype(int) - 200).max() <= 2
    assert image_check.check_image(b"", max_side=64).reason == "empty_file"


def _add(tar: tarfile.TarFile, name: str, data: bytes = b"", kind=tarfile.REGTYPE) -> None:
    info = tarfile.TarInfo(name)
    info.type, info.size = kind, len(data) if kind == tarfile.REGTYPE else 0
    if kind == tarfile.SYMTYPE:
        info.linkname = "/etc/passwd"
    tar.addfile(info, io.BytesIO(data) if kind == tarfile.REGTYPE else None)


def test_webdataset_shards(tmp_path):
    (shards := tmp_path / "shards").mkdir()
    png = {k: _rgb(12, 14, i) for i, k in enumerate(["0002", "0004", "0005", "0006", "dir"])}
    with tarfile.open(shards / "shard-000.tar", "w") as tar:
        _add(tar, "0001.jpg", _encode(Image.fromarray(_rgb(12, 12, 7)), "JPEG"))
        _add(tar, "0001.txt", "a cat\n\nune chatte été\n".encode())
        _add(tar, "0002.png", _encode(Image.fromarray(png["0002"])))
        _add(tar, "0002.json", json.dumps({"captions": ["狗", "dog"], "w": 1}).encode())
        _add(tar, "0003.txt", b"caption without image")
        _add(tar, "0004.png", _encode(Image.fromarray(png["0004"])))
        _add(tar, "0005.png", _encode(Image.fromarray(png["0005"])))
        _add(tar, "0005.txt", b"five")
        _add(tar, "0005.cls", b"3")
        _add(tar, "../evil.txt", b"escape")
        _add(tar, "/abs.png", _encode(Image.fromarray(png["0005"])))
        _add(tar, "0006.png", kind=tarfile.SYMTYPE)
        _add(tar, "0006.txt", b"six")
        _add(tar, "dev0", kind=tarfile.CHRTYPE)
        _add(tar, "0001.json", b'{"caption": "again"}')  # key 0001 again, not adjacent
    with tarfile.open(shards / "shard-001.tar", "w") as tar:
        _add(tar, "dir/0001.png", _encode(Image.fromarray(png["dir"])))
        _add(tar, "dir/0001.txt", b"in a folder")
        _add(tar, "0007.webp", _encode(Image.fromarray(_rgb(12, 12, 8)), "WEBP", lossless=True))
        _add(tar, "0007.txt", b"seven")
    options = {"webdataset": shards / "*.tar", "val_fraction": 0.0}
    report = _build(tmp_path, "wds", **options, max_bad_fraction=0.5)
    expected = "sample_without_image=2 sample_without_caption=1 duplicate_key=1"
    assert report["skipped"] == _counts(expected)
    assert report["issues"] == {"unsafe_tar_member": 4}
    assert report["ignored_tar_members"] == {"cls": 1}
    assert report["total_images"] == 9 and report["kept_images"] == 5
    assert "validation" not in tfds.builder_from_directory(report["dataset_path"]).info.splits
    rows = _read(tmp_path / "d", "wds", "train")
    ids = "shard-000/0001 shard-000/0002 shard-000/0005 shard-001/0007 shard-001/dir/0001"
    assert [r["id"] for r in rows] == ids.split()
    captions = [["a cat", "une chatte été"], ["狗", "dog"], ["five"], ["seven"], ["in a folder"]]
    assert [r["captions"] for r in rows] == captions
    np.testing.assert_array_equal(rows[1]["image"], png["0002"])
    np.testing.assert_array_equal(rows[4]["image"], png["dir"])


def test_too_many_bad_images_stops_without_dataset(folder, tmp_path, capsys):
    images, _, caps = folder
    for i in range(2, 4):
        (images / f"{i}.png").unlink()
    argv = _argv(images=images, captions=caps, name="stop", data_dir=tmp_path / "d")
    argv += ["--max-bad-fraction", "0.1"]
    assert build.main(argv) == 2
    message = capsys.readouterr().err
    assert message.count("\n") == 1 and message.startswith("error: 2 of 10 images are bad (20.0%")
    assert "missing_file 2" in message and "build_report.json" in message
    out = tmp_path / "d" / "stop"
    assert os.listdir(out) == ["build_report.json"]
    report = json.loads((out / "build_report.json").read_text())
    assert report["status"] == "stopped" and report["skipped"] == {"missing_file": 2}
    # After the report of a stopped build, a new build needs no --overwrite.
    assert build.main([*argv, "--max-bad-fraction", "0.2"]) == 0
    assert len(_read(tmp_path / "d", "stop", "train")) == 7  # and 1 in validation


def test_no_good_image_stops(tmp_path):
    (tmp_path / "images").mkdir()
    caps = _jsonl(tmp_path / "c.jsonl", [{"image": "nothing.png", "caption": "x"}])
    with pytest.raises(BuildError, match="no usable image among 1"):
        _build(tmp_path, "none", images_dir=tmp_path / "images", captions_file=caps)


def test_argument_errors_and_overwrite(folder, tmp_path):
    images, _, caps = folder
    d = tmp_path / "d"
    common = {"images_dir": images, "captions_file": caps, "data_dir": d}
    bad = [
        ({"name": "Bad-Name"}, "invalid name"),
        ({"name": "ok", "images_dir": tmp_path / "nope"}, "is not a directory"),
        ({"name": "ok", "captions_file": tmp_path / "nope.jsonl"}, "is not a file"),
        ({"name": "ok", "captions_file": images / "2.png"}, "must end in one of"),
        ({"name": "ok", "val_fraction": 1.0}, "val-fraction"),
        ({"name": "ok", "webdataset": "x/*.tar"}, "not both"),
        ({"name": "ok", "images_dir": None, "captions_file": None, "webdataset": "x/*"}, "no file"),
    ]
    for kwargs, match in bad:
        with pytest.raises(BuildError, match=match):
            build_dataset(**{**common, **kwargs})
    assert not d.exists()  # nothing written before the arguments are valid
    build_dataset(**common, name="ok", val_fraction=0.0)
    with pytest.raises(BuildError, match="--overwrite"):
        build_dataset(**common, name="ok")
    report = build_dataset(**common, name="ok", val_fraction=0.5, overwrite=True)
    assert report["splits"]["validation"]["images"] == 5
    assert len(_read(d, "ok", "validation")) == 5


def test_cli_subprocess(folder, tmp_path):
    images, _, caps = folder
    base = [sys.executable, "-m", "mmjax.data.build"]
    base += _argv(images=images, captions=caps, data_dir=tmp_path / "d")
    done = subprocess.run([*base, "--name", "cli_set"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    path = tmp_path / "d" / "cli_set" / "1.0.0"
    assert f"built dataset 'cli_set' at {path}" in done.stdout
    assert len(_read(tmp_path / "d", "cli_set", "train")) == 9
    done = subprocess.run([*base, "--name", "9lives"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.startswith("error: invalid name '9lives'") and done.stderr.count("\n") == 1
