"""Speech to text, Whisper-style, on the built-in spoken datasets `speech` (English) and
`speech_zh` (Mandarin) (`mmjax.data.builtin.speech`): log-mel features on device, SpecAugment
while training, a conv stem + Transformer encoder and a causal byte decoder with
cross-attention (`mmjax.models.speech`), trained on the decoder's next-token cross-entropy plus
`speech.ctc_weight` × a CTC loss on the encoder (0: no CTC term). Logged: `train/loss/decoder`,
`train/loss/ctc`.

Reported on the validation split (held-out voices, speaking rates and shape–colour
compositions): `speech/cer_greedy`, `speech/cer_beam`, `speech/wer_greedy`, `speech/wer_beam`,
per language `speech/cer_<en|zh>` (beam), and with a CTC head `speech/cer_ctc`, `speech/wer_ctc`
(its greedy path, collapsed: the encoder alone, without the decoder's language-model prior).
`task/score` is the beam CER — LOWER is better — and `task/chance` the CER of the best blind
transcriber, which writes the most frequent training transcript for every clip, or nothing if
that scores better.
"""

from __future__ import annotations

import collections

import grain
import jax
import jax.numpy as jnp
import numpy as np

from mmjax import losses
from mmjax.data import pipeline, sources
from mmjax.data.builtin import speech, speech_builder
from mmjax.errors import ConfigError
from mmjax.eval.edit_distance import cer, wer
from mmjax.eval.embed import jit_encoder, predict_all
from mmjax.losses.ctc import ctc_loss, ctc_nll
from mmjax.models import audio_features
from mmjax.models.speech import (
    SpeechToText,
    build_speech_model,
    clip_samples,
    ctc_collapse,
    ctc_greedy,
    encode_audio,
    transcribe,
)
from mmjax.train.task import Task, headline

LANGUAGE = {"speech": "en", "speech_zh": "zh"}


def open_split(config, split: str):
    """The tfds data source of `split` of the run's spoken dataset (built on first use)."""
    d = config.data
    builder = speech_builder.ensure_built(
        d.data_dir or None,
        language=LANGUAGE[d.name],
        num_train=d.num_train,
        num_val=d.num_val,
        seed=d.dataset_seed,
    )
    return builder.as_data_source(split)


def fit_clip(audio_N: np.ndarray, num_samples: int) -> np.ndarray:
    """float32 [num_samples]: the clip padded with silence (or cut) to the model's length."""
    out = np.zeros(num_samples, np.float32)
    n = min(len(audio_N), num_samples)
    out[:n] = audio_N[:n]
    return out


class ToExample(grain.transforms.Map):
    """A stored utterance -> {"audio": float32 [N], "tokens": int32 [L]}."""

    def __init__(self, tokenizer, num_samples: int):
        self.tokenizer, self.num_samples = tokenizer, num_samples

    def map(self, element):
        ex = speech_builder.decode(element)
        return {
            "audio": fit_clip(ex["audio"], self.num_samples),
            "tokens": self.tokenizer.encode([ex["transcript"]])[0],
        }


def drop_tokens(key, tokens_BL: jax.Array, rate: float, first_id: int, vocab_size: int):
    """The decoder's input row with each text token (id >= `first_id`: not BOS, EOT or PAD)
    replaced, with probability `rate`, by a uniformly random text id. The targets stay: the
    decoder cannot lean on its own history alone and has to listen (a weaker language-model
    prior, which otherwise rewrites held-out compositions into trained ones)."""
    drop_key, id_key = jax.random.split(key)
    text_BL = tokens_BL >= first_id
    drop_BL = jax.random.bernoulli(drop_key, rate, tokens_BL.shape) & text_BL
    random_BL = jax.random.randint(id_key, tokens_BL.shape, first_id, vocab_size, jnp.int32)
    return jnp.where(drop_BL, random_BL, tokens_BL)


class SpeechObjective:
    """Decoder cross-entropy + `ctc_weight` × CTC, on SpecAugmented log-mel features, with
    `token_dropout` of the decoder's input (masks and dropped tokens drawn from
    `fold_in(seed, step)`: the same on a resumed run)."""

    def __init__(self, model: SpeechToText, config, pad_id: int, eot_id: int, bos_id: int = 1):
        s = config.speech
        self.model, self.pad_id, self.eot_id = model, pad_id, eot_id
        self.first_text_id = max(pad_id, eot_id, bos_id) + 1
        self.ctc_weight = float(s.ctc_weight)
        self.token_dropout = float(s.get("token_dropout", 0.0))
        self.masks = (s.freq_masks, s.freq_width, s.time_masks, s.time_width)
        self.key = jax.random.key(config.seed)

    def __call__(self, params, batch, step=None):
        apply = lambda *a, **kw: self.model.apply({"params": params}, *a, **kw)
        features_BFM = apply(batch["audio"], method=SpeechToText.features)
        tokens_BL = inputs_BL = batch["tokens"]
        if step is not None:
            key = jax.random.fold_in(self.key, step)
            if any(self.masks):
                features_BFM, _ = audio_features.spec_augment(key, features_BFM, *self.masks)
            if self.token_dropout > 0:
                inputs_BL = drop_tokens(
                    jax.random.fold_in(key, 1),
                    tokens_BL,
                    self.token_dropout,
                    self.first_text_id,
                    self.model.vocab_size,
                )
        audio_BAD = apply(features_BFM, method=SpeechToText.encode)
        logits_BLV = apply(audio_BAD, inputs_BL, method=SpeechToText.decoder_logits)
        nll_B, count_B = losses.caption_nll(logits_BLV, tokens_BL, self.pad_id)
        decoder = losses.mean_caption_loss(nll_B, count_B)
        logs = {"train/loss/decoder": decoder}
        loss = decoder
        if self.ctc_weight > 0:
            ctc_logits = apply(audio_BAD, method=SpeechToText.ctc_logits)
            ctc = ctc_loss(ctc_logits, tokens_BL, self.pad_id, self.eot_id)
            logs["train/loss/ctc"] = ctc
            loss = loss + self.ctc_weight * ctc
        return loss, logs


class SpeechToTextTask(Task):
    name = "speech_to_text"
    metric_name = "cer"  # lower is better

    def validate(self, config):
        sources.require(config.data, "speech", self.name)
        if "speech" not in config:
            raise ConfigError(
                "task=speech_to_text needs the speech.* settings; run with "
                "--config configs/speech_to_text.py"
            )
        if config.data.tokenizer != "bytes":
            raise ConfigError(
                f"data.tokenizer={config.data.tokenizer!r}: speech_to_text writes English and "
                "Chinese transcripts with the byte tokenizer; use data.tokenizer=bytes"
            )
        s = config.speech
        if s.sample_rate != speech_builder.audio.MODEL_RATE:
            raise ConfigError(
                f"speech.sample_rate={s.sample_rate}: the spoken datasets are stored at "
                f"{speech_builder.audio.MODEL_RATE} Hz; use that"
            )
        if clip_samples(config) < s.n_fft:
            raise ConfigError(f"speech.max_seconds={s.max_seconds} is shorter than one frame")
        if s.ctc_weight < 0 or min(s.freq_masks, s.freq_width, s.time_masks, s.time_width) < 0:
            raise ConfigError("speech.ctc_weight and the SpecAugment settings must be >= 0")
        if s.beam_size < 1:
            raise ConfigError(f"speech.beam_size={s.beam_size} must be >= 1")
        if not 0 <= s.get("token_dropout", 0.0) < 1:
            raise ConfigError(f"speech.token_dropout={s.token_dropout} must be in [0, 1)")
        rescore = s.get("ctc_rescore", 0.0)
        if not 0 <= rescore <= 1 or (rescore > 0 and s.ctc_weight == 0):
            raise ConfigError(
                f"speech.ctc_rescore={rescore} must be in [0, 1], and > 0 only with a CTC head "
                "(speech.ctc_weight > 0)"
            )

    def build_model(self, config, vocab_size):
        return build_speech_model(config, vocab_size)

    def example_batch(self, config):
        return {
            "audio": np.zeros((1, clip_samples(config)), np.float32),
            "tokens": np.zeros((1, config.data.text_length), np.int32),
        }

    def model_inputs(self, batch):
        return batch["audio"], batch["tokens"]

    def objective(self, model, config, mesh, rules):
        tokenizer = self.tokenizer(config)
        return SpeechObjective(model, config, tokenizer.pad_id, tokenizer.eot_id, tokenizer.bos_id)

    def train_iterator(self, config, process_index, process_count):
        example = ToExample(self.tokenizer(config), clip_samples(config))
        return pipeline.train_batches(
            open_split(config, "train"), example, config, process_index, process_count
        )

    def evaluator(self, config, model, batch_sharding):
        return SpeechEvaluator(config, model, batch_sharding, self.tokenizer(config))


def blind_chance(train_transcripts: list[str], references: list[str]) -> float:
    """The CER of the better blind transcriber: the most frequent training transcript for
    every clip, or the empty transcript (CER 1)."""
    common = collections.Counter(train_transcripts).most_common(1)[0][0]
    return min(cer([common] * len(references), references), 1.0)


def joint_transcribe(model, params, audio_BN, length, beam, tokenizer, ctc_rescore):
    """(tokens [B, length], tokens [B, length]): of the beam search's `beam` hypotheses per clip,
    the best by (1 - ctc_rescore) × the decoder's log-probability + ctc_rescore × the CTC
    head's (joint CTC/attention rescoring: the CTC head has no language-model prior, so it
    vetoes hypotheses the audio does not support), and the best by the decoder's alone."""
    bos, eot, pad = tokenizer.bos_id, tokenizer.eot_id, tokenizer.pad_id
    audio_BAD = encode_audio(model, params, audio_BN)  # once, for the beams and the CTC head
    tokens_BKL, decoder_BK = transcribe(
        model, params, audio_BN, length, beam, bos, eot, pad, all_beams=True, audio_BAD=audio_BAD
    )
    if ctc_rescore == 0:
        return tokens_BKL[:, 0], tokens_BKL[:, 0]
    logits_BAV = model.apply({"params": params}, audio_BAD, method=SpeechToText.ctc_logits)
    b, k, length = tokens_BKL.shape
    nll, _ = ctc_nll(jnp.repeat(logits_BAV, k, axis=0), tokens_BKL.reshape(b * k, length), pad, eot)
    joint_BK = (1 - ctc_rescore) * decoder_BK - ctc_rescore * nll.reshape(b, k)
    best_B = jnp.argmax(joint_BK, axis=1)
    return jnp.take_along_axis(tokens_BKL, best_B[:, None, None], axis=1)[:, 0], tokens_BKL[:, 0]


class SpeechEvaluator:
    def __init__(self, config, model, sharding, tokenizer):
        val = open_split(config, "validation")
        n = len(val)
        num_samples = clip_samples(config)
        examples = [speech_builder.decode(ex) for ex in val.__getitems__(range(n))]
        self.audio = np.stack([fit_clip(ex["audio"], num_samples) for ex in examples])
        self.references = [ex["transcript"] for ex in examples]
        self.languages = np.array([ex["language"] for ex in examples])
        train = open_split(config, "train")
        first = [
            speech_builder.decode(e)["transcript"]
            for e in train.__getitems__(range(min(len(train), 2000)))
        ]
        self.chance = blind_chance(first, self.references)
        self.tokenizer, self.sharding, self.config = tokenizer, sharding, config
        length = config.data.text_length
        self.rescore = config.speech.get("ctc_rescore", 0.0)

        def decoder(beam, rescore):
            def decode(params, audio):
                joint, alone = joint_transcribe(
                    model, params, audio, length, beam, tokenizer, rescore
                )
                return jnp.concatenate([joint, alone], axis=1)  # one array for predict_all

            return jit_encoder(decode, sharding)

        self._greedy = decoder(1, 0.0)
        self._beam = decoder(config.speech.beam_size, self.rescore)
        self._ctc = None
        if config.speech.ctc_weight > 0:
            self._ctc = jit_encoder(
                lambda params, audio: ctc_greedy(model, params, audio), sharding
            )

    def transcripts(self, params, beam: bool) -> tuple[list[str], list[str]]:
        """The validation clips' transcripts, greedy or by beam search: (the best rescored by
        the CTC head, when `speech.ctc_rescore` > 0; the best by the decoder alone)."""
        fn = self._beam if beam else self._greedy
        ids = predict_all(fn, params, self.audio, self.config.eval.batch_size, self.sharding)
        length = self.config.data.text_length
        return [self._text(r[:length]) for r in ids], [self._text(r[length:]) for r in ids]

    def _text(self, ids) -> str:
        return speech.normalize_transcript(self.tokenizer.decode(ids))

    def __call__(self, params) -> dict:
        greedy, _ = self.transcripts(params, beam=False)
        beam, beam_decoder = self.transcripts(params, beam=True)
        refs = self.references
        out = {
            "speech/cer_greedy": cer(greedy, refs),
            "speech/cer_beam": cer(beam, refs),
            "speech/wer_greedy": wer(greedy, refs),
            "speech/wer_beam": wer(beam, refs),
        }
        if self.rescore > 0:  # the same beams ranked by the decoder alone
            out["speech/cer_beam_decoder"] = cer(beam_decoder, refs)
            out["speech/wer_beam_decoder"] = wer(beam_decoder, refs)
        if self._ctc is not None:  # the encoder alone: no language-model prior
            ids = predict_all(
                self._ctc, params, self.audio, self.config.eval.batch_size, self.sharding
            )
            pad, eot = self.tokenizer.pad_id, self.tokenizer.eot_id
            ctc = [self._text([*ctc_collapse(row, pad), eot]) for row in ids]
            out["speech/cer_ctc"], out["speech/wer_ctc"] = cer(ctc, refs), wer(ctc, refs)
        for lang in sorted(set(self.languages.tolist())):
            rows = np.flatnonzero(self.languages == lang)
            out[f"speech/cer_{lang}"] = cer([beam[i] for i in rows], [refs[i] for i in rows])
        return {**out, **headline(out["speech/cer_beam"], self.chance)}


TASK = SpeechToTextTask()
