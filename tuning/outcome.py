"""What a finished search hands to the next stages: one `TrialResult` per trial and the
`SearchOutcome` (written as `outcome.json` in the search folder, read back by the final step,
the report and `compare.py --from-search`)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cfcml.config import ExperimentConfig, from_dict

OUTCOME_FILE = "outcome.json"


@dataclass
class TrialResult:
    """One trial at its best epoch by the CV selection metric (validation folds only).

    A trial that produced no score has `error` set and no `score`.
    """

    trial_id: str
    params: dict[str, Any] = field(default_factory=dict)  # the searched values (dotted keys)
    score: float | None = None  # the selection metric at `epoch`
    epoch: int = 0  # the earliest epoch with the best score: the final model trains this long
    epochs_run: int = 0
    wall_s: float = 0.0  # Tune's clock for the trial function
    compute_s: float = 0.0  # time in training and validation; wall_s - compute_s is start-up overhead
    checkpoint_path: str | None = None  # that epoch's checkpoint, when Ray Train kept it
    metrics: dict[str, float] = field(default_factory=dict)  # cv_*, val_*_fold<k>, train_* at `epoch`
    history: list[dict[str, float]] = field(default_factory=list)  # per epoch: epoch, the metric, timestamp
    experiment: ExperimentConfig | None = None  # the full configuration the trial trained
    error: str | None = None

    @property
    def scored(self) -> bool:
        return self.score is not None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["experiment"] = self.experiment.to_dict() if self.experiment else None
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrialResult:
        data = dict(data)
        if data.get("experiment") is not None:
            data["experiment"] = from_dict(ExperimentConfig, data["experiment"], "outcome experiment")
        return cls(**data)


@dataclass
class SearchOutcome:
    dataset: str
    metric: str  # cv_<selection metric>
    trials: list[TrialResult]
    search_dir: str
    prepared_dir: str
    tracking_uri: str
    experiment_id: str
    parent_run_id: str
    searched: list[str] = field(default_factory=list)  # the dotted keys of the search space

    @property
    def best(self) -> TrialResult | None:
        scored = [t for t in self.trials if t.scored]
        return max(scored, key=lambda t: t.score) if scored else None  # type: ignore[arg-type,return-value]

    def save(self, path: str | Path | None = None) -> Path:
        path = Path(path) if path else Path(self.search_dir) / OUTCOME_FILE
        data = dataclasses.asdict(self)
        data["trials"] = [t.to_dict() for t in self.trials]
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(data, indent=1, default=str))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> SearchOutcome:
        data = json.loads(Path(path).read_text())
        data["trials"] = [TrialResult.from_dict(t) for t in data["trials"]]
        return cls(**data)
