"""`PositionPrior`: the two Stage I maps over a window of K answer positions (DESIGN section 3).

frontier_hits      F_i = sum_{rollouts, t} lambda0(t) * 1{i committed at step t}
masked_reliability R_i = sum_{rollouts, t} lambda1 * c_{t,i} * 1{i still masked at step t}

Both maps are kept raw (the float64 accumulations) and separately, so every weighting ablation
reuses one probe. The normalized maps divide each raw map by its mean over the window
(F / mean(F), R / mean(R): mean 1, so a mix alpha * F + beta * R weighs the two on one scale).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from fair_calib.utils.io import write_json_atomic, write_text_atomic

FORMAT_VERSION = 1


def normalize_mean_one(x: Tensor) -> Tensor:
    """x / mean(x) over the window (all zeros stay zeros: a map with no mass carries no preference)."""
    x = x.double()
    mean = x.mean() if x.numel() else x.new_zeros(())
    return x / mean if float(mean) > 0 else torch.zeros_like(x)


@dataclass
class PositionPrior:
    """Frontier-hit and masked-reliability maps over K answer positions, and what produced them."""

    frontier_hits_raw: Tensor  # (K,) float64
    masked_reliability_raw: Tensor  # (K,) float64
    n_rollouts: int
    settings: dict[str, Any] = field(default_factory=dict)
    n_steps: int = 0  # rollout steps accumulated (summed over batches)
    key: str | None = None  # cache key (hash of model weights, probe settings, prompts)

    def __post_init__(self) -> None:
        self.frontier_hits_raw = torch.as_tensor(self.frontier_hits_raw, dtype=torch.float64).flatten()
        self.masked_reliability_raw = torch.as_tensor(self.masked_reliability_raw, dtype=torch.float64).flatten()
        if self.frontier_hits_raw.shape != self.masked_reliability_raw.shape:
            raise ValueError(f"frontier_hits has {self.frontier_hits_raw.numel()} positions but masked_reliability "
                             f"has {self.masked_reliability_raw.numel()}")
        for name, m in (("frontier_hits", self.frontier_hits_raw), ("masked_reliability", self.masked_reliability_raw)):
            if not bool(torch.isfinite(m).all()):
                raise ValueError(f"{name} has non-finite entries")

    @property
    def window(self) -> int:
        """K, the number of answer positions the maps cover."""
        return int(self.frontier_hits_raw.numel())

    @property
    def frontier_hits(self) -> Tensor:
        """F normalized to mean 1 over the window."""
        return normalize_mean_one(self.frontier_hits_raw)

    @property
    def masked_reliability(self) -> Tensor:
        """R normalized to mean 1 over the window."""
        return normalize_mean_one(self.masked_reliability_raw)

    # ---- serialization ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "window": self.window,
            "n_rollouts": self.n_rollouts,
            "n_steps": self.n_steps,
            "key": self.key,
            "settings": self.settings,
            "frontier_hits_raw": self.frontier_hits_raw.tolist(),
            "masked_reliability_raw": self.masked_reliability_raw.tolist(),
            "frontier_hits": self.frontier_hits.tolist(),
            "masked_reliability": self.masked_reliability.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PositionPrior:
        """Rebuild from `to_dict` output; the normalized maps are recomputed from the raw ones."""
        if d.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"position prior format {d.get('format_version')!r}, expected {FORMAT_VERSION}")
        return cls(
            frontier_hits_raw=torch.tensor(d["frontier_hits_raw"], dtype=torch.float64),
            masked_reliability_raw=torch.tensor(d["masked_reliability_raw"], dtype=torch.float64),
            n_rollouts=int(d["n_rollouts"]),
            settings=dict(d.get("settings") or {}),
            n_steps=int(d.get("n_steps", 0)),
            key=d.get("key"),
        )

    def to_json(self, path: str | Path) -> Path:
        """Write the prior (raw and normalized maps, settings) atomically as JSON."""
        return write_json_atomic(path, self.to_dict())

    @classmethod
    def from_json(cls, path: str | Path) -> PositionPrior:
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_csv(self, path: str | Path, weights: Tensor | None = None) -> Path:
        """One row per position: raw and normalized F and R, and the final weight when given."""
        columns = ["position", "frontier_hits_raw", "frontier_hits", "masked_reliability_raw", "masked_reliability"]
        cols = [torch.arange(self.window), self.frontier_hits_raw, self.frontier_hits,
                self.masked_reliability_raw, self.masked_reliability]
        if weights is not None:
            weights = self._check_weights(weights)
            columns.append("weight")
            cols.append(weights.double())
        rows = zip(*[c.tolist() for c in cols])
        lines: list[list[Any]] = [columns, *[list(r) for r in rows]]
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows(lines)
        return write_text_atomic(Path(path), buf.getvalue())

    def plot(self, path: str | Path, weights: Tensor | None = None, title: str | None = None) -> Path:
        """PNG of normalized F, R (and the final per-position weights when given) against answer offset."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        pos = list(range(self.window))
        fig, ax = plt.subplots(figsize=(7, 3.2))
        try:
            ax.plot(pos, self.frontier_hits.tolist(), label="frontier hits F (mean 1)")
            ax.plot(pos, self.masked_reliability.tolist(), label="masked reliability R (mean 1)")
            if weights is not None:
                ax.plot(pos, self._check_weights(weights).tolist(), "k--", label="weight")
            ax.axhline(1.0, color="grey", lw=0.5)
            ax.set_xlabel("answer offset i")
            ax.set_ylabel("normalized value")
            ax.set_title(title or f"position prior ({self.n_rollouts} rollouts, K={self.window})")
            ax.legend(fontsize=8)
            fig.tight_layout()
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=120)
        finally:
            plt.close(fig)
        return path

    def save(self, out_dir: str | Path, weights: Tensor | None = None, stem: str = "prior") -> dict[str, Path]:
        """Write <stem>.json, <stem>.csv and <stem>.png into `out_dir` (a run folder)."""
        out = Path(out_dir)
        return {
            "json": self.to_json(out / f"{stem}.json"),
            "csv": self.to_csv(out / f"{stem}.csv", weights),
            "png": self.plot(out / f"{stem}.png", weights),
        }

    def _check_weights(self, weights: Tensor) -> Tensor:
        weights = torch.as_tensor(weights).detach().cpu().flatten()
        if weights.numel() != self.window:
            raise ValueError(f"weights have {weights.numel()} positions, the prior window has {self.window}")
        return weights
