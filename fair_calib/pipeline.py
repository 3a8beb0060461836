"""The one pipeline behind `fair-calib`:

    model -> (Stage I) prior -> weighting -> quantizer (Stage II) -> diagnostics -> benchmark -> results

Every component is built from its config group first, so bad settings fail before any weights
are read. Results go to the run folder (`results.json`, written atomically) and to the logger.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import random
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from fair_calib import VOLATILE_KEYS, stats
from fair_calib.benchmark.families import FAMILY_DEFAULTS
from fair_calib.benchmark.scores import task_scores
from fair_calib.compose import method_label as preset_label
from fair_calib.compose import option_config
from fair_calib.data.masking import hashed_data_config, masking_spec
from fair_calib.errors import Interrupted
from fair_calib.models.hf_folder import resolve_device
from fair_calib.models.validate import check_run_values, read_config
from fair_calib.quant.base import BitSettings
from fair_calib.registry import ConfigError, build
from fair_calib.utils.cache import DiskCache
from fair_calib.utils.io import stable_hash, state_dict_hash, write_json_atomic, write_text_atomic

if TYPE_CHECKING:
    from fair_calib.diagnostics.runner import DiagnosticsResult

log = logging.getLogger("fair_calib")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def average(metrics: dict[str, dict[str, float]], headline: dict[str, str]) -> float | None:
    """Mean over the benchmark's tasks of each task's headline metric (`benchmark.headline()`, named once in
    the task config); None when a task or its headline metric is missing, so a partial average is never shown."""
    if not headline:
        return None
    vals = [metrics.get(task, {}).get(metric) for task, metric in headline.items()]
    if any(v is None for v in vals):
        return None
    return float(np.mean(vals))


def flat_metrics(prefix: str, metrics: dict[str, dict[str, float]], headline: dict[str, str]) -> dict[str, float]:
    out = {f"{prefix}/{task}/{name}": v for task, m in metrics.items() for name, v in m.items()}
    avg = average(metrics, headline)
    if avg is not None:
        out[f"{prefix}/avg"] = avg
    return out


Scores = dict[str, dict[str, list[float]]]  # task -> metric key -> per-document values


def interval_metrics(prefix: str, scores: Scores, headline: dict[str, str], confidence: float = 0.95,
                     n_resamples: int = 2000) -> dict[str, float]:
    """95% bootstrap CIs over documents of every per-document metric (`<prefix>/<task>/<metric>_ci_low`,
    `_ci_high`) and of the headline average (`<prefix>/avg_ci_low`, `_ci_high`); seeded, so reproducible."""
    out: dict[str, float] = {}
    for task, by_key in scores.items():
        for key, values in by_key.items():
            est = stats.bootstrap_ci(values, n_resamples=n_resamples, confidence=confidence)
            out[f"{prefix}/{task}/{key}_ci_low"], out[f"{prefix}/{task}/{key}_ci_high"] = est.ci_low, est.ci_high
    per_task = [scores.get(task, {}).get(key) for task, key in headline.items()]
    if per_task and all(v is not None for v in per_task):
        est = stats.bootstrap_ci_mean_of_means(per_task, n_resamples=n_resamples, confidence=confidence)
        out[f"{prefix}/avg_ci_low"], out[f"{prefix}/avg_ci_high"] = est.ci_low, est.ci_high
    return out


def format_table(columns: dict[str, dict[str, dict[str, float]]], headline: dict[str, str],
                 scores: dict[str, Scores] | None = None) -> str:
    """Task x method table of each task's headline metric, as aligned text (also valid Markdown); with the
    columns' per-document `scores`, every cell also shows its 95% bootstrap CI over documents."""
    tasks = [t for t in headline if any(t in m for m in columns.values())]
    head = ["task"] + list(columns)
    cis = {label: interval_metrics("x", docs, headline) for label, docs in (scores or {}).items() if docs}
    rows = []
    for t in tasks + ["average"]:
        row = [t]
        key = "x/avg" if t == "average" else f"x/{t}/{headline[t]}"
        for label, m in columns.items():
            v = average(m, headline) if t == "average" else m.get(t, {}).get(headline[t])
            cell = "-" if v is None else f"{100 * v:.1f}"
            ci = cis.get(label, {})
            if v is not None and f"{key}_ci_low" in ci:
                cell += f" [{100 * ci[f'{key}_ci_low']:.1f}, {100 * ci[f'{key}_ci_high']:.1f}]"
            row.append(cell)
        rows.append(row)
    widths = [max(len(str(r[i])) for r in [head] + rows) for i in range(len(head))]
    line = lambda r: "| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    note = "\n\ncells: % (each task's headline metric) [95% bootstrap CI over documents]" if cis else ""
    return "\n".join([line(head), sep] + [line(r) for r in rows]) + note


def run_key(plain: dict[str, Any], ignore: frozenset[str] = frozenset()) -> str:
    """Hash of a resolved config without the keys that do not change results (caches, threads, logging),
    nor the keys named in `ignore` at any depth (the report passes {"seed"} to group the seeds of a row)."""
    drop = set(VOLATILE_KEYS) | ignore
    if isinstance(plain.get("data"), dict):  # masking keys that change nothing (all of them under masking=none)
        plain = {**plain, "data": hashed_data_config(plain["data"])}

    def strip(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: strip(v) for k, v in node.items() if k not in drop}
        if isinstance(node, list):
            return [strip(v) for v in node]
        return node

    return stable_hash(strip(plain))


def read_eval_entry(path: Path) -> dict[str, Any]:
    """An evaluation-cache entry: metrics and per-document scores (KeyError / TypeError when it is not one)."""
    entry = json.loads(path.read_text())
    if not isinstance(entry["metrics"], dict) or not isinstance(entry["scores"], dict):
        raise TypeError("metrics and scores must be objects")
    return entry


def check_seed(seed: Any, key: str = "seed") -> int:
    """A seed (`seed`: calibration, `eval_seed`: evaluation) as a non-negative int, or a ConfigError saying
    what to pass."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        hint = ("sweep several with seed=0,1,2, or seeds=3 in a named experiment" if key == "seed"
                else "keep it fixed across a sweep so every method is scored on the same random draws")
        raise ConfigError(f"{key}={seed!r}: the seed must be a non-negative integer, e.g. {key}=0 ({hint})")
    return seed


class Pipeline:
    """Holds the built components of one run; `run()` executes the stages in order."""

    def __init__(self, cfg: DictConfig, run_dir: Path, choices: dict[str, Any] | None = None,
                 group: str | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.plain: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        self.choices = {k: v for k, v in (choices or {}).items() if not str(k).startswith("hydra")}
        self.group = group if group is not None else cfg.get("group")
        self.config_hash = run_key(self.plain)
        self.seed = check_seed(cfg.get("seed"))
        self.eval_seed = check_seed(cfg.get("eval_seed", 0), key="eval_seed")
        check_run_values(self.plain)  # threads, device, boolean switches, data=text's corpus: before any weights
        self.masking = masking_spec(self.plain.get("data") or {})  # data.masking, mask_copies, mask_eps
        # build (and thereby validate) everything before loading weights
        self.device = resolve_device(str(cfg.device))
        self.model_spec = build("model", cfg.model)
        self.quantizer = build("quantizer", cfg.quantizer)
        self._check_method()
        self.sampler = build("decoding", cfg.decoding)
        self.benchmark = build("benchmark", cfg.benchmark)
        self.benchmark.validate_sampler(self.sampler)
        self.prior_probe = build("prior", cfg.prior)
        self.weighting = build("weighting", cfg.weighting)
        self.logger = build("logger", cfg.logger)
        self.baselines = {label: (c, build("quantizer", c)) for label, c in self._baseline_configs()}
        self._check_combinations()
        self.masking.check_sampler(self.model_spec, self.sampler)  # tmas decodes with the teacher
        self.diagnostic_prompts = self._diagnostic_prompts() if self._runs_diagnostics else []
        self.timings: dict[str, float] = {}
        self.scores: dict[str, Scores] = {}  # column -> per-document scores (results.json `scores`)

    def _baseline_configs(self):
        """`baselines: [rtn, ...]`: extra quantizers, each composed as `quantizer=<name>` would be (its `${seed}`,
        `${cache_dir}`, ... take the run's values), evaluated at the run's bit settings."""
        for name in self.cfg.get("baselines") or []:
            try:
                option = option_config("quantizer", str(name))
            except ConfigError as err:
                raise ConfigError(f"baselines: {err}") from err
            scope = OmegaConf.create(self.plain)
            scope["_baseline"] = option
            c = OmegaConf.to_container(scope["_baseline"], resolve=True)
            for key in BitSettings.__dataclass_fields__:
                if key in c and key in self.plain["quantizer"]:
                    c[key] = self.plain["quantizer"][key]
            bits = BitSettings(**{k: c[k] for k in BitSettings.__dataclass_fields__ if k in c}).label
            yield f"{preset_label(c['name'])} {bits}", c

    def _check_method(self) -> None:
        """A method preset pins its quantizer: `quantizer=gptq` under `method=fair_calib` is a mistake."""
        method = self.plain.get("method") or {}
        want, got = method.get("quantizer"), self.plain["quantizer"].get("name")
        if want and got != want:
            raise ConfigError(
                f"quantizer={got} conflicts with method={method.get('name')} (which uses quantizer={want}); "
                f"pick the method instead (method={got}), or method=custom to combine quantizer=, prior= and "
                f"weighting= yourself")

    def _check_combinations(self) -> None:
        """Values that are fine alone but contradict each other, caught before any weights load."""
        if getattr(self.weighting, "needs_prior", True) and self.prior_probe is None:
            raise ConfigError(f"weighting={self.cfg.weighting.name} reweights tokens by the Stage I prior but "
                              "prior=none; set prior=fair (or method=fair_calib), or weighting=uniform")
        if getattr(self.weighting, "needs_teacher", False) and not self.quantizer.uses_token_weights:
            raise ConfigError(f"weighting={self.cfg.weighting.name} weights the calibration tokens but "
                              f"quantizer={self.cfg.quantizer.name} takes no token weights; use a quantizer that "
                              "does (method=gptq, awq, flatquant or quarot), or weighting=uniform")
        family = str(getattr(self.model_spec, "model_type", "")).lower()
        sampler = str(self.cfg.decoding.name)
        if family in FAMILY_DEFAULTS and sampler in FAMILY_DEFAULTS and sampler != family:
            raise ConfigError(f"decoding={self.choices.get('decoding', sampler)} is a {sampler} sampler but the "
                              f"model ({self.model_spec.label}) is a {family} model; pick a sampler of its family, "
                              f"e.g. decoding={family}")
        window = (self.plain.get("prior") or {}).get("window")
        limit = int(self.plain["benchmark"].get("max_length") or 4096)
        if self.prior_probe is not None and isinstance(window, int) and window > limit:
            raise ConfigError(f"prior.window={window} exceeds benchmark.max_length={limit}, the longest sequence "
                              f"a run decodes; use a window no longer than the answers you generate (the "
                              f"paper: 256, the tiny models: 32)")

    @property
    def _runs_diagnostics(self) -> bool:
        return bool(self.cfg.diagnostics.enabled) and self.cfg.quantizer.name != "fp"

    # ---- helpers ----------------------------------------------------------------------------
    def _timed(self, key: str, fn, *args, **kwargs):
        t0 = time.time()
        out = fn(*args, **kwargs)
        self.timings[key] = round(time.time() - t0, 2)
        return out

    @property
    def method_tag(self) -> str:
        """File name of the run's method (samples/<tag>.json): the preset (fair_calib), else the quantizer."""
        name = (self.plain.get("method") or {}).get("name")
        return str(name if name and name != "custom" else self.cfg.quantizer.name)

    @property
    def method_label(self) -> str:
        label = (self.plain.get("method") or {}).get("label") or preset_label(str(self.cfg.quantizer.name))
        if self.cfg.quantizer.name == "fp":
            return self._export_label or "FP"
        return f"{label} {self.quantizer.label}".strip()

    @functools.cached_property
    def _export_label(self) -> str | None:
        """'FAIR-Calib W4A4 (export)' when model.path is a folder written by save_quantized=true, whose weights
        are not the FP model's (it used to be labelled FP)."""
        path = getattr(self.model_spec, "path", None)
        if path is None:
            return None
        info = (read_config(path).get("quantization_config") or {}).get("fair_calib") or {}
        if not info:
            return None
        return f"{preset_label(str(info.get('method') or '?'))} {info.get('bits') or ''} (export)".replace("  ", " ")

    def _evaluate(self, model, tag: str, label: str = "") -> tuple[dict[str, dict[str, float]], Scores]:
        """(metrics, per-document scores) of one model; the per-sample records go to samples/<tag>.json."""
        metrics = self.benchmark.evaluate(model, self.sampler, seed=self.eval_seed, label=label)
        samples = self.benchmark.last_samples
        if samples:
            write_json_atomic(self.run_dir / "samples" / f"{tag}.json", samples)
        return metrics, task_scores(samples, self.benchmark.score_keys())

    def _evaluate_column(self, label: str, model, tag: str) -> dict[str, dict[str, float]]:
        metrics, self.scores[label] = self._evaluate(model, tag, label)
        return metrics

    def eval_cache_key(self, method: dict | None) -> str:
        """The evaluation cache's key: FP weights, method, benchmark, decoding, eval_seed (volatile keys dropped)."""
        return run_key({"weights": self.fp_hash, "method": method, "benchmark": self.plain["benchmark"],
                        "decoding": self.plain["decoding"], "eval_seed": self.eval_seed, "format": 3})

    def _evaluate_cached(self, label: str, fp_model, method: dict | None,
                         build_model=None) -> dict[str, dict[str, float]]:
        """FP and calibration-free baselines give the same numbers in every job of a sweep: cache them
        (metrics and per-document scores) by (FP weights, method config, benchmark, decoding, eval_seed): the
        calibration seed does not enter, so a seed sweep evaluates FP and RTN once per model."""
        key = self.eval_cache_key(method)
        cache = DiskCache(Path(self.cfg.cache_dir) / "eval", "evaluation", force=bool(self.cfg.get("force", False)),
                          log=log)
        tag = (method or {}).get("name", "fp")

        def compute() -> dict[str, Any]:
            metrics = self._evaluate_column(label, build_model() if build_model else fp_model, tag)
            return {"metrics": metrics, "scores": self.scores[label], "method": method,
                    "samples": self.benchmark.last_samples}

        entry, hit = cache.get(key, compute, read_eval_entry, lambda e, tmp: write_json_atomic(tmp, e), label=tag)
        self.scores[label] = entry["scores"]
        if hit and entry.get("samples"):  # the folder holds the same files whether the cache was cold or warm
            write_json_atomic(self.run_dir / "samples" / f"{tag}.json", entry["samples"])
        return entry["metrics"]

    def _quantized_copy(self, fp, quantizer, calib, token_weights):
        q = copy.deepcopy(fp)
        quantizer.quantize(q, calib, token_weights)
        return q

    # ---- the run ----------------------------------------------------------------------------
    def finished_results(self) -> dict[str, Any] | None:
        """results.json of an earlier run of the same resolved config in this folder (None when absent,
        failed, from another config, or force=true)."""
        path = self.run_dir / "results.json"
        if self.cfg.get("force", False) or not path.is_file():
            return None
        try:
            old = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = None
        if not isinstance(old, dict):
            log.warning("%s is not a results file of this tool; the run replaces it", path)
            return None
        run = old.get("run") if isinstance(old.get("run"), dict) else {}
        if old.get("status") == "ok" and run.get("config_hash") != self.config_hash:
            log.warning("%s holds the results of another config (hash %s, this run %s); the run replaces them",
                        path, run.get("config_hash"), self.config_hash)
        ok = old.get("status") == "ok" and run.get("config_hash") == self.config_hash
        return old if ok else None

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        done = self.finished_results()
        if done is not None:
            print(f"skipped: {self.run_dir / 'results.json'} already holds this config "
                  f"(hash {self.config_hash}); force=true reruns it")
            return done
        print(f"run folder: {self.run_dir}", flush=True)  # first, so a long run can be watched from the start
        seed_everything(self.seed)
        if cfg.get("threads"):
            torch.set_num_threads(int(cfg.threads))
        name = f"{self.model_spec.label}/{self.method_label}"
        tags = [f"model:{self.model_spec.label}", f"quantizer:{cfg.quantizer.name}", f"bits:{self.quantizer.label}",
                f"weighting:{cfg.weighting.name}", f"prior:{cfg.prior.name}",
                f"method:{(self.plain.get('method') or {}).get('name', 'custom')}"]
        if cfg.get("experiment_name"):
            tags.append(f"experiment:{cfg.experiment_name}")
        write_text_atomic(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        self.logger.start(self.run_dir, self.plain, name=name, group=self.group, tags=tags)
        status = "failed"
        try:
            results = self._run_stages()
            status = "ok"
        except (Interrupted, KeyboardInterrupt):
            status = "interrupted"
            raise
        finally:
            self.logger.finish(status)
        return results

    def _run_stages(self) -> dict[str, Any]:
        cfg = self.cfg
        fp = self._timed("load_s", self.model_spec.load, self.device)
        self.fp_hash = self._timed("hash_s", state_dict_hash, fp)  # read once: the keys of all three caches
        metrics: dict[str, dict[str, dict[str, float]]] = {}
        compare_fp = bool(cfg.compare_fp) and self._export_label is None  # an export has no FP model to compare
        if compare_fp:
            metrics["FP"] = self._timed("eval_fp_s", self._evaluate_cached, "FP", fp, None)

        calib = None
        needs_data = [self.quantizer.requires_calibration, self.prior_probe is not None,
                      *(b.requires_calibration for _, b in self.baselines.values())]
        if any(needs_data):
            calib = self._timed("data_s", build, "data", cfg.data, tokenizer=fp.tokenizer)
        prior = None
        if self.prior_probe is not None:
            prior = self._timed("prior_s", self.prior_probe.estimate, fp, calib.prompts,
                                out_dir=self.run_dir / "prior", weights_hash=self.fp_hash)
        if calib is not None and self.masking.active:  # masked calibration states: after Stage I, before the weights
            calib = self._timed("masking_s", self.masking.apply, calib, fp, self.sampler,
                                cache_dir=cfg.diagnostics.get("cache_dir"), force=bool(cfg.get("force", False)),
                                weights_hash=self.fp_hash)
        token_weights = None
        if calib is not None:  # the teacher is the FP model (weighting=certainty runs it on the calibration inputs)
            token_weights = self._timed("weighting_s", self.weighting.calibration_weights, calib, prior, fp)
        if prior is not None:  # F, R and the final per-position weights of this run, side by side
            files = prior.save(self.run_dir / "prior", weights=self.weighting.position_weights(prior))
            self.logger.log_image("prior/weights", files["png"])
        for label, (bcfg, bq) in self.baselines.items():
            if bq.requires_calibration:  # calibrated baselines use the plain (uniform) objective
                metrics[label] = self._timed(f"baseline_{bcfg['name']}_s", self._evaluate_column, label,
                                             self._quantized_copy(fp, bq, calib, None), "baseline")
            else:
                metrics[label] = self._timed(f"baseline_{bcfg['name']}_s", self._evaluate_cached, label, fp, bcfg,
                                             lambda bq=bq: self._quantized_copy(fp, bq, None, None))

        is_fp = cfg.quantizer.name == "fp"
        qmodel = fp if is_fp else copy.deepcopy(fp)
        report = self._timed("quantize_s", self.quantizer.quantize, qmodel, calib, token_weights)
        if token_weights is not None and (figures := self.weighting.summary(calib, token_weights)):
            report = {**(report or {}), **figures}  # certainty: mean weight on masked / unmasked tokens

        diag = None
        if self._runs_diagnostics:
            from fair_calib.diagnostics.runner import run_diagnostics

            position_weight = None
            if prior is not None and hasattr(self.weighting, "position_weight"):
                position_weight = self.weighting.position_weight(prior)
            sampler = self.sampler
            if cfg.diagnostics.get("gen_length") is None:
                sampler = self.benchmark.diagnostic_sampler(self.sampler)
            diag = self._timed("diagnostics_s", run_diagnostics, fp, qmodel, self.diagnostic_prompts,
                               sampler, self.run_dir / "diagnostics", position_weight=position_weight,
                               weights_hash=self.fp_hash,
                               **{k: v for k, v in self.plain["diagnostics"].items() if k != "enabled"})

        if not is_fp or not compare_fp:
            if self.quantizer.requires_calibration:
                metrics[self.method_label] = self._timed("eval_quant_s", self._evaluate_column, self.method_label,
                                                         qmodel, self.method_tag)
            else:  # calibration-free (FP, RTN, QuaRot-RTN): the same weights for every seed, evaluated once
                metrics[self.method_label] = self._timed("eval_quant_s", self._evaluate_cached, self.method_label,
                                                         fp, None if is_fp else self.plain["quantizer"],
                                                         lambda: qmodel)
        if cfg.get("save_quantized") and not is_fp:
            from fair_calib.export import save_quantized

            folder = self._timed("save_s", save_quantized, qmodel, self.run_dir / "quantized_model",
                                 method=self.method_tag, bits_label=self.quantizer.label)
            log.info("quantized model saved to %s (reload: model.path=%s)", folder, folder)
        return self._finish(metrics, report, diag)

    def _diagnostic_prompts(self) -> list[str]:
        return self.benchmark.diagnostic_prompts(int(self.cfg.diagnostics.n_prompts))

    def _finish(self, metrics, report, diag: DiagnosticsResult | None) -> dict[str, Any]:
        quant_key = self.method_label if self.method_label in metrics else "FP"
        headline = self.benchmark.headline()
        summary: dict[str, float] = {}
        if "FP" in metrics:
            summary.update(flat_metrics("fp", metrics["FP"], headline))
            summary.update(interval_metrics("fp", self.scores.get("FP", {}), headline))
        summary.update(flat_metrics("quant", metrics[quant_key], headline))
        summary.update(interval_metrics("quant", self.scores.get(quant_key, {}), headline))
        if diag is not None:  # the scalars join the summary; tables and plots go to the logger
            summary.update({k: v for k, v in diag.items() if isinstance(v, int | float)})
            diag.log_to(self.logger)
        report = report or {}
        summary.update({f"calib/{k}": v for k, v in report.items()
                        if isinstance(v, int | float) and not isinstance(v, bool)})
        blocks = report.get("blocks") or []
        if blocks and isinstance(blocks[0], dict):  # per-block reconstruction error of the layer-wise engine
            cols = [k for k, v in blocks[0].items() if isinstance(v, int | float | str)]
            self.logger.log_table("calibration/blocks", cols, [[b.get(c) for c in cols] for b in blocks])
        results = {
            "status": "ok",
            "run": {"model": self.model_spec.label, "quantizer": self.cfg.quantizer.name,
                    "bits": self.quantizer.label, "method": self.method_label,
                    "method_name": (self.plain.get("method") or {}).get("name", "custom"),
                    "prior": self.cfg.prior.name, "weighting": self.cfg.weighting.name,
                    "experiment": self.cfg.get("experiment_name"), "group": self.group,
                    "seed": self.seed, "eval_seed": self.eval_seed, "config_hash": self.config_hash,
                    "threads": torch.get_num_threads()},
            "choices": self.choices,
            "config": self.plain,
            "headline": headline,
            "metrics": metrics,
            "scores": {label: self.scores[label] for label in metrics if label in self.scores},
            "summary": summary,
            "calibration": report,
            "timings": self.timings,
        }
        write_json_atomic(self.run_dir / "results.json", results)
        self.logger.log_metrics(summary)
        rows = [[task, name, col, v] for col, m in metrics.items() for task, tm in m.items() for name, v in tm.items()]
        self.logger.log_table("benchmark", ["task", "metric", "method", "value"],
                              [[r[0], r[1], r[2], r[3]] for r in rows])
        table = format_table(metrics, headline, self.scores)
        write_text_atomic(self.run_dir / "table.md", table + "\n")
        print(f"\n{self.model_spec.label}  ({', '.join(f'{k}={v}s' for k, v in self.timings.items())})\n{table}\n"
              f"results: {self.run_dir / 'results.json'}")
        return results
