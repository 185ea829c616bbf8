"""The grade scale shown to the sales manager: A+, A, B+, B, C, D.

>>> g = Grades.from_config({"A+": 0.9, "A": 0.8, "B+": 0.65, "B": 0.5, "C": 0.3})
>>> [g.grade(s) for s in (0.95, 0.8, 0.7, 0.5, 0.31, 0.1)]
['A+', 'A', 'B+', 'B', 'C', 'D']
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GRADE_NAMES: tuple[str, ...] = ("A+", "A", "B+", "B", "C", "D")


@dataclass(frozen=True)
class Grades:
    bands: tuple[tuple[str, float], ...]  # (grade, lowest score), best first; below all -> "D"

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> Grades:
        from models.rules import ConfigError  # late import: rules imports this module

        expected = GRADE_NAMES[:-1]
        if set(cfg) != set(expected):
            raise ConfigError(f"scoring config [grades]: expected exactly the keys {', '.join(expected)} (D is the rest)")
        bounds = []
        for name in expected:
            value = cfg[name]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
                raise ConfigError(f"scoring config [grades].{name} = {value!r}: expected a number in (0, 1]")
            bounds.append((name, float(value)))
        if any(a[1] <= b[1] for a, b in zip(bounds, bounds[1:])):
            raise ConfigError("scoring config [grades]: expected strictly decreasing bounds from A+ down to C")
        return cls(tuple(bounds))

    def grade(self, score: float) -> str:
        for name, low in self.bands:  # a loop: a generator costs more than the five comparisons
            if score >= low:
                return name
        return "D"
