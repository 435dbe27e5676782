"""open_clip's training step in a process of its own, driven by `mmjax.bench train --vs-open-clip`.

A peer measured inside the benchmark's process would share its JAX runtime, its threads and its
allocator setting (`mmjax.runtime`); a user runs open_clip in a plain Python process. So each peer
setting (precision, torch.compile) is a child process that imports neither JAX nor mmjax's
models, started with the environment the user would have (mmjax's allocator setting only with
`--peer-malloc-tuning`). The parent sends one line per measurement and the child times the steps
itself, so pipe latency is never billed to the peer:

    parent -> child   {"steps": N}            (N >= 0; N = 0 ends the child)
    child  -> parent  {"times": [s, ...], "loss": float, "usage": {user_s, sys_s, minor_faults}}
                      (the child's CPU seconds and page faults over those steps)
The first line the child writes is {"ready": true, "param_count": ..., "device": ..., ...} once the
model is built (and, under torch.compile, compiled by one untimed step).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import ml_collections
import numpy as np

from mmjax import runtime
from mmjax.bench import open_clip_peer, usage


@dataclasses.dataclass(frozen=True)
class PeerSetting:
    precision: str  # one of open_clip_peer.PRECISIONS
    compile: bool = False

    @property
    def name(self) -> str:
        return self.precision + ("+compile" if self.compile else "")


def parse_settings(text: str) -> list[PeerSetting]:
    """ "float32,amp_bf16,amp_bf16+compile" -> settings (what --peer-settings accepts)."""
    settings = []
    for item in (t.strip() for t in text.split(",") if t.strip()):
        precision, _, extra = item.partition("+")
        if precision not in open_clip_peer.PRECISIONS or extra not in ("", "compile"):
            choices = ", ".join(open_clip_peer.PRECISIONS)
            raise ValueError(f"peer setting {item!r}: use <{choices}>[+compile], comma-separated")
        settings.append(PeerSetting(precision, extra == "compile"))
    if not settings:
        raise ValueError("--peer-settings is empty")
    return settings


class PeerProcess:
    """One open_clip setting in a child process; `run(steps)` returns the seconds of each step
    and the child's usage over them (`mmjax.bench.usage.process_usage` keys)."""

    def __init__(
        self,
        setting: PeerSetting,
        open_clip_cfg: dict,
        config: ml_collections.ConfigDict,
        batch: dict[str, np.ndarray],
        threads: int | None,
        use_gpu: bool,
        malloc_tuning: bool,
    ):
        self.setting = setting
        self._dir = tempfile.TemporaryDirectory(prefix="mmjax-peer-")
        batch_path = os.path.join(self._dir.name, "batch.npz")
        np.savez(batch_path, image=batch["image"], tokens=batch["tokens"])
        spec = {
            "open_clip_cfg": open_clip_cfg,
            "optim": config.optim.to_dict(),
            "total_steps": int(config.total_steps),
            "batch": batch_path,
            "threads": threads,
            "use_gpu": use_gpu,
            "precision": setting.precision,
            "compile": setting.compile,
        }
        env = dict(os.environ)
        if not malloc_tuning:  # as a user's own process would run: no allocator setting of ours
            env = runtime.without_tuning(env)
        self.allocator = runtime.allocator_in_use(env)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "mmjax.bench.peer_worker", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        ready = self._read()
        self.param_count, self.device = ready["param_count"], ready["device"]
        self.threads, self.setup_s = ready["threads"], ready["setup_s"]
        self.jax_loaded = ready["jax_loaded"]
        self.cpu_s = 0.0

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            code = self._proc.wait()
            raise RuntimeError(f"open_clip peer {self.setting.name} exited with code {code}")
        return json.loads(line)

    def run(self, steps: int) -> tuple[list[float], dict[str, float]]:
        self._proc.stdin.write(json.dumps({"steps": steps}) + "\n")
        self._proc.stdin.flush()
        reply = self._read()
        self.loss = reply["loss"]
        used = reply["usage"]
        self.cpu_s += used["user_s"] + used["sys_s"]  # not "other load" (benchmark's noise)
        return reply["times"], used

    def close(self) -> None:
        if self._proc.poll() is None:
            self._proc.stdin.write(json.dumps({"steps": 0}) + "\n")
            self._proc.stdin.flush()
            self._proc.wait(timeout=60)
        self._dir.cleanup()


def serve(spec: dict) -> None:
    """The child's side: build the peer, then answer each {"steps": N} until N = 0."""
    start = time.perf_counter()
    batch = np.load(spec["batch"])
    config = ml_collections.ConfigDict({"optim": spec["optim"], "total_steps": spec["total_steps"]})
    peer = open_clip_peer.build_peer(
        spec["open_clip_cfg"],
        config,
        batch["image"],
        batch["tokens"],
        spec["threads"],
        spec["use_gpu"],
        precision=spec["precision"],
        compile_model=spec["compile"],
    )
    if spec["compile"]:
        peer.step()  # torch.compile compiles on the first call: not a timed step
    ready = {
        "ready": True,
        "param_count": peer.param_count,
        "device": peer.device,
        "threads": peer.threads,
        "setup_s": time.perf_counter() - start,
        "jax_loaded": "jax" in sys.modules,  # a user's open_clip process has no JAX runtime
    }
    print(json.dumps(ready), flush=True)
    for line in sys.stdin:
        steps = json.loads(line)["steps"]
        if steps <= 0:
            return
        times, loss, start = [], float("nan"), usage.process_usage()
        for _ in range(steps):
            t = time.perf_counter()
            loss = peer.step()  # returns loss.item(): the step is finished
            times.append(time.perf_counter() - t)
        used = usage.usage_since(start)
        print(json.dumps({"times": times, "loss": loss, "usage": used}), flush=True)


if __name__ == "__main__":
    serve(json.loads(sys.argv[1]))
