"""`DiffusionEvalLM`: an lm-eval `LM` over an in-process (possibly quantized) `DiffusionLM` and a `Sampler`.

- `generate_until`: batched, left-padded prompts through the sampler; the decoded text is cut at the
  first end-of-text token, then at the first of lm-eval's `until` strings, and holds at most
  `max_gen_toks` tokens. How the sampler is fitted to a task's generation length: `Sampler.fitted`.
- `loglikelihood`: LLaDA's Monte Carlo masked estimate (DESIGN section 5, `get_log_likelihood` of
  ML-GSAI/LLaDA `eval_llada.py`): on x = context + continuation, mask only continuation tokens;
  sample j masks m_j of the L continuation tokens (m_j stratified over the samples, positions
  uniform); log p(continuation | context) ~ -(1/n) sum_j sum_{i masked in j} CE_i / (m_j / L).
  With `cfg_scale` > 0 the logits are LLaDA's guided ones (un + (cfg+1)(cond - un), prompt masked).
  `estimator=official` draws the counts as the reference `forward_process` does instead (per batch of
  `mc_batch_size`: round-half-to-even of an evenly spaced float32 line from a random start), which
  is not uniform on 1..L for many L and so biases the estimate; `stratified` (default) is exact.
  `is_greedy` (when `check_greedy`): unmasking the continuation one most-confident token at a time
  with argmax tokens reproduces it (LLaDA's `suffix_greedy_prediction`).
- `loglikelihood_rolling`: the same estimator over the whole text (windows of `rolling_window`
  tokens, each conditioned on up to `rolling_context` preceding tokens, when it is longer).
- Data parallel: under `accelerate launch` / `torchrun` (WORLD_SIZE > 1) the wrapper joins the
  process group, takes rank / world size from it and places the model on cuda:LOCAL_RANK;
  lm-eval's evaluator then shards the requests and gathers the metrics.
- Registered with lm-eval as model "fair_calib" (`model_args`: path=..., decoding=llada, sampler fields);
  `python -m fair_calib.benchmark.lm_eval_plugin install` makes lm-eval's own CLI find it.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch import Tensor
from tqdm.auto import tqdm

from fair_calib.benchmark.families import family_defaults
from fair_calib.decoding.base import Sampler, decode_answer, guided_logits, left_pad
from fair_calib.models.dllm import DiffusionLM
from fair_calib.registry import ConfigError


# ---- the Monte Carlo likelihood (pure functions) ---------------------------------------------------
def stratified_mask_counts(target_len: int, n: int, generator: torch.Generator | None = None,
                           start: int | None = None) -> Tensor:
    """(n,) masked-token counts in 1..L evenly spaced from a random start k: m_j = ((k - 1 + floor(j L / n)) mod L) + 1.

    Each m_j is uniform on 1..L (unbiased ELBO); the set is balanced (exactly n / L of each count
    when L divides n). LLaDA's reference rounds k + j L / n instead of flooring, which is less even.
    """
    if start is None:
        start = int(torch.randint(1, target_len + 1, (), generator=generator))
    offsets = torch.div(torch.arange(n) * target_len, n, rounding_mode="floor")
    return (start - 1 + offsets) % target_len + 1


def official_mask_counts(target_len: int, batch_size: int, start: int) -> Tensor:
    """LLaDA `forward_process` counts of one batch from start k: wrap(round(linspace(k, k + (b - 1) L / b, b))).

    The end point is formed as the reference forms it (int tensor + float -> float32), the line in float32,
    `torch.round` rounds half to even; counts are wrapped into 1..L by ((x - 1) mod L) + 1.
    """
    end = float(torch.tensor(start) + (batch_size - 1) * (target_len / batch_size))
    line = torch.round(torch.linspace(float(start), end, steps=batch_size)).long()
    return (line - 1) % target_len + 1


def official_masks(target_len: int, mc_num: int, batch_size: int, generator: torch.Generator | None = None) -> Tensor:
    """(mc_num, L) masks drawn in the reference order: per batch a start k, then one permutation per row."""
    b = min(batch_size, mc_num)
    if mc_num % b:
        raise ConfigError(f"estimator=official draws mc_num / mc_batch_size batches (LLaDA's get_log_likelihood): "
                          f"mc_num={mc_num} is not a multiple of mc_batch_size={b}")
    rows = []
    for _ in range(mc_num // b):
        start = int(torch.randint(1, target_len + 1, (), generator=generator))
        for count in official_mask_counts(target_len, b, start).tolist():
            rows.append(torch.randperm(target_len, generator=generator) < count)
    return torch.stack(rows)


def random_masks(counts: Tensor, target_len: int, generator: torch.Generator | None = None) -> Tensor:
    """(n, L) bool: row j masks `counts[j]` positions chosen uniformly (a random permutation's first m_j slots)."""
    perm = torch.rand(len(counts), target_len, generator=generator).argsort(dim=1)
    return perm < counts[:, None]


def answer_logits(model: DiffusionLM, x: Tensor, prompt_len: int, cfg_scale: float = 0.0) -> Tensor:
    """(B, L - prompt_len, V) fp32 logits of the answer positions of unpadded canvases x, guided when cfg_scale > 0
    (the sampler's `guided_logits`; the mask token keeps its logit, as in LLaDA's likelihood code)."""
    logits = guided_logits(model, x, torch.ones_like(x), prompt_len, cfg_scale, suppress_mask=False)
    return logits[:, prompt_len:].float()


ESTIMATORS = ("stratified", "official")


def check_estimator(estimator: str, mc_num: int | None = None, mc_batch_size: int | None = None) -> str:
    """A valid estimator name; `official` also needs whole batches (mc_num a multiple of min(mc_batch_size, mc_num))."""
    if estimator not in ESTIMATORS:
        raise ConfigError(f"benchmark.estimator={estimator!r} unknown; valid: {', '.join(ESTIMATORS)}")
    if estimator == "official" and mc_num is not None and mc_batch_size is not None \
            and int(mc_num) % min(int(mc_batch_size), int(mc_num)):
        raise ConfigError(f"benchmark.estimator=official: mc_num={mc_num} must be a multiple of "
                          f"mc_batch_size={mc_batch_size} (LLaDA's get_log_likelihood draws whole batches)")
    return estimator


def mc_masks(target_len: int, mc_num: int, generator: torch.Generator | None = None, estimator: str = "stratified",
             batch_size: int = 16) -> tuple[Tensor, Tensor]:
    """The distinct masks of one estimate and how often each was drawn: ((u, L) bool, (u,) float).

    All `mc_num` masks are drawn up front (`stratified`: counts stratified over the whole set, so the
    estimate does not depend on how sequences are batched; `official`: LLaDA's per-batch counts,
    `batch_size` per batch). Identical masks (frequent for short continuations) are run once and
    counted with their multiplicity: same estimate, fewer forwards.
    """
    if check_estimator(estimator) == "official":
        masks = official_masks(target_len, mc_num, batch_size, generator)
    else:
        masks = random_masks(stratified_mask_counts(target_len, mc_num, generator), target_len, generator)
    unique, inverse = torch.unique(masks, dim=0, return_inverse=True)
    return unique, torch.bincount(inverse, minlength=len(unique)).float()


@torch.no_grad()
def mc_loglikelihoods(model: DiffusionLM, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], mc_num: int = 16,
                      batch_size: int = 16, generators: Sequence[torch.Generator | None] | None = None,
                      cfg_scale: float = 0.0, progress: bool = False, desc: str = "loglikelihood (MC)",
                      estimator: str = "stratified") -> list[float]:
    """Monte Carlo estimates of log p(continuation | context) for many (context, continuation) pairs.

    Each pair draws its masks from its own generator (`mc_masks`); the masked sequences of all pairs
    are then grouped by (context length, continuation length), so a forward pass holds up to
    `batch_size` sequences of one shape from any pairs (no padding: attention is bidirectional).
    Per sequence j of a pair: sum_{i masked} CE_i / (m_j / L), times its multiplicity; the estimate is
    minus the mean over the pair's `mc_num` draws (accumulated in float64, in a fixed order).
    """
    if mc_num <= 0 or batch_size <= 0:
        raise ConfigError(f"mc_num and the MC batch size must be positive, got {mc_num} and {batch_size}")
    generators = list(generators) if generators is not None else [None] * len(pairs)
    rows: dict[tuple[int, int], list[tuple[int, Tensor, Tensor, float]]] = {}
    for k, ((context, continuation), gen) in enumerate(zip(pairs, generators, strict=True)):
        if not continuation:
            continue
        seq = torch.tensor(list(context) + list(continuation), dtype=torch.long)
        unique, multiplicity = mc_masks(len(continuation), mc_num, gen, estimator, batch_size)
        shape = (len(context), len(continuation))
        rows.setdefault(shape, []).extend((k, seq, m, float(w)) for m, w in zip(unique, multiplicity))
    totals = torch.zeros(len(pairs), dtype=torch.float64)
    device = model.device
    bar = tqdm(total=sum(map(len, rows.values())), desc=desc, disable=not progress, mininterval=2, unit="seq")
    try:
        for (p, length), group in sorted(rows.items()):
            for lo in range(0, len(group), batch_size):
                chunk = group[lo: lo + batch_size]
                seq = torch.stack([r[1] for r in chunk]).to(device)
                m = torch.stack([r[2] for r in chunk]).to(device)
                x = seq.clone()
                x[:, p:] = torch.where(m, model.mask_id, seq[:, p:])
                logits = answer_logits(model, x, p, cfg_scale)
                ce = F.cross_entropy(logits.transpose(1, 2), seq[:, p:], reduction="none")  # (b, L)
                ratio = m.sum(1).float() / length  # mask ratio m_j / L of each sequence
                weight = torch.tensor([r[3] for r in chunk], device=device)
                terms = (weight * (ce * m).sum(1) / ratio).double().cpu()
                totals.index_add_(0, torch.tensor([r[0] for r in chunk]), terms)
                bar.update(len(chunk))
    finally:
        bar.close()
    return (-totals / mc_num).tolist()


def mc_loglikelihood(model: DiffusionLM, context: Sequence[int], continuation: Sequence[int], mc_num: int = 16,
                     mc_batch_size: int = 16, generator: torch.Generator | None = None,
                     cfg_scale: float = 0.0, estimator: str = "stratified") -> float:
    """Monte Carlo estimate of log p(continuation | context); the context is never masked (`mc_loglikelihoods`)."""
    return mc_loglikelihoods(model, [(context, continuation)], mc_num, mc_batch_size, [generator], cfg_scale,
                             estimator=estimator)[0]


@torch.no_grad()
def greedy_unmask(model: DiffusionLM, context: Sequence[int], length: int, cfg_scale: float = 0.0) -> list[int]:
    """Fill `length` masks after the context one position per step: the most confident masked
    position gets its argmax token (never the mask token). `is_greedy` = this equals the continuation."""
    p = len(context)
    x = torch.tensor([list(context) + [model.mask_id] * length], dtype=torch.long, device=model.device)
    for _ in range(length):
        logits = answer_logits(model, x, p, cfg_scale)[0]
        logits[:, model.mask_id] = -torch.inf
        confidence, token = torch.softmax(logits, -1).max(-1)
        confidence = torch.where(x[0, p:] == model.mask_id, confidence, -torch.inf)
        i = int(confidence.argmax())
        x[0, p + i] = token[i]
    return x[0, p:].tolist()


def rolling_windows(tokens: Sequence[int], window: int, context: int = 0) -> list[tuple[list[int], list[int]]]:
    """Disjoint windows of `window` tokens covering `tokens`; each paired with up to `context` tokens before it."""
    if window <= 0 or context < 0:
        raise ConfigError(f"rolling_window must be positive and rolling_context >= 0, got {window} and {context}")
    tokens = list(tokens)
    return [(tokens[max(0, lo - context): lo], tokens[lo: lo + window]) for lo in range(0, len(tokens), window)]


# ---- generation helpers -------------------------------------------------------------------------
def truncate_at_stop(text: str, until: Sequence[str] | str | None) -> str:
    """Cut `text` at the earliest occurrence of any stop string (lm-eval's `until`)."""
    if isinstance(until, str):
        until = [until]
    cut = len(text)
    for stop in until or ():
        if stop:
            i = text.find(stop)
            if 0 <= i < cut:
                cut = i
    return text[:cut]


def request_seed(seed: int, *parts: Any) -> int:
    """A stable 63-bit seed from the run seed and a request's content (independent of request order)."""
    digest = hashlib.sha256(repr((seed,) + parts).encode()).hexdigest()
    return int(digest[:15], 16)


def _batches(items: list[int], size: int):
    for i in range(0, len(items), size):
        yield items[i: i + size]


# ---- the lm-eval model ----------------------------------------------------------------------------
@register_model("fair_calib")
class DiffusionEvalLM(LM):
    """lm-eval model over an in-process `DiffusionLM` (built from `path` when none is given) and a `Sampler`."""

    def __init__(self, model: DiffusionLM | None = None, sampler: Sampler | None = None, *,
                 path: str | None = None, decoding: str | None = None, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, seed: int = 0, batch_size: int | str = 32,
                 mc_num: int = 16, mc_batch_size: int = 16, gen_length: int | None = None,
                 max_gen_toks: int = 256, max_length: int = 4096, add_special_tokens: bool = False,
                 show_progress: bool = True, max_batch_size: int | None = None, cfg_scale: float | None = None,
                 check_greedy: bool = False, rolling_window: int | None = None, rolling_context: int = 0,
                 estimator: str = "stratified", label: str = "", **sampler_args: Any) -> None:
        super().__init__()
        self._rank, self._world_size, device = join_data_parallel(str(device))
        if model is None:
            if path is None:
                raise ConfigError("DiffusionEvalLM needs a model or model_args path=<checkpoint folder>")
            from fair_calib.models.hf_folder import resolve_device, resolve_model_path
            from fair_calib.models.loading import load_dllm

            model = load_dllm(resolve_model_path(path), dtype=dtype, device=resolve_device(str(device)),
                              trust_remote_code=_as_bool(trust_remote_code))
        defaults = family_defaults(model)
        if sampler is None:
            from fair_calib.registry import build

            if gen_length is not None:
                sampler_args.setdefault("gen_length", int(gen_length))
            sampler = build("decoding", {"name": decoding or defaults.decoding,
                                         **{k: _literal(v) for k, v in sampler_args.items()}})
        elif sampler_args:
            raise ConfigError(f"sampler settings {sorted(sampler_args)} given together with a built sampler")
        cfg_scale = _literal(cfg_scale)
        if cfg_scale is None:  # the sampler's guidance (LLaDA), else the family default
            cfg_scale = sampler.cfg_scale if sampler.cfg_scale is not None else defaults.cfg_scale
        else:
            sampler = sampler.with_guidance(float(cfg_scale))
        self.cfg_scale = float(cfg_scale)
        self.check_greedy = _as_bool(check_greedy)
        if model.tokenizer is None:
            raise ConfigError("the model has no tokenizer attached (model.tokenizer)")
        if int(mc_num) <= 0 or int(mc_batch_size) <= 0:
            raise ConfigError(f"mc_num and mc_batch_size must be positive, got {mc_num} and {mc_batch_size}")
        self.model, self.sampler = model, sampler
        self.seed = int(seed)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 32  # "auto" -> default
        self.mc_num, self.mc_batch_size = int(mc_num), int(mc_batch_size)
        self.estimator = check_estimator(str(estimator), self.mc_num, self.mc_batch_size)
        self.gen_length = int(gen_length) if gen_length is not None else None
        self.max_gen_toks = int(max_gen_toks)
        self.max_length = int(max_length)
        self.add_special_tokens = _as_bool(add_special_tokens)
        self.show_progress = _as_bool(show_progress)
        self.label = str(label)  # which model the progress bars decode (FP, RTN W4A4, ...)
        self.rolling_window = int(rolling_window) if _literal(rolling_window) is not None else self.max_length
        self.rolling_context = int(rolling_context)
        if self.rolling_window + self.rolling_context > self.max_length:
            raise ConfigError(f"rolling_window + rolling_context ({self.rolling_window} + {self.rolling_context}) "
                              f"exceeds max_length {self.max_length}")
        self._device = model.device

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "") or type(self.tokenizer).__name__)

    def encode(self, text: str, special: bool | None = None) -> list[int]:
        special = self.add_special_tokens if special is None else special
        return list(self.tokenizer.encode(text, add_special_tokens=special)) if text else []

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """lm-eval's convention: trailing context spaces move to the continuation; split the joint encoding."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        return ctx, whole[len(ctx):]

    # ---- lm-eval API ------------------------------------------------------------------------
    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) per request; is_greedy is False unless `check_greedy`.

        The masked sequences of all requests share forward passes (`mc_loglikelihoods`, `mc_batch_size`
        sequences each); every request draws its masks from a generator seeded by the run seed and
        its own tokens, so its estimate depends neither on request order nor on the other requests.
        """
        pairs = []
        for req in requests:
            ctx, cont = self.encode_pair(*req.args)
            overflow = len(ctx) + len(cont) - self.max_length
            pairs.append((ctx[overflow:] if overflow > 0 else ctx, cont))
        with self._eval_mode():
            lls = self._estimate(pairs, disable_tqdm, self._desc("loglikelihood (MC)"))
            out = [(ll, self.check_greedy and greedy_unmask(self.model, ctx, len(cont), self.cfg_scale) == cont)
                   for ll, (ctx, cont) in zip(lls, pairs)]
        for req, result in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", tuple(req.args), result)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """log p(text) per request: the Monte Carlo estimate summed over `rolling_windows` of the whole text."""
        pairs, owner = [], []
        for k, req in enumerate(requests):
            for ctx, window in rolling_windows(self.encode(req.args[0]), self.rolling_window, self.rolling_context):
                pairs.append((ctx, window))
                owner.append(k)
        with self._eval_mode():
            lls = self._estimate(pairs, disable_tqdm, self._desc("loglikelihood_rolling (MC)"))
        out = [0.0] * len(requests)
        for k, ll in zip(owner, lls):
            out[k] += ll
        for req, total in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (req.args[0],), total)
        return out

    def _desc(self, what: str) -> str:
        return f"{what} [{self.label}]" if self.label else what

    def _estimate(self, pairs: list[tuple[list[int], list[int]]], disable_tqdm: bool, desc: str) -> list[float]:
        gens = [torch.Generator().manual_seed(request_seed(self.seed, ctx, cont)) for ctx, cont in pairs]
        return mc_loglikelihoods(self.model, pairs, self.mc_num, self.mc_batch_size, gens, self.cfg_scale,
                                 progress=self.show_progress and not disable_tqdm, desc=desc, estimator=self.estimator)

    @contextlib.contextmanager
    def _eval_mode(self):
        was_training = self.model.training
        self.model.eval()
        try:
            yield
        finally:
            self.model.train(was_training)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Batched sampler decoding, batches grouped by generation and prompt length; outputs in request order."""
        results: list[str] = [""] * len(requests)
        groups: dict[int, list[int]] = {}
        for i, req in enumerate(requests):
            kwargs = req.args[1] if len(req.args) > 1 else {}
            max_new = self.gen_length or int(kwargs.get("max_gen_toks", self.max_gen_toks))
            groups.setdefault(max_new, []).append(i)
        tok, cfg = self.tokenizer, self.model.config
        gen = torch.Generator(device=self.model.device).manual_seed(self.seed)
        bar = tqdm(total=len(requests), desc=self._desc("generate"), disable=disable_tqdm or not self.show_progress,
                   mininterval=2)
        with self._eval_mode(), bar:
            for max_new, idx in groups.items():
                sampler, g = self.sampler.fitted(max_new)
                encoded = {i: self.encode(requests[i].args[0])[-max(1, self.max_length - g):] for i in idx}
                idx = sorted(idx, key=lambda i: len(encoded[i]))  # similar lengths share a batch: less padding
                for chunk in _batches(idx, self.batch_size):
                    ids, mask = left_pad([encoded[i] for i in chunk], cfg.pad_id)
                    out = sampler.generate(self.model, ids.to(self.model.device), mask.to(self.model.device),
                                           generator=gen, gen_length=g)
                    for i, row in zip(chunk, out.tokens.tolist()):
                        context, kwargs = requests[i].args[0], requests[i].args[1]
                        text = truncate_at_stop(decode_answer(tok, row[:max_new], cfg.eos_id), kwargs.get("until"))
                        results[i] = text
                        self.cache_hook.add_partial("generate_until", (context, kwargs), text)
                    bar.update(len(chunk))
        return results

    def get_model_info(self) -> dict[str, Any]:
        return {"sampler": type(self.sampler).__name__, "mc_num": self.mc_num, "estimator": self.estimator,
                "seed": self.seed, "cfg_scale": self.cfg_scale, "mask_id": int(self.model.mask_id)}

    # ---- chat template -------------------------------------------------------------------------
    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if not chat_template:
            return None
        template = getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise ConfigError(f"apply_chat_template was asked but the tokenizer of {self.tokenizer_name or 'the model'}"
                              " has no chat template (tokenizer_config.json chat_template): use a base-model "
                              "prompt format (apply_chat_template=false)")
        return template if isinstance(chat_template, bool) else chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        """The few-shot chat history through the tokenizer's template (lm-eval's --apply_chat_template)."""
        self.chat_template(True)
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # ---- data parallel (lm-eval's evaluator shards requests by rank and gathers through these) ----
    def all_gather(self, tensor: Tensor) -> Tensor:
        if self.world_size <= 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        result = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, result, dst=dst)
        return result

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


def join_data_parallel(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process. Under `accelerate launch` / `torchrun` (WORLD_SIZE > 1)
    joins the default process group (NCCL on GPUs, Gloo on CPU) and uses cuda:LOCAL_RANK."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and device != "cpu"
    if cuda:
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _as_bool(v: Any) -> bool:
    return v if isinstance(v, bool) else str(v).strip().lower() in ("1", "true", "yes", "on")


def _literal(v: Any) -> Any:
    """lm-eval passes model_args already typed from the CLI string; map 'null'/'none' to None."""
    return None if isinstance(v, str) and v.strip().lower() in ("none", "null") else v
