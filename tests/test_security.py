"""No code path deserialises untrusted data with pickle."""

import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNSAFE = [
    re.compile(r"\bimport pickle\b|\bpickle\.loads?\("),
    re.compile(r"allow_pickle\s*=\s*True"),
    re.compile(r"\byaml\.load\("),
    re.compile(r"torch\.load\((?!.*weights_only=True)"),  # a full unpickle unless weights_only
]


def test_no_unpickling_in_the_package():
    offenders = []
    for root in ("mmjax", "configs"):
        for folder, _, files in os.walk(os.path.join(REPO, root)):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        if any(p.search(line) for p in UNSAFE):
                            offenders.append(
                                f"{os.path.relpath(path, REPO)}:{number}: {line.strip()}"
                            )
    assert offenders == []
    # The pattern does catch what it should.
    assert UNSAFE[3].search("torch.load(path)") and not UNSAFE[3].search(
        "torch.load(p, map_location='cpu', weights_only=True)"
    )
