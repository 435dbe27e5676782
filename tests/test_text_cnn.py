"""Word vectors (Word2Vec/GloVe text files), the word tokenizer, the Kim CNN, and the text
classification task's frozen pretrained table."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import text_classification
from mmjax import parallel
from mmjax.data.builtin import reviews, wordvec
from mmjax.models.text_cnn import TextCNN
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer


def write_vectors(path, dim=4, header=False, extra_lines=()):
    rng = np.random.default_rng(0)
    words = sorted(reviews.vocabulary())
    lines = [f"{len(words)} {dim}"] if header else []
    lines += [w + " " + " ".join(f"{x:.4f}" for x in rng.normal(size=dim)) for w in words]
    path.write_text("\n".join([*lines, *extra_lines]) + "\n")
    return words


@pytest.mark.parametrize("header", [False, True], ids=["glove", "word2vec"])
def test_loader_reads_both_formats_and_counts_bad_lines(tmp_path, header):
    path = tmp_path / "vectors.txt"
    bad = ["broken 1.0 2.0", "nan_word nan 1 2 3", "notnum a b c d", "Good 9 9 9 9", ""]
    words = write_vectors(path, header=header, extra_lines=bad)
    vectors = wordvec.load_word_vectors(str(path))
    assert vectors.words == tuple(words) and vectors.vectors.shape == (len(words), 4)
    # wrong dimension, non-finite, unparsable: skipped; "Good" lower-cases to a repeat: first kept.
    assert vectors.skipped_lines == 3 and vectors.duplicates == 1
    assert not np.any(vectors.vectors[words.index("good")] == 9)


def test_loader_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        wordvec.load_word_vectors(str(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="no readable word vectors"):
        wordvec.load_word_vectors(str(tmp_path / "empty.txt"))


def test_tokenizer_and_table():
    tok = wordvec.WordTokenizer(["the", "movie", "great"], max_len=5)
    ids = tok.encode(["The movie was GREAT!", ""])
    np.testing.assert_array_equal(ids, [[2, 3, 1, 4, 0], [0, 0, 0, 0, 0]])
    vectors = wordvec.WordVectors(("a", "b"), np.ones((2, 3), np.float32))
    table = wordvec.embedding_table(vectors, seed=0)
    assert table.shape == (4, 3) and np.all(table[0] == 0) and np.all(table[2:] == 1)
    random_table = wordvec.embedding_table(vectors, seed=0, random=True)
    assert not np.allclose(random_table[2:], 1)


def test_cnn_ignores_padding_and_handles_short_sentences():
    model = TextCNN(vocab_size=20, embed_dim=8, num_classes=3, widths=(2, 3), filters=5)
    tokens = jnp.array([[3, 4, 5, 6, 0, 0], [7, 0, 0, 0, 0, 0]])  # the second is shorter than 2
    params = nn.unbox(model.init(jax.random.key(0), tokens)["params"])
    logits = model.apply({"params": params}, tokens)
    assert logits.shape == (2, 3) and bool(jnp.all(jnp.isfinite(logits)))
    padded = jnp.pad(tokens, ((0, 0), (0, 4)))
    np.testing.assert_allclose(model.apply({"params": params}, padded), logits, rtol=1e-6)
    # Changing a padding row of the table changes nothing.
    params["embedding"] = params["embedding"].at[0].set(5.0)
    np.testing.assert_allclose(model.apply({"params": params}, tokens), logits, rtol=1e-6)


def test_pretrained_table_is_loaded_and_stays_frozen(tmp_path):
    path = tmp_path / "vectors.txt"
    write_vectors(path, dim=8)
    config = text_classification.get_config()
    config.text_cnn.vectors = str(path)
    config.update(batch_size=16, total_steps=4)
    config.data.update(num_train=64, num_val=32)
    from mmjax.tasks import get_task

    task = get_task(config.task)
    mesh = parallel.make_mesh(config.mesh)
    trainer = build_trainer(get_task(config.task), config, mesh, task.tokenizer(config).vocab_size)
    with jax.set_mesh(mesh), nn.logical_axis_rules(trainer.rules):
        state = trainer.init(jax.random.key(0))
        loaded = wordvec.load_word_vectors(str(path)).vectors
        np.testing.assert_allclose(np.asarray(state.params["embedding"])[2:], loaded, rtol=1e-6)
        before = jax.device_get(state.params)
        batches = task.train_iterator(config, 0, 1)
        for _ in range(2):  # (the warm-up's first learning rate is 0)
            batch = parallel.global_batch(next(batches), trainer.batch_sharding)
            state, _ = trainer.step(state, batch, NO_CEILING)
        after = jax.device_get(state.params)
    np.testing.assert_array_equal(after["embedding"], before["embedding"])
    assert not np.array_equal(after["head_kernel"], before["head_kernel"])


def test_reviews_hold_out_adjectives():
    train_texts, _ = reviews.load("train", 300, 0)
    val_texts, labels = reviews.load("validation", 300, 0)
    train_words = {w for t in train_texts for w in t.split()}
    for _, held_out in reviews.ADJECTIVES.values():
        assert not set(held_out) & train_words
    assert 0.35 < labels.mean() < 0.65
    assert all(
        any(a in t.split() for a in sum(reviews.ADJECTIVES[y], ()))
        for t, y in zip(val_texts, labels, strict=True)
    )
