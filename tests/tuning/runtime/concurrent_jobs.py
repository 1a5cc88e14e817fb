"""Job functions for tests/tuning/runtime/test_concurrent.py, run in the child processes of
`tuning.runtime.concurrent` (imported there by name: this folder is on the children's PYTHONPATH)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from cfcml.config import ConfigError


def report(folder: str, name: str, max_concurrent: int | None = None) -> None:
    """Print two lines with an accent, then record the share and what a task on the cluster sees."""
    import ray

    @ray.remote(num_cpus=1)
    def probe() -> dict:
        return {"timeout": os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"), "niceness": os.nice(0)}

    print(f"{name}: first line, Zürich")
    print(f"{name}: second line")
    Path(folder, f"{name}.json").write_text(json.dumps({"share": max_concurrent, "pid": os.getpid(),
                                                        "task": ray.get(probe.remote()),
                                                        "address": ray.get_runtime_context().gcs_address}))


def refuse(key: str, max_concurrent: int | None = None) -> None:
    raise ConfigError("no such value", key)


def fail(max_concurrent: int | None = None) -> None:
    raise RuntimeError("disk on fire\nsecond line not shown")


def wait_for_ctrl_c(folder: str, name: str, max_concurrent: int | None = None) -> None:
    """Mark itself started, then wait; on Ctrl-C record how many it got and end as interrupted."""
    Path(folder, f"{name}.started").write_text("")
    try:
        time.sleep(120)
    except KeyboardInterrupt:
        Path(folder, f"{name}.interrupted").write_text("")
        raise
