"""Optional dependencies (the `interop` and `bench` extras), imported only where used."""

import importlib
from types import ModuleType


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
