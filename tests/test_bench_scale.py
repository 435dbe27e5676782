"""`python -m mmjax.bench scale`: FSDP divides the train state; overrides are checked."""

import argparse

import pytest

from mmjax.bench import loss, scale
from tests.test_bench import TINY

pytestmark = pytest.mark.multidevice


def scale_args(tmp_path, *overrides):
    path = tmp_path / "tiny.json"
    path.write_text(__import__("json").dumps(TINY))
    return argparse.Namespace(
        config=None,
        open_clip_config=str(path),
        devices=8,
        global_batch=32,
        override=list(overrides),
        json=True,
    )


@pytest.mark.slow
def test_fsdp_divides_state_bytes_by_the_device_count(tmp_path):
    dp = scale.run(scale_args(tmp_path, "mesh.data=-1"))
    fsdp = scale.run(scale_args(tmp_path, "mesh.data=1", "mesh.fsdp=-1", "loss_impl=chunked"))
    assert dp["mesh"] == {"data": 8, "fsdp": 1, "tensor": 1}
    assert fsdp["mesh"] == {"data": 1, "fsdp": 8, "tensor": 1}
    assert dp["state_bytes_per_device"] == dp["state_bytes_total"]  # replicated
    # Matrices split 8 ways; biases and LayerNorm vectors (no `embed` axis) stay replicated.
    assert fsdp["state_bytes_per_device"] < 0.15 * fsdp["state_bytes_total"]
    assert fsdp["argument_bytes"] < dp["argument_bytes"] / 4
    # Unscanned, XLA's count of the partitioned step covers the model FLOPs plus element-wise
    # work: at least the matmuls, not wildly more.
    assert 1.0 <= dp["xla_flops_per_device"] / dp["model_flops_per_device"] < 2.0


def test_overrides_are_validated(tmp_path):
    with pytest.raises(ValueError, match=r"no field 'model\.nope'"):
        scale.run(scale_args(tmp_path, "model.nope=1"))
    with pytest.raises(ValueError, match="expected key=value"):
        scale.run(scale_args(tmp_path, "loss_impl"))


def test_bench_loss_reports_chunked_below_naive():
    def temp(impl):
        args = argparse.Namespace(
            devices=8, local_batch=128, dim=32, impl=impl, kind="softmax", json=True
        )
        result = loss.run(args)
        assert result["global_batch"] == 1024 and result["compile_s"] > 0
        return result["temp_bytes"]

    assert temp("chunked") < temp("naive") / 3
