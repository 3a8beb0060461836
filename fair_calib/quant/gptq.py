"""GPTQ (Frantar et al. 2023; DESIGN 4.3) with IST-DASLab reference semantics and per-token weights.

Statistics (`HessianAccumulator`): H = (2 / n) sum_i w_i x_i x_i^T over calibration tokens i, fp32,
n = sum_i w_i (w = the FAIR-Calib token weights; all ones gives the reference Hessian up to a constant,
which GPTQ is invariant to).

Solve (`gptq_solve`, the paper's algorithm box): dead columns (H_dd = 0) get H_dd = 1 and a zero
weight column; H += percdamp * mean(diag H) * I; U = upper Cholesky factor of H^-1 (cholesky ->
cholesky_inverse -> cholesky(upper)); columns are quantized left to right (optionally in descending
diag(H) order, `act_order`), each column's error (w - q) / U_jj is spread over the remaining columns
of its 128-column block at once and over later blocks lazily:  W[:, j:] -= err_j U[j, j:].
Group scales are found when the first column of a group is reached (from the weights as updated up
to the previous block boundary, as the reference does), or up front from the original weights
(`static_groups`). Cholesky failure -> damping x10 and retry (`max_damp_retries`, each retry logged), then
RTN for that layer with a warning; the result is checked for NaN/inf.

Defaults (`REFERENCES`): `quantizer=gptq` follows llm-compressor's GPTQModifier (halfstep grid for weight-only,
act order "static" = act order with static groups, one Hessian pass per block); `reference=ist` gives the
IST-DASLab script with `--true-sequential` (no act order, groups from the updated weights), `reference=quarot`
QuaRot's GPTQ (the same with the absmax grid), which QuaRot keeps. Every knob can still be set on its own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fair_calib.errors import ComputationError, NonFiniteWeightError
from fair_calib.models.block import INPUT_TAP, LINEAR_ROLES, tap_readers
from fair_calib.quant.base import check_type
from fair_calib.quant.engine import BlockContext, Collector, LayerwiseMethod, write_quantized_weight
from fair_calib.quant.grids import QuantSpec, fake_quant_weight, quant_dequant, weight_scale_zero
from fair_calib.registry import ConfigError, register

log = logging.getLogger(__name__)

# which activation each linear reads: linears with the same source and input transform share one Hessian
# true-sequential order (QuaRot / IST `--true-sequential`): later groups see the already quantized earlier ones
SEQUENTIAL_GROUPS = tuple(tap_readers(t) for t in ("attn_in", "attn_ctx", "mlp_in", "mlp_mid"))  # forward order




@dataclass(frozen=True)
class GPTQReference:
    """The GPTQ settings a reference implementation uses when the user sets none of them."""

    scale_convention: str  # "auto" (BitSettings): halfstep 2 absmax / (2^b - 1) for weight-only, else absmax
    act_order: bool
    static_groups: bool
    true_sequential: bool


REFERENCES = {
    # llm-compressor GPTQModifier: actorder="static" (act order, scales from the original weight groups), one
    # calibration pass per decoder layer, compressed-tensors grid (max / 7.5 at 4 bits); absmax at W4A4 so the
    # activation grid is the one of the W4A4 methods (QuaRot, FlatQuant) it is compared with
    "llm_compressor": GPTQReference("auto", act_order=True, static_groups=True, true_sequential=False),
    # IST-DASLab gptq (llama.py --true-sequential): its quant.py grid, no act order, groups from the weights as
    # updated so far
    "ist": GPTQReference("halfstep", act_order=False, static_groups=False, true_sequential=True),
    # QuaRot's GPTQ (gptq_utils.py): the IST solver with QuaRot's absmax / 7 weight grid
    "quarot": GPTQReference("absmax", act_order=False, static_groups=False, true_sequential=True),
}
# the reference each GPTQ-based quantizer follows by default (QuaRot's results stay those of its own reference)
METHOD_REFERENCE = {"gptq": "llm_compressor", "quarot": "quarot"}


class CholeskyError(ComputationError):
    """H + damping is not numerically positive definite."""


def hessian_strip(columns: int) -> int | None:
    """Width of the row strips an unweighted x^T x is computed in (whole 128-column tiles; 256 wide for widths
    above 512, the fastest here), None = one full product (widths that are not a multiple of 128, or 128 itself)."""
    if columns % 128 or columns < 256:
        return None
    return 256 if columns > 512 and columns % 256 == 0 else 128


class HessianAccumulator:
    """S = sum_i w_i x_i x_i^T and n = sum_i w_i in fp32; `hessian()` = 2 S / n (zero-weight tokens are skipped).

    Unweighted batches give an exactly symmetric x^T x: while only those arrive, only the diagonal and upper
    blocks of k row strips are computed (`hessian_strip` wide; (k + 1) / 2k of the products, 7/12 at width 1536)
    and the lower blocks are mirrored in once, before the first weighted batch or the first `hessian()`. Every
    entry is the same dot product over the same tokens as in the full product, and the sums are bit for bit the
    ones the full product gives.
    """

    def __init__(self, columns: int, device: torch.device | str = "cpu") -> None:
        self.columns = columns
        self.S = torch.zeros(columns, columns, dtype=torch.float32, device=device)
        self.n = 0.0
        self._strip = hessian_strip(columns)
        self._mirror_pending = False

    @torch.no_grad()
    def add(self, x: Tensor, w: Tensor | None = None) -> None:
        """x (..., columns) inputs, w (...) token weights (None = 1)."""
        x = x.reshape(-1, self.columns).float()
        if w is None:
            w = torch.ones(x.shape[0], dtype=torch.float32, device=x.device)
        w = w.reshape(-1).float().to(x.device)
        if bool((w == 1).all()):  # unweighted tokens (the usual case): no copies, the same sum
            if self._strip is not None:
                for a in range(0, self.columns, self._strip):
                    self.S[a: a + self._strip, a:].addmm_(x[:, a: a + self._strip].T, x[:, a:])
                self._mirror_pending = True
            else:
                self.S.addmm_(x.T, x)
            self.n += float(x.shape[0])
            return
        self._mirror()
        self._strip = None  # weighted sums are not exactly symmetric: full products from here on
        keep = w > 0
        x, w = x[keep], w[keep]
        self.S.addmm_((x * w[:, None]).T, x)
        self.n += float(w.sum())

    def _mirror(self) -> None:
        if self._mirror_pending:
            for a in range(self._strip, self.columns, self._strip):
                self.S[a:, a - self._strip: a] = self.S[a - self._strip: a, a:].T
            self._mirror_pending = False

    def hessian(self) -> Tensor:
        self._mirror()
        if self.n <= 0:
            return torch.zeros_like(self.S)
        return self.S * (2.0 / self.n)


def upper_cholesky_of_inverse(H: Tensor) -> Tensor:
    """U upper triangular with U^T U = H^-1 (via L = chol(H), H^-1 = cholesky_inverse(L), U = chol(H^-1, upper))."""
    L, info = torch.linalg.cholesky_ex(H)
    if int(info) != 0:
        raise CholeskyError(f"cholesky(H) failed at minor {int(info)}")
    Hinv = torch.cholesky_inverse(L)
    U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
    if int(info) != 0 or not bool(torch.isfinite(U).all()):
        raise CholeskyError("cholesky(H^-1) failed")
    return U


def _row_grid(w: Tensor, spec: QuantSpec) -> tuple[Tensor, Tensor | None]:
    """Per-row scale/zero for channel granularity, one shared scale/zero (broadcast to rows) for tensor."""
    if spec.granularity == "tensor":
        s, z = weight_scale_zero(w.reshape(1, -1), spec)
        rows = w.shape[0]
        return s.expand(rows, 1), (None if z is None else z.expand(rows, 1))
    return weight_scale_zero(w, spec)


@dataclass
class FactoredHessian:
    """What the solve needs of a Hessian: its dead columns, the act-order permutation (None = column order) and
    U = upper Cholesky factor of (H + damping)^-1 in that order. Linears that read the same input share one."""

    dead: Tensor
    perm: Tensor | None
    U: Tensor


@torch.no_grad()
def factor_hessian(H: Tensor, percdamp: float = 0.01, act_order: bool = False) -> FactoredHessian:
    """Dead columns get H_dd = 1; descending diag(H) order with act_order; H += percdamp * mean(diag H) * I;
    U = chol(H^-1) upper. Raises CholeskyError when H + damping is not positive definite."""
    H = H.detach().clone().float()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        H = H[perm][:, perm]
    damp = percdamp * torch.mean(torch.diag(H))
    idx = torch.arange(H.shape[0], device=H.device)
    H[idx, idx] += damp
    return FactoredHessian(dead, perm, upper_cholesky_of_inverse(H))


@torch.no_grad()
def gptq_solve(W: Tensor, H: Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
               act_order: bool = False, static_groups: bool = False,
               factored: FactoredHessian | None = None) -> tuple[Tensor, float]:
    """Quantize W (rows, cols) against Hessian H (cols, cols); returns (Q on the grid, sum of GPTQ losses).

    loss = sum_j (w_j - q_j)^2 / (2 U_jj^2). `factored` = `factor_hessian(H, percdamp, act_order)` when the
    caller has it already. Raises CholeskyError when H + damping is not positive definite.
    """
    W = W.detach().clone().float()
    rows, cols = W.shape
    grouped = spec.granularity == "group"
    g = spec.group_size
    if grouped and cols % g:
        raise ValueError(f"group_size {g} does not divide the input size {cols}: pick a divisor or "
                         "w_granularity=channel")
    scale, zero = (None, None) if grouped else _row_grid(W, spec)  # from the original weights, as the reference

    if factored is None:
        factored = factor_hessian(H.to(W.device), percdamp, act_order)
    W[:, factored.dead] = 0
    perm = factored.perm
    invperm = None if perm is None else torch.argsort(perm)

    col_scale = col_zero = None  # static groups: each column's scale / zero over the rows, in solve order
    if grouped and static_groups:
        s, z = weight_scale_zero(W.reshape(rows * cols // g, g), spec)  # every group of the original columns
        col_scale = s.reshape(rows, cols // g).repeat_interleave(g, dim=1)
        col_zero = None if z is None else z.reshape(rows, cols // g).repeat_interleave(g, dim=1)
        if perm is not None:
            col_scale = col_scale[:, perm]
            col_zero = None if col_zero is None else col_zero[:, perm]
        col_scale = col_scale.T.contiguous()
        col_zero = None if col_zero is None else col_zero.T.contiguous()
    if perm is not None:
        W = W[:, perm]
    Hinv = factored.U

    # the column loop works on Wt = W^T, so that column j of W is the contiguous row Wt[j]; same arithmetic
    if scale is not None:  # (rows,) views of each column's scale / zero
        scale, zero = scale[:, 0], (None if zero is None else zero[:, 0])
    Wt = W.T.contiguous()
    Qt = torch.empty_like(Wt)
    losses = torch.zeros(rows, dtype=torch.float32, device=W.device)
    outer = torch.empty(min(blocksize, cols), rows, dtype=W.dtype, device=W.device)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = Wt[i1:i2].clone()
        Err1 = torch.empty_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col_scale is not None:
                scale = col_scale[col]
                zero = None if col_zero is None else col_zero[col]
            elif grouped and col % g == 0:  # from the weights as updated up to this column block
                s, z = weight_scale_zero(Wt[col: col + g].T, spec)
                scale, zero = s[:, 0], (None if z is None else z[:, 0])
            w, q, err = W1[i], Qt[col], Err1[i]
            quant_dequant(w, scale, zero, spec, out=q)
            torch.sub(w, q, out=err).div_(Hinv1[i, i])
            rest = i2 - i1 - i - 1  # W[:, j:] -= err_j U[j, j:]
            W1[i + 1:].sub_(torch.mul(Hinv1[i, i + 1:, None], err, out=outer[:rest]))
        losses += Err1.pow(2).sum(0) / 2  # (w_j - q_j)^2 / (2 U_jj^2)
        Wt[i2:] -= Hinv[i1:i2, i2:].T.matmul(Err1)  # the lazy update of the later column blocks
    Q = Qt.T
    if invperm is not None:
        Q = Q[:, invperm]
    return Q.contiguous(), float(losses.sum())


@torch.no_grad()
def gptq_quantize(W: Tensor, H: Tensor, spec: QuantSpec, blocksize: int = 128, percdamp: float = 0.01,
                  act_order: bool = False, static_groups: bool = False, max_damp_retries: int = 4,
                  name: str = "", factors: dict[tuple[float, bool], FactoredHessian | None] | None = None
                  ) -> tuple[Tensor, dict[str, Any]]:
    """`gptq_solve` with damping x10 retries on Cholesky failure, then an RTN fallback; never returns NaN/inf.

    A non-finite weight or a group size that does not divide the width is a one-line error; a Hessian that is
    not finite, or that no calibration token reached (all zero), gives RTN with a warning. `factors` caches the
    factorizations of this H by (percdamp, act_order), for the linears that share it.
    """
    layer = name or "<layer>"
    if not bool(torch.isfinite(W).all()):
        raise NonFiniteWeightError(f"GPTQ on {layer}: the weight to quantize already has NaN/inf values")
    if spec.granularity == "group" and W.shape[1] % spec.group_size:
        raise ConfigError(f"GPTQ on {layer}: group_size {spec.group_size} does not divide the input size "
                          f"{W.shape[1]}; pick a divisor or w_granularity=channel")
    info: dict[str, Any] = {"percdamp": percdamp, "retries": 0, "fallback": False, "loss": None}
    usable = bool(torch.isfinite(H).all()) and bool(torch.diag(H).abs().sum() > 0)
    for k in range(max_damp_retries + 1 if usable else 0):
        pd = percdamp * 10**k if percdamp > 0 else (0.0 if k == 0 else 1e-4 * 10 ** (k - 1))
        cache = {} if factors is None else factors
        if (pd, act_order) not in cache:
            try:
                cache[pd, act_order] = factor_hessian(H.to(W.device), pd, act_order)
            except CholeskyError:
                cache[pd, act_order] = None
        if cache[pd, act_order] is None:
            log.warning("GPTQ on %s: Cholesky failed with percdamp %g; retrying with more damping", layer, pd)
            continue
        Q, loss = gptq_solve(W, H, spec, blocksize, pd, act_order, static_groups, factored=cache[pd, act_order])
        if bool(torch.isfinite(Q).all()):
            info.update(percdamp=pd, retries=k, loss=loss)
            return Q, info
    why = (f"Hessian not positive definite after {max_damp_retries} damping retries" if usable
           else "Hessian not finite or empty (no calibration token reached the layer)")
    log.warning("GPTQ on %s: %s; falling back to RTN for this layer", layer, why)
    info.update(fallback=True, retries=max_damp_retries if usable else 0)
    return fake_quant_weight(W.detach().float(), spec), info


@register("quantizer", "gptq")
class GPTQ(LayerwiseMethod):
    """Every block linear by GPTQ; activations (and K/V) quantized per token on the fly per the bit settings.

    `reference` picks the defaults of act_order, static_groups, true_sequential and the grid of
    scale_convention="auto" (`REFERENCES`; None = the one this method follows, `METHOD_REFERENCE`); a value
    given for any of them wins.
    propagate defaults to "weights": the next block sees outputs of the weight-quantized block with
    full-precision activations, as in the IST-DASLab, llm-compressor and QuaRot references (Hessians also come
    from full-precision activations); "quantized" propagates fully quantized outputs.
    """

    name = "gptq"
    default_propagate = "weights"
    uses_token_weights = True

    def __init__(self, reference: str | None = None, blocksize: int = 128, percdamp: float = 0.01,
                 act_order: bool | None = None, static_groups: bool | None = None,
                 true_sequential: bool | None = None, max_damp_retries: int = 4,
                 scale_convention: str = "auto", **kwargs: Any) -> None:
        ref_name = reference or METHOD_REFERENCE.get(self.name, "llm_compressor")
        if ref_name not in REFERENCES:
            raise ConfigError(f"quantizer.reference {ref_name!r} unknown; valid: {', '.join(REFERENCES)}")
        ref = REFERENCES[ref_name]
        for key, value, kind, example in (("blocksize", blocksize, "int", 128), ("percdamp", percdamp, "float", 0.01),
                                          ("max_damp_retries", max_damp_retries, "int", 4),
                                          ("act_order", act_order, "bool", True),
                                          ("static_groups", static_groups, "bool", True),
                                          ("true_sequential", true_sequential, "bool", False)):
            if value is not None:
                check_type(f"quantizer.{key}", value, kind, example)
        # "auto" = the reference's grid (BitSettings resolves llm-compressor's "auto" by the bit widths)
        super().__init__(scale_convention=ref.scale_convention if scale_convention == "auto" else scale_convention,
                         **kwargs)
        if blocksize < 1 or percdamp < 0 or max_damp_retries < 0:
            raise ConfigError(f"quantizer={self.name} needs blocksize >= 1, percdamp >= 0, max_damp_retries >= 0; "
                              f"got {blocksize}, {percdamp}, {max_damp_retries}")
        self.reference = ref_name
        self.blocksize, self.percdamp, self.max_damp_retries = blocksize, float(percdamp), max_damp_retries
        self.act_order = ref.act_order if act_order is None else act_order
        self.static_groups = ref.static_groups if static_groups is None else static_groups
        self.true_sequential = ref.true_sequential if true_sequential is None else true_sequential
        self._hessians: dict[str, HessianAccumulator] = {}

    @property
    def groups(self) -> tuple[tuple[str, ...], ...]:
        return SEQUENTIAL_GROUPS if self.true_sequential else (LINEAR_ROLES,)

    def _collectors(self, block: nn.Module, roles: tuple[str, ...], device: torch.device) -> dict[str, Collector]:
        """One Hessian per distinct input (source tap); roles reading the same input share it."""
        self._hessians, shared, collectors = {}, {}, {}
        for role in roles:
            lin = block.role(role)
            key = INPUT_TAP[role]
            if key not in shared:
                shared[key] = HessianAccumulator(lin.in_features, device)
                collectors[role] = shared[key].add
            self._hessians[role] = shared[key]
        return collectors

    def collect(self, block: nn.Module, ctx: BlockContext) -> dict[str, Collector]:
        return self._collectors(block, self.groups[0], ctx.device)

    def quantize_block(self, block: nn.Module, ctx: BlockContext) -> dict[str, Any]:
        spec = self.bits.weight_spec()
        layers: dict[str, Any] = {}
        for gi, roles in enumerate(self.groups):
            if gi > 0:  # inputs of this group, through the already-quantized earlier groups
                ctx.run(self._collectors(block, roles, ctx.device))
            # q/k/v (and gate/up) share one Hessian: it and its factorizations are computed once per group
            shared: dict[int, tuple[Tensor, dict[tuple[float, bool], FactoredHessian | None]]] = {}
            for role in roles:
                q = block.role(role)
                if not spec.enabled:
                    continue
                acc = self._hessians[role]
                if id(acc) not in shared:
                    shared[id(acc)] = (acc.hessian(), {})
                H, factors = shared[id(acc)]
                Q, info = gptq_quantize(q.weight.data, H, spec, self.blocksize, self.percdamp, self.act_order,
                                        self.static_groups, self.max_damp_retries, name=getattr(q, "name", role),
                                        factors=factors)
                write_quantized_weight(q, Q)
                layers[role] = info
            self._hessians = {}
        return {"layers": layers, "fallbacks": sum(int(v["fallback"]) for v in layers.values())}
