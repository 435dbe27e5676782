"""What `mmjax.data.build` counts for its report: skipped images, caption and row issues,
normalisations and ignored tar members, each by reason, with the first examples."""

from __future__ import annotations

from collections import Counter

MAX_EXAMPLES, MAX_EXAMPLES_PER_REASON = 20, 5


class BuildError(ValueError):
    """A problem with the user's arguments or data; the CLI prints it and exits with 2."""


class Tally:
    """Counts per reason, and the first examples (a few per reason, so none crowds out)."""

    def __init__(self) -> None:
        self.skipped: Counter[str] = Counter()  # images, each counted under one reason
        self.issues: Counter[str] = Counter()  # captions, rows and tar members
        self.fixes: Counter[str] = Counter()  # normalisations of kept images
        self.ignored: Counter[str] = Counter()  # tar members with other extensions
        self.examples: list[dict[str, str]] = []

    def skip(self, reason: str, where: str, detail: str = "") -> None:
        self.skipped[reason] += 1
        self._example(reason, where, detail, self.skipped[reason])

    def issue(self, reason: str, where: str, detail: str = "") -> None:
        self.issues[reason] += 1
        self._example(reason, where, detail, self.issues[reason])

    def _example(self, reason: str, where: str, detail: str, count: int) -> None:
        if len(self.examples) < MAX_EXAMPLES and count <= MAX_EXAMPLES_PER_REASON:
            # Both cut: a tar member name or a caption may be up to a size limit long.
            self.examples.append({"reason": reason, "where": where[:300], "detail": detail[:300]})
