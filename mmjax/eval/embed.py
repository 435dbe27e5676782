"""Embedding a whole split on the training mesh, with padding so no example is lost, and
streaming the eval view of a dataset split into it."""

from collections.abc import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from mmjax import model_state, parallel
from mmjax.data import pipeline, preprocess, sources


def predict_all(
    apply: Callable[[dict, jax.Array], jax.Array],
    params: dict,
    inputs,
    batch_size: int,
    sharding: NamedSharding,
):
    """Runs `apply(params, batch)` over every row of `inputs` (an array, or a dict of arrays with
    equal first dimensions, streamed by slices) in batches of `batch_size` rows, and returns the
    outputs (a pytree of numpy arrays) of every row, in order. `apply` must be jitted with a
    replicated output sharding so that every process can read the whole result.

    The last partial batch is padded (with copies of row 0) up to `batch_size` so that one compiled
    shape serves all batches; the padded rows are dropped from the result, never counted. Every
    process passes the same `inputs`; each contributes its own slice of every batch.
    """
    is_dict = isinstance(inputs, dict)
    n = len(next(iter(inputs.values()))) if is_dict else len(inputs)
    dp = parallel.data_parallel_size(sharding.mesh)
    batch_size = max(dp, batch_size // dp * dp)
    nproc, pid = jax.process_count(), jax.process_index()
    local = batch_size // nproc

    def device_batch(chunk: np.ndarray, pad: int) -> jax.Array:
        if pad:
            chunk = np.concatenate([chunk, np.repeat(chunk[:1], pad, axis=0)])
        return jax.make_array_from_process_local_data(
            sharding, chunk[pid * local : (pid + 1) * local]
        )

    out = []
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        pad = batch_size - (stop - start)
        if is_dict:
            batch = {k: device_batch(np.asarray(v[start:stop]), pad) for k, v in inputs.items()}
        else:
            batch = device_batch(np.asarray(inputs[start:stop]), pad)
        result = jax.device_get(apply(params, batch))
        out.append(jax.tree.map(lambda x, keep=stop - start: np.asarray(x)[:keep], result))
    return jax.tree.map(lambda *xs: np.concatenate(xs), *out)


def embed_all(
    encode: Callable[[dict, jax.Array], jax.Array],
    params: dict,
    inputs: np.ndarray,
    batch_size: int,
    sharding: NamedSharding,
) -> np.ndarray:
    """`predict_all` of an encoder: the L2-normalised float32 embeddings of every row."""
    emb = predict_all(encode, params, inputs, batch_size, sharding).astype(np.float32)
    return emb / np.maximum(np.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)


def jit_encoder(apply_fn: Callable, sharding: NamedSharding) -> Callable:
    """Jits `apply_fn(params, inputs)` with a replicated output, as `embed_all` needs."""
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    return jax.jit(apply_fn, out_shardings=replicated)


def class_predictor(
    model: nn.Module, inputs, batch_size: int, sharding: NamedSharding
) -> Callable[[dict], np.ndarray]:
    """`params -> int [N]`: the argmax class of `model`'s logits for every row of `inputs`, one
    array or a dict of arrays (the model's positional arguments, in the dict's order)."""
    names = tuple(inputs) if isinstance(inputs, dict) else None

    def argmax(params, batch):
        args = [batch[k] for k in names] if names else [batch]
        return jnp.argmax(model.apply(model_state.variables(params), *args), -1)

    predict = jit_encoder(argmax, sharding)
    return lambda params: predict_all(predict, params, inputs, batch_size, sharding)


class EvalImages:
    """The eval view (shorter side resized, center crop, normalised) of a split's rows, built per
    slice, so `embed_all` streams a large split instead of holding it whole. Labels and
    captions of the rows read are kept on the way (`labels`, `captions`)."""

    def __init__(self, source: sources.Source, size: int, rows: np.ndarray | None = None):
        self._source, self._size = source, size
        self.rows = np.arange(len(source)) if rows is None else np.asarray(rows)
        self.labels = np.full(len(self.rows), -1, dtype=np.int64)
        self.captions: list[list[str]] = [[] for _ in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, key: slice) -> np.ndarray:
        positions = np.arange(len(self.rows))[key]
        examples = self._source.__getitems__(self.rows[positions].tolist())
        images = []
        for position, example in zip(positions, examples, strict=True):
            self.labels[position] = example.get("label", -1)
            self.captions[position] = example["captions"]
            image = preprocess.decode(example["image"])
            images.append(preprocess.resize_center_crop(image, self._size))
        return preprocess.normalize(np.stack(images))


class Embedder:
    """Both towers on the training mesh, in eval batches (see `embed_all`)."""

    def __init__(self, config, model: nn.Module, sharding: NamedSharding):
        self.batch_size = config.eval.batch_size
        self.image_size = config.data.image_size
        self.tokenizer = pipeline.tokenizer_for(config.data)
        self._sharding = sharding
        self._image = jit_encoder(
            lambda p, x: model.apply(model_state.variables(p), x, method=model.encode_image),
            sharding,
        )
        self._text = jit_encoder(
            lambda p, x: model.apply(model_state.variables(p), x, method=model.encode_text),
            sharding,
        )

    def images(self, params, view) -> np.ndarray:
        return embed_all(self._image, params, view, self.batch_size, self._sharding)

    def texts(self, params, texts: Sequence[str]) -> np.ndarray:
        # Each distinct text is embedded once. Besides saving work (templated captions repeat),
        # it makes equal texts score exactly equal: XLA's last bits depend on the batch layout,
        # which would otherwise break such ties at random instead of by the ranking's rule.
        position = {text: i for i, text in enumerate(dict.fromkeys(texts))}
        tokens = self.tokenizer.encode(list(position))
        emb = embed_all(self._text, params, tokens, self.batch_size, self._sharding)
        return emb[[position[text] for text in texts]]
