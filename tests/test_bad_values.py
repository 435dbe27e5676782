"""Values that used to end in a traceback and exit 1 (issue 13, item 7): each is now a
ConfigError from `mmjax.main.train`, which the command line prints as one `error:` line with
exit code 2, before anything compiles."""

import os
import subprocess
import sys

import pytest

from mmjax import config as base_config
from mmjax import main
from mmjax.errors import ConfigError
from tests.conftest import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.model.image.update(patch_size=0), "model.image.patch_size=0 must be a posit"),
        (lambda c: c.model.text.update(num_heads=0), "model.text.num_heads=0 must be a positive"),
        (lambda c: c.model.image.update(num_heads=-2), "model.image.num_heads=-2 must be a posi"),
        (lambda c: c.data.update(image_size=0), "data.image_size=0 must be a positive integer"),
        (
            lambda c: c.model.text.update(kind="hf_bert", hf_dir="/no/such/bert"),
            "model.text.hf_dir='/no/such/bert': [Errno 2] No such file or directory",
        ),
        (lambda c: c.model.text.update(kind="gpt"), "model.text.kind='gpt' is unknown"),
    ],
)
def test_bad_value_is_a_config_error(tmp_path, edit, message):
    config = tiny(base_config.get_config())
    edit(config)
    with pytest.raises(ConfigError) as caught:
        main.train(config, str(tmp_path / "run"))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_batch_larger_than_the_dataset_is_a_config_error(tmp_path, data_dir):
    config = tiny(base_config.get_config(), data_dir)  # 64 training examples
    config.batch_size = 128
    with pytest.raises(ConfigError, match="batch_size=128 is larger than the 64 training exam"):
        main.train(config, str(tmp_path / "run"))


@pytest.mark.slow
def test_misspelt_recipe_with_overrides_exits_2(tmp_path):
    """config_flags reports the missing file only when an override asks the recipe for a field:
    that happened while parsing flags, outside the handler that turned it into one line."""
    command = [sys.executable, "train.py", "--config", "configs/defualt.py"]
    command += ["--config.total_steps=5", f"--workdir={tmp_path}"]
    env = {**os.environ, "MMJAX_MALLOC_TUNING": "0"}
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert "configs/defualt.py" in lines[0] and "No such file or directory" in lines[0]
