"""Writing of `mmjax.data.build`: the accepted images spooled to disk, then tfds' ArrayRecord
writer run over them, silently unless it fails."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import sys

import tensorflow_datasets as tfds
from etils import epath

VERSION = "1.0.0"


class Spool:
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

    def __init__(self, *, name: str, splits: dict[str, list], spool: Spool, **kwargs) -> None:
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


def write_tfds(work_dir: str, name: str, splits: dict, spool: Spool) -> None:
    """Writes `{work_dir}/{name}/{VERSION}`."""
    builder = _Builder(
        name=name, splits=splits, spool=spool, data_dir=work_dir, file_format="array_record"
    )
    downloads = os.path.join(work_dir, ".downloads")  # tfds makes one; keep it inside
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
