"""Captions for `mmjax.data.build`: cleaning one caption, and reading the captions file of an
image folder (`.jsonl`, `.csv`, `.tsv`) line by line, each line and field within the text limit
(limits.py), so that neither a huge file nor one huge row is ever held whole in memory.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import posixpath
import re
import reprlib
from collections.abc import Iterator

from mmjax.data.build.limits import bounded_lines, mib
from mmjax.data.build.tally import BuildError, Tally

MAX_CAPTION_CHARS = 1000
# Text is decoded with errors="surrogateescape", so invalid UTF-8 bytes become lone surrogates
# (as do "\ud800"-style JSON escapes); neither can be stored as UTF-8.
SURROGATE = re.compile("[\ud800-\udfff]")
# Terminal escape sequences, removed whole (dropping only ESC would leave e.g. "[31m"): CSI
# ("\x1b[31m", 8-bit "\x9b31m"), OSC ended by BEL or ST (a window title), two-character ESC.
_ANSI = re.compile(
    r"\x1b\[[0-?]*[ -/]*[@-~]|\x9b[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-_]"
)
# Control characters that str.split() does not already treat as whitespace, and the Unicode
# bidi embeddings, overrides (U+202A-U+202E) and isolates (U+2066-U+2069), which reorder how
# the text around them is displayed (e.g. a caption that reads differently from its bytes).
_CONTROL = re.compile("[\x00-\x08\x0e-\x1b\x7f-\x84\x86-\x9f\u202a-\u202e\u2066-\u2069]")


def clean_caption(value: object, tally: Tally, where: str) -> str | None:
    """The caption to store, or None (counted in `tally`) when nothing usable is left."""
    if not isinstance(value, str):
        tally.issue("caption_not_text", where, reprlib.repr(value))
        return None
    if SURROGATE.search(value):
        tally.issue("caption_not_utf8", where)
        return None
    text = _CONTROL.sub("", _ANSI.sub("", value))
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


def caption_values(obj: dict) -> list | None:
    """The raw captions of a JSON object, or None when it has neither caption field."""
    if "caption" not in obj and "captions" not in obj:
        return None
    values = [obj["caption"]] if "caption" in obj else []
    if "captions" in obj:
        many = obj["captions"]
        values.extend(many if isinstance(many, list) else [many])
    return values


def parse_json(text: str) -> tuple[object, str]:
    """(the value, "") or (None, why it cannot be read)."""
    try:
        return json.loads(text), ""
    except ValueError as error:
        return None, str(error)
    except RecursionError:  # e.g. [[[[...]]]]: deeper than Python's recursion limit
        return None, "nested too deeply"


@dataclasses.dataclass
class Entry:
    line: int  # first row naming the image
    outside: bool
    captions: list[str] = dataclasses.field(default_factory=list)


def _lines(path: str, limit: int, tally: Tally) -> Iterator[str]:
    """The file's lines, decoded; a line over `limit` bytes is counted and given as "\\n", so
    that line numbers stay right and a CSV reader sees a blank line."""
    base = os.path.basename(path)
    with open(path, "rb") as handle:
        for number, raw in enumerate(bounded_lines(handle, limit), 1):
            if raw is None:
                tally.issue("row_too_large", f"{base}:{number}", f"a line over {mib(limit)}")
                yield "\n"
                continue
            text = raw.decode("utf-8", errors="surrogateescape")
            yield text.removeprefix("\ufeff") if number == 1 else text


def parse_captions(path: str, tally: Tally, text_limit: int) -> dict[str, Entry]:
    """Image id -> its captions, gathered over the whole file in file order. Rows and CSV
    fields over `text_limit` bytes are counted as row_too_large and skipped."""
    base, entries = os.path.basename(path), {}

    def add(line: int, image: object, values: list | None) -> None:
        where = f"{base}:{line}"
        if not isinstance(image, str) or not image.strip() or values is None:
            tally.issue("row_missing_field", where)
            return
        if SURROGATE.search(image) or "\x00" in image:
            tally.issue("path_invalid", where, "not UTF-8, or contains NUL")
            return
        image = image.strip()
        key = posixpath.normpath(image)
        outside = os.path.isabs(image) or key == ".." or key.startswith("../")
        entry = entries.setdefault(key, Entry(line=line, outside=outside))
        entry.captions.extend(c for v in values if (c := clean_caption(v, tally, where)))

    lines = _lines(path, text_limit, tally)
    if path.lower().endswith(".jsonl"):
        # Lines end at "\n" only: JSON allows U+2028 or U+0085 unescaped inside strings.
        for line, row in enumerate(lines, 1):
            if not row.strip():
                continue
            obj, error = parse_json(row)
            if not isinstance(obj, dict):
                tally.issue("row_unparseable", f"{base}:{line}", error or "not a JSON object")
                continue
            add(line, obj.get("image"), caption_values(obj))
        return entries
    delimiter = "\t" if path.lower().endswith(".tsv") else ","
    reader = csv.reader(lines, delimiter=delimiter)
    # The csv module refuses fields over 131,072 characters by default; a caption that long is
    # truncated like any other, up to the text limit. The limit is process-wide: restored below.
    previous = csv.field_size_limit(text_limit)
    try:
        header = [column.strip().lower() for column in _next_row(reader, base, tally) or []]
        if "image" not in header or "caption" not in header:
            raise BuildError(f"{path}: the header must name 'image' and 'caption', got {header}")
        image_at, caption_at = header.index("image"), header.index("caption")
        while (row := _next_row(reader, base, tally)) is not None:
            if not row:
                continue  # a blank line
            complete = len(row) > max(image_at, caption_at)
            image = row[image_at] if complete else None
            add(reader.line_num, image, [row[caption_at]] if complete else None)
    finally:
        csv.field_size_limit(previous)
    return entries


def _next_row(reader, base: str, tally: Tally) -> list[str] | None:
    """The next row, None at the end; a row the csv module refuses is counted and passed over
    (the reader goes on at the next line)."""
    while True:
        try:
            return next(reader)
        except StopIteration:
            return None
        except csv.Error as error:
            too_large = "field larger than field limit" in str(error)
            reason = "row_too_large" if too_large else "row_unparseable"
            tally.issue(reason, f"{base}:{reader.line_num}", str(error))
