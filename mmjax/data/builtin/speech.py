"""The built-in spoken datasets `speech` (English) and `speech_zh` (Mandarin): utterances
synthesised offline with eSpeak NG (`espeak.py`), with their transcripts.

Utterances are the `shapes` captions (English captions with an English voice, the Chinese
captions with the Mandarin one) and spoken digit strings. Every utterance gets a voice variant,
a speaking rate and a pitch, leading and trailing silence, background noise at a random
signal-to-noise ratio and a random gain. Validation measures generalisation on three axes at
once: its voice variants and its band of speaking rates never occur in training, and its
captions describe only the shape–colour compositions `shapes` holds out of training
(`shapes.HELDOUT_PAIRS`).

Every utterance is a pure function of (seed, language, split, index): the dataset rebuilds bit
for bit. `speech_builder.py` writes it as a tfds dataset (int16 samples at 16 kHz).
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from mmjax.data import audio
from mmjax.data.builtin import espeak, shapes

LANGUAGES = ("en", "zh")
BASE_VOICE = {"en": "en-us", "zh": "cmn"}
# Voice variants (`espeak.variants()`) by split: validation's are never heard in training.
TRAIN_VARIANTS = ("m1", "m2", "m3", "m4", "f1", "f2", "f3", "klatt", "klatt2", "adam", "david")
HELDOUT_VARIANTS = ("m5", "f4", "klatt4", "ian")
# Speaking rates (words per minute) by split: validation speaks in a band training never uses.
TRAIN_RATES = ((130, 160), (190, 225))
HELDOUT_RATES = ((165, 185),)
PITCH_RANGE = (25, 75)
# White noise relative to the speech power. White noise fills the wide high mel bands, where
# fricatives live: at 12 dB the features' speech/noise contrast there was ~0.2 of their range.
SNR_DB = (20.0, 40.0)
PEAK_GAIN = (0.2, 0.95)  # the peak amplitude after mixing, of full scale
SILENCE_SECONDS = (0.05, 0.35)  # before and after the speech, each
DIGIT_FRACTION = 0.2  # utterances that are digit strings rather than captions
DIGIT_COUNT = (3, 6)
DIGITS_ZH = "零一二三四五六七八九"
SPLITS = ("train", "validation")

_PUNCTUATION = re.compile(r"[^\w\s]")


def normalize_transcript(text: str) -> str:
    """What is compared when scoring: lower case, no punctuation, single spaces (speech has
    no commas; "In the top left corner, a ..." is heard as "in the top left corner a ...")."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


@dataclasses.dataclass(frozen=True)
class Utterance:
    text: str  # what eSpeak reads
    transcript: str  # normalised text: the training target and the reference
    voice: str
    rate: int
    pitch: int
    kind: str  # "caption" | "digits"


def _rng(seed: int, language: str, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, LANGUAGES.index(language), SPLITS.index(split), index])


def _caption(language: str, split: str, index: int, rng: np.random.Generator) -> str:
    if split == "train":  # any composition but the held-out ones, any caption group
        attrs = shapes.sample_attributes("train", index, rng)
        groups = range(len(shapes._EN_GROUPS) if language == "en" else len(shapes._ZH_GROUPS))
    else:  # only held-out compositions, in captions that name both shape and colour
        pairs = sorted(shapes.HELDOUT_PAIRS)
        shape, color = pairs[index % len(pairs)]
        size, position = int(rng.integers(len(shapes.SIZES))), int(rng.integers(9))
        attrs = shapes.Attributes(shape, color, size, position)
        groups = (0, 1)
    all_captions = shapes.captions(attrs, rng)
    if language == "en":
        return all_captions[int(rng.choice(groups))]
    return all_captions[shapes.NUM_EN_CAPTIONS + int(rng.choice(groups))]


def _digits(language: str, rng: np.random.Generator) -> tuple[str, str]:
    digits = rng.integers(10, size=int(rng.integers(DIGIT_COUNT[0], DIGIT_COUNT[1] + 1)))
    if language == "en":
        text = " ".join(str(d) for d in digits)
        return text, text
    text = "".join(DIGITS_ZH[d] for d in digits)
    return text, text


def sample_utterance(seed: int, language: str, split: str, index: int) -> Utterance:
    """The text and voice settings of utterance `index` of `split`."""
    if language not in LANGUAGES or split not in SPLITS:
        raise ValueError(f"language must be in {LANGUAGES} and split in {SPLITS}")
    rng = _rng(seed, language, split, index)
    train = split == "train"
    if rng.random() < DIGIT_FRACTION:
        text, transcript = _digits(language, rng)
        kind = "digits"
    else:
        text = _caption(language, split, index, rng)
        transcript, kind = normalize_transcript(text), "caption"
    variant = str(rng.choice(TRAIN_VARIANTS if train else HELDOUT_VARIANTS))
    low, high = (TRAIN_RATES if train else HELDOUT_RATES)[
        rng.integers(len(TRAIN_RATES) if train else 1)
    ]
    return Utterance(
        text=text,
        transcript=transcript,
        voice=f"{BASE_VOICE[language]}+{variant}",
        rate=int(rng.integers(low, high + 1)),
        pitch=int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1)),
        kind=kind,
    )


def render(utterance: Utterance, rng: np.random.Generator) -> np.ndarray:
    """int16 [N] at `audio.MODEL_RATE`: the synthesised speech with silence, noise and gain."""
    speech = audio.from_int16(
        espeak.synthesize(utterance.text, utterance.voice, utterance.rate, utterance.pitch)
    )
    speech = audio.resample(speech, espeak.SAMPLE_RATE, audio.MODEL_RATE)
    pad = (rng.uniform(*SILENCE_SECONDS, size=2) * audio.MODEL_RATE).astype(int)
    signal = np.concatenate([np.zeros(pad[0], np.float32), speech, np.zeros(pad[1], np.float32)])
    power = float(np.mean(np.square(speech))) if speech.size else 1e-6
    snr = rng.uniform(*SNR_DB)
    noise = rng.normal(0.0, np.sqrt(power / 10 ** (snr / 10)), signal.shape)
    mixed = signal + noise.astype(np.float32)
    mixed *= rng.uniform(*PEAK_GAIN) / max(float(np.abs(mixed).max()), 1e-6)
    return audio.to_int16(mixed)


def generate(seed: int, language: str, split: str, index: int) -> tuple[Utterance, np.ndarray]:
    """(utterance, int16 samples at 16 kHz) of example `index` of `split`.

    The text, voice, rate, pitch, silence, noise and gain are a pure function of the arguments;
    eSpeak NG's waveform is not quite: it carries small pitch and phase variations over from
    earlier utterances of the process, and even fresh processes differ slightly (measured:
    53 of 300 Mandarin utterances differ by a few percent of full scale, same length; neither
    `srand` nor `espeak_ng_SetRandSeed` removes it). A built dataset is fixed on disk, so
    training on it stays reproducible."""
    utterance = sample_utterance(seed, language, split, index)
    # A generator of its own for the signal, so the text and voice never depend on it.
    rng = np.random.default_rng([seed, LANGUAGES.index(language), SPLITS.index(split), index, 1])
    return utterance, render(utterance, rng)
