"""The callbacks that mirror a search into MLflow: `SearchTracker` (Tune: one nested run per
trial, its epochs, its end and failure reason) and `TrainRunTracker` (Ray Train: the final model's
epochs), with the per-epoch logging they share. The store they write through is `tuning.tracking.store`.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlflow.entities import Dataset
from mlflow.tracking import MlflowClient
from ray.train import UserCallback
from ray.tune import Callback

from tuning.records.outcome import EpochReport, EpochSelection
from tuning.tracking.store import (
    LOGGED_PREFIXES,
    SCAN_BACKEND_TAG,
    find_run,
    log_figure,
    log_metrics,
    log_params,
    log_provenance,
)

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

    from ray.train import Checkpoint
    from ray.train.v2._internal.execution.context import TrainRunContext  # what UserCallback names
    from ray.tune.experiment import Trial

FAILURE_TAG = "cfcml.failure_reason"  # on a failed trial's run: the error's one-line reason


def failure_reason(trial: Trial) -> str:
    """One line saying why a Tune trial failed: the watchdog's verdict if it failed a stalled trial
    (`tuning.runtime.watchdog.STALL_FILE` in the trial's folder), else from the error Tune recorded for it
    (its error.txt holds every failure's traceback): see `reason_line`."""
    from tuning.runtime.watchdog import STALL_FILE

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


def reason_line(text: str | None) -> str:
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
    latest values and every reading that takes the last point of a step (`tuning.records.outcome.lineage`
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
        # trial id -> its epoch selection, each epoch's checkpoint path as the `ref` (the one rule, `EpochSelection`)
        self._selections: dict[str, EpochSelection] = {}
        self._last: dict[str, str] = {}  # trial id -> latest checkpoint path
        self._reasons: dict[str, str] = {}  # trial id -> why it failed (FAILURE_TAG)
        self._scan_backends: dict[str, str | None] = {}  # trial id -> its SCAN_BACKEND_TAG as set
        self._client: MlflowClient | None = None
        self._plotter: ThreadPoolExecutor | None = None  # one background thread drawing finished trials' plots

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.tracking_uri)
        return self._client

    def __getstate__(self) -> dict[str, Any]:
        """Tune saves its callbacks with the experiment state: leave the client and thread out."""
        return {**self.__dict__, "_client": None, "_plotter": None}

    def _run_for(self, trial: Trial) -> str:
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
            from tuning.tracking.lifecycle import reopen_run

            reopen_run(client, run_id)
            history = client.get_metric_history(run_id, "epoch")
            self._last_epoch[tid] = int(max((m.value for m in history), default=0))
        log_params(client, run_id, {k: v for k, v in trial.config.items()})
        self._runs[tid] = run_id
        return run_id

    def on_trial_start(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._run_for(trial)

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict[str, Any],
                        **info: Any) -> None:
        run_id = self._run_for(trial)
        timestamp = int(result.get("timestamp", 0))
        report = EpochReport.from_dict(result)
        scans = self._scan_backends
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
        if result.get("epoch") is not None:  # the rule the worker applies, on this trial's lineage of epochs
            selection = self._selections.setdefault(trial.trial_id, EpochSelection(self.metric))
            selection.update(result, ref=result.get("checkpoint_path"))

    @property
    def _best(self) -> dict[str, tuple[float, str | None]]:
        """trial id -> (selected score, the selected epoch's checkpoint path or None), for the trials
        with a finite score."""
        return {tid: (s.score, s.selected) for tid, s in self._selections.items() if s.score is not None}

    def _log_epoch(self, trial_id: str, run_id: str, values: dict, timestamp: int, retrained: bool = False) -> None:
        """Log one epoch's metrics at step=epoch, each epoch once (`log_epoch_once`)."""
        self._last_epoch[trial_id] = log_epoch_once(self.client, run_id, values, self._last_epoch.get(trial_id, 0),
                                                    timestamp * 1000, retrained)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        self._finish(trial, "FINISHED")

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info: Any) -> None:
        reason = failure_reason(trial)
        self.client.set_tag(self._run_for(trial), FAILURE_TAG, reason[:5000])
        self._reasons[trial.trial_id] = reason
        self._finish(trial, "FAILED")

    def on_experiment_end(self, trials: list[Trial], **info: Any) -> None:
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

    def _finish(self, trial: Trial, status: str) -> None:
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
            assert self._plotter is not None  # set above, or by an earlier finished trial
            self._plotter.submit(self._plot_quietly, run_id, source)
        if status != "FINISHED":
            from tuning.tracking.lifecycle import END_REASON_TAG

            error = getattr(trial, "error_file", None) or getattr(trial, "local_path", None) or "its logs"
            client.set_tag(run_id, END_REASON_TAG, f"the trial raised an error; see {error}"[:5000])
        client.set_terminated(run_id, status)

    def _plot_quietly(self, run_id: str, source: str) -> None:
        client = MlflowClient(self.tracking_uri)
        try:
            self._log_plots(client, run_id, source)
        except Exception as exc:  # a missing plot must not fail the search
            client.set_tag(run_id, "cfcml.plot_error", repr(exc)[:500])

    def _finish_line(self, trial: Trial, status: str) -> str:
        """One console line per finished trial."""
        name = "-".join(str(trial.config.get(k)) for k in self.name_keys) or trial.trial_id
        last = trial.last_result or {}
        epochs = last.get("epoch", self._last_epoch.get(trial.trial_id, 0))
        best = self._best.get(trial.trial_id)
        if status != "FINISHED":
            reason = self._reasons.get(trial.trial_id)
            return (f"trial {name} failed after {epochs} epoch(s): {reason or 'no reason recorded'}; "
                    f"see {getattr(trial, 'local_path', '') or 'its logs'}")
        if self.plots_from == "last":  # a fixed-budget comparison: nothing is selected
            value = last.get(self.metric)
            score = f"last-epoch {self.metric} {value:.4f}" if isinstance(value, (int, float)) else f"no {self.metric}"
        else:
            score = f"selected {self.metric} {best[0]:.4f} (max over epochs)" if best else f"no {self.metric}"
        return f"trial {name} finished: {score}, {epochs} epoch(s), {last.get('time_total_s', 0.0):.0f} s"

    def _log_plots(self, client: MlflowClient, run_id: str, checkpoint_path: str) -> None:
        from cfcml.evaluation.metrics import plot_confusion, plot_roc
        from cfcml.training import frame_probs
        from tuning.records.checkpoints import METRICS_FILE, OOF_FILE, open_checkpoint

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

    def after_report(self, run_context: TrainRunContext, metrics: list[dict[str, Any]],
                     checkpoint: Checkpoint | None) -> None:
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
