"""The human-readable report of `python -m mmjax.bench train` (the `--json` keys are documented
in `mmjax/bench/train.py`)."""

from mmjax.bench import common


def _g(x: float | None, unit: str = "") -> str:
    return "n/a" if x is None else f"{x / 1e9:.3g} G{unit}"


def model_record(name: str, source: str, config, vocab: int) -> dict:
    """The `model` object of the report: the fields that describe the benchmarked towers (a
    ResNet image tower has stages and a stem width where a ViT has patches and depth)."""
    img, txt = config.model.image, config.model.text
    image = {"image_kind": img.kind, "image_width": img.width, "image_heads": img.num_heads}
    if img.kind == "resnet":
        image.update(
            image_layers=list(img.layers), image_width=img.resnet_width, image_norm=img.norm
        )
    else:
        image.update(patch_size=img.patch_size, image_depth=img.depth, image_mlp=img.mlp_dim)
    return {
        "name": name,
        "source": source,
        "loss": config.loss,
        "image_size": config.data.image_size,
        **image,
        "text_length": config.data.text_length,
        "text_width": txt.width,
        "text_depth": txt.depth,
        "text_heads": txt.num_heads,
        "text_mlp": txt.mlp_dim,
        "vocab_size": vocab,
        "embed_dim": config.model.embed_dim,
    }


def _image_tower(m: dict) -> str:
    if m["image_kind"] == "resnet":
        return (
            f"ResNet {m['image_size']}px, blocks {tuple(m['image_layers'])}, stem width "
            f"{m['image_width']}, {m['image_norm']} norm, attention pool {m['image_heads']} heads"
        )
    return (
        f"ViT {m['image_size']}px/{m['patch_size']} {m['image_depth']}x{m['image_width']} "
        f"({m['image_heads']} heads, mlp {m['image_mlp']})"
    )


def print_report(r: dict) -> None:
    m, f = r["model"], r["model_flops_per_sample"]
    print(
        f"model {m['name']} ({m['source']}, {m['loss']} loss): image {_image_tower(m)}; text ctx "
        f"{m['text_length']} {m['text_depth']}x{m['text_width']} ({m['text_heads']} heads, mlp "
        f"{m['text_mlp']}, vocab {m['vocab_size']}); embed {m['embed_dim']}"
    )
    print(
        f"batch {r['batch']} on {r['devices']} {r['platform']} device(s); {r['rounds']} rounds x "
        f"{r['steps']} steps per variant after {r['warmup']} warm-up steps"
    )
    print(
        f"model FLOPs per sample, forward: image {_g(f['image'])}, text {_g(f['text'])}, logits "
        f"{_g(f['logits'])}, total {_g(f['forward'])}; train step = 3 x forward x batch"
    )
    others = r["other_cpu_load"]
    if others is not None:
        noisy = "; the times are noisy" if others > 0.1 else ""
        print(f"other processes kept {others:.2f} of {r['cpu_count']} CPUs busy meanwhile{noisy}")
    print(f"mmjax variants: this process, allocator {r['allocator']}")
    for v in r["variants"]:
        if v["conditions"]:
            c = v["conditions"]
            print(
                f"open_clip {v['dtype']}: own process, {c['threads']} torch threads, "
                f"allocator {c['allocator']}"
            )
    print(
        "GEMM ceiling (2048^3, one device, median over rounds): "
        + ", ".join(f"{d} {c / 1e9:.1f} GFLOP/s" for d, c in r["ceilings_flops"].items())
        + f"; MFU denominator: {r['peak_source']}"
    )
    head = (
        f"{'variant':<28}{'step ms':>9}{'min ms':>8}{'samples/s':>11}{'GFLOP/step':>12}"
        f"{'XLA/model':>10}{'GFLOP/s':>9}{'MFU':>7}{'compile s':>10}{'temp':>11}{'args':>11}"
        f"{'params':>11}"
    )
    print(head)
    for v in r["variants"]:
        ratio = "n/a" if v["xla_over_model"] is None else f"{v['xla_over_model']:.2f}"
        compile_s = "n/a" if v["compile_s"] is None else f"{v['compile_s']:.1f}"
        print(
            f"{v['framework'] + ' ' + v['dtype']:<28}{v['step_s_median'] * 1e3:>9.1f}"
            f"{v['step_s_min'] * 1e3:>8.1f}"
            f"{v['samples_per_s']:>11.1f}{v['model_flops_per_step'] / 1e9:>12.2f}{ratio:>10}"
            f"{v['model_flops_per_s'] / 1e9:>9.1f}{v['mfu']:>7.1%}{compile_s:>10}"
            f"{common.human_bytes(v['temp_bytes']):>11}"
            f"{common.human_bytes(v['argument_bytes']):>11}{v['param_count']:>11,}"
        )
    print(
        "CPU per timed step, of the process that ran it (system time is mostly the kernel "
        "mapping and zeroing fresh memory: the page faults):"
    )
    for v in r["variants"]:
        c = v["cpu_per_step"]
        print(
            f"  {v['framework'] + ' ' + v['dtype']:<26}{v['cores_busy']:>5.2f} cores busy, user "
            f"{c['user_s'] * 1e3:.0f} ms, system {c['sys_s'] * 1e3:.0f} ms, "
            f"{c['minor_faults']:,.0f} page faults"
        )
    for dtype, ratios in r.get("speedup_vs_open_clip", {}).items():
        for peer, ratio in ratios.items():
            print(f"speedup of mmjax {dtype} over open_clip {peer}: {ratio:.2f}x (step-time ratio)")
    if "best_vs_best" in r:
        b = r["best_vs_best"]
        print(
            f"best vs best: mmjax {b['mmjax']} over open_clip {b['open_clip']}: {b['speedup']:.2f}x"
        )
