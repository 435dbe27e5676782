"""Dataset resolution by name (built-in, prepared directory, tfds catalog) and preprocessing."""

import os
import types

import numpy as np
import pytest
import tensorflow_datasets as tfds
from tensorflow_datasets.testing import mocking

from mmjax import config as base_config
from mmjax import errors
from mmjax.data import pipeline, preprocess, sources


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory):
    """A datasets folder of this module's own, not the session's: a test below reads the one
    shapes build it holds."""
    cfg = base_config.get_config().data
    cfg.update(data_dir=str(tmp_path_factory.mktemp("tfds")), image_size=32)
    cfg.update(num_train=64, num_val=40)
    return cfg


# --- preprocessing ---------------------------------------------------------------------------


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_resize_center_crop_shapes_and_identity():
    square = _image(32, 32)
    assert preprocess.resize_center_crop(square, 32) is square  # no resampling at target size
    for h, w in [(48, 96), (100, 30), (7, 9)]:
        assert preprocess.resize_center_crop(_image(h, w), 32).shape == (32, 32, 3)
    # A wide image keeps its centre: a vertical stripe in the middle survives the crop.
    wide = np.zeros((32, 96, 3), np.uint8)
    wide[:, 40:56] = 255
    out = preprocess.resize_center_crop(wide, 32)
    assert out[:, 8:24].mean() > 250 and out[:, :4].mean() < 5


def test_crop_box_is_deterministic_in_bounds_and_in_scale():
    draws = []
    for seed in range(200):
        rng = np.random.default_rng(seed)
        top, left, h, w = preprocess.crop_box(60, 80, (0.3, 0.6), rng)
        assert 0 <= top and top + h <= 60 and 0 <= left and left + w <= 80
        assert 0.27 <= h * w / 4800 <= 0.63  # rounding of h and w moves the area a little
        assert 3 / 4 - 0.05 <= w / h <= 4 / 3 + 0.05
        draws.append((top, left, h, w))
    again = [preprocess.crop_box(60, 80, (0.3, 0.6), np.random.default_rng(s)) for s in range(200)]
    assert draws == again
    assert len(set(draws)) > 150
    # No candidate fits a 1×50 strip: the fallback is the largest centred box of clamped ratio.
    assert preprocess.crop_box(1, 50, (0.9, 1.0), np.random.default_rng(0)) == (0, 24, 1, 1)


def test_train_view_flip_and_constant_draw_count():
    image = _image(40, 40)
    kwargs = dict(augment="random_resized_crop", crop_scale=(0.5, 1.0))
    flipped = 0
    for seed in range(40):
        rng_a, rng_b = np.random.default_rng(seed), np.random.default_rng(seed)
        a = preprocess.train_view(image, 24, flip=False, rng=rng_a, **kwargs)
        b = preprocess.train_view(image, 24, flip=True, rng=rng_b, **kwargs)
        # Same crop either way, and the generators advanced by the same amount.
        assert rng_a.random() == rng_b.random()
        if not np.array_equal(a, b):
            np.testing.assert_array_equal(a[:, ::-1], b)
            flipped += 1
    assert 10 <= flipped <= 30  # about half
    rng = np.random.default_rng(0)
    same = preprocess.train_view(
        _image(24, 24), 24, augment="none", crop_scale=(1, 1), flip=False, rng=rng
    )
    np.testing.assert_array_equal(same, _image(24, 24))
    with pytest.raises(ValueError, match="augment"):
        preprocess.train_view(image, 24, augment="mixup", crop_scale=(1, 1), flip=False, rng=rng)


def test_decode_accepts_bytes_grey_and_arrays():
    import io

    from PIL import Image

    grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, format="PNG")
    rgb = preprocess.decode(buffer.getvalue())
    assert rgb.shape == (8, 8, 3) and np.array_equal(rgb[..., 1], grey)
    np.testing.assert_array_equal(preprocess.decode(rgb), rgb)
    np.testing.assert_array_equal(preprocess.decode(grey[..., None]), rgb)


# --- sources ---------------------------------------------------------------------------------


def test_builtin_and_prepared_directory_give_the_same_examples(data_cfg):
    builtin = sources.open_source(data_cfg, "shapes", "validation")
    assert builtin.info.num_examples == 40 and builtin.info.has_captions
    # The same files opened by directory name, without the builder code (how datasets built
    # elsewhere, e.g. catalog datasets prepared on another machine, are read).
    root = os.path.join(data_cfg.data_dir, "mmjax_shapes")
    (config_name,) = [c for c in os.listdir(root) if not c.startswith(".")]
    path = sources.prepared_dir(data_cfg.data_dir, f"mmjax_shapes/{config_name}")
    assert path is not None and os.path.exists(os.path.join(path, "dataset_info.json"))
    by_dir = sources.open_source(data_cfg, f"mmjax_shapes/{config_name}", "validation")
    for i in (0, 17, 39):
        a, b = builtin[i], by_dir[i]
        assert a["captions"] == b["captions"] and all(isinstance(c, str) for c in a["captions"])
        assert bytes(a["image"]) == bytes(b["image"])
        assert a["shape"] == b["shape"]
    assert sources.prepared_dir(data_cfg.data_dir, "mmjax_shapes/x:9.9.9") is None


def test_unknown_names_and_splits_say_what_to_do(data_cfg):
    with pytest.raises(errors.DataError, match="unknown dataset 'no_such_dataset_xyz'"):
        sources.open_source(data_cfg, "no_such_dataset_xyz", "train")
    with pytest.raises(errors.DataError, match="has no split 'test'; it has"):
        sources.open_source(data_cfg, "shapes", "test")
    # A catalog dataset that is not prepared here names the extra and the tfds command.
    with pytest.raises(errors.DataError, match=r"pip install -e '\.\[tf\]' && tfds build"):
        sources.open_source(data_cfg, "cifar10", "test")


class _Examples(list):
    def __getitems__(self, rows):
        return [self[r] for r in rows]


def test_catalog_classification_set(data_cfg, monkeypatch, tmp_path):
    # The catalog's cifar10 as a prepared copy would serve it (its features; train and test
    # splits of 7 random examples from tfds' fake generator, images decoded), in place of
    # `sources.catalog_builder`: no download, no TensorFlow.
    features = tfds.builder("cifar10", data_dir=str(tmp_path)).info.features
    fake = mocking.RandomFakeGenerator(features, 7)
    examples = _Examples(fake[i] for i in range(7))
    splits = {"train": 7, "test": 7}
    info = types.SimpleNamespace(features=features, splits=splits, file_format=None)
    prepared = types.SimpleNamespace(
        info=info, data_dir=str(tmp_path), as_data_source=lambda split, decoders: examples
    )
    monkeypatch.setattr(sources, "catalog_builder", lambda name, data_dir: prepared)
    source = sources.open_source(data_cfg, "cifar10", "test")
    assert len(source) == 7 and source.info.has_captions is False
    # Real label names live in the prepared files' metadata; the catalog entry knows 10 classes.
    assert len(source.info.class_names) == 10
    example = source[3]
    assert isinstance(example["label"], int) and 0 <= example["label"] < 10
    assert example["captions"] == []
    image = preprocess.resize_center_crop(preprocess.decode(example["image"]), 16)
    assert image.shape == (16, 16, 3) and image.dtype == np.uint8
    with pytest.raises(errors.DataError, match="has no split 'validation'; it has train, test"):
        sources.open_source(data_cfg, "cifar10", "validation")
    # Training needs captions: refused before anything is loaded, with the fix.
    cfg = data_cfg.copy_and_resolve_references()
    cfg.name, cfg.split = "cifar10", "train"
    with pytest.raises(errors.DataError, match="no captions"):
        pipeline.train_source(cfg)


def test_coco_style_captions_are_standardized():
    coco = {"image": b"x", "captions": {"id": np.array([1, 2]), "text": np.array([b"a", b"b"])}}
    out = sources._standardize({**coco, "label": np.int64(3)})
    assert out["captions"] == ["a", "b"] and out["label"] == 3 and type(out["label"]) is int


def test_random_resized_crop_pipeline_is_deterministic(data_cfg):
    cfg = data_cfg.copy_and_resolve_references()
    cfg.augment, cfg.flip, cfg.crop_scale = "random_resized_crop", True, (0.5, 1.0)

    def first_batches(c):
        it = pipeline.train_iterator(
            c, seed=3, global_batch_size=16, process_index=0, process_count=1, num_threads=0
        )
        return [next(it)["image"] for _ in range(2)]

    a, b, plain = first_batches(cfg), first_batches(cfg), first_batches(data_cfg)
    for x, y, z in zip(a, b, plain, strict=True):
        np.testing.assert_array_equal(x, y)
        assert x.shape == z.shape == (16, 32, 32, 3)
        assert not np.array_equal(x, z)


@pytest.mark.slow
def test_train_on_a_built_folder_reports_skipped_items(tmp_path):
    """A user's folder end to end: build (two broken files among 40), train with random-resized
    crops, evaluate retrieval on its validation split; the summary counts what was skipped."""
    import json

    from PIL import Image

    from mmjax.data.build import dataset as build
    from mmjax.main import train as run
    from tests.test_eval_tasks import tiny_config

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for i in range(40):
        path = images / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (30 + i, 40, 3), dtype=np.uint8)).save(path)
        rows.append({"image": f"{i}.jpg", "captions": [f"picture {i}", f"图片 {i}"]})
    (images / "3.jpg").write_bytes(b"")  # zero bytes
    (images / "7.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    (tmp_path / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data_dir = str(tmp_path / "tfds")
    argv = ["--images", str(images), "--captions", str(tmp_path / "captions.jsonl")]
    assert (
        build.main([*argv, "--name", "mine", "--data-dir", data_dir, "--val-fraction", "0.2"]) == 0
    )

    config = tiny_config(data_dir)
    config.data.update(name="mine", augment="random_resized_crop", flip=True)
    config.total_steps, config.eval_every, config.batch_size = 3, 0, 16
    config.eval.tasks = ("retrieval:mine",)
    summary = run(config, str(tmp_path / "run"))
    assert summary["data/images_kept"] == 38 and summary["data/images_skipped"] == 2
    assert summary["data/skipped/empty_file"] == 1 and summary["data/skipped/undecodable"] == 1
    assert 0.0 <= summary["retrieval/mine/t2i_r1"] <= 1.0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["data/images_skipped"] == 2
