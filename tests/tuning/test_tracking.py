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
from tuning.tracking import (
    EXPERIMENT_KIND,
    EXPERIMENT_KIND_TAG,
    TrainRunTracker,
    experiment_id,
    git_commit,
    log_provenance,
)
from tuning.trainer import SystemMetrics


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


def test_each_reported_epoch_reaches_the_run_once_across_restarts_and_reruns(client: MlflowClient, exp_id: str) -> None:
    run_id = client.create_run(exp_id).info.run_id

    def epoch(n: int, **extra: object) -> dict:
        return {"epoch": n, "train_loss": 1.0 / n, "system/cpu_utilization_percentage": 50.0 + n,
                "time_compute_s": float(n), **extra}

    tracker = TrainRunTracker(client.tracking_uri, run_id)
    for n in (1, 2):
        tracker.after_report(None, [epoch(n)], None)
    # a worker group restarted from epoch 1's checkpoint re-sends epoch 1 and runs epoch 2 again
    tracker.after_report(None, [epoch(2, restored=epoch(1))], None)
    tracker.after_report(None, [epoch(3)], None)
    # the final step rerun (a resumed search) with a fresh callback: Ray Train restores epoch 3
    TrainRunTracker(client.tracking_uri, run_id).after_report(None, [epoch(3, restored=epoch(3))], None)
    for key in ("epoch", "train_loss", "system/cpu_utilization_percentage"):
        history = client.get_metric_history(run_id, key)
        assert sorted(m.step for m in history) == [1, 2, 3], key
    assert client.get_metric_history(run_id, "train_loss")[1].value == pytest.approx(0.5)  # the first epoch 2
    assert "time_compute_s" not in client.get_run(run_id).data.metrics


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
    from tuning.driver import STATE_FILE, SearchState, _start_parent
    from tuning.run import SearchRun

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
    from tuning.tracking import find_run, find_runs

    exp = client.create_experiment(f"quoting-{VALUES.index(value)}")
    wanted = client.create_run(exp, tags={"cfcml.search": value, "cfcml.kind": "search"}).info.run_id
    # look-alikes: what a LIKE pattern or a lost quote would also match
    for other in {value.replace("'", "_").replace('"', "_"), value.replace("'", ""), value + "x", value.upper()}:
        if other != value:
            client.create_run(exp, tags={"cfcml.search": other, "cfcml.kind": "search"})
    assert find_run(client, exp, **{"cfcml.search": value, "cfcml.kind": "search"}) == wanted
    assert [r.info.run_id for r in find_runs(client, exp, **{"cfcml.search": value})] == [wanted]


def test_filter_literals_follow_mlflows_quoting() -> None:
    from tuning.tracking import filter_literal

    assert filter_literal("men-smoke") == "'men-smoke'"
    assert filter_literal("it's") == '"it\'s"'
    assert filter_literal('say "hi"') == "'say \"hi\"'"
    with pytest.raises(ValueError, match="both quote characters"):
        filter_literal("it's \"x\"")


def test_no_filter_string_in_the_code_takes_a_value_unquoted() -> None:
    """Every run look-up goes through tuning.tracking's helpers: no f-string builds a filter with a
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
    from tuning.driver import _start_parent
    from tuning.run import SearchRun

    run = SearchRun.build("men", "smoke", data_root=prepared.out_dir, runs_dir=tmp_path / "it's runs",
                          name="it's mine")
    orphan = client.create_run(exp_id, tags={"cfcml.kind": "search", "cfcml.search": str(run.search_dir)})
    assert _start_parent(run, prepared, client.tracking_uri, "cv_macro_auc").parent_run_id == orphan.info.run_id
