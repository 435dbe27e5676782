"""grain input pipelines over tfds ArrayRecord data sources.

The training stream is defined once, globally, and then cut per process:

  global stream: epoch e is a fresh permutation of the train split, truncated to whole
                 global batches (drop remainder), and epochs follow each other forever;
  global batch k: positions [k*G, (k+1)*G) of that stream;
  process p:     rows [p*b, (p+1)*b) of every global batch, with b = G / process_count.

So the processes' batches are disjoint and together are exactly the single-process batch,
whatever the number of processes, and the stream depends only on (data, seed). Everything
is index-based (grain `MapDataset`), so the iterator state is a single integer and resuming
from it reproduces the uninterrupted stream bit for bit.

The training iterators (`train_iterator`, `train_batches`) are
`stream_position.PositionedIterator`s: their `get_state()` is that integer plus the stream's
geometry, the same on every process, and `mmjax.checkpoint` stores it once per checkpoint, so a
run resumes on any number of processes (and, at the same sample position, with another batch
size).
"""

from __future__ import annotations

from typing import Any

import grain
import ml_collections
import numpy as np

from mmjax import errors
from mmjax.data import colour_permutation, preprocess, sources, stream_position, tokenizers
from mmjax.data.workers import WorkerIterator


def tokenizer_for(data_cfg: ml_collections.ConfigDict) -> tokenizers.Tokenizer:
    """The tokenizer named by `data.tokenizer` (see `tokenizers.TOKENIZERS`)."""
    return tokenizers.build_tokenizer(
        data_cfg.tokenizer, data_cfg.text_length, data_cfg.tokenizer_path or None
    )


def train_source(data_cfg: ml_collections.ConfigDict) -> sources.Source:
    """The training split of `data.name`; it must have captions."""
    source = sources.open_source(data_cfg, data_cfg.name, data_cfg.split)
    if not source.info.has_captions:
        raise errors.DataError(
            f"data.name={data_cfg.name!r} has no captions to train a contrastive model on; "
            "train on an image–text dataset (shapes, digits, coco_captions, a folder built "
            "with `python -m mmjax.data.build`) and evaluate on this one"
        )
    return source


class DecodeImage(grain.transforms.RandomMap):
    """An example -> {"image": the uint8 training view of its image} (`preprocess.train_view`
    with the `data` settings); captions and labels are not read."""

    def __init__(self, data_cfg: ml_collections.ConfigDict):
        self._size = data_cfg.image_size
        self._augment = data_cfg.augment
        self._crop_scale = tuple(data_cfg.crop_scale)
        self._flip = data_cfg.flip

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict:
        image = preprocess.train_view(
            preprocess.decode(element["image"]),
            self._size,
            augment=self._augment,
            crop_scale=self._crop_scale,
            flip=self._flip,
            rng=rng,
        )
        return {"image": image}


class DecodeAndPickCaption(grain.transforms.RandomMap):
    """Decodes and augments the image (`DecodeImage`), and tokenizes one of the example's
    captions, chosen at random: a canonical caption (`data.canonical_captions`, by default the
    first) with probability `first_caption_prob`, else one of the others uniformly.

    grain seeds the generator from (pipeline seed, stream position), and the position
    encodes the epoch, so the choices are deterministic and differ between epochs.
    """

    def __init__(self, tokenizer, data_cfg: ml_collections.ConfigDict):
        self._tokenizer = tokenizer
        self._first_prob = data_cfg.first_caption_prob
        self._image = DecodeImage(data_cfg)
        self._permute_prob = data_cfg.colourless_permute_prob
        self._canonical = tuple(int(i) for i in data_cfg.get("canonical_captions", (0,)))

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict:
        image, caption = self.pick(element, rng)
        return {"image": image, "tokens": self._tokenizer.encode([caption])[0]}

    def pick(self, element: dict[str, Any], rng: np.random.Generator) -> tuple[np.ndarray, str]:
        """(the augmented uint8 image, the chosen caption) of `element`."""
        captions = element["captions"]
        if max(self._canonical) >= len(captions):
            raise ValueError(
                f"data.canonical_captions={self._canonical}: an example has only "
                f"{len(captions)} captions; use indices below {len(captions)}"
            )
        # Always draw both numbers, so the stream of choices does not depend on the outcome.
        use_first = rng.random() < self._first_prob
        if self._canonical == (0,):  # the draws of every run before canonical_captions existed
            others = len(captions) - 1
            other = 1 + rng.integers(others) if others else 0
            first = 0
        else:  # a third draw (which canonical one), made whatever the outcome
            rest = [i for i in range(len(captions)) if i not in self._canonical]
            other = rest[rng.integers(len(rest))] if rest else self._canonical[0]
            first = self._canonical[rng.integers(len(self._canonical))]
        image = self._image.random_map(element, rng)["image"]
        caption = captions[first if use_first else other]
        if self._permute_prob > 0:  # off: no draws, the stream of earlier runs is unchanged
            image = colour_permutation.permute_if_colourless(
                image, caption, self._permute_prob, rng
            )
        return image, caption


class TokenizeText(grain.transforms.Map):
    """An example with text -> {"tokens": the ids of its "text", and the fields named by
    `fields` (output name = element key)}, e.g. `TokenizeText(tok, image="frames", label="label")`.
    """

    def __init__(self, tokenizer: tokenizers.Tokenizer, **fields: str):
        self._tokenizer = tokenizer
        self._fields = fields

    def map(self, element: dict[str, Any]) -> dict:
        out = {name: element[key] for name, key in self._fields.items()}
        out["tokens"] = self._tokenizer.encode([element["text"]])[0]
        return out


def normalize_batch(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    # Once per batch rather than per example: one vectorised op over [b, S, S, 3].
    return {**batch, "image": preprocess.normalize(batch["image"])}


def _derived_seeds(seed: int) -> tuple[int, int]:
    """Two unrelated 32-bit seeds (shuffle, caption choice) from the run seed.

    grain shuffles epoch e with seed + e, so passing run seeds straight through would make
    run seed 1 replay run seed 0's epochs shifted by one; hashing avoids that.
    """
    shuffle_seed, caption_seed = np.random.SeedSequence([seed, 0x5EED]).generate_state(2)
    return int(shuffle_seed), int(caption_seed)


def batched_stream(
    source,
    example_map: grain.transforms.RandomMap | grain.transforms.Map | None,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    batch_map=None,
) -> grain.MapDataset:
    """The infinite, random-access stream of this process's batches of `source` (see the module
    doc): every task's training data goes through here, so all share its guarantees (global
    shuffle per epoch, whole global batches, disjoint per-process rows, one-integer state).

    `example_map` turns a source element into a dict of numpy arrays (a `RandomMap` gets a
    generator seeded from the global stream position); `batch_map` (optional) transforms each
    stacked batch.
    """
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"bad process_index={process_index} for process_count={process_count}")
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a positive multiple of "
            f"process_count={process_count}; each process loads an equal slice of every batch"
        )
    local_batch_size = global_batch_size // process_count
    steps_per_epoch = len(source) // global_batch_size
    if steps_per_epoch == 0:
        # A setting the user can fix, so a DataError: the trainer reports it as one line.
        raise errors.DataError(
            f"batch_size={global_batch_size} is larger than the {len(source)} training "
            "examples; lower batch_size or use a larger dataset"
        )
    shuffle_seed, map_seed = _derived_seeds(seed)
    ds = grain.MapDataset.source(source)
    # Shuffle, then keep whole global batches of each epoch: a batch never spans two epochs,
    # which would put the same image twice in it (a false negative for contrastive losses).
    # Slicing past the end wraps to the next epoch's permutation, so repeat() only needs to
    # make the length infinite.
    ds = ds.shuffle(seed=shuffle_seed)[: steps_per_epoch * global_batch_size].repeat()
    # Before the per-process cut, so a random choice (caption, crop, mask) depends on the global
    # stream position only, and a run makes the same choices on any number of processes.
    if isinstance(example_map, grain.transforms.RandomMap):
        ds = ds.random_map(example_map, seed=map_seed)
    elif example_map is not None:
        ds = ds.map(example_map)
    # Sub-batch j covers global positions [j*b, (j+1)*b): global batch k is sub-batches
    # k*P ... k*P + P-1, and process p takes sub-batch k*P + p.
    ds = ds.batch(local_batch_size, drop_remainder=True)
    ds = ds[process_index::process_count]
    return ds if batch_map is None else ds.map(batch_map)


def train_batches(
    source,
    example_map: grain.transforms.RandomMap | grain.transforms.Map | None,
    config: ml_collections.ConfigDict,
    process_index: int,
    process_count: int,
    *,
    batch_map=None,
):
    """A task's training iterator: `iterate` over the `batched_stream` of `source` with the run's
    seed and global batch size."""
    ds = batched_stream(
        source,
        example_map,
        seed=config.seed,
        global_batch_size=config.batch_size,
        process_index=process_index,
        process_count=process_count,
        batch_map=batch_map,
    )
    return positioned(iterate(ds, workers=config.data.workers), config.batch_size, len(source))


def positioned(iterator, global_batch_size: int, num_examples: int):
    """`iterator` (over a `batched_stream` of a source of `num_examples`) with its position
    recorded as a global sample position (see `stream_position`)."""
    steps_per_epoch = num_examples // global_batch_size
    return stream_position.PositionedIterator(iterator, global_batch_size, steps_per_epoch)


def train_dataset(
    data_cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
) -> grain.MapDataset:
    """The image–caption training stream of `data.name` (contrastive training)."""
    return _caption_stream(
        train_source(data_cfg),
        data_cfg,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def _caption_stream(source, data_cfg, **stream) -> grain.MapDataset:
    return batched_stream(
        source,
        DecodeAndPickCaption(tokenizer_for(data_cfg), data_cfg),
        batch_map=normalize_batch,
        **stream,
    )


def iterate(
    ds: grain.MapDataset, num_threads: int = 1, prefetch_batches: int = 2, workers: int = 0
):
    """A checkpointable iterator over `ds`: `num_threads` background threads prepare up to
    `prefetch_batches` batches ahead (0 threads: each batch is loaded when requested); with
    `workers` > 0, that many processes do instead (`mmjax.data.workers`; same batches, same
    checkpoint state)."""
    if workers > 0:
        return WorkerIterator(ds, workers, buffer=max(1, -(-prefetch_batches // workers)))
    # grain's defaults (16 threads, 500 elements) are sized for small records on remote
    # disks; our elements are whole batches from a local file, so a couple suffice.
    options = grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=prefetch_batches)
    return iter(ds.to_iter_dataset(options))


def caption_batches(
    config: ml_collections.ConfigDict, process_index: int, process_count: int
) -> grain.DatasetIterator:
    """`train_iterator` of a run's config (its data, seed and global batch): the image–caption
    batches every task that trains on captioned images reads."""
    return train_iterator(
        config.data,
        seed=config.seed,
        global_batch_size=config.batch_size,
        process_index=process_index,
        process_count=process_count,
    )


def train_iterator(
    data_cfg: ml_collections.ConfigDict,
    *,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    num_threads: int = 1,
    prefetch_batches: int = 2,
    workers: int | None = None,
) -> grain.DatasetIterator:
    """Infinite iterator of host-local batches {"image": f32 [b,S,S,3], "tokens": i32 [b,L]}.

    `get_state()` / `set_state()` checkpoint it (a JSON-able dict); see the module doc for
    orbax. `num_threads` background threads prepare up to `prefetch_batches` batches ahead;
    0 threads loads each batch in the caller's thread when it is requested. `workers` processes
    prepare them instead when > 0 (None: `data.workers`).
    """
    workers = data_cfg.workers if workers is None else workers
    source = train_source(data_cfg)
    ds = _caption_stream(
        source,
        data_cfg,
        seed=seed,
        global_batch_size=global_batch_size,
        process_index=process_index,
        process_count=process_count,
    )
    iterator = iterate(ds, num_threads, prefetch_batches, workers)
    return positioned(iterator, global_batch_size, len(source))


def eval_arrays(data_cfg: ml_collections.ConfigDict, split: str = "validation") -> dict:
    """A whole split of the training dataset as numpy arrays, in dataset order (for the
    built-in evaluators; `mmjax.eval` streams large splits instead).

    image f32 [n,S,S,3] (eval view, normalized), tokens i32 [n,L] (each example's canonical
    first caption), and every integer/bool field of the dataset (e.g. shapes' labels).
    """
    source = sources.open_source(data_cfg, data_cfg.name, split)
    examples = source.__getitems__(range(len(source)))
    size = data_cfg.image_size
    views = [preprocess.resize_center_crop(preprocess.decode(ex["image"]), size) for ex in examples]
    first_captions = [ex["captions"][0] for ex in examples]
    out = {
        "image": preprocess.normalize(np.stack(views)),
        "tokens": tokenizer_for(data_cfg).encode(first_captions),
    }
    for key, value in examples[0].items():
        kind = np.asarray(value).dtype.kind
        if key not in out and np.ndim(value) == 0 and kind in "biu":
            dtype = bool if kind == "b" else np.int32
            out[key] = np.array([ex[key] for ex in examples], dtype=dtype)
    return out
