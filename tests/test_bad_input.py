"""Bad input gets one clear line and a non-zero exit, never a traceback or a silent success (issue 19)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import make_tiny
from safetensors.torch import load_file, save_file

from fair_calib.errors import (
    ComputationError,
    ConfigError,
    Interrupted,
    NonFiniteWeightError,
    exit_code,
    guarded,
    one_line,
)
from fair_calib.models import loading
from fair_calib.models.loading import load_dllm, save_dllm
from fair_calib.models.validate import check_model_folder, check_run_values
from fair_calib.quant.qlinear import NonFiniteWeightError as QLinearNonFinite
from fair_calib.registry import ConfigError as RegistryConfigError
from fair_calib.registry import build


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


# ---- broken model folders (fair_calib.models.validate): checked from JSON and safetensors headers only ------------
LN_F = "model.transformer.ln_f.weight"


@pytest.fixture(scope="module")
def good_folder(tmp_path_factory) -> Path:
    return save_dllm(make_tiny("llada"), tmp_path_factory.mktemp("good") / "tiny")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _config(folder: Path) -> dict:
    return json.loads((folder / "config.json").read_text())


def _header_len(path: Path) -> int:
    return struct.unpack("<Q", path.read_bytes()[:8])[0]


def _break_config_text(folder: Path, text: str) -> None:
    (folder / "config.json").write_text(text)


def _drop_keys(folder: Path, *keys: str) -> None:
    cfg = {k: v for k, v in _config(folder).items() if k not in keys}
    (folder / "config.json").write_text(json.dumps(cfg))


def _set_key(folder: Path, key: str, value) -> None:
    (folder / "config.json").write_text(json.dumps({**_config(folder), key: value}))


def _truncate(folder: Path) -> None:
    st = folder / "model.safetensors"
    st.write_bytes(st.read_bytes()[:-100])


def _rewrite_header(folder: Path, header: bytes, size: int | None = None) -> None:
    st = folder / "model.safetensors"
    data = st.read_bytes()[8 + _header_len(st):]
    st.write_bytes(struct.pack("<Q", len(header) if size is None else size) + header + data)


def _edit_tensors(folder: Path, edit) -> None:
    state = load_file(str(folder / "model.safetensors"))
    edit(state)
    save_file(state, str(folder / "model.safetensors"))


def _pickle_only(folder: Path) -> None:
    state = load_file(str(folder / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()


def _shard(folder: Path, weight_map: dict | None, extra: str | None = None) -> None:
    st = folder / "model.safetensors"
    (folder / "model-00001-of-00001.safetensors").write_bytes(st.read_bytes())
    st.unlink()
    index = {"metadata": {}, "weight_map": weight_map} if weight_map is not None else {"metadata": {}}
    (folder / "model.safetensors.index.json").write_text(extra if extra is not None else json.dumps(index))


def _missing_shard(folder: Path) -> None:
    names = list(load_file(str(folder / "model.safetensors")))
    _shard(folder, {n: ("model-00001-of-00002.safetensors" if i % 2 else "model-00002-of-00002.safetensors")
                    for i, n in enumerate(names)})


BROKEN_FOLDERS = {
    "config_not_json": (lambda f: _break_config_text(f, '{"model_type": "llada", "d_model": 32,'),
                        "config.json is not valid JSON"),
    "config_binary": (lambda f: (f / "config.json").write_bytes(b"\xff\xfe\x00garbage"), "is not UTF-8 text"),
    "config_list": (lambda f: _break_config_text(f, "[1, 2, 3]"),
                    "holds a JSON list, not an object: a model config.json is one {...} of architecture keys"),
    "config_lacks_n_heads": (lambda f: _drop_keys(f, "n_heads"), "lacks the llada architecture key(s) n_heads"),
    "config_lacks_two": (lambda f: _drop_keys(f, "n_heads", "d_model"),
                         "lacks the llada architecture key(s) d_model, n_heads"),
    "config_lacks_vocab": (lambda f: _drop_keys(f, "vocab_size", "embedding_size"),
                           "key(s) vocab_size/embedding_size"),
    "config_n_heads_string": (lambda f: _set_key(f, "n_heads", "four"), "invalid architecture values (n_heads='four')"),
    "config_n_layers_zero": (lambda f: _set_key(f, "n_layers", 0), "invalid architecture values (n_layers=0)"),
    "config_heads_do_not_divide": (lambda f: _set_key(f, "n_heads", 5), "is not divisible by n_heads 5"),
    "safetensors_truncated": (_truncate, "truncated or padded): the file is damaged or incompletely downloaded"),
    "safetensors_tiny": (lambda f: (f / "model.safetensors").write_bytes(b"\x01\x02"), "no header"),
    "safetensors_empty": (lambda f: (f / "model.safetensors").write_bytes(b""), "(0 bytes, no header)"),
    "header_size_too_large": (lambda f: _rewrite_header(f, b"{}", size=10**12),
                              "header size 1000000000000 is larger than the file"),
    "header_not_json": (lambda f: _rewrite_header(f, b"{not json at all}"), "corrupt safetensors header (not JSON)"),
    "header_a_list": (lambda f: _rewrite_header(f, b"[]"), "corrupt safetensors header (not a JSON object)"),
    "header_bad_entry": (lambda f: _rewrite_header(f, b'{"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 3]}}'),
                         "corrupt safetensors header entry for tensor 'w'"),
    "tensor_renamed": (lambda f: _edit_tensors(f, lambda s: s.update({"extra.weight": s.pop(LN_F)})),
                       "missing ['model.transformer.ln_f.weight'], unexpected ['extra.weight']"),
    "tensor_missing": (lambda f: _edit_tensors(f, lambda s: s.pop("model.transformer.blocks.1.ff_out.weight")),
                       "missing ['model.transformer.blocks.1.ff_out.weight'], unexpected []"),
    "tensor_wrong_shape": (lambda f: _edit_tensors(f, lambda s: s.update({LN_F: torch.ones(31)})),
                           "tensor model.transformer.ln_f.weight has shape [31] but config.json implies [32]"),
    "config_of_other_size": (lambda f: _set_key(f, "mlp_hidden_size", 48),
                             "tensor model.transformer.blocks.0.ff_out.weight has shape [32, 64] but config.json "
                             "implies [32, 48]"),
    "pickle_only": (_pickle_only,
                    "this folder holds only pickle weights (pytorch_model.bin); convert it to safetensors"),
    "no_weights": (lambda f: (f / "model.safetensors").unlink(), "holds no model.safetensors or sharded index"),
    "index_empty": (lambda f: _shard(f, {}), "names no shards"),
    "index_no_map": (lambda f: _shard(f, None), "names no shards"),
    "index_not_json": (lambda f: _shard(f, {}, extra="{"), "model.safetensors.index.json is not valid JSON"),
    "index_missing_shards": (_missing_shard, "names 2 missing shard file(s) (model-00001-of-00002.safetensors, "
                                             "model-00002-of-00002.safetensors): finish the download"),
    "index_wrong_shard": (lambda f: _shard(f, {"not.in.the.shard": "model-00001-of-00001.safetensors"}),
                          "places tensor 'not.in.the.shard' in model-00001-of-00001.safetensors, which does not "
                          "hold it"),
}


@pytest.mark.parametrize("case", list(BROKEN_FOLDERS))
def test_broken_model_folder_is_one_config_error_before_any_weights_load(case, good_folder, tmp_path, monkeypatch):
    breaker, message = BROKEN_FOLDERS[case]
    folder = _copy(good_folder, tmp_path / "m")
    breaker(folder)
    monkeypatch.setattr(loading, "load_file", _no_weights)  # the check reads headers only
    with pytest.raises(ConfigError) as err:
        check_model_folder(folder)
    assert message in str(err.value) and "\n" not in one_line(err.value)
    with pytest.raises(ConfigError) as again:  # every loading entry point gets the same check
        load_dllm(folder)
    assert str(again.value) == str(err.value)


def _no_weights(*args, **kwargs):
    raise AssertionError("tensors were read before the folder was checked")


def test_registry_model_spec_checks_the_folder_at_build_time(good_folder, tmp_path, monkeypatch):
    folder = _copy(good_folder, tmp_path / "m")
    _truncate(folder)
    monkeypatch.setattr(loading, "load_file", _no_weights)
    with pytest.raises(ConfigError, match="truncated or padded"):
        build("model", {"name": "dllm", "path": str(folder)})


def test_valid_folders_still_load(good_folder, tmp_path):
    check_model_folder(good_folder)
    model = build("model", {"name": "dllm", "path": str(good_folder)}).load()
    assert model.config.n_heads == 4 and model.tokenizer is not None
    sharded = _copy(good_folder, tmp_path / "sharded")
    names = list(load_file(str(sharded / "model.safetensors")))
    _shard(sharded, dict.fromkeys(names, "model-00001-of-00001.safetensors"))
    check_model_folder(sharded)
    torch.testing.assert_close(load_dllm(sharded).output_layer.weight, model.output_layer.weight, rtol=0, atol=0)


# ---- calibration text files (data=text) ---------------------------------------------------------------------------
CORPUS_CASES = {
    "binary": ("c.txt", b"\x89PNG\r\n\x1a\n\x00\x00\xff\xd8\xff", "is not UTF-8 text (byte 0x89 at offset 0)"),
    "latin1": ("c.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"), "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "nul_bytes": ("c.txt", b"abc\x00\x00def", "holds NUL bytes, so it is a binary file"),
    "empty": ("c.txt", b"", "is empty: point data.path at a corpus with text in it"),
    "blank": ("c.txt", b"\n  \n\t\n", "is empty"),
    "jsonl_null": ("c.jsonl", b'{"text": "a b c"}\n{"text": null}\n', "c.jsonl:2 has a null 'text' field"),
    "jsonl_missing": ("c.jsonl", b'{"text": "a"}\n\n{"body": "b"}\n', "c.jsonl:3 has no 'text' field"),
    "jsonl_number": ("c.jsonl", b'{"text": 5}\n', "c.jsonl:1: field 'text' is a int, not a string"),
    "jsonl_list": ("c.jsonl", b'["text"]\n', "c.jsonl:1 is a JSON list, not an object"),
    "jsonl_bad_json": ("c.jsonl", b'{"text": "a"}\n{"text": \n', "c.jsonl:2 is not valid JSON"),
    "jsonl_all_blank": ("c.jsonl", b'{"text": ""}\n{"text": "  "}\n', "has no non-blank 'text' text"),
}


@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_bad_calibration_file_is_one_line_naming_it(case, tmp_path, char_tokenizer):
    name, content, message = CORPUS_CASES[case]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        build("data", {"name": "text", "path": str(path), "n_samples": 2, "seq_len": 4}, tokenizer=char_tokenizer)
    assert message in str(err.value) and str(path) in str(err.value)
    with pytest.raises(ConfigError, match=re.escape(message)):  # the pipeline checks it before any weights load
        check_run_values({"data": {"name": "text", "path": str(path), "text_field": "text"}})


def test_non_ascii_calibration_path_is_accepted(tmp_path, char_tokenizer):
    folder = tmp_path / "données ünï 数据"
    folder.mkdir()
    path = folder / "corpus café.jsonl"
    path.write_text('{"text": "the cat sat on the mat, über alles"}\n{"text": "two plus two is four"}\n',
                    encoding="utf-8")
    check_run_values({"data": {"name": "text", "path": str(path)}})
    calib = build("data", {"name": "text", "path": str(path), "n_samples": 3, "seq_len": 8},
                  tokenizer=char_tokenizer)
    assert calib.input_ids.shape == (3, 8) and len(calib.prompts) == 3


@pytest.mark.parametrize(("data", "message"), [
    ({"name": "text", "path": "c.txt", "n_samples": "abc"},
     "data.n_samples='abc': must be an integer >= 1, e.g. data.n_samples=8"),
    ({"name": "text", "path": "c.txt", "n_samples": 0}, "data.n_samples=0: must be an integer >= 1"),
    ({"name": "text", "path": "c.txt", "seq_len": 2.5}, "data.seq_len=2.5: must be an integer >= 2"),
    ({"name": "tinyreason", "n_samples": 1.5}, "data.n_samples=1.5: must be an integer >= 1"),
])
def test_bad_calibration_count_is_one_line(data, message, tmp_path, char_tokenizer):
    (tmp_path / "c.txt").write_text("some text " * 20)
    if "path" in data:
        data = {**data, "path": str(tmp_path / data["path"])}
    with pytest.raises(ConfigError, match=re.escape(message)):
        build("data", data, tokenizer=char_tokenizer)


# ---- values: threads, device, switches, bit settings, temperature --------------------------------------------------
RUN_VALUES = [
    ({"threads": 0}, "threads=0: must be a positive integer, e.g. threads=2"),
    ({"threads": -3}, "threads=-3: must be a positive integer"),
    ({"threads": 2.5}, "threads=2.5: must be a positive integer"),
    ({"threads": "two"}, "threads='two': must be a positive integer"),
    ({"threads": True}, "threads=True: must be a positive integer"),
    ({"device": "tpu9"}, "device='tpu9' is not a device: use device=cpu, device=cuda"),
    ({"device": "meta"}, "device=meta: runs need cpu, cuda or mps"),
    ({"compare_fp": "maybe"}, "compare_fp='maybe': must be true or false, e.g. compare_fp=true"),
    ({"compare_fp": 1}, "compare_fp=1: must be true or false"),
    ({"save_quantized": "yes please"}, "save_quantized='yes please': must be true or false"),
    ({"benchmark": {"mc_num": 0}}, "benchmark.mc_num=0: must be a positive integer, e.g. benchmark.mc_num=8"),
    ({"benchmark": {"mc_batch_size": 2.5}}, "benchmark.mc_batch_size=2.5: must be a positive integer"),
    ({"diagnostics": {"batch_size": -1}}, "diagnostics.batch_size=-1: must be a positive integer"),
    ({"diagnostics": {"n_prompts": True}}, "diagnostics.n_prompts=True: must be a positive integer"),
]


@pytest.mark.parametrize(("values", "message"), RUN_VALUES)
def test_bad_run_value_is_one_line(values, message):
    with pytest.raises(ConfigError) as err:
        check_run_values({"threads": None, "device": "cpu", "compare_fp": True, **values})
    assert message in str(err.value)


def test_good_run_values_pass():
    check_run_values({"threads": 2, "device": "cpu", "compare_fp": False, "save_quantized": False, "force": False})
    check_run_values({"threads": None, "device": "auto", "data": {"name": "text", "path": "???"}})


QUANT_VALUES = [
    ({"w_bits": 4.5}, "quantizer.w_bits=4.5: must be an integer bit width 2..16 (16 = full precision), "
                      "e.g. quantizer.w_bits=4"),
    ({"a_bits": 8.0}, "quantizer.a_bits=8.0: must be an integer bit width"),
    ({"kv_bits": "four"}, "quantizer.kv_bits='four': must be an integer bit width"),
    ({"w_symmetric": "maybe"}, "quantizer.w_symmetric='maybe': must be true or false, e.g. quantizer.w_symmetric=true"),
    ({"a_symmetric": 1}, "quantizer.a_symmetric=1: must be true or false"),
    ({"group_size": 64.5}, "quantizer.group_size=64.5: must be an integer"),
    ({"w_clip_ratio": "high"}, "quantizer.w_clip_ratio='high': must be a number"),
    ({"w_granularity": 3}, "quantizer.w_granularity=3: must be a string"),
]


@pytest.mark.parametrize(("values", "message"), QUANT_VALUES)
def test_bad_bit_setting_is_one_line(values, message):
    with pytest.raises(ConfigError) as err:
        build("quantizer", {"name": "rtn", **values})
    assert message in str(err.value)


def test_good_bit_settings_pass():
    assert build("quantizer", {"name": "rtn", "w_bits": 8, "a_bits": 16, "w_clip_ratio": 1}).label == "W8A16"


@pytest.mark.parametrize(("decoding", "key", "value"), [("llada", "temperature", -1), ("dream", "temperature", -0.5),
                                                        ("llada", "temperature", "hot"), ("dream", "alg_temp", -1)])
def test_negative_temperature_is_one_line(decoding, key, value):
    with pytest.raises(ConfigError, match=re.escape(f"decoding.{key}={value!r}: a temperature must be a number >= 0")):
        build("decoding", {"name": decoding, key: value})
    assert build("decoding", {"name": decoding, key: 0.7}) is not None


# ---- the command line: exit 2, one `error:` line with the fix, no traceback, no results.json -------------------------
def _cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "FAIR_CALIB_CACHE": str(cwd / "cache"), "WANDB_MODE": "offline", "WANDB_SILENT": "true",
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run([sys.executable, "-m", "fair_calib", "experiment=none", "method=rtn", "logger=none",
                           "hydra.run.dir=run", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _binary_corpus(tmp: Path) -> str:
    path = tmp / "корпус café.txt"
    path.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff")
    return f"data.path='{path}'"  # quoted: Hydra's override grammar takes non-ASCII characters only inside quotes


CLI_CASES = {
    "truncated_safetensors": (lambda tmp, good: f"model.path={_broken(tmp, good, _truncate)}",
                              "truncated or padded): the file is damaged or incompletely downloaded: re-download it"),
    "pickle_only": (lambda tmp, good: f"model.path={_broken(tmp, good, _pickle_only)}",
                    "this folder holds only pickle weights (pytorch_model.bin); convert it to safetensors"),
    "threads_zero": (lambda tmp, good: "threads=0", "threads=0: must be a positive integer, e.g. threads=2"),
    "fractional_bits": (lambda tmp, good: "quantizer.w_bits=4.5", "quantizer.w_bits=4.5: must be an integer bit width"),
    "compare_fp_maybe": (lambda tmp, good: "compare_fp=maybe", "compare_fp='maybe': must be true or false"),
    "binary_corpus": (lambda tmp, good: ["data=text", _binary_corpus(tmp)], "корпус café.txt' is not UTF-8 text"),
    # combinations that are fine alone: caught before any weights load
    "weighting_without_prior": (lambda tmp, good: "weighting=fair",
                                "weighting=fair reweights tokens by the Stage I prior but prior=none; set prior=fair"),
    "sampler_of_the_other_family": (lambda tmp, good: "decoding=dream",
                                    "decoding=dream is a dream sampler but the model (tiny-llada) is a llada model"),
    "window_beyond_any_sequence": (lambda tmp, good: ["prior=fair", "prior.window=100000"],
                                   "prior.window=100000 exceeds benchmark.max_length=4096"),
    "zero_batch": (lambda tmp, good: "benchmark.batch_size=0", "benchmark.batch_size=0: must be a positive integer"),
    "too_many_diagnostic_prompts": (lambda tmp, good: "diagnostics.n_prompts=100000",
                                    "diagnostics.n_prompts=100000: only 1000 documents in tinyreason_word_problems"),
    "negative_eval_seed": (lambda tmp, good: "eval_seed=-1", "eval_seed=-1: the seed must be a non-negative integer"),
}


def _broken(tmp: Path, good: Path, breaker) -> Path:
    folder = _copy(good, tmp / "broken")
    breaker(folder)
    return folder


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_bad_input_is_one_line_and_exit_2(case, good_folder, tmp_path):
    make_args, message = CLI_CASES[case]
    args = make_args(tmp_path, good_folder)
    proc = _cli(args if isinstance(args, list) else [args], tmp_path)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (tmp_path / "run" / "results.json").exists()


# ---- files keep the user's umask (mkstemp / mkdtemp alone make them private) ----------------------------------------
@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_atomic_writes_follow_the_umask(tmp_path, mask):
    from fair_calib.utils.io import atomic_dir, write_json_atomic

    old = os.umask(mask)
    try:
        path = write_json_atomic(tmp_path / "results.json", {"status": "ok"})
        with atomic_dir(tmp_path / "quantized_model") as folder:
            (folder / "config.json").write_text("{}")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o666 & ~mask
    assert (tmp_path / "quantized_model").stat().st_mode & 0o777 == 0o777 & ~mask
    assert (tmp_path / "quantized_model" / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporaries left


def test_atomic_dir_keeps_the_old_folder_when_writing_fails(tmp_path):
    from fair_calib.utils.io import atomic_dir

    target = tmp_path / "model"
    target.mkdir()
    (target / "config.json").write_text("old")
    with pytest.raises(RuntimeError), atomic_dir(target) as folder:
        (folder / "config.json").write_text("new, half")
        raise RuntimeError("disk full")
    assert (target / "config.json").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


OFFLINE_RUN = """
import atexit, socket, sys
from pathlib import Path
looked_up = []
real = socket.getaddrinfo
socket.getaddrinfo = lambda host, *a, **k: looked_up.append(host) or real(host, *a, **k)
# registered before wandb is imported, so it runs after W&B's own exit handlers (which flush its telemetry)
atexit.register(lambda: Path(sys.argv[1], "lookups.txt").write_text(repr(sorted(set(looked_up)))))
from fair_calib.logger.wandb_logger import WandbLogger
logger = WandbLogger(mode=sys.argv[2])
logger.start(Path(sys.argv[1]), {"seed": 0}, "tiny-llada/RTN W4A4")
logger.log_metrics({"quant/avg": 1.0})
logger.finish()
"""


@pytest.mark.parametrize("mode", ["offline", "auto"])
def test_offline_logging_makes_no_network_lookup(tmp_path, mode):
    """W&B's telemetry read only the process-wide WANDB_MODE and resolved its host even for offline runs."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    proc = subprocess.run([sys.executable, "-c", OFFLINE_RUN, str(tmp_path), mode], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (tmp_path / "lookups.txt").read_text() == "[]"
    assert list((tmp_path / "wandb").glob("offline-run-*"))


class _RecordingRun:
    def __init__(self) -> None:
        self.summary: dict = {}
        self.exit_code = None

    def finish(self, exit_code=None) -> None:
        self.exit_code = exit_code


@pytest.mark.parametrize(("status", "code"), [("ok", 0), ("failed", 1), ("interrupted", 130)])
def test_wandb_run_ends_with_the_jobs_status(status, code):
    from fair_calib.logger.wandb_logger import WandbLogger

    logger = WandbLogger(mode="offline")
    logger.run = run = _RecordingRun()
    logger.finish(status)
    assert run.summary == {"status": status} and run.exit_code == code and logger.run is None


@pytest.mark.parametrize(("raised", "status"), [(Interrupted(signal.SIGTERM), "interrupted"),
                                                (KeyboardInterrupt(), "interrupted"),
                                                (NonFiniteWeightError("layer blocks.0.q"), "failed")])
def test_an_interrupted_or_failed_run_finishes_its_logger_so(raised, status, tmp_path, monkeypatch):
    from hydra import compose, initialize_config_dir

    from fair_calib import CONF_DIR
    from fair_calib.pipeline import Pipeline

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["experiment=none", "method=rtn", "logger=none", "device=cpu"])
    pipe = Pipeline(cfg, tmp_path / "run")
    seen = []
    monkeypatch.setattr(pipe.logger, "finish", lambda s="ok": seen.append(s))

    def fail():
        raise raised

    monkeypatch.setattr(pipe, "_run_stages", fail)
    with pytest.raises(type(raised)):
        pipe.run()
    assert seen == [status] and not (tmp_path / "run" / "results.json").exists()
