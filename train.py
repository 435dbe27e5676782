"""Train: `python train.py [--config configs/X.py] [--workdir DIR] [--config.key=value ...]`.

Rerunning with the same workdir resumes from its newest checkpoint. Everything else lives in
`mmjax.train.loop.run`, which tests and other tools call directly.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags


def _config_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


try:
    # config_flags reads the --config.key=value overrides of sys.argv right here, so an
    # unknown field surfaces now, as a KeyError/AttributeError with a "did you mean" hint.
    _CONFIG = config_flags.DEFINE_config_file(
        "config",
        os.path.join(os.path.dirname(__file__), "configs", "default.py"),
        "Recipe file (configs/*.py); override fields with --config.key=value.",
        lock_config=True,
    )
except (KeyError, AttributeError) as e:
    detail = e
    while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(str))
        detail = detail.args[0]
    hint = " ".join(str(detail).split())
    _config_error(f"unknown config field in the --config.* overrides: {hint}; see configs/")


_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory (checkpoints, metrics). Default: workdirs/<config name>."
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0, for multi-process runs."
)
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Call jax.distributed.initialize() with cluster auto-detection "
    "(SLURM, TPU pods, Open MPI) even without --coordinator_address.",
)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from mmjax import parallel
    from mmjax.train.guard import BadStepsError
    from mmjax.train.loop import run
    from mmjax.train.validate import ConfigError

    parallel.initialize_distributed(
        _COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value, _DISTRIBUTED.value
    )
    config_name = os.path.splitext(
        os.path.basename(config_flags.get_config_filename(flags.FLAGS["config"]))
    )[0]
    workdir = _WORKDIR.value or os.path.join("workdirs", config_name)
    print(f"workdir: {os.path.abspath(workdir)}")
    try:
        config = _CONFIG.value
        config.keys()  # a recipe that failed to load is a proxy that raises on first use
    except OSError as e:  # config_flags reports an unloadable recipe file on first access
        _config_error(" ".join(str(e).split()))
    try:
        run(config, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BadStepsError as e:  # the run diverged; its newest checkpoint is the last good one
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


if __name__ == "__main__":
    from mmjax import runtime

    runtime.reexec_with_malloc_tuning(sys.argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so recipes import configs.*

    def parse_flags(argv):
        try:
            return flags.FLAGS(argv)
        except flags.Error as e:  # a bad value, e.g. --config.batch_size=abc
            _config_error(str(e))

    app.run(main, flags_parser=parse_flags)
