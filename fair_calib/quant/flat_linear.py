"""FlatQuant's quantized modules (DESIGN 4.6; the reference's ``flat_linear.py``): the linear whose weight follows
the live transforms until it is merged, and the online tap that quantizes (K/V) after an optional transform op.
Both use FlatQuant's learnable clipping pair (``grids.fake_quant_clip_pair``, init logit 4.0)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fair_calib.quant.grids import QuantSpec, clip_pair_clamp, fake_quant_clip_pair, fake_quant_weight_clip_pair
from fair_calib.quant.qlinear import ActQuantizer, QLinear, check_finite
from fair_calib.quant.transforms import TransformBundle, per_head_apply


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
    and ``W' = (W / d) (P1 (x) P2)^{-T}`` (transform ``point`` of ``transforms``) is recomputed from the live
    transforms until :meth:`merge_transform`.

    ``fold``: the transform whose right factor acts per head on the output features (v_proj, the reference's
    ``out_trans``): the weight is clipped in the input-transformed basis, then folded, then quantized with the plain
    grid (``flat_linear.py``: ``apply_wclip`` -> ``out_trans`` -> quantizer); the bias is folded too.

    Clipping pairs: ``weight_clip_logit`` / ``weight_clip_logit_lo`` (out, 1) and ``act_clip_logit`` /
    ``act_clip_logit_lo`` (scalars), all initialised to ``clip_init`` (sigmoid(4) = 0.982).
    """

    def __init__(self, linear: nn.Module, w_spec: QuantSpec, a_spec: QuantSpec, name: str,
                 transforms: TransformBundle | None, point: str, fold: str | None = None, learn_clip: bool = True,
                 clip_init: float = 4.0) -> None:
        super().__init__(linear, w_spec, a_spec, name=name)
        object.__setattr__(self, "transforms", transforms)  # by reference: shared by several linears and the taps
        self.point, self.fold = point, fold
        dev = linear.weight.device
        self.weight_clip_logit_lo: nn.Parameter | None = None
        self.act_clip_logit_lo: nn.Parameter | None = None
        if learn_clip and w_spec.enabled:
            self.weight_clip_logit = nn.Parameter(torch.full((self.out_features, 1), float(clip_init), device=dev))
            self.weight_clip_logit_lo = nn.Parameter(torch.full((self.out_features, 1), float(clip_init), device=dev))
        if learn_clip and a_spec.enabled:
            self.act_clip_logit = nn.Parameter(torch.tensor(float(clip_init), device=dev))
            self.act_clip_logit_lo = nn.Parameter(torch.tensor(float(clip_init), device=dev))

    @property
    def merged(self) -> bool:
        return self.transforms is None

    def _input_weight(self) -> Tensor:
        """``W'`` for the transformed input (no output fold)."""
        return self.weight if self.transforms is None else self.transforms.weight(self.point, self.weight)

    def _out_rows(self, w: Tensor) -> Tensor:
        if self.transforms is None or self.fold is None:
            return w
        return self.transforms.per_head(self.fold, w.transpose(0, 1)).transpose(0, 1)

    def current_weight(self) -> Tensor:
        """``W'`` (with the output fold) from the live transforms while training, the stored weight after."""
        return self._out_rows(self._input_weight()).to(self.weight.dtype)

    def current_bias(self) -> Tensor | None:
        if self.bias is None or self.transforms is None or self.fold is None:
            return self.bias
        return self.transforms.per_head(self.fold, self.bias.float()).to(self.bias.dtype)

    def quantized_weight(self) -> Tensor:
        if not self.quant_enabled or self.weight_frozen or not self.w_spec.enabled:
            return self.current_weight()
        if self.transforms is None or self.fold is None:
            return fake_quant_weight_clip_pair(self.current_weight(), self.w_spec, self.weight_clip_logit_lo,
                                               self.weight_clip_logit)
        w = self._input_weight()
        if self.weight_clip_logit is not None and self.weight_clip_logit_lo is not None:
            w = clip_pair_clamp(w, self.weight_clip_logit_lo, self.weight_clip_logit)
        w = self._out_rows(w).to(self.weight.dtype)
        return fake_quant_weight_clip_pair(w, self.w_spec, None, None)

    def quantize_input(self, x: Tensor) -> Tensor:
        if self.quant_enabled and self.a_spec.enabled:
            x = fake_quant_clip_pair(x, self.a_spec, self.act_clip_logit_lo, self.act_clip_logit).to(x.dtype)
        return x

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.current_bias())

    @torch.no_grad()
    def merge_transform(self, clip: bool = True) -> None:
        """``W <- (W / d) (P1 (x) P2)^{-T}`` in float64 (``KroneckerTransform.merge_weight``); with ``fold`` the
        per-head output factor goes into the rows and the bias after the learned weight clipping (applied here when
        ``clip``; the clipping logits are then used up) so the weight quantizer sees what it saw in training."""
        if self.transforms is None:
            return
        f64 = torch.float64
        w = self.transforms[self.point].merge_weight(self.weight.data.to(f64), dtype=f64)
        if self.fold is not None:
            right = self.transforms[self.fold].right.matrix(f64)
            lo, hi = self.weight_clip_logit_lo, self.weight_clip_logit
            if clip and lo is not None and hi is not None:
                w = clip_pair_clamp(w, lo.to(f64), hi.to(f64))
                self.weight_clip_logit, self.weight_clip_logit_lo = None, None
            w = per_head_apply(w.transpose(0, 1), right).transpose(0, 1)
            if self.bias is not None:
                bias = per_head_apply(self.bias.data.to(f64), right)
                check_finite(bias, self.name)
                self.bias.data.copy_(bias)
        check_finite(w, self.name)
        self.weight.data.copy_(w)
        object.__setattr__(self, "transforms", None)

    @torch.no_grad()
    def freeze(self) -> None:
        if self.transforms is not None:
            raise RuntimeError(f"{self.name}: merge the transform into the weight before freezing")
        super().freeze()
        self.weight_clip_logit_lo = None
