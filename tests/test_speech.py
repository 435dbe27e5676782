"""Speech to text: eSpeak NG synthesis, the spoken dataset's held-out splits, the model
(toy learning, cached decoding, sharding) and the task's settings."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import speech_to_text as speech_config
from mmjax import parallel
from mmjax.data.builtin import espeak, shapes, speech
from mmjax.errors import ConfigError
from mmjax.models.speech import SpeechToText, transcribe
from mmjax.tasks import get_task
from mmjax.tasks.speech_to_text import SpeechObjective
from mmjax.train.step import NO_CEILING
from mmjax.train.trainer import build_trainer
from tests.conftest import tiny

VOCAB = 264  # the byte tokenizer's


def tiny_speech(data_dir=None, **data):
    c = tiny(speech_config.get_config(), data_dir, **data)
    c.speech.update(
        width=32, depth=1, num_heads=2, mlp_dim=64, decoder_depth=1, n_mels=32, max_seconds=0.5
    )
    return c


def toy_model(num_samples=3200, max_len=8) -> SpeechToText:
    return SpeechToText(
        vocab_size=16,
        max_len=max_len,
        num_samples=num_samples,
        sample_rate=16000,
        n_fft=400,
        hop=160,
        n_mels=24,
        width=32,
        depth=1,
        num_heads=2,
        mlp_dim=64,
        decoder_depth=1,
    )


@pytest.mark.parametrize(
    "voice, text, seconds",
    [
        ("en-us+m3", "a small red circle on the left", (1.0, 4.0)),
        ("cmn", "左上方有一个大的红色三角形", (1.5, 6.0)),
    ],
)
def test_espeak_speaks_english_and_mandarin(voice, text, seconds):
    samples = espeak.synthesize(text, voice, rate=175, pitch=50)
    assert samples.dtype == np.int16
    assert seconds[0] < len(samples) / espeak.SAMPLE_RATE < seconds[1]
    rms = np.sqrt(np.mean(samples.astype(np.float64) ** 2))
    assert rms > 300  # speech, not silence (full scale is 32767)
    # slower speech is longer
    slow = espeak.synthesize(text, voice, rate=100, pitch=50)
    assert len(slow) > 1.3 * len(samples)


@pytest.mark.parametrize("voice", ["xx-nosuch", "en-us+nosuchvariant"])
def test_an_unknown_voice_is_an_error_naming_the_fix(voice):
    with pytest.raises(ValueError, match=r"unknown eSpeak voice.*en-us"):
        espeak.synthesize("hello", voice)


def test_validation_holds_out_voices_rates_and_compositions():
    def pair_in(transcript):
        words = transcript.split()
        color = [i for i, c in enumerate(shapes.COLORS) if c in words]
        shape = [i for i, s in enumerate(shapes.SHAPES) if s in words]
        return (shape[0], color[0]) if color and shape else None

    train = [speech.sample_utterance(0, "en", "train", i) for i in range(300)]
    val = [speech.sample_utterance(0, "en", "validation", i) for i in range(60)]
    assert {u.voice for u in train}.isdisjoint({u.voice for u in val})
    assert all(165 <= u.rate <= 185 for u in val)
    assert not any(165 <= u.rate <= 185 for u in train)
    assert all(pair_in(u.transcript) not in shapes.HELDOUT_PAIRS for u in train)
    captions = [u for u in val if u.kind == "caption"]
    assert captions and all(pair_in(u.transcript) in shapes.HELDOUT_PAIRS for u in captions)
    assert {u.kind for u in train} == {"caption", "digits"}
    # the text and settings are a pure function of (seed, language, split, index)
    first = speech.sample_utterance(0, "zh", "validation", 5)
    assert first == speech.sample_utterance(0, "zh", "validation", 5)
    assert first.voice.startswith("cmn+")


@pytest.mark.slow  # 40 training steps (~14 s)
def test_decoder_and_ctc_learn_a_toy_problem():
    """Four clips, each a sequence of two tones naming its two tokens: both losses fall far."""
    model = toy_model()
    t = np.arange(3200) / 16000
    tones = {3: 500.0, 4: 1500.0, 5: 3000.0}
    seqs = [(3, 4), (4, 5), (5, 3), (4, 4)]
    audio = (
        np.stack(
            [
                np.where(
                    t < 0.1, np.sin(2 * np.pi * tones[a] * t), np.sin(2 * np.pi * tones[b] * t)
                )
                for a, b in seqs
            ]
        ).astype(np.float32)
        * 0.5
    )
    tokens = np.array([[1, a, b, 2, 0, 0, 0, 0] for a, b in seqs], np.int32)
    config = ml_collections.ConfigDict(
        dict(
            seed=0,
            speech=dict(ctc_weight=1.0, freq_masks=0, freq_width=0, time_masks=0, time_width=0),
        )
    )
    objective = SpeechObjective(model, config, pad_id=0, eot_id=2)
    params = model.init(jax.random.key(0), audio, tokens)["params"]
    params = nn.meta.unbox(params)
    opt = optax.adam(3e-3)
    batch = {"audio": jnp.asarray(audio), "tokens": jnp.asarray(tokens)}

    @jax.jit
    def step(params, opt_state):
        (_, logs), grads = jax.value_and_grad(objective, has_aux=True)(params, batch, 0)
        updates, opt_state = opt.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, logs

    opt_state = opt.init(params)
    params, opt_state, first = step(params, opt_state)
    for _ in range(40):
        params, opt_state, logs = step(params, opt_state)
    assert float(logs["train/loss/decoder"]) < 0.1 * float(first["train/loss/decoder"])
    assert float(logs["train/loss/ctc"]) < 0.2 * float(first["train/loss/ctc"])
    logits, _ = model.apply({"params": params}, batch["audio"], batch["tokens"])
    np.testing.assert_array_equal(np.argmax(logits, -1)[:, :3], tokens[:, 1:4])


@pytest.mark.slow  # compiles both beam-search loops (~17 s)
def test_cached_decoding_equals_full_recompute():
    beam = 2  # reorders the caches between steps
    model = toy_model(max_len=6)
    audio = jnp.asarray(np.random.default_rng(0).normal(0, 0.1, (2, 3200)), jnp.float32)
    params = nn.meta.unbox(model.init(jax.random.key(1), audio, jnp.zeros((2, 6), jnp.int32)))
    params = params["params"]
    cached = transcribe(model, params, audio, 6, beam, 1, 2, 0, cache=True)
    full = transcribe(model, params, audio, 6, beam, 1, 2, 0, cache=False)
    np.testing.assert_array_equal(cached[0], full[0])
    np.testing.assert_allclose(cached[1], full[1], rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # two train-step compiles: ~100 s on the loaded 2 cores
@pytest.mark.multidevice
def test_sharded_step_equals_single_device():
    rng = np.random.default_rng(0)
    batch = {
        "audio": rng.normal(0, 0.1, (8, 8000)).astype(np.float32),
        "tokens": np.tile(np.array([[1, 70, 80, 90, 2] + [0] * 59], np.int32), (8, 1)),
    }

    def one_step(mesh, devices):
        c = tiny_speech()
        c.batch_size = 8
        c.mesh = ml_collections.ConfigDict(mesh)
        m = parallel.make_mesh(c.mesh, devices)
        trainer = build_trainer(get_task(c.task), c, m, VOCAB)
        state = trainer.init(jax.random.key(0))
        with jax.set_mesh(m), nn.logical_axis_rules(trainer.rules):
            state, out = trainer.step(
                state, parallel.global_batch(batch, trainer.batch_sharding), NO_CEILING
            )
        return float(out["train/loss"]), jax.device_get(state.params)

    single, p1 = one_step(dict(data=1, fsdp=1, tensor=1), jax.devices()[:1])
    sharded, p8 = one_step(dict(data=2, fsdp=2, tensor=2), jax.devices())
    assert single == pytest.approx(sharded, rel=1e-5)
    # Adam's first update is about ±lr (1e-3 here) per weight whatever the gradient's size, so a
    # weight whose gradient is ~0 moves by a sign that reordered fp32 sums can flip: 5% of one
    # update is the tolerance (a wrong sharding changes the loss, checked above to 1e-5).
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p8), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize(
    "override, words",
    [
        (dict(data=dict(name="shapes")), "data.name"),
        (dict(data=dict(tokenizer="clip_bpe")), "byte tokenizer"),
        (dict(speech=dict(sample_rate=8000)), "16000 Hz"),
        (dict(speech=dict(beam_size=0)), "beam_size"),
        (dict(speech=dict(token_dropout=1.0)), "token_dropout"),
        (dict(speech=dict(ctc_rescore=0.3, ctc_weight=0.0)), "CTC head"),
        (dict(speech=dict(ctc_rescore=1.5)), "ctc_rescore"),
        (dict(loss="sigmoid"), "loss"),
    ],
)
def test_settings_speech_to_text_cannot_use_fail_before_compiling(override, words):
    from mmjax.train.validate import validate_config

    c = speech_config.get_config()
    for key, value in override.items():
        if isinstance(value, dict):
            c[key].update(value)
        else:
            c[key] = value
    task = get_task(c.task)
    with pytest.raises(ConfigError, match=words):
        validate_config(c, task)
        task.validate(c)
