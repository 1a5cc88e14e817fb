"""Experiment config: every bad key or value fails at load, naming the dotted key."""
from __future__ import annotations

import dataclasses
import math

import pytest

from cfcml.config import (
    ALLOWS_INF,
    CONF_DIR,
    ConfigError,
    DuplicateKeyError,
    ExperimentConfig,
    LossConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    check_floats,
    deep_merge,
    from_dict,
    load_experiment,
    load_yaml,
)

MEN_YAML = CONF_DIR / "datasets" / "men.yaml"


def load(**sections):
    return from_dict(ExperimentConfig, {"dataset": "men", **sections})


def test_defaults_and_typed_values():
    cfg = load(model={"mixer_stages": [3, 4], "pretrained": None}, optim={"lr": "5e-4"},
               train={"image_size": [32, 32, 8]}, loss={"momentum": 0})
    assert cfg.model.mixer_stages == (3, 4) and cfg.model.dim == 128 and cfg.model.pretrained is None
    assert cfg.optim.lr == 5e-4  # YAML 1.1 reads 5e-4 as a string
    assert cfg.train.image_size == (32, 32, 8)
    assert cfg.loss.momentum == 0.0 and isinstance(cfg.loss.momentum, float)
    assert from_dict(ExperimentConfig, cfg.to_dict()) == cfg


@pytest.mark.parametrize("data,key", [
    ({"modle": {}}, "config.modle"),
    ({"model": {"dimm": 64}}, "config.model.dimm"),
    ({"loss": {"tau": 0.1}}, "config.loss.tau"),
    ({"train": {"epoch": 3}}, "config.train.epoch"),
])
def test_unknown_key(data, key):
    with pytest.raises(ConfigError, match=rf"^{key}: unknown key"):
        load(**data)


@pytest.mark.parametrize("data,key", [
    ({"model": {"dim": "big"}}, "config.model.dim"),
    ({"model": {"dim": 1.5}}, "config.model.dim"),
    ({"model": {"dim": True}}, "config.model.dim"),  # bool is not an int here
    ({"model": {"dim": None}}, "config.model.dim"),
    ({"model": {"encoder": "resnet"}}, "config.model.encoder"),
    ({"model": {"variant": "early_concat"}}, "config.model.variant"),
    ({"model": {"mixer_stages": 3}}, "config.model.mixer_stages"),
    ({"model": {"mixer_stages": [1, "x"]}}, r"config.model.mixer_stages\[1\]"),
    ({"model": {"pretrained": 3}}, "config.model.pretrained"),
    ({"model": {"cie": "yes"}}, "config.model.cie"),
    ({"model": 3}, "config.model"),
    ({"loss": {"tau_sam": "warm"}}, "config.loss.tau_sam"),
    ({"loss": {"fine": 1}}, "config.loss.fine"),
    ({"optim": {"lr": [1e-3]}}, "config.optim.lr"),
    ({"train": {"image_size": [32, "x"]}}, r"config.train.image_size\[1\]"),
])
def test_bad_type(data, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load(**data)


@pytest.mark.parametrize("data,key", [
    ({"model": {"dim": 0}}, "config.model.dim"),
    ({"model": {"latents_img": -1}}, "config.model.latents_img"),
    ({"model": {"heads": 3}}, "config.model.heads"),  # 128 is not divisible by 3
    ({"model": {"mixer_stages": [0, 5]}}, "config.model.mixer_stages"),
    ({"model": {"swin_depths": [2, 2, 6]}}, "config.model.swin_depths"),
    ({"model": {"swin_patch": 0}}, "config.model.swin_patch"),
    ({"loss": {"tau_cp": 0.0}}, "config.loss.tau_cp"),
    ({"loss": {"momentum": 1.0}}, "config.loss.momentum"),
    ({"loss": {"momentum": -0.1}}, "config.loss.momentum"),
    ({"optim": {"lr": -1e-4}}, "config.optim.lr"),
    ({"train": {"folds": 1}}, "config.train.folds"),
    ({"train": {"batch_size": 0}}, "config.train.batch_size"),
])
def test_out_of_range(data, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load(**data)


@pytest.mark.parametrize("data,key", [
    ({"model": {"dropout": 1.5}}, "config.model.dropout"),
    ({"loss": {"w_sam": -0.1}}, "config.loss.w_sam"),
    ({"optim": {"weight_decay": -1.0}}, "config.optim.weight_decay"),
    ({"optim": {"gamma": 0.0}}, "config.optim.gamma"),
    ({"train": {"image_size": [32, 0, 8]}}, "config.train.image_size"),
    ({"model": {"swin_heads": [3, 0, 12, 24]}}, "config.model.swin_heads"),
    # swin stage i has encoder_width * 2**i channels, split over swin_heads[i] heads
    ({"model": {"encoder": "swin", "encoder_width": 96, "swin_heads": [5, 6, 12, 24]}}, "config.model.swin_heads"),
])
def test_out_of_range_caught_at_load(data, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        load(**data)


def test_required_key_is_missing():
    with pytest.raises(ConfigError, match=r"^config.dataset: required key is missing"):
        from_dict(ExperimentConfig, {})


def test_replace_with_dotted_overrides():
    cfg = load()
    new = cfg.replace({"loss.tau_sam": 0.1, "model": {"cie": False}})
    assert new.loss.tau_sam == 0.1 and not new.model.cie and new.model.dim == cfg.model.dim
    assert cfg.loss.tau_sam == 0.07  # the original is untouched
    with pytest.raises(ConfigError, match=r"^config.loss.tau_sam: must be > 0"):
        cfg.replace({"loss.tau_sam": -1.0})
    with pytest.raises(ConfigError, match=r"^config.loss.bogus: unknown key"):
        cfg.replace({"loss.bogus": 1})


def test_deep_merge_rejects_a_key_below_a_value():
    with pytest.raises(ConfigError, match="dataset"):
        deep_merge({"dataset": "men"}, {"dataset.name": "x"})


def test_shipped_experiments_load_with_the_public_settings():
    men = load_experiment("men")
    assert men.dataset == "men"
    assert men.model == ModelConfig()  # the defaults are the public MEN model
    assert (men.loss.w_sam, men.loss.w_up, men.loss.w_cp) == (0.06, 0.04, 0.24)
    derm = load_experiment("derm7pt", {"train.epochs": 2})
    assert derm.model.encoder == "swin" and derm.model.share_encoder and derm.model.swin_patch == 4
    assert (derm.model.latents_img, derm.model.latents_tab) == (32, 24)
    assert (derm.loss.w_sam, derm.loss.w_up, derm.loss.w_cp) == (0.04, 0.06, 0.18)
    assert derm.train.epochs == 2


def test_experiment_file_errors_name_the_file_and_key(tmp_path):
    bad = tmp_path / "exp.yaml"
    bad.write_text("model:\n  dim: 64\n  latent_img: 8\n")
    with pytest.raises(ConfigError) as exc:
        load_experiment(str(bad))
    assert str(bad) in str(exc.value) and "model.latent_img" in str(exc.value)
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [dim: 3\n")
    with pytest.raises(ConfigError, match="broken.yaml: not valid YAML"):
        load_experiment(str(broken))
    with pytest.raises(ConfigError, match="missing.yaml: file not found"):
        load_experiment(str(tmp_path / "missing.yaml"))


def test_section_classes_validate_on_their_own():
    assert from_dict(LossConfig, {"fine": False}).fine is False
    with pytest.raises(ConfigError, match=r"^train.workers: must be > 0"):
        from_dict(TrainConfig, {"workers": 0}, "train")


@pytest.mark.parametrize("build,key", [
    (lambda: ModelConfig(heads=3), "heads"),
    (lambda: ModelConfig(dim=0), "dim"),
    (lambda: LossConfig(tau_up=0.0), "tau_up"),
    (lambda: TrainConfig(max_failures=-1), "max_failures"),
])
def test_sections_built_in_code_are_checked_too(build, key):
    with pytest.raises(ConfigError, match=rf"^{key}: "):
        build()


def test_rules_belong_to_their_section():
    """A rule is a section's own: TrainConfig.seed may be negative although a `dim` must be > 0."""
    assert TrainConfig(seed=-1).seed == -1
    assert from_dict(TrainConfig, {"max_failures": 0}).max_failures == 0


def test_value_reads_a_dotted_key():
    cfg = load()
    assert cfg.value("loss.tau_sam") == 0.07 and cfg.value("train.folds") == 5
    with pytest.raises(ConfigError, match="loss.bogus: unknown key"):
        cfg.value("loss.bogus")


@pytest.mark.parametrize("key", ["modality_dropout", "field_dropout"])
@pytest.mark.parametrize("value", [-0.1, 1.0, 2])
def test_input_dropout_outside_0_1_fails_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=f"train.{key}: must be in \\[0, 1\\)"):
        load_experiment("men").replace({"train": {key: value}})


def test_input_dropout_is_off_in_every_published_recipe():
    for name in ("men", "derm7pt", "derm7pt_public"):
        train = load_experiment(name).train
        assert train.modality_dropout == 0.0 and train.field_dropout == 0.0


# ------------------------------------------------------------------ non-finite numbers (nan, inf)


@pytest.mark.parametrize("override,key,shown", [
    ({"optim.lr": "nan"}, "optim.lr", "nan"),            # --set optim.lr=nan (YAML reads it as a string)
    ({"optim.lr": float("nan")}, "optim.lr", "nan"),     # --set optim.lr=.nan
    ({"loss.w_cp": float("inf")}, "loss.w_cp", "inf"),   # a loss weight
    ({"loss.w_sam": "-inf"}, "loss.w_sam", "-inf"),
    ({"train.cpus_per_worker": -float("inf")}, "train.cpus_per_worker", "-inf"),
    ({"model.dropout": 1e999}, "model.dropout", "inf"),  # YAML's 1e999 overflows to inf
    ({"optim.gamma": "NaN"}, "optim.gamma", "nan"),
])
def test_every_float_setting_must_be_finite(override, key, shown):
    with pytest.raises(ConfigError, match=rf"^config\.{key}: expected a finite number, got {shown}$"):
        load_experiment("men").replace(override)


def test_nan_in_an_experiment_file_names_the_file_and_key(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("dataset: men\noptim:\n  lr: .nan\n")
    with pytest.raises(ConfigError) as info:
        load_experiment(str(path))
    assert str(info.value) == f"{path}: optim.lr: expected a finite number, got nan"


@pytest.mark.parametrize("build,key", [
    (lambda: OptimConfig(lr=float("nan")), "lr"),
    (lambda: LossConfig(w_cls=float("inf")), "w_cls"),
    (lambda: TrainConfig(gpus_per_worker=-float("inf")), "gpus_per_worker"),
    (lambda: ModelConfig(dropout=float("nan")), "dropout"),
])
def test_sections_built_in_code_refuse_non_finite_floats(build, key):
    with pytest.raises(ConfigError, match=rf"^{key}: expected a finite number"):
        build()


@dataclasses.dataclass(frozen=True)
class _Window:
    """A section with a field that documents +-inf (an open end); `edges` does not."""

    bounds: tuple[float, ...] = dataclasses.field(default=(0.0, 1.0), metadata={ALLOWS_INF: True})
    edges: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        check_floats(self)


def test_only_a_field_that_documents_inf_accepts_it_and_none_accepts_nan():
    assert from_dict(_Window, {"bounds": ["-inf", 3]}).bounds == (-math.inf, 3.0)
    assert _Window(bounds=(0.0, math.inf)).bounds[1] == math.inf
    with pytest.raises(ConfigError, match=r"^w.bounds\[1\]: expected a number or -.inf / .inf, got nan$"):
        from_dict(_Window, {"bounds": [0, float("nan")]}, "w")
    with pytest.raises(ConfigError, match=r"^w.edges\[0\]: expected a finite number, got inf$"):
        from_dict(_Window, {"edges": ["inf"]}, "w")
    with pytest.raises(ConfigError, match=r"^edges\[1\]: expected a finite number, got -inf$"):
        _Window(edges=(0.0, -math.inf))


# ------------------------------------------------------------------ a key given twice in one mapping


@pytest.mark.parametrize("text,key,lines", [
    ("dataset: men\noptim:\n  lr: 0.001\n  gamma: 0.5\n  lr: 0.1\n", "lr", "at lines 3 and 5"),
    ("optim: {lr: 0.001}\nmodel: {dim: 64}\noptim: {lr: 0.1}\n", "optim", "at lines 1 and 3"),
    ("loss: {w_cp: 0.1, w_cp: 0.2}\n", "w_cp", "twice on line 1"),  # flow style
])
def test_an_experiment_file_naming_a_key_twice_is_refused_with_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_experiment(str(path))
    assert str(info.value) == f"{path}: duplicate key {key!r} {lines}: give it once"


def test_a_dataset_spec_naming_a_key_twice_is_refused_with_both_lines(tmp_path):
    from cfcml.data.spec import load_dataset_spec

    text = MEN_YAML.read_text()
    path = tmp_path / "mine.yaml"
    path.write_text(text + "task: binary\n")  # men.yaml says task: multiclass
    first = 1 + text.splitlines().index("task: multiclass")
    with pytest.raises(ConfigError) as info:
        load_dataset_spec(path)
    assert str(info.value) == f"{path}: duplicate key 'task' at lines {first} and {len(text.splitlines()) + 1}: " \
                              "give it once"


def test_a_yaml_merge_key_may_still_be_overridden():
    """`<<: *base` then a key of its own is what a merge is for, not a key said twice."""
    assert load_yaml("base: &b {lr: 0.1, gamma: 0.5}\noptim:\n  <<: *b\n  lr: 0.01\n")["optim"] == \
        {"lr": 0.01, "gamma": 0.5}
    with pytest.raises(DuplicateKeyError, match="duplicate key 'lr' at lines 3 and 4"):
        load_yaml("base: &b {lr: 0.1}\noptim:\n  lr: 0.01\n  lr: 0.02\n")
