"""Size limits of `mmjax.data.build` and reads that honour them, so that no input, however
hostile (a sparse file or tar member declaring gigabytes, a gzip'd shard of zeros, a small PNG
of huge dimensions), makes the builder hold more than a limit's worth of it in memory.

The defaults fit real image-caption data with a wide margin: web-crawled photos (LAION, CC12M)
are well under 10 MB and camera JPEGs 5-20 MB (64 MiB per image file); a caption file or member
holds a few captions of at most a few KB, and captions are cut at 1,000 characters anyway (1 MiB
per .txt/.json member, captions-file line or CSV field); a 64-megapixel colour image decodes to
256 MiB in PIL (the decoded-size limit; JPEGs are decoded at reduced scale first, see
image_check.py).
"""

from __future__ import annotations

import dataclasses
import tarfile
from collections.abc import Iterator
from typing import BinaryIO

MIB = 1 << 20
DEFAULT_MAX_IMAGE_MIB = 64.0
DEFAULT_MAX_TEXT_MIB = 1.0
DEFAULT_MAX_DECODED_MIB = 256.0
# A pax or GNU long-name header holds a path and a few attributes (well under 64 KiB); tarfile
# reads one whole, whatever size it declares.
MAX_TAR_HEADER_BYTES = MIB
_EXTENSION_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_CHUNK = MIB  # how much of an over-long line is read at a time while it is skipped


@dataclasses.dataclass(frozen=True)
class Limits:
    """Bytes: of an image file or member (`image`), of a caption member, captions-file line or
    CSV field (`text`), and of an image's decoded pixels (`decoded`)."""

    image: int = int(DEFAULT_MAX_IMAGE_MIB * MIB)
    text: int = int(DEFAULT_MAX_TEXT_MIB * MIB)
    decoded: int = int(DEFAULT_MAX_DECODED_MIB * MIB)

    @classmethod
    def from_mib(cls, *, image: float, text: float, decoded: float) -> Limits:
        return cls(image=int(image * MIB), text=int(text * MIB), decoded=int(decoded * MIB))


def mib(size: int) -> str:
    return f"{size / MIB:.4g} MiB"


def read_at_most(handle: BinaryIO, limit: int) -> bytes | None:
    """The rest of `handle`, or None (having read at most `limit` + 1 bytes) if it is longer.
    Read a chunk at a time: `read(limit + 1)` would allocate the whole limit for any file."""
    chunks, total = [], 0
    while total <= limit and (chunk := handle.read(min(_CHUNK, limit + 1 - total))):
        chunks.append(chunk)
        total += len(chunk)
    return None if total > limit else b"".join(chunks)


def bounded_lines(handle: BinaryIO, limit: int) -> Iterator[bytes | None]:
    """Each line of `handle` (with its b"\\n"), or None for a line longer than `limit` bytes,
    which is read through in chunks and dropped: memory stays under `limit` + one chunk."""
    while line := handle.readline(limit + 1):
        if len(line) <= limit or line.endswith(b"\n"):
            yield line if len(line) <= limit else None
            continue
        while (rest := handle.readline(_CHUNK)) and not rest.endswith(b"\n"):
            pass
        yield None


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing the extension headers it would read whole.

    tarfile reads a pax or GNU long-name header into memory at the size the header declares,
    and a GNU sparse 1.0 map until it finds enough newlines; a sparse or gzip'd shard can
    declare gigabytes for either. `_proc_member` and `_proc_gnusparse_10` are tarfile's hooks
    for subclasses. SubsequentHeaderError makes tarfile stop the shard with a ReadError, which
    the builder counts as shard_unreadable.
    """

    def _proc_member(self, tarfile_):
        if self.type in _EXTENSION_TYPES and self.size > MAX_TAR_HEADER_BYTES:
            raise tarfile.SubsequentHeaderError(
                f"an extension header of {self.size} bytes (at most {MAX_TAR_HEADER_BYTES})"
            )
        return super()._proc_member(tarfile_)

    def _proc_gnusparse_10(self, next_, pax_headers, tarfile_):
        raise tarfile.SubsequentHeaderError("a GNU sparse 1.0 member (not read by mmjax)")
