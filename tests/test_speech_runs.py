"""Speech to text end to end (slow): exact resume of a run, and `python -m mmjax.transcribe`
on WAV files of other formats and rates, with its refusals."""

import glob
import json
import os
import shutil
import subprocess
import sys
import wave

import numpy as np
import pytest

from mmjax.data.builtin import speech_builder
from mmjax.main import train as run
from mmjax.metrics import read_metrics
from tests.test_speech import tiny_speech


def config(data_dir):
    c = tiny_speech(data_dir)
    c.speech.max_seconds = 4.0  # the English utterances' length
    c.total_steps, c.checkpoint_every, c.keep_checkpoints = 4, 2, 3
    c.speech.token_dropout = 0.2  # a resumed run drops the same decoder input tokens
    return c


@pytest.mark.slow
def test_speech_run_resumes_exactly(tmp_path, data_dir):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    first = run(config(data_dir), str(full))
    assert first["task/metric_name"] == "cer" and 0 < first["task/chance"] <= 1
    shutil.copytree(full, resumed)
    for name in ["metrics.jsonl", "summary.json"]:
        os.remove(resumed / name)
    for step_dir in glob.glob(str(resumed / "checkpoints" / "4")):
        shutil.rmtree(step_dir)
    second = run(config(data_dir), str(resumed))
    losses = lambda w: [r["train/loss"] for r in read_metrics(str(w)) if "train/loss" in r]
    assert losses(resumed) == losses(full)[2:]
    assert second["task/score"] == first["task/score"]


def _transcribe(workdir, *files):
    cmd = [sys.executable, "-m", "mmjax.transcribe", "--workdir", str(workdir), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_transcribe_cli_reads_any_pcm_wav_and_refuses_bad_input(tmp_path, data_dir):
    workdir = tmp_path / "run"
    c = config(data_dir)
    c.total_steps = 2
    run(c, str(workdir))
    # a validation utterance as 44.1 kHz stereo 16-bit, and as 8 kHz float32 mono
    builder = speech_builder.ensure_built(data_dir, language="en", num_train=64, num_val=32, seed=0)
    clip = speech_builder.decode(builder.as_data_source("validation")[0])["audio"]
    from mmjax.data import audio

    stereo = tmp_path / "stereo.wav"
    x44 = audio.resample(clip, 16000, 44100)
    with wave.open(str(stereo), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(np.repeat(audio.to_int16(x44)[:, None], 2, 1).tobytes())
    from tests.test_wav import fmt_chunk, riff

    flt = tmp_path / "float.wav"
    flt.write_bytes(
        riff(fmt_chunk(3, 1, 8000, 32), audio.resample(clip, 16000, 8000).astype("<f4").tobytes())
    )
    ok = _transcribe(workdir, stereo, flt)
    assert ok.returncode == 0, ok.stderr
    lines = ok.stdout.strip().split("\n")
    assert [line.split("\t")[0] for line in lines] == [str(stereo), str(flt)]

    bad = tmp_path / "notes.wav"
    bad.write_text("not audio")
    out = _transcribe(workdir, stereo, bad)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip().startswith("error:") and "notes.wav" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1

    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"task": "captioning", "rules": []}))
    out = _transcribe(other, stereo)
    assert out.returncode == 2 and out.stdout == "" and "speech_to_text" in out.stderr
