"""`python -m mmjax.bench train`: analytic FLOPs, open_clip config mapping, and one tiny run."""

import json
import os

import numpy as np
import pytest

from mmjax import runtime
from mmjax.bench import flops, train_report, usage
from mmjax.bench.__main__ import main
from mmjax.interop.open_clip_config import (
    load_open_clip_config,
    mmjax_config_from_open_clip,
    open_clip_config_from_mmjax,
)

# 32 px images in 8 px patches (16 patches + class token), width 64 (one 64-wide head), 2 layers;
# text context 16, width 64, 2 heads, 2 layers; MLPs 4 × 64 = 256; embeddings of 32.
TINY = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 100, "width": 64, "heads": 2, "layers": 2},
}
BATCH = 16

# Hand-derived forward FLOPs per sample of TINY (2 per multiply-add):
#   per layer, N tokens: 2·N·(4·64² + 2·64·256) projections + 4·N²·64 attention
IMAGE = (
    2 * 16 * (8 * 8 * 3) * 64  # patch embedding: 393_216
    + 2 * (2 * 17 * 49_152 + 4 * 17 * 17 * 64)  # 2 layers of 17 tokens: 3_490_304
    + 2 * 64 * 32  # projection of the class token: 4_096
)  # 3_887_616
TEXT = 2 * (2 * 16 * 49_152 + 4 * 16 * 16 * 64) + 2 * 64 * 32  # 3_280_896
LOGITS = 2 * BATCH * 32  # a 16×16×32 matmul, shared by 16 samples: 1_024

# open_clip's ViT-B-16 (model_configs/ViT-B-16.json), written out so open_clip is not needed.
VIT_B_16 = {
    "embed_dim": 512,
    "vision_cfg": {"image_size": 224, "layers": 12, "width": 768, "patch_size": 16},
    "text_cfg": {
        "context_length": 77,
        "vocab_size": 49408,
        "width": 512,
        "heads": 8,
        "layers": 12,
    },
}


def test_tiny_model_flops_match_hand_count():
    config, vocab = mmjax_config_from_open_clip(TINY)
    assert vocab == 100
    f = flops.model_flops(config, BATCH)
    assert f["image_forward_per_sample"] == IMAGE == 3_887_616
    assert f["text_forward_per_sample"] == TEXT == 3_280_896
    assert f["logits_forward_per_sample"] == LOGITS
    assert f["train_per_step"] == 3 * BATCH * (IMAGE + TEXT + LOGITS) == 344_137_728


def test_vit_b_16_flops_match_open_clip_profile():
    # open_clip's docs/model_profile.csv: ViT-B-16 gflops 41.09, image_gflops 35.13,
    # text_gflops 5.96 per sample, i.e. 2 × multiply-adds, logits excluded.
    config, vocab = mmjax_config_from_open_clip(VIT_B_16)
    f = flops.model_flops(config, 1)
    assert round(f["image_forward_per_sample"] / 1e9, 2) == 35.13
    assert round(f["text_forward_per_sample"] / 1e9, 2) == 5.96
    image_plus_text = f["image_forward_per_sample"] + f["text_forward_per_sample"]
    assert round(image_plus_text / 1e9, 2) == 41.09
    m = config.model
    assert (m.image.num_heads, m.image.mlp_dim, m.image.pool, m.image.posemb) == (
        12,
        3072,
        "cls",
        "learn",
    )
    assert (m.text.num_heads, m.text.mlp_dim, m.text.causal, vocab) == (8, 2048, True, 49408)
    assert (config.data.image_size, config.data.text_length) == (224, 77)
    assert config.optim.text_frozen_steps == 0 and config.loss == "softmax"


@pytest.mark.parametrize(
    ("section", "field", "value"),
    [
        ("vision_cfg", "timm_model_name", "vit_base_patch16_224"),
        ("vision_cfg", "attentional_pool", True),
        ("vision_cfg", "layers", [3, 4, 6, 3]),
        ("vision_cfg", "pool_type", "avg"),
        ("text_cfg", "hf_model_name", "roberta-base"),
        ("text_cfg", "no_causal_mask", True),
        ("text_cfg", "not_an_option", 1),
        (None, "multimodal_cfg", {}),
    ],
)
def test_unrepresentable_open_clip_options_are_rejected_by_name(section, field, value):
    cfg = json.loads(json.dumps(TINY))
    (cfg[section] if section else cfg)[field] = value
    with pytest.raises(ValueError, match=field):
        mmjax_config_from_open_clip(cfg)


def test_open_clip_config_round_trip_and_loading(tmp_path):
    config, vocab = mmjax_config_from_open_clip({**VIT_B_16, "init_logit_bias": -10})
    assert config.loss == "sigmoid"
    back, vocab_back = mmjax_config_from_open_clip(open_clip_config_from_mmjax(config, vocab))
    assert back.model.to_dict() == config.model.to_dict() and vocab_back == vocab
    assert back.loss == "sigmoid"
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    assert load_open_clip_config(str(path)) == TINY
    with pytest.raises(FileNotFoundError):
        load_open_clip_config(str(tmp_path / "missing.json"))


@pytest.mark.slow
def test_train_bench_json(tmp_path, capsys):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    args = ["train", "--open-clip-config", str(path), "--batch", str(BATCH)]
    args += ["--dtype", "float32,bfloat16", "--rounds", "1", "--steps", "2", "--warmup", "1"]
    args += ["--profile", str(tmp_path / "profile"), "--profile-steps", "2"]
    assert main([*args, "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    r = json.loads(out[-1])
    for key in ("model", "batch", "ceilings_flops", "peak_flops", "variants", "other_cpu_load"):
        assert key in r
    assert r["other_cpu_load"] is None or r["other_cpu_load"] >= 0
    assert r["batch"] == BATCH and r["devices"] == 1 and "speedup_vs_open_clip" not in r
    assert r["model"]["image_heads"] == 1 and r["model"]["vocab_size"] == 100
    assert r["model_flops_per_sample"]["forward"] == IMAGE + TEXT + LOGITS
    assert set(r["ceilings_flops"]) == {"float32", "bfloat16"}
    assert all(c > 1e8 for c in r["ceilings_flops"].values())
    assert [(v["framework"], v["dtype"]) for v in r["variants"]] == [
        ("mmjax", "float32"),
        ("mmjax", "bfloat16"),
    ]
    for v in r["variants"]:
        assert len(v["step_s"]) == 2 and 0 < v["step_s_min"] <= v["step_s_median"]
        assert v["samples_per_s"] == pytest.approx(BATCH / v["step_s_median"])
        assert v["model_flops_per_step"] == 344_137_728
        assert v["model_flops_per_s"] == pytest.approx(344_137_728 / v["step_s_median"])
        assert 0 < v["mfu"] < 1.5
        assert v["compile_s"] > 0 and v["temp_bytes"] >= 0
        # Parameters (~225k float32) and Adam's two moments are the step's main arguments.
        assert v["argument_bytes"] > 3 * 4 * v["param_count"] > 3 * 4 * 200_000
        # XLA counts element-wise and optimizer work too, and skips the patch embedding's input
        # gradient (1.8% of these model FLOPs). Element-wise work per token is O(D + M) against
        # O(D·M) for the matmuls, ~5% at width 64 plus ~1% for AdamW over 225k parameters: XLA's
        # count lies in [0.95, 1.25] × the model FLOPs (1.06 measured for float32; bfloat16
        # adds dtype conversions).
        assert 0.95 < v["xla_over_model"] < 1.25, v
        # The process's CPU time over the timed steps: user time at least, at most all cores.
        c = v["cpu_per_step"]
        assert set(c) == {"user_s", "sys_s", "minor_faults"} and c["user_s"] > 0
        assert c["sys_s"] >= 0 and c["minor_faults"] >= 0
        assert 0 < v["cores_busy"] <= (os.cpu_count() or 1) * 1.05
        # --profile: the train step's passes, from a trace kept under DIR/<dtype>.
        prof = v["profile"]
        assert prof["steps"] == 2 and prof["trace_dir"] == str(tmp_path / "profile" / v["dtype"])
        passes = set(prof["by_pass_kind"])
        assert {"forward/gemm", "backward/gemm", "optimizer/elementwise"} <= passes


@pytest.mark.slow  # the pipeline subcommand end to end, with a train step (~11 s)
def test_pipeline_bench_json(tmp_path, capsys):
    args = ["pipeline", "--batch", "16", "--batches", "2", "--threads", "0,1", "--workers", "0"]
    args += ["--step-steps", "1"]
    args += ["--stage-examples", "8", "--override", f"data.data_dir={tmp_path}"]
    args += ["--override", "data.num_train=64", "--override", "data.num_val=8"]
    args += ["--override", "data.image_size=32", "--override", "data.augment=random_resized_crop"]
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["dataset"] == "shapes" and r["augment"] == "random_resized_crop"
    assert r["batch"] == 16 and r["cores"] >= 1
    assert set(r["stages_ms_per_image"]) == {"decode", "augment", "tokenize"}
    assert all(ms > 0 for ms in r["stages_ms_per_image"].values())
    assert [run["threads"] for run in r["runs"]] == [0, 1]
    for run in r["runs"]:
        assert run["images_per_s"] > 0
        assert run["images_per_s_per_core"] == pytest.approx(run["images_per_s"])  # 1 core used
    # The step the loader feeds: the config's model at its dtype, on the same batch size.
    assert r["step"]["dtype"] == "float32" and r["step"]["step_s"] > 0
    assert r["step"]["samples_per_s"] == pytest.approx(16 / r["step"]["step_s"])


@pytest.mark.slow
def test_pipeline_bench_measures_worker_processes(tmp_path, capsys):
    args = ["pipeline", "--batch", "16", "--batches", "2", "--threads", "", "--workers", "1"]
    args += ["--step-steps", "0", "--stage-examples", "4"]
    args += ["--override", f"data.data_dir={tmp_path}", "--override", "data.num_train=64"]
    args += ["--override", "data.num_val=8", "--override", "data.image_size=32"]
    assert main([*args, "--json"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [(run["threads"], run["workers"]) for run in r["runs"]] == [(0, 1)]
    assert r["runs"][0]["images_per_s"] > 0 and r["step"] is None


@pytest.mark.slow
@pytest.mark.interop
def test_vs_open_clip_runs_each_peer_setting_in_its_own_process(tmp_path, capsys, monkeypatch):
    """The peer at float32 and amp_bf16, each a child process with a user's environment (no JAX
    runtime, none of our allocator settings even when the benchmark has them), the same model."""
    pytest.importorskip("open_clip")
    keys = ("LD_PRELOAD", "MIMALLOC_PURGE_DELAY", "GLIBC_TUNABLES")
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    ours = runtime.tuned_environment(dict(os.environ, MMJAX_MALLOC_TUNING="1")) or {}
    for key in keys:
        if key in ours:
            monkeypatch.setenv(key, ours[key])
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    args = ["train", "--open-clip-config", str(path), "--batch", str(BATCH), "--json"]
    args += ["--dtype", "float32", "--rounds", "1", "--steps", "1", "--warmup", "1"]
    assert main([*args, "--vs-open-clip", "--peer-settings", "float32,amp_bf16"]) == 0
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    peers = [v for v in r["variants"] if v["framework"] == "open_clip"]
    assert [v["dtype"] for v in peers] == ["float32", "amp_bf16"]
    ours = r["variants"][0]
    for v in peers:
        assert v["conditions"]["allocator"] == "glibc (default)", v["conditions"]
        assert not v["conditions"]["jax_loaded"]
        assert v["param_count"] in (ours["param_count"], ours["param_count"] - 1)  # no bias
        assert len(v["step_s"]) == 1 and v["step_s"][0] > 0
        assert v["cpu_per_step"]["user_s"] > 0 and v["cores_busy"] > 0  # the peer's own usage
    assert set(r["speedup_vs_open_clip"]["float32"]) == {"float32", "amp_bf16"}
    assert r["best_vs_best"]["open_clip"] in ("float32", "amp_bf16")
    assert r["best_vs_best"]["speedup"] > 0
    with pytest.raises(ValueError, match="peer setting"):
        main([*args, "--vs-open-clip", "--peer-settings", "fp8"])


def test_report_describes_a_resnet_tower_by_its_stages(capsys):
    """A ResNet has no patches or depth: the report names its stages, stem width and norm."""
    rn = {**VIT_B_16, "vision_cfg": {"image_size": 224, "layers": [3, 4, 6, 3], "width": 64}}
    config, vocab = mmjax_config_from_open_clip(rn)
    record = train_report.model_record("RN50", "open_clip", config, vocab)
    assert record["image_kind"] == "resnet" and record["image_layers"] == [3, 4, 6, 3]
    assert record["image_width"] == 64 and "patch_size" not in record
    vit = train_report.model_record("B16", "open_clip", mmjax_config_from_open_clip(VIT_B_16)[0], 1)
    assert vit["image_kind"] == "vit" and vit["patch_size"] == 16 and vit["image_depth"] == 12
    assert "blocks (3, 4, 6, 3), stem width 64" in train_report._image_tower(record)


def test_process_usage_counts_cpu_time_and_page_faults():
    """What the bench bills a step besides its time: CPU seconds and the page faults of memory
    touched for the first time (a fresh 64 MiB buffer, written once)."""
    start = usage.process_usage()
    buf = np.empty(64 << 20, np.uint8)
    buf[::4096] = 1  # one write per 4 KiB page
    used = usage.usage_since(start)
    assert set(used) == set(usage.USAGE_KEYS)
    assert used["minor_faults"] >= 1 and used["user_s"] + used["sys_s"] > 0
