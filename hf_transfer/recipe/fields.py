"""The schema's field helper: a dataclass field with its help text and the range a number must lie in."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from hf_transfer.errors import HfTransferError


@dataclass(frozen=True)
class Range:
    """The values a number may take: bounds included (`at_least`, `at_most`) or excluded (`above`, `below`).

    NaN and infinities fall outside every range with a bound, so they are refused too.
    """

    at_least: float | None = None
    above: float | None = None
    at_most: float | None = None
    below: float | None = None

    def holds(self, value: float) -> bool:
        checks = (
            (self.at_least, lambda b: value >= b), (self.above, lambda b: value > b),
            (self.at_most, lambda b: value <= b), (self.below, lambda b: value < b),
        )
        return all(test(bound) for bound, test in checks if bound is not None) and math.isfinite(value)

    def describe(self) -> str:
        low = ("at least", self.at_least) if self.at_least is not None else ("more than", self.above)
        high = ("at most", self.at_most) if self.at_most is not None else ("less than", self.below)
        if low[1] is not None and high[1] is not None:
            ends = {(True, True): "both included", (False, False): "both excluded",
                    (True, False): f"{low[1]:g} included, {high[1]:g} excluded",
                    (False, True): f"{low[1]:g} excluded, {high[1]:g} included"}
            closed = (self.at_least is not None, self.at_most is not None)
            return f"lie between {low[1]:g} and {high[1]:g} ({ends[closed]})"
        word, bound = low if low[1] is not None else high
        return f"be {word} {bound:g}"

    def check(self, key: str, value: Any) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool) and not self.holds(value):
            raise HfTransferError(f"{key} must {self.describe()}; got {value!r}. Fix the value.")


def _f(default: Any, help: str, **bounds: float) -> Any:
    """A dataclass field with its help text and, for numbers, the range it must lie in (see `Range`).

    Mutable defaults are copied per instance.
    """
    metadata = {"help": help, "range": Range(**bounds) if bounds else None}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)
