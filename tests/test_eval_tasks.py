"""Evaluation tasks: ranking rules on hand-made embeddings, exactness under sharding, zero-shot
on a tfds-mocked cifar10, the few-shot linear probe, and the evaluate CLI end to end."""

import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image
from tensorflow_datasets.testing import mocking

from mmjax import config as base_config
from mmjax import errors, evaluate, parallel
from mmjax.data import pipeline, preprocess, sources
from mmjax.data.build import dataset as build
from mmjax.eval import embed, probe, retrieval, zeroshot
from mmjax.eval import evaluators as tasks
from mmjax.main import train as run
from mmjax.tasks import get_task
from mmjax.train.trainer import build_trainer
from tests.conftest import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CIFAR10_NAMES = "airplane automobile bird cat deer dog frog horse ship truck".split()
DIGITS_VAL = 359  # sklearn's 1797 digits, 20% for validation: a size no batch here divides


def tiny_config(data_dir: str) -> ml_collections.ConfigDict:
    """The base recipe at test size on 16 px digits (2×2 patches)."""
    c = tiny(base_config.get_config(), data_dir, name="digits", image_size=16)
    c.model.image.patch_size = 8
    # The base's 4 heads: test_built_folder_tasks' R@5 of 1 holds for the random parameters of
    # this model (a gallery of 4 images but ~8 captions does not guarantee it in general).
    c.model.image.num_heads = c.model.text.num_heads = 4
    c.eval.batch_size = 48
    return c


@pytest.fixture(scope="module")
def host_params(data_dir):
    """Random tiny-model parameters on the host, placed onto each test's mesh."""
    config = tiny_config(data_dir)
    mesh = make_mesh(1, 1, 1)
    trainer = build_trainer(
        get_task(config.task), config, mesh, pipeline.tokenizer_for(config.data).vocab_size
    )
    with jax.set_mesh(mesh):
        return jax.device_get(trainer.init(jax.random.key(0)).params)


def make_mesh(data: int, fsdp: int, devices: int):
    cfg = ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=1))
    return parallel.make_mesh(cfg, jax.devices()[:devices])


def evaluator_on(config, mesh, params_host, specs):
    """(evaluator, the parameters on `mesh`, trainer) of a model built for `mesh`."""
    trainer = build_trainer(
        get_task(config.task), config, mesh, pipeline.tokenizer_for(config.data).vocab_size
    )
    shardings = jax.tree.map(lambda x: x.sharding, trainer.abstract_state.params)
    evaluator = tasks.build_evaluator(config, trainer.model, trainer.batch_sharding, specs)
    return evaluator, jax.device_put(params_host, shardings), trainer


def evaluate_on(config, mesh, params_host, specs):
    evaluator, params, trainer = evaluator_on(config, mesh, params_host, specs)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        return evaluator(params), evaluator, params


def test_parse_task():
    got = tasks.parse_task("zeroshot:cifar10")
    assert got == tasks.TaskSpec("zeroshot:cifar10", "zeroshot", "cifar10", None)
    assert tasks.parse_task("retrieval:coco_captions:val").split == "val"
    spec = tasks.parse_task("linear_probe:ds/cfg:1.2.0:test[:50%]")
    assert (spec.dataset, spec.split) == ("ds/cfg:1.2.0", "test[:50%]")
    assert spec.prefix == "linear_probe/ds_cfg_1.2.0"
    bad = {"bogus:x": "unknown kind 'bogus'", "zeroshot:": "no dataset", "shapes:x": "shapes:sh"}
    for spec, says in bad.items():
        with pytest.raises(errors.EvalSpecError, match=says):
            tasks.parse_task(spec)
    with pytest.raises(errors.EvalSpecError, match="zeroshot/digits"):  # same metric names
        tasks.build_evaluator(None, None, None, ["zeroshot:digits", "zeroshot:digits:train"])


def test_multi_caption_retrieval_hand_made():
    e = np.eye(3)
    img = e.copy()  # image i is the unit vector e_i
    # Captions 0, 1 belong to image 0, caption 2 to image 1, captions 3, 4 to image 2.
    txt = np.array([e[1], e[0], e[1], -e[2], [0.6, 0.0, 0.8]])
    owner = np.array([0, 0, 1, 2, 2])
    # image 0: caption 1 scores 1, nothing else reaches it -> rank 0;
    # image 1: its caption 2 ties at 1 with image 0's caption 0 -> the tie counts against: 1;
    # image 2: caption 3 is its worst match (-1) but caption 4 (0.8) is first -> rank 0.
    i2t = retrieval.positive_ranks(img, txt, np.arange(3), owner)
    np.testing.assert_array_equal(i2t, [0, 1, 0])
    # caption 0 scores image 0 at 0, tied with image 2 and below image 1 -> 2; caption 3 scores
    # its image 2 at -1, below images 0 and 1 (0) -> 2.
    t2i = retrieval.positive_ranks(txt, img, owner, np.arange(3))
    np.testing.assert_array_equal(t2i, [2, 0, 0, 2, 0])
    got = retrieval.multi_caption_recall(img, txt, owner, ks=(1, 2, 3))
    assert got == pytest.approx(
        {"i2t_r1": 2 / 3, "i2t_r2": 1, "i2t_r3": 1, "t2i_r1": 3 / 5, "t2i_r2": 3 / 5, "t2i_r3": 1}
    )
    # An image without captions is no image→text query but stays in the text→image gallery.
    got = retrieval.multi_caption_recall(np.vstack([img, e[1]]), txt, owner, ks=(1,))
    assert got == pytest.approx({"i2t_r1": 2 / 3, "t2i_r1": 2 / 5})  # caption 2 now ties


def test_retrieval_treats_equal_caption_texts_as_one():
    # Images 0 and 1 are both captioned "a" (text 0), image 2 "b" (text 1). Caption embeddings
    # of equal texts are equal; image 1 is closer to "a" than image 0 is.
    img = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    a, b = np.array([1.0, 0.0]), np.array([0.0, 1.0])
    txt, owner, text_id = np.array([a, a, b]), np.array([0, 1, 2]), np.array([0, 0, 1])
    # Own-image rule: caption 1 ("a" of image 1) ranks image 0 first (1.0 > 0.9): a t2i miss at 1;
    # image 0's caption ties with image 1's identical one: an i2t miss at 1.
    strict = retrieval.multi_caption_recall(img, txt, owner, ks=(1,))
    assert strict == pytest.approx({"i2t_r1": 1 / 3, "t2i_r1": 2 / 3})
    # Text rule: "a" matches images 0 and 1, so every query hits at 1.
    by_text = retrieval.multi_caption_recall(img, txt, owner, text_id, ks=(1,))
    assert by_text == pytest.approx({"i2t_r1": 1.0, "t2i_r1": 1.0})


def test_single_caption_recall_is_unchanged():
    """ShapesEvaluator's metrics: the generalised ranking equals the one-target rule it had."""
    rng = np.random.default_rng(0)
    # Small integers: exact dot products, so the reference below has no rounding either.
    img = rng.integers(-2, 3, size=(300, 8)).astype(np.float32)
    txt = img + rng.integers(-2, 3, size=img.shape).astype(np.float32)
    txt[50:60] = txt[40]  # equal rows: ties between competitors and targets
    img[100:120] = 0.0  # collapsed: every score tied
    for query, gallery in ((img, txt), (txt, img)):
        scores = query @ gallery.T
        old_rank = np.sum(scores >= scores.diagonal()[:, None], axis=1) - 1
        expected = {k: float(np.mean(old_rank < k)) for k in (1, 5, 10)}
        assert retrieval.recall_at_k(query, gallery, np.arange(300), (1, 5, 10)) == expected


def test_zeroshot_ranks_hand_made():
    e = np.eye(6)
    # Two templates per class, symmetric about e_c: the class embedding is exactly e_c, so an
    # image's class scores are its coordinates.
    prompts = np.stack([[e[c] + 0.5 * e[c - 1], e[c] - 0.5 * e[c - 1]] for c in range(6)])
    prompts /= np.linalg.norm(prompts, axis=-1, keepdims=True)
    images = np.zeros((4, 6))
    images[0, :3] = (1.0, 0.5, 0.2)  # label 0: first -> rank 0
    images[1, :3] = (1.0, 0.5, 0.2)  # label 2: two classes above -> rank 2
    images[2, :2] = (0.3, 0.3)  # label 1: tied with class 0, against the image -> rank 1
    images[3] = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # label 5: last -> rank 5
    ranks = zeroshot.true_class_ranks(images, prompts, np.array([0, 2, 1, 5]))
    np.testing.assert_array_equal(ranks, [0, 2, 1, 5])
    assert zeroshot.topk_accuracies(ranks, 6) == {"top1": 0.25, "top5": 0.75}
    assert zeroshot.topk_accuracies(ranks, 4) == {"top1": 0.25}  # top5 only with >= 5 classes


def test_exact_under_sharding(data_dir, host_params):
    """Padding the last partial batch and splitting batches over data×fsdp change nothing."""
    config = tiny_config(data_dir)
    specs = ["zeroshot:digits", "retrieval:digits"]
    assert DIGITS_VAL % config.eval.batch_size and DIGITS_VAL % 8
    results = {}
    for data, fsdp, devices in ((1, 1, 1), (8, 1, 8), (2, 4, 8)):
        metrics, ev, _ = evaluate_on(config, make_mesh(data, fsdp, devices), host_params, specs)
        results[(data, fsdp)] = metrics
        assert ev.results["zeroshot:digits"].counts["num_examples"] == DIGITS_VAL
        counts = ev.results["retrieval:digits"].counts
        assert counts == {  # 4 English + 3 Chinese captions per image, 7 texts per digit
            "num_images": DIGITS_VAL,
            "num_captions": 7 * DIGITS_VAL,
            "num_distinct_captions": 70,
        }
    single = results[(1, 1)]
    recalls = [f"retrieval/digits/{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)]
    assert list(single) == ["zeroshot/digits/top1", "zeroshot/digits/top5", *recalls]
    assert 0.0 <= single["zeroshot/digits/top1"] <= single["zeroshot/digits/top5"] <= 1.0
    for key in ((8, 1), (2, 4)):
        assert results[key].keys() == single.keys()
        for name, value in single.items():
            assert results[key][name] == pytest.approx(value, abs=1e-6), (key, name)


def _cifar10_metadata(root: str, n: int) -> None:
    """dataset_info.json of cifar10 with train/test splits, as a prepared copy has it."""
    builder = tfds.builder("cifar10", data_dir=root, file_format="array_record")
    # Preparing cifar10 reads its label names from the download; a prepared copy has them.
    builder.info.features["label"].names = CIFAR10_NAMES
    files = tfds.core.ShardedFileTemplate(builder.data_dir, dataset_name="cifar10")
    split = lambda s, n: tfds.core.SplitInfo(s, [n], 0, files.replace(split=s))
    builder.info.set_splits(tfds.core.SplitDict([split("train", 2 * n), split("test", n)]))
    os.makedirs(builder.data_dir, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)


def assert_zeroshot(metrics, dataset, img, txt, labels):
    """`metrics` are top-1/5 of the unnormalised image and (class-major) prompt embeddings."""
    unit = lambda x: np.asarray(x) / np.linalg.norm(np.asarray(x), axis=-1, keepdims=True)
    prompt_CTE = unit(txt).reshape(10, -1, txt.shape[-1])
    ranks = zeroshot.true_class_ranks(unit(img), prompt_CTE, labels)
    for k in (1, 5):
        assert metrics[f"zeroshot/{dataset}/top{k}"] == pytest.approx(np.mean(ranks < k), abs=1e-6)


class _Examples(list):
    def __getitems__(self, rows):
        return [self[r] for r in rows]


def test_zeroshot_cifar10_mocked(tmp_path, data_dir, host_params, monkeypatch):
    n = 37
    _cifar10_metadata(str(tmp_path / "meta"), n)
    examples = _Examples()

    def as_data_source(split, decoders=None):
        # Decoded uint8 arrays from tfds' fake generator (a source may hold those too), n of
        # them whatever the split.
        generator = mocking.RandomFakeGenerator(builder.info.features, n)
        examples[:] = [generator[i] for i in range(n)]
        return examples

    # The catalog path, served from the metadata above: `sources.catalog_builder` replaced.
    builder = tfds.builder("cifar10", data_dir=str(tmp_path / "meta"), file_format="array_record")
    builder.as_data_source = as_data_source
    monkeypatch.setattr(sources, "catalog_builder", lambda name, data_dir: builder)
    config = tiny_config(data_dir)
    config.data.data_dir = str(tmp_path / "empty")  # nothing prepared: the catalog path
    mesh = make_mesh(8, 1, 8)
    for bad, says in (
        ("retrieval:cifar10", "'retrieval:cifar10': cifar10 has no captions"),
        ("linear_probe:cifar10:validation", "has no split 'validation'"),
    ):
        with pytest.raises(errors.EvalSpecError, match=says):
            evaluator_on(config, mesh, host_params, ["zeroshot:cifar10", bad])
    metrics, evaluator, _ = evaluate_on(config, mesh, host_params, ["zeroshot:cifar10"])
    result = evaluator.results["zeroshot:cifar10"]
    labels = np.array([ex["label"] for ex in examples])
    assert result.split == "test" and result.counts["num_examples"] == n
    per_class = result.details["per_class"]
    assert [c["class"] for c in per_class] == CIFAR10_NAMES
    assert [c["num_examples"] for c in per_class] == np.bincount(labels, minlength=10).tolist()

    # The same numbers from one plain, unsharded, unpadded forward pass of every image.
    tokenizer = pipeline.tokenizer_for(config.data)
    model = build_trainer(
        get_task(config.task), config, make_mesh(1, 1, 1), tokenizer.vocab_size
    ).model
    x = preprocess.normalize(
        np.stack([preprocess.resize_center_crop(ex["image"], 16) for ex in examples])
    )
    img = model.apply({"params": host_params}, x, method=model.encode_image)
    names = [c["class"] for c in per_class]
    texts = [t.format(c) for c in names for t in sources.read_prompts("cifar10")["templates"]]
    tokens = tokenizer.encode(texts)
    txt = model.apply({"params": host_params}, tokens, method=model.encode_text)
    assert_zeroshot(metrics, "cifar10", img, txt, labels)


def test_linear_probe_digits(data_dir, host_params, monkeypatch):
    seen, select_c = [], probe.select_c  # records what choosing C is shown
    monkeypatch.setattr(probe, "select_c", lambda *a: seen.append(a) or select_c(*a))
    config = tiny_config(data_dir)
    config.eval.probe_shots = 10
    mesh = make_mesh(2, 4, 8)
    metrics, evaluator, params = evaluate_on(config, mesh, host_params, ["linear_probe:digits"])
    result = evaluator.results["linear_probe:digits"]
    assert result.counts == {"num_train": 100, "num_heldout": 100, "num_examples": DIGITS_VAL}
    assert result.details["shots"] == 10 and result.details["C"] in probe.C_GRID
    assert list(metrics) == ["linear_probe/digits/top1"]
    # Chance is 0.1: a chance-level probe reaches 0.3 on 359 images with probability < 1e-23
    # (Chernoff: exp(-359 KL(0.3 || 0.1))). Measured: 0.77 (random 16 px ViT features, 10 shots).
    assert metrics["linear_probe/digits/top1"] > 0.3

    # C was chosen on train-split features only: every row select_c saw is a train embedding.
    ((shot_x, shot_y, held_x, held_y),) = seen
    task = evaluator.tasks[0]
    assert shot_x.shape[0] == held_x.shape[0] == 100  # never the 359 test rows
    draw = task._draw
    assert not set(draw.shots) & set(draw.heldout)
    with jax.set_mesh(mesh), nn.logical_axis_rules(config.rules):
        train_x = evaluator._embedder.images(params, embed.EvalImages(task.train, 16))
    for rows, labels, x in ((draw.shots, shot_y, shot_x), (draw.heldout, held_y, held_x)):
        np.testing.assert_allclose(x, train_x[rows], atol=1e-5)
        assert [task.train[int(r)]["label"] for r in rows[:5]] == labels[:5].tolist()

    # The draw is a function of the seed.
    again = probe.draw_few_shot(task.train, 10, heldout=10, seed=int(config.seed), num_classes=10)
    np.testing.assert_array_equal(again.shots, draw.shots)
    other = probe.draw_few_shot(task.train, 10, heldout=10, seed=1, num_classes=10)
    assert set(other.shots) != set(again.shots)


def test_built_folder_tasks(tmp_path, data_dir, host_params):
    """A folder built with mmjax.data.build.dataset: captions (1 to 3 per image), no labels."""
    images, rows, rng = tmp_path / "images", [], np.random.default_rng(0)
    images.mkdir()
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(images / f"{i}.png")
        rows += [{"image": f"{i}.png", "caption": f"pic {i} take {j}"} for j in range(1 + i % 3)]
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    out = str(tmp_path / "tfds")
    argv = ["--images", str(images), "--captions", str(tmp_path / "captions.jsonl")]
    assert build.main([*argv, "--name", "tiny", "--data-dir", out, "--val-fraction", "0.5"]) == 0
    config, mesh = tiny_config(out), make_mesh(8, 1, 8)
    with pytest.raises(errors.EvalSpecError, match="'zeroshot:tiny': tiny has no class labels"):
        evaluator_on(config, mesh, host_params, ["retrieval:tiny", "zeroshot:tiny"])
    metrics, evaluator, _ = evaluate_on(config, mesh, host_params, ["retrieval:tiny"])
    source = sources.open_source(config.data, "tiny", "validation")
    captions = sum(len(source[i]["captions"]) for i in range(len(source)))
    assert evaluator.results["retrieval:tiny"].split == "validation"
    counts = evaluator.results["retrieval:tiny"].counts
    assert len(source) == 4 and counts == {
        "num_images": 4,
        "num_captions": captions,
        "num_distinct_captions": captions,  # every caption text differs
    }
    assert metrics["retrieval/tiny/i2t_r5"] == 1.0  # 4 images: every caption set is in the top 4


def _fake_source(names):
    info = sources.SourceInfo("x", "validation", 1, names, has_captions=False)
    return sources.Source([{"image": b"", "label": 0}], info)


WORDNET = tuple(f"n{i:08d}" for i in range(1000))


@pytest.mark.interop
def test_imagenet_class_names_come_from_open_clip():
    pytest.importorskip("open_clip", reason="needs the interop extra")
    spec = tasks.parse_task("zeroshot:imagenet2012")
    names = tasks.class_names(spec, _fake_source(WORDNET), None)  # the prompts file says so
    assert len(names) == 1000 and names[0] == "tench"


def test_class_names(tmp_path, monkeypatch):
    spec = tasks.parse_task("zeroshot:imagenet2012")
    wordnet = _fake_source(WORDNET)
    (tmp_path / "names.json").write_text(json.dumps([f"thing {i}" for i in range(1000)]))
    override = evaluate._read_classnames([f"imagenet2012={tmp_path / 'names.json'}"])
    assert tasks.class_names(spec, wordnet, override)[1] == "thing 1"
    with pytest.raises(errors.EvalSpecError, match="1000 labels"):
        tasks.class_names(spec, wordnet, {"*": ["a", "b"]})
    monkeypatch.setitem(sys.modules, "open_clip", None)  # as if the interop extra were missing
    with pytest.raises(errors.EvalSpecError, match=r"pip install -e '.\[interop\]'.*--classnames"):
        tasks.class_names(spec, wordnet, None)
    other = tasks.parse_task("zeroshot:my_set")  # no prompts file: ClassLabel names, cleaned
    assert tasks.class_names(other, _fake_source(("sea_lion", "cat")), None) == ("sea lion", "cat")
    with pytest.raises(errors.EvalSpecError, match="WordNet ids; pass --classnames"):
        tasks.class_names(other, wordnet, None)


@pytest.mark.slow
def test_evaluate_cli(tmp_path, data_dir):
    config = tiny_config(data_dir)
    config.update(total_steps=3, log_every=1, eval_every=0, checkpoint_every=0)
    workdir = str(tmp_path / "run")
    assert tasks.default_tasks(config) == ("zeroshot:digits", "retrieval:digits")
    summary = run(config, workdir)  # so these run at the end
    assert {"zeroshot/digits/top1", "retrieval/digits/t2i_r10"} <= set(summary)

    specs = "zeroshot:digits,retrieval:digits"
    assert evaluate.main(["--workdir", workdir, "--tasks", specs, "--batch-size", "64"]) == 0
    record = json.loads((tmp_path / "run" / "eval" / "zeroshot_digits.json").read_text())
    assert record["checkpoint"] == {"kind": "train", "step": 3}
    assert (record["task"], record["split"]) == ("zeroshot:digits", "validation")
    assert (record["counts"]["num_examples"], len(record["details"]["per_class"])) == (359, 10)
    retrieval_record = json.loads((tmp_path / "run" / "eval" / "retrieval_digits.json").read_text())
    metrics = {**record["metrics"], **retrieval_record["metrics"]}
    # The same parameters as the run's final evaluation (at another batch size): same numbers.
    for name, value in metrics.items():
        assert value == pytest.approx(summary[name], abs=1e-6), name
    table = (tmp_path / "run" / "eval" / "results.md").read_text()
    assert "| zeroshot:digits | validation | zeroshot/digits/top1 |" in table
    # header + per task: its metrics, counts and numeric details (zero-shot: num_templates)
    facts = len(record["counts"]) + 1 + len(retrieval_record["counts"])
    assert sum(line.startswith("| ") for line in table.splitlines()) == 1 + len(metrics) + facts
    assert "| zeroshot:digits | validation | num_examples | 359 |" in table


def test_evaluate_cli_errors(tmp_path, data_dir, capsys):
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "no config.json" in err and err.count("\n") == 1
    (tmp_path / "config.json").write_text(tiny_config(data_dir).to_json())
    assert evaluate.main(["--workdir", str(tmp_path)]) == 2
    assert "has no checkpoint" in capsys.readouterr().err
    # A task whose model embeds no images and texts is refused before its checkpoint is read.
    for task in ("classification", "video_contrastive"):
        config = tiny_config(data_dir)
        config.task = task
        (tmp_path / "config.json").write_text(config.to_json())
        assert evaluate.main(["--workdir", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"task={task!r}: its model does not embed images and texts" in err
        assert err.count("\n") == 1
    (tmp_path / "config.json").write_text(tiny_config(data_dir).to_json())
    # Through `python -m`: a bad task is one line and exit 2 before any checkpoint is read.
    argv = ["-m", "mmjax.evaluate", "--workdir", str(tmp_path), "--tasks", "bogus:x"]
    proc = subprocess.run([sys.executable, *argv], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "error: task 'bogus:x': unknown kind 'bogus'; write KIND:DATASET[:SPLIT] with KIND one "
        "of zeroshot, retrieval, linear_probe, shapes (e.g. zeroshot:cifar10)"
    ]


@pytest.mark.interop
def test_evaluate_cli_open_clip_import(tmp_path, data_dir, monkeypatch):
    """A model imported from open_clip: the CLI's zero-shot numbers are open_clip's own."""
    torch = pytest.importorskip("torch", reason="needs the interop extra")
    open_clip = pytest.importorskip("open_clip", reason="needs the interop extra")
    from safetensors.numpy import save_file

    from mmjax.interop import open_clip as oc

    vision = dict(image_size=16, layers=1, width=32, patch_size=8, head_width=16)
    text = dict(context_length=24, vocab_size=49408, width=32, heads=2, layers=1)  # CLIP BPE
    cfg = {"embed_dim": 32, "vision_cfg": vision, "text_cfg": text}
    (tmp_path / "tiny.json").write_text(json.dumps(cfg))
    torch.manual_seed(0)
    reference = open_clip.CLIP(**cfg).eval()
    weights = str(tmp_path / "weights.safetensors")
    save_file({k: v.numpy() for k, v in reference.state_dict().items()}, weights)
    imported = str(tmp_path / "imported")
    argv = ["--model-config", str(tmp_path / "tiny.json"), "--checkpoint", weights]
    assert oc.main([*argv, "--workdir", imported]) == 0
    monkeypatch.setenv("MMJAX_DATA_DIR", data_dir)  # the recipe's data_dir is "" (= this)
    assert evaluate.main(["--workdir", imported, "--tasks", "zeroshot:digits"]) == 0
    record = json.loads((tmp_path / "imported" / "eval" / "zeroshot_digits.json").read_text())
    assert record["checkpoint"]["kind"] == "open_clip"

    config = evaluate.load_config(imported)[0]
    source = sources.open_source(config.data, "digits", "validation")
    examples = source.__getitems__(range(len(source)))
    images = np.stack([preprocess.decode(ex["image"]) for ex in examples])
    names = [c["class"] for c in record["details"]["per_class"]]
    texts = [t.format(c) for c in names for t in sources.read_prompts("digits")["templates"]]
    tokens = pipeline.tokenizer_for(config.data).encode(texts)
    with torch.no_grad():
        img = reference.encode_image(torch.from_numpy(preprocess.normalize(images)).movedim(3, 1))
        txt = reference.encode_text(torch.from_numpy(tokens).long())
    labels = np.array([ex["label"] for ex in examples])
    assert_zeroshot(record["metrics"], "digits", img.numpy(), txt.numpy(), labels)
