"""Every experiment composes and validates; bad values fail early naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from anyexperts.config import TrainConfig, register_configs, to_dataclass, validate, validate_device

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
register_configs()


def compose_cfg(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_there_are_experiments():
    assert {"shakespeare_cpu", "gpt_1b_gpu"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_and_validates(experiment):
    cfg = to_dataclass(compose_cfg(f"experiment={experiment}"))
    assert cfg.experiment.name == experiment
    ep = cfg.parallel.expert_model_parallel_size
    validate(cfg, world_size=ep)


@pytest.mark.parametrize("group,options", [
    ("model", ["tiny", "gpt_1b"]), ("moe", ["topk", "anyexperts", "none", "gpt_1b"]),
    ("data", ["shakespeare", "canterbury", "digits"]), ("optim", ["adamw"]), ("trainer", ["default"]), ("logging", ["default"]),
    ("parallel", ["default"]),
])
def test_every_group_option_composes(group, options):
    for option in options:
        node = compose_cfg(f"{group}={option}")
        cfg = to_dataclass(node)
        validate(cfg, world_size=1)
        # The option's own file was merged in, not just the schema defaults.
        option_values = OmegaConf.load(CONF_DIR / group / f"{option}.yaml")
        for key, value in option_values.items():
            if not OmegaConf.is_config(value):
                assert node[group][key] == value, (group, option, key)


def test_main_job_is_two_process_expert_parallel():
    cfg = to_dataclass(compose_cfg("experiment=shakespeare_cpu"))
    assert cfg.parallel.expert_model_parallel_size == 2
    validate(cfg, world_size=2)
    with pytest.raises(ValueError, match="expert_model_parallel_size"):
        validate(cfg, world_size=1)


def test_gpu_preset_is_about_one_billion_parameters():
    from anyexperts.model import estimate_num_parameters

    cfg = to_dataclass(compose_cfg("experiment=gpt_1b_gpu"))
    total, active = estimate_num_parameters(cfg, vocab_size=cfg.data.bpe_vocab_size)
    assert 0.8e9 <= total <= 1.3e9, total
    assert active < total / 3
    assert cfg.parallel.expert_model_parallel_size == 8


def test_unknown_key_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_cfg("model.num_layerz=3")


def test_wrong_type_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ValidationError)):
        compose_cfg("model.num_layers=three")


@pytest.mark.parametrize("changes,world_size,field", [
    ({"moe__num_experts": 6, "parallel__expert_model_parallel_size": 4}, 4, "moe.num_experts"),
    ({"trainer__global_batch_size": 12, "trainer__micro_batch_size": 4}, 2, "trainer.global_batch_size"),
    ({"model__hidden_size": 130}, 1, "model.hidden_size"),
    ({"moe__router_topk": 9}, 1, "moe.router_topk"),
    ({"moe__kind": "switch"}, 1, "moe.kind"),
    ({"parallel__pipeline_model_parallel_size": 2}, 2, "parallel.pipeline_model_parallel_size"),
    ({"parallel__expert_model_parallel_size": 4}, 2, "parallel.expert_model_parallel_size"),
    ({"optim__min_lr": 1.0}, 1, "optim.min_lr"),
    ({"data__split": "1,2"}, 1, "data.split"),
    ({"data__tokenizer": "hf", "data__tokenizer_path": None}, 1, "data.tokenizer"),
    ({"data__source": "text"}, 1, "data.source"),
    ({"trainer__precision": "fp8"}, 1, "trainer.precision"),
    ({"parallel__tensor_model_parallel_size": 2}, 2, "parallel.tensor_model_parallel_size=2 with MoE"),
    ({"moe__kind": "none", "parallel__expert_model_parallel_size": 2}, 2, "parallel.expert_model_parallel_size=1"),
    ({"moe__kind": "topk", "moe__expert_path": "blocked"}, 1, "moe.expert_path"),
    ({"moe__expert_path": "blocked", "model__activation": "gelu"}, 1, "moe.expert_path"),
])
def test_bad_values_name_the_field(changes, world_size, field):
    cfg = TrainConfig()
    cfg.parallel.expert_model_parallel_size = 1
    for path, value in changes.items():
        group, name = path.split("__")
        setattr(getattr(cfg, group), name, value)
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        validate(cfg, world_size=world_size)


def test_extra_validation_composes_from_the_command_line():
    cfg = to_dataclass(compose_cfg("experiment=shakespeare_cpu", "data.extra_validation=[canterbury]",
                                   "data.extra_validation_batches=2"))
    validate(cfg, world_size=2)
    assert cfg.data.extra_validation == ["canterbury"] and cfg.data.extra_validation_batches == 2
    assert to_dataclass(compose_cfg()).data.extra_validation == []


@pytest.mark.parametrize("source,extra,batches,message", [
    ("shakespeare", ["gutenberg"], 8, r"data\.extra_validation entry='gutenberg' is not supported; choose one of "
                                      r"shakespeare, canterbury"),
    ("shakespeare", ["shakespeare"], 8, r"lists 'shakespeare', the corpus the run trains on"),
    ("canterbury", ["canterbury"], 8, r"lists 'canterbury', the corpus the run trains on"),
    ("shakespeare", ["canterbury", "canterbury"], 8, r"names a corpus twice"),
    ("shakespeare", ["canterbury"], 0, r"data\.extra_validation_batches=0 must be > 0"),
])
def test_bad_extra_validation_says_what_to_change(source, extra, batches, message):
    cfg = TrainConfig()
    cfg.parallel.expert_model_parallel_size = 1
    cfg.data.source, cfg.data.extra_validation, cfg.data.extra_validation_batches = source, extra, batches
    with pytest.raises(ValueError, match=message):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("changes,field", [
    ({"k_min": 3, "k_max": 2}, "k_min"),
    ({"k_min": 0}, "k_min"),
    ({"rho_max": 1.0}, "rho_max"),
    ({"rho_max": -0.1}, "rho_max"),
    ({"budget_target": 9.0}, "budget_target"),
    ({"num_virtual_experts": 0, "rho_max": 0.2}, "num_virtual_experts"),
])
def test_bad_anyexperts_values_name_the_field(changes, field):
    cfg = TrainConfig()
    cfg.moe.kind = "anyexperts"
    for name, value in changes.items():
        setattr(cfg.moe.anyexperts, name, value)
    with pytest.raises(ValueError, match=rf"moe\.anyexperts\.{field}"):
        validate(cfg, world_size=1)


@pytest.mark.parametrize("precision,cuda_available,fails", [
    ("bf16", False, True), ("bf16", True, False), ("fp32", False, False), ("auto", False, False)])
def test_bf16_needs_cuda(precision, cuda_available, fails):
    cfg = TrainConfig()
    cfg.trainer.precision = precision
    if fails:
        with pytest.raises(ValueError, match=r"trainer\.precision=bf16 needs a CUDA device.*trainer\.precision=fp32"):
            validate_device(cfg, cuda_available=cuda_available)
    else:
        validate_device(cfg, cuda_available=cuda_available)


@pytest.mark.parametrize("precision", ["bf16", "auto", "fp32"])
def test_blocked_expert_path_is_a_cpu_path(precision):
    cfg = TrainConfig()
    cfg.trainer.precision, cfg.moe.expert_path = precision, "blocked"
    with pytest.raises(ValueError, match=r"moe\.expert_path=blocked is a CPU path"):
        validate_device(cfg, cuda_available=True)
    if precision != "bf16":
        validate_device(cfg, cuda_available=False)
