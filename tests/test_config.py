"""Hydra configs: every option of every group composes, names a registry key, and builds when no weights are needed.

Options are discovered from the files in `conf/<group>/`, so a new YAML file is covered without editing this test.
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from fair_calib.decoding.base import Sampler
from fair_calib.models.hf_folder import ASSETS
from fair_calib.quant.base import Quantizer
from fair_calib.registry import build, names

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]
BUILDABLE = ("quantizer", "decoding", "prior", "weighting", "logger")  # groups that need no model weights


@functools.cache
def _composed(overrides: tuple[str, ...]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=list(overrides))


def compose_cfg(*overrides: str) -> DictConfig:
    """The composed root config (each override set composed once per session; a copy, so tests may edit it)."""
    return copy.deepcopy(_composed(overrides))


def test_groups_are_discovered() -> None:
    assert {"model", "quantizer", "prior", "weighting", "benchmark", "decoding", "data", "logger"} <= set(GROUPS)
    assert ("quantizer", "rtn") in OPTIONS and ("model", "tiny_dream") in OPTIONS


def test_default_config() -> None:
    cfg = compose_cfg()  # the default job: experiment=fair_calib (FP vs RTN vs FAIR-Calib at W4A4)
    assert (cfg.quantizer.name, cfg.prior.name, cfg.weighting.name) == ("flatquant", "fair", "fair")
    assert cfg.method.label == "FAIR-Calib" and list(cfg.baselines) == ["rtn"]
    assert cfg.decoding.name == "llada" and cfg.model.path == "tiny-llada"
    assert (cfg.quantizer.w_bits, cfg.quantizer.a_bits) == (4, 4)
    assert cfg.quantizer.epochs == 15 and cfg.diagnostics.n_prompts == 16  # sized for < 5 min on 2 cores
    bare = compose_cfg("experiment=none")
    assert (bare.quantizer.name, bare.method.name, list(bare.baselines)) == ("rtn", "custom", [])
    OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_method_presets_and_bit_presets() -> None:
    cfg = compose_cfg("method=gptq")
    assert (cfg.quantizer.name, cfg.prior.name, cfg.weighting.name, cfg.method.label) == ("gptq", "none", "uniform",
                                                                                          "GPTQ")
    assert build("quantizer", cfg.quantizer).label == "W4A4"  # the default experiment adds no foreign keys
    cfg = compose_cfg("experiment=none", "method=awq", "bits=w4a16_g64")
    q = build("quantizer", cfg.quantizer)
    assert q.label == "W4A16-g64"
    cfg = compose_cfg("method=quarot", "bits=w8a8")
    assert build("quantizer", cfg.quantizer).label == "W8A8"


@pytest.mark.parametrize("name", ["paper_main", "paper_ablation", "probe_budget", "baselines", "diagnostics"])
def test_named_experiments_carry_their_sweep(name: str) -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}"], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    assert params["model"] == "tiny_llada,tiny_dream" and len(params) >= 2
    sweep_dir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["dir"]
    assert sweep_dir == "multirun/${experiment_name}" and cfg.experiment_name == name  # fixed: reruns resume
    if name in ("paper_main", "paper_ablation", "probe_budget"):  # seeds: N sweeps seed over range(0,N)
        assert params["seed"] == "range(0,1)" and cfg.seeds == 1
    for key, values in params.items():  # every swept value composes
        if key == "seed":
            continue
        for value in str(values).split(","):
            if "." not in key:
                OmegaConf.to_container(compose_cfg(f"experiment={name}", f"{key}={value}"), resolve=True)


@pytest.mark.parametrize(("group", "option"), OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_option_composes(group: str, option: str) -> None:
    cfg = compose_cfg(f"{group}={option}")
    OmegaConf.to_container(cfg, resolve=True)
    if group in ("experiment", "bits"):  # global / quantizer-package presets: no node of their own
        return
    node = cfg[group]
    assert isinstance(node.get("name"), str) and node.name, f"conf/{group}/{option}.yaml has no `name` key"


@pytest.mark.parametrize(("group", "option"), [(g, o) for g, o in OPTIONS if g in BUILDABLE],
                         ids=[f"{g}={o}" for g, o in OPTIONS if g in BUILDABLE])
def test_every_option_builds(group: str, option: str) -> None:
    node = compose_cfg(f"{group}={option}")[group]
    if node.name not in names(group):
        pytest.skip(f"conf/{group}/{option}.yaml names {group} {node.name!r}, which is not registered yet "
                    f"(registered: {', '.join(names(group))})")
    obj = build(group, node)
    if group == "quantizer":
        assert isinstance(obj, Quantizer)
    elif group == "decoding":
        assert isinstance(obj, Sampler) and obj.gen_length == node.gen_length
    elif group == "prior" and node.name == "none":
        assert obj is None  # no prior: the weighting runs without one


def test_model_selects_its_sampler_and_command_line_wins() -> None:
    assert compose_cfg("model=tiny_dream").decoding.name == "dream"
    assert compose_cfg("model=tiny_llada").decoding.name == "llada"
    assert compose_cfg("model=dream_7b_instruct").decoding.name == "dream"
    for overrides in (("model=tiny_dream", "decoding=llada"), ("decoding=llada", "model=tiny_dream")):
        cfg = compose_cfg(*overrides)
        assert cfg.decoding.name == "llada" and cfg.model.path == "tiny-dream"
    cfg = compose_cfg("model=tiny_dream", "decoding=dream_topk_margin", "decoding.steps=8")
    assert (cfg.decoding.alg, cfg.decoding.steps) == ("topk_margin", 8)


def test_derived_options_inherit_their_base() -> None:
    fast = compose_cfg("decoding=fast_dllm").decoding
    base = compose_cfg("decoding=llada").decoding
    assert fast.threshold == 0.9 and base.threshold is None
    assert {k: v for k, v in fast.items() if k != "threshold"} == {k: v for k, v in base.items() if k != "threshold"}


def test_command_line_values_reach_the_built_object() -> None:
    cfg = compose_cfg("quantizer=rtn", "quantizer.w_bits=8", "quantizer.w_granularity=group",
                      "quantizer.group_size=16")
    q = build("quantizer", cfg.quantizer)
    assert q.label == "W8A4-g16"


@pytest.mark.parametrize("option", ["tiny_llada", "tiny_dream"])
def test_shipped_model_specs_build(option: str) -> None:
    cfg = compose_cfg(f"model={option}")
    if not (ASSETS / cfg.model.path / "config.json").is_file():
        pytest.skip(f"fair_calib/assets/{cfg.model.path} is not shipped yet (trained by fair_calib.train.tiny)")
    spec = build("model", cfg.model)
    assert spec.path == ASSETS / cfg.model.path and spec.model_type.lower() == option.split("_")[1]


def test_paper_main_seeds_sweeps_three_seeds_and_seeds_must_be_positive() -> None:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=paper_main_seeds"], return_hydra_config=True)
        assert cfg.hydra.sweeper.params["seed"] == "range(0,3)" and cfg.experiment_name == "paper_main"
        assert compose("config", overrides=["experiment=paper_main", "seeds=5"],
                       return_hydra_config=True).hydra.sweeper.params["seed"] == "range(0,5)"
        bad = compose("config", overrides=["experiment=paper_main", "seeds=0"], return_hydra_config=True)
        with pytest.raises(Exception, match="seeds=0: the number of calibration seeds must be an integer >= 1"):
            str(bad.hydra.sweeper.params["seed"])


@pytest.mark.parametrize("model", ["tiny_llada", "tiny_dream", "llada_8b_instruct", "dream_7b_instruct"])
def test_a_model_config_selects_its_family_sampler(model: str) -> None:
    """The family's default sampler is written in conf/model (Hydra runs) and in FAMILY_DEFAULTS (lm-eval runs
    without a decoding= argument): the two must agree."""
    from fair_calib.benchmark.families import FAMILY_DEFAULTS

    cfg = compose_cfg(f"model={model}", "experiment=none")
    assert cfg.decoding.name == FAMILY_DEFAULTS[cfg.model.family].decoding


@pytest.mark.parametrize("method,quantizer,prior,weighting,masking", [
    ("flatquant_mcs", "flatquant", "none", "uniform", "mcs"),
    ("fair_calib_mcs", "flatquant", "fair", "fair", "mcs"),
    ("gptq_cgq", "gptq", "none", "certainty", "none"),
    ("gptq_tmas", "gptq", "none", "uniform", "tmas"),
])
def test_rival_presets_combine_the_plug_ins(method, quantizer, prior, weighting, masking) -> None:
    cfg = compose_cfg(f"method={method}", "experiment=none")
    assert (cfg.quantizer.name, cfg.prior.name, cfg.weighting.name, cfg.data.masking) == \
        (quantizer, prior, weighting, masking)


def test_dllm_rivals_sweeps_every_rival_at_w4a4() -> None:
    from omegaconf import OmegaConf

    methods = OmegaConf.load(CONF / "experiment" / "dllm_rivals.yaml").hydra.sweeper.params.method.split(",")
    cfg = compose_cfg("experiment=dllm_rivals")
    assert set(methods) == {"flatquant", "fair_calib", "flatquant_mcs", "fair_calib_mcs", "gptq", "gptq_cgq",
                            "gptq_tmas", "quarot", "duquant"}
    assert (cfg.quantizer.w_bits, cfg.quantizer.a_bits) == (4, 4)
    for m in methods:
        if m != "duquant":  # its preset arrives with the quantizer
            compose_cfg("experiment=dllm_rivals", f"method={m}")
