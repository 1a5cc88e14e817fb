"""No MLflow run is left RUNNING: however a block that owns a run ends (an error in the driver, an
exception in a Tune callback, a full disk, Ctrl-C), its runs end FAILED or KILLED with the reason
as a tag. Against a real MLflow store (SQLite in tmp), real Ray Tune, real disk-full errors."""
from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import pytest
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from cfcml.data.prepare import prepare_dataset
from cfcml.data.synthetic import make_men
from tuning.tracking.lifecycle import END_REASON_TAG, disk_full_message, is_disk_full, owned_run


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> MlflowClient:
    return MlflowClient(f"sqlite:///{tmp_path_factory.mktemp('lifecycle') / 'mlflow.db'}")


@pytest.fixture
def exp_id(client: MlflowClient, request: pytest.FixtureRequest, tmp_path: Path) -> str:
    return client.create_experiment(request.node.name[:200], tmp_path.as_uri())


def _status(client: MlflowClient, run_id: str) -> tuple[str, str | None]:
    run = client.get_run(run_id)
    return run.info.status, run.data.tags.get(END_REASON_TAG)


@pytest.mark.parametrize(("raised", "status", "reason"), [
    (RuntimeError("the driver broke"), "FAILED", "RuntimeError: the driver broke"),
    (KeyboardInterrupt(), "KILLED", "interrupted (Ctrl-C)"),
    (OSError(errno.ENOSPC, "No space left on device"), "FAILED", "disk full: OSError: [Errno 28]"),
])
def test_a_block_that_raises_ends_its_run_and_running_children_with_the_reason(
        client: MlflowClient, exp_id: str, raised: BaseException, status: str, reason: str) -> None:
    parent = client.create_run(exp_id).info.run_id
    running = client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
    finished = client.create_run(exp_id, tags={"mlflow.parentRunId": parent}).info.run_id
    client.set_terminated(finished, "FINISHED")
    with pytest.raises(type(raised)), owned_run(client, parent, children=True):
        raise raised
    assert _status(client, parent)[0] == status and _status(client, parent)[1].startswith(reason)
    assert _status(client, running)[0] == status and reason in _status(client, running)[1]
    assert _status(client, finished) == ("FINISHED", None)  # an ended run keeps its status


def test_a_run_the_block_ended_itself_keeps_its_status(client: MlflowClient, exp_id: str) -> None:
    run = client.create_run(exp_id).info.run_id
    with pytest.raises(RuntimeError), owned_run(client, run):
        client.set_terminated(run, "KILLED")  # e.g. a search interrupted, before it raises
        raise RuntimeError("interrupted")
    assert _status(client, run) == ("KILLED", None)
    done = client.create_run(exp_id).info.run_id
    with owned_run(client, done):
        pass
    assert _status(client, done) == ("FINISHED", "completed")


def test_a_driver_error_leaves_the_search_parent_run_failed_with_its_reason(client: MlflowClient, exp_id: str,
                                                                            tmp_path: Path) -> None:
    """A real driver error after the parent run exists: the search folder cannot be created (a file
    is where its parent folder should be)."""
    from tuning.hpo.driver import run_search
    from tuning.hpo.run import SearchRun

    root = make_men(tmp_path / "men", patients=12, seed=3, size=(16, 16, 4))
    prepared = prepare_dataset("men", root, folds=2, fold_seed=0, image_size=(16, 16, 4))
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "ray").write_text("not a folder")
    run = SearchRun.build("men", "smoke", data_root=prepared.out_dir, runs_dir=tmp_path / "runs",
                          tracking_uri=client.tracking_uri, name="broken")
    with pytest.raises(OSError):
        run_search(run, prepared)
    exp = client.get_experiment_by_name("cfcml-men")
    (parent,) = client.search_runs([exp.experiment_id], "tags.`cfcml.kind` = 'search'")
    assert parent.info.status == "FAILED"
    assert parent.data.tags[END_REASON_TAG].startswith(("FileExistsError", "NotADirectoryError"))


def test_full_disks_are_recognised_through_the_layers_that_wrap_them(tmp_path: Path) -> None:
    with pytest.raises(OSError) as enospc:  # a real ENOSPC: Linux's /dev/full
        with open("/dev/full", "w") as f:
            f.write("x")
            f.flush()
    assert is_disk_full(enospc.value)
    db = sqlite3.connect(tmp_path / "small.db")
    db.execute("PRAGMA max_page_count = 2")  # a database that cannot grow: SQLite's own error
    db.execute("CREATE TABLE t (x BLOB)")
    with pytest.raises(sqlite3.OperationalError) as full:
        for _ in range(10):
            db.execute("INSERT INTO t VALUES (zeroblob(4000))")
    assert "database or disk is full" in str(full.value) and is_disk_full(full.value)
    try:  # as MLflow passes it on: its own exception, raised from the store's
        try:
            raise full.value
        except sqlite3.OperationalError as exc:
            raise MlflowException(f"(sqlite3.OperationalError) {exc}") from exc
    except MlflowException as wrapped:
        assert is_disk_full(wrapped)
        message = disk_full_message(wrapped, tmp_path / "runs", needed=300 * 2**20)
    assert message.startswith(f"the disk holding {tmp_path / 'runs'} is full (database or disk is full; ")
    assert message.endswith("MB free now, about 300 MB needed); free space, then continue with the same command "
                            "plus --resume")
    assert not is_disk_full(RuntimeError("the driver broke"))
    assert disk_full_message(RuntimeError("x"), tmp_path) is None


def test_an_exception_in_the_tracker_at_a_trials_end_fails_the_search_and_ends_every_run(
        client: MlflowClient, exp_id: str, tmp_path: Path) -> None:
    """A real failure inside Tune's callback: the trial's MLflow run was deleted (the UI's delete)
    while the trial ran, so the tracker's end-of-trial update raises. The other trial, still
    running, and the parent run end FAILED with the reason."""
    import time

    import ray
    from ray import tune
    from ray.tune.error import TuneError

    from tuning.tracking.callbacks import SearchTracker
    from tuning.tracking.store import find_run

    parent = client.create_run(exp_id, tags={"cfcml.kind": "search"}).info.run_id
    uri = client.tracking_uri
    done = tmp_path / "done"
    done.mkdir()

    def trainable(config: dict) -> None:
        tune.report({"epoch": 1, "cv_score": 0.5})
        if config["doomed"]:
            c = MlflowClient(uri)
            run_id = find_run(c, exp_id, **{"cfcml.trial_id": tune.get_context().get_trial_id()})
            c.delete_run(run_id)
            return
        time.sleep(300)  # still running when the other trial ends
        (done / "sleeper-finished").write_text("")

    tracker = SearchTracker(uri, exp_id, parent, "lifecycle", "cv_score", ["a", "b"], "binary")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        tuner = tune.Tuner(tune.with_resources(trainable, {"cpu": 1}),
                           param_space={"doomed": tune.grid_search([False, True])},
                           run_config=tune.RunConfig(name="lifecycle", storage_path=str(tmp_path / "ray"),
                                                     callbacks=[tracker], verbose=0))
        with pytest.raises(TuneError, match="must be in the .active. state"), owned_run(client, parent, children=True):
            tuner.fit()
        assert not (done / "sleeper-finished").exists()  # the callback's error ended the search, not the sleeper
    finally:
        if started:
            ray.shutdown()
    status, reason = _status(client, parent)
    assert status == "FAILED" and "must be in the 'active' state" in reason, reason
    survivors = [r for r in client.search_runs([exp_id], "tags.`cfcml.kind` = 'trial'")]
    assert len(survivors) == 1  # the other trial's run, not the deleted one
    assert survivors[0].info.status == "FAILED"
    assert survivors[0].data.tags[END_REASON_TAG].startswith("parent run ended: ")


def test_trials_that_failed_on_a_full_disk_fail_the_search_with_one_line(client: MlflowClient, exp_id: str,
                                                                         tmp_path: Path) -> None:
    from tuning.records.outcome import SearchOutcome, TrialResult
    from tuning.workflows.search import stop_on_full_disk

    parent = client.create_run(exp_id).info.run_id
    client.set_terminated(parent, "FINISHED")  # the driver saw scored trials
    error = ("Traceback (most recent call last):\n  File \"trainer.py\", line 230, in train_loop_per_worker\n"
             "OSError: [Errno 28] No space left on device: '/runs/ray/train/trial_ab12cd34/checkpoint_x/state.pt'")
    outcome = SearchOutcome(dataset="men", metric="cv_macro_auc", search_dir="", prepared_dir="",
                            tracking_uri=client.tracking_uri, experiment_id=exp_id, parent_run_id=parent,
                            trials=[TrialResult("a", score=0.7), TrialResult("b", error=error)])
    with pytest.raises(OSError) as raised:
        stop_on_full_disk(outcome)
    assert raised.value.errno == errno.ENOSPC
    message = disk_full_message(raised.value, tmp_path / "runs", needed=100 * 2**20)
    assert message.startswith(f"the disk holding {tmp_path / 'runs'} is full ([Errno 28] a trial could not write "
                              f"to the disk: OSError: [Errno 28] No space left on device: '/runs/ray/train/")
    assert _status(client, parent) == ("FAILED", "disk full: a trial failed: OSError: [Errno 28] No space left on "
                                                 "device: '/runs/ray/train/trial_ab12cd34/checkpoint_x/state.pt'")
    outcome.trials = [TrialResult("a", score=0.7), TrialResult("b", error="ValueError: nan loss")]
    stop_on_full_disk(outcome)  # other failures are the search's own business


def test_the_disk_guard_stops_a_search_while_one_more_checkpoint_fits(tmp_path: Path) -> None:
    import shutil

    from tuning.tracking.lifecycle import RESERVE_BYTES, DiskGuard, release_reserves, reserve_space

    free = shutil.disk_usage(tmp_path).free
    DiskGuard(tmp_path, min_free=2**20).on_step_begin(0, [])  # room: nothing happens
    with pytest.raises(OSError) as raised:
        DiskGuard(tmp_path, min_free=free + 2**30).on_step_begin(0, [])
    assert raised.value.errno == errno.ENOSPC and f"under {tmp_path}" in str(raised.value)
    assert is_disk_full(raised.value)

    reserve = reserve_space(tmp_path / "runs")
    assert reserve is not None and reserve.stat().st_size == RESERVE_BYTES
    release_reserves()  # what a full disk (or the command's end) does
    assert not reserve.exists()


def test_a_full_disk_releases_the_reserve_before_ending_the_runs(client: MlflowClient, exp_id: str,
                                                                 tmp_path: Path) -> None:
    from tuning.tracking.lifecycle import reserve_space

    reserve = reserve_space(tmp_path)
    run = client.create_run(exp_id).info.run_id
    with pytest.raises(OSError), owned_run(client, run):
        raise OSError(errno.ENOSPC, "No space left on device")
    assert not reserve.exists()
    assert _status(client, run)[0] == "FAILED"


def test_a_run_that_continues_is_running_again_without_its_old_reason(client: MlflowClient, exp_id: str) -> None:
    from tuning.tracking.lifecycle import reopen_run

    run = client.create_run(exp_id).info.run_id
    with pytest.raises(KeyboardInterrupt), owned_run(client, run):
        raise KeyboardInterrupt
    reopen_run(client, run)  # --resume
    assert _status(client, run) == ("RUNNING", None)
    with owned_run(client, run):
        pass
    assert _status(client, run) == ("FINISHED", "completed")
