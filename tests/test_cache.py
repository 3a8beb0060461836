"""The one disk cache (utils/cache.py) behind the evaluation, prior and teacher-trajectory caches."""

from __future__ import annotations

import json
import logging

import pytest

from fair_calib.utils.cache import DiskCache


def _json_cache(tmp_path, **kw) -> DiskCache:
    return DiskCache(tmp_path / "c", "toy", prefix="toy-", **kw)


def _load(path):
    return json.loads(path.read_text())["v"]


def _save(value, tmp):
    tmp.write_text(json.dumps({"v": value}))


def test_miss_then_hit_then_force(tmp_path, caplog):
    calls = []

    def compute():
        calls.append(1)
        return len(calls) * 10

    caplog.set_level(logging.INFO, logger="fair_calib")
    cache = _json_cache(tmp_path)
    assert cache.path("k") == tmp_path / "c" / "toy-k.json"
    assert cache.get("k", compute, _load, _save) == (10, False)
    assert cache.get("k", compute, _load, _save, label="rtn") == (10, True) and len(calls) == 1
    assert f"toy cache hit (rtn): {cache.path('k')}" in caplog.text
    assert _json_cache(tmp_path, force=True).get("k", compute, _load, _save) == (20, False)  # recomputed, rewritten
    assert cache.get("k", compute, _load, _save) == (20, True)
    assert cache.get("other", compute, _load, _save) == (30, False)  # another key, another entry


def test_an_unreadable_entry_is_recomputed_and_replaced(tmp_path, caplog):
    cache = _json_cache(tmp_path)
    cache.path("k").parent.mkdir(parents=True)
    cache.path("k").write_text('{"v": ')  # truncated
    assert cache.get("k", lambda: 7, _load, _save) == (7, False)
    assert "toy cache" in caplog.text and "unreadable (JSONDecodeError" in caplog.text
    assert cache.get("k", lambda: 8, _load, _save) == (7, True)
    cache.path("k").write_text('{"w": 1}')  # readable JSON but not an entry: the loader's KeyError
    assert cache.get("k", lambda: 9, _load, _save) == (9, False)


def test_a_failed_save_leaves_the_old_entry_and_no_temporary_file(tmp_path):
    cache = _json_cache(tmp_path)
    cache.get("k", lambda: 1, _load, _save)

    def broken(value, tmp):
        tmp.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        DiskCache(tmp_path / "c", "toy", prefix="toy-", force=True).get("k", lambda: 2, _load, broken)
    assert _load(cache.path("k")) == 1
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["toy-k.json"]


def test_no_folder_means_no_cache(tmp_path):
    cache = DiskCache(None, "toy")
    assert cache.path("k") is None
    assert cache.get("k", lambda: 1, _load, _save) == (1, False)
    assert cache.get("k", lambda: 2, _load, _save) == (2, False)
