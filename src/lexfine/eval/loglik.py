"""Score candidate answers by log-likelihood: one forward pass per case, however many candidates it has.

Each row of a batch is laid out as

    [left pad][prompt ........ p_last][c1[:-1]][c2[:-1]]...[block pad]
                                      '----- candidate block -----'

and attends with a 4D mask: the prompt is causal; candidate c's tokens see the whole prompt and their own earlier
tokens, never another candidate's; each candidate restarts its position ids where the prompt ends. So the prompt
(1k+ tokens for SJP) is computed once per case instead of once per candidate, and multi-token labels
("approval" + end-of-turn, "dismissal" + end-of-turn) are scored exactly. A candidate's last token is never an
input (nothing is predicted from it), so single-token candidates (LEXam letters) need no block at all: the logits
at the prompt's last position score them all, and then a plain 2D padding mask suffices.

Left padding puts every row's prompt end in the same column, so only the last `block + 1` columns need logits
(`logits_to_keep`): the vocabulary projection runs on a handful of positions instead of the whole sequence.
Batches are sorted by length (longest first, so that an out-of-memory error shows at once) and padded to their own
maximum.

That is the `packed` strategy. The default is `cached`: the right-padded prompts go through with no mask at all
(causal attention alone keeps the padding out, so SDPA picks its flash kernel) and every candidate block follows in
one small pass on the prompts' KV cache. Same scores, prompt still computed once; measured 15% faster for the 8B
architecture on an H200, 1.3x on a 2-core CPU. The candidate pass folds its few query rows onto the grouped
key/value heads (lexfine.eval.grouped_attention) rather than copying the cache into every query head. Either strategy
can run through compiled decoder layers (`compiled_layers`), which share a few graphs however many layers there are.

On a GPU the host never waits for the device while it scores: inputs are copied from pinned memory, each batch's
scores are gathered on the device and copied out behind its kernels, and they are read only once the next batch is
queued (`score_cases(lookahead=1)`), so the GPU stays busy while Python builds the next batch.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from lexfine.eval.grouped_attention import grouped_candidate_attention

try:
    from transformers.cache_utils import DynamicLayer
except ImportError:  # a transformers without cache layers: every update goes through DynamicCache (a copy)
    DynamicLayer = None

# Attention implementations that accept a custom 4D mask; others (flash-attention) fall back to one row per candidate.
MASK_4D_IMPLEMENTATIONS = {"sdpa", "eager"}
CPU_MAX_BATCH_TOKENS = 4096


@dataclass
class Case:
    prompt: list[int]
    candidates: list[list[int]]  # token ids of each candidate answer (non-empty)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A host tensor on `device` without making the host wait: on a GPU, a copy from ordinary (pageable) memory
    synchronises the stream, so the host would sit idle until every queued kernel had run; from pinned memory the copy
    is queued like a kernel."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


class _Fetch:
    """One batch's scores (a device tensor, one value per (case, candidate)) on their way to the host: copied into
    pinned memory behind the batch's kernels, read once the copy is done. The host meanwhile queues the next batch,
    so the GPU never waits for the host's Python between batches."""

    def __init__(self, scores: torch.Tensor, batch: list[int], counts: list[int]):
        self.batch, self.counts = batch, counts
        self.event = None
        if scores.is_cuda:
            self.host = torch.empty(scores.shape, dtype=scores.dtype, pin_memory=True)
            self.host.copy_(scores, non_blocking=True)
            self.event = torch.cuda.Event()
            self.event.record()
        else:
            self.host = scores

    def rows(self) -> list[list[float]]:
        """The batch's scores, case by case (waits for this batch's copy only, not for later batches)."""
        if self.event is not None:
            self.event.synchronize()
        flat, out = self.host.tolist(), []
        for n in self.counts:
            out.append(flat[:n])
            flat = flat[n:]
        return out


def _block(candidates: list[list[int]]) -> tuple[list[int], list[int]]:
    """The input tokens after the prompt (every candidate but its last token) and each candidate's block offset."""
    block, offsets = [], []
    for c in candidates:
        offsets.append(len(block))
        block.extend(c[:-1])
    return block, offsets


def _attn_impl(model) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None) or "eager"


def _forward(model):
    """The transformers model's forward, under a PEFT wrapper if there is one."""
    return (model.get_base_model() if hasattr(model, "get_base_model") else model).forward


def _accepts(model, name: str) -> bool:
    try:
        return name in inspect.signature(_forward(model)).parameters
    except (TypeError, ValueError):
        return False


def _cache_kwarg(model) -> str:
    """The forward argument that takes a KV cache in this transformers version (lexfine.speed.cache_kwarg)."""
    from lexfine.speed import cache_kwarg

    return cache_kwarg(_forward(model))


def _for_model(mask: torch.Tensor, model) -> torch.Tensor:
    """A boolean attention mask (True = may attend) as the model's attention wants it: eager adds it to the scores."""
    if _attn_impl(model) != "eager":
        return mask
    dtype = next(model.parameters()).dtype
    return torch.where(mask, torch.tensor(0.0, dtype=dtype, device=mask.device),
                       torch.tensor(torch.finfo(dtype).min, dtype=dtype, device=mask.device))


def build_batch(cases: list[Case], pad_id: int, device):
    """Tensors for one forward pass: input_ids, position_ids, attention mask (2D or 4D) and the block width."""
    blocks = [_block(c.candidates) for c in cases]
    width = max(len(b) for b, _ in blocks)
    plen = max(len(c.prompt) for c in cases)
    total = plen + width
    s = plen - 1  # the column of every row's last prompt token
    bsz = len(cases)
    ids = torch.full((bsz, total), pad_id, dtype=torch.long)
    pos = torch.zeros((bsz, total), dtype=torch.long)
    seg = torch.full((bsz, total), -1, dtype=torch.long)  # -1 padding, 0 prompt, c + 1 candidate c
    for i, (case, (block, offsets)) in enumerate(zip(cases, blocks)):
        n_prompt = len(case.prompt)
        ids[i, plen - n_prompt:plen] = torch.tensor(case.prompt)
        pos[i, plen - n_prompt:plen] = torch.arange(n_prompt)
        seg[i, plen - n_prompt:plen] = 0
        for c, (cand, off) in enumerate(zip(case.candidates, offsets)):
            n = len(cand) - 1
            start = plen + off
            ids[i, start:start + n] = torch.tensor(cand[:-1], dtype=torch.long)
            pos[i, start:start + n] = torch.arange(n_prompt, n_prompt + n)
            seg[i, start:start + n] = c + 1
    ids, pos, seg = (to_device(t, device) for t in (ids, pos, seg))
    valid = seg >= 0
    if width == 0:
        return ids, pos, valid.long(), 0, s
    # 4D mask [B, 1, T, T], True = may attend, built on the device (a 4k x 4k mask per row is slow on the CPU):
    # causal, never into padding, and a key must be in the prompt or in the query's own candidate.
    ar = torch.arange(total, device=device)
    causal = ar[None, :, None] >= ar[None, None, :]
    same = (seg[:, None, :] == 0) | (seg[:, None, :] == seg[:, :, None])
    mask = causal & same & valid[:, None, :]
    mask |= torch.eye(total, dtype=torch.bool, device=device)[None] & ~valid[:, :, None]  # padding sees itself only
    return ids, pos, mask[:, None], width, s


def _logits_last(model, ids, pos, mask, keep: int) -> torch.Tensor:
    """Logits of the last `keep` columns only, through `logits_to_keep` when the model supports it."""
    if _accepts(model, "logits_to_keep"):
        out = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep, use_cache=False)
        logits = out.logits
        return logits[:, -keep:] if logits.shape[1] != keep else logits
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.logits[:, -keep:]


def _score_batch(model, cases: list[Case], pad_id: int, device) -> torch.Tensor:
    ids, pos, mask, width, _ = build_batch(cases, pad_id, device)
    if width:  # a 4D block mask (without a block, a plain 2D padding mask)
        mask = _for_model(mask, model)
    logp = torch.log_softmax(_logits_last(model, ids, pos, mask, width + 1).float(), dim=-1)
    picks = []
    for i, case in enumerate(cases):
        _, offsets = _block(case.candidates)
        for c, off in zip(case.candidates, offsets):
            # token 0 is predicted at the prompt's end (kept column 0); token j>=1 at kept column off + j
            picks.append((i, [0] + [off + j for j in range(1, len(c))], c))
    return _picked_sums(logp, picks, device)


def _picked_sums(logp: torch.Tensor, picks: list[tuple[int, list[int], list[int]]], device) -> torch.Tensor:
    """Sum of logp[row, col, token] over each pick's (col, token) pairs, one float32 per pick, all in one gather
    that stays on the device: no Python float() per candidate, so nothing makes the host wait for the GPU."""
    width = max(len(cols) for _, cols, _ in picks)
    rows = torch.zeros((len(picks), width), dtype=torch.long)
    cols = torch.zeros_like(rows)
    toks = torch.zeros_like(rows)
    valid = torch.zeros((len(picks), width), dtype=torch.bool)
    for k, (i, cs, ts) in enumerate(picks):
        rows[k] = i
        cols[k, :len(cs)] = torch.tensor(cs, dtype=torch.long)
        toks[k, :len(ts)] = torch.tensor(ts, dtype=torch.long)
        valid[k, :len(cs)] = True
    rows, cols, toks, valid = (to_device(t, device) for t in (rows, cols, toks, valid))
    return torch.where(valid, logp[rows, cols, toks], 0.0).sum(dim=1)


def _score_batch_cached(model, cases: list[Case], pad_id: int, device) -> torch.Tensor:
    """The same scores in two passes: the right-padded prompts with no mask at all (causal attention alone keeps
    padding out of real tokens, so SDPA can use its flash kernel), then every candidate block at once on top of the
    prompts' KV cache, with a small [B, 1, K, T + K] mask. The prompt is still computed once per case."""
    bsz = len(cases)
    lens = torch.tensor([len(c.prompt) for c in cases])
    plen = int(lens.max())
    ids = torch.full((bsz, plen), pad_id, dtype=torch.long)
    for i, case in enumerate(cases):
        ids[i, : len(case.prompt)] = torch.tensor(case.prompt)
    blocks = [_block(c.candidates) for c in cases]
    width = max(len(b) for b, _ in blocks)
    last = lens - 1
    cols = torch.unique(last)  # sorted; logits at each row's last prompt token only
    where = torch.searchsorted(cols, last)
    ids, cols, where, lens_d = (to_device(t, device) for t in (ids, cols, where, lens))
    kv = _cache_kwarg(model)
    out = model(input_ids=ids, logits_to_keep=cols, use_cache=width > 0,
                **{kv: CacheUpdatedOutsideGraphs(model.config) if width else None})
    first = torch.log_softmax(out.logits[torch.arange(bsz, device=device), where].float(), -1)
    starts = _picked_sums(first[:, None], [(i, [0], c[:1]) for i, case in enumerate(cases) for c in case.candidates],
                          device)
    if width == 0:
        return starts
    blk = torch.full((bsz, width), pad_id, dtype=torch.long)
    pos = torch.zeros((bsz, width), dtype=torch.long)
    seg = torch.full((bsz, width), -1, dtype=torch.long)
    for i, (case, (block, offsets)) in enumerate(zip(cases, blocks)):
        for c, (cand, off) in enumerate(zip(case.candidates, offsets)):
            n = len(cand) - 1
            blk[i, off:off + n] = torch.tensor(cand[:-1], dtype=torch.long)
            pos[i, off:off + n] = torch.arange(len(case.prompt), len(case.prompt) + n)
            seg[i, off:off + n] = c + 1
    blk, pos, seg = (to_device(t, device) for t in (blk, pos, seg))
    ar = torch.arange(width, device=device)
    own = (seg[:, None, :] == seg[:, :, None]) & (ar[None, None, :] <= ar[None, :, None]) & (seg[:, None, :] > 0)
    own |= torch.eye(width, dtype=torch.bool, device=device)[None] & (seg[:, :, None] < 0)
    prompt_keys = torch.arange(plen, device=device)[None, :] < lens_d[:, None]  # not the right padding
    mask = _for_model(torch.cat([prompt_keys[:, None, :].expand(bsz, width, plen), own], dim=-1)[:, None], model)
    cache = out.get("cache") if out.get("cache") is not None else out.get("past_key_values")
    out2 = model(input_ids=blk, position_ids=pos, attention_mask=mask, use_cache=True, logits_to_keep=width,
                 **{kv: cache})
    logp = torch.log_softmax(out2.logits.float(), -1)
    # a candidate's tokens after its first, predicted inside the block (a one-token candidate: nothing to add)
    rest = _picked_sums(logp, [(i, list(range(off, off + len(c) - 1)), c[1:])
                               for i, (case, (_, offsets)) in enumerate(zip(cases, blocks))
                               for c, off in zip(case.candidates, offsets)], device)
    return starts.double() + rest.double()


def _num_layers(config) -> int | None:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "num_hidden_layers", None)


class CacheUpdatedOutsideGraphs(DynamicCache):
    """A DynamicCache whose update runs eagerly, between compiled graphs, and that knows which layer calls it.

    Traced inside a compiled decoder layer, the update would index the cache by the layer's own `layer_idx`, a
    constant that gives every layer graphs of its own (two per layer: minutes of compilation for an 8B).
    compiled_layers() hides `layer_idx` (None in every layer) and this cache counts the calls instead: each forward
    pass updates every layer once, in order.

    A layer's first update (the prompt pass) keeps the states it is given: DynamicLayer would concatenate them onto
    an empty tensor, a copy of every layer's keys and values that took 5% of a batch's GPU time for the 8B with FP8
    matmuls (H200 profile, docs/performance.md). The candidate pass's update still concatenates (one copy)."""

    def __init__(self, config):
        super().__init__(config=config)
        self.n_layers = _num_layers(config)
        self.calls = 0

    @torch.compiler.disable
    def update(self, key_states, value_states, layer_idx=None, *args, **kwargs):
        if layer_idx is None:
            layer_idx = self.calls % self.n_layers
        self.calls += 1
        layers = getattr(self, "layers", None) or []
        layer = layers[layer_idx] if layer_idx < len(layers) else None
        if DynamicLayer is not None and type(layer) is DynamicLayer and not getattr(layer, "is_initialized", True):
            layer.keys, layer.values = key_states, value_states
            layer.dtype, layer.device = key_states.dtype, key_states.device
            layer.is_initialized = True
            return key_states, value_states
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)


@contextmanager
def compiled_layers(model, backend: str | None = None):
    """Score through torch.compile'd decoder layers (either strategy); yields how many layers were compiled.

    The layers share their graphs, a few in all however many layers there are (prompt and candidate pass, either
    side of the eager KV-cache update): their attention modules' `layer_idx` is None meanwhile (the cache counts
    layers itself, CacheUpdatedOutsideGraphs), and batches have at least 2 rows (score_cases), so that no graph is
    specialised to one row."""
    from lexfine.speed import compile_decoder_layers, decoder_layers, uncompile_decoder_layers

    backend = backend or ("inductor" if next(model.parameters()).device.type == "cuda" else "aot_eager")
    indexed = [m for layer in decoder_layers(model) for m in layer.modules()
               if isinstance(getattr(m, "layer_idx", None), int)]
    hidden = sorted(m.layer_idx for m in indexed) == list(range(_num_layers(model.config) or 0))
    saved = [(m, m.layer_idx) for m in indexed] if hidden else []
    for m, _ in saved:
        m.layer_idx = None
    n = compile_decoder_layers(model, backend=backend)  # compiled without "duck sizing" (lexfine.speed): a batch
    try:                                                # of as many rows as there are heads stays its own size
        yield n
    finally:
        uncompile_decoder_layers(model)
        for m, idx in saved:
            m.layer_idx = idx


def _score_expanded(model, cases: list[Case], pad_id: int, device) -> torch.Tensor:
    """One row per (case, candidate): for attention kernels that take no 4D mask. Correct, but the prompt repeats."""
    flat = [Case(case.prompt + c[:-1], [c]) for case in cases for c in case.candidates]
    plen = max(len(r.prompt) for r in flat)
    ids = torch.full((len(flat), plen), pad_id, dtype=torch.long)
    pos = torch.zeros_like(ids)
    att = torch.zeros_like(ids)
    for i, r in enumerate(flat):
        p0 = plen - len(r.prompt)
        ids[i, p0:] = torch.tensor(r.prompt)
        pos[i, p0:] = torch.arange(len(r.prompt))
        att[i, p0:] = 1
    keep = max(len(r.candidates[0]) for r in flat)
    ids, pos, att = (to_device(t, device) for t in (ids, pos, att))
    logp = torch.log_softmax(_logits_last(model, ids, pos, att, keep).float(), -1)
    return _picked_sums(logp, [(i, list(range(keep - len(r.candidates[0]), keep)), r.candidates[0])
                               for i, r in enumerate(flat)], device)


def length_batches(lengths: list[int], batch_size: int, max_tokens: int | None = None) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first: at most `batch_size` rows and, with
    `max_tokens`, at most that many padded tokens (so that short cases travel in larger batches)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for i in order:
        b = batches[-1] if batches else None
        if b is None or len(b) >= batch_size or (max_tokens and (len(b) + 1) * lengths[b[0]] > max_tokens):
            batches.append([i])
        else:
            b.append(i)
    return batches


def default_token_cap(device) -> int | None:
    """Padded tokens per batch when the caller sets no cap. A CPU gains nothing from batching long rows, and padding
    them to the batch's longest is pure waste: capping them doubled SJP scoring speed there (237 -> 504 tokens/s)."""
    return CPU_MAX_BATCH_TOKENS if device.type == "cpu" else None


def score_cases(model, cases: list[Case], batch_size: int = 8, pad_id: int = 0, progress: bool = True,
                desc: str = "scoring", n_batches_min: int | None = None,
                max_batch_tokens: int | None = None, strategy: str = "auto", min_rows: int = 1,
                lookahead: int = 1, timing: dict | None = None) -> list[list[float]]:
    """Summed log-probability of every candidate of every case, in input order.

    strategy: packed (one pass, 4D mask: sdpa, eager), cached (prompt pass without mask + candidate pass on its KV
    cache: any attention kernel), expanded (one row per candidate: the slow reference); auto picks.

    `n_batches_min` pads the loop with repeated batches (results dropped) so that every data-parallel rank runs the
    same number of forward passes, which sharded models (ZeRO-3, FSDP) require. `min_rows` repeats a smaller
    batch's last case up to that many rows (results dropped): compiled layers then need no graphs for one row.

    Nothing in a batch makes the host wait for the GPU (pinned copies in, scores gathered on the device and copied
    out behind the kernels), and a batch's scores are read only after the next `lookahead` batches are queued: on a
    GPU the host builds and queues batch n + 1 while batch n runs. `lookahead=0` reads every batch before queueing
    the next (the GPU idles while the host works; for comparisons).

    `timing`, a dict, receives `first_batch_s`: seconds from the call to the first batch's scores (compilation
    included; on a GPU, read once the next `lookahead` batches are queued, which the host does while it runs).
    """
    from tqdm.auto import tqdm

    if not cases:
        return []
    device = next(model.parameters()).device
    if strategy == "auto":
        # The maskless prompt pass lets SDPA use its fastest kernel: 15% more tokens/s than packed for the 8B Apertus
        # on an H200, 1.3x on a 2-core CPU with SmolLM2 at ~1.2k tokens (benchmarks/eval_speed.py, 2026-11-23).
        strategy = "cached"
    if strategy in ("packed", "cached") and _attn_impl(model) not in MASK_4D_IMPLEMENTATIONS:
        # flash-attention ignores a custom 4D mask: candidates would see each other. One row per candidate instead.
        strategy = "expanded"
    if max_batch_tokens is None:
        max_batch_tokens = default_token_cap(device)
    fn = {"packed": _score_batch, "cached": _score_batch_cached, "expanded": _score_expanded}[strategy]
    lengths = [len(c.prompt) + len(_block(c.candidates)[0]) for c in cases]
    batches = length_batches(lengths, batch_size, max_batch_tokens)
    extra = max(0, (n_batches_min or 0) - len(batches))
    results: list[list[float] | None] = [None] * len(cases)
    window = profile_window(desc)
    tokens = 0
    queued: deque[_Fetch] = deque()

    started = time.perf_counter()

    def collect(fetch: _Fetch) -> None:
        for i, s in zip(fetch.batch, fetch.rows()):
            results[i] = s
        if timing is not None and "first_batch_s" not in timing:
            timing["first_batch_s"] = round(time.perf_counter() - started, 3)

    ctx = torch.no_grad() if _distributed() else torch.inference_mode()  # sharded engines modify params in place
    # the candidate pass attends to the prompts' cache with a mask: fold its few query rows onto the grouped
    # key/value heads instead of copying the cache into every query head (lexfine.eval.grouped_attention)
    grouped = grouped_candidate_attention(model) if strategy == "cached" else nullcontext()
    with ctx, grouped:
        for n, b in enumerate(tqdm(batches + batches[-1:] * extra, desc=desc, unit="batch", disable=not progress,
                                   leave=False), 1):
            rows = [cases[i] for i in b]
            if window:
                window.begin(n, tokens)
            flat = fn(model, rows + rows[-1:] * (min_rows - len(rows)), pad_id, device)
            queued.append(_Fetch(flat, b if n <= len(batches) else [],  # repeated batches: results dropped
                                 [len(c.candidates) for c in rows]))
            if timing is not None and n == 1 and not flat.is_cuda:  # computed already (a GPU's is read below)
                timing["first_batch_s"] = round(time.perf_counter() - started, 3)
            while len(queued) > lookahead:
                collect(queued.popleft())
            if window:
                tokens += sum(lengths[i] for i in b)
                window.end(n, tokens, force=n == len(batches) + extra)
        while queued:
            collect(queued.popleft())
    if window and not window.done:
        import logging

        logging.getLogger("lexfine.eval").warning("LEXFINE_EVAL_PROFILE: %s ran %d batches, none of them batch %d; "
                                                  "nothing profiled", desc, len(batches) + extra, window.first)
    return results  # type: ignore[return-value]


def profile_window(desc: str):
    """`LEXFINE_EVAL_PROFILE=FIRST-LAST`: torch.profiler over those scoring batches (1-based, in the longest-first
    order they run), written to `$LEXFINE_EVAL_PROFILE_DIR/<desc>/` (default ./lexfine-eval-profile/; lexfine.profiling
    says what is in it; a later scoring call for the same task, e.g. the next evaluation during training, writes
    over it). Unset: None."""
    import os
    import re

    spec = os.environ.get("LEXFINE_EVAL_PROFILE")
    if not spec or (_distributed() and torch.distributed.get_rank() != 0):  # one writer: rank 0
        return None
    m = re.fullmatch(r"\s*(\d+)\s*-\s*(\d+)\s*", spec)
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        from lexfine.errors import LexfineError

        raise LexfineError(f"LEXFINE_EVAL_PROFILE={spec!r}: give FIRST-LAST scoring batches (1 <= FIRST <= LAST), "
                           "e.g. 5-8, or unset it")
    from pathlib import Path

    from lexfine.profiling import ProfileWindow

    root = Path(os.environ.get("LEXFINE_EVAL_PROFILE_DIR") or "lexfine-eval-profile")
    return ProfileWindow(root / re.sub(r"[^A-Za-z0-9_.-]+", "_", desc), int(m[1]), int(m[2]))


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1


def predict(scores: list[float], labels: list[str]) -> str:
    """The label with the highest score (first on ties, deterministic)."""
    best = max(range(len(scores)), key=lambda i: (scores[i], -i))
    return labels[best]
