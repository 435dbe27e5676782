"""Speech synthesis with eSpeak NG through ctypes: text -> int16 samples at 22,050 Hz.

The library and its voice data come from the `espeakng-loader` wheel (no system install).
libespeak-ng keeps one global synthesiser per process and is not thread-safe, so everything here
runs in the calling thread, one utterance at a time, under a lock; a process that wants
parallel synthesis uses worker processes.

Voices are named as eSpeak names them: a language ("en-us", "cmn") optionally with a variant
("en-us+f3", "cmn+m2"; the variants are the files of `espeak-ng-data/voices/!v`).
"""

from __future__ import annotations

import ctypes
import functools
import os
import threading

import numpy as np

SAMPLE_RATE = 22_050  # what eSpeak NG synthesises at

# espeak_AUDIO_OUTPUT: AUDIO_OUTPUT_SYNCHRONOUS (samples go to the callback, Synth returns when
# done); espeak_PARAMETER ids; espeak_POSITION_TYPE POS_CHARACTER; flag espeakCHARS_UTF8.
_AUDIO_OUTPUT_SYNCHRONOUS = 2
_RATE, _PITCH = 1, 3
_POS_CHARACTER = 1
_CHARS_UTF8 = 1
_EE_OK = 0

# int callback(short *wav, int numsamples, espeak_EVENT *events): 0 = continue.
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int, ctypes.c_void_p
)


class _Engine:
    """The process's initialised libespeak-ng and the buffer its callback fills."""

    def __init__(self):
        import espeakng_loader  # imported here: only building the dataset needs it

        self.data_path = espeakng_loader.get_data_path()
        self.lib = ctypes.CDLL(espeakng_loader.get_library_path())
        self.lib.espeak_Initialize.restype = ctypes.c_int
        rate = self.lib.espeak_Initialize(_AUDIO_OUTPUT_SYNCHRONOUS, 0, self.data_path.encode(), 0)
        if rate != SAMPLE_RATE:
            raise RuntimeError(f"libespeak-ng initialised at {rate} Hz, expected {SAMPLE_RATE}")
        self.chunks: list[np.ndarray] = []
        self.callback = _CALLBACK(self._collect)  # kept referenced: C holds the pointer
        self.lib.espeak_SetSynthCallback(self.callback)
        self.lock = threading.Lock()

    def _collect(self, wav, num_samples, events) -> int:
        if num_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0


@functools.cache
def _engine() -> _Engine:
    return _Engine()


def variants() -> tuple[str, ...]:
    """The voice variants eSpeak NG ships ("f3", "m1", "klatt", ...), sorted."""
    path = os.path.join(_engine().data_path, "voices", "!v")
    return tuple(sorted(os.listdir(path)))


def synthesize(text: str, voice: str, rate: int = 175, pitch: int = 50) -> np.ndarray:
    """int16 samples at SAMPLE_RATE of `text` spoken by `voice` at `rate` words per minute
    (eSpeak's range 80..450) and base `pitch` (0..100). ValueError for an unknown voice."""
    if not 80 <= rate <= 450 or not 0 <= pitch <= 100:
        raise ValueError(f"rate must be in 80..450 and pitch in 0..100, got {rate=} {pitch=}")
    engine = _engine()
    _, _, variant = voice.partition("+")
    with engine.lock:
        # eSpeak ignores an unknown variant (it speaks the language's default): checked here.
        known = not variant or variant in variants()
        if not known or engine.lib.espeak_SetVoiceByName(voice.encode()) != _EE_OK:
            raise ValueError(
                f"unknown eSpeak voice {voice!r}; use a language such as 'en-us' or 'cmn', "
                f"optionally with a variant ('en-us+f3'; variants: "
                f"{', '.join(variants()[:8])}, ...)"
            )
        engine.lib.espeak_SetParameter(_RATE, int(rate), 0)
        engine.lib.espeak_SetParameter(_PITCH, int(pitch), 0)
        engine.chunks = []
        data = text.encode("utf-8")
        status = engine.lib.espeak_Synth(
            data, len(data) + 1, 0, _POS_CHARACTER, 0, _CHARS_UTF8, None, None
        )
        engine.lib.espeak_Synchronize()
        if status != _EE_OK:
            raise RuntimeError(f"espeak_Synth failed ({status}) on {text!r}")
        chunks, engine.chunks = engine.chunks, []
    return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
