"""What MLflow shows besides metrics, against a real MLflow store (SQLite in tmp): the experiment's
kind, each run's source and dataset input, per-epoch metrics logged once, system metrics under
MLflow's own names."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.hpo.trainer import SystemMetrics
from tuning.records.outcome import EpochSelection
from tuning.tracking.callbacks import TrainRunTracker
from tuning.tracking.store import EXPERIMENT_KIND, EXPERIMENT_KIND_TAG, experiment_id, git_commit, log_provenance


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    root = make_men(tmp_path_factory.mktemp("tracking") / "men", patients=20, seed=4, size=(32, 32, 8))
    return prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(32, 32, 8))


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def client(store: Path) -> MlflowClient:
    """One store for the module (creating a SQLite store takes seconds); each test its own runs."""
    return MlflowClient(f"sqlite:///{store / 'mlflow.db'}")


@pytest.fixture(scope="module")
def exp_id(client: MlflowClient, store: Path) -> str:
    """The men experiment, its artifacts in tmp (not MLflow's default ./mlruns)."""
    return experiment_id(client, "men", store / "artifacts")


def test_the_experiment_opens_as_a_model_training_one_unless_its_kind_was_chosen(client: MlflowClient, exp_id: str,
                                                                                  store: Path) -> None:
    exp = client.get_experiment(exp_id)
    assert exp.tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND == "custom_model_development"
    older = client.create_experiment("cfcml-derm7pt", (store / "d7").as_uri())  # made before the tag existed
    assert experiment_id(client, "derm7pt", None) == older
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == EXPERIMENT_KIND
    client.set_experiment_tag(older, EXPERIMENT_KIND_TAG, "genai_development")  # a user's own choice stays
    experiment_id(client, "derm7pt", None)
    assert client.get_experiment(older).tags[EXPERIMENT_KIND_TAG] == "genai_development"


def test_a_run_carries_its_source_and_the_prepared_dataset_once(client: MlflowClient, exp_id: str, prepared) -> None:
    run_id = client.create_run(exp_id).info.run_id
    log_provenance(client, run_id, prepared)
    log_provenance(client, run_id, prepared)  # a resumed search logs it again: still one input
    run = client.get_run(run_id)
    tags = run.data.tags
    assert tags["mlflow.source.git.commit"] == git_commit() != "unknown"
    assert tags["mlflow.source.type"] == "LOCAL" and tags["mlflow.source.name"] and tags["mlflow.user"]
    assert tags["cfcml.git_dirty"] in ("true", "false")
    (used,) = run.inputs.dataset_inputs
    ds = used.dataset
    assert (ds.name, ds.digest, ds.source_type) == ("men", prepared.fingerprint, "local")
    assert json.loads(ds.source) == {"uri": str(prepared.out_dir)}
    assert [t.value for t in used.tags if t.key == "mlflow.data.context"] == ["training"]
    profile = json.loads(ds.profile)
    manifest = prepared.manifest
    dev = manifest[manifest["split"] == "dev"]
    assert profile["num_rows"] == len(manifest) == profile["dev_rows"] + profile["test_rows"]
    assert profile["dev_rows"] == len(dev) and profile["folds"] == 2
    assert [profile[f"fold_{k}_validation_rows"] for k in range(2)] == [int((dev["fold"] == k).sum()) for k in (0, 1)]
    columns = [c["name"] for c in json.loads(ds.schema)["mlflow_colspec"]]
    assert columns == list(manifest.columns)


def _epoch(n: int, loss: float | None = None, **extra: object) -> dict:
    return {"epoch": n, "train_loss": 1.0 / n if loss is None else loss, "system/cpu_utilization_percentage": 50.0 + n,
            "time_compute_s": float(n), **extra}


def _shown(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    """What a reader takes of each step: its last point (latest timestamp), as the run's value does."""
    out: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in out or m.timestamp > out[m.step][0]:
            out[m.step] = (m.timestamp, m.value)
    return {step: value for step, (_, value) in sorted(out.items())}


def test_each_reported_epoch_reaches_the_run_once_across_re_sends_and_reruns(client: MlflowClient,
                                                                             exp_id: str) -> None:
    run_id = client.create_run(exp_id).info.run_id
    tracker = TrainRunTracker(client.tracking_uri, run_id)
    for n in (1, 2):
        tracker.after_report(None, [_epoch(n)], None)
    # a worker group restarted from epoch 2's checkpoint re-sends epoch 2 with its first new epoch
    tracker.after_report(None, [_epoch(3, restored=_epoch(2))], None)
    # the final step rerun (a resumed search) with a fresh callback: Ray Train restores epoch 3
    TrainRunTracker(client.tracking_uri, run_id).after_report(None, [_epoch(3, restored=_epoch(3))], None)
    for key in ("epoch", "train_loss", "system/cpu_utilization_percentage"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    assert "time_compute_s" not in client.get_run(run_id).data.metrics
    assert "cfcml.retrained_epochs" not in client.get_run(run_id).data.tags


@pytest.mark.parametrize("restart_from, logged", [(1, 3), (2, 3), (1, 2), (0, 2)])
def test_epochs_retrained_after_a_restart_from_an_older_checkpoint_win(client: MlflowClient, exp_id: str,
                                                                       restart_from: int, logged: int) -> None:
    run_id = client.create_run(exp_id).info.run_id
    tracker = TrainRunTracker(client.tracking_uri, run_id)
    for n in range(1, logged + 1):
        tracker.after_report(None, [_epoch(n, loss=9.0)], None)  # values later discarded (from epoch restart_from+1)
    # the newest checkpoint was damaged (or the worker died before it): the group restarts from
    # an older one, re-sends it and retrains the epochs after it with other values
    retrained = list(range(restart_from + 1, logged + 2))
    for i, n in enumerate(retrained):
        restored = {"restored": _epoch(restart_from, loss=9.0)} if i == 0 and restart_from else {}
        tracker.after_report(None, [_epoch(n, loss=float(n), **restored)], None)
    shown = _shown(client, run_id, "train_loss")
    assert shown == {n: (float(n) if n > restart_from else 9.0) for n in range(1, logged + 2)}
    assert client.get_run(run_id).data.metrics["train_loss"] == float(logged + 1)
    tags = client.get_run(run_id).data.tags
    assert tags["cfcml.retrained_epochs"] == ",".join(str(n) for n in range(restart_from + 1, logged + 1))


def test_a_search_trials_retrained_epochs_win_and_re_sent_ones_add_nothing(client: MlflowClient, exp_id: str) -> None:
    from ray.tune.experiment import Trial

    from tuning.tracking.callbacks import SearchTracker

    parent = client.create_run(exp_id).info.run_id
    tracker = SearchTracker(client.tracking_uri, exp_id, parent, "search-x", "cv_macro_auc", ["a", "b", "c"],
                            "multiclass")
    trial = Trial("__fake", config={"loss.w_cp": 0.1}, trial_id="t1", stub=True)

    selection = EpochSelection("cv_macro_auc")  # what the trial's worker reports with each epoch

    def report(n: int, auc: float, t: int, **extra: object) -> None:
        values = {"epoch": n, "cv_macro_auc": auc}
        values.update(selection.update(values))
        tracker.on_trial_result(0, [trial], trial, {**values, "timestamp": t, "checkpoint_path": f"c{n}@{t}",
                                                    **extra})

    for n, auc in ((1, 0.6), (2, 0.7), (3, 0.8)):
        report(n, auc, 100 + n)
    assert tracker._best["t1"] == (0.8, "c3@103")
    # epoch 3's checkpoint was damaged: restart from epoch 1, epochs 2 and 3 retrained
    selection = EpochSelection("cv_macro_auc")
    selection.restore({"selected_cv_macro_auc": 0.6, "selected_epoch": 1})
    report(2, 0.55, 103, restored={"epoch": 1, "cv_macro_auc": 0.6})
    report(3, 0.58, 103)  # in the same second as the discarded epoch 3: still logged after it
    report(3, 0.58, 104, restored={"epoch": 3, "cv_macro_auc": 0.58})  # a finished run's re-send
    run_id = tracker._runs["t1"]
    assert _shown(client, run_id, "cv_macro_auc") == {1: 0.6, 2: 0.55, 3: 0.58}
    assert len(client.get_metric_history(run_id, "cv_macro_auc")) == 5  # the two discarded points stay
    metrics = client.get_run(run_id).data.metrics
    assert metrics["cv_macro_auc"] == 0.58 and metrics["selected_cv_macro_auc"] == 0.6
    assert tracker._best["t1"] == (0.6, "c1@101")  # the trial's plots come from epoch 1, not the discarded 3


def test_trial_and_final_runs_are_tagged_with_the_scan_backend_their_worker_reports(client: MlflowClient,
                                                                                    exp_id: str) -> None:
    """`cfcml.scan_backend` comes from the reports (`EpochReport.scan_backend`), set once per value."""
    from ray.tune.experiment import Trial

    from tuning.tracking.callbacks import SearchTracker
    from tuning.tracking.store import SCAN_BACKEND_TAG

    calls: list[tuple[str, str]] = []

    class Counting(MlflowClient):
        def set_tag(self, run_id, key, value, *args, **kwargs):
            if key == SCAN_BACKEND_TAG:
                calls.append((run_id, value))
            return super().set_tag(run_id, key, value, *args, **kwargs)

    final = client.create_run(exp_id).info.run_id
    tracker = TrainRunTracker(client.tracking_uri, final)
    tracker._client = Counting(client.tracking_uri)
    for n in (1, 2):
        tracker.after_report(None, [_epoch(n, scan_backend="chunked")], None)
    assert client.get_run(final).data.tags[SCAN_BACKEND_TAG] == "chunked" and calls == [(final, "chunked")]
    assert "scan_backend" not in client.get_run(final).data.metrics

    parent = client.create_run(exp_id).info.run_id
    search = SearchTracker(client.tracking_uri, exp_id, parent, "search-scan", "cv_macro_auc", ["a", "b"], "binary")
    search._client = Counting(client.tracking_uri)
    trial = Trial("__fake", config={"loss.w_cp": 0.1}, trial_id="s1", stub=True)
    search.on_trial_result(0, [trial], trial, {"epoch": 1, "timestamp": 1})  # an older worker: no field, no tag
    run_id = search._runs["s1"]
    assert SCAN_BACKEND_TAG not in client.get_run(run_id).data.tags
    for n, backend in ((1, "triton"), (2, "triton"), (3, "chunked")):  # e.g. resumed on a machine without a GPU
        search.on_trial_result(0, [trial], trial, {"epoch": n, "timestamp": n, "scan_backend": backend})
    assert client.get_run(run_id).data.tags[SCAN_BACKEND_TAG] == "chunked"
    assert calls[1:] == [(run_id, "triton"), (run_id, "chunked")]


def test_system_metrics_use_mlflows_own_names_and_stop_with_the_loop() -> None:
    from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor

    system = SystemMetrics(device=None, interval=0.05)
    try:
        deadline = time.perf_counter() + 0.3
        while time.perf_counter() < deadline:  # some work for the CPU figure
            sum(i * i for i in range(1000))
        values = system.epoch()
    finally:
        system.close()
    assert not system._thread.is_alive()
    mlflow_monitor = CPUMonitor()
    mlflow_monitor.collect_metrics()
    assert {f"system/{k}" for k in mlflow_monitor._metrics} <= set(values)
    assert 0 < values["system/cpu_utilization_percentage"] <= 100
    assert 0 < values["system/system_memory_usage_percentage"] < 100
    assert values["system/process_memory_rss_megabytes"] > 10
    assert not any(k.startswith("system/gpu_") for k in values)  # a CPU worker reports no GPU


def test_a_parent_run_left_without_a_state_file_is_reused_not_duplicated(client: MlflowClient, exp_id: str, prepared,
                                                                         tmp_path: Path) -> None:
    from tuning.hpo.driver import STATE_FILE, SearchState, _start_parent
    from tuning.hpo.run import SearchRun

    run = SearchRun.build("men", "smoke", data_root=prepared.out_dir, runs_dir=tmp_path / "runs")
    # the driver died right after creating the parent run: no state file, no parameters
    orphan = client.create_run(exp_id, tags={"cfcml.kind": "search", "cfcml.search": str(run.search_dir)})
    state = _start_parent(run, prepared, client.tracking_uri, "cv_macro_auc")
    assert state.parent_run_id == orphan.info.run_id
    assert SearchState.load(run.search_dir).parent_run_id == orphan.info.run_id
    assert client.get_run(orphan.info.run_id).data.params["search"] == "smoke"
    # a search folder deleted to start over: its finished parent stays as it was, a new one begins
    client.set_terminated(orphan.info.run_id, "FINISHED")
    (run.search_dir / STATE_FILE).unlink()
    assert _start_parent(run, prepared, client.tracking_uri, "cv_macro_auc").parent_run_id != orphan.info.run_id


VALUES = ["it's mine", 'the "best" one', "a'b\"c", "back\\slash", "/tmp/it's/runs/ray/x", "50% of_it's \"all\"",
          "tick`s", "plain"]


@pytest.mark.parametrize("value", VALUES)
def test_a_run_is_found_by_any_tag_value_quotes_and_wildcards_included(client: MlflowClient, value: str) -> None:
    from tuning.tracking.store import find_run, find_runs

    exp = client.create_experiment(f"quoting-{VALUES.index(value)}")
    wanted = client.create_run(exp, tags={"cfcml.search": value, "cfcml.kind": "search"}).info.run_id
    # look-alikes: what a LIKE pattern or a lost quote would also match
    for other in {value.replace("'", "_").replace('"', "_"), value.replace("'", ""), value + "x", value.upper()}:
        if other != value:
            client.create_run(exp, tags={"cfcml.search": other, "cfcml.kind": "search"})
    assert find_run(client, exp, **{"cfcml.search": value, "cfcml.kind": "search"}) == wanted
    assert [r.info.run_id for r in find_runs(client, exp, **{"cfcml.search": value})] == [wanted]


def test_filter_literals_follow_mlflows_quoting() -> None:
    from tuning.tracking.store import filter_literal

    assert filter_literal("men-smoke") == "'men-smoke'"
    assert filter_literal("it's") == '"it\'s"'
    assert filter_literal('say "hi"') == "'say \"hi\"'"
    with pytest.raises(ValueError, match="both quote characters"):
        filter_literal("it's \"x\"")


def test_no_filter_string_in_the_code_takes_a_value_unquoted() -> None:
    """Every run look-up goes through tuning.tracking.store's helpers: no f-string builds a filter with a
    value between quotes of its own."""
    import re

    from cfcml.config import PROJECT_ROOT

    pattern = re.compile(r"""f["'][^"'\n]*(?:=|LIKE)\s*'\{""")
    offenders = [f"{path.relative_to(PROJECT_ROOT)}:{n}"
                 for folder in ("tuning", "pipelines", "scripts", "cfcml", "tests", "benchmarks")
                 for path in sorted((PROJECT_ROOT / folder).rglob("*.py"))
                 for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert offenders == []


def test_a_search_named_with_an_apostrophe_under_such_a_runs_dir_finds_its_parent_again(
        client: MlflowClient, exp_id: str, prepared, tmp_path: Path) -> None:
    from tuning.hpo.driver import _start_parent
    from tuning.hpo.run import SearchRun

    run = SearchRun.build("men", "smoke", data_root=prepared.out_dir, runs_dir=tmp_path / "it's runs",
                          name="it's mine")
    orphan = client.create_run(exp_id, tags={"cfcml.kind": "search", "cfcml.search": str(run.search_dir)})
    assert _start_parent(run, prepared, client.tracking_uri, "cv_macro_auc").parent_run_id == orphan.info.run_id


@pytest.mark.parametrize("text,reason", [
    # a diverged trial: Tune's error.txt, the worker's exception at the end of a Ray traceback
    ("Failure # 1 (occurred at 2026-01-01)\nray.exceptions.RayTaskError(TrainingDiverged): ray::ImplicitFunc\n"
     "  File \"x.py\", line 3, in fit\ncfcml.training.TrainingDiverged: training diverged: trial ab12, fold 1, "
     "epoch 4: non-finite training loss (loss=nan) (lower optim.lr, or check the data)\n",
     "training diverged: trial ab12, fold 1, epoch 4: non-finite training loss (loss=nan) (lower optim.lr, "
     "or check the data)"),
    # any other failure: the traceback's verdict line, the last failure when a trial failed twice
    ("Failure # 1\nTraceback (most recent call last):\n  File \"a.py\"\nValueError: first\n"
     "Failure # 2\nTraceback (most recent call last):\n  File \"a.py\", line 1\nRuntimeError: CUDA out of memory\n",
     "RuntimeError: CUDA out of memory"),
    ("", "unknown (no error was recorded)"),
])
def test_a_failed_trial_gets_a_one_line_reason(tmp_path: Path, text: str, reason: str) -> None:
    from types import SimpleNamespace

    from tuning.tracking.callbacks import failure_reason

    (tmp_path / "error.txt").write_text(text)
    assert failure_reason(SimpleNamespace(error_file=str(tmp_path / "error.txt"))) == reason
    assert failure_reason(SimpleNamespace(error_file=None)) == "unknown (no error was recorded)"
