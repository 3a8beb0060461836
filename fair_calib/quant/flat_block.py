"""FlatQuant's quantized transformer block (DESIGN 4.6): where the transforms sit, the quantizers with learnable
clipping, the weighted block loss, and the float64 merge at the end of training.

Wiring of one block (``x`` row vectors, ``y = x W^T``; ``T = diag(d) (P1 (x) P2)`` a KroneckerTransform):

    attn_in  : x -> x T_qkv                      q/k/v weights  W -> (W / d) (P1 (x) P2)^{-T}
    q_rope   : Q -> Q P^{-T}                     (HeadTransform, only when kv_bits < 16)
    k_rope   : K -> Q_kv(K P)                    KV quantization after the K transform
    v_proj   : W_v -> (I (x) P2_o^T) W_v         ("heads" factors: P_o = P1_o (x) P2_o over (n_heads, head_dim)); the
                                                 per-head V transform folded into v_proj's weight (and bias) before
                                                 that weight is quantized, as the reference does
    v_heads  : V -> Q_kv(V)                      V already carries P2_o
    attn_ctx : c -> c (P1_o (x) I)               so that the o_proj input is c (P1_o (x) P2_o)
    mlp_in   : x -> x T_ug                       gate/up weights merged with T_ug
    mlp_mid  : m -> m T_down                     down weight merged with T_down

Every linear quantizes its own input per token (FlatQuant has one activation quantizer per linear) and its weight
per output channel, both with a learnable clipping pair ``(sigmoid(lo), sigmoid(hi))`` (init logit 4.0).
During training the weights are recomputed from the live transforms (differentiable, fp32); at the end the
inverse transforms are merged in float64, the online ops become fixed matrices (buffers), the weights are frozen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fair_calib.models.block import NORM_BEFORE, DLLMBlock, tap_readers
from fair_calib.quant.grids import QuantSpec, asym_scale_zero, quantize_asym, quantize_sym, sym_scale
from fair_calib.quant.qlinear import ActQuantizer, QLinear, check_finite
from fair_calib.quant.transforms import (
    CayleyOrthogonal,
    DecomposedFactor,
    HeadTransform,
    KroneckerTransform,
    kronecker_factors,
)
from fair_calib.registry import ConfigError

O_FACTORS = ("heads", "balanced")
TRANSFORM_INITS = ("random", "identity")
# the taps with a per-channel scale and a shared Kronecker transform, and the linears that read each one; deployment
# folds the scale of a tap with a norm before it (NORM_BEFORE) into that norm's weight
SCALED_TAPS = {tap: tap_readers(tap) for tap in ("attn_in", "mlp_in", "mlp_mid")}


# ---- math -------------------------------------------------------------------------------------------------------
def kron_apply(x: Tensor, left: Tensor | None, right: Tensor | None, n1: int, n2: int) -> Tensor:
    """``x (left (x) right)`` over the last dim as ``vec(left^T X right)``, ``X`` = row-major reshape (n1, n2);
    a missing factor is the identity."""
    shape = x.shape
    h = x.reshape(*shape[:-1], n1, n2)
    if right is not None:
        h = torch.matmul(h, right)
    if left is not None:
        h = torch.matmul(left.transpose(0, 1), h)
    return h.reshape(shape)


def transformed_weight(transform: KroneckerTransform, weight: Tensor) -> Tensor:
    """Differentiable ``W' = (W / d) (P1 (x) P2)^{-T}`` (fp32; the training-time twin of ``merge_weight``)."""
    w = weight.float()
    if transform.diag_scale is not None:
        w = w / transform.diag_scale.float()
    return kron_apply(w, transform.left.inverse_transpose(), transform.right.inverse_transpose(),
                      transform.n1, transform.n2)


def factor_and_inverse_transpose(f: DecomposedFactor) -> tuple[Tensor, Tensor]:
    """``(P, P^{-T}) = (U diag(sigma) V^T, U diag(1/sigma) V^T)`` with one Cayley solve per orthogonal factor."""
    u, v, sig = f.u.matrix(), f.v.matrix(), f.sigma()
    vt = v.transpose(0, 1)
    return (u * sig) @ vt, (u / sig) @ vt


def per_head_apply(x: Tensor, right: Tensor) -> Tensor:
    """``x_h right`` for every head ``h`` of the last dim (``n_heads * head_dim``, ``right``: head_dim x head_dim)."""
    d = right.shape[0]
    return torch.matmul(x.reshape(*x.shape[:-1], -1, d), right).reshape(x.shape)


def clamp_rows(w: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """FlatQuant's learnable weight clipping alone (``apply_wclip``): each row clamped to
    ``[min(min_j w_j, 0) sigmoid(lo), max(max_j w_j, 0) sigmoid(hi)]``."""
    wmax = w.amax(dim=-1, keepdim=True).clamp(min=0) * torch.sigmoid(hi)
    wmin = w.amin(dim=-1, keepdim=True).clamp(max=0) * torch.sigmoid(lo)
    return torch.clamp(w, min=wmin, max=wmax)


def fake_quant_clip_pair(x: Tensor, spec: QuantSpec, lo: Tensor | None, hi: Tensor | None,
                         clamp: bool = False) -> Tensor:
    """Per-row (last dim) quantize-dequantize with FlatQuant's clipping pair.

    ``x_max = max(max_j x_j, 0) * sigmoid(hi)``, ``x_min = min(min_j x_j, 0) * sigmoid(lo)`` (logits ``None``: the
    fixed ``spec.clip_ratio``); symmetric grids use ``absmax = max(|x_min|, x_max)``. ``clamp`` first clips ``x`` to
    ``[x_min, x_max]`` (FlatQuant's learnable weight clipping). Rounding is straight-through.
    """
    if not spec.enabled:
        return x
    xmax = x.amax(dim=-1, keepdim=True).clamp(min=0)
    xmin = x.amin(dim=-1, keepdim=True).clamp(max=0)
    if hi is None or lo is None:
        xmax, xmin = xmax * spec.clip_ratio, xmin * spec.clip_ratio
    else:
        xmax, xmin = xmax * torch.sigmoid(hi), xmin * torch.sigmoid(lo)
    if clamp:
        x = torch.clamp(x, min=xmin, max=xmax)
    if spec.symmetric:
        s = sym_scale(torch.maximum(xmin.abs(), xmax), spec.bits, spec.scale_convention)
        return quantize_sym(x, s, spec.bits) * s
    s, z = asym_scale_zero(xmin, xmax, spec.bits)
    return (quantize_asym(x, s, z, spec.bits) - z) * s


def fake_quant_weight_clip_pair(w: Tensor, spec: QuantSpec, lo: Tensor | None, hi: Tensor | None) -> Tensor:
    """Weight (out, in) fake quantization per output channel or per group, with per-channel clipping logits (out, 1)."""
    if not spec.enabled:
        return w
    if spec.granularity == "channel":
        return fake_quant_clip_pair(w, spec, lo, hi, clamp=True)
    if spec.granularity != "group":
        raise ConfigError(f"flatquant quantizes weights per channel or per group, not w_granularity={spec.granularity}")
    out_f, in_f = w.shape
    g = spec.group_size
    if in_f % g:
        raise ConfigError(f"group_size {g} does not divide the input size {in_f}; "
                          "pick a divisor or w_granularity=channel")
    rep = in_f // g
    lo_g = None if lo is None else lo.repeat_interleave(rep, dim=0)
    hi_g = None if hi is None else hi.repeat_interleave(rep, dim=0)
    return fake_quant_clip_pair(w.reshape(-1, g), spec, lo_g, hi_g, clamp=True).reshape(out_f, in_f)


def weighted_token_mse(out: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``L = sum_i w_i ||h^q_i - h*_i||^2 / sum_i w_i`` over token positions ``i`` (fp32); weights (B, L)."""
    err = (out.float() - target.float()).pow(2).sum(dim=-1)
    w = weights.to(err.dtype)
    return (err * w).sum() / w.sum()


@torch.no_grad()
def random_orthogonal_init(cayley: CayleyOrthogonal, generator: torch.Generator) -> None:
    """FlatQuant's init: the Cayley parameter ``W`` is a random orthogonal matrix (QR of a Gaussian, sign-fixed),
    stored whole as in the reference (``orthogonal(..., use_trivialization=False)`` keeps the assigned weight as its
    parameter); only its strict lower triangle enters ``Q``."""
    n = cayley.n
    g = torch.randn(n, n, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    cayley.weight.copy_(q.to(device=cayley.weight.device, dtype=cayley.weight.dtype))


# ---- modules ----------------------------------------------------------------------------------------------------
class LiveOp(nn.Module):
    """Training-time online op ``x -> fn(x)`` of a transform held by reference (not registered here: the transform
    is merged and replaced by a :class:`FrozenKron` at the end, and a module registered twice would be saved twice)."""

    def __init__(self, fn: Callable[[Tensor], Tensor], label: str = "") -> None:
        super().__init__()
        object.__setattr__(self, "fn", fn)
        self.label = label

    def extra_repr(self) -> str:
        return self.label

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


class FrozenKron(nn.Module):
    """Deployed online transform ``x -> (x * inv_scale) (left (x) right)`` with fixed matrices (buffers), computed
    in fp32 (float64 for float64 input); a missing factor / scale is the identity."""

    def __init__(self, n1: int, n2: int, left: Tensor | None = None, right: Tensor | None = None,
                 inv_scale: Tensor | None = None) -> None:
        super().__init__()
        self.n1, self.n2 = int(n1), int(n2)
        self.register_buffer("left", None if left is None else left.detach().float().contiguous())
        self.register_buffer("right", None if right is None else right.detach().float().contiguous())
        self.register_buffer("inv_scale", None if inv_scale is None else inv_scale.detach().float().contiguous())

    def extra_repr(self) -> str:
        return f"n1={self.n1}, n2={self.n2}, scale={self.inv_scale is not None}"

    def forward(self, x: Tensor) -> Tensor:
        dt = torch.float64 if x.dtype == torch.float64 else torch.float32
        h = x.to(dt)
        if self.inv_scale is not None:
            h = h * self.inv_scale.to(dt)
        left = None if self.left is None else self.left.to(dt)
        right = None if self.right is None else self.right.to(dt)
        return kron_apply(h, left, right, self.n1, self.n2).to(x.dtype)


class FlatActTap(ActQuantizer):
    """Online tap ``x -> Q(op(x))``: an optional transform op, then per-row quantization (K/V: per token per head)
    with a learnable clipping pair. ``enabled`` (``set_quant_enabled``) switches only the quantization off."""

    def __init__(self, op: nn.Module | None, spec: QuantSpec, learn_clip: bool = True, clip_init: float = 4.0) -> None:
        learn = learn_clip and spec.enabled
        super().__init__(spec, learnable_clip=learn, clip_init=clip_init)
        self.clip_logit_lo = nn.Parameter(torch.tensor(float(clip_init))) if learn else None
        self.op = op

    def forward(self, x: Tensor) -> Tensor:
        if self.op is not None:
            x = self.op(x)
        if not self.enabled or not self.spec.enabled:
            return x
        return fake_quant_clip_pair(x, self.spec, self.clip_logit_lo, self.clip_logit).to(x.dtype)


class FlatLinear(QLinear):
    """FlatQuant's quantized linear: ``y = Q_a(x_t) Q_w(W')^T + b'`` where ``x_t`` is already transformed at the tap
    and ``W' = (W / d) (P1 (x) P2)^{-T}`` is recomputed from the live transform until :meth:`merge_transform`
    (through ``weight_map`` when a :class:`FlatBlock` shares its per-forward matrices, else from ``transform``).

    ``out_map`` (v_proj only): a transform of the output features, folded into the weight rows and the bias like the
    reference's ``out_trans``: the weight is clipped in the input-transformed basis, then ``out_map`` is applied,
    then it is quantized with the plain grid (``flat_linear.py``: ``apply_wclip`` -> ``out_trans`` -> quantizer).

    Clipping pairs: ``weight_clip_logit`` / ``weight_clip_logit_lo`` (out, 1) and ``act_clip_logit`` /
    ``act_clip_logit_lo`` (scalars), all initialised to ``clip_init`` (sigmoid(4) = 0.982).
    """

    def __init__(self, linear: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec, name: str,
                 transform: KroneckerTransform | None, learn_clip: bool = True, clip_init: float = 4.0,
                 weight_map: Callable[[Tensor], Tensor] | None = None,
                 out_map: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__(linear, w_spec, a_spec, name=name)
        object.__setattr__(self, "transform", transform)  # by reference: shared by several linears and a tap
        object.__setattr__(self, "weight_map", weight_map)
        object.__setattr__(self, "out_map", out_map)
        dev = linear.weight.device
        self.weight_clip_logit_lo: nn.Parameter | None = None
        self.act_clip_logit_lo: nn.Parameter | None = None
        if learn_clip and w_spec.enabled:
            self.weight_clip_logit = nn.Parameter(torch.full((self.out_features, 1), float(clip_init), device=dev))
            self.weight_clip_logit_lo = nn.Parameter(torch.full((self.out_features, 1), float(clip_init), device=dev))
        if learn_clip and a_spec.enabled:
            self.act_clip_logit = nn.Parameter(torch.tensor(float(clip_init), device=dev))
            self.act_clip_logit_lo = nn.Parameter(torch.tensor(float(clip_init), device=dev))

    def _input_weight(self) -> Tensor:
        """``W'`` for the transformed input (no output transform)."""
        t = self.transform
        if t is None:
            return self.weight
        return self.weight_map(self.weight) if self.weight_map is not None else transformed_weight(t, self.weight)

    def _out_rows(self, w: Tensor) -> Tensor:
        return w if self.out_map is None else self.out_map(w.transpose(0, 1)).transpose(0, 1)

    def current_weight(self) -> Tensor:
        """``W'`` (with the output transform) from the live transforms while training, the stored weight after."""
        return self._out_rows(self._input_weight()).to(self.weight.dtype)

    def current_bias(self) -> Tensor | None:
        if self.bias is None or self.out_map is None:
            return self.bias
        return self.out_map(self.bias.float()).to(self.bias.dtype)

    def quantized_weight(self) -> Tensor:
        if not self.quant_enabled or self.weight_frozen or not self.w_spec.enabled:
            return self.current_weight()
        if self.out_map is None:
            return fake_quant_weight_clip_pair(self.current_weight(), self.w_spec, self.weight_clip_logit_lo,
                                               self.weight_clip_logit)
        w = self._input_weight()
        if self.weight_clip_logit is not None and self.weight_clip_logit_lo is not None:
            w = clamp_rows(w, self.weight_clip_logit_lo, self.weight_clip_logit)
        w = self._out_rows(w).to(self.weight.dtype)
        return fake_quant_weight_clip_pair(w, self.w_spec, None, None)

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.input_transform is not None:
            x = self.input_transform(x)
        if self.quant_enabled and self.a_spec.enabled:
            x = fake_quant_clip_pair(x, self.a_spec, self.act_clip_logit_lo, self.act_clip_logit).to(x.dtype)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.current_bias())

    @torch.no_grad()
    def merge_transform(self, head_right: Tensor | None = None, clip: bool = True) -> None:
        """``W <- (W / d) (P1 (x) P2)^{-T}`` in float64 (``KroneckerTransform.merge_weight``). ``head_right`` (v_proj):
        the per-head output transform, folded into the rows and the bias after the learned weight clipping (applied
        here when ``clip``; the clipping logits are then used up) so the weight quantizer sees what it saw in
        training."""
        t = self.transform
        f64 = torch.float64
        w = self.weight.data.to(f64)
        if t is not None:
            w = t.merge_weight(w, dtype=f64)
        if head_right is not None:
            right = head_right.to(f64)
            lo, hi = self.weight_clip_logit_lo, self.weight_clip_logit
            if clip and lo is not None and hi is not None:
                w = clamp_rows(w, lo.to(f64), hi.to(f64))
                self.weight_clip_logit, self.weight_clip_logit_lo = None, None
            w = per_head_apply(w.transpose(0, 1), right).transpose(0, 1)
            if self.bias is not None:
                bias = per_head_apply(self.bias.data.to(f64), right)
                check_finite(bias, self.name)
                self.bias.data.copy_(bias)
        check_finite(w, self.name)
        self.weight.data.copy_(w)
        object.__setattr__(self, "transform", None)
        object.__setattr__(self, "weight_map", None)
        object.__setattr__(self, "out_map", None)

    @torch.no_grad()
    def freeze(self) -> None:
        if self.transform is not None or self.out_map is not None:
            raise RuntimeError(f"{self.name}: merge the transform into the weight before freezing")
        super().freeze()
        self.weight_clip_logit_lo = None


# ---- one block --------------------------------------------------------------------------------------------------
@dataclass
class FlatBlockSpec:
    """What a FlatQuant block needs besides the weights (a subset of the quantizer's settings).

    ``init``: ``random`` = FlatQuant's random orthogonal U, V (seeded), ``identity`` = every transform starts at I.
    ``o_factors``: ``heads`` = the o_proj transform is P_heads (x) P_head_dim (FlatQuant: the head_dim factor acts on
    V before the V-cache quantizer), ``balanced`` = kronecker_factors(n_heads * head_dim), all at the o_proj input.
    """

    w_spec: QuantSpec
    a_spec: QuantSpec
    kv_spec: QuantSpec
    use_scale: bool = True
    learn_clip: bool = True
    clip_init: float = 4.0
    init: str = "random"
    o_factors: str = "heads"

    def __post_init__(self) -> None:
        if self.init not in TRANSFORM_INITS:
            raise ConfigError(f"flatquant init={self.init!r} unknown; valid: {', '.join(TRANSFORM_INITS)}")
        if self.o_factors not in O_FACTORS:
            raise ConfigError(f"flatquant o_factors={self.o_factors!r} unknown; valid: {', '.join(O_FACTORS)}")


class FlatBlock:
    """The FlatQuant state of one :class:`DLLMBlock` while it is calibrated: live transforms, wrapped linears, taps.

    Build it (replaces the block's linears and taps), train :meth:`parameter_groups`, then :meth:`finalize`.
    """

    def __init__(self, block: DLLMBlock, spec: FlatBlockSpec, name: str = "block",
                 act_absmax: dict[str, Tensor] | None = None, alpha: float = 0.3,
                 generator: torch.Generator | None = None) -> None:
        for point, tap in block.taps.items():
            if not isinstance(tap, nn.Identity):
                raise ConfigError(f"{name}: tap {point} already holds {type(tap).__name__}; flatquant needs an "
                                  "unquantized model")
        self.block, self.spec, self.name = block, spec, name
        h, d = block.n_heads, block.head_dim
        dev = block.role("q").weight.device
        self.device = dev
        lin = block.linears()
        n_in, n_mid = lin["q"].in_features, lin["down"].in_features
        o_factors = (h, d) if spec.o_factors == "heads" else kronecker_factors(h * d)
        self.transforms: dict[str, KroneckerTransform] = {
            "attn_in": KroneckerTransform(n_in, use_scale=spec.use_scale),
            "mlp_in": KroneckerTransform(n_in, use_scale=spec.use_scale),
            "mlp_mid": KroneckerTransform(n_mid, use_scale=spec.use_scale),
            "attn_ctx": KroneckerTransform(h * d, use_scale=False, factors=o_factors),
        }
        self.head: HeadTransform | None = HeadTransform(d) if spec.kv_spec.enabled else None
        for m in self.modules():
            m.to(dev)
        if spec.init == "random":
            gen = generator if generator is not None else torch.Generator().manual_seed(0)
            for m in self.modules():
                for c in m.modules():
                    if isinstance(c, CayleyOrthogonal):
                        random_orthogonal_init(c, gen)
        if spec.use_scale and act_absmax is not None:
            for point, roles in SCALED_TAPS.items():
                if point not in act_absmax:
                    continue
                w_absmax = torch.cat([lin[r].weight.detach().float() for r in roles], dim=0).abs().amax(dim=0)
                self.transforms[point].init_scale(act_absmax[point], w_absmax, alpha=alpha)

        # every factor is computed once per block forward (pre-hook) and shared by its tap and its linears
        self._mats: dict[str, Tensor] = {}
        self._hook = block.register_forward_pre_hook(lambda _m, _args: self.refresh())

        # linears: each quantizes its own (already transformed) input and its weight merged with the transform
        feeds = {"q": "attn_in", "k": "attn_in", "v": "attn_in", "o": "attn_ctx",
                 "gate": "mlp_in", "up": "mlp_in", "down": "mlp_mid"}
        self.linears: dict[str, FlatLinear] = {}
        for role, module in lin.items():
            if isinstance(module, QLinear):
                raise ConfigError(f"{name}.{role} is already quantized ({type(module).__name__}); flatquant needs an "
                                  "unquantized model")
            point = feeds[role]
            out_map = self._v_fold if role == "v" and spec.o_factors == "heads" else None
            q = FlatLinear(module, spec.w_spec, spec.a_spec, f"{name}.{role}", self.transforms[point],
                           spec.learn_clip, spec.clip_init, weight_map=partial(self._weight, point), out_map=out_map)
            block.set_role(role, q)
            self.linears[role] = q

        # taps
        taps = block.taps
        for point in SCALED_TAPS:
            taps[point] = LiveOp(partial(self._activation, point), f"kron {point}")
        o = self.transforms["attn_ctx"]
        kv_learn = spec.learn_clip
        if spec.o_factors == "heads":  # c (P1 (x) P2): P2 per head folded into v_proj, P1 across heads online
            taps["attn_ctx"] = LiveOp(lambda x: kron_apply(x, self._mats["attn_ctx.left"], None, o.n1, o.n2),
                                      "kron heads")
        else:
            taps["attn_ctx"] = LiveOp(partial(self._activation, "attn_ctx"), "kron attn_ctx")
        if spec.kv_spec.enabled:
            taps["v_heads"] = FlatActTap(None, spec.kv_spec, kv_learn, spec.clip_init)
        if self.head is not None:
            taps["q_rope"] = LiveOp(lambda x: torch.matmul(x, self._mats["head_it"]), "head P^-T")
            taps["k_rope"] = FlatActTap(LiveOp(lambda x: torch.matmul(x, self._mats["head"]), "head P"),
                                        spec.kv_spec, kv_learn, spec.clip_init)
        taps.to(dev)

    def refresh(self) -> None:
        """``P`` and ``P^{-T}`` of every factor for the coming forward pass (with autograd when enabled), in fp32 even
        under autocast (small matrices; the large products they enter run in the autocast dtype)."""
        mats = {}
        with torch.autocast(self.device.type, enabled=False):
            for point, t in self.transforms.items():
                for side, f in (("left", t.left), ("right", t.right)):
                    mats[f"{point}.{side}"], mats[f"{point}.{side}_it"] = factor_and_inverse_transpose(f)
            if self.head is not None:
                mats["head"], mats["head_it"] = factor_and_inverse_transpose(self.head.factor)
        self._mats = mats

    def _v_fold(self, x: Tensor) -> Tensor:
        """The per-head V transform on v_proj's output features: ``x_h P2_o`` for every (KV) head."""
        return per_head_apply(x.float(), self._mats["attn_ctx.right"])

    def _activation(self, point: str, x: Tensor) -> Tensor:
        """``x_t = (x * d) (P1 (x) P2)`` (KroneckerTransform.apply_activation with the cached factors)."""
        t = self.transforms[point]
        h = x.float()
        if t.diag_scale is not None:
            h = h * t.diag_scale.float()
        return kron_apply(h, self._mats[f"{point}.left"], self._mats[f"{point}.right"], t.n1, t.n2).to(x.dtype)

    def _weight(self, point: str, w: Tensor) -> Tensor:
        """``W' = (W / d) (P1 (x) P2)^{-T}`` with the cached factors (differentiable)."""
        t = self.transforms[point]
        h = w.float()
        if t.diag_scale is not None:
            h = h / t.diag_scale.float()
        return kron_apply(h, self._mats[f"{point}.left_it"], self._mats[f"{point}.right_it"], t.n1, t.n2)

    def modules(self) -> list[nn.Module]:
        return list(self.transforms.values()) + ([self.head] if self.head is not None else [])

    def clip_parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for q in self.linears.values():
            for p in (q.weight_clip_logit, q.weight_clip_logit_lo, q.act_clip_logit, q.act_clip_logit_lo):
                if p is not None:
                    out.append(p)
        for tap in self.block.taps.values():
            if isinstance(tap, FlatActTap):
                out.extend(p for p in (tap.clip_logit, tap.clip_logit_lo) if p is not None)
        return out

    def transform_parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def parameter_groups(self, lr: float, clip_lr: float) -> list[dict]:
        """AdamW groups: transforms (rotations, singular values, scales) at ``lr``, clipping logits at ``clip_lr``."""
        groups = [{"params": self.transform_parameters(), "lr": lr, "name": "transforms"}]
        clips = self.clip_parameters()
        if clips:
            groups.append({"params": clips, "lr": clip_lr, "name": "clipping"})
        return groups

    def trainable(self, on: bool) -> None:
        """Only the FlatQuant parameters are trained; the block's own weights never receive gradients."""
        for p in self.block.parameters():
            p.requires_grad_(False)
        for p in self.transform_parameters() + self.clip_parameters():
            p.requires_grad_(on)

    @torch.no_grad()
    def finalize(self, freeze: bool = True) -> None:
        """Merge the inverse transforms into the weights (float64), fold the diag_scale of the attention / MLP input
        transforms into the preceding RMSNorm weight (the reference's deployment; the down_proj input keeps its
        scale online), fix the online matrices as buffers, and (when
        ``freeze``) write the clipped, quantized weights. Clipping logits of the online quantizers stay.
        ``freeze=False`` (the debug invariant) also skips the learned weight clipping folded with the V transform."""
        self.trainable(False)
        self._hook.remove()
        self._mats = {}
        f64 = torch.float64
        taps = self.block.taps
        for point in SCALED_TAPS:
            t = self.transforms[point]
            inv_scale = None if t.diag_scale is None else t.diag_scale.to(f64)
            if inv_scale is not None and point in NORM_BEFORE:  # RMSNorm(x) * d: the scale lives in the norm's weight
                norm_w = self.block.role(NORM_BEFORE[point]).weight
                folded = norm_w.data.to(f64) * inv_scale
                check_finite(folded, f"{self.name}.{NORM_BEFORE[point]}")
                norm_w.data.copy_(folded)
                inv_scale = None
            taps[point] = FrozenKron(t.n1, t.n2, t.left.matrix(f64), t.right.matrix(f64), inv_scale)
        o = self.transforms["attn_ctx"]
        v_right = None
        if self.spec.o_factors == "heads":
            taps["attn_ctx"] = FrozenKron(o.n1, o.n2, left=o.left.matrix(f64))
            v_right = o.right.matrix(f64)
        else:
            taps["attn_ctx"] = FrozenKron(o.n1, o.n2, o.left.matrix(f64), o.right.matrix(f64))
        if self.head is not None:
            f = self.head.factor
            taps["q_rope"] = FrozenKron(1, f.n, right=f.inverse_transpose(f64))
            taps["k_rope"].op = FrozenKron(1, f.n, right=f.matrix(f64))
        for role, q in self.linears.items():
            q.merge_transform(head_right=v_right if role == "v" else None, clip=freeze)
            if freeze:
                q.freeze()
        for name, buf in self.block.taps.named_buffers():
            check_finite(buf, f"{self.name}.taps.{name}")


def block_act_absmax(block: DLLMBlock, inputs: Tensor, rope: tuple[Tensor, Tensor], attn_bias: Tensor | None,
                     valid: Tensor | None, batch_size: int) -> tuple[dict[str, Tensor], Tensor]:
    """One FP pass: per-channel abs-max of the inputs of the three scaled transforms over valid tokens, and the block
    outputs (the training targets). ``valid`` (N, L) bool excludes padding from the statistics."""
    stats: dict[str, Tensor] = {}
    current: dict[str, Tensor | None] = {"mask": None}

    def hook(point: str):
        def fn(_m: nn.Module, _inp: tuple, out: Tensor) -> None:
            a = out.detach().float().abs()
            mask = current["mask"]
            if mask is not None:
                a = a * mask.to(a.device, a.dtype).unsqueeze(-1)
            m = a.reshape(-1, a.shape[-1]).amax(dim=0)
            stats[point] = m if point not in stats else torch.maximum(stats[point], m)
        return fn

    handles = [block.taps[p].register_forward_hook(hook(p)) for p in SCALED_TAPS]
    outs = torch.empty_like(inputs)
    dev = block.role("q").weight.device
    try:
        with torch.no_grad():
            for i in range(0, inputs.shape[0], batch_size):
                sl = slice(i, i + batch_size)
                current["mask"] = None if valid is None else valid[sl]
                bias = None if attn_bias is None else attn_bias[sl].to(dev)
                outs[sl] = block(inputs[sl].to(dev), rope, bias).to(outs.device, outs.dtype)
    finally:
        for hdl in handles:
            hdl.remove()
    return stats, outs


@torch.no_grad()
def install_flat_skeleton(model: nn.Module, spec: FlatBlockSpec) -> None:
    """Give an unquantized model the module structure of a finished FlatQuant model (frozen FlatLinears, fixed online
    transforms, K/V quantizers) with placeholder values, so that a saved FlatQuant state dict loads strictly into it."""
    for i, block in enumerate(model.blocks):
        h, d = block.n_heads, block.head_dim
        lin = block.linears()
        dev = block.role("q").weight.device
        for role, module in lin.items():
            q = FlatLinear(module, spec.w_spec, spec.a_spec, f"blocks.{i}.{role}", None, spec.learn_clip,
                           spec.clip_init)
            q.weight_clip_logit, q.weight_clip_logit_lo, q.weight_frozen = None, None, True
            block.set_role(role, q)

        def kron(n: int, factors: tuple[int, int] | None = None, scale: bool = False, left: bool = True,
                 right: bool = True) -> FrozenKron:
            n1, n2 = factors or kronecker_factors(n)
            return FrozenKron(n1, n2, torch.eye(n1) if left else None, torch.eye(n2) if right else None,
                              torch.ones(n) if scale else None)

        taps = block.taps
        for point, roles in SCALED_TAPS.items():
            taps[point] = kron(lin[roles[0]].in_features, scale=spec.use_scale and point not in NORM_BEFORE)
        taps["attn_ctx"] = kron(h * d, (h, d), right=False) if spec.o_factors == "heads" else kron(h * d)
        if spec.kv_spec.enabled:
            taps["v_heads"] = FlatActTap(None, spec.kv_spec, spec.learn_clip, spec.clip_init)
        if spec.kv_spec.enabled:
            taps["q_rope"] = kron(d, (1, d), left=False)
            taps["k_rope"] = FlatActTap(kron(d, (1, d), left=False), spec.kv_spec, spec.learn_clip, spec.clip_init)
        taps.to(dev)
