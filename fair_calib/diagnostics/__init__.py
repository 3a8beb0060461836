"""Frontier diagnostics (DESIGN section 6): how quantization changes what a dLLM commits, and when.

`run_diagnostics` runs them all; each metric is a pure function in its own module:
`flips` (teacher-forced flip rate, selection disagreement), `lag` (stabilization lag), `mismatch`
(post-commit mismatch), `prob_mse` (step-wise probability MSE), `frontier_kl` (frontier KL),
`hidden_mse` (weighted / unweighted last-block MSE); `trajectory` holds rollouts and the cached
teacher trajectory, `policy` the one-step selection rule, `plots` the figures.
"""

from fair_calib.diagnostics.runner import METRICS, DiagnosticsResult, run_diagnostics

__all__ = ["METRICS", "DiagnosticsResult", "run_diagnostics"]
