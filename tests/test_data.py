"""Tests for the shapes dataset, its tfds builder, the byte tokenizer and the grain pipeline."""

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import grain
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mmjax import config as base_config
from mmjax.data import pipeline
from mmjax.data.builtin import shapes, shapes_builder
from mmjax.data.tokenizers import ByteTokenizer

NUM_TRAIN, NUM_VAL, IMAGE_SIZE = 200, 96, 32  # 96 = two rounds of the 48 compositions


@pytest.fixture(scope="module")
def data_cfg(data_dir):
    cfg = base_config.get_config().data
    cfg.update(
        data_dir=data_dir,
        image_size=IMAGE_SIZE,
        num_train=NUM_TRAIN,
        num_val=NUM_VAL,
        dataset_seed=0,
        text_length=48,
        first_caption_prob=0.5,
        tokenizer="bytes",
        tokenizer_path="",
    )
    return cfg


def _builder(cfg):
    return shapes_builder.ensure_built(
        cfg.data_dir,
        image_size=cfg.image_size,
        num_train=cfg.num_train,
        num_val=cfg.num_val,
        seed=cfg.dataset_seed,
    )


def _read_split(cfg, split):
    source = _builder(cfg).as_data_source(split)
    return [source[i] for i in range(len(source))]


def _digest(image: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


# --- shapes.py -------------------------------------------------------------------------------


def test_examples_are_deterministic_and_order_independent():
    a = [shapes.generate_example("train", i, image_size=48, seed=3) for i in range(6)]
    b = shapes.generate_example("train", 4, image_size=48, seed=3)  # alone, out of order
    assert a[4][0].tobytes() == b[0].tobytes() and a[4][1:] == b[1:]
    assert a[4][0].shape == (48, 48, 3) and a[4][0].dtype == np.uint8
    other = shapes.generate_example("train", 4, image_size=48, seed=4)
    assert other[0].tobytes() != b[0].tobytes()
    # No two examples render the same pixels.
    assert len({_digest(x[0]) for x in a}) == len(a)


def test_heldout_pairs_cover_every_color_and_shape():
    assert len(shapes.HELDOUT_PAIRS) >= len(shapes.COLORS)
    assert {s for s, _ in shapes.HELDOUT_PAIRS} == set(range(len(shapes.SHAPES)))
    assert {c for _, c in shapes.HELDOUT_PAIRS} == set(range(len(shapes.COLORS)))


def test_captions_mix_languages_and_attribute_subsets():
    rng = np.random.default_rng(0)
    attrs = shapes.Attributes(shape=2, color=0, size=2, position=0)
    caps = shapes.captions(attrs, rng)
    assert len(caps) == shapes.NUM_EN_CAPTIONS + shapes.NUM_ZH_CAPTIONS
    assert (
        caps[0] == shapes.canonical_caption(attrs) == "a large red triangle in the top left corner"
    )
    english, chinese = caps[: shapes.NUM_EN_CAPTIONS], caps[shapes.NUM_EN_CAPTIONS :]
    assert all(any("\u4e00" <= ch <= "\u9fff" for ch in c) for c in chinese)
    assert all(c.isascii() for c in english)
    # Shape-only caption: names the shape and no other attribute.
    others = ("red", "large", "top", "left", "corner")
    assert any("triangle" in c and not any(w in c for w in others) for c in english)
    assert any("三角形" in c and "红" not in c and "大" not in c for c in chinese)
    # A caption without the shape (so colour/position alone are also learnt).
    assert any("triangle" not in c for c in english)


def test_training_captions_avoid_zeroshot_prompts():
    prompts = {
        t.format(name).rstrip(".")
        for names, templates in shapes.ZEROSHOT.values()
        for name in names
        for t in templates
    }
    for index in range(300):
        _, caps, _ = shapes.generate_example("train", index, image_size=16, seed=0)
        for caption in caps:
            assert not any(p in caption for p in prompts), caption


def test_generator_fingerprint_matches_builder_version():
    """Fails when generated attributes or captions change. Then bump MmjaxShapes.VERSION, so
    cached datasets are regenerated instead of silently reused, and update the digest.
    (Rendering changes need the same bump; pixels are left out to stay Pillow-independent.)"""
    meta = []
    for split in shapes.SPLITS:
        for i in range(50):
            _, caps, attrs = shapes.generate_example(split, i, image_size=16, seed=0)
            meta.append([split, i, list(attrs), caps])
    digest = hashlib.sha256(json.dumps(meta, ensure_ascii=False).encode()).hexdigest()[:16]
    version = str(shapes_builder.MmjaxShapes.VERSION)
    assert (version, digest) == ("1.0.0", "01f685009575ad86")


# --- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_layout_and_padding():
    tok = ByteTokenizer(16)
    assert tok.vocab_size % 8 == 0 and tok.vocab_size >= 259
    ids = tok.encode(["ab", ""])
    assert ids.dtype == np.int32 and ids.shape == (2, 16)
    assert ids[0, :4].tolist() == [tok.bos_id, ord("a") + 3, ord("b") + 3, tok.eot_id]
    assert (ids[0, 4:] == tok.pad_id).all()
    assert ids[1, :2].tolist() == [tok.bos_id, tok.eot_id] and (ids[1, 2:] == 0).all()
    assert tok.decode(ids[0]) == "ab"
    exact = "x" * 14  # exactly fills max_len with BOS and EOT: not truncated
    assert tok.decode(tok.encode([exact])[0]) == exact


@pytest.mark.parametrize("max_len", [3, 4, 5, 6, 7, 8, 17, 48])
def test_tokenizer_truncates_at_character_boundaries(max_len):
    tok = ByteTokenizer(max_len)
    texts = ["一个大的红色三角形在左上方" * 4, "a large red 三角形 " * 5, "é" * 40, "short"]
    ids = tok.encode(texts)
    for row, text in zip(ids, texts, strict=True):
        last = int(np.nonzero(row != tok.pad_id)[0].max())
        assert row[last] == tok.eot_id  # EOT is the last non-pad token, always
        assert (row[:last] != tok.eot_id).all()
        decoded = tok.decode(row)
        assert "\ufffd" not in decoded and text.startswith(decoded)


# --- builder ---------------------------------------------------------------------------------


def test_build_is_reused_and_keyed_by_content(data_cfg, capsys):
    first = _builder(data_cfg)  # builds unless an earlier test did
    capsys.readouterr()
    second = _builder(data_cfg)
    assert capsys.readouterr().out == ""  # reused silently
    assert first.data_dir == second.data_dir
    assert f"s{IMAGE_SIZE}_t{NUM_TRAIN}_v{NUM_VAL}_seed0" in first.data_dir
    other = shapes_builder.make_config(image_size=IMAGE_SIZE, num_train=7, num_val=0, seed=1)
    assert other.name != first.builder_config.name
    assert "tensorflow" not in sys.modules  # everything so far ran without TensorFlow


def test_stored_images_equal_generated_ones(data_cfg):
    source = _builder(data_cfg).as_data_source("train")
    for index in (0, 17):
        image, caps, attrs = shapes.generate_example(
            "train", index, image_size=IMAGE_SIZE, seed=data_cfg.dataset_seed
        )
        ex = source[index]
        assert ex["image"].tobytes() == image.tobytes()  # PNG is lossless, order is kept
        assert [c.decode() for c in ex["captions"]] == caps
        assert (ex["shape"], ex["color"], ex["size"], ex["position"]) == tuple(attrs)


def test_heldout_pairs_only_in_validation(data_cfg):
    train = _read_split(data_cfg, "train")
    val = _read_split(data_cfg, "validation")
    assert len(train) == NUM_TRAIN and len(val) == NUM_VAL
    assert not any(ex["heldout"] for ex in train)
    assert not {(ex["shape"], ex["color"]) for ex in train} & shapes.HELDOUT_PAIRS
    val_pairs = {(ex["shape"], ex["color"]) for ex in val}
    assert len(val_pairs) == len(shapes.SHAPES) * len(shapes.COLORS)
    for ex in val:
        assert ex["heldout"] == ((ex["shape"], ex["color"]) in shapes.HELDOUT_PAIRS)


def test_concurrent_builds_build_once(tmp_path):
    script = textwrap.dedent(
        f"""
        from mmjax.data.builtin import shapes_builder
        b = shapes_builder.ensure_built({str(tmp_path)!r}, image_size=16, num_train=400,
                                        num_val=8)
        assert len(b.as_data_source("train")) == 400
        """
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].decode() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert sum(out.count("mmjax: built") for out in outputs) == 1


# --- pipeline --------------------------------------------------------------------------------


def _iterator(cfg, seed=0, global_batch=32, process_index=0, process_count=1, threads=0):
    return pipeline.train_iterator(
        cfg,
        seed=seed,
        global_batch_size=global_batch,
        process_index=process_index,
        process_count=process_count,
        num_threads=threads,
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_same(batches_a, batches_b):
    for a, b in zip(batches_a, batches_b, strict=True):
        assert a.keys() == b.keys()
        for key in a:
            assert a[key].dtype == b[key].dtype
            np.testing.assert_array_equal(a[key], b[key])


def test_batches_have_documented_layout(data_cfg):
    (batch,) = _take(_iterator(data_cfg), 1)
    assert batch["image"].dtype == np.float32
    assert batch["image"].shape == (32, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert batch["tokens"].dtype == np.int32 and batch["tokens"].shape == (32, 48)
    assert -2.5 < batch["image"].min() and batch["image"].max() < 2.5  # normalized
    tok = pipeline.tokenizer_for(data_cfg)
    assert (batch["tokens"][:, 0] == tok.bos_id).all()


def test_stream_is_deterministic_per_seed(data_cfg):
    _assert_same(_take(_iterator(data_cfg, seed=1), 3), _take(_iterator(data_cfg, seed=1), 3))
    a, b = _take(_iterator(data_cfg, seed=1), 1)[0], _take(_iterator(data_cfg, seed=2), 1)[0]
    assert not np.array_equal(a["image"], b["image"])


def test_canonical_captions_share_the_full_description_draws(data_cfg):
    """(0, 6): the English and the Chinese full descriptions share `first_caption_prob`'s
    draws; the default (0,) keeps every earlier run's stream."""
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.first_caption_prob = 1.0
    tok = pipeline.tokenizer_for(cfg)

    def drawn(canonical):
        cfg.canonical_captions = canonical
        it = pipeline.train_iterator(
            cfg, seed=0, global_batch_size=64, process_index=0, process_count=1, num_threads=0
        )
        return [tok.decode(ids) for b in _take(it, 2) for ids in b["tokens"]]

    english = drawn((0,))
    assert all(t.startswith(("a ", "an ")) or t[0].isupper() for t in english)  # English, full
    both = drawn((0, 6))
    chinese = [t for t in both if not t.isascii()]
    assert 0.3 < len(chinese) / len(both) < 0.7
    assert all("有一个" in t or "位于" in t for t in chinese)  # the full Chinese description
    assert drawn((0, 6)) == both  # deterministic
    cfg.canonical_captions = (0, 9)
    with pytest.raises(ValueError, match=r"only 9 captions; use indices below 9"):
        next(
            pipeline.train_iterator(
                cfg, seed=0, global_batch_size=64, process_index=0, process_count=1, num_threads=0
            )
        )


def test_epochs_drop_remainder_and_reshuffle(data_cfg):
    # 200 examples, global batch 64: 3 batches per epoch, 8 examples dropped each epoch.
    batches = _take(_iterator(data_cfg, global_batch=64), 6)
    epochs = [
        [_digest(img) for b in batches[e * 3 : (e + 1) * 3] for img in b["image"]] for e in range(2)
    ]
    for ids in epochs:
        assert len(set(ids)) == 192  # no example twice within an epoch (or a batch)
    assert epochs[0] != epochs[1]  # a different permutation each epoch


def test_process_shards_partition_the_global_batch(data_cfg):
    whole = _take(_iterator(data_cfg, global_batch=32), 8)  # crosses an epoch boundary
    shards = [
        _take(_iterator(data_cfg, global_batch=32, process_index=p, process_count=4), 8)
        for p in range(4)
    ]
    for step, batch in enumerate(whole):
        parts = [shards[p][step] for p in range(4)]
        assert all(part["image"].shape[0] == 8 for part in parts)
        digests = [{_digest(img) for img in part["image"]} for part in parts]
        assert len(set().union(*digests)) == 32  # disjoint
        for key in batch:
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), batch[key])


def test_batch_size_must_divide_among_processes(data_cfg):
    with pytest.raises(ValueError, match="multiple of process_count"):
        _iterator(data_cfg, global_batch=30, process_count=4)
    with pytest.raises(ValueError, match="is larger than the"):
        _iterator(data_cfg, global_batch=256)
    with pytest.raises(ValueError, match="unknown dataset"):
        _iterator(ml_collections.ConfigDict({**data_cfg.to_dict(), "name": "no_such_dataset_xyz"}))


@pytest.mark.parametrize("threads", [0, 1])
def test_iterator_state_round_trip(data_cfg, threads):
    it = _iterator(data_cfg, threads=threads)
    _take(it, 5)  # into the second epoch
    state = it.get_state()
    expected = _take(it, 4)
    resumed = _iterator(data_cfg, threads=threads)
    resumed.set_state(state)
    _assert_same(_take(resumed, 4), expected)


def test_iterator_state_with_orbax_checkpoint_manager(data_cfg, tmp_path):
    it = _iterator(data_cfg, threads=1)
    _take(it, 3)
    train_state = {"step": np.array(3, dtype=np.int32)}
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        manager.save(
            3,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(train_state),
                data=grain.checkpoint.CheckpointSave(it),
            ),
        )
        expected = _take(it, 3)  # advance while the async save may still be writing
        manager.wait_until_finished()

    resumed = _iterator(data_cfg, threads=1)
    with ocp.CheckpointManager(tmp_path / "ckpt") as manager:
        step = manager.latest_step()
        restored = manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(train_state),
                data=grain.checkpoint.CheckpointRestore(resumed),
            ),
        )
    assert step == 3 and int(restored["state"]["step"]) == 3
    assert restored["data"] is resumed
    _assert_same(_take(resumed, 3), expected)


def test_eval_arrays(data_cfg):
    arrays = pipeline.eval_arrays(data_cfg)
    n = NUM_VAL
    assert arrays["image"].shape == (n, IMAGE_SIZE, IMAGE_SIZE, 3)
    assert arrays["image"].dtype == np.float32
    assert arrays["tokens"].shape == (n, 48) and arrays["tokens"].dtype == np.int32
    for key in ("shape", "color", "size", "position"):
        assert arrays[key].shape == (n,) and arrays[key].dtype == np.int32
    assert arrays["heldout"].dtype == bool and arrays["heldout"].any()
    tok = pipeline.tokenizer_for(data_cfg)
    for i in (0, 5, n - 1):
        attrs = shapes.Attributes(*(int(arrays[k][i]) for k in shapes.Attributes._fields))
        assert tok.decode(arrays["tokens"][i]) == shapes.canonical_caption(attrs)
        assert arrays["heldout"][i] == attrs.heldout


def test_canonical_captions_are_refused_where_no_caption_is_drawn():
    from configs import video_contrastive
    from mmjax.errors import ConfigError
    from mmjax.tasks import get_task
    from mmjax.train.validate import validate_config

    config = video_contrastive.get_config()
    config.data.canonical_captions = (0, 6)
    with pytest.raises(ConfigError, match=r"does not draw from an image's captions"):
        validate_config(config, get_task(config.task))
    config = base_config.get_config()
    config.data.canonical_captions = (6, 6)
    with pytest.raises(ConfigError, match="distinct caption indices"):
        validate_config(config, get_task(config.task))
