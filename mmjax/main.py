"""The training entry point: `python -m mmjax.main` (and the repository's `python train.py`).

    python -m mmjax.main [--config RECIPE.py[:ARG]] [--workdir DIR] [--config.key=value ...]

Without `--config` it trains the default run's recipe (`mmjax/default_recipe.py`: ALIGN-style
towers on the built-in `shapes` data; task recipes build on `mmjax/config.py`). Rerunning with
the same workdir resumes from its newest checkpoint. Exit codes: 0 done (or preempted with a
checkpoint), 2 a setting or input that cannot work (one `error:` line, before anything compiles;
also a workdir another run holds, or whose checkpoints another configuration wrote), 3 bad steps
ended the run (its newest checkpoint is the last good one), 4 checkpoints could not be written or
read (disk full, I/O error, out of memory: one line names the last good checkpoint; nothing was
discarded, rerun once the cause is fixed).

`train(config, workdir)` is the same from Python: it looks the task up by `config.task` and hands
it to `mmjax.train.loop.run`, which also takes a Task of your own.
"""

import os
import sys

import ml_collections

from mmjax import default_recipe, tasks
from mmjax.train import loop


def train(config: ml_collections.ConfigDict, workdir: str) -> dict:
    """Trains `config` (its registered `config.task`) in `workdir`; returns the run's summary.
    Raises `mmjax.errors.ConfigError` before compiling for settings that cannot work."""
    return loop.run(tasks.get_task(config.task), config, workdir)


def _config_error(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def _recipe_path(argv: list[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":", 1)[0]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":", 1)[0]
    return None


def _let_recipes_import_siblings(argv: list[str]) -> None:
    """A recipe inside a package folder (one with `__init__.py`, such as the repository's
    `configs/`) may build on its siblings as `configs.fusion`: put the folder above it on the path,
    wherever the command runs from."""
    recipe = _recipe_path(argv)
    if recipe and os.path.exists(os.path.join(os.path.dirname(recipe) or ".", "__init__.py")):
        sys.path.insert(0, os.path.dirname(os.path.abspath(os.path.dirname(recipe) or ".")))


def _define_flags():
    from absl import flags
    from ml_collections import config_flags

    try:
        # config_flags reads the --config.key=value overrides of sys.argv right here, so an
        # unknown field surfaces now, as a KeyError/AttributeError with a "did you mean" hint.
        config = config_flags.DEFINE_config_file(
            "config",
            default_recipe.__file__,
            "Recipe file (e.g. configs/siglip.py); override fields with --config.key=value.",
            lock_config=True,
        )
    except (KeyError, AttributeError) as e:
        detail = e
        while isinstance(detail, BaseException) and detail.args:  # AttributeError(KeyError(str))
            detail = detail.args[0]
        hint = " ".join(str(detail).split())
        _config_error(f"unknown config field in the --config.* overrides: {hint}")
    workdir = flags.DEFINE_string(
        "workdir", None, "Run directory (checkpoints, metrics). Default: workdirs/<recipe name>."
    )
    distributed = (
        flags.DEFINE_string(
            "coordinator_address", None, "host:port of process 0, for multi-process runs."
        ),
        flags.DEFINE_integer("num_processes", None, "Number of processes."),
        flags.DEFINE_integer("process_id", None, "This process's index."),
        flags.DEFINE_bool(
            "distributed",
            False,
            "Call jax.distributed.initialize() with cluster auto-detection "
            "(SLURM, TPU pods, Open MPI) even without --coordinator_address.",
        ),
    )
    return config, workdir, distributed


def _run_name(config_flag) -> str:
    from absl import flags
    from ml_collections import config_flags

    path = config_flags.get_config_filename(flags.FLAGS[config_flag.name])
    if os.path.abspath(path) == os.path.abspath(default_recipe.__file__):
        return "default"
    return os.path.splitext(os.path.basename(path))[0]


def entry(argv: list[str] | None = None) -> None:
    """Parses the command line and trains; exits with the codes above."""
    import jax
    from absl import app, flags, logging

    from mmjax import checkpoint_errors, parallel, runtime
    from mmjax.checkpoint_errors import CheckpointStorageError
    from mmjax.errors import ConfigError
    from mmjax.train.guard import BadStepsError

    argv = sys.argv if argv is None else argv
    runtime.reexec_with_malloc_tuning(["-m", "mmjax.main", *argv[1:]])
    _let_recipes_import_siblings(argv)
    config_flag, workdir_flag, distributed = _define_flags()

    def main(args):
        if len(args) > 1:
            raise app.UsageError(f"unexpected arguments: {args[1:]}")
        logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
        parallel.initialize_distributed(*(f.value for f in distributed))
        workdir = workdir_flag.value or os.path.join("workdirs", _run_name(config_flag))
        if jax.process_index() == 0:
            print(f"workdir: {os.path.abspath(workdir)}")
        try:
            config = config_flag.value
            config.keys()  # a recipe that failed to load is a proxy that raises on first use
        except OSError as e:  # config_flags reports an unloadable recipe file on first access
            _config_error(" ".join(str(e).split()))
        try:
            train(config, workdir)
        except ConfigError as e:
            _config_error(str(e))
        except BadStepsError as e:  # the run diverged; its newest checkpoint is the last good one
            print(f"error: {e}", file=sys.stderr)
            sys.exit(3)
        except CheckpointStorageError as e:  # disk full, I/O error: names the last good one
            print(f"error: {e}", file=sys.stderr)
            checkpoint_errors.silence_shutdown_noise()
            sys.exit(4)

    def parse_flags(args):
        try:
            return flags.FLAGS(args)
        except flags.Error as e:  # a bad value, e.g. --config.batch_size=abc
            _config_error(str(e))
        except OSError as e:  # an override asked a recipe file that failed to load for a field
            _config_error(" ".join(str(e).split()))

    app.run(main, argv=argv, flags_parser=parse_flags)


if __name__ == "__main__":
    entry()
