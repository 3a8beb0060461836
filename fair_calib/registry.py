"""One registry per config group: a YAML file names a key (`name: gptq`) and its parameters.

Modules register their classes with `@register("quantizer", "gptq")`. A group's package is
imported module by module the first time the group is used, so adding a method is adding a file.
Unknown keys fail with the list of valid ones.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

from fair_calib.errors import ConfigError

__all__ = ["ConfigError", "UnknownNameError", "build", "lookup", "names", "register"]

GROUP_PACKAGES = {
    "model": "fair_calib.models",
    "quantizer": "fair_calib.quant",
    "prior": "fair_calib.prior",
    "weighting": "fair_calib.weighting",
    "benchmark": "fair_calib.benchmark",
    "decoding": "fair_calib.decoding",
    "data": "fair_calib.data",
    "logger": "fair_calib.logger",
    # not a config group: the module layouts a model folder's quantization_config may name (fair_calib.export
    # registers the ones it writes); models.validate looks them up by name, so models never imports export
    "layout": "fair_calib.export",
}


class UnknownNameError(ConfigError):
    pass


class Registry:
    def __init__(self, group: str, package: str) -> None:
        self.group, self.package = group, package
        self._entries: dict[str, Callable[..., Any]] = {}
        self._loaded = self._loading = False

    def register(self, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def deco(obj: Callable[..., Any]) -> Callable[..., Any]:
            if name in self._entries and self._entries[name] is not obj:
                raise ValueError(f"{self.group} {name!r} registered twice")
            self._entries[name] = obj
            return obj

        return deco

    def _load(self) -> None:
        """Import every public module of the group's package; marked done only on success, so an import
        error is raised again on the next use instead of leaving a silently partial registry."""
        if self._loaded or self._loading:
            return
        self._loading = True
        try:
            pkg = importlib.import_module(self.package)
            for info in pkgutil.iter_modules(pkg.__path__):
                if not info.name.startswith("_"):
                    importlib.import_module(f"{self.package}.{info.name}")
            self._loaded = True
        finally:
            self._loading = False

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., Any]:
        self._load()
        if name not in self._entries:
            valid = ", ".join(self.names())
            raise UnknownNameError(f"unknown {self.group} {name!r}; valid {self.group} names: {valid}")
        return self._entries[name]

    def build(self, cfg: Mapping[str, Any] | str, **kwargs: Any) -> Any:
        """Build from a group config: its `name` picks the class, the other keys are its arguments."""
        if isinstance(cfg, str):
            name, params = cfg, {}
        else:
            params = {k: v for k, v in _plain(cfg).items() if k != "name"}
            if "name" not in cfg:
                raise ConfigError(f"the {self.group} config has no 'name' key; valid names: {', '.join(self.names())}")
            name = cfg["name"]
        factory = self.get(name)
        try:
            return factory(**params, **kwargs)
        except TypeError as err:
            raise ConfigError(f"{self.group}={name}: {err}") from err


def _plain(cfg: Mapping[str, Any]) -> dict[str, Any]:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(cfg, DictConfig):
            return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover
        pass
    return dict(cfg)


REGISTRIES = {group: Registry(group, pkg) for group, pkg in GROUP_PACKAGES.items()}


def register(group: str, name: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    return REGISTRIES[group].register(name)


def build(group: str, cfg: Mapping[str, Any] | str, **kwargs: Any) -> Any:
    return REGISTRIES[group].build(cfg, **kwargs)


def lookup(group: str, name: str) -> Callable[..., Any]:
    """The registered object itself (not built): UnknownNameError with the valid names when there is none."""
    return REGISTRIES[group].get(name)


def names(group: str) -> list[str]:
    return REGISTRIES[group].names()
