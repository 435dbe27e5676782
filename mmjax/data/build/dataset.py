"""`python -m mmjax.data.build`: an image-caption folder or WebDataset shards -> a tfds dataset.

Output: `{data_dir}/{NAME}/1.0.0/`, ArrayRecord files readable with
`tfds.builder_from_directory(path)` (no builder code needed), splits `train` and `validation`,
features `image` (uint8 RGB, shape (None, None, 3)), `captions` (a sequence of UTF-8 texts, one
or more) and `id` (the image's path relative to --images, or `shard/key`), each split in order
of `id`. `{data_dir}/{NAME}/build_report.json` says what was kept, changed and skipped, and why.

Inputs
- `--images DIR --captions FILE`: FILE is `.jsonl` (`{"image": "rel/path.jpg", "caption": ...}`
  or `"captions": [...]`) or `.csv` / `.tsv` with a header naming `image` and `caption` columns
  (csv-module quoting in both). All rows naming one image (`./a.jpg` and `a.jpg` are the same)
  give its captions, in file order.
- `--webdataset 'shards/*.tar'`: members sharing a key (the member path up to the first dot of
  its file name) form a sample: one image (.jpg/.jpeg/.png/.webp) and captions from `.txt` (each
  non-empty line is a caption) and/or `.json` (`caption` or `captions`). Other members are
  ignored and counted. The id is `shard/key`, the shard named without `.tar`.

Images: each is decoded in full with PIL before it is accepted.
- Stored as is: an 8-bit RGB JPEG/PNG without EXIF rotation, longer side <= --max-side.
- Normalised and stored as PNG: grayscale, palette, CMYK, 16-bit (scaled to 8 bits),
  transparency (RGBA, LA, PA, a palette or colour key: composited on WHITE), EXIF orientation
  (applied), longer side above --max-side (Lanczos downscale, aspect kept), other formats (WebP,
  GIF, BMP, TIFF, AVIF; animations keep their first frame). ICC profiles are not applied.
- Skipped, by the first reason that applies: path_outside_images, no_valid_caption,
  missing_file, file_too_large (the file or tar member is over --max-image-mib, default 64; it
  is never read), empty_file, undecodable (corrupt, truncated, or not one of the formats
  above), too_many_pixels (PIL's decompression-bomb limit), too_small (a side < 8 px),
  extreme_aspect_ratio (> 10:1), unsupported_mode, decoded_too_large (width x height x bytes
  per pixel as PIL holds it, read from the header, over --max-decoded-mib, default 256; JPEGs
  count at the reduced scale they are decoded at); WebDataset also sample_without_image,
  sample_without_caption (no .txt/.json member), duplicate_key (a key recurring in a shard
  after other keys; the first run is kept).

Captions: invalid UTF-8 -> dropped (caption_not_utf8); not a string -> dropped
(caption_not_text); control characters, terminal escape sequences (whole, e.g. `\x1b[31m`)
and bidi embeddings, overrides and isolates (U+202A-U+202E, U+2066-U+2069) removed
(caption_control_chars); whitespace stripped and runs collapsed to one space; empty -> dropped
(caption_empty); over 1000 characters -> truncated and kept (caption_truncated; in CSV too,
past the csv module's 131,072-character default). Other issues, which do not count as bad
images: row_unparseable (also JSON nested too deeply to parse), row_missing_field, row_too_large
(a captions-file line or CSV field over --max-text-mib, default 1), path_invalid (an image path
or member name that is not UTF-8 or holds NUL), unsafe_tar_member, extra_image_in_sample,
caption_file_too_large (a .txt/.json member over --max-text-mib; never read),
sample_json_unparseable (also nested too deeply), shard_unreadable (also a pax or GNU
long-name header over 1 MiB, or a GNU sparse 1.0 member: the shard ends there). The report
also counts the normalisations (grayscale, palette, cmyk, 16bit, transparency, exif_rotated,
downscaled, first_frame, reencoded, ...), the image files under --images that no row names
(unreferenced_files) and the ignored tar members by extension.

Security: image paths that are absolute or resolve outside --images (`..`, symlinks) are
refused; tar members are read one by one with `tarfile`, never extracted, and members with
absolute or `..` names or that are not regular files (links, devices) are never read
(directories are skipped); nothing is unpickled. Memory: no file, member, line or header is
read past its limit (limits.py), gzip'd shards are decompressed as a stream, and images are
decoded only within --max-decoded-mib.

Writes: everything (spool, tfds' temporary and download folders) goes into a fresh
`{data_dir}/.{NAME}.building-*` folder; the finished dataset is renamed to `{data_dir}/{NAME}`
and the folder removed, also when the build stops or fails, so no partial dataset is ever left
(a killed build leaves only that folder, safe to delete).

Stop (exit 2; the report is written, no dataset is): skipped images / all images above
--max-bad-fraction, or no image kept. Rebuilding a NAME needs --overwrite; the old
`{data_dir}/{NAME}` is replaced only by a complete new build: a build that stops leaves it as
it was and writes its report to `{data_dir}/{NAME}/build_report.stopped.json`.

Split: a permutation by `numpy.random.default_rng(seed)` of the kept images sorted by id;
validation gets round(val_fraction * n) images, at least 1 if val_fraction > 0 and n >= 2, and
never all of them; when that is 0 the dataset has no validation split (tfds cannot store an
empty one). All captions of an image stay with it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from collections import Counter

import numpy as np

from mmjax.data.build import limits as size_limits
from mmjax.data.build.captions import parse_captions
from mmjax.data.build.image_check import check_image
from mmjax.data.build.inputs import folder_candidates, unreferenced, validate_args, wds_candidates
from mmjax.data.build.tally import MAX_EXAMPLES_PER_REASON, BuildError, Tally
from mmjax.data.build.writer import VERSION, Spool, features, write_tfds
from mmjax.data.builtin.shapes_builder import resolve_data_dir

__all__ = ["BuildError", "build_dataset", "features", "main", "split_validation"]

REPORT_FILE = "build_report.json"
# The report of a build that stopped while an older dataset of the name exists (kept as is).
STOPPED_REPORT_FILE = "build_report.stopped.json"


def _existing_dataset(out_dir: str, overwrite: bool) -> bool:
    """Whether `out_dir` holds a dataset (which the build replaces only once it is complete);
    BuildError if it is in the way."""
    if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise BuildError(f"{out_dir} exists and is not a directory; remove it first")
    # A folder holding only the report of a build that stopped is not worth protecting.
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {REPORT_FILE, STOPPED_REPORT_FILE}:
        if not overwrite:
            raise BuildError(f"{out_dir} already exists; pass --overwrite to replace it")
        return True
    return False


def _move_into_place(built: str, out_dir: str, work_dir: str) -> None:
    """Renames the finished `built` folder to `out_dir`, moving what was there into `work_dir`
    first (a directory cannot be renamed over a non-empty one) and back if the rename fails."""
    if not os.path.isdir(out_dir):
        os.rename(built, out_dir)
        return
    replaced = os.path.join(work_dir, "replaced")
    os.rename(out_dir, replaced)
    try:
        os.rename(built, out_dir)
    except BaseException:
        os.rename(replaced, out_dir)
        raise


def split_validation(count: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask over `count` images (sorted by id): True for validation."""
    num_val = int(val_fraction * count + 0.5)  # round half up, unlike round()
    if val_fraction > 0 and count >= 2:
        num_val = max(num_val, 1)
    num_val = min(num_val, max(count - 1, 0))  # train is never empty
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(seed).permutation(count)[:num_val]] = True
    return mask


def _write_report(report: dict, into: str | None = None) -> None:
    """Writes the report to its `report_path`, or under that name into the folder `into`."""
    path = report["report_path"]
    if into is not None:
        path = os.path.join(into, os.path.basename(path))
    # backslashreplace: file names that are not UTF-8 still give a valid JSON file.
    with open(path, "w", encoding="utf-8", errors="backslashreplace") as handle:
        json.dump(report, handle, ensure_ascii=False, indent=2)
        handle.write("\n")


def _top(counter: Counter, limit: int = 5) -> str:
    return ", ".join(f"{reason} {count}" for reason, count in counter.most_common(limit))


def build_dataset(
    *,
    images_dir: str | None = None,
    captions_file: str | None = None,
    webdataset: str | None = None,
    name: str,
    data_dir: str | None = None,
    val_fraction: float = 0.05,
    seed: int = 0,
    max_bad_fraction: float = 0.1,
    max_side: int = 512,
    max_image_mib: float = size_limits.DEFAULT_MAX_IMAGE_MIB,
    max_text_mib: float = size_limits.DEFAULT_MAX_TEXT_MIB,
    max_decoded_mib: float = size_limits.DEFAULT_MAX_DECODED_MIB,
    overwrite: bool = False,
) -> dict:
    """Builds `{data_dir}/{name}/1.0.0/` (no config level) and returns the report.

    Raises BuildError for bad arguments (nothing written), an existing dataset without
    `overwrite`, or too many bad images (only the report written). The dataset is written into
    a temporary folder under `data_dir` and renamed into place when complete: a build that
    stops or fails leaves no partial dataset and never touches an existing one.
    """
    # Paths may come as pathlib objects; the report stores them as text.
    images_dir, captions_file, webdataset, data_dir = (
        os.fspath(p) if p else None for p in (images_dir, captions_file, webdataset, data_dir)
    )
    options = dict(locals())
    limits_mib = {k: options[k] for k in ("max_image_mib", "max_text_mib", "max_decoded_mib")}
    shards = validate_args(
        **{k: options[k] for k in ("name", "images_dir", "captions_file", "webdataset")},
        **{k: options[k] for k in ("val_fraction", "max_bad_fraction", "max_side", "seed")},
        limits_mib=limits_mib,
    )
    limits = size_limits.Limits.from_mib(
        image=max_image_mib, text=max_text_mib, decoded=max_decoded_mib
    )
    data_dir = options["data_dir"] = resolve_data_dir(data_dir)
    out_dir = os.path.join(data_dir, name)
    tally = Tally()
    # Parse before touching the output, so a bad header never costs an old dataset.
    entries = parse_captions(captions_file, tally, limits.text) if captions_file else {}
    replacing = _existing_dataset(out_dir, overwrite)
    report = {"name": name, "status": "stopped", "dataset_path": None, "options": options}
    report["report_path"] = os.path.join(out_dir, REPORT_FILE)
    if captions_file:
        extra = unreferenced(images_dir, entries)
        report["unreferenced_files"] = len(extra)
        report["unreferenced_examples"] = extra[:MAX_EXAMPLES_PER_REASON]
        base = os.path.basename(captions_file)
        candidates = folder_candidates(images_dir, entries, base, tally, limits)
    else:
        candidates = wds_candidates(shards, tally, limits)
    os.makedirs(data_dir, exist_ok=True)
    work_dir = tempfile.mkdtemp(prefix=f".{name}.building-", dir=data_dir)
    spool = Spool(os.path.join(work_dir, "spool.bin"))
    try:
        for sid, where, captions, data in candidates:
            checked = check_image(data, max_side=max_side, max_decoded_bytes=limits.decoded)
            if checked.reason:
                tally.skip(checked.reason, where, checked.detail)
                continue
            tally.fixes.update(checked.fixes)
            spool.add(sid, captions, checked.data)
        _count(report, tally, len(spool.records))
        stop = _stop_reason(report, tally, max_bad_fraction)
        if stop:
            report["message"] = stop
            if replacing:  # the old dataset and its report stay as they are
                report["report_path"] = os.path.join(out_dir, STOPPED_REPORT_FILE)
            os.makedirs(out_dir, exist_ok=True)
            _write_report(report)
            raise BuildError(f"{stop}; no dataset written; report: {report['report_path']}")
        records = sorted(spool.records)
        is_val = split_validation(len(records), val_fraction, seed)
        splits = {
            "train": [r for r, v in zip(records, is_val, strict=True) if not v],
            "validation": [r for r, v in zip(records, is_val, strict=True) if v],
        }
        # tfds cannot store an empty split, so an empty validation split is left out.
        write_tfds(work_dir, name, {split: recs for split, recs in splits.items() if recs}, spool)
        report["status"] = "built"
        report["dataset_path"] = os.path.join(out_dir, VERSION)
        report["splits"] = {
            split: {"images": len(recs), "captions": sum(len(r[1]) for r in recs)}
            for split, recs in splits.items()
        }
        built = os.path.join(work_dir, name)
        _write_report(report, into=built)
        _move_into_place(built, out_dir, work_dir)
    finally:
        spool.close()
        shutil.rmtree(work_dir, ignore_errors=True)
    _print_summary(report)
    return report


def _count(report: dict, tally: Tally, kept: int) -> None:
    skipped = sum(tally.skipped.values())
    total = kept + skipped
    report.update(
        total_images=total,
        kept_images=kept,
        skipped_images=skipped,
        bad_fraction=skipped / total if total else 0.0,
        skipped=dict(tally.skipped.most_common()),
        issues=dict(tally.issues.most_common()),
        normalised=dict(tally.fixes.most_common()),
        ignored_tar_members=dict(tally.ignored.most_common()),
        examples=tally.examples,
    )


def _stop_reason(report: dict, tally: Tally, max_bad_fraction: float) -> str | None:
    total, skipped = report["total_images"], report["skipped_images"]
    if report["kept_images"] == 0:
        return f"no usable image among {total} (top reasons: {_top(tally.skipped) or 'none'})"
    if report["bad_fraction"] > max_bad_fraction:
        return (
            f"{skipped} of {total} images are bad ({report['bad_fraction']:.1%} > "
            f"--max-bad-fraction {max_bad_fraction:.1%}); top reasons: {_top(tally.skipped)}"
        )
    return None


def _print_summary(report: dict) -> None:
    train, val = report["splits"]["train"], report["splits"]["validation"]
    lines = [
        f"mmjax: built dataset {report['name']!r} at {report['dataset_path']}",
        f"  train: {train['images']} images, {train['captions']} captions | "
        f"validation: {val['images']} images, {val['captions']} captions",
        f"  skipped {report['skipped_images']} of {report['total_images']} images "
        f"({report['bad_fraction']:.1%})"
        + (f": {_top(Counter(report['skipped']), 10)}" if report["skipped"] else ""),
    ]
    for label, key in [("other issues", "issues"), ("normalised", "normalised")]:
        if report[key]:
            lines.append(f"  {label}: {_top(Counter(report[key]), 10)}")
    if report.get("unreferenced_files"):
        lines.append(f"  {report['unreferenced_files']} image files not named in the captions")
    lines.append(f"  report: {report['report_path']}")
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mmjax.data.build",
        description="Turn an image-caption folder (--images + --captions) or WebDataset shards "
        "(--webdataset) into a tfds ArrayRecord dataset at DATA_DIR/NAME/1.0.0, readable with "
        "tfds.builder_from_directory; a report goes to DATA_DIR/NAME/build_report.json.",
        epilog="Exit status 2 on bad arguments or too many bad images (no dataset is written). "
        "What is kept, normalised and skipped: the docstring of mmjax/data/build/dataset.py.",
    )
    source = parser.add_argument_group("input (--images and --captions, or --webdataset)")
    source.add_argument("--images", dest="images_dir", metavar="DIR", help="the image folder")
    source.add_argument(
        "--captions",
        dest="captions_file",
        metavar="FILE",
        help=".jsonl ({image, caption|captions} per line) or .csv/.tsv (image, caption columns)"
        "; image paths are relative to --images",
    )
    source.add_argument(
        "--webdataset", metavar="GLOB", help="tar shards, e.g. 'shards/*.tar' (quote it)"
    )
    parser.add_argument("--name", required=True, help="dataset name: [a-z][a-z0-9_]*")
    parser.add_argument(
        "--data-dir",
        metavar="DIR",
        help="output root (default: $MMJAX_DATA_DIR, else ~/.cache/mmjax/tensorflow_datasets)",
    )
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.05,
        metavar="F",
        help="share of images for validation, in [0, 1) (default 0.05)",
    )
    parser.add_argument("--seed", type=int, default=0, metavar="N", help="split seed (default 0)")
    parser.add_argument(
        "--max-bad-fraction",
        type=float,
        default=0.1,
        metavar="F",
        help="stop if a larger share of the images is skipped (default 0.1)",
    )
    parser.add_argument(
        "--max-side",
        type=int,
        default=512,
        metavar="PX",
        help="downscale images whose longer side is larger (default 512)",
    )
    limits = parser.add_argument_group(
        "size limits (a file, member or row over one is skipped and counted, never read)"
    )
    for flag, default, what in [
        ("--max-image-mib", size_limits.DEFAULT_MAX_IMAGE_MIB, "an image file or tar member"),
        (
            "--max-text-mib",
            size_limits.DEFAULT_MAX_TEXT_MIB,
            "a .txt/.json member, a line or CSV field of --captions",
        ),
        (
            "--max-decoded-mib",
            size_limits.DEFAULT_MAX_DECODED_MIB,
            "an image's decoded pixels (width x height x bytes per pixel, read from its header)",
        ),
    ]:
        limits.add_argument(
            flag, type=float, default=default, metavar="MIB", help=f"{what} (default {default:g})"
        )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing NAME (only once the new build is complete)",
    )
    args = parser.parse_args(argv)
    try:
        build_dataset(**vars(args))
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
