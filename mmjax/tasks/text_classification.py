"""Text classification with pretrained word vectors and a CNN (Kim 2014) or an LSTM/GRU on the
built-in `reviews` sentiment data (`mmjax.data.builtin.reviews`): the validation sentences use
adjectives never seen in training, so the score measures what the word vectors bring.

Vectors: `text_cnn.vectors`, a Word2Vec/GloVe text file; "" exports the packaged MiniLM's
whole-word embeddings for the dataset's words to `<data_dir>/word_vectors/` once (needs the
`interop` extra; `wordvec.vectors_path`, `hf.export_minilm`). `text_cnn.random_vectors`
replaces them by random ones of the same scale (the baseline), `text_cnn.freeze` keeps the
table fixed. Reported: `text/accuracy`, `text/oov_words` (dataset words without a vector),
`text/skipped_vector_lines` (malformed lines of the vectors file), and `task/score` (accuracy)
next to `task/chance`, the accuracy of always answering the most frequent training label.

Encoder (`model.text.kind`): "cnn" (`TextCNN`, `text_cnn.widths`/`filters`) or "lstm"/"gru"
(`RecurrentClassifier`: `model.text.width`, `depth`, `bidirectional`), both over the same word
vectors; the vectors' dimension is the embedding width either way.
"""

from __future__ import annotations

import os

import jax.numpy as jnp
import numpy as np

from mmjax.data import pipeline, sources
from mmjax.data.builtin import reviews, wordvec
from mmjax.errors import ConfigError
from mmjax.eval.embed import class_predictor
from mmjax.interop import hf
from mmjax.models.recurrent import RecurrentClassifier, RecurrentTextTower
from mmjax.models.text_cnn import TextCNN
from mmjax.tasks.classification import ClassificationObjective
from mmjax.train.task import Task, headline


def vectors_file(config) -> str:
    """The run's word-vector file, exported from the packaged MiniLM first if it is that one."""
    path = wordvec.vectors_path(
        config.text_cnn.vectors, config.data.data_dir, "reviews", reviews.vocabulary()
    )
    if not config.text_cnn.vectors and not os.path.exists(path):
        hf.export_minilm(path, reviews.vocabulary())
    return path


def _vectors(config) -> wordvec.WordVectors:
    return wordvec.cached_vectors(vectors_file(config))


ENCODERS = ("cnn", "lstm", "gru")


def _embedding_path(config) -> tuple[str, ...]:
    """Where the word-vector table sits in the parameters."""
    return ("embedding",) if config.model.text.kind == "cnn" else ("tower", "token_embedding")


class TextClassificationTask(Task):
    name = "text_classification"
    metric_name = "accuracy"

    def validate(self, config):
        sources.require(config.data, "sentences", self.name)
        t = config.model.text
        if t.kind not in ENCODERS:
            raise ConfigError(
                f"model.text.kind={t.kind!r}: task={self.name} encodes with one of "
                f"{', '.join(ENCODERS)} over word vectors"
            )
        odd = t.bidirectional and t.width % 2
        if t.kind != "cnn" and (odd or t.width < 1 or t.depth < 1):
            raise ConfigError(
                f"model.text.width={t.width}, depth={t.depth}: positive, and the width even "
                "for a bidirectional tower (width // 2 units each way)"
            )
        try:
            path = vectors_file(config)
        except (ImportError, OSError) as e:
            raise ConfigError(f"text_cnn.vectors: {e}") from e
        if not os.path.isfile(path):  # named here, not later as a tokenizer error
            raise ConfigError(
                f"text_cnn.vectors={config.text_cnn.vectors!r}: no such file; give a "
                "Word2Vec/GloVe text file, or '' for the packaged MiniLM vectors"
            )

    def tokenizer(self, config):
        return wordvec.WordTokenizer(_vectors(config).words, config.data.text_length)

    def build_model(self, config, vocab_size):
        t, text = config.text_cnn, config.model.text
        if text.kind != "cnn":
            tower = RecurrentTextTower(
                kind=text.kind,
                vocab_size=vocab_size,
                width=text.width,
                depth=text.depth,
                embed_dim=_vectors(config).vectors.shape[1],
                bidirectional=text.bidirectional,
                pad_id=wordvec.PAD,
                eot_id=None,  # word ids: no end marker, the text ends at the last non-pad
                freeze_embeddings=t.freeze,
                dtype=jnp.dtype(config.dtype),
            )
            return RecurrentClassifier(tower, num_classes=len(reviews.CLASSES))
        return TextCNN(
            vocab_size=vocab_size,
            embed_dim=_vectors(config).vectors.shape[1],
            num_classes=len(reviews.CLASSES),
            widths=tuple(t.widths),
            filters=t.filters,
            freeze_embeddings=t.freeze,
            dtype=jnp.dtype(config.dtype),
        )

    def frozen_prefixes(self, config):
        # No optimizer state or update for a frozen table (the model stops its gradient too).
        return ("/".join(_embedding_path(config)),) if config.text_cnn.freeze else ()

    def example_batch(self, config):
        return {
            "tokens": np.zeros((1, config.data.text_length), np.int32),
            "label": np.zeros((1,), np.int32),
        }

    def model_inputs(self, batch):
        return (batch["tokens"],)

    def init_variables(self, model, config, key):
        variables = super().init_variables(model, config, key)
        table = wordvec.embedding_table(
            _vectors(config), config.seed, random=config.text_cnn.random_vectors
        )
        params = dict(variables["params"])
        *outer, name = _embedding_path(config)
        holder = params
        for key in outer:
            holder[key] = dict(holder[key])
            holder = holder[key]
        if holder[name].value.shape != table.shape:  # a config/vectors mismatch, never silent
            raise ConfigError(f"word vectors {table.shape} do not fit {holder[name].value.shape}")
        holder[name] = holder[name].replace_boxed(jnp.asarray(table))
        return {**variables, "params": params}

    def objective(self, model, config, mesh, rules):
        return ClassificationObjective(model, inputs=("tokens",))

    def train_iterator(self, config, process_index, process_count):
        texts, labels = reviews.load("train", config.data.num_train, config.data.dataset_seed)
        source = [{"text": t, "label": y} for t, y in zip(texts, labels, strict=True)]
        tokenize = pipeline.TokenizeText(self.tokenizer(config), label="label")
        return pipeline.train_batches(source, tokenize, config, process_index, process_count)

    def evaluator(self, config, model, batch_sharding):
        d = config.data
        tokenizer = self.tokenizer(config)
        _, train_labels = reviews.load("train", d.num_train, d.dataset_seed)
        texts, labels = reviews.load("validation", d.num_val, d.dataset_seed)
        chance = float(np.mean(labels == np.bincount(train_labels).argmax()))
        skipped = _vectors(config).skipped_lines
        known = set(tokenizer.words)
        oov = sorted(w for w in reviews.vocabulary() if w not in known)
        tokens = tokenizer.encode(texts)
        predict = class_predictor(model, tokens, config.eval.batch_size, batch_sharding)

        def evaluate(params) -> dict:
            accuracy = float(np.mean(predict(params) == labels))
            return {
                "text/accuracy": accuracy,
                "text/oov_words": float(len(oov)),
                "text/skipped_vector_lines": float(skipped),
                **headline(accuracy, chance),
            }

        return evaluate


TASK = TextClassificationTask()
