"""Registry: auto-import of a group's modules, unknown names list the valid ones, YAML keys become kwargs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fair_calib import registry
from fair_calib.quant.rtn import RTN
from fair_calib.registry import ConfigError, Registry, UnknownNameError, build, names

WIDGET_MODULE = '''from fair_calib.registry import register


@register("widget", "alpha")
class Alpha:
    def __init__(self, size: int = 1, label: str = "a", **extra) -> None:
        self.size, self.label, self.extra = size, label, extra
'''


@pytest.fixture
def widget_group(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Registry:
    """A throw-away group backed by a package on disk: one public module, one private module that must not load."""
    pkg = tmp_path / "widgets_pkg_for_tests"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "alpha.py").write_text(WIDGET_MODULE)
    (pkg / "_private.py").write_text("raise RuntimeError('private modules are not auto-imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    reg = Registry("widget", "widgets_pkg_for_tests")
    monkeypatch.setitem(registry.REGISTRIES, "widget", reg)
    yield reg
    for mod in [m for m in sys.modules if m.startswith("widgets_pkg_for_tests")]:
        del sys.modules[mod]


def test_unknown_quantizer_lists_valid_names() -> None:
    with pytest.raises(UnknownNameError) as err:
        build("quantizer", {"name": "gptqq"})
    msg = str(err.value)
    assert msg.startswith("unknown quantizer 'gptqq'; valid quantizer names: ")
    valid = msg.split("names: ")[1].split(", ")
    assert {"fp", "rtn"} <= set(valid) and valid == sorted(valid)
    assert isinstance(err.value, ConfigError) and isinstance(err.value, ValueError)
    with pytest.raises(UnknownNameError, match="valid decoding names: dream, llada"):
        build("decoding", "beam")


def test_group_modules_are_auto_imported(widget_group: Registry) -> None:
    assert names("widget") == ["alpha"]  # found by importing the package's modules, _private skipped
    obj = build("widget", {"name": "alpha", "size": 3, "label": "x", "colour": "red"})
    assert (obj.size, obj.label, obj.extra) == (3, "x", {"colour": "red"})
    assert build("widget", "alpha").size == 1  # a bare name builds with the defaults


def test_import_errors_are_not_hidden(widget_group: Registry, tmp_path: Path) -> None:
    """A module that fails to import fails every lookup, not just the first (no silently partial registry)."""
    (tmp_path / "widgets_pkg_for_tests" / "broken.py").write_text("raise ImportError('broken widget module')\n")
    for _ in range(2):
        with pytest.raises(ImportError, match="broken widget module"):
            names("widget")
    (tmp_path / "widgets_pkg_for_tests" / "broken.py").unlink()
    assert names("widget") == ["alpha"]


def test_build_passes_yaml_keys_as_kwargs() -> None:
    cfg = OmegaConf.create({"name": "rtn", "w_bits": 8, "a_bits": "${.w_bits}", "w_granularity": "group",
                            "group_size": 64})
    q = build("quantizer", cfg)  # DictConfig, interpolations resolved
    assert isinstance(q, RTN)
    assert (q.bits.w_bits, q.bits.a_bits, q.bits.w_granularity, q.bits.group_size) == (8, 8, "group", 64)
    q = build("decoding", {"name": "llada"}, gen_length=16, block_length=8, steps=4)  # extra kwargs from code
    assert (q.gen_length, q.block_length, q.steps) == (16, 8, 4)


def test_build_errors_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="the quantizer config has no 'name' key; valid names: .*rtn"):
        build("quantizer", {"w_bits": 4})
    with pytest.raises(ConfigError, match="quantizer=rtn: .*unexpected keyword argument 'w_bitz'"):
        build("quantizer", {"name": "rtn", "w_bitz": 4})
    with pytest.raises(ConfigError, match="bit width 1 is out of range"):
        build("quantizer", {"name": "rtn", "w_bits": 1})


def test_double_registration_is_refused() -> None:
    reg = Registry("thing", "fair_calib.benchmark")

    class A:
        pass

    class B:
        pass

    reg.register("a")(A)
    reg.register("a")(A)  # re-importing the same module is harmless
    with pytest.raises(ValueError, match="thing 'a' registered twice"):
        reg.register("a")(B)


def test_every_group_has_a_registry() -> None:
    assert set(registry.GROUP_PACKAGES) == {"model", "quantizer", "prior", "weighting", "benchmark", "decoding",
                                            "data", "logger", "layout"}
    assert "dllm" in names("model") and "none" in names("logger")
    assert names("layout") == ["compressed-tensors", "fair_calib"]  # registered by fair_calib.export


def test_models_never_import_export() -> None:
    """export depends on models, not the reverse: the exported layouts are looked up by name (registry `layout`)."""
    import ast
    from pathlib import Path

    import fair_calib.models

    offenders = []
    for path in Path(fair_calib.models.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.name}: {m}" for m in mods if m.startswith("fair_calib.export")]
    assert offenders == []
