"""Heatmaps of where a trained model looks in an image for a text.

    python -m mmjax.visualize --workdir DIR --image PATH --text "..." [--out FILE] [--step N]

DIR is a training workdir (`config.json` + `checkpoints/`, read at its newest readable
checkpoint or `--step`) or an imported open_clip directory, as for `python -m mmjax.evaluate`.
The image (any file PIL reads) is seen as in evaluation: shorter side resized to
`data.image_size`, center crop.

The task says what to draw (`Task.visualizer`, see `mmjax.eval.maps`):

  - Fusion models (task=classification with a cross_attention or co_attention fusion,
    task=matching): the last fusion layer's text→image cross-attention, averaged over heads,
    then over the valid text tokens (one map) and, with the bytes tokenizer, over the tokens of
    each whitespace-separated word (one small map per word).
  - Two-tower models (task=contrastive): the cosine similarity between each patch token
    projected by `image_projection` and the text embedding.

Maps are drawn on the patch grid, upsampled bilinearly and laid over the image. Writes `--out`
(default `DIR/visualize/<image>_<text>.png`), prints the model's prediction (classification:
top-3 classes; matching: the ITM match probability; two-tower: the image–text cosine) and the
path. Bad input prints one line `error: ...` and exits with status 2 before any model is built.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import math
import os
import re
import sys
import warnings
from collections.abc import Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from PIL import Image

from mmjax import checkpoint, model_state, parallel
from mmjax.data import pipeline, preprocess, tokenizers
from mmjax.eval import maps
from mmjax.evaluate import UsageError, _open_checkpoint, load_config
from mmjax.tasks import TASKS, get_task
from mmjax.train.trainer import build_trainer

MAX_WORDS = 16  # word maps drawn at most; more would be too small to read

# Figure layout: square panels side by side under a title band; the PNG is exactly
# `figure_pixels(panels)` (no tight bounding box, which would make its size depend on the text).
PANEL_INCHES, TITLE_INCHES, DPI = 4.0, 0.8, 100


@dataclasses.dataclass(frozen=True)
class LoadedRun:
    """A workdir's model with its restored parameters on a one-device mesh."""

    config: ml_collections.ConfigDict
    model: nn.Module
    params: dict
    mesh: jax.sharding.Mesh
    rules: parallel.Rules
    tokenizer: object
    source: str  # "step N" or "open_clip"

    @contextlib.contextmanager
    def context(self):
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
            yield

    @property
    def pad_id(self) -> int:
        return int(self.config.model.text.pad_id)

    @functools.cached_property
    def visualizer(self):
        return visualizer_of(self.config)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmjax.visualize",
        description="Draw where a trained model attends (fusion) or matches (two-tower) a text "
        "in an image.",
    )
    p.add_argument("--workdir", required=True, help="training workdir or open_clip import dir")
    p.add_argument("--image", required=True, help="an image file PIL can read")
    p.add_argument("--text", required=True, help="the text (caption, question, class prompt)")
    p.add_argument("--out", help="PNG to write (default: WORKDIR/visualize/<image>_<text>.png)")
    p.add_argument("--step", type=int, help="checkpoint step (default: the newest readable)")
    return p


def supported_tasks() -> tuple[str, ...]:
    """The tasks that say what to draw (`Task.visualizer`)."""
    return tuple(name for name in TASKS if get_task(name).visualizer is not None)


def visualizer_of(config: ml_collections.ConfigDict):
    """The task's `mmjax.eval.maps` visualizer; UsageError for a task that has no maps, and the
    task's ConfigError for a setting that has none (e.g. a pooling fusion)."""
    task = get_task(config.task)
    if task.visualizer is None:
        raise UsageError(
            f"task={config.task!r} is not supported by visualize; it supports "
            f"{', '.join(supported_tasks())}"
        )
    return task.visualizer(config)


def read_image(path: str) -> np.ndarray:
    """The image file at `path` as uint8 [H, W, 3]; UsageError if PIL cannot read it."""
    try:
        with open(path, "rb") as f:
            return preprocess.decode(f.read())
    except Image.UnidentifiedImageError:  # its message names only the in-memory buffer
        raise UsageError(f"--image {path}: not an image file PIL can read") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise UsageError(f"--image {path}: cannot read it ({e})") from e


def open_run(workdir: str, step: int | None = None):
    """(config, checkpoint or None, step or None): the cheap checks of a workdir, no model."""
    config, kind = load_config(workdir)
    visualizer_of(config)
    if kind == "open_clip":
        if step is not None:
            raise UsageError("--step: an imported open_clip model has no training steps")
        return config, None, None
    ckpt, step = _open_checkpoint(workdir, step)
    return config, ckpt, step


def build_run(workdir: str, config, ckpt, step: int | None, newest: bool = True) -> LoadedRun:
    """The model of `config` with the parameters of `ckpt` at `step` (`newest`: falling back to
    older checkpoints when it is unreadable), or of an open_clip directory when `ckpt` is None."""
    config = config.copy_and_resolve_references()
    # One image needs no parallelism, and a 1-device mesh fits whatever machine views the run.
    config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=1, tensor=1))
    mesh = parallel.make_mesh(config.mesh, jax.devices()[:1])
    tokenizer = pipeline.tokenizer_for(config.data)
    trainer = build_trainer(get_task(config.task), config, mesh, tokenizer.vocab_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        if ckpt is None:
            path = os.path.join(workdir, "params")
            params = checkpoint.restore_params(path, trainer.abstract_state.params)
            source = "open_clip"
        else:
            params, step = _restore_params(ckpt, trainer.abstract_state, step, newest)
            source = f"step {step}"
    return LoadedRun(config, trainer.model, params, mesh, trainer.rules, tokenizer, source)


def _restore_params(ckpt, abstract_state, step: int, newest: bool) -> tuple[dict, int]:
    # Viewing must not move files, so unlike Checkpointer.restore nothing is quarantined: an
    # unreadable newest checkpoint (e.g. a run killed mid-copy) only falls back to older ones.
    steps = [s for s in reversed(ckpt.all_steps()) if s <= step] if newest else [step]
    try:
        for i, s in enumerate(steps):
            try:
                _, state = ckpt.restore_state(abstract_state, s)
                return model_state.with_state(state.params, state.model_state), s
            except Exception as e:
                if i == len(steps) - 1:
                    raise UsageError(f"checkpoint {s} is unreadable: {e}") from e
                print(f"warning: checkpoint {s} is unreadable; trying older", file=sys.stderr)
    finally:
        ckpt.close()
    raise UsageError("no readable checkpoint")


def load_run(workdir: str, step: int | None = None) -> LoadedRun:
    config, ckpt, resolved = open_run(workdir, step)
    return build_run(workdir, config, ckpt, resolved, newest=step is None)


def tokenize(run: LoadedRun, text: str) -> np.ndarray:
    return run.tokenizer.encode([text])[0]


def draw(run: LoadedRun, image: np.ndarray, tokens_L: np.ndarray) -> maps.Maps:
    """The task's maps of one eval-view image (uint8 [S, S, 3]) and its text's tokens."""
    with run.context():
        return run.visualizer(
            run.model, run.params, preprocess.normalize(image)[None], tokens_L[None]
        )


def attention_map(run: LoadedRun, image: np.ndarray, tokens_L: np.ndarray):
    """(attn_Lgg, probs_C) of a fusion model (see `maps.AttentionMaps`)."""
    out = draw(run, image, tokens_L)
    return out.attention_Lgg, out.probs_C


def similarity_map(run: LoadedRun, image: np.ndarray, tokens_L: np.ndarray):
    """(sim_gg, cosine) of a two-tower model (see `maps.SimilarityMaps`)."""
    out = draw(run, image, tokens_L)
    return out.similarity_gg, out.cosine


def word_token_spans(text: str, tokenizer, tokens_L: np.ndarray, pad_id: int):
    """[(word, first token, end token)] of each whitespace-separated word that fits in
    `tokens_L`, or None for tokenizers whose tokens do not map to text offsets here."""
    if not isinstance(tokenizer, tokenizers.ByteTokenizer):
        return None
    kept = int(np.sum(tokens_L != pad_id)) - 2  # bytes that survived truncation (less BOS, EOT)
    spans = []
    for m in re.finditer(r"\S+", text):
        # Byte k of the text is token k + 1 (after BOS).
        lo = len(text[: m.start()].encode()) + 1
        hi = min(len(text[: m.end()].encode()), kept) + 1
        if lo < hi:
            spans.append((m.group(), lo, hi))
    return spans


def figure_pixels(panels: int) -> tuple[int, int]:
    """(width, height) of the PNG with `panels` panels."""
    return round(panels * PANEL_INCHES * DPI), round((PANEL_INCHES + TITLE_INCHES) * DPI)


def upsample(map_gg: np.ndarray, size: int) -> np.ndarray:
    """A patch-grid map bilinearly resized to size×size pixels."""
    as_float = Image.fromarray(np.asarray(map_gg, np.float32), mode="F")
    return np.asarray(as_float.resize((size, size), Image.Resampling.BILINEAR))


def render(path, image, title, map_gg, map_title, *, words=None, diverging=False) -> None:
    """Input image | map over it (| a grid of word maps) into the PNG `path`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    panels = 3 if words else 2
    fig = Figure(figsize=(panels * PANEL_INCHES, PANEL_INCHES + TITLE_INCHES), dpi=DPI)
    FigureCanvasAgg(fig)
    top = PANEL_INCHES / (PANEL_INCHES + TITLE_INCHES)
    # Room on the right for the colour bar's labels when the map is the last panel.
    right = 1 - 0.8 / (panels * PANEL_INCHES)
    gs = fig.add_gridspec(1, panels, left=0.02, right=right, bottom=0.03, top=top - 0.04)
    fig.suptitle(title, fontsize=10)
    size = image.shape[0]

    def overlay(ax, heat_gg, vmin, vmax, cmap):
        ax.imshow(image, interpolation="nearest")
        # Already upsampled bilinearly: nearest keeps matplotlib from resampling it again.
        heat, style = upsample(heat_gg, size), dict(alpha=0.55, interpolation="nearest")
        shown = ax.imshow(heat, cmap=cmap, vmin=vmin, vmax=vmax, **style)
        ax.set_axis_off()
        return shown

    ax = fig.add_subplot(gs[0, 0])
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title("image", fontsize=9)
    ax = fig.add_subplot(gs[0, 1])
    if diverging:  # cosines: 0 in the middle of the colour scale, so the sign reads directly
        bound = float(np.max(np.abs(map_gg))) or 1.0
        shown = overlay(ax, map_gg, -bound, bound, "coolwarm")
    else:
        shown = overlay(ax, map_gg, 0.0, float(map_gg.max()), "inferno")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.02)
    ax.set_title(map_title, fontsize=9)
    if words:
        # A square grid of square cells, filled from the top: maps keep one size for any count.
        cols = math.ceil(math.sqrt(len(words)))
        sub = gs[0, 2].subgridspec(cols, cols, hspace=0.3, wspace=0.05)
        # One scale for all words: every row of attention sums to 1, so a word whose map is
        # pale spreads its attention while a bright one points at a few patches.
        vmax = max(float(m.max()) for _, m in words)
        for i, (word, heat_gg) in enumerate(words):
            ax = fig.add_subplot(sub[i // cols, i % cols])
            overlay(ax, heat_gg, 0.0, vmax, "inferno")
            ax.set_title(word, fontsize=8)
    with warnings.catch_warnings():  # glyphs the default font lacks (e.g. CJK) draw as boxes
        warnings.simplefilter("ignore", UserWarning)
        fig.savefig(path, format="png", dpi=DPI)


def default_out(workdir: str, image_path: str, text: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9]+", "-", os.path.splitext(os.path.basename(image_path))[0])
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    slug = f"{stem.strip('-') or 'image'}_{words[:48].strip('-')}"
    if words[:48] != re.sub(r"\s+", "-", text.strip().lower()):  # lossy: keep texts apart
        slug += "-" + hashlib.sha1(text.encode()).hexdigest()[:8]
    return os.path.join(workdir, "visualize", f"{slug}.png")


def visualize(run: LoadedRun, image: np.ndarray, text: str, out: str) -> list[str]:
    """Draws the map(s) of `text` on `image` into `out`; returns the prediction lines."""
    tokens_L = tokenize(run, text)
    valid_L = tokens_L != run.pad_id
    drawn = draw(run, image, tokens_L)
    lines = [drawn.prediction]
    if drawn.similarity_gg is not None:
        main, main_title, words, diverging = drawn.similarity_gg, "cosine(patch, text)", None, True
    else:
        attn_Lgg = drawn.attention_Lgg
        main = attn_Lgg[valid_L].mean(axis=0)
        main_title = f"text→image attention (mean of {int(valid_L.sum())} tokens, heads)"
        spans = word_token_spans(text, run.tokenizer, tokens_L, run.pad_id)
        words = [(w, attn_Lgg[lo:hi].mean(axis=0)) for w, lo, hi in (spans or [])[:MAX_WORDS]]
        diverging = False
    title = f'"{text}"  ({run.source})\n' + "; ".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    render(out, image, title, main, main_title, words=words, diverging=diverging)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    workdir = os.path.abspath(args.workdir)
    try:
        if not args.text.strip():
            raise UsageError("--text is empty; give the words to look for")
        if not os.path.isdir(workdir):
            raise UsageError(f"--workdir {workdir} does not exist")
        image = read_image(args.image)
        config, ckpt, step = open_run(workdir, args.step)
        # The evaluation view: what the model saw of its validation images.
        image = preprocess.resize_center_crop(image, config.data.image_size)
        out = args.out or default_out(workdir, args.image, args.text)
        run = build_run(workdir, config, ckpt, step, newest=args.step is None)
    except (ValueError, OSError, ImportError) as e:  # UsageError is a ValueError
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    tokens_L = tokenize(run, args.text)
    if isinstance(run.tokenizer, tokenizers.ByteTokenizer):
        if int(np.sum(tokens_L != run.pad_id)) - 2 < len(args.text.encode()):
            print(f"note: text cut to data.text_length={len(tokens_L)} tokens", file=sys.stderr)
    try:
        lines = visualize(run, image, args.text, out)
    except OSError as e:  # an --out that cannot be written
        print(f"error: cannot write {out}: {e}", file=sys.stderr)
        return 2
    print("\n".join([*lines, f"wrote {out}"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
