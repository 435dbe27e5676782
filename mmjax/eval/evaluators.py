"""Evaluation tasks by name: zero-shot classification, image↔text retrieval and few-shot linear
probes on any dataset `mmjax.data.sources` can open, plus the built-in shapes evaluation.

A task is `KIND:DATASET[:SPLIT]`, e.g. `zeroshot:cifar10`, `retrieval:coco_captions:val`,
`linear_probe:digits`, `shapes:shapes`. KIND is one of `KINDS`. Without SPLIT, the built-in
datasets use `validation`; any other dataset the first of `test`, `validation`, `val` it has
(folders built with `mmjax.data.build` have train/validation, so: validation). A split whose
first example is unlabelled (label -1, as imagenet2012's test split) is passed over for the
classification kinds.

`build_evaluator` parses and checks every task first (kinds, splits, class names, captions),
before anything is embedded or compiled, so a bad spec fails in a second with its fix. Metric
names are flat and stable: `zeroshot/<dataset>/top1`, `retrieval/<dataset>/i2t_r1`,
`linear_probe/<dataset>/top1`, ... with `/` and `:` in the dataset name replaced by `_`;
`shapes:shapes` reports `ShapesEvaluator`'s names unchanged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence

import flax.linen as nn
import ml_collections
import numpy as np
from jax.sharding import NamedSharding

from mmjax import errors
from mmjax.data import sources
from mmjax.errors import EvalSpecError
from mmjax.eval import embed, probe, retrieval, zeroshot
from mmjax.eval.shapes_eval import ShapesEvaluator

KINDS = ("zeroshot", "retrieval", "linear_probe", "shapes")
DEFAULT_SPLITS = ("test", "validation", "val")
_VERSION = re.compile(r"\d+(\.\d+)*")
_COLON_OUTSIDE_BRACKETS = re.compile(r":(?![^\[]*\])")  # keeps "test[:50%]" whole
_WORDNET_ID = re.compile(r"n\d{8}")
_CLASSNAMES_FIX = "pass --classnames FILE (a JSON list of names, one per label)"


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    spec: str  # as written
    kind: str
    dataset: str  # may carry a config and version: "ds/config:1.2.0"
    split: str | None  # None: the default split (see the module doc)

    @property
    def prefix(self) -> str:
        """Metric name prefix, e.g. `zeroshot/cifar10`."""
        return f"{self.kind}/{self.dataset.replace('/', '_').replace(':', '_')}"


def parse_task(spec: str) -> TaskSpec:
    """`KIND:DATASET[:SPLIT]` -> TaskSpec; raises EvalSpecError on a malformed spec."""
    kind, _, rest = spec.strip().partition(":")
    if kind not in KINDS:
        raise EvalSpecError(
            f"task {spec!r}: unknown kind {kind!r}; write KIND:DATASET[:SPLIT] with KIND one of "
            f"{', '.join(KINDS)} (e.g. zeroshot:cifar10)"
        )
    parts = _COLON_OUTSIDE_BRACKETS.split(rest)
    dataset = parts.pop(0)
    if parts and _VERSION.fullmatch(parts[0]):  # "ds:1.2.0" is a dataset version, not a split
        dataset += ":" + parts.pop(0)
    split = ":".join(parts) or None
    if not dataset:
        raise EvalSpecError(f"task {spec!r} names no dataset; write {kind}:DATASET[:SPLIT]")
    if kind == "shapes" and (dataset != "shapes" or split not in (None, "validation")):
        raise EvalSpecError(
            f"task {spec!r}: the shapes evaluation runs on the shapes validation split only; "
            "write shapes:shapes"
        )
    return TaskSpec(spec.strip(), kind, dataset, split)


@dataclasses.dataclass
class TaskResult:
    """One task's outcome. `metrics`: the flat scores training logs (all in [0, 1], so they share
    a plot); `counts` (examples, captions, ...) and `details` (per-class accuracy, settings)
    describe the run for reports."""

    spec: str
    kind: str
    dataset: str
    split: str
    counts: dict[str, int]
    metrics: dict[str, float]
    details: dict = dataclasses.field(default_factory=dict)


def first_label(source: sources.Source) -> int | None:
    return source[0].get("label") if len(source) else None


def open_split(data_cfg, spec: TaskSpec) -> sources.Source:
    """The task's split (explicit, or the default of the module doc)."""
    if spec.split is not None:
        return sources.open_source(data_cfg, spec.dataset, spec.split)
    if spec.dataset in sources.BUILTIN:
        return sources.open_source(data_cfg, spec.dataset, "validation")
    for split in DEFAULT_SPLITS:
        try:
            source = sources.open_source(data_cfg, spec.dataset, split)
        except errors.DataError as e:
            if "has no split" not in str(e):  # not prepared, unknown, ...: no other split helps
                raise
            continue
        label = first_label(source)
        if spec.kind in ("zeroshot", "linear_probe") and label is not None and label < 0:
            continue
        return source
    raise errors.DataError(
        f"dataset {spec.dataset!r} has no labelled {'/'.join(DEFAULT_SPLITS)} split; name one: "
        f"{spec.kind}:{spec.dataset}:SPLIT"
    )


def class_names(
    spec: TaskSpec, source: sources.Source, override: Mapping[str, Sequence[str]] | None
) -> tuple[str, ...]:
    """Readable class names: `override` (from --classnames), else the prompts file's
    `classnames`, else its `classnames_from` ("open_clip:ATTRIBUTE" of
    open_clip.zero_shot_metadata), else the dataset's ClassLabel names with `_` -> space."""
    override = override or {}
    prompts = sources.read_prompts(spec.dataset.partition(":")[0])
    names = override.get(spec.dataset, override.get("*"))
    if names is None and "classnames" in prompts:
        names = prompts["classnames"]
    elif names is None and "classnames_from" in prompts:
        module, _, attribute = prompts["classnames_from"].partition(":")
        if module != "open_clip":
            raise EvalSpecError(f"prompts of {spec.dataset!r}: unknown classnames_from {module!r}")
        try:
            from open_clip import zero_shot_metadata  # optional: the interop extra
        except ImportError as e:
            raise EvalSpecError(
                f"task {spec.spec!r}: {spec.dataset} labels are WordNet ids; readable class "
                "names come with open_clip: pip install -e '.[interop]', or " + _CLASSNAMES_FIX
            ) from e
        names = getattr(zero_shot_metadata, attribute)
    elif names is None and source.info.class_names is not None:
        names = [n.replace("_", " ") for n in source.info.class_names]
        if all(_WORDNET_ID.fullmatch(n) for n in names):
            raise EvalSpecError(
                f"task {spec.spec!r}: the class names are WordNet ids; {_CLASSNAMES_FIX}"
            )
    if names is None:
        raise EvalSpecError(
            f"task {spec.spec!r}: {spec.dataset} has no class labels (no ClassLabel 'label'); "
            f"{spec.kind} needs a classification dataset, or {_CLASSNAMES_FIX}"
        )
    expected = source.info.class_names
    if expected is not None and len(names) != len(expected):
        raise EvalSpecError(
            f"task {spec.spec!r}: {len(names)} class names for {len(expected)} labels; "
            "give one name per label, in label order"
        )
    return tuple(str(n) for n in names)


def per_class_top1(names: Sequence[str], labels: np.ndarray, hits: np.ndarray) -> list[dict]:
    out = []
    for c, name in enumerate(names):
        mask = labels == c
        top1 = float(hits[mask].mean()) if mask.any() else None  # None: no JSON NaN
        out.append({"class": name, "top1": top1, "num_examples": int(mask.sum())})
    return out


def check_labels(spec: TaskSpec, labels: np.ndarray, num_classes: int) -> None:
    bad = (labels < 0) | (labels >= num_classes)
    if bad.any():
        raise EvalSpecError(
            f"task {spec.spec!r}: {int(bad.sum())} examples have labels outside "
            f"[0, {num_classes}) (unlabelled split?); name a labelled split"
        )


class _ZeroShot:
    def __init__(self, spec: TaskSpec, source, config, classnames_override):
        self.spec, self.source = spec, source
        self.names = class_names(spec, source, classnames_override)
        templates = sources.read_prompts(spec.dataset.partition(":")[0]).get("templates")
        self.templates = tuple(templates or zeroshot.GENERIC_TEMPLATES)
        if first_label(source) is None:
            raise EvalSpecError(f"task {spec.spec!r}: the examples have no 'label'")

    def __call__(self, emb: embed.Embedder, params) -> TaskResult:
        view = embed.EvalImages(self.source, emb.image_size)
        img_NE = emb.images(params, view)
        num_classes, num_templates = len(self.names), len(self.templates)
        check_labels(self.spec, view.labels, num_classes)
        prompt_emb = emb.texts(params, zeroshot.prompts(list(self.names), list(self.templates)))
        ranks = zeroshot.true_class_ranks(
            img_NE, prompt_emb.reshape(num_classes, num_templates, -1), view.labels
        )
        metrics = zeroshot.topk_accuracies(ranks, num_classes)
        counts = {"num_examples": len(view), "num_classes": num_classes}
        per_class = per_class_top1(self.names, view.labels, ranks < 1)
        details = {"num_templates": num_templates, "per_class": per_class}
        return task_result(self.spec, self.source, counts, metrics, details)


class _Retrieval:
    def __init__(self, spec: TaskSpec, source, config, classnames_override):
        self.spec, self.source = spec, source
        if not source.info.has_captions:
            raise EvalSpecError(
                f"task {spec.spec!r}: {spec.dataset} has no captions; retrieval needs an "
                "image–text dataset (coco_captions, digits, a folder built with "
                "`python -m mmjax.data.build`); for labels use zeroshot or linear_probe"
            )

    def __call__(self, emb: embed.Embedder, params) -> TaskResult:
        view = embed.EvalImages(self.source, emb.image_size)
        img_NE = emb.images(params, view)
        texts = [c for captions in view.captions for c in captions]
        owner_M = np.repeat(np.arange(len(view)), [len(c) for c in view.captions])
        if not texts:
            raise EvalSpecError(f"task {self.spec.spec!r}: the split has no captions")
        # The same words under several images are one caption text that matches them all.
        _, text_id_M = np.unique(np.array(texts, dtype=object), return_inverse=True)
        metrics = retrieval.multi_caption_recall(
            img_NE, emb.texts(params, texts), owner_M, text_id_M.reshape(-1)
        )
        counts = {
            "num_images": len(view),
            "num_captions": len(texts),
            "num_distinct_captions": int(text_id_M.max()) + 1,
        }
        return task_result(self.spec, self.source, counts, metrics, {})


class _LinearProbe:
    """A few-shot linear probe on frozen image embeddings (see `mmjax.eval.probe`)."""

    def __init__(self, spec: TaskSpec, source, config, classnames_override):
        self.spec, self.source = spec, source
        self.shots = int(config.eval.get("probe_shots", 10))
        self.seed = int(config.seed)
        if self.shots < 1:
            raise EvalSpecError(f"eval.probe_shots={self.shots} must be >= 1")
        try:
            self.train = sources.open_source(config.data, spec.dataset, "train")
        except errors.DataError as e:
            raise EvalSpecError(f"task {spec.spec!r}: shots come from the train split: {e}") from e
        if first_label(source) is None or first_label(self.train) is None:
            raise EvalSpecError(f"task {spec.spec!r}: a linear probe needs labelled examples")
        try:
            self.names = class_names(spec, source, classnames_override)
        except EvalSpecError:  # names only label the per-class report here
            self.names = None
        self._draw: probe.FewShotDraw | None = None

    def __call__(self, emb: embed.Embedder, params) -> TaskResult:
        if self._draw is None:  # deterministic (seeded), so drawn once per evaluator
            num_classes = len(self.names) if self.names else None
            self._draw = probe.draw_few_shot(
                self.train, self.shots, heldout=self.shots, seed=self.seed, num_classes=num_classes
            )
        draw = self._draw
        test = embed.EvalImages(self.source, emb.image_size)
        test_x = emb.images(params, test)
        shot_x = emb.images(params, embed.EvalImages(self.train, emb.image_size, draw.shots))
        held_x = emb.images(params, embed.EvalImages(self.train, emb.image_size, draw.heldout))
        predictions, c = probe.linear_probe(
            shot_x, draw.shot_labels, held_x, draw.heldout_labels, test_x
        )
        num_classes = len(self.names) if self.names else np.iinfo(np.int64).max
        check_labels(self.spec, test.labels, num_classes)
        hits = predictions == test.labels
        counts = {
            "num_train": len(draw.shots),
            "num_heldout": len(draw.heldout),
            "num_examples": len(test),
        }
        names = self.names or [str(label) for label in range(int(test.labels.max()) + 1)]
        per_class = per_class_top1(names, test.labels, hits)
        details = {"shots": self.shots, "C": c, "seed": self.seed, "per_class": per_class}
        return task_result(self.spec, self.source, counts, {"top1": float(np.mean(hits))}, details)


class _Shapes:
    def __init__(self, spec: TaskSpec, config, model: nn.Module, sharding: NamedSharding):
        self.spec = spec
        if config.data.name != "shapes":  # ShapesEvaluator reads the config's dataset
            config = ml_collections.ConfigDict(config.to_dict())
            config.data.name = "shapes"
        self._evaluator = ShapesEvaluator(config, model, sharding)

    def __call__(self, emb: embed.Embedder, params) -> TaskResult:
        metrics = self._evaluator(params)
        counts = {"num_examples": self._evaluator.num_examples}
        return TaskResult(self.spec.spec, "shapes", "shapes", "validation", counts, metrics)


def task_result(spec: TaskSpec, source, counts: dict, metrics: dict, details: dict) -> TaskResult:
    flat = {f"{spec.prefix}/{k}": float(v) for k, v in metrics.items()}
    return TaskResult(spec.spec, spec.kind, spec.dataset, source.info.split, counts, flat, details)


# The kinds that read a dataset split (the shapes evaluation reads its own).
_EVALUATORS = {"zeroshot": _ZeroShot, "retrieval": _Retrieval, "linear_probe": _LinearProbe}


def default_tasks(config: ml_collections.ConfigDict) -> tuple[str, ...]:
    """The tasks of a run that names none: the shapes evaluation for shapes; otherwise
    zero-shot (if the dataset has class names) and retrieval (if captions) on `data.name`."""
    name = config.data.name
    if name == "shapes":
        return ("shapes:shapes",)
    out = []
    source = open_split(config.data, parse_task(f"zeroshot:{name}"))
    try:
        class_names(parse_task(f"zeroshot:{name}"), source, None)
        out.append(f"zeroshot:{name}")
    except EvalSpecError:
        pass
    if source.info.has_captions:
        out.append(f"retrieval:{name}")
    return tuple(out)


class Evaluator:
    """`evaluator(params)` runs every task and returns their flat metrics; `results` then holds
    each task's `TaskResult` (counts, per-class detail), keyed by spec."""

    def __init__(self, tasks: list, embedder: embed.Embedder):
        self.tasks = tasks
        self._embedder = embedder
        self.results: dict[str, TaskResult] = {}

    def __call__(self, params) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for task in self.tasks:
            result = task(self._embedder, params)
            self.results[result.spec] = result
            metrics.update(result.metrics)
        return metrics


def build_evaluator(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    sharding: NamedSharding,
    tasks: Sequence[str],
    *,
    classnames: Mapping[str, Sequence[str]] | None = None,
) -> Evaluator:
    """An `Evaluator` (params -> flat metrics) of `tasks` (specs; empty: `default_tasks`).

    Every spec is parsed and its dataset opened and checked here, before anything is embedded;
    the first problem raises a EvalSpecError (a ValueError) naming the spec and the fix.
    `classnames`: {dataset: names} overriding the class names ("*": any dataset).
    """
    specs = [parse_task(t) for t in (tuple(tasks) or default_tasks(config))]
    prefixes = [s.prefix for s in specs]
    if twice := sorted({p for p in prefixes if prefixes.count(p) > 1}):
        raise EvalSpecError(
            f"two tasks would report as {twice[0]}/...; run one per kind and dataset"
        )
    prepared: dict[int, object] = {}
    for i, spec in enumerate(specs):
        if spec.kind == "shapes":
            continue
        try:
            source = open_split(config.data, spec)
        except errors.DataError as e:
            raise EvalSpecError(f"task {spec.spec!r}: {e}") from e
        if len(source) == 0:
            raise EvalSpecError(f"task {spec.spec!r}: split {source.info.split!r} is empty")
        prepared[i] = _EVALUATORS[spec.kind](spec, source, config, classnames)
    # After every check: ShapesEvaluator loads (and may first generate) its split, the slow part.
    ordered = [prepared.get(i) or _Shapes(s, config, model, sharding) for i, s in enumerate(specs)]
    return Evaluator(ordered, embed.Embedder(config, model, sharding))
