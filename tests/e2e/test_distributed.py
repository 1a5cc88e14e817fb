"""Data-parallel training with 2 Ray Train workers: on one node, and across two simulated nodes."""
from __future__ import annotations

from pathlib import Path

import pytest
from probes import run_probe

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_workers_hold_identical_weights_after_every_step(ray_local, men_prepared, tiny_experiment,
                                                             tmp_path: Path) -> None:
    m = run_probe(str(men_prepared.out_dir), tiny_experiment, str(tmp_path), "ddp")
    assert m["world_size"] == 2
    assert m["steps"] >= 2
    assert m["max_param_diff"] == 0.0
    assert m["max_bank_diff"] < 1e-6
    assert m["max_niceness"] == 0


def test_two_workers_across_two_nodes(men_prepared, tiny_experiment, tmp_path: Path) -> None:
    import ray
    from ray.cluster_utils import Cluster

    from tuning.runtime.ray_cluster import LOCAL_RAY_SYSTEM_CONFIG, local_runtime_env

    if ray.is_initialized():
        ray.shutdown()
    # a free dashboard port: Cluster asks for Ray's default one, taken when another Ray runs on the
    # machine. The workers at the niceness of the machine's other processes, as a local Ray's: at
    # Ray's default of 15, beside more busy processes than cores, each worker got about 1/28 of a
    # core's share and the run took more than the test's 600 s (36 s quiet; docs/architecture.md, "Edges").
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "include_dashboard": True, "dashboard_port": _free_port(),
        "_system_config": dict(LOCAL_RAY_SYSTEM_CONFIG)})
    cluster.add_node(num_cpus=1)
    try:
        ray.init(address=cluster.address, runtime_env=local_runtime_env(), log_to_driver=False)
        cluster.wait_for_nodes()
        m = run_probe(str(men_prepared.out_dir), tiny_experiment, str(tmp_path), "two-nodes")
        assert m["distinct_nodes"] == 2
        assert m["max_niceness"] == 0  # on both nodes: the head's system config reaches the other raylet
        assert m["max_param_diff"] == 0.0
    finally:
        ray.shutdown()
        cluster.shutdown()
