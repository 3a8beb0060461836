"""fair-calib: post-training quantization of diffusion LLMs with FAIR-Calib and its baselines."""

from pathlib import Path

__version__ = "0.1.0"
CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


# One definition of the config keys that never change a run's numbers (leaf names, at any depth): caches,
# logging, progress bars, thread count (see the README on threads), the sweep's seed count. They are left out of
# the run hash that decides whether a finished folder is reused (pipeline.run_key) and of the folder names.
VOLATILE_KEYS = ("force", "debug", "threads", "logger", "group", "cache_dir", "progress", "show_progress",
                 "offload_dir", "seeds")
# Keys that do change results but are too long or machine-specific for a folder name (still in the run hash).
UNNAMED_KEYS = ("device", "model.path")
_GROUPS = ("model", "quantizer", "prior", "weighting", "benchmark", "decoding", "data", "diagnostics")


def dirname_excluded_keys() -> list[str]:
    """Hydra's `override_dirname.exclude_keys`: every volatile key at the top level and in each group, plus the
    unnamed ones (Hydra matches exact override keys, so the leaf names are spelled out per group)."""
    return [*VOLATILE_KEYS, *(f"{g}.{k}" for g in _GROUPS for k in VOLATILE_KEYS), *UNNAMED_KEYS]


def short_dirname(name: str, limit: int = 120) -> str:
    """A run folder name from Hydra's override_dirname: kept when short; else each `a.b.key=value` item becomes
    `key=value`, as many whole items as fit are kept (never a cut inside one, which hid the value that differs)
    and a hash of the whole name follows (file systems refuse names over 255 bytes; long sweeps exceed that)."""
    import hashlib

    name = str(name).replace("/", "_")
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(name.encode()).hexdigest()[:16]
    room = limit - len(digest) - 1
    kept: list[str] = []
    for item in name.split(","):
        key, sep, value = item.partition("=")
        item = f"{key.rsplit('.', 1)[-1]}{sep}{value}"
        if len(",".join([*kept, item])) > room:
            break
        kept.append(item)
    head = ",".join(kept) if kept else name[:room]
    return f"{head}~{digest}"


def short_hash(text: str, n: int = 8) -> str:
    """A few hex digits naming a set of overrides (readable sweep folders stay unique per override set)."""
    import hashlib

    return hashlib.sha256(str(text).encode()).hexdigest()[:n]


def seed_sweep(seeds: object) -> str:
    """`seeds: N` of a named experiment as the Hydra sweep over `seed`: 'range(0,N)' (seeds 0..N-1)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"seeds={seeds!r}: the number of calibration seeds must be an integer >= 1, e.g. seeds=3")
    return f"range(0,{seeds})"


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("fc_dirname", short_dirname, replace=True)
    OmegaConf.register_new_resolver("fc_hash", short_hash, replace=True)
    OmegaConf.register_new_resolver("fc_seeds", seed_sweep, replace=True)
    OmegaConf.register_new_resolver("fc_volatile", dirname_excluded_keys, replace=True)


_register_resolvers()
