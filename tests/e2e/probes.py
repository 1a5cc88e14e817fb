"""Ray Train loops used by the e2e tests (pickled by value, so workers need not import tests/)."""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

E2E_SIZE = (32, 32, 8)  # the smallest volume the mamba_resnet encoder takes (stride 16 leaves 2x2)


def sync_probe_loop(config: dict[str, Any]) -> None:
    """Train one epoch of one fold with DDP and check, after every optimiser step, that all ranks
    hold identical weights and prototype banks; report the largest difference seen."""
    import os

    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from cfcml.data.manifest import PreparedDataset
    from cfcml.training import CrossValidation, Split

    cfg = config["experiment"]
    prepared = PreparedDataset.load(config["prepared_dir"])
    cv = CrossValidation(prepared, [Split(*prepared.fold_frames(0))], cfg)
    worst = {"param": 0.0, "bank": 0.0}
    steps = [0]

    def check(k: int, fold: Any) -> None:
        flat = torch.cat([p.detach().flatten() for p in fold.model.parameters()])
        bank = torch.cat([b.float().flatten() for b in fold.criterion.bank.buffers()])
        for name, vec in (("param", flat), ("bank", bank)):
            gathered = [torch.zeros_like(vec) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, vec)
            worst[name] = max(worst[name], max(float((g - vec).abs().max()) for g in gathered))
        steps[0] += 1

    cv.step_hook = check
    cv.run_epoch()
    nodes = [None] * dist.get_world_size()
    dist.all_gather_object(nodes, ray.get_runtime_context().get_node_id())
    niceness = [None] * dist.get_world_size()
    dist.all_gather_object(niceness, os.nice(0))
    metrics = {"max_param_diff": worst["param"], "max_bank_diff": worst["bank"], "steps": steps[0],
               "world_size": dist.get_world_size(), "distinct_nodes": len(set(nodes)), "epoch": cv.epoch,
               "max_niceness": max(niceness)}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / "done").write_text("1")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def run_probe(prepared_dir: str, experiment: Any, storage: str, name: str) -> dict[str, Any]:
    import probes
    from ray import cloudpickle
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cloudpickle.register_pickle_by_value(probes)
    trainer = TorchTrainer(
        sync_probe_loop,
        train_loop_config={"experiment": experiment, "prepared_dir": prepared_dir},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(name=name, storage_path=storage),
    )
    return trainer.fit().metrics
