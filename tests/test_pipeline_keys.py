"""Run identity: the config hash that makes sweeps resumable, method labels, and method/quantizer conflicts."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf
from test_config import compose_cfg

from fair_calib.compose import method_label, option_config
from fair_calib.pipeline import Pipeline, run_key
from fair_calib.registry import ConfigError


def test_run_key_ignores_volatile_keys_only():
    base = {"seed": 0, "quantizer": {"name": "rtn", "w_bits": 4, "progress": True},
            "prior": {"cache_dir": "/a", "force": False, "n_probe": 8}, "threads": 1, "logger": {"name": "wandb"}}
    same = json.loads(json.dumps(base))
    same.update(threads=2, logger={"name": "none"})
    same["quantizer"]["progress"] = False
    same["prior"].update(cache_dir="/b", force=True)
    assert run_key(base) == run_key(same)
    for path, value in ((("seed",), 1), (("quantizer", "w_bits"), 8), (("prior", "n_probe"), 16)):
        other = json.loads(json.dumps(base))
        node = other
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
        assert run_key(other) != run_key(base), path


def test_display_names_and_labels(tmp_path):
    assert method_label("fair_calib") == "FAIR-Calib" and method_label("smoothquant") == "SmoothQuant"
    assert method_label("flatquant_mcs") == "FlatQuant+MCS" and method_label("nosuch") == "nosuch"
    labels = {}
    for overrides in (("method=gptq",), ("method=fp",), ("experiment=none", "quantizer=awq", "bits=w4a16_g64"),
                      ("method=quarot", "bits=w8a8")):
        cfg = compose_cfg(*overrides, "logger=none")
        labels[overrides[0]] = Pipeline(cfg, tmp_path).method_label
    assert labels == {"method=gptq": "GPTQ W4A4", "method=fp": "FP", "experiment=none": "AWQ W4A16-g64",
                      "method=quarot": "QuaRot W8A8"}


def test_quantizer_that_contradicts_the_method_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="quantizer=gptq conflicts with method=fair_calib"):
        Pipeline(compose_cfg("quantizer=gptq", "logger=none"), tmp_path)
    Pipeline(compose_cfg("experiment=none", "quantizer=gptq", "logger=none"), tmp_path)  # custom: any quantizer


def test_finished_results_are_reused_only_for_the_same_config(tmp_path):
    cfg = compose_cfg("method=rtn", "logger=none")
    p = Pipeline(cfg, tmp_path)
    assert p.finished_results() is None
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "run": {"config_hash": p.config_hash}}))
    assert p.finished_results() == {"status": "ok", "run": {"config_hash": p.config_hash}}
    assert p.run()["status"] == "ok"  # returned without loading anything
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed", "run": {"config_hash": p.config_hash}}))
    assert p.finished_results() is None
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "run": {"config_hash": "other"}}))
    assert p.finished_results() is None
    (tmp_path / "results.json").write_text(json.dumps({"status": "ok", "run": {"config_hash": p.config_hash}}))
    assert Pipeline(compose_cfg("method=rtn", "logger=none", "force=true"), tmp_path).finished_results() is None


def test_baseline_configs_resolve_against_the_run(tmp_path):
    """baselines=[flatquant] is composed as quantizer=flatquant would be: the shared keys its `defaults:` pull in
    (conf/quantizer/shared) are there, and its `seed: ${seed}` takes the run's seed."""
    p = Pipeline(compose_cfg("method=rtn", "logger=none", "baselines=[flatquant,gptq]", "seed=7",
                             "bits=w8a8"), tmp_path)
    (label, (cfg, _)), (label2, (cfg2, _)) = p.baselines.items()
    assert label == "FlatQuant W8A8" and cfg["seed"] == 7 and label2 == "GPTQ W8A8"
    assert (cfg["w_bits"], cfg["a_bits"], cfg["offload"], cfg["epochs"]) == (8, 8, "cpu", 15)  # shared + own keys
    assert (cfg2["blocksize"], cfg2["act_order"], cfg2["propagate"]) == (128, None, "weights")
    alone = compose_cfg("experiment=none", "quantizer=flatquant", "seed=7")
    assert cfg == {**OmegaConf.to_container(alone.quantizer, resolve=True), "w_bits": 8, "a_bits": 8}


@pytest.mark.parametrize("name", ["rtn", "gptq", "awq", "smoothquant", "quarot", "flatquant", "duquant"])
def test_every_quantizer_takes_the_shared_bit_and_engine_keys(name):
    """One file holds the 12 bit keys (and one the 8 engine keys): every quantizer composes them in."""
    from fair_calib.quant.base import BitSettings

    cfg = option_config("quantizer", name)
    assert set(BitSettings.__dataclass_fields__) <= set(cfg), name
    from fair_calib.quant.engine import EngineSettings

    engine = set(EngineSettings.__dataclass_fields__)
    assert len(engine) == 8 and (engine <= set(cfg)) == (name != "rtn"), name


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ConfigError, match=r"no quantizer config 'nosuch'; valid: awq, duquant, flatquant, fp, gptq"):
        option_config("quantizer", "nosuch")


def test_run_key_without_seed_groups_the_seeds_of_a_row():
    a = {"seed": 0, "data": {"seed": 0}, "quantizer": {"name": "flatquant", "seed": 0}, "seeds": 1}
    b = {"seed": 2, "data": {"seed": 2}, "quantizer": {"name": "flatquant", "seed": 2}, "seeds": 3}
    assert run_key(a) != run_key(b)
    assert run_key(a, ignore=frozenset({"seed"})) == run_key(b, ignore=frozenset({"seed"}))
    assert run_key({**a, "seeds": 3}) == run_key(a)  # the number of seeds of a sweep is not part of one run


def test_folder_names_and_the_run_hash_ignore_the_same_keys(tmp_path):
    """One definition (fair_calib.VOLATILE_KEYS) feeds both the run hash and Hydra's folder names: a key that
    changes no result changes neither, a key that does changes both (device / model.path: the hash only)."""
    import subprocess
    import sys

    from fair_calib import UNNAMED_KEYS, VOLATILE_KEYS, dirname_excluded_keys

    def dirname(*overrides: str) -> str:
        out = subprocess.run([sys.executable, "-m", "fair_calib", *overrides, "--cfg", "hydra", "--resolve"],
                             capture_output=True, text=True, timeout=300, cwd=tmp_path).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.strip().startswith("override_dirname:") and "=" in line)

    excluded = dirname_excluded_keys()
    assert {"threads", "quantizer.progress", "benchmark.show_progress", "prior.cache_dir", *UNNAMED_KEYS} <= \
        set(excluded) and "seed" not in excluded
    assert dirname("method=fp", "seed=1", "threads=1", "benchmark.show_progress=false", "force=true") == \
        "method=fp,seed=1"
    base = compose_cfg("experiment=none", "method=rtn")
    plain = dict(Pipeline(base, tmp_path).plain)
    for key in VOLATILE_KEYS:
        assert run_key({**plain, key: "changed"}) == run_key(plain), key
    assert run_key({**plain, "device": "cuda"}) != run_key(plain)


def test_a_run_reads_the_fp_weights_once_for_all_its_caches(tmp_path, monkeypatch):
    """The evaluation, prior and teacher-trajectory caches share one hash of the FP weights (an 8B state dict
    is 16 GB: hashing it per cache read it three times); the second run hits all three caches."""
    import fair_calib.diagnostics.trajectory as trajectory
    import fair_calib.pipeline as pipeline
    import fair_calib.prior.fair as fair
    from fair_calib.utils.io import state_dict_hash

    calls = []

    def counted(module, *args, **kwargs):
        calls.append(type(module).__name__)
        return state_dict_hash(module, *args, **kwargs)

    for mod in (pipeline, fair, trajectory):
        monkeypatch.setattr(mod, "state_dict_hash", counted)
    overrides = ["experiment=none", "method=custom", "quantizer=rtn", "prior=fair", "weighting=fair", "logger=none",
                 "benchmark.n={addition:4,word_problems:2,compare:4}", "benchmark.mc_num=2",
                 "benchmark.show_progress=false", "diagnostics.n_prompts=2", "prior.n_probe=4", "prior.progress=false",
                 "data.n_samples=4", f"cache_dir={tmp_path / 'cache'}", "device=cpu"]
    first = Pipeline(compose_cfg(*overrides), tmp_path / "a").run()
    assert len(calls) == 1
    second = Pipeline(compose_cfg(*overrides), tmp_path / "b").run()
    assert len(calls) == 2 and second["summary"]["diag/teacher_cache_hit"] == 1.0
    assert first["metrics"] == second["metrics"] and first["scores"] == second["scores"]


@pytest.mark.parametrize(("content", "message"), [
    ("[1, 2]", "is not a results file of this tool"),
    ("\udcff\udcfe", "is not a results file of this tool"),
    ('{"status": "ok", "run": {"config_hash": "0123"}}', "holds the results of another config (hash 0123"),
    ('{"status": "ok", "run": []}', "holds the results of another config (hash None"),
])
def test_a_foreign_results_file_is_replaced_with_a_warning(tmp_path, caplog, content, message):
    import logging

    pipe = Pipeline(compose_cfg("experiment=none", "method=rtn", "logger=none"), tmp_path)
    (tmp_path / "results.json").write_text(content, errors="surrogateescape")
    with caplog.at_level(logging.WARNING, logger="fair_calib.pipeline"):
        assert pipe.finished_results() is None
    assert message in caplog.text


def test_the_run_logs_diagnostics_tables_and_plots_through_one_path(tmp_path):
    from fair_calib.diagnostics.runner import DiagnosticsResult

    class Recorder:
        def __init__(self):
            self.tables, self.images, self.metrics = [], [], {}

        def log_table(self, name, columns, rows):
            self.tables.append((name, columns, rows))

        def log_image(self, name, path):
            self.images.append(name)

        def log_metrics(self, metrics):
            self.metrics.update(metrics)

    p = Pipeline(compose_cfg("method=rtn", "logger=none"), tmp_path)
    p.logger = Recorder()
    metrics = {"FP": {"addition": {"acc": 1.0}}, p.method_label: {"addition": {"acc": 0.5}}}
    png = tmp_path / "flip_rate.png"
    png.write_bytes(b"png")
    diag = DiagnosticsResult({"diag/flip_rate": 0.25}, {"per_step": [{"step": 0, "flips": 1}], "empty": []},
                             {"flip_rate": png, "scalars": tmp_path / "scalars.json"})
    results = p._finish(metrics, {}, diag)
    assert results["summary"]["diag/flip_rate"] == 0.25 and p.logger.metrics["diag/flip_rate"] == 0.25
    assert ("diagnostics/per_step", ["step", "flips"], [[0, 1]]) in p.logger.tables
    assert not any(t[0] == "diagnostics/empty" for t in p.logger.tables)
    assert p.logger.images == ["diagnostics/flip_rate"]
    p.logger = Recorder()
    results = p._finish(metrics, {}, None)  # diagnostics off: no diag/ keys, no diagnostics tables
    assert not any(k.startswith("diag/") for k in results["summary"])
    assert not any(t[0].startswith("diagnostics/") for t in p.logger.tables)


def test_the_evaluation_cache_key_ignores_volatile_keys_only(tmp_path):
    def key(*overrides, method=None):
        p = Pipeline(compose_cfg("method=rtn", "logger=none", *overrides), tmp_path)
        p.fp_hash = "w"
        return p.eval_cache_key(method)

    base = key()
    assert key("benchmark.show_progress=false", "threads=1", "seed=3") == base  # progress, threads, calib seed
    assert key("eval_seed=1") != base and key("benchmark.mc_num=8") != base
    assert key(method={"name": "rtn", "w_bits": 4}) != key(method={"name": "rtn", "w_bits": 8})
    assert key(method={"name": "rtn", "progress": True}) == key(method={"name": "rtn", "progress": False})
