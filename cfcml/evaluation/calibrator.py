"""What a served model applies to its probabilities: a temperature (`cfcml.evaluation.calibration`)
and operating points (`cfcml.evaluation.operating_points`), both fitted on out-of-fold predictions,
never on test rows (`tuning.evidence.clinical.fit_from_oof` fits one)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from cfcml.evaluation.calibration import Temperature
from cfcml.evaluation.operating_points import OperatingPoint


@dataclass(frozen=True)
class Calibrator:
    """What the served model applies to its probabilities: the temperature and the operating
    points, both fitted on out-of-fold predictions (`source` says which)."""

    temperature: Temperature
    points: list[OperatingPoint]
    source: str  # e.g. "out-of-fold predictions of trial 3a1b_00002 at epoch 12 (150 patients)"
    target_sensitivity: float

    def to_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature.t, "nll_before": self.temperature.nll_before,
                "nll_after": self.temperature.nll_after, "n": self.temperature.n, "source": self.source,
                "target_sensitivity": self.target_sensitivity, "points": [p.to_dict() for p in self.points]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibrator:
        t = Temperature(float(data["temperature"]), float(data["nll_before"]), float(data["nll_after"]),
                        int(data["n"]))
        return cls(t, [OperatingPoint(**p) for p in data["points"]], str(data["source"]),
                   float(data["target_sensitivity"]))

    def point(self, key: str) -> OperatingPoint:
        """The operating point named `key` ('<class>:<name>', or '<name>' when only one class has
        points: a binary task). KeyError listing the known names otherwise."""
        single = len({q.class_name for q in self.points}) == 1
        matches = [p for p in self.points if key == p.key or (single and key == p.name)]
        if len(matches) != 1:
            raise KeyError(f"no operating point {key!r}; known: {', '.join(p.key for p in self.points)}")
        return matches[0]
