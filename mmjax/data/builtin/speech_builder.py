"""tensorflow-datasets builder for the built-in spoken datasets (`speech.py`), and
`ensure_built` / `open_split`.

Same design as `shapes_builder`: no TensorFlow (array_record files), every content parameter
(language, split sizes, seed) in the builder config *name* and the code version in VERSION, so
another setting never reuses stale files; built once per setting under a file lock
(`common.build_once`). eSpeak NG is not thread-safe: generation runs sequentially in the
building process (about 4-10 ms per utterance on one core).
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from mmjax.data import audio
from mmjax.data.builtin import common as builtin_build
from mmjax.data.builtin import speech

DATASET_NAME = "mmjax_speech"


@dataclasses.dataclass
class SpeechConfig(tfds.core.BuilderConfig):
    language: str = "en"
    num_train: int = 3000
    num_val: int = 200
    seed: int = 0


def make_config(*, language: str, num_train: int, num_val: int, seed: int) -> SpeechConfig:
    """A config whose name spells out every content parameter, e.g. `en_t3000_v200_seed0`."""
    if language not in speech.LANGUAGES:
        raise ValueError(f"language must be one of {speech.LANGUAGES}, got {language!r}")
    if num_train <= 0 or num_val <= 0 or seed < 0:
        raise ValueError(
            f"need positive split sizes and seed >= 0: {num_train=} {num_val=} {seed=}"
        )
    return SpeechConfig(
        name=f"{language}_t{num_train}_v{num_val}_seed{seed}",
        description=f"{language} utterances: {num_train} train, {num_val} validation, seed {seed}",
        language=language,
        num_train=num_train,
        num_val=num_val,
        seed=seed,
    )


class MmjaxSpeech(builtin_build.IndexedSplitsBuilder):
    """Synthesised utterances of the shapes captions and digit strings (see `speech.py`)."""

    # Bump when `speech.py` changes what is written for a given config.
    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "Initial release.",
        "1.1.0": "Background noise at 20-40 dB SNR (was 12-35).",
    }
    BUILDER_CONFIGS: ClassVar[list[SpeechConfig]] = [
        make_config(language="en", num_train=3000, num_val=200, seed=0)
    ]
    code_path = epath.Path(__file__)  # see the same line in `shapes_builder`

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            features=tfds.features.FeaturesDict(
                {
                    # int16 little-endian samples at `sample_rate` Hz, mono.
                    "audio": tfds.features.Tensor(shape=(), dtype=np.object_),
                    "sample_rate": tfds.features.Scalar(dtype=np.int32),
                    "transcript": tfds.features.Text(),
                    "language": tfds.features.Text(),
                    "voice": tfds.features.Text(),
                    "rate": tfds.features.Scalar(dtype=np.int32),
                    "kind": tfds.features.Text(),
                }
            ),
            supervised_keys=None,
            disable_shuffling=True,  # record i of a split is utterance i
        )

    def _example(self, split: str, index: int) -> dict:
        cfg: SpeechConfig = self.builder_config
        utterance, samples = speech.generate(cfg.seed, cfg.language, split, index)
        return {
            "audio": samples.astype("<i2").tobytes(),
            "sample_rate": audio.MODEL_RATE,
            "transcript": utterance.transcript,
            "language": cfg.language,
            "voice": utterance.voice,
            "rate": utterance.rate,
            "kind": utterance.kind,
        }


def ensure_built(
    data_dir: str | None, *, language: str, num_train: int, num_val: int, seed: int
) -> MmjaxSpeech:
    """The prepared builder, generating the dataset on first use (once per setting)."""
    data_dir = builtin_build.resolve_data_dir(data_dir)
    config = make_config(language=language, num_train=num_train, num_val=num_val, seed=seed)
    return builtin_build.build_once(
        lambda: builtin_build.builder_for(MmjaxSpeech, data_dir, config), data_dir=data_dir
    )


def decode(example: dict) -> dict:
    """A stored example as {"audio": float32 [N] in [-1, 1], "transcript": str, ...}."""
    text = lambda v: v.decode("utf-8") if isinstance(v, bytes) else str(v)
    samples = np.frombuffer(example["audio"], dtype="<i2")
    return {
        "audio": audio.from_int16(samples),
        "sample_rate": int(example["sample_rate"]),
        "transcript": text(example["transcript"]),
        "language": text(example["language"]),
        "kind": text(example["kind"]),
    }
