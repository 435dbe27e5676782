"""Inputs of `mmjax.data.build`: argument checks, the captions file + image folder, WebDataset.

Each reader yields the images to decode as `(id, where, captions, bytes)` and records every row,
caption, member or sample it drops in a `Tally`, under the reasons that build.py's docstring
lists, so that the report accounts for everything in the input.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import io
import json
import os
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterator

NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # tfds' rule for dataset names
CAPTION_FORMATS = (".jsonl", ".csv", ".tsv")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")
MAX_CAPTION_CHARS = 1000
MAX_EXAMPLES, MAX_EXAMPLES_PER_REASON = 20, 5
# Text is decoded with errors="surrogateescape", so invalid UTF-8 bytes become lone surrogates
# (as do "\ud800"-style JSON escapes); neither can be stored as UTF-8.
_SURROGATE = re.compile("[\ud800-\udfff]")
# Control characters that str.split() does not already treat as whitespace.
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f]")


class BuildError(ValueError):
    """A problem with the user's arguments or data; the CLI prints it and exits with 2."""


class Tally:
    """Counts per reason, and the first examples (a few per reason, so none crowds out)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()  # images, each counted under one reason
        self.issues: Counter[str] = Counter()  # captions, rows and tar members
        self.fixes: Counter[str] = Counter()  # normalisations of kept images
        self.ignored: Counter[str] = Counter()  # tar members with other extensions
        self.examples: list[dict[str, str]] = []

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self._example(reason, where, detail, self.skipped[reason])

    def issue(self, reason: str, where: str, detail: str = "") -> None:
        self.issues[reason] += 1
        self._example(reason, where, detail, self.issues[reason])

    def _example(self, reason: str, where: str, detail: str, count: int) -> None:
        if len(self.examples) < MAX_EXAMPLES and count <= MAX_EXAMPLES_PER_REASON:
            self.examples.append({"reason": reason, "where": where, "detail": detail[:300]})


def _clean_caption(value: object, tally: Tally, where: str) -> str | None:
    if not isinstance(value, str):
        tally.issue("caption_not_text", where, repr(value)[:100])
        return None
    if _SURROGATE.search(value):
        tally.issue("caption_not_utf8", where)
        return None
    text = _CONTROL.sub("", value)
    if text != value:
        tally.issue("caption_control_chars", where)
    text = " ".join(text.split())
    if not text:
        tally.issue("caption_empty", where)
        return None
    if len(text) > MAX_CAPTION_CHARS:
        tally.issue("caption_truncated", where, f"{len(text)} characters")
        text = text[:MAX_CAPTION_CHARS].rstrip()
    return text


def _caption_values(obj: dict) -> list | None:
    """The raw captions of a JSON object, or None when it has neither caption field."""
    if "caption" not in obj and "captions" not in obj:
        return None
    values = [obj["caption"]] if "caption" in obj else []
    if "captions" in obj:
        many = obj["captions"]
        values.extend(many if isinstance(many, list) else [many])
    return values


@dataclasses.dataclass
class _Entry:
    line: int  # first row naming the image
    outside: bool
    captions: list[str] = dataclasses.field(default_factory=list)


def _read_text(path: str) -> str:
    with open(path, "rb") as handle:
        return handle.read().decode("utf-8", errors="surrogateescape").removeprefix("\ufeff")


def parse_captions(path: str, tally: Tally) -> dict[str, _Entry]:
    """Image id -> its captions, gathered over the whole file in file order."""
    text, base, entries = _read_text(path), os.path.basename(path), {}

    def add(line: int, image: object, values: list | None) -> None:
        where = f"{base}:{line}"
        if not isinstance(image, str) or not image.strip() or values is None:
            tally.issue("row_missing_field", where)
            return
        if _SURROGATE.search(image) or "\x00" in image:
            tally.issue("path_invalid", where, "not UTF-8, or contains NUL")
            return
        image = image.strip()
        key = posixpath.normpath(image)
        outside = os.path.isabs(image) or key == ".." or key.startswith("../")
        entry = entries.setdefault(key, _Entry(line=line, outside=outside))
        entry.captions.extend(c for v in values if (c := _clean_caption(v, tally, where)))

    if path.lower().endswith(".jsonl"):
        # Split on "\n" only: str.splitlines() would also split at U+2028 or U+0085, which
        # JSON allows unescaped inside strings.
        for line, row in enumerate(text.split("\n"), 1):
            if not row.strip():
                continue
            try:
                obj = json.loads(row)
            except ValueError as error:
                tally.issue("row_unparseable", f"{base}:{line}", str(error))
                continue
            if not isinstance(obj, dict):
                tally.issue("row_unparseable", f"{base}:{line}", "not a JSON object")
                continue
            add(line, obj.get("image"), _caption_values(obj))
        return entries
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [column.strip().lower() for column in next(reader, [])]
        if "image" not in header or "caption" not in header:
            raise BuildError(f"{path}: the header must name 'image' and 'caption', got {header}")
        image_at, caption_at = header.index("image"), header.index("caption")
        for row in reader:
            if not row:
                continue  # a blank line
            complete = len(row) > max(image_at, caption_at)
            image = row[image_at] if complete else None
            add(reader.line_num, image, [row[caption_at]] if complete else None)
    except csv.Error as error:
        raise BuildError(f"{path}: line {reader.line_num}: {error}") from error
    return entries


Candidate = tuple[str, str, list[str], bytes]  # id, where (for the report), captions, bytes


def folder_candidates(
    images_dir: str, entries: dict[str, _Entry], base: str, tally: Tally
) -> Iterator[Candidate]:
    root = os.path.realpath(images_dir)
    for key in sorted(entries):
        entry, where = entries[key], f"{key} ({base}:{entries[key].line})"
        real = os.path.realpath(os.path.join(root, key))
        if entry.outside or os.path.commonpath([root, real]) != root:
            tally.skip("path_outside_images", where)
        elif not entry.captions:
            tally.skip("no_valid_caption", where)
        elif not os.path.isfile(real):
            tally.skip("missing_file", where)
        else:
            try:
                with open(real, "rb") as handle:
                    data = handle.read()
            except OSError as error:
                tally.skip("missing_file", where, str(error))
                continue
            yield key, where, entry.captions, data


def unreferenced(images_dir: str, entries: dict[str, _Entry]) -> list[str]:
    """Image files under --images that no row names (reported, not counted as bad)."""
    found = []
    for folder, dirs, files in os.walk(images_dir):
        dirs.sort()
        for file in sorted(files):
            if file.lower().endswith(FOLDER_IMAGE_EXTS):
                rel = os.path.relpath(os.path.join(folder, file), images_dir)
                if rel.replace(os.sep, "/") not in entries:
                    found.append(rel)
    return found


def shard_name(path: str) -> str:
    return re.sub(r"\.(tar(\.\w+)?|tgz)$", "", os.path.basename(path))


def wds_candidates(shards: list[str], tally: Tally) -> Iterator[Candidate]:
    for shard in shards:
        name = shard_name(shard)
        try:
            with tarfile.open(shard, "r:*") as tar:
                yield from _tar_samples(tar, name, tally)
        except (tarfile.TarError, OSError, EOFError) as error:
            tally.issue("shard_unreadable", name, f"{type(error).__name__}: {error}")


def _tar_samples(tar: tarfile.TarFile, shard: str, tally: Tally) -> Iterator[Candidate]:
    seen: set[str] = set()
    key, parts = None, None  # the sample being read; parts is None for a skipped duplicate
    for member in tar:  # streams the headers; extractall is never used
        if member.isdir():
            continue  # structure, not data
        where = f"{shard}/{member.name}"
        if not member.isreg() or member.name.startswith("/") or ".." in member.name.split("/"):
            kind = "absolute or '..' name" if member.isreg() else "link or special file"
            tally.issue("unsafe_tar_member", where, kind)
            continue
        if _SURROGATE.search(member.name):
            tally.issue("path_invalid", where, "not UTF-8")
            continue
        folder, base = posixpath.split(posixpath.normpath(member.name))
        stem, _, ext = base.partition(".")
        member_key = posixpath.join(folder, stem)
        if member_key != key:
            if parts is not None:
                yield from _finish_sample(f"{shard}/{key}", parts, tally)
            key, parts = member_key, None
            if member_key in seen:
                tally.skip("duplicate_key", f"{shard}/{member_key}")
                continue
            seen.add(member_key)
            parts = {"image": [], "txt": [], "json": []}
        if parts is None:
            continue
        ext = ext.lower()
        group = "image" if ext in WDS_IMAGE_EXTS else ext
        if group not in parts:
            tally.ignored[ext or "(none)"] += 1
        elif group == "image" and parts["image"]:
            tally.issue("extra_image_in_sample", where)
        else:
            parts[group].append(tar.extractfile(member).read())
    if parts is not None:
        yield from _finish_sample(f"{shard}/{key}", parts, tally)


def _finish_sample(sid: str, parts: dict[str, list[bytes]], tally: Tally) -> Iterator[Candidate]:
    if not parts["image"]:
        tally.skip("sample_without_image", sid)
        return
    if not parts["txt"] and not parts["json"]:
        tally.skip("sample_without_caption", sid)
        return
    values: list = []
    for raw in parts["txt"]:
        lines = raw.decode("utf-8", errors="surrogateescape").split("\n")
        values.extend([line for line in lines if line.strip()] or [""])
    for raw in parts["json"]:
        try:
            obj = json.loads(raw.decode("utf-8", errors="surrogateescape"))
        except ValueError as error:
            tally.issue("sample_json_unparseable", sid, str(error))
            continue
        values.extend((_caption_values(obj) or []) if isinstance(obj, dict) else [])
    captions = [c for v in values if (c := _clean_caption(v, tally, sid))]
    if not captions:
        tally.skip("no_valid_caption", sid)
        return
    yield sid, sid, captions, parts["image"][0]


def validate_args(
    *, name, images_dir, captions_file, webdataset, val_fraction, max_bad_fraction, max_side, seed
) -> list[str]:
    """Checks the arguments before any slow work; returns the WebDataset shards, if any."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise BuildError(
            f"invalid name {name!r}: use lowercase letters, digits and '_', starting with a letter"
        )
    if not 0 <= val_fraction < 1:
        raise BuildError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    if not 0 <= max_bad_fraction <= 1:
        raise BuildError(f"--max-bad-fraction must be in [0, 1], got {max_bad_fraction}")
    if not isinstance(max_side, int) or max_side < 8:
        raise BuildError(f"--max-side must be an integer >= 8, got {max_side}")
    if not isinstance(seed, int) or seed < 0:
        raise BuildError(f"--seed must be an integer >= 0, got {seed}")
    if webdataset and (images_dir or captions_file):
        raise BuildError("give either --images/--captions or --webdataset, not both")
    if webdataset:
        shards = sorted(
            p
            for p in glob.glob(os.path.expanduser(webdataset), recursive=True)
            if os.path.isfile(p)
        )
        if not shards:
            raise BuildError(f"--webdataset {webdataset!r} matches no file")
        names = Counter(shard_name(p) for p in shards)
        if max(names.values()) > 1:
            raise BuildError(
                f"shard file names must be unique (ids use them): {names.most_common(1)}"
            )
        return shards
    if not images_dir or not captions_file:
        raise BuildError("give --images DIR and --captions FILE, or --webdataset PATTERN")
    if not os.path.isdir(images_dir):
        raise BuildError(f"--images {images_dir!r} is not a directory")
    if not os.path.isfile(captions_file):
        raise BuildError(f"--captions {captions_file!r} is not a file")
    if not captions_file.lower().endswith(CAPTION_FORMATS):
        raise BuildError(f"--captions must end in one of {', '.join(CAPTION_FORMATS)}")
    return []
