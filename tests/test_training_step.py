"""The training step's speed options (docs/gpu.md): device-side loss sums, fused Adam, the loader,
the largest batch that fits; and one CUDA step with every GPU option on (skipped without CUDA)."""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from tiny_men import SIZE, TINY_MODEL, prepare_tiny_men, tiny_experiment

from cfcml.config import ConfigError, ExperimentConfig, ModelConfig, TrainConfig, from_dict, load_experiment
from cfcml.losses import CFCMLLoss
from cfcml.networks import CFCML, ImageInput
from cfcml.training import CrossValidation, Split, largest_batch, make_optimizer


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory):
    return prepare_tiny_men(tmp_path_factory.mktemp("step"), patients=24, seed=5)


def tiny_cfg(**train) -> ExperimentConfig:
    return tiny_experiment(batch_size=train.pop("batch_size", 4), train=train)


def final_cv(prepared, cfg: ExperimentConfig, device: str = "cpu") -> CrossValidation:
    return CrossValidation(prepared, [Split(prepared.dev_frame(), None)], cfg, device=device)


def test_epoch_loss_means_are_the_means_of_the_per_step_values(prepared):
    """Sums stay on the device now; the returned means must equal the old per-step float sums."""
    torch.manual_seed(0)
    cv = final_cv(prepared, tiny_cfg())
    seen: list[dict[str, float]] = []
    cv.folds[0].criterion.register_forward_hook(
        lambda m, i, out: seen.append({k: float(v.detach()) for k, v in out.items()}))
    stats = cv.train_epoch(0)
    assert len(seen) >= 3
    expected = {}
    for step in seen:
        for key, value in step.items():
            expected[key] = expected.get(key, 0.0) + value
    assert stats == {f"train_{key}": total / len(seen) for key, total in expected.items()}
    assert all(math.isfinite(v) for v in stats.values())


def test_every_epoch_draws_a_new_batch_order(prepared):
    torch.manual_seed(0)
    cv = final_cv(prepared, tiny_cfg())
    orders: list[list[list[float]]] = [[], []]
    # the clinical values identify a patient (the images are augmented differently every epoch)
    cv.folds[0].model.register_forward_pre_hook(lambda m, args: orders[cv.epoch].extend(args[1].tolist()))
    for _ in range(2):
        cv.train_epoch(0)
        cv.epoch += 1  # what run_epoch does after all folds
    assert len(orders[0]) == len(orders[1]) >= 8
    assert orders[0] != orders[1]


def test_adam_is_fused_only_for_cuda_parameters_and_fused_steps_like_foreach():
    torch.manual_seed(0)
    # no dropout: both copies must see the same function
    model = CFCML([ImageInput(3, 1, SIZE)], 2, (3,), 2, ModelConfig(**{**TINY_MODEL, "dropout": 0.0}))
    cfg = load_experiment("men").optim
    assert not make_optimizer(model, cfg).param_groups[0]["fused"]  # CPU default: unchanged
    twin = CFCML([ImageInput(3, 1, SIZE)], 2, (3,), 2, model.cfg)
    twin.load_state_dict(model.state_dict())
    opts = [make_optimizer(model, cfg), make_optimizer(twin, cfg, fused=True)]
    assert opts[1].param_groups[0]["fused"]
    x = [torch.randn(2, 1, *SIZE)], torch.randn(2, 2), torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 1).long()
    for net, opt in zip((model, twin), opts):
        for _ in range(2):
            opt.zero_grad()
            net(*x).logits.square().sum().backward()
            opt.step()
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_loader_workers_prefetch_and_stay_alive(prepared):
    cv = final_cv(prepared, tiny_cfg(loader_workers=1, prefetch_factor=3))
    loader = cv.folds[0].train_loader
    assert (loader.num_workers, loader.prefetch_factor, loader.persistent_workers) == (1, 3, True)
    assert not loader.pin_memory  # pinned host memory only pays with a GPU to copy to
    with pytest.raises(ConfigError, match=r"^config\.train\.prefetch_factor: "):
        from_dict(TrainConfig, {"prefetch_factor": 0}, "config.train")


def test_gpu_options_default_off_except_tf32_and_change_nothing_on_cpu(prepared):
    t = TrainConfig()
    assert (t.amp, t.tf32, t.channels_last, t.compile) == (False, True, False, False)
    stats = []
    for options in ({}, {"amp": True, "channels_last": True, "compile": True}):
        torch.manual_seed(0)
        cv = final_cv(prepared, tiny_cfg(**options))
        stats.append(cv.train_epoch(0))
        assert cv.folds[0].net is cv.folds[0].model  # nothing compiled or wrapped on CPU
    assert stats[0] == stats[1]


def test_cuda_graphs_is_off_by_default_and_exclusive_with_compile():
    assert TrainConfig().cuda_graphs is False
    with pytest.raises(ConfigError, match=r"^config\.train\.cuda_graphs: cannot be combined with train\.compile"):
        from_dict(TrainConfig, {"cuda_graphs": True, "compile": True}, "config.train")


def test_cuda_graphs_change_no_number_on_cpu(prepared):
    """Two epochs of both folds, with a ragged last batch (10 training rows a fold, batch 6): losses,
    validation metrics and the trained weights are bit-identical with the option on and off."""
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        cv = CrossValidation(prepared, [Split(*prepared.fold_frames(k)) for k in range(2)],
                             tiny_cfg(batch_size=6, cuda_graphs=graphs))
        metrics = [cv.run_epoch()[0] for _ in range(2)]
        assert all(f.graphed is None for f in cv.folds)  # nothing captured on CPU
        runs.append((metrics, [p.detach().clone() for p in cv.folds[1].model.parameters()]))
    assert runs[0][0] == runs[1][0]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))


@pytest.mark.parametrize("labels", [[0, 3], [-1, 0]])
def test_graphed_step_checks_labels_on_the_host_before_anything_runs(labels):
    """Captures cannot read label values, so GraphedStep checks host labels itself (ValueError)."""
    from cfcml.graphs import GraphedStep

    model = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="CUDA device"):
        GraphedStep(lambda *a: {}, torch.optim.Adam(model.parameters()), 2, 3, "cpu")
    if not torch.cuda.is_available():
        pytest.skip("the label check of a constructed GraphedStep needs CUDA")
    model.cuda()
    step = GraphedStep(lambda *a: pytest.fail("the step ran"), torch.optim.Adam(model.parameters(), fused=True),
                       2, 3, "cuda")
    batch = {"images": [torch.zeros(2, 1, 4, 4)], "num": torch.zeros(2, 1), "num_missing": torch.zeros(2, 1).bool(),
             "cat": torch.zeros(2, 1).long(), "label": torch.tensor(labels)}
    with pytest.raises(ValueError, match="labels out of range"):
        step(batch)


class StepOnBatch:
    """One real training step (forward, loss, backward) of a tiny CFCML on `batch` random samples."""

    def __init__(self):
        torch.manual_seed(0)
        self.model = CFCML([ImageInput(3, 1, SIZE)] * 2, 2, (3,), 2, ModelConfig(**TINY_MODEL))
        self.loss = CFCMLLoss(3, 2, 32)
        self.tried: list[int] = []

    def __call__(self, batch: int) -> None:
        self.tried.append(batch)
        images = [torch.randn(batch, 1, *SIZE) for _ in range(2)]
        out = self.model(images, torch.randn(batch, 2), torch.zeros(batch, 2, dtype=torch.bool),
                         torch.zeros(batch, 1, dtype=torch.long))
        self.loss(out.logits, out.features, torch.arange(batch) % 2)["loss"].backward()
        self.model.zero_grad(set_to_none=True)


def test_largest_batch_halves_until_a_real_step_fits_the_memory_budget():
    step = StepOnBatch()
    # what the activations of a 4- and an 8-sample step take (autograd's saved tensors, measured)
    need = {}
    for b in (4, 8):
        saved: dict = {}

        def pack(t: torch.Tensor, saved=saved) -> torch.Tensor:
            saved[(t.untyped_storage().data_ptr(), t.dtype)] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            step(b)
        need[b] = sum(saved.values())
    assert need[8] > need[4] * 1.5  # activations grow with the batch
    step.tried.clear()
    budget = (need[4] + need[8]) // 2
    assert largest_batch(step, 32, budget_bytes=budget, device="cpu") == 4
    assert step.tried == [32, 16, 8, 4]
    assert largest_batch(step, 6) == 6  # no budget, no out-of-memory error: the first try fits
    with pytest.raises(torch.cuda.OutOfMemoryError, match="budget"):
        largest_batch(step, 4, budget_bytes=1, device="cpu")
    with pytest.raises(ValueError):
        largest_batch(step, 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_with_every_gpu_option(prepared):
    torch.manual_seed(0)
    cfg = tiny_cfg(amp=True, channels_last=True, loader_workers=2)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan="auto"))
    cv = final_cv(prepared, cfg, device="cuda")
    fold = cv.folds[0]
    assert fold.optimizer.param_groups[0]["fused"] and fold.train_loader.pin_memory
    stats = cv.train_epoch(0)
    assert all(math.isfinite(v) for v in stats.values())
    assert torch.backends.cuda.matmul.allow_tf32
    conv = next(m for m in fold.model.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    step = StepOnBatch()
    step.model.cuda()
    step.loss.cuda()
    assert largest_batch(lambda b: _cuda_step(step, b), 64, budget_bytes=2**40) == 64


def _cuda_step(step: StepOnBatch, batch: int) -> None:
    images = [torch.randn(batch, 1, *SIZE, device="cuda") for _ in range(2)]
    out = step.model(images, torch.randn(batch, 2, device="cuda"), torch.zeros(batch, 2, dtype=torch.bool,
                     device="cuda"), torch.zeros(batch, 1, dtype=torch.long, device="cuda"))
    step.loss(out.logits, out.features, torch.arange(batch, device="cuda") % 2)["loss"].backward()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("amp", [False, True])
def test_cuda_graphs_step_gives_the_eager_losses(prepared, amp):
    """Five epochs of 20 rows at batch 12 (a full batch and a ragged 8-row one, run eagerly): the
    full batches of epochs 1 and 2 are the eager warm-up; epoch 3 captures and replays; epoch 4
    captures again (the warm-up learning rate changed) and replays; epoch 5 replays (it did not).
    Losses as the eager step's, to float32 (bf16 under amp) rounding; weights within a few Adam steps
    (a near-zero gradient whose sign flips moves a weight by 2 lr either way)."""
    runs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        cfg = tiny_cfg(batch_size=12, cuda_graphs=graphs, amp=amp, tf32=False)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, dropout=0.0, scan="chunked"),
                                  optim=dataclasses.replace(cfg.optim, warmup_epochs=4))
        cv = final_cv(prepared, cfg, device="cuda")
        stats = []
        for epoch in range(5):
            cv.epoch = epoch
            stats.append(cv.train_epoch(0))
        graphed = cv.folds[0].graphed
        if graphs:
            assert graphed is not None and not graphed.failed and (graphed.replays, graphed.captures) == (3, 2)
        runs.append((stats, [p.detach().clone() for p in cv.folds[0].model.parameters()]))
    for eager, graphed_stats in zip(runs[0][0], runs[1][0]):
        assert eager.keys() == graphed_stats.keys()
        for key in eager:
            assert graphed_stats[key] == pytest.approx(eager[key], rel=3e-2 if amp else 1e-3, abs=1e-5), key
    for a, b in zip(runs[0][1], runs[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-2, atol=5e-3)


def test_graphed_forward_runs_the_model_itself_off_cuda():
    from cfcml.graphs import GraphedForward

    torch.manual_seed(0)
    model = CFCML([ImageInput(3, 1, SIZE)], 2, (3,), 2, ModelConfig(**TINY_MODEL)).eval()
    wrapped = GraphedForward(model, batch_size=2)
    x = [torch.randn(2, 1, *SIZE)], torch.randn(2, 2), torch.zeros(2, 2, dtype=torch.bool), torch.zeros(2, 1).long()
    with torch.no_grad():
        assert torch.equal(wrapped(*x).logits, model(*x).logits)
    assert (wrapped.replays, wrapped.graph) == (0, None)
    with pytest.raises(ValueError):
        GraphedForward(model, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graphs_validation_gives_the_eager_probabilities(prepared):
    """10 validation rows at batch 4: warm-up, capture + replay, then the ragged 2 rows eagerly."""
    probs = []
    for graphs in (False, True):
        torch.manual_seed(0)
        cfg = tiny_cfg(batch_size=4, cuda_graphs=graphs)
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, scan="chunked"))
        cv = CrossValidation(prepared, [Split(*prepared.fold_frames(0))], cfg, device="cuda")
        fold = cv.folds[0]
        cv._prepare_step(fold)
        probs.append(cv.predict(fold, fold.val_set))
        if graphs:
            assert fold.eval_graphed is not None and fold.eval_graphed.replays == 1
    assert probs[0].shape == (10, 3)
    torch.testing.assert_close(torch.from_numpy(probs[1]), torch.from_numpy(probs[0]), rtol=1e-4, atol=1e-5)
