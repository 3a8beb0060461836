"""FlatQuant's calibration unit (DESIGN 4.6): one transformer block with its live transforms, quantized linears with
learnable clipping and the weighted block loss, trained and then merged in float64 (:class:`FlatBlock`).

Wiring of one block (``x`` row vectors, ``y = x W^T``; ``T = diag(d) (P1 (x) P2)`` a KroneckerTransform), written
once in :func:`tap_wiring` and read by the live ops, the deployed ops and the weight merge:

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

Which linear reads which tap is ``models.block.INPUT_TAP``. Every linear (``flat_linear.FlatLinear``) quantizes its
own input per token and its weight per output channel, both with a learnable clipping pair. During training the
weights are recomputed from the live transforms (differentiable, fp32); at the end the inverse transforms are merged
in float64, the online ops become fixed matrices (buffers), the weights are frozen. The transforms themselves
(parameters, per-forward cache, merge, deployed ops) are :mod:`fair_calib.quant.transforms`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fair_calib.models.block import INPUT_TAP, NORM_BEFORE, DLLMBlock, tap_readers
from fair_calib.quant.flat_linear import FlatActTap, FlatLinear
from fair_calib.quant.grids import QuantSpec
from fair_calib.quant.qlinear import QLinear, check_finite
from fair_calib.quant.transforms import HeadTransform, KroneckerTransform, TransformBundle
from fair_calib.registry import ConfigError

O_FACTORS = ("heads", "balanced")
TRANSFORM_INITS = ("random", "identity")
# the taps with a per-channel scale and a shared Kronecker transform, and the linears that read each one; deployment
# folds the scale of a tap with a norm before it (NORM_BEFORE) into that norm's weight
SCALED_TAPS = {tap: tap_readers(tap) for tap in ("attn_in", "mlp_in", "mlp_mid")}
KRON_TAPS = (*SCALED_TAPS, "attn_ctx")  # one Kronecker transform each, named after its tap


@dataclass(frozen=True)
class TapWiring:
    """One tap of a FlatQuant block: the transform it runs online (None: only the K/V quantizer), which factors of it
    run online, ``P^{-T}`` instead of ``P``, whether the K/V quantizer follows, and the linear whose output rows
    absorb the right factor when it does not run online."""

    transform: str | None
    left: bool = True
    right: bool = True
    inverse: bool = False
    kv_quant: bool = False
    right_into: str | None = None


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


def tap_wiring(spec: FlatBlockSpec) -> dict[str, TapWiring]:
    """The online op of every tap FlatQuant uses (module docstring), for calibration and deployment alike."""
    heads = spec.o_factors == "heads"
    wiring = {tap: TapWiring(tap) for tap in SCALED_TAPS}
    # heads: P2_o per head folded into v_proj's output rows, P1_o across heads online
    wiring["attn_ctx"] = TapWiring("attn_ctx", right=not heads, right_into="v" if heads else None)
    if spec.kv_spec.enabled:
        wiring["v_heads"] = TapWiring(None, kv_quant=True)
        wiring["q_rope"] = TapWiring("head", left=False, inverse=True)
        wiring["k_rope"] = TapWiring("head", left=False, kv_quant=True)
    return wiring


def weighted_token_mse(out: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """``L = sum_i w_i ||h^q_i - h*_i||^2 / sum_i w_i`` over token positions ``i`` (fp32); weights (B, L)."""
    err = (out.float() - target.float()).pow(2).sum(dim=-1)
    w = weights.to(err.dtype)
    return (err * w).sum() / w.sum()


class FlatBlock:
    """The FlatQuant state of one :class:`DLLMBlock` while it is calibrated: live transforms, wrapped linears, taps.

    Build it (replaces the block's linears and taps), train :meth:`parameter_groups`, then :meth:`finalize`.
    ``act_absmax``: per-channel abs-max of each scaled tap's output (the SmoothQuant init of its scale).
    """

    def __init__(self, block: DLLMBlock, spec: FlatBlockSpec, name: str = "block",
                 act_absmax: dict[str, Tensor] | None = None, alpha: float = 0.3,
                 generator: torch.Generator | None = None) -> None:
        for point, tap in block.taps.items():
            if not isinstance(tap, nn.Identity):
                raise ConfigError(f"{name}: tap {point} already holds {type(tap).__name__}; flatquant needs an "
                                  "unquantized model")
        self.block, self.spec, self.name = block, spec, name
        self.wiring = tap_wiring(spec)
        lin = block.linears()
        self.device = dev = lin["q"].weight.device
        h, d = block.n_heads, block.head_dim
        heads = not self.wiring["attn_ctx"].right
        bundle: dict[str, KroneckerTransform | HeadTransform] = {
            p: KroneckerTransform(lin[tap_readers(p)[0]].in_features, use_scale=spec.use_scale and p in SCALED_TAPS,
                                  factors=(h, d) if p == "attn_ctx" and heads else None) for p in KRON_TAPS}
        if spec.kv_spec.enabled:
            bundle["head"] = HeadTransform(d)
        self.transforms = TransformBundle(bundle)
        self.transforms.to(dev)
        if spec.init == "random":
            self.transforms.random_init(generator if generator is not None else torch.Generator().manual_seed(0))
        if spec.use_scale and act_absmax is not None:
            for point, roles in SCALED_TAPS.items():
                if point in act_absmax:
                    w_absmax = torch.cat([lin[r].weight.detach().float() for r in roles], dim=0).abs().amax(dim=0)
                    self.transforms[point].init_scale(act_absmax[point], w_absmax, alpha=alpha)
        # every factor is computed once per block forward (pre-hook) and shared by its taps and its linears
        self._hook = block.register_forward_pre_hook(lambda _m, _args: self.transforms.refresh(dev.type))

        folds = {w.right_into: point for point, w in self.wiring.items() if w.right_into is not None}
        self.linears: dict[str, FlatLinear] = {}
        for role, module in lin.items():
            if isinstance(module, QLinear):
                raise ConfigError(f"{name}.{role} is already quantized ({type(module).__name__}); flatquant needs an "
                                  "unquantized model")
            q = FlatLinear(module, spec.w_spec, spec.a_spec, f"{name}.{role}", self.transforms, INPUT_TAP[role],
                           folds.get(role), spec.learn_clip, spec.clip_init)
            block.set_role(role, q)
            self.linears[role] = q
        for point, w in self.wiring.items():
            op = None if w.transform is None else self.transforms.live_op(w.transform, w.left, w.right, w.inverse)
            block.taps[point] = FlatActTap(op, spec.kv_spec, spec.learn_clip, spec.clip_init) if w.kv_quant else op
        block.taps.to(dev)

    def clip_parameters(self) -> list[nn.Parameter]:
        out: list[nn.Parameter] = []
        for q in self.linears.values():
            out.extend(p for p in (q.weight_clip_logit, q.weight_clip_logit_lo, q.act_clip_logit, q.act_clip_logit_lo)
                       if p is not None)
        for tap in self.block.taps.values():
            if isinstance(tap, FlatActTap):
                out.extend(p for p in (tap.clip_logit, tap.clip_logit_lo) if p is not None)
        return out

    def parameter_groups(self, lr: float, clip_lr: float) -> list[dict]:
        """AdamW groups: transforms (rotations, singular values, scales) at ``lr``, clipping logits at ``clip_lr``."""
        groups = [{"params": self.transforms.parameters(), "lr": lr, "name": "transforms"}]
        clips = self.clip_parameters()
        if clips:
            groups.append({"params": clips, "lr": clip_lr, "name": "clipping"})
        return groups

    def trainable(self, on: bool) -> None:
        """Only the FlatQuant parameters are trained; the block's own weights never receive gradients."""
        for p in self.block.parameters():
            p.requires_grad_(False)
        for p in self.transforms.parameters() + self.clip_parameters():
            p.requires_grad_(on)

    @torch.no_grad()
    def finalize(self, freeze: bool = True) -> None:
        """Merge the inverse transforms into the weights (float64), fold the diag_scale of a tap with a norm before it
        into that RMSNorm's weight (the reference's deployment; the down_proj input keeps its scale online), fix the
        online matrices as buffers, and (when ``freeze``) write the clipped, quantized weights. Clipping logits of the
        online quantizers stay. ``freeze=False`` (the debug invariant) also skips the learned weight clipping folded
        with the V transform."""
        self.trainable(False)
        self._hook.remove()
        self.transforms.clear()
        taps = self.block.taps
        for point, w in self.wiring.items():
            if w.transform is None:
                continue
            scale = self.transforms[w.transform].diag_scale
            inv_scale = None if scale is None else scale.to(torch.float64)
            if inv_scale is not None and point in NORM_BEFORE:  # RMSNorm(x) * d: the scale lives in the norm's weight
                norm_w = self.block.role(NORM_BEFORE[point]).weight
                folded = norm_w.data.to(torch.float64) * inv_scale
                check_finite(folded, f"{self.name}.{NORM_BEFORE[point]}")
                norm_w.data.copy_(folded)
                inv_scale = None
            op = self.transforms.frozen_op(w.transform, w.left, w.right, w.inverse, inv_scale)
            if w.kv_quant:
                taps[point].op = op
            else:
                taps[point] = op
        for q in self.linears.values():
            q.merge_transform(clip=freeze)
            if freeze:
                q.freeze()
        for name, buf in taps.named_buffers():
            check_finite(buf, f"{self.name}.taps.{name}")
