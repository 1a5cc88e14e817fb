"""What validation found: every problem of a dataset, named, and the error prepare raises with them.

Light on purpose (no NumPy, pandas, torch): the entry points' error shell (`tuning.cli.shell`)
imports `DatasetValidationError` before any work, so that a command refused early (a bad flag, a
full disk) answers in the time Python takes to start. `cfcml.data.validation` fills the report and
re-exports these names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class Problem:
    code: str  # short kind, e.g. "missing_file", "unknown_category"; tests match on it
    message: str  # names the culprit: file, patient, column
    patient: str | None = None
    file: str | None = None
    column: str | None = None

    def render(self) -> str:
        where = [f"patient {self.patient!r}" if self.patient is not None else None,
                 f"column {self.column!r}" if self.column else None,
                 f"file {self.file}" if self.file else None]
        loc = ", ".join(w for w in where if w)
        return f"[{self.code}] " + (f"{loc}: " if loc else "") + self.message


@dataclass
class ValidationReport:
    dataset: str
    root: Path
    problems: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)  # printed, but they do not stop prepare
    content_hashes: dict[str, str] = field(default_factory=dict)  # root-relative path -> content_hash

    def warn(self, code: str, message: str, *, patient: str | None = None, file: str | Path | None = None) -> None:
        self.warnings.append(Problem(code, message, patient, None if file is None else str(file)))

    def add(self, code: str, message: str, *, patient: str | None = None, file: str | Path | None = None,
            column: str | None = None) -> None:
        self.problems.append(Problem(code, message, patient, None if file is None else str(file), column))

    def extend(self, problems: list[Problem]) -> None:
        self.problems.extend(problems)

    @property
    def ok(self) -> bool:
        return not self.problems

    def codes(self) -> set[str]:
        return {p.code for p in self.problems}

    def render(self) -> str:
        if self.ok:
            return f"{self.dataset} at {self.root}: no problems found"
        lines = [f"{self.dataset} at {self.root}: {len(self.problems)} problem(s) found, nothing was written"]
        lines += [f"  {p.render()}" for p in self.problems]
        lines += [f"  warning: {w.render()}" for w in self.warnings]  # (they alone would not stop prepare)
        return "\n".join(lines)


class DatasetValidationError(Exception):
    """Raised by prepare when validation found problems; str() is the full report."""

    def __init__(self, report: ValidationReport):
        super().__init__(report.render())
        self.report = report
