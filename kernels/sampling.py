"""Drafter sampling: the distribution actually sampled from, and one draw from it.

Maths (speculative sampling, Leviathan et al. 2023, arXiv 2211.17192; the
filters follow transformers' logits warpers so that "top-k/top-p applied to both
models as the papers do" means exactly what ``model.generate`` samples from):

    z      = logits / T, and -inf where ``mask`` is False   (T > 0)
    top-k: keep z_v >= the k-th largest z                  (ties kept; k = 0 keeps all)
    top-p: sort softmax(z) ascending, drop the tokens whose cumulative mass is
           <= 1 - top_p, always keeping the most likely one (as transformers:
           among equal z the order is torch.sort's, which is unspecified; the
           kernel uses ascending ids, so the same number of them is dropped)
    q      = softmax(z restricted to the kept tokens)       (fp32)

One draw uses the exponential race: with ``E_v ~ Exp(1)`` i.i.d.,
``argmax_v q_v / E_v`` is distributed as ``q``. The noise is an argument, so a
draw is reproducible and the same noise gives the same token on every backend.
Greedy decoding (``T == 0``) is ``argmax z`` (first maximum) with ``q`` one-hot there.

The kept set is a threshold: ``{v : z_v > t} ∪ {v : z_v == t, v >= c}``. With
``m = max z``, ``w_v = exp(z_v - m)`` and ``Z_k`` the mass of the top-k set,
``t_k`` is the largest ``x`` with ``#{z >= x} >= k``; top-p keeps ``v`` iff
``sum_{u: z_u > z_v} w_u < top_p Z_k`` (tie-inclusive), which gives ``t``; of
the group ``z == t`` the sort then drops the ``d`` tokens (the kernel: the ``d``
lowest ids) whose cumulative mass, one tie at a time, stays <= ``(1 - top_p) Z_k``
(``c`` is the id after the d-th). ``q_v = w_v / Z`` on the kept set, ``Z`` its mass.

The Triton kernel (``sample_triton``) splits each row over ``splits`` programs
(grid ``[rows, splits]``, ``splits = min(blocks, ceil(4 SMs / rows))``, each a
chunk of whole blocks) and runs in passes over the vocabulary:

1. ``_stats_kernel``: an online softmax per chunk (running max, rescaled sum);
   greedy instead writes the zero probabilities and the chunk's argmax.
2. ``_threshold_kernel`` (top-k/top-p only, one program per row): a search for
   ``t`` on order-preserving int keys of ``z`` (the idea of FlashInfer's pivot
   samplers, made exact): each pass counts, sums and bounds the keys of the
   bracket in 16 equal key buckets and narrows the bracket to the one bucket
   holding the answer, snapped to its smallest and largest key. At most 8 passes
   per search (2^32 keys / 16^8), usually 3-5; top-k and top-p are one search
   each, and a top-p boundary inside a group of equal logits adds one search over
   ids (at most 5 passes at V = 262144).
3. ``_probs_kernel``: writes ``q`` and each chunk's race winner (reads the logits
   again, mostly from L2, and the noise).
4. ``_finish_kernel`` (one program per row): the first winner over the chunks;
   greedy writes the 1 of the one-hot row.

So greedy is one read of the logits plus the write of ``q``; temperature
sampling reads the logits twice, the noise once and writes ``q``; the filters
add 1-21 row passes (typically 3-10) in a single program per row.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

__all__ = ["nonfinite_rows_reference", "sample_reference", "sample_triton", "sampling_probs_reference"]


def sampling_probs_reference(
    logits: torch.Tensor,  # [rows, vocab]
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
) -> torch.Tensor:  # [rows, vocab] fp32
    """The normalised distribution sampled from: mask, temperature, top-k, top-p (one-hot if T == 0)."""
    z = logits.float()
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
    if temperature == 0.0:
        # scatter, not one_hot: one_hot checks its indices on the host
        return torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
    z = z / temperature
    if 0 < top_k < z.shape[-1]:
        kth = torch.topk(z, top_k, dim=-1).values[..., -1:]
        z = z.masked_fill(z < kth, float("-inf"))
    if top_p < 1.0:
        sorted_z, order = torch.sort(z, dim=-1, descending=False)
        cumulative = sorted_z.softmax(-1).cumsum(-1)
        drop_sorted = cumulative <= 1 - top_p
        drop_sorted[..., -1] = False
        z = z.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    return z.softmax(-1)


def sample_reference(
    logits: torch.Tensor,  # [rows, vocab]
    noise: torch.Tensor | None,  # [rows, vocab] Exp(1) draws; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [rows] int64, probs [rows, vocab] fp32
    """Sample one token per row from ``sampling_probs_reference``; returns the ids and the distribution."""
    probs = sampling_probs_reference(logits, temperature, top_k, top_p, mask)
    if temperature == 0.0:
        return probs.argmax(-1), probs
    return (probs / noise).argmax(-1), probs


def nonfinite_rows_reference(logits: torch.Tensor) -> torch.Tensor:  # logits [..., vocab] -> [...] bool
    """Rows a sampler cannot use: any NaN or +inf, or every entry -inf."""
    bad = torch.isnan(logits) | torch.isposinf(logits)
    return bad.any(-1) | torch.isneginf(logits).all(-1)


# ---------------------------------------------------------------------------------------------- Triton

_BUCKETS = 16  # keys per search pass: a pass narrows the bracket 16-fold
_BIG = tl.constexpr(2**40)  # above every key (keys are int32 values held in int64)


@triton.jit
def _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK: tl.constexpr):
    """z = logits / T (IEEE division, as torch), -inf past the row and where the mask disallows."""
    inside = offs < vocab
    x = tl.load(row_logits + offs, mask=inside, other=float("-inf")).to(tl.float32)
    z = tl.math.div_rn(x, temperature)
    if HAS_MASK:
        allowed = tl.load(mask_ptr + offs, mask=inside, other=0) != 0
        z = tl.where(allowed, z, float("-inf"))
    return z


@triton.jit
def _key(z):
    """Order-preserving int key of fp32 ``z`` (-0 and +0 share a key), as int64."""
    bits = tl.where(z == 0.0, 0.0, z).to(tl.int32, bitcast=True)
    return (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.int64)


@triton.jit
def _search(
    row_logits,
    mask_ptr,
    vocab,
    temperature,
    m,
    lo,
    hi,
    goal,
    tie_key,
    MODE: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    BUCKETS: tl.constexpr,
):
    """Bracket search over int keys in [lo, hi] (the answer lies there); returns (key, count, mass, mass above).

    MODE 0: the largest key x with #{key >= x} >= goal (keys of z: top-k);
    MODE 1: the smallest key x with mass{key > x} < goal (keys of z, mass w = exp(z - m): top-p);
    MODE 2: as MODE 0 over the keys -id of the tokens whose z has key ``tie_key`` (the tie cut).
    ``count`` and ``mass`` are those of the tokens at the answer's key, ``mass above`` of those above it.
    """
    bucket = tl.arange(0, BUCKETS)
    n_above = tl.zeros((), tl.int64)
    mass_above = tl.zeros((), tl.float32)
    n = tl.zeros((), tl.int64)
    s = tl.zeros((), tl.float32)
    searching = lo <= hi
    while searching:
        span = hi - lo + 1
        n_b = tl.zeros((BUCKETS,), tl.int64)
        s_b = tl.zeros((BUCKETS,), tl.float32)
        min_b = tl.full((BUCKETS,), _BIG, tl.int64)
        max_b = tl.full((BUCKETS,), -_BIG, tl.int64)
        for start in range(0, vocab, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            key = _key(z)
            if MODE == 2:
                chosen = (key == tie_key) & (offs < vocab)
                key = -offs.to(tl.int64)
            else:
                chosen = offs < vocab
            chosen = chosen & (key >= lo) & (key <= hi)
            hit = chosen[:, None] & ((((key - lo) * BUCKETS) // span)[:, None] == bucket[None, :])
            n_b += tl.sum(hit.to(tl.int64), 0)
            if MODE != 2:
                s_b += tl.sum(tl.where(hit, tl.exp(z - m)[:, None], 0.0), 0)
            min_b = tl.minimum(min_b, tl.min(tl.where(hit, key[:, None], _BIG), 0))
            max_b = tl.maximum(max_b, tl.max(tl.where(hit, key[:, None], -_BIG), 0))
        n_prefix = tl.cumsum(n_b, 0)
        s_prefix = tl.cumsum(s_b, 0)
        n_gt = n_above + tl.sum(tl.where(bucket == BUCKETS - 1, n_prefix, 0), 0) - n_prefix  # above max_b
        s_gt = mass_above + tl.sum(tl.where(bucket == BUCKETS - 1, s_prefix, 0.0), 0) - s_prefix
        if MODE == 1:
            pick = tl.min(tl.where((n_b > 0) & (s_gt < goal), bucket, BUCKETS), 0)
        else:
            pick = tl.max(tl.where((n_b > 0) & (n_gt + n_b >= goal), bucket, -1), 0)
        picked = bucket == pick
        lo = tl.sum(tl.where(picked, min_b, 0), 0)
        hi = tl.sum(tl.where(picked, max_b, 0), 0)
        n = tl.sum(tl.where(picked, n_b, 0), 0)
        s = tl.sum(tl.where(picked, s_b, 0.0), 0)
        n_above = tl.sum(tl.where(picked, n_gt, 0), 0)
        mass_above = tl.sum(tl.where(picked, s_gt, 0.0), 0)
        searching = lo < hi
    return lo, n, s, mass_above


@triton.jit
def _row_max_sum(part_m, part_z, row, splits, SPLITS_P2: tl.constexpr):
    """Combine the chunks' online-softmax partials of one row: (max, sum of exp(z - max))."""
    offs = tl.arange(0, SPLITS_P2)
    inside = offs < splits
    chunk_m = tl.load(part_m + row * splits + offs, mask=inside, other=float("-inf"))
    chunk_z = tl.load(part_z + row * splits + offs, mask=inside, other=0.0)
    m = tl.max(chunk_m, 0)
    scale = tl.where(chunk_m == float("-inf"), 0.0, tl.exp(chunk_m - m))
    return m, tl.sum(chunk_z * scale, 0)


@triton.jit
def _stats_kernel(
    logits_ptr,  # [rows, vocab] fp32/bf16/fp16
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    probs_ptr,  # [rows, vocab] fp32, zeroed here when GREEDY
    part_m_ptr,  # [rows, splits] fp32: chunk max
    part_aux_ptr,  # [rows, splits]: sum of exp(z - chunk max) fp32, or the chunk argmax int64 (GREEDY)
    vocab,
    stride_logits,
    stride_probs,
    temperature,
    chunk,
    GREEDY: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    row_logits = logits_ptr + row * stride_logits
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    m = tl.full((), float("-inf"), tl.float32)
    if GREEDY:
        best = begin.to(tl.int64)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            tl.store(probs_ptr + row * stride_probs + offs, tl.zeros((BLOCK,), tl.float32), mask=offs < end)
            block_m = tl.max(z, 0)
            best = tl.where(block_m > m, start + tl.argmax(z, 0).to(tl.int64), best)
            m = tl.maximum(m, block_m)
        tl.store(part_aux_ptr + row * splits + split, best)
    else:
        total = tl.zeros((), tl.float32)
        for start in range(begin, end, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
            new_m = tl.maximum(m, tl.max(z, 0))
            safe_m = tl.where(new_m == float("-inf"), 0.0, new_m)
            total = total * tl.exp(m - safe_m) + tl.sum(tl.exp(z - safe_m), 0)
            m = new_m
        tl.store(part_aux_ptr + row * splits + split, total)
    tl.store(part_m_ptr + row * splits + split, m)


@triton.jit
def _threshold_kernel(
    logits_ptr,  # [rows, vocab]
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    part_m_ptr,  # [rows, splits] fp32
    part_z_ptr,  # [rows, splits] fp32
    row_z_ptr,  # [rows] fp32 out: mass of the kept set, relative to exp(max z)
    row_t_ptr,  # [rows] fp32 out: threshold t
    row_c_ptr,  # [rows] int64 out: first kept id among z == t
    vocab,
    stride_logits,
    temperature,
    top_k,
    top_p,
    splits,
    SPLITS_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_P: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
    BUCKETS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_logits = logits_ptr + row * stride_logits
    m, norm = _row_max_sum(part_m_ptr, part_z_ptr, row, splits, SPLITS_P2)
    lo = _key(tl.full((), float("-inf"), tl.float32))
    hi = _key(m)
    t = lo
    cut = tl.zeros((), tl.int64)
    if TOP_K:
        t, n, s, mass_above = _search(
            row_logits, mask_ptr, vocab, temperature, m, lo, hi, top_k, 0, 0, HAS_MASK, BLOCK, BUCKETS
        )
        norm = mass_above + s
        lo = t
    if TOP_P:
        t, n, s, mass_above = _search(
            row_logits, mask_ptr, vocab, temperature, m, lo, hi, top_p * norm, 0, 1, HAS_MASK, BLOCK, BUCKETS
        )
        # Of the n tokens at t, the sort drops d (here the lowest ids) while their mass stays <= (1 - p) Z.
        below = norm - mass_above - s
        each = s / n.to(tl.float32)
        drop = tl.floor(((1.0 - top_p) * norm - below) / each).to(tl.int64)
        drop = tl.minimum(tl.maximum(drop, 0), n - 1)
        if drop > 0:
            neg_id, _, _, _ = _search(
                row_logits, mask_ptr, vocab, temperature, m, (1 - vocab).to(tl.int64), tl.zeros((), tl.int64),
                drop, t, 2, HAS_MASK, BLOCK, BUCKETS,
            )  # fmt: skip
            cut = 1 - neg_id
        norm = mass_above + s * (n - drop).to(tl.float32) / n.to(tl.float32)
    bits = t.to(tl.int32)
    tl.store(row_t_ptr + row, (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(tl.float32, bitcast=True))
    tl.store(row_c_ptr + row, cut)
    tl.store(row_z_ptr + row, norm)


@triton.jit
def _probs_kernel(
    logits_ptr,  # [rows, vocab]
    mask_ptr,  # [vocab] uint8 (HAS_MASK)
    noise_ptr,  # [rows, vocab] fp32 Exp(1)
    probs_ptr,  # [rows, vocab] fp32 out
    part_m_ptr,  # [rows, splits] fp32
    part_z_ptr,  # [rows, splits] fp32
    row_z_ptr,  # [rows] fp32 (FILTERED)
    row_t_ptr,  # [rows] fp32 (FILTERED)
    row_c_ptr,  # [rows] int64 (FILTERED)
    win_val_ptr,  # [rows, splits] fp32 out: the chunk's best q / E
    win_id_ptr,  # [rows, splits] int64 out: its id
    vocab,
    stride_logits,
    stride_noise,
    stride_probs,
    temperature,
    chunk,
    splits,
    SPLITS_P2: tl.constexpr,
    FILTERED: tl.constexpr,
    HAS_MASK: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    row_logits = logits_ptr + row * stride_logits
    m, norm = _row_max_sum(part_m_ptr, part_z_ptr, row, splits, SPLITS_P2)
    if FILTERED:
        norm = tl.load(row_z_ptr + row)
        t = tl.load(row_t_ptr + row)
        cut = tl.load(row_c_ptr + row)
    inv_norm = 1.0 / norm
    begin = split * chunk
    end = tl.minimum(begin + chunk, vocab)
    best = tl.full((), -1.0, tl.float32)
    best_id = begin.to(tl.int64)
    for start in range(begin, end, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        inside = offs < end
        z = _load_z(row_logits, mask_ptr, offs, vocab, temperature, HAS_MASK)
        q = tl.exp(z - m) * inv_norm
        if FILTERED:
            q = tl.where((z > t) | ((z == t) & (offs >= cut)), q, 0.0)
        tl.store(probs_ptr + row * stride_probs + offs, q, mask=inside)
        noise = tl.load(noise_ptr + row * stride_noise + offs, mask=inside, other=1.0)
        race = tl.where(inside, q / noise, -1.0)
        block_best = tl.max(race, 0)
        best_id = tl.where(block_best > best, start + tl.argmax(race, 0).to(tl.int64), best_id)
        best = tl.maximum(best, block_best)
    tl.store(win_val_ptr + row * splits + split, best)
    tl.store(win_id_ptr + row * splits + split, best_id)


@triton.jit
def _finish_kernel(
    win_val_ptr,  # [rows, splits] fp32
    win_id_ptr,  # [rows, splits] int64
    ids_ptr,  # [rows] int64 out
    probs_ptr,  # [rows, vocab] fp32: the 1 of the one-hot row is written when ONE_HOT
    stride_probs,
    splits,
    SPLITS_P2: tl.constexpr,
    ONE_HOT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, SPLITS_P2)
    inside = offs < splits
    val = tl.load(win_val_ptr + row * splits + offs, mask=inside, other=float("-inf"))
    win = tl.load(win_id_ptr + row * splits + offs, mask=inside, other=0)
    best = tl.sum(tl.where(offs == tl.argmax(val, 0), win, 0), 0)  # the first chunk wins ties
    tl.store(ids_ptr + row, best)
    if ONE_HOT:
        tl.store(probs_ptr + row * stride_probs + best, 1.0)


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def sample_triton(
    logits: torch.Tensor,  # [rows, vocab] fp32/bf16/fp16
    noise: torch.Tensor | None,  # [rows, vocab] fp32 Exp(1) draws; unused when greedy
    temperature: float,
    top_k: int,
    top_p: float,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = allowed
    *,
    block: int = 1024,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [rows] int64, probs [rows, vocab] fp32
    """``sample_reference`` in Triton (see the module docstring); ``block`` is the tile of the vocabulary."""
    rows, vocab = logits.shape
    device = logits.device
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    greedy = temperature == 0.0
    if not greedy and noise.stride(-1) != 1:
        noise = noise.contiguous()
    probs = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    ids = torch.empty(rows, dtype=torch.int64, device=device)
    blocks = triton.cdiv(vocab, block)
    chunk = triton.cdiv(blocks, min(blocks, max(1, triton.cdiv(_target_programs(device), rows)))) * block
    splits = triton.cdiv(vocab, chunk)
    splits_p2 = triton.next_power_of_2(splits)
    has_mask = mask is not None
    mask_arg = mask.view(torch.uint8) if has_mask else logits
    grid = (rows, splits)

    part_m = torch.empty(rows, splits, dtype=torch.float32, device=device)
    part_aux = torch.empty(rows, splits, dtype=torch.int64 if greedy else torch.float32, device=device)
    _stats_kernel[grid](
        logits, mask_arg, probs, part_m, part_aux, vocab, logits.stride(0), probs.stride(0),
        1.0 if greedy else temperature, chunk, GREEDY=greedy, HAS_MASK=has_mask, BLOCK=block,
    )  # fmt: skip
    if greedy:
        _finish_kernel[(rows,)](
            part_m, part_aux, ids, probs, probs.stride(0), splits, splits_p2, ONE_HOT=True
        )
        return ids, probs

    top_k_on = 0 < top_k < vocab
    filtered = top_k_on or top_p < 1.0
    row_z = torch.empty(rows, dtype=torch.float32, device=device)
    row_t = torch.empty(rows, dtype=torch.float32, device=device)
    row_c = torch.empty(rows, dtype=torch.int64, device=device)
    if filtered:
        _threshold_kernel[(rows,)](
            logits, mask_arg, part_m, part_aux, row_z, row_t, row_c, vocab, logits.stride(0), temperature,
            top_k, top_p, splits, splits_p2, TOP_K=top_k_on, TOP_P=top_p < 1.0, HAS_MASK=has_mask,
            BLOCK=min(block, 256), BUCKETS=_BUCKETS, num_warps=8,
        )  # fmt: skip
    win_val = torch.empty(rows, splits, dtype=torch.float32, device=device)
    win_id = torch.empty(rows, splits, dtype=torch.int64, device=device)
    _probs_kernel[grid](
        logits, mask_arg, noise, probs, part_m, part_aux, row_z, row_t, row_c, win_val, win_id, vocab,
        logits.stride(0), noise.stride(0), probs.stride(0), temperature, chunk, splits, splits_p2,
        FILTERED=filtered, HAS_MASK=has_mask, BLOCK=block,
    )  # fmt: skip
    _finish_kernel[(rows,)](win_val, win_id, ids, probs, probs.stride(0), splits, splits_p2, ONE_HOT=False)
    return ids, probs
