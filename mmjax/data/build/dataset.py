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
  missing_file, empty_file, undecodable (corrupt, truncated, or not one of the formats above),
  too_many_pixels (PIL's decompression-bomb limit), too_small (a side < 8 px),
  extreme_aspect_ratio (> 10:1), unsupported_mode; WebDataset also sample_without_image,
  sample_without_caption (no .txt/.json member), duplicate_key (a key recurring in a shard
  after other keys; the first run is kept).

Captions: invalid UTF-8 -> dropped (caption_not_utf8); not a string -> dropped
(caption_not_text); control characters removed (caption_control_chars); whitespace stripped
and runs collapsed to one space; empty -> dropped (caption_empty); over 1000 characters ->
truncated and kept (caption_truncated). Other issues, which do not count as bad images:
row_unparseable, row_missing_field, path_invalid (an image path or member name that is not
UTF-8 or holds NUL), unsafe_tar_member, extra_image_in_sample, sample_json_unparseable,
shard_unreadable. The report also counts the normalisations (grayscale, palette, cmyk, 16bit,
transparency, exif_rotated, downscaled, first_frame, reencoded, ...), the image files under
--images that no row names (unreferenced_files) and the ignored tar members by extension.

Security: image paths that are absolute or resolve outside --images (`..`, symlinks) are
refused; tar members are read one by one with `tarfile`, never extracted, and members with
absolute or `..` names or that are not regular files (links, devices) are never read
(directories are skipped); nothing is unpickled; all writes go under `{data_dir}/{NAME}`
(tfds' temporary directory and download folder too).

Stop (exit 2; the report is written, no dataset is): skipped images / all images above
--max-bad-fraction, or no image kept. Rebuilding a NAME needs --overwrite, which deletes the
old `{data_dir}/{NAME}` before building (even if the new build then stops).

Split: a permutation by `numpy.random.default_rng(seed)` of the kept images sorted by id;
validation gets round(val_fraction * n) images, at least 1 if val_fraction > 0 and n >= 2, and
never all of them; when that is 0 the dataset has no validation split (tfds cannot store an
empty one). All captions of an image stay with it.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import sys
from collections import Counter

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmjax.data.build.image_check import check_image
from mmjax.data.build.inputs import (
    MAX_EXAMPLES_PER_REASON,
    BuildError,
    Tally,
    folder_candidates,
    parse_captions,
    unreferenced,
    validate_args,
    wds_candidates,
)
from mmjax.data.builtin.shapes_builder import resolve_data_dir

__all__ = ["BuildError", "build_dataset", "features", "main", "split_validation"]

VERSION = "1.0.0"
REPORT_FILE = "build_report.json"


class _Spool:
    """Accepted images on disk between the checking pass and tfds' writing pass, so memory
    stays flat, nothing is decoded twice and the shards are read once."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.file = open(path, "w+b")
        self.records: list[tuple[str, list[str], int, int]] = []

    def add(self, sid: str, captions: list[str], data: bytes) -> None:
        self.records.append((sid, captions, self.file.tell(), len(data)))
        self.file.write(data)

    def read(self, offset: int, length: int) -> bytes:
        self.file.seek(offset)
        return self.file.read(length)

    def close(self) -> None:
        self.file.close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)


def features() -> tfds.features.FeaturesDict:
    return tfds.features.FeaturesDict(
        {
            "image": tfds.features.Image(shape=(None, None, 3)),
            "captions": tfds.features.Sequence(tfds.features.Text()),
            "id": tfds.features.Text(),
        }
    )


class _Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Writes the spooled examples as dataset `name` (set per instance, as tfds' AdhocBuilder)."""

    VERSION = tfds.core.Version(VERSION)
    # See shapes_builder.py: tfds' own lookup of the source file fails on Python >= 3.9.
    code_path = epath.Path(__file__)
    # tfds would otherwise derive its metadata folder (README, CITATIONS) from the module name.
    pkg_dir_path = epath.Path(__file__).parent

    def __init__(self, *, name: str, splits: dict[str, list], spool: _Spool, **kwargs) -> None:
        self.name = name
        self._splits, self._spool = splits, spool
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Built from user images and captions by mmjax.data.build.",
            features=features(),
            disable_shuffling=True,  # keep examples in order of id
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        return {split: self._generate_examples(recs) for split, recs in self._splits.items()}

    def _generate_examples(self, records):
        for index, (sid, captions, offset, length) in enumerate(records):
            yield (
                index,
                {"image": self._spool.read(offset, length), "captions": captions, "id": sid},
            )


def _prepare_out_dir(out_dir: str, overwrite: bool) -> None:
    if os.path.islink(out_dir) or (os.path.exists(out_dir) and not os.path.isdir(out_dir)):
        raise BuildError(f"{out_dir} exists and is not a directory; remove it first")
    # A folder holding only the report of a build that stopped is not worth protecting.
    if os.path.isdir(out_dir) and set(os.listdir(out_dir)) - {REPORT_FILE}:
        if not overwrite:
            raise BuildError(f"{out_dir} already exists; pass --overwrite to replace it")
        shutil.rmtree(out_dir)
    os.makedirs(out_dir, exist_ok=True)


def split_validation(count: int, val_fraction: float, seed: int) -> np.ndarray:
    """A boolean mask over `count` images (sorted by id): True for validation."""
    num_val = int(val_fraction * count + 0.5)  # round half up, unlike round()
    if val_fraction > 0 and count >= 2:
        num_val = max(num_val, 1)
    num_val = min(num_val, max(count - 1, 0))  # train is never empty
    mask = np.zeros(count, dtype=bool)
    mask[np.random.default_rng(seed).permutation(count)[:num_val]] = True
    return mask


def _write_tfds(data_dir: str, out_dir: str, name: str, splits: dict, spool: _Spool) -> str:
    builder = _Builder(
        name=name, splits=splits, spool=spool, data_dir=data_dir, file_format="array_record"
    )
    downloads = os.path.join(out_dir, ".downloads")  # tfds makes one; keep it inside out_dir
    log = io.StringIO()  # tfds prints progress bars; they are replayed only on failure
    absl_logger, level = logging.getLogger("absl"), logging.getLogger("absl").level
    absl_logger.setLevel(logging.ERROR)  # hides expected warnings, e.g. about missing OpenCV
    try:
        with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
            builder.download_and_prepare(
                download_dir=downloads,
                download_config=tfds.download.DownloadConfig(
                    try_download_gcs=False, compute_stats=tfds.download.ComputeStatsMode.SKIP
                ),
            )
    except BaseException:
        sys.stderr.write(log.getvalue())
        raise
    finally:
        absl_logger.setLevel(level)
        shutil.rmtree(downloads, ignore_errors=True)
    return os.fspath(builder.data_dir)


def _write_report(report: dict) -> None:
    # backslashreplace: file names that are not UTF-8 still give a valid JSON file.
    with open(report["report_path"], "w", encoding="utf-8", errors="backslashreplace") as handle:
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
    overwrite: bool = False,
) -> dict:
    """Builds `{data_dir}/{name}/1.0.0/` (no config level) and returns the report.

    Raises BuildError for bad arguments (nothing written), an existing dataset without
    `overwrite`, or too many bad images (only `{data_dir}/{name}/build_report.json` written).
    """
    # Paths may come as pathlib objects; the report stores them as text.
    images_dir, captions_file, webdataset, data_dir = (
        os.fspath(p) if p else None for p in (images_dir, captions_file, webdataset, data_dir)
    )
    options = dict(locals())
    shards = validate_args(
        **{k: options[k] for k in ("name", "images_dir", "captions_file", "webdataset")},
        **{k: options[k] for k in ("val_fraction", "max_bad_fraction", "max_side", "seed")},
    )
    data_dir = options["data_dir"] = resolve_data_dir(data_dir)
    out_dir = os.path.join(data_dir, name)
    tally = Tally()
    # Parse before touching the output, so a bad header never costs an old dataset.
    entries = parse_captions(captions_file, tally) if captions_file else {}
    _prepare_out_dir(out_dir, overwrite)
    report = {"name": name, "status": "stopped", "dataset_path": None, "options": options}
    report["report_path"] = os.path.join(out_dir, REPORT_FILE)
    if captions_file:
        extra = unreferenced(images_dir, entries)
        report["unreferenced_files"] = len(extra)
        report["unreferenced_examples"] = extra[:MAX_EXAMPLES_PER_REASON]
        candidates = folder_candidates(images_dir, entries, os.path.basename(captions_file), tally)
    else:
        candidates = wds_candidates(shards, tally)
    spool = _Spool(os.path.join(out_dir, f".spool-{os.getpid()}.bin"))
    try:
        for sid, where, captions, data in candidates:
            checked = check_image(data, max_side=max_side)
            if checked.reason:
                tally.skip(checked.reason, where, checked.detail)
                continue
            tally.fixes.update(checked.fixes)
            spool.add(sid, captions, checked.data)
        kept, skipped = len(spool.records), sum(tally.skipped.values())
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
        stop = None
        if kept == 0:
            stop = f"no usable image among {total} (top reasons: {_top(tally.skipped) or 'none'})"
        elif report["bad_fraction"] > max_bad_fraction:
            stop = (
                f"{skipped} of {total} images are bad ({report['bad_fraction']:.1%} > "
                f"--max-bad-fraction {max_bad_fraction:.1%}); top reasons: {_top(tally.skipped)}"
            )
        if stop:
            report["message"] = stop
            _write_report(report)
            raise BuildError(f"{stop}; no dataset written; report: {report['report_path']}")
        records = sorted(spool.records)
        is_val = split_validation(kept, val_fraction, seed)
        splits = {
            "train": [r for r, v in zip(records, is_val, strict=True) if not v],
            "validation": [r for r, v in zip(records, is_val, strict=True) if v],
        }
        # tfds cannot store an empty split, so an empty validation split is left out.
        written = {split: recs for split, recs in splits.items() if recs}
        report["dataset_path"] = _write_tfds(data_dir, out_dir, name, written, spool)
    finally:
        spool.close()
    report["status"] = "built"
    report["splits"] = {
        split: {"images": len(recs), "captions": sum(len(r[1]) for r in recs)}
        for split, recs in splits.items()
    }
    _write_report(report)
    _print_summary(report)
    return report


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
    parser.add_argument("--overwrite", action="store_true", help="replace an existing NAME")
    args = parser.parse_args(argv)
    try:
        build_dataset(**vars(args))
    except BuildError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0
