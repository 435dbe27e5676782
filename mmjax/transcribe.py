"""Transcribe WAV files with a trained speech_to_text run.

    python -m mmjax.transcribe --workdir DIR [--beam N] [--step S] FILE.wav [FILE2.wav ...]

Prints one line per file, `FILE<TAB>TEXT`, in the order given. Every file is read and checked
first (PCM 8/16/24/32-bit or float WAV, mono or stereo — mixed down —, any sample rate —
resampled to the model's —, at most `speech.max_seconds` long); if any file or the workdir is
bad, one line `error: ...` goes to stderr, nothing is printed for any file, and the exit status
is 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmjax.data import wav
from mmjax.data.builtin import speech
from mmjax.evaluate import UsageError, _open_checkpoint, load_config
from mmjax.models.speech import clip_samples
from mmjax.tasks.speech_to_text import fit_clip, joint_transcribe
from mmjax.visualize import build_run

TASK = "speech_to_text"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mmjax.transcribe", description=__doc__.split("\n")[0]
    )
    p.add_argument("--workdir", required=True, help="a speech_to_text training workdir")
    p.add_argument("--beam", type=int, default=None, help="beam size (default: the run's)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: newest)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("files", nargs="+", metavar="FILE.wav")
    return p


def read_clips(paths: Sequence[str], sample_rate: int, num_samples: int) -> np.ndarray:
    """float32 [len(paths), num_samples]: every file at `sample_rate`, padded with silence;
    DataError/UsageError naming the first bad file (nothing is transcribed then)."""
    clips = []
    for path in paths:
        audio = wav.read_mono(path, sample_rate)
        if len(audio) > num_samples:
            raise UsageError(
                f"{path}: {len(audio) / sample_rate:.1f} s is longer than the "
                f"{num_samples / sample_rate:.1f} s clips the model reads; cut it into pieces"
            )
        clips.append(fit_clip(audio, num_samples))
    return np.stack(clips)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        config, kind = load_config(args.workdir)
        if kind != "train" or config.get("task") != TASK:
            raise UsageError(
                f"{args.workdir} is a workdir of task={config.get('task')!r}; transcribe reads a "
                "speech_to_text run (python train.py --config configs/speech_to_text.py)"
            )
        if (args.beam is not None and args.beam < 1) or args.batch_size < 1:
            raise UsageError("--beam and --batch-size must be >= 1")
        clips = read_clips(args.files, config.speech.sample_rate, clip_samples(config))
        ckpt, step = _open_checkpoint(args.workdir, args.step)
        run = build_run(args.workdir, config, ckpt, step, newest=args.step is None)
    except (ValueError, OSError) as e:  # UsageError, DataError and ConfigError are ValueErrors
        print("error: " + " ".join(str(e).split()), file=sys.stderr)
        return 2
    tok = run.tokenizer
    beam = args.beam or run.config.speech.beam_size
    length = run.config.data.text_length

    rescore = run.config.speech.get("ctc_rescore", 0.0)  # as the run's evaluation decodes

    @jax.jit
    def decode(params, audio_BN):
        return joint_transcribe(run.model, params, audio_BN, length, beam, tok, rescore)[0]

    lines = []
    with run.context():
        for start in range(0, len(clips), args.batch_size):
            batch = clips[start : start + args.batch_size]
            ids = np.asarray(decode(run.params, jnp.asarray(batch)))
            lines += [speech.normalize_transcript(tok.decode(row)) for row in ids]
    for path, text in zip(args.files, lines, strict=True):
        print(f"{path}\t{text}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
