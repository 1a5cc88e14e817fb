"""MLflow tracking for searches: one experiment per dataset, a parent run per search, a nested
child run per Tune trial.

Everything is logged from the driver through `MlflowClient` (no global active run), so trials
running anywhere on a cluster need no access to the tracking server. Runs are found again by
tags (`cfcml.search`, `cfcml.trial_id`) and metric steps already logged are skipped, so resuming
or re-running a search never duplicates a run or a metric point.

What the MLflow UI shows besides metrics: the experiment is tagged as a model-training one
(`mlflow.experimentKind`), every run carries its source (`mlflow.source.*`: entry point, git
commit, branch; `mlflow.user`) and the prepared dataset as an MLflow dataset input (name,
fingerprint as digest, the prepared folder as source, the manifest's columns as schema, rows per
split and fold as profile), and trials and the final run get per-epoch system metrics measured on
their Ray Train worker (`system/...`, the names of MLflow's own system metrics monitor; see
`tuning.trainer.SystemMetrics`).
"""
from __future__ import annotations

import functools
import getpass
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import mlflow
from mlflow.entities import Dataset, DatasetInput, InputTag
from mlflow.tracking import MlflowClient
from ray.train import UserCallback
from ray.tune import Callback

from cfcml.config import PROJECT_ROOT
from cfcml.data.manifest import PreparedDataset
from tuning.outcome import EpochReport
from tuning.preflight import tracking_uri_choice

LOGGED_PREFIXES = ("train_", "val_", "cv_", "selected_", "system/")
# On every trial run and final run: the selective scan its model actually ran (`EpochReport.scan_backend`:
# "chunked", "triton", ...; "chunked" where `auto` fell back after the triton self-check; "none" without
# Mamba blocks), set from the run's first report (cfcml/networks/scan_check.py, docs/gpu.md).
SCAN_BACKEND_TAG = "cfcml.scan_backend"
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"  # the UI's "Machine learning" kind (not GenAI)


def default_tracking_uri(runs_dir: Path) -> str:
    """`MLFLOW_TRACKING_URI` if set, else a SQLite store under the project's runs/ folder."""
    uri, what = tracking_uri_choice(None, runs_dir)
    if what == "--runs-dir":
        runs_dir.mkdir(parents=True, exist_ok=True)
    return uri


def _git(*args: str) -> str:
    try:
        out = subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


@functools.lru_cache(maxsize=1)
def source_tags() -> dict[str, str]:
    """MLflow's source tags for runs this process creates: the entry point that ran, the git commit
    (and branch, remote, whether tracked files had uncommitted changes) and the user."""
    argv0 = Path(sys.argv[0]).resolve() if sys.argv and sys.argv[0] else Path("python")
    try:
        name = str(argv0.relative_to(PROJECT_ROOT))
    except ValueError:
        name = argv0.name
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = os.environ.get("USER", "unknown")
    tags = {"mlflow.source.type": "LOCAL", "mlflow.source.name": name, "mlflow.user": user,
            "mlflow.source.git.commit": git_commit()}
    branch = _git("rev-parse", "--abbrev-ref", "HEAD")
    if branch and branch != "HEAD":
        tags["mlflow.source.git.branch"] = branch
    remote = _git("remote", "get-url", "origin")
    if remote:
        tags["mlflow.source.git.repoURL"] = remote
    if tags["mlflow.source.git.commit"] != "unknown":
        tags["cfcml.git_dirty"] = "true" if _git("status", "--porcelain", "--untracked-files=no") else "false"
    return tags


def dataset_entity(prepared: PreparedDataset, name: str | None = None) -> Dataset:
    """The prepared dataset as an MLflow dataset: its fingerprint as digest, the prepared folder as
    source, the manifest's columns as schema and the rows of each split and validation fold as
    profile (counts only: no rows are read for it)."""
    from mlflow.types import ColSpec, Schema

    manifest = prepared.manifest
    kinds = {"i": "long", "u": "long", "f": "double", "b": "boolean"}
    schema = Schema([ColSpec(kinds.get(dtype.kind, "string"), str(col)) for col, dtype in manifest.dtypes.items()])
    dev = manifest[manifest["split"] == "dev"]
    profile: dict[str, Any] = {"num_rows": len(manifest), "dev_rows": len(dev),
                               "test_rows": int((manifest["split"] == "test").sum()),
                               "classes": len(prepared.spec.classes), "folds": prepared.folds,
                               "fold_seed": prepared.fold_seed}
    profile.update({f"fold_{k}_validation_rows": int((dev["fold"] == k).sum()) for k in range(prepared.folds)})
    return Dataset(name=name or prepared.spec.name, digest=prepared.fingerprint, source_type="local",
                   source=json.dumps({"uri": str(prepared.out_dir)}),
                   schema=json.dumps({"mlflow_colspec": schema.to_dict()}), profile=json.dumps(profile))


def log_provenance(client: MlflowClient, run_id: str, dataset: Dataset | PreparedDataset,
                   context: str = "training") -> None:
    """Tag `run_id` with its source (`source_tags`) and log `dataset` as its input (used in
    `context`). Idempotent: MLflow keeps one input per run and dataset."""
    if isinstance(dataset, PreparedDataset):
        dataset = dataset_entity(dataset)
    client.log_batch(run_id, tags=[mlflow.entities.RunTag(k, v) for k, v in source_tags().items()])
    client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", context)])])


def experiment_id(client: MlflowClient, dataset: str, artifact_root: Path | None) -> str:
    """The dataset's experiment (`cfcml-<dataset>`), created on first use, tagged as a model-training
    experiment unless someone set its kind already."""
    name = f"cfcml-{dataset}"
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND_TAG not in exp.tags:
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id
    location = (artifact_root / name).resolve().as_uri() if artifact_root else None
    return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})


def ui_url(experiment_id: str, host: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs page in the MLflow UI, in its machine-learning view (MLflow 3's UI
    opens on its GenAI view unless told otherwise; the choice is then remembered by the browser)."""
    return f"{host}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def filter_literal(value: str) -> str:
    """`value` as a string literal of an MLflow filter string (runs, model versions, experiments).

    MLflow's parser (`mlflow.utils.search_utils`, checked with MLflow 3.x) has no escape character:
    it takes a value between one pair of single or double quotes as it is. So a value without an
    apostrophe is single-quoted, one with an apostrophe double-quoted; a value with both has no
    literal and raises ValueError (`tag_filter` matches such a value with LIKE instead).
    Backslashes, spaces and backticks need nothing.
    """
    value = str(value)
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise ValueError(f"{value!r} holds both quote characters: no MLflow filter literal can hold it")


def tag_filter(**tags: str) -> str:
    """A filter string matching runs whose tags equal `tags` (dotted keys welcome), every value
    quoted by `filter_literal`: the one place values enter a runs filter. A value holding both
    quote characters becomes a LIKE pattern with `_` for each quote, which can match more runs:
    callers keep only exact matches (`find_run` does)."""
    clauses = []
    for key, value in tags.items():
        try:
            clauses.append(f"tags.`{key}` = {filter_literal(value)}")
        except ValueError:
            pattern = str(value).replace("'", "_").replace('"', "_")
            clauses.append(f"tags.`{key}` LIKE {filter_literal(pattern)}")
    return " and ".join(clauses)


def find_runs(client: MlflowClient, exp_id: str, **tags: str) -> list[Any]:
    """Runs of `exp_id` whose tags equal `tags` exactly (any value, apostrophes and quotes included)."""
    runs = client.search_runs([exp_id], filter_string=tag_filter(**tags), max_results=1000)
    return [r for r in runs if all(r.data.tags.get(k) == str(v) for k, v in tags.items())]


def find_run(client: MlflowClient, exp_id: str, **tags: str) -> str | None:
    runs = find_runs(client, exp_id, **tags)
    return runs[0].info.run_id if runs else None


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    """Log params not yet on the run (re-logging a param with a new value is an MLflow error)."""
    have = client.get_run(run_id).data.params
    todo = [mlflow.entities.Param(k, str(v)[:6000]) for k, v in params.items() if k not in have]
    for i in range(0, len(todo), 100):
        client.log_batch(run_id, params=todo[i:i + 100])


def log_metrics(client: MlflowClient, run_id: str, values: dict[str, Any], step: int = 0,
                timestamp_ms: int | None = None) -> None:
    """Log the finite numbers of `values` at `step` (MLflow takes 1000 metrics per batch)."""
    ts = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    metrics = [mlflow.entities.Metric(k, float(v), ts, step) for k, v in values.items()
               if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def log_figure(client: MlflowClient, run_id: str, fig: Any, name: str) -> None:
    import matplotlib.pyplot as plt

    client.log_figure(run_id, fig, name)
    plt.close(fig)


FAILURE_TAG = "cfcml.failure_reason"  # on a failed trial's run: the error's one-line reason


def failure_reason(trial: Any) -> str:
    """One line saying why a Tune trial failed: the watchdog's verdict if it failed a stalled trial
    (`tuning.watchdog.STALL_FILE` in the trial's folder), else from the error Tune recorded for it
    (its error.txt holds every failure's traceback): see `reason_line`."""
    from tuning.watchdog import STALL_FILE

    folder = getattr(trial, "local_path", None)
    stalled = Path(folder) / STALL_FILE if folder else None
    if stalled is not None and stalled.is_file():
        return stalled.read_text(encoding="utf-8").strip()
    path = getattr(trial, "error_file", None)
    try:
        text = Path(path).read_text(encoding="utf-8") if path else ""
    except OSError:
        text = ""
    return reason_line(text)


def reason_line(text: str) -> str:
    """The last "training diverged: ..." line of an error text, else its last "SomeError: message"
    line (a traceback's verdict), else its last line."""
    lines = [line.strip() for line in str(text or "").splitlines() if line.strip()]
    for line in reversed(lines):
        if "training diverged:" in line:
            return line[line.index("training diverged:"):]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Diverged")) and " " not in head:
            return line
    return lines[-1] if lines else "unknown (no error was recorded)"


def retrained(values: dict[str, Any]) -> bool:
    """Whether a report's own values come from an epoch just trained (`EpochReport.retrained`)."""
    return EpochReport.from_dict(values).retrained


def tag_scan_backend(client: MlflowClient, run_id: str, report: EpochReport, tagged: str | None) -> str | None:
    """Set `SCAN_BACKEND_TAG` on `run_id` from `report` when it carries a backend other than
    `tagged` (the value this caller set last). Returns the run's value now."""
    backend = report.scan_backend
    if backend is None or backend == tagged:
        return tagged
    client.set_tag(run_id, SCAN_BACKEND_TAG, backend)
    return backend


def log_epoch_once(client: MlflowClient, run_id: str, values: dict[str, Any], last_epoch: int,
                   timestamp_ms: int | None = None, retrained: bool = False) -> int:
    """Log one reported epoch's metrics at step=epoch, each epoch once: an epoch at or below
    `last_epoch` (the newest the run holds) is skipped when it is re-sent, and logged again when it
    was `retrained` (`log_retrained_epoch`). Returns the run's newest epoch after it."""
    epoch = int(values.get("epoch", 0))
    if epoch <= last_epoch:
        if retrained:
            stamp = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
            log_retrained_epoch(client, run_id, values, epoch, stamp)
        return last_epoch
    logged = {k: v for k, v in values.items() if k.startswith(LOGGED_PREFIXES)}
    log_metrics(client, run_id, {**logged, "epoch": epoch}, step=epoch, timestamp_ms=timestamp_ms)
    return epoch


def log_retrained_epoch(client: MlflowClient, run_id: str, values: dict[str, Any], epoch: int,
                        timestamp_ms: int) -> None:
    """Log an epoch the run holds already, retrained after a restart from an older checkpoint (the
    worker group crashed, or the newest checkpoint was damaged): at the same step, later than every
    point at that step, so the retrained values win. MLflow cannot delete a metric point; the run's
    latest values and every reading that takes the last point of a step (`tuning.outcome.lineage`
    does it for Tune's rows) show the retrained one, and the run's `cfcml.retrained_epochs` tag
    names the epochs whose history holds a discarded point before it."""
    prior = [m.timestamp for m in client.get_metric_history(run_id, "epoch") if m.step == epoch]
    ts = max([timestamp_ms] + [t + 1 for t in prior])
    logged = {k: v for k, v in values.items() if k.startswith(LOGGED_PREFIXES)}
    log_metrics(client, run_id, {**logged, "epoch": epoch}, step=epoch, timestamp_ms=ts)
    tags = client.get_run(run_id).data.tags
    epochs = sorted({int(e) for e in tags.get("cfcml.retrained_epochs", "").split(",") if e} | {epoch})
    client.set_tag(run_id, "cfcml.retrained_epochs", ",".join(map(str, epochs)))


class SearchTracker(Callback):
    """Tune callback mirroring trials into nested MLflow runs.

    kind: the `cfcml.kind` tag of the trial runs; name_keys: trial config keys that name a run
    (default "trial-<id>"); plots_from: the out-of-fold plots of a finished trial come from its
    "best" epoch by `metric` (a search) or its "last" epoch (a fixed-budget comparison);
    dataset: logged as each new trial run's input (`dataset_entity`), with the source tags.
    """

    def __init__(self, tracking_uri: str, exp_id: str, parent_run_id: str, search_key: str,
                 metric: str, classes: list[str], task: str, *, kind: str = "trial",
                 name_keys: tuple[str, ...] = (), plots_from: str = "best", dataset: Dataset | None = None):
        self.tracking_uri = tracking_uri
        self.exp_id, self.parent, self.search_key = exp_id, parent_run_id, search_key
        self.metric, self.classes, self.task = metric, classes, task
        self.kind, self.name_keys, self.plots_from = kind, name_keys, plots_from
        self.dataset = dataset
        self._runs: dict[str, str] = {}  # trial id -> run id
        self._last_epoch: dict[str, int] = {}
        self._best: dict[str, tuple[float, str | None]] = {}  # trial id -> (score, checkpoint path)
        self._last: dict[str, str] = {}  # trial id -> latest checkpoint path
        self._reasons: dict[str, str] = {}  # trial id -> why it failed (FAILURE_TAG)
        self._scan_backends: dict[str, str | None] = {}  # trial id -> its SCAN_BACKEND_TAG as set
        self._client: MlflowClient | None = None
        self._plotter: Any = None  # one background thread drawing finished trials' plots

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        """Tune saves its callbacks with the experiment state: leave the client and thread out."""
        return {**self.__dict__, "_client": None, "_plotter": None}

    def _run_for(self, trial: Any) -> str:
        tid = trial.trial_id
        if tid in self._runs:
            return self._runs[tid]
        client = self.client
        run_id = find_run(client, self.exp_id, **{"cfcml.search": self.search_key, "cfcml.trial_id": tid})
        if run_id is None:
            name = "-".join(str(trial.config.get(k)) for k in self.name_keys) or f"trial-{tid}"
            run = client.create_run(self.exp_id, run_name=name, tags={
                "mlflow.parentRunId": self.parent, "cfcml.search": self.search_key,
                "cfcml.trial_id": tid, "cfcml.kind": self.kind,
            })
            run_id = run.info.run_id
            self._last_epoch[tid] = 0
            if self.dataset is not None:
                log_provenance(client, run_id, self.dataset)
        else:  # resumed: continue the same run after the last epoch it holds
            from tuning.lifecycle import reopen_run

            reopen_run(client, run_id)
            history = client.get_metric_history(run_id, "epoch")
            self._last_epoch[tid] = int(max((m.value for m in history), default=0))
        log_params(client, run_id, {k: v for k, v in trial.config.items()})
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        run_id = self._run_for(trial)
        timestamp = int(result.get("timestamp", 0))
        report = EpochReport.from_dict(result)
        scans = self.__dict__.setdefault("_scan_backends", {})  # (a tracker saved before it had one)
        scans[trial.trial_id] = tag_scan_backend(self.client, run_id, report, scans.get(trial.trial_id))
        # A resumed trial first re-sends the metrics of the checkpoint it restarted from: an
        # interruption can land between that checkpoint and its report reaching this driver.
        if report.restored is not None:
            self._log_epoch(trial.trial_id, run_id, report.restored, timestamp)
        skipped = report.checkpoints_skipped
        if skipped:  # a damaged checkpoint the restarted trial passed over for an older one
            for message in skipped:
                print(f"warning: trial {trial.trial_id}: {message}", flush=True)
            self.client.set_tag(run_id, "cfcml.checkpoint_skipped", "; ".join(skipped)[:5000])
        self._log_epoch(trial.trial_id, run_id, result, timestamp, retrained=report.retrained)
        if result.get("checkpoint_path"):
            self._last[trial.trial_id] = result["checkpoint_path"]
        score = result.get(self.metric)
        if isinstance(score, (int, float)) and math.isfinite(score):
            best = self._best.get(trial.trial_id)
            if "selected_epoch" in result:  # the worker's selection (tuning.outcome.EpochSelection)
                # this trial's epochs as its lineage: a retrained epoch drops the ones after it
                epochs = self.__dict__.setdefault("_epochs", {}).setdefault(trial.trial_id, {})
                epoch = int(result.get("epoch", 0))
                for stale in [e for e in epochs if e >= epoch]:
                    del epochs[stale]
                epochs[epoch] = (float(score), result.get("checkpoint_path"))
                if result["selected_epoch"] in epochs:
                    self._best[trial.trial_id] = epochs[result["selected_epoch"]]
            elif best is None or score >= best[0]:  # ties: the latest epoch, as EpochSelection
                self._best[trial.trial_id] = (float(score), result.get("checkpoint_path"))

    def _log_epoch(self, trial_id: str, run_id: str, values: dict, timestamp: int, retrained: bool = False) -> None:
        """Log one epoch's metrics at step=epoch, each epoch once (`log_epoch_once`)."""
        self._last_epoch[trial_id] = log_epoch_once(self.client, run_id, values, self._last_epoch.get(trial_id, 0),
                                                    timestamp * 1000, retrained)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        reason = failure_reason(trial)
        self.client.set_tag(self._run_for(trial), FAILURE_TAG, reason[:5000])
        self.__dict__.setdefault("_reasons", {})[trial.trial_id] = reason  # (a tracker saved before it had one)
        self._finish(trial, "FAILED")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        """Runs of trials left unfinished (an interrupted search) are marked KILLED; --resume
        sets them RUNNING again and continues them."""
        for trial in trials:
            if trial.status not in ("TERMINATED", "ERROR") and trial.trial_id in self._runs:
                self.client.set_terminated(self._runs[trial.trial_id], "KILLED")
        self.wait_for_plots()

    def wait_for_plots(self) -> None:
        """Block until the plots of finished trials are logged (the end of the search)."""
        plotter, self.__dict__["_plotter"] = self.__dict__.get("_plotter"), None
        if plotter is not None:
            plotter.shutdown(wait=True)

    def _finish(self, trial: Any, status: str) -> None:
        run_id = self._run_for(trial)
        client = self.client
        print(self._finish_line(trial, status), flush=True)
        best = self._best.get(trial.trial_id)
        if best is not None:
            client.set_tag(run_id, "cfcml.selected_cv_score", f"{best[0]:.6g}")  # max over its epochs
        source = best[1] if best is not None and self.plots_from == "best" else self._last.get(trial.trial_id)
        if source:
            # Off Tune's event loop (reading and verifying the checkpoint, drawing, uploading take
            # seconds that the next trial's start would wait for): one background thread with its
            # own client, awaited by on_experiment_end. A driver killed outright may lose them.
            if self.__dict__.get("_plotter") is None:
                from concurrent.futures import ThreadPoolExecutor

                self._plotter = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cfcml-plots")
            self._plotter.submit(self._plot_quietly, run_id, source)
        if status != "FINISHED":
            from tuning.lifecycle import END_REASON_TAG

            error = getattr(trial, "error_file", None) or getattr(trial, "local_path", None) or "its logs"
            client.set_tag(run_id, END_REASON_TAG, f"the trial raised an error; see {error}"[:5000])
        client.set_terminated(run_id, status)

    def _plot_quietly(self, run_id: str, source: str) -> None:
        client = MlflowClient(self.tracking_uri)
        try:
            self._log_plots(client, run_id, source)
        except Exception as exc:  # a missing plot must not fail the search
            client.set_tag(run_id, "cfcml.plot_error", repr(exc)[:500])

    def _finish_line(self, trial: Any, status: str) -> str:
        """One console line per finished trial."""
        name = "-".join(str(trial.config.get(k)) for k in self.name_keys) or trial.trial_id
        last = trial.last_result or {}
        epochs = last.get("epoch", self._last_epoch.get(trial.trial_id, 0))
        best = self._best.get(trial.trial_id)
        if status != "FINISHED":
            reason = getattr(self, "_reasons", {}).get(trial.trial_id)
            return (f"trial {name} failed after {epochs} epoch(s): {reason or 'no reason recorded'}; "
                    f"see {getattr(trial, 'local_path', '') or 'its logs'}")
        if self.plots_from == "last":  # a fixed-budget comparison: nothing is selected
            value = last.get(self.metric)
            score = f"last-epoch {self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"no {self.metric}"
        else:
            score = f"selected {self.metric} {best[0]:.4f} (max over epochs)" if best else f"no {self.metric}"
        return f"trial {name} finished: {score}, {epochs} epoch(s), {last.get('time_total_s', 0.0):.0f} s"

    def _log_plots(self, client: MlflowClient, run_id: str, checkpoint_path: str) -> None:
        from cfcml.metrics import plot_confusion, plot_roc
        from cfcml.training import frame_probs
        from tuning.checkpoints import METRICS_FILE, OOF_FILE, open_checkpoint

        with open_checkpoint(checkpoint_path) as ckpt:
            oof = ckpt.oof()
            if oof is None:
                return
            client.log_artifact(run_id, str(ckpt.file(OOF_FILE)), "predictions")
            client.log_artifact(run_id, str(ckpt.file(METRICS_FILE)), "predictions")
        probs = frame_probs(oof, self.classes)
        labels = oof["label"].to_numpy()
        log_figure(client, run_id, plot_roc(labels, probs, self.classes), "plots/roc_oof.png")
        log_figure(client, run_id, plot_confusion(labels, probs, self.classes), "plots/confusion_oof.png")


class TrainRunTracker(UserCallback):
    """Ray Train callback logging every epoch a `TorchTrainer` reports (rank 0's `train_*`,
    `system/*` and `epoch`) to one MLflow run, each epoch once: the final model's run.

    Ray Train calls it on its controller, which runs on the driver's node (so it reaches the
    tracking server as the driver does). A restarted worker group re-sends the epoch it restored
    (`restored`); epochs the run holds already are skipped, so a restart or a rerun adds no point.
    """

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri, self.run_id = tracking_uri, run_id
        self._last_epoch: int | None = None
        self._scan_backend: str | None = None  # the run's SCAN_BACKEND_TAG as set
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_client": None}

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        if not metrics:
            return
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        if self._last_epoch is None:
            history = self._client.get_metric_history(self.run_id, "epoch")
            self._last_epoch = int(max((m.value for m in history), default=0))
        values = metrics[0]
        report = EpochReport.from_dict(values)
        self.__dict__["_scan_backend"] = tag_scan_backend(self._client, self.run_id, report,
                                                          self.__dict__.get("_scan_backend"))
        if report.restored is not None:
            self._last_epoch = log_epoch_once(self._client, self.run_id, report.restored, self._last_epoch)
        self._last_epoch = log_epoch_once(self._client, self.run_id, values, self._last_epoch,
                                          retrained=report.retrained)


def write_json_artifact(client: MlflowClient, run_id: str, data: Any, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(data, indent=1, default=str), encoding="utf-8")
        client.log_artifact(run_id, str(path))
