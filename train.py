"""Train: `python train.py [--config configs/X.py] [--workdir DIR] [--config.key=value ...]`.

Rerunning with the same workdir resumes from its newest checkpoint. Everything else lives in
`mmjax.train.loop.run`, which tests and other tools call directly.
"""

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config",
    os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "Recipe file (configs/*.py); override fields with --config.key=value.",
    lock_config=True,
)
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
        run(_CONFIG.value, workdir)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    from mmjax import runtime

    runtime.reexec_with_malloc_tuning(sys.argv)
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so recipes import configs.*
    app.run(main)
