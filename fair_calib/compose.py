"""Config group options composed by Hydra at run time, never read from their YAML files.

A quantizer file pulls its shared keys in through `defaults:` (conf/quantizer/shared: bits, engine, GPTQ
solver), a method preset overrides other groups: only Hydra's composition gives an option's full config.
The run uses this for what it needs besides its own config: the `baselines` (quantizer options composed
as `quantizer=<name>` would be on the command line), the table label of a method preset, and a family's
decoding config for the model card. Inside a running `fair-calib` app the app's Hydra is reused; elsewhere
(tests, scripts, the report) one is initialised over `conf/` for the call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf

from fair_calib import CONF_DIR
from fair_calib.errors import ConfigError


@contextlib.contextmanager
def _hydra() -> Iterator[Any]:
    """The global Hydra (the app's when one runs, else a temporary one over conf/); yields its config loader."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        yield GlobalHydra.instance().config_loader()
        return
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        yield GlobalHydra.instance().config_loader()


def group_options(group: str) -> list[str]:
    """The options of a config group (conf/<group>/*.yaml, not the shared files under it)."""
    with _hydra() as loader:
        return sorted(loader.get_group_options(group))


def compose_config(overrides: Sequence[str]) -> DictConfig:
    """The run config composed from `overrides` with no experiment preset (interpolations left unresolved)."""
    from hydra import compose

    with _hydra():
        return compose(config_name="config", overrides=["experiment=none", *overrides])


def option_config(group: str, name: str) -> dict[str, Any]:
    """One group option's full config as plain data, interpolations (`${seed}`, ...) left for the caller's scope.
    A quantizer is composed under method=custom (a method preset would pin another one)."""
    if name not in group_options(group):
        raise ConfigError(f"no {group} config {name!r}; valid: {', '.join(group_options(group))}")
    extra = ["method=custom"] if group == "quantizer" else []
    cfg = compose_config([*extra, f"{group}={name}"])
    return OmegaConf.to_container(cfg[group], resolve=False)  # type: ignore[return-value]


def method_label(name: str) -> str:
    """The table name of a method preset (conf/method/<name>.yaml's `method.label`), else `name` itself: the
    quantizer names of the plain presets (gptq, flatquant, ...) give their labels (GPTQ, FlatQuant, ...)."""
    if name not in group_options("method"):
        return name
    label = OmegaConf.select(compose_config([f"method={name}"]), "method.label")
    return str(label) if label else name
