"""Speech to text, Whisper-style (Radford et al. 2022): log-mel features -> two 1-D
convolutions (strides 1 and 2 by default) -> Transformer encoder -> causal text decoder
cross-attending to the audio tokens (`CausalDecoder`, decoded with the static-shape caches of
`decoding`), plus an optional CTC head on the audio tokens.

Shapes: B batch, N samples, F frames, M mel bins, A audio tokens, D width, L text
length, V vocabulary. A: F / the product of the stem's strides.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from mmjax.models import audio_features, decoding
from mmjax.models.causal_decoder import CausalDecoder, decode_tokens
from mmjax.models.gemm import dense
from mmjax.models.layers import ACT_BTD, Encoder, LayerNorm, TowerSettings, param


def sinusoids(length: int, width: int) -> np.ndarray:
    """float32 [length, width]: Whisper's fixed audio positions (sines then cosines at
    geometrically spaced timescales from 1 to 10,000 tokens). Fixed rather than learned: at unit
    scale from the first step, so attention keeps the frames' order, which the CTC alignment
    and the decoder's cross-attention both need."""
    half = width // 2
    scales = np.exp(-np.log(10_000.0) * np.arange(half) / max(half - 1, 1))
    angles = np.arange(length)[:, None] * scales[None]
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1).astype(np.float32)


class ConvStem(TowerSettings):
    """1-D convolutions (kernel 3, GELU) from M mel bins to D channels, one per entry of
    `strides`. Whisper's (1, 2) makes 20 ms audio tokens from 10 ms hops; (2, 2) makes 40 ms
    tokens, too coarse for CTC on characters at fast speaking rates (an English character
    lasts ~50 ms at 225 words per minute, and a doubled letter needs a blank between)."""

    width: int
    strides: tuple[int, ...] = (1, 2)

    @nn.compact
    def __call__(self, x_BFM: jax.Array) -> jax.Array:
        init = nn.initializers.variance_scaling(1.0, "fan_in", "normal", in_axis=(0, 1))
        for i, stride in enumerate(self.strides):
            c = x_BFM.shape[-1]
            w = param(
                self,
                f"conv{i}_kernel",
                init,
                (3, c, self.width),
                (None, None, "embed"),
                self.param_dtype,
            )
            b = param(
                self,
                f"conv{i}_bias",
                nn.initializers.zeros,
                (self.width,),
                ("norm",),
                self.param_dtype,
            )
            y = jax.lax.conv_general_dilated(
                x_BFM.astype(self.dtype),
                w.astype(self.dtype),
                (stride,),
                ((1, 1),),
                dimension_numbers=("NWC", "WIO", "NWC"),
                preferred_element_type=jnp.float32,
            )
            x_BFM = jax.nn.gelu(y + b.astype(jnp.float32)[None, None]).astype(self.dtype)
        return x_BFM


class SpeechToText(TowerSettings):
    """The whole model. `__call__(audio_BN, tokens_BL)` -> (logits_BLV, ctc_logits_BAV) creates
    every parameter; training composes `features`, `encode`, `decoder_logits` and `ctc_logits`
    (SpecAugment sits between `features` and `encode`); decoding uses `decode_step`."""

    vocab_size: int
    max_len: int
    num_samples: int  # clip length: fixes the number of audio tokens
    sample_rate: int
    n_fft: int
    hop: int
    n_mels: int
    width: int
    depth: int
    num_heads: int
    mlp_dim: int
    decoder_depth: int
    pad_id: int = 0

    stem_strides: tuple[int, ...] = (1, 2)

    @property
    def num_tokens(self) -> int:
        f = audio_features.num_frames(self.num_samples, self.n_fft, self.hop)
        for stride in self.stem_strides:  # kernel 3, padding 1: ceil(f / stride)
            f = -(-f // stride)
        return f

    def setup(self):
        def weight(name, shape, axes, init):
            return param(self, name, init, shape, axes, self.param_dtype)

        normal = nn.initializers.normal
        self.stem = ConvStem(self.width, tuple(self.stem_strides), **self._settings())
        self.encoder = Encoder.of_tower(self, name="encoder")
        self.token_embedding = weight(
            "token_embedding", (self.vocab_size, self.width), ("vocab", "embed"), normal(0.02)
        )
        self.text_position = weight(
            "text_position", (self.max_len, self.width), ("length", "embed"), normal(0.01)
        )
        self.decoder = CausalDecoder(
            self.decoder_depth,
            self.num_heads,
            self.mlp_dim,
            activation=self.activation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
        )
        self.ln_out = LayerNorm(self.dtype, self.param_dtype)
        self.output_kernel = weight(
            "output_kernel",
            (self.width, self.vocab_size),
            ("embed", None),
            nn.initializers.lecun_normal(),
        )
        self.ctc_kernel = weight(
            "ctc_kernel",
            (self.width, self.vocab_size),
            ("embed", None),
            nn.initializers.lecun_normal(),
        )

    def _settings(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype, activation=self.activation)

    def features(self, audio_BN: jax.Array) -> jax.Array:
        """float32 [B, F, M] log-mel features (no parameters)."""
        return audio_features.log_mel(audio_BN, self.sample_rate, self.n_fft, self.hop, self.n_mels)

    def encode(self, features_BFM: jax.Array) -> jax.Array:
        """[B, A, D] audio tokens. The clip is always `num_samples` long (padded with silence),
        so every token is attended to, as Whisper does with its 30 s window."""
        x_BAD = self.stem(features_BFM)
        x_BAD = x_BAD + sinusoids(self.num_tokens, self.width).astype(self.dtype)[None]
        return self.encoder(nn.with_logical_constraint(x_BAD, ACT_BTD))

    def _hidden(self, audio_BAD, tokens_BL, position=None):
        embeddings = (self.token_embedding, self.text_position, self.pad_id)
        return self.ln_out(decode_tokens(self.decoder, *embeddings, audio_BAD, tokens_BL, position))

    def _project(self, h_BTD, kernel):
        b, t, d = h_BTD.shape
        logits = dense(h_BTD.reshape(b * t, d), kernel, self.dtype, out_dtype=jnp.float32)
        return logits.reshape(b, t, self.vocab_size)

    def decoder_logits(self, audio_BAD, tokens_BL):
        """float32 [B, L, V]: logits of the token after each position (teacher forcing)."""
        return self._project(self._hidden(audio_BAD, tokens_BL), self.output_kernel)

    def ctc_logits(self, audio_BAD):
        """float32 [B, A, V]: per audio token, the CTC distribution (blank = `pad_id`)."""
        return self._project(audio_BAD, self.ctc_kernel)

    def decode_step(self, audio_BAD, tokens_BL, position):
        """float32 [B, V]: `decoder_logits(...)[:, position]` from the key/value caches (apply
        with `decoding.apply_cached`; the first call creates them and projects the audio
        tokens once)."""
        h_B1D = self._hidden(audio_BAD, tokens_BL, position)
        return self._project(h_B1D, self.output_kernel)[:, 0]

    def __call__(self, audio_BN, tokens_BL):
        audio_BAD = self.encode(self.features(audio_BN))
        return self.decoder_logits(audio_BAD, tokens_BL), self.ctc_logits(audio_BAD)


def build_speech_model(config: ml_collections.ConfigDict, vocab_size: int) -> SpeechToText:
    s = config.speech
    return SpeechToText(
        vocab_size=vocab_size,
        max_len=config.data.text_length,
        num_samples=clip_samples(config),
        sample_rate=s.sample_rate,
        n_fft=s.n_fft,
        hop=s.hop,
        n_mels=s.n_mels,
        width=s.width,
        depth=s.depth,
        num_heads=s.num_heads,
        mlp_dim=s.mlp_dim,
        decoder_depth=s.decoder_depth,
        pad_id=config.model.text.pad_id,
        stem_strides=tuple(s.stem_strides),
        dtype=jnp.dtype(config.dtype),
        remat=config.model.remat,
        scan_layers=config.model.scan_layers,
    )


def clip_samples(config: ml_collections.ConfigDict) -> int:
    """The fixed clip length in samples (`speech.max_seconds` at `speech.sample_rate`)."""
    return round(config.speech.max_seconds * config.speech.sample_rate)


def ctc_greedy(model: SpeechToText, params, audio_BN) -> jax.Array:
    """int32 [B, A]: the CTC head's most likely id per audio token (collapse with
    `ctc_collapse`). No decoder, so no language-model prior over the transcript."""
    apply = lambda *args, **kw: model.apply({"params": params}, *args, **kw)
    audio_BAD = apply(apply(audio_BN, method=SpeechToText.features), method=SpeechToText.encode)
    return jnp.argmax(apply(audio_BAD, method=SpeechToText.ctc_logits), axis=-1)


def ctc_collapse(ids_A: np.ndarray, blank: int) -> list[int]:
    """The CTC labelling of a frame-wise path: repeats merged, then blanks dropped."""
    ids = np.asarray(ids_A).tolist()
    return [t for i, t in enumerate(ids) if t != blank and (i == 0 or t != ids[i - 1])]


def encode_audio(model: SpeechToText, params, audio_BN):
    """Waveforms [B, N] -> the encoder's audio tokens [B, A, D] (log-mel features, encoder)."""
    apply = lambda *args, **kw: model.apply({"params": params}, *args, **kw)
    return apply(apply(audio_BN, method=SpeechToText.features), method=SpeechToText.encode)


def transcribe(
    model: SpeechToText,
    params,
    audio_BN,
    length: int,
    beam: int,
    bos: int,
    eot: int,
    pad: int,
    cache: bool = True,
    all_beams: bool = False,
    audio_BAD=None,
):
    """(tokens [B, length], log-probability [B]) of the best of `beam` beams per clip
    (`decoding.beam_search`; beam=1 is greedy); with `all_beams` every beam, best first
    ([B, beam, length], [B, beam]). Without `cache` every position reruns the whole prefix:
    the reference the cached decoding equals. `audio_BAD`: the clips already encoded
    (`encode_audio`), for callers that also read the encoder (CTC rescoring)."""
    if audio_BAD is None:
        audio_BAD = encode_audio(model, params, audio_BN)
    return decoding.search_on_context(
        model, params, audio_BAD, length, beam, bos, eot, pad, cache, all_beams
    )
