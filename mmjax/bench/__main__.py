"""`python -m mmjax.bench {train,loss,scale,pipeline,decode}`: step time, FLOPs, MFU, memory,
input-pipeline throughput and decoding speed.

Every subcommand prints a human-readable report; with `--json` the last line of stdout is one JSON
object (its keys are documented in the subcommand's module). `loss` and `scale` compile for
`--devices` fake CPU devices, so the device count is fixed here, before JAX is imported.
"""

import argparse
import json
import os
import sys

CONFIG_HELP = "an mmjax recipe file (default: the base config, mmjax/config.py: the tiny CLIP)"
OPEN_CLIP_HELP = (
    "an open_clip model-config JSON: a path, a name of open_clip's (e.g. ViT-B-16) or of "
    "mmjax/bench/configs/ (e.g. clip_tiny_64)"
)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m mmjax.bench", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="time the jitted train step of one model")
    src = train.add_mutually_exclusive_group()
    src.add_argument("--config", help=CONFIG_HELP)
    src.add_argument("--open-clip-config", help=OPEN_CLIP_HELP)
    train.add_argument("--batch", type=int, default=64, help="global batch size")
    train.add_argument("--dtype", default="float32", help="compute dtype(s), comma-separated")
    train.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    train.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
    train.add_argument("--rounds", type=int, default=3, help="alternating A/B rounds")
    train.add_argument("--peak-tflops", type=float, default=None, help="MFU denominator")
    train.add_argument("--vs-open-clip", action="store_true", help="time open_clip side by side")
    train.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    train.add_argument(
        "--peer-settings",
        default="float32,amp_bf16",
        help="open_clip settings, each its own process: float32|amp_bf16, +compile for "
        "torch.compile (e.g. float32,amp_bf16,amp_bf16+compile)",
    )
    train.add_argument(
        "--profile",
        metavar="DIR",
        help="after timing, trace each mmjax variant with jax.profiler into DIR/<dtype> and "
        "report op time by kind and pass (mmjax/bench/profile.py)",
    )
    train.add_argument("--profile-steps", type=int, default=5, help="steps counted by --profile")
    train.add_argument(
        "--peer-malloc-tuning",
        action="store_true",
        help="give the open_clip processes mmjax's allocator setting too (default: as a user "
        "runs it)",
    )

    loss = sub.add_parser("loss", help="per-device memory of one contrastive loss variant")
    loss.add_argument("--devices", type=int, default=8)
    loss.add_argument("--local-batch", type=int, default=256)
    loss.add_argument("--dim", type=int, default=512)
    loss.add_argument("--impl", choices=("naive", "gathered", "chunked"), default="chunked")
    loss.add_argument("--kind", choices=("softmax", "sigmoid"), default="softmax")

    scale = sub.add_parser("scale", help="AOT-compile a config's train step on fake devices")
    scale.add_argument("--config", help=CONFIG_HELP)
    scale.add_argument("--open-clip-config", help=OPEN_CLIP_HELP)
    scale.add_argument("--devices", type=int, default=8)
    scale.add_argument("--global-batch", type=int, default=None)
    scale.add_argument("--override", action="append", default=[], help="key=value config edits")

    pipe = sub.add_parser("pipeline", help="images/s of the input path next to the step's need")
    pipe_src = pipe.add_mutually_exclusive_group()
    pipe_src.add_argument("--config", help=CONFIG_HELP)
    pipe_src.add_argument("--open-clip-config", help=OPEN_CLIP_HELP)
    pipe.add_argument("--batch", type=int, default=64)
    pipe.add_argument("--batches", type=int, default=20, help="timed batches per run")
    pipe.add_argument("--threads", default="0,1,2", help="grain reader threads, comma-separated")
    pipe.add_argument("--workers", default="1,2", help="data.workers processes, comma-separated")
    pipe.add_argument("--step-steps", type=int, default=3, help="timed train steps (0: none)")
    pipe.add_argument("--stage-examples", type=int, default=256)
    pipe.add_argument("--override", action="append", default=[], help="key=value config edits")

    dec = sub.add_parser(
        "decode", help="captioning or text→image tokens/s with and without the KV cache"
    )
    dec.add_argument("--config", help=CONFIG_HELP)
    dec.add_argument("--batch", type=int, default=32, help="images captioned per call")
    dec.add_argument("--beam", type=int, default=3, help="beam size of the beam-search rows")
    dec.add_argument("--lengths", default="48,64", help="caption lengths, comma-separated")
    dec.add_argument(
        "--decoder-depth", type=int, help="default: the recipe's captioning.decoder_depth, else 2"
    )
    dec.add_argument("--rounds", type=int, default=3, help="alternating with/without rounds")
    dec.add_argument(
        "--codebook-size", type=int, default=512, help="text_to_image recipes: image codes"
    )
    dec.set_defaults(open_clip_config=None)

    for p in (train, loss, scale, pipe, dec):
        p.add_argument("--json", action="store_true", help="print one JSON object last")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.command in ("loss", "scale"):
        if "jax" in sys.modules:
            raise RuntimeError("mmjax.bench must set the fake device count before importing jax")
        flags = os.environ.get("XLA_FLAGS", "")
        os.environ["XLA_FLAGS"] = (
            f"{flags} --xla_force_host_platform_device_count={args.devices}".strip()
        )
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if args.command == "train":
        from mmjax.bench import train as command
    elif args.command == "loss":
        from mmjax.bench import loss as command
    elif args.command == "pipeline":
        from mmjax.bench import pipeline as command
    elif args.command == "decode":
        from mmjax.bench import decode as command
    else:
        from mmjax.bench import scale as command
    result = command.run(args)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


if __name__ == "__main__":
    from mmjax import runtime

    runtime.reexec_with_malloc_tuning(["-m", "mmjax.bench", *sys.argv[1:]])
    sys.exit(main())
