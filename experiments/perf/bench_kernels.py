"""Micro-benchmark of the fair_calib Triton kernels against their PyTorch references and fp16/bf16 matmul.

On CUDA: for LLaDA-8B (d 4096, ff 12288) and Dream-7B (d 3584, ff 18944), prefill (2048 tokens) and
decode (32 tokens = one semi-autoregressive block; a dLLM step recomputes the block) shapes, times
per-token quantization, the fused FlatQuant Kronecker transform + quantization, the online Hadamard
transform (down_proj input), the W4A4 GEMM with packed weights (up/gate shape d -> ff), the full
W4A4 linear (quantize + GEMM) and the same linear as fp16 / bf16 ``torch.matmul``.

Without a GPU the Triton kernels cannot be timed (the interpreter is a correctness tool), so it prints the
PyTorch-reference timings on small CPU shapes with a few iterations, next to an fp32 / bf16 matmul of
the same shape. In both cases it prints the storage of a W4A4-packed 4096 x 4096 weight vs fp16.

    python experiments/perf/bench_kernels.py --quick
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from fair_calib.kernels import (
    fast_hadamard_transform,
    fast_hadamard_transform_ref,
    kron_factors,
    kron_quantize,
    kron_quantize_ref,
    pack_int32,
    pack_int32_ref,
    quantize_per_token,
    quantize_per_token_ref,
    w4a4_gemm,
    w4a4_gemm_ref,
    w4a4_linear,
)
from fair_calib.quant.hadamard import hadamard_factor, hadamard_matrix

MODELS = {"llada-8b": (4096, 12288), "dream-7b": (3584, 18944)}


def time_fn(fn: Callable[[], object], iters: int, warmup: int, cuda: bool) -> float:
    """Wall time of ``fn`` in milliseconds: median of CUDA-event timings on GPU, best of ``iters`` on CPU
    (the minimum is the least sensitive to other processes sharing the cores)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times) if cuda else min(times)


def random_orthogonal(n: int, device: torch.device) -> torch.Tensor:
    """Random orthogonal factor, as a FlatQuant transform would be after training."""
    q, _ = torch.linalg.qr(torch.randn(n, n, dtype=torch.float64))
    return q.to(device=device, dtype=torch.float32)


def normalized_hadamard(k: int, device: torch.device) -> torch.Tensor | None:
    """Orthogonal K x K Hadamard matrix (project construction / sqrt(K)); None for K = 1."""
    if k == 1:
        return None
    return (hadamard_matrix(k) / k**0.5).to(device=device, dtype=torch.float32)


def int4_weight(n_out: int, n_in: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random int4 codes (N, K) int8 and per-channel fp32 scales."""
    return (
        torch.randint(-8, 8, (n_out, n_in), device=device, dtype=torch.int8),
        torch.rand(n_out, device=device) * 0.01 + 1e-3,
    )


def weight_bytes_report(n: int = 4096) -> list[str]:
    """Storage of an n x n linear weight: fp16 vs W4 packed (compressed-tensors int32) + fp32 channel scales."""
    w = torch.randint(-8, 8, (n, n), dtype=torch.int8)
    packed = pack_int32_ref(w)
    fp16 = n * n * 2
    w4 = packed.numel() * packed.element_size() + n * 4
    return [
        f"weight {n}x{n}: fp16 {fp16:,} B ({fp16 / 2**20:.1f} MiB) | W4 packed int32 {packed.numel() * 4:,} B "
        f"+ fp32 scales {n * 4:,} B = {w4:,} B ({w4 / 2**20:.2f} MiB) -> {fp16 / w4:.2f}x smaller",
    ]


CUDA_HEADER = (
    f"{'model':9s} {'phase':8s} {'kernel':32s} {'shape':22s} {'triton ms':>10s} {'torch-ref ms':>13s} {'speedup':>8s}"
)


def _cuda_row(model: str, phase: str, name: str, shape: str, t_tri: float, t_ref: float | None) -> str:
    ref = f"{t_ref:13.3f}" if t_ref is not None else f"{'-':>13s}"
    speed = f"{t_ref / t_tri:7.2f}x" if t_ref is not None and t_tri > 0 else ""
    return f"{model:9s} {phase:8s} {name:32s} {shape:22s} {t_tri:10.3f} {ref} {speed:>8s}"


def _bench_cuda_case(
    model: str,
    phase: str,
    m: int,
    d: int,
    ff: int,
    dt: torch.dtype,
    iters: int,
    warm: int,
    dev: torch.device | None = None,
) -> list[str]:
    """All kernels for one (model, phase): activations (m, d) into a d -> ff linear, (m, ff) for the Hadamard.

    ``dev`` defaults to CUDA; passing a CPU device gives a dry run through the references (for testing)."""
    dev = dev or torch.device("cuda")
    n1, n2 = kron_factors(d)
    p1, p2 = random_orthogonal(n1, dev), random_orthogonal(n2, dev)
    hk_k, _ = hadamard_factor(ff)
    hk = normalized_hadamard(hk_k, dev)
    wq, sw = int4_weight(ff, d, dev)
    wpacked = pack_int32(wq)
    wfp = (torch.randn(ff, d, device=dev) * 0.02).to(dt)
    wbf = wfp.to(torch.bfloat16)
    x = torch.randn(m, d, device=dev, dtype=dt)
    xbf = x.to(torch.bfloat16)
    xf = torch.randn(m, ff, device=dev, dtype=dt)
    qa = quantize_per_token(x, 4, real=True)
    lin = f"{m}x{d} @ {d}x{ff}"

    def t(fn: Callable[[], object]) -> float:
        return time_fn(fn, iters, warm, dev.type == "cuda")

    t_lin = t(lambda: w4a4_linear(x, wpacked, sw))
    t_mm = t(lambda: torch.matmul(x, wfp.t()))
    t_bf = t(lambda: torch.matmul(xbf, wbf.t()))
    rows = [
        _cuda_row(
            model,
            phase,
            "quant per-token int4 (real)",
            f"{m}x{d}",
            t(lambda: quantize_per_token(x, 4, real=True)),
            t(lambda: quantize_per_token_ref(x, 4, real=True)),
        ),
        _cuda_row(
            model,
            phase,
            f"kron {n1}x{n2} + quant (real)",
            f"{m}x{d}",
            t(lambda: kron_quantize(x, p1, p2, real=True)),
            t(lambda: kron_quantize_ref(x, p1, p2, real=True)),
        ),
        _cuda_row(
            model,
            phase,
            f"hadamard {hk_k}x{ff // hk_k}",
            f"{m}x{ff}",
            t(lambda: fast_hadamard_transform(xf, hk)),
            t(lambda: fast_hadamard_transform_ref(xf, hk)),
        ),
        _cuda_row(
            model,
            phase,
            "w4a4 gemm (packed int32 W)",
            lin,
            t(lambda: w4a4_gemm(qa.q, qa.scale, wpacked, sw, out_dtype=dt)),
            t(lambda: w4a4_gemm_ref(qa.q, qa.scale, wpacked, sw, out_dtype=dt)),
        ),
        _cuda_row(model, phase, "w4a4 linear (quant+gemm)", lin, t_lin, None),
        f"{'':18s} {str(dt)[6:] + ' torch.matmul':32s} {lin:22s} {t_mm:10.3f}   w4a4 linear: {t_mm / t_lin:.2f}x",
        f"{'':18s} {'bfloat16 torch.matmul':32s} {lin:22s} {t_bf:10.3f}   w4a4 linear: {t_bf / t_lin:.2f}x",
    ]
    return rows


def bench_cuda(args: argparse.Namespace) -> list[str]:
    """Triton vs reference vs dense matmul on the LLaDA-8B / Dream-7B shapes."""
    dt = torch.float16 if args.dtype == "fp16" else torch.bfloat16
    iters, warm = (10, 3) if args.quick else (50, 10)
    phases = {"prefill": 512 if args.quick else 2048, "decode": 32}
    rows = [CUDA_HEADER]
    for model, (d, ff) in MODELS.items():
        for phase, m in phases.items():
            rows += _bench_cuda_case(model, phase, m, d, ff, dt, iters, warm)
            torch.cuda.empty_cache()
    return rows


def bench_cpu(args: argparse.Namespace) -> list[str]:
    """PyTorch references only, on small shapes: the Triton interpreter is not meant for timing."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    iters, warm = (5, 1) if args.quick else (20, 2)
    tokens = 64 if args.quick else 256
    d, ff = (512, 1536) if args.quick else (1024, 3072)
    n1, n2 = kron_factors(d)
    p1, p2 = random_orthogonal(n1, torch.device("cpu")), random_orthogonal(n2, torch.device("cpu"))
    hk_k, _ = hadamard_factor(ff)
    hk = normalized_hadamard(hk_k, torch.device("cpu"))
    x = torch.randn(tokens, d)
    xf = torch.randn(tokens, ff)
    wq, sw = int4_weight(ff, d, torch.device("cpu"))
    wpacked = pack_int32_ref(wq)
    wfp = torch.randn(ff, d) * 0.02
    xbf, wbf = x.to(torch.bfloat16), wfp.to(torch.bfloat16)
    qa = quantize_per_token_ref(x, 4, real=True)

    def t(fn):
        return time_fn(fn, iters, warm, False)

    rows = [
        f"no CUDA device: PyTorch reference timings on CPU ({torch.get_num_threads()} thread, best of {iters})",
        f"{'kernel (reference)':36s} {'shape':24s} {'ms':>9s}",
    ]
    cases = [
        ("quant per-token int4 sym (fake)", f"{tokens}x{d}", lambda: quantize_per_token_ref(x, 4)),
        (
            "quant per-token int4 asym (real)",
            f"{tokens}x{d}",
            lambda: quantize_per_token_ref(x, 4, sym=False, real=True),
        ),
        (f"kron {n1}x{n2} + quant (real)", f"{tokens}x{d}", lambda: kron_quantize_ref(x, p1, p2, real=True)),
        (f"hadamard {hk_k}x{ff // hk_k}", f"{tokens}x{ff}", lambda: fast_hadamard_transform_ref(xf, hk)),
        ("pack int32 (compressed-tensors)", f"{ff}x{d}", lambda: pack_int32_ref(wq)),
        ("w4a4 gemm (packed int32 W)", f"{tokens}x{d} @ {d}x{ff}", lambda: w4a4_gemm_ref(qa.q, qa.scale, wpacked, sw)),
        ("w4a4 linear (quant+gemm)", f"{tokens}x{d} @ {d}x{ff}", lambda: w4a4_linear(x, wpacked, sw)),
        ("fp32 torch.matmul", f"{tokens}x{d} @ {d}x{ff}", lambda: torch.matmul(x, wfp.t())),
        (
            "bf16 torch.matmul",
            f"{tokens}x{d} @ {d}x{ff}",
            lambda: torch.matmul(xbf, wbf.t()),
        ),
    ]
    for name, shape, fn in cases:
        rows.append(f"{name:36s} {shape:24s} {t(fn):9.3f}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer iterations and smaller shapes")
    parser.add_argument("--dtype", choices=["fp16", "bf16"], default="fp16", help="activation dtype on CUDA")
    parser.add_argument("--cpu", action="store_true", help="force the CPU reference report even if CUDA exists")
    args = parser.parse_args()
    print(f"torch {torch.__version__}")
    if torch.cuda.is_available() and not args.cpu:
        print(f"device: {torch.cuda.get_device_name()}")
        lines = bench_cuda(args)
    else:
        lines = bench_cpu(args)
    print("\n".join(lines))
    print("\n".join(weight_bytes_report(4096)))


if __name__ == "__main__":
    main()
