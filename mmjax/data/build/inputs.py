"""Inputs of `mmjax.data.build`: argument checks, the image folder, WebDataset shards.

Each reader yields the images to decode as `(id, where, captions, bytes)` and records every row,
caption, member or sample it drops in a `Tally`, under the reasons that dataset.py's docstring
lists, so that the report accounts for everything in the input. No read is larger than a limit
of `limits.Limits`: a file or member over one is counted and never read.
"""

from __future__ import annotations

import dataclasses
import glob
import math
import os
import posixpath
import re
import tarfile
from collections import Counter
from collections.abc import Iterator

from mmjax.data.build.captions import SURROGATE, Entry, caption_values, clean_caption, parse_json
from mmjax.data.build.limits import BoundedTarInfo, Limits, mib, read_at_most
from mmjax.data.build.tally import BuildError, Tally

NAME_RE = re.compile(r"[a-z][a-z0-9_]*")  # tfds' rule for dataset names
CAPTION_FORMATS = (".jsonl", ".csv", ".tsv")
WDS_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
FOLDER_IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff", ".avif")


Candidate = tuple[str, str, list[str], bytes]  # id, where (for the report), captions, bytes


def folder_candidates(
    images_dir: str, entries: dict[str, Entry], base: str, tally: Tally, limits: Limits
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
                    size = os.fstat(handle.fileno()).st_size
                    # (A file that grows after fstat is caught by the bounded read.)
                    data = read_at_most(handle, limits.image) if size <= limits.image else None
            except OSError as error:
                tally.skip("missing_file", where, str(error))
                continue
            if data is None:
                tally.skip("file_too_large", where, _over(size, limits.image, "image"))
                continue
            yield key, where, entry.captions, data


def _over(size: int, limit: int, kind: str) -> str:
    return f"{size} bytes, over --max-{kind}-mib ({mib(limit)})"


def unreferenced(images_dir: str, entries: dict[str, Entry]) -> list[str]:
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


def wds_candidates(shards: list[str], tally: Tally, limits: Limits) -> Iterator[Candidate]:
    for shard in shards:
        name = shard_name(shard)
        try:
            # Compressed shards are decompressed as a stream, a block at a time.
            with tarfile.open(shard, "r:*", tarinfo=BoundedTarInfo) as tar:
                yield from _tar_samples(tar, name, tally, limits)
        except (tarfile.TarError, OSError, EOFError) as error:
            tally.issue("shard_unreadable", name, f"{type(error).__name__}: {error}")


@dataclasses.dataclass
class _Sample:
    """The members of one WebDataset sample read so far."""

    has_image: bool = False
    image: bytes | None = None  # None with has_image: the member was over --max-image-mib
    image_detail: str = ""
    texts: list[tuple[str, bytes]] = dataclasses.field(default_factory=list)  # (ext, bytes)
    caption_members: int = 0  # .txt/.json members, read or refused for their size


def _members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    """The headers one by one. tarfile keeps each one it reads in `tar.members`, a list that a
    shard of millions of tiny members (a few KB gzip'd) would grow without bound; samples need
    only the current one."""
    while (member := tar.next()) is not None:
        tar.members.clear()
        yield member


def _tar_samples(
    tar: tarfile.TarFile, shard: str, tally: Tally, limits: Limits
) -> Iterator[Candidate]:
    seen: set[str] = set()
    key, sample = None, None  # the sample being read; None for a skipped duplicate
    try:
        for member in _members(tar):  # extractall is never used
            if member.isdir():
                continue  # structure, not data
            where = f"{shard}/{member.name}"
            if not member.isreg() or member.name.startswith("/") or ".." in member.name.split("/"):
                kind = "absolute or '..' name" if member.isreg() else "link or special file"
                tally.issue("unsafe_tar_member", where, kind)
                continue
            if SURROGATE.search(member.name):
                tally.issue("path_invalid", where, "not UTF-8")
                continue
            folder, base = posixpath.split(posixpath.normpath(member.name))
            stem, _, ext = base.partition(".")
            member_key = posixpath.join(folder, stem)
            if member_key != key:
                if sample is not None:
                    yield from _finish_sample(f"{shard}/{key}", sample, tally)
                key, sample = member_key, None
                if member_key in seen:
                    tally.skip("duplicate_key", f"{shard}/{member_key}")
                    continue
                seen.add(member_key)
                sample = _Sample()
            if sample is not None:
                _add_member(tar, member, ext.lower(), sample, where, tally, limits)
    except (tarfile.TarError, OSError, EOFError) as error:
        broken = error  # counted by the caller, after the sample read so far
    else:
        broken = None
    # After a break too: the sample holds only members that were read in full.
    if sample is not None:
        yield from _finish_sample(f"{shard}/{key}", sample, tally)
    if broken is not None:
        raise broken


def _add_member(tar, member, ext: str, sample: _Sample, where: str, tally, limits) -> None:
    """Reads the member into `sample` if it is one, and fits its limit (member.size is what the
    reader returns at most, also for sparse members, so it is checked before reading)."""
    if ext in WDS_IMAGE_EXTS:
        if sample.has_image:
            tally.issue("extra_image_in_sample", where)
        elif member.size > limits.image:
            sample.has_image, sample.image_detail = True, _over(member.size, limits.image, "image")
        else:
            sample.has_image, sample.image = True, tar.extractfile(member).read()
    elif ext in ("txt", "json"):
        sample.caption_members += 1
        if member.size > limits.text:
            tally.issue("caption_file_too_large", where, _over(member.size, limits.text, "text"))
        else:
            sample.texts.append((ext, tar.extractfile(member).read()))
    else:
        tally.ignored[ext or "(none)"] += 1


def _finish_sample(sid: str, sample: _Sample, tally: Tally) -> Iterator[Candidate]:
    if not sample.has_image:
        tally.skip("sample_without_image", sid)
        return
    if not sample.caption_members:
        tally.skip("sample_without_caption", sid)
        return
    values: list = []
    texts = {"txt": [], "json": []}
    for ext, raw in sample.texts:
        texts[ext].append(raw.decode("utf-8", errors="surrogateescape"))
    for text in texts["txt"]:  # each non-empty line is a caption
        values.extend([line for line in text.split("\n") if line.strip()] or [""])
    for text in texts["json"]:
        obj, error = parse_json(text)
        if error:
            tally.issue("sample_json_unparseable", sid, error)
        elif isinstance(obj, dict):
            values.extend(caption_values(obj) or [])
    captions = [c for v in values if (c := clean_caption(v, tally, sid))]
    if not captions:
        tally.skip("no_valid_caption", sid)
    elif sample.image is None:
        tally.skip("file_too_large", sid, sample.image_detail)
    else:
        yield sid, sid, captions, sample.image


def validate_args(
    *,
    name,
    images_dir,
    captions_file,
    webdataset,
    val_fraction,
    max_bad_fraction,
    max_side,
    seed,
    limits_mib: dict[str, float],
) -> list[str]:
    """Checks the arguments before any slow work; returns the WebDataset shards, if any.
    `limits_mib`: option name (e.g. "max_image_mib") -> its value."""
    for option, value in limits_mib.items():
        if not isinstance(value, int | float) or not 0 < value < math.inf:
            flag = "--" + option.replace("_", "-")
            raise BuildError(f"{flag} must be a positive number of MiB, got {value!r}")
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
