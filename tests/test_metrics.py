"""MetricWriter: metrics.jsonl, resume, non-finite encoding, TensorBoard, plots, summary, bar."""

import glob
import json
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto.event_pb2 import Event

from mmjax.metrics import MetricWriter, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _strict_loads(line):
    def reject(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(line, parse_constant=reject)


def _jsonl_lines(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return f.read().splitlines()


def _tb_events(workdir):
    """Every event in workdir/tb, parsed from the TFRecord framing (length, crc, data, crc)."""
    events = []
    for path in glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*")):
        data = open(path, "rb").read()
        pos = 0
        while pos < len(data):
            (n,) = struct.unpack("<Q", data[pos : pos + 8])
            events.append(Event.FromString(data[pos + 12 : pos + 12 + n]))
            pos += 12 + n + 4
    return events


def _tb_scalars(workdir):
    return [(v.tag, e.step, v.simple_value) for e in _tb_events(workdir) for v in e.summary.value]


def _write_steps(workdir, steps, **kwargs):
    with MetricWriter(workdir, total_steps=10, progress=False, **kwargs) as w:
        for s in steps:
            w.write(s, {"train/loss": 1.0 / s})


def test_jsonl_round_trip_plain_types(tmp_path):
    w = MetricWriter(str(tmp_path), total_steps=10, progress=False)
    w.write(
        np.int64(3),
        {
            "train/loss": jnp.float32(0.5),
            "train/lr": np.float64(1e-3),
            "train/bf16": jnp.asarray(2.0, jnp.bfloat16),
            "train/seen": jnp.asarray(96, jnp.int32),
            "train/one": np.ones((1,), np.float32),
            "train/py": 7,
        },
    )
    w.close()
    (line,) = _jsonl_lines(tmp_path)
    row = _strict_loads(line)
    assert next(iter(row)) == "step"
    assert row == {
        "step": 3,
        "train/loss": 0.5,
        "train/lr": 1e-3,
        "train/bf16": 2.0,
        "train/seen": 96,
        "train/one": 1.0,
        "train/py": 7,
    }
    assert type(row["train/seen"]) is int and type(row["train/loss"]) is float
    assert read_metrics(str(tmp_path)) == [row]


def test_rejects_arrays_and_reserved_step(tmp_path):
    with MetricWriter(str(tmp_path), total_steps=1, progress=False) as w:
        with pytest.raises(ValueError, match="train/vec"):
            w.write(1, {"train/vec": np.zeros(3)})
        with pytest.raises(ValueError, match="reserved"):
            w.write(1, {"step": 1})


def test_non_finite_stored_as_strings_and_decoded(tmp_path):
    with MetricWriter(str(tmp_path), total_steps=1, progress=False) as w:
        w.write(1, {"a": float("nan"), "b": np.float32(np.inf), "c": jnp.float32(-jnp.inf)})
    (line,) = _jsonl_lines(tmp_path)
    assert _strict_loads(line) == {"step": 1, "a": "nan", "b": "inf", "c": "-inf"}
    (row,) = read_metrics(str(tmp_path))
    assert math.isnan(row["a"]) and row["b"] == math.inf and row["c"] == -math.inf


def test_non_main_writes_nothing(tmp_path, capsys):
    workdir = str(tmp_path / "run")
    w = MetricWriter(workdir, total_steps=5, batch_size=8, is_main=False)
    w.write(1, {"train/loss": 1.0})
    w.progress(1, loss=1.0)
    w.write_summary({"train/loss": 1.0})
    w.plot()
    w.close()
    assert not os.path.exists(workdir)
    assert capsys.readouterr().err == ""


def test_resume_drops_rows_after_start_step(tmp_path):
    workdir = str(tmp_path)
    _write_steps(workdir, [1, 2, 3, 4, 5])
    # Resumed from the checkpoint at step 3: steps 4 and 5 will be logged again.
    _write_steps(workdir, [4, 5, 6], start_step=3)
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]
    # TensorBoard hides the old steps >= 4 when it sees a session START at step 4.
    assert any(e.step == 4 and e.session_log.status == 1 for e in _tb_events(workdir))
    assert not [f for f in os.listdir(workdir) if f.startswith(".tmp")]


def test_truncated_last_line_skipped_and_repaired(tmp_path):
    workdir = str(tmp_path)
    _write_steps(workdir, [1, 2])
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "train/lo')  # Killed mid-write.
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2]
    # A restart appends on a fresh line instead of gluing onto the partial one.
    _write_steps(workdir, [3])
    assert [r["step"] for r in read_metrics(workdir)] == [1, 2, 3]


def test_corrupt_middle_line_raises(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        read_metrics(str(tmp_path))


def test_tensorboard_events(tmp_path):
    workdir = str(tmp_path)
    _write_steps(workdir, [1, 2])
    assert sorted(_tb_scalars(workdir)) == [("train/loss", 1, 1.0), ("train/loss", 2, 0.5)]


def test_summary_json(tmp_path):
    summary = {"zeroshot/top1": np.float32(0.25), "steps": 10, "eval": {"loss": jnp.float32(2.0)}}
    with MetricWriter(str(tmp_path), total_steps=1, progress=False) as w:
        w.write_summary(summary)
    text = (tmp_path / "summary.json").read_text()
    expected = {"eval": {"loss": 2.0}, "steps": 10, "zeroshot/top1": 0.25}
    assert text == json.dumps(expected, indent=2, sort_keys=True) + "\n"


def test_plots_are_pngs(tmp_path):
    workdir = str(tmp_path)
    with MetricWriter(workdir, total_steps=10, progress=False) as w:
        for s in range(1, 6):
            w.write(s, {"train/loss": 2.0 / s})
        w.plot()
        assert os.listdir(tmp_path / "plots") == ["loss.png"]
        w.write(5, {"eval/loss": 1.0, "zeroshot/top1": float("nan"), "retrieval/i2t@1": 0.1})
        w.plot()
    for name in ("loss.png", "eval.png"):
        assert (tmp_path / "plots" / name).read_bytes().startswith(PNG_MAGIC)


def test_progress_bar_postfix_and_close_twice(tmp_path, capsys):
    w = MetricWriter(str(tmp_path), total_steps=4, start_step=0, batch_size=32)
    w.progress(1, loss=2.0)
    w.progress(3, loss=jnp.float32(1.5))
    w.close()
    w.close()
    err = capsys.readouterr().err
    assert "3/4" in err and "loss=1.5" in err and "samples/s=" in err
    with pytest.raises(RuntimeError, match="after close"):
        w.write(4, {"train/loss": 1.0})
