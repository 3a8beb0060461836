"""Bad input gets one clear line and a non-zero exit, never a traceback or a silent success (issue 19)."""

from __future__ import annotations

import signal

import pytest

from fair_calib.errors import (
    ComputationError,
    ConfigError,
    Interrupted,
    NonFiniteWeightError,
    exit_code,
    guarded,
    one_line,
)
from fair_calib.quant.qlinear import NonFiniteWeightError as QLinearNonFinite
from fair_calib.registry import ConfigError as RegistryConfigError


def test_error_family_and_exit_codes():
    assert RegistryConfigError is ConfigError and QLinearNonFinite is NonFiniteWeightError
    assert issubclass(ConfigError, ValueError) and issubclass(ComputationError, RuntimeError)
    assert exit_code(ConfigError("x")) == 2
    assert exit_code(NonFiniteWeightError("layer blocks.0.q")) == 1
    assert exit_code(Interrupted(signal.SIGTERM)) == 143 and exit_code(KeyboardInterrupt()) == 130


def test_one_line_joins_hydra_listing_and_drops_search_path():
    err = Exception("In 'config': Could not find 'quantizer/nope'\n\nAvailable options in 'quantizer':\n\tawq\n\trtn\n"
                    "Config search path:\n\tprovider=hydra")
    assert one_line(err) == "In 'config': Could not find 'quantizer/nope'; Available options in 'quantizer': awq, rtn"


def test_guarded_prints_one_line_and_returns_the_code(capsys, monkeypatch):
    monkeypatch.delenv("HYDRA_FULL_ERROR", raising=False)

    def fail():
        raise NonFiniteWeightError("non-finite values in the quantized weight of layer blocks.1.o")

    assert guarded(fail) == 1
    err = capsys.readouterr().err
    assert err == "error: non-finite values in the quantized weight of layer blocks.1.o\n"
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    assert guarded(fail) == 1
    assert "Traceback" in capsys.readouterr().err
    with pytest.raises(ZeroDivisionError):  # a bug is not an expected error: it keeps its traceback
        guarded(lambda: 1 / 0)
