"""Public ops: the numeric work of a decoding round that has a kernel, or a reference beside one.

Each op checks metadata (shape, dtype, device; never values, which would
synchronise a GPU) and then runs its implementation from
``omnidraft_fast.kernels``: the Triton kernel where :func:`runs_kernels` says so
(CUDA tensors), else the torch reference of the same signature, which defines the op.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch

from .kernels.cascade import RULE_IDS
from .kernels.commit import commit_drafter_reference, commit_reference
from .kernels.lookup import lookup_reference, lookup_triton
from .kernels.match import match_reference, match_triton
from .kernels.ngram import (
    ngram_insert_reference,
    ngram_insert_triton,
    ngram_lookup_reference,
    ngram_lookup_triton,
)
from .kernels.proposal import CrossProposal
from .kernels.sampling import MIN_TEMPERATURE, nonfinite_rows_reference, sample_reference, sample_triton
from .kernels.translate import (
    split_reference,
    translate_ngram_reference,
    translate_reference,
    translate_triton,
)
from .kernels.verify import verify_reference, verify_triton

__all__ = [
    "commit",
    "commit_drafter",
    "lookup",
    "ngram_insert",
    "ngram_lookup",
    "nonfinite_rows",
    "sample",
    "translate",
    "verify",
]


def runs_kernels(tensor: torch.Tensor) -> bool:
    """Whether an op on ``tensor`` runs its Triton kernel (CUDA tensors) rather than its torch reference.
    Tests replace it to run the kernels on CPU tensors under ``TRITON_INTERPRET=1``."""
    return tensor.is_cuda


def _check(name: str, tensor: torch.Tensor, ndim: int, *, dtypes=None, device=None) -> None:
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"`{name}` must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {tuple(tensor.shape)}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise TypeError(f"`{name}` must have dtype in {[str(d) for d in dtypes]}, got {tensor.dtype}")
    if device is not None and tensor.device != device:
        raise ValueError(f"`{name}` is on {tensor.device}, expected {device}")


def _check_sampling(temperature: float, top_k: int, top_p: float) -> None:
    if not (temperature == 0 or temperature >= MIN_TEMPERATURE):  # NaN too
        raise ValueError(
            f"`temperature` must be 0 (greedy) or >= {MIN_TEMPERATURE:g} (logits / temperature overflows fp32 "
            f"below it), got {temperature}"
        )
    if top_k < 0:
        raise ValueError(f"`top_k` must be >= 0 (0 = off), got {top_k}")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p}")


_FLOATS = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def sample(
    logits: torch.Tensor,  # [rows, vocab]
    noise: torch.Tensor | None,  # [rows, vocab] Exp(1); None when greedy
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    mask: torch.Tensor | None = None,  # [vocab] bool, True = may be sampled
    probs: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Draw one token per row; returns ``ids`` [rows] int64 and the sampled-from distribution [rows, vocab] fp32.

    ``temperature == 0`` is greedy (argmax, one-hot distribution). ``mask`` restricts the draw to the
    allowed tokens (as if the others' logits were -inf); at least one must be allowed. ``probs=False``
    draws the same ids and returns None for the distribution, which is then neither allocated nor written
    (greedy: the argmax alone).

    Example::

        >>> logits = torch.tensor([[0.0, 5.0, 1.0]])
        >>> ids, q = sample(logits, None, temperature=0.0)
        >>> ids.tolist(), q.tolist()
        ([1], [[0.0, 1.0, 0.0]])
        >>> sample(logits, None, temperature=0.0, probs=False)
        (tensor([1]), None)
    """
    _check("logits", logits, 2, dtypes=_FLOATS)
    _check_sampling(temperature, top_k, top_p)
    if temperature > 0:
        if noise is None:
            raise ValueError("`noise` (Exp(1) draws shaped like `logits`) is required when temperature > 0")
        _check("noise", noise, 2, dtypes=(torch.float32,), device=logits.device)
        if noise.shape != logits.shape:
            raise ValueError(
                f"`noise` must have the shape of `logits` {tuple(logits.shape)}, got {tuple(noise.shape)}"
            )
    if mask is not None:
        _check("mask", mask, 1, dtypes=(torch.bool,), device=logits.device)
        if mask.shape[0] != logits.shape[1]:
            raise ValueError(
                f"`mask` must have one entry per vocabulary id ({logits.shape[1]}), got {mask.shape[0]}"
            )
    if not isinstance(probs, bool):
        raise TypeError(f"`probs` must be a bool (False: ids only), got {type(probs).__name__}")
    if runs_kernels(logits) and math.isfinite(temperature):  # as verify(): T = inf on the reference
        return sample_triton(logits, noise, temperature, top_k, top_p, mask, probs=probs)
    return sample_reference(logits, noise, temperature, top_k, top_p, mask, probs=probs)


def verify(
    target_logits: torch.Tensor,  # [batch, k+1, V_t]
    draft_ids: torch.Tensor,  # [batch, k] target ids
    draft_probs: torch.Tensor | None,  # [batch, k, V_q]; None with exact_match
    uniforms: torch.Tensor,  # [batch, k]
    noise: torch.Tensor | None,  # [batch, V_t]
    *,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    rule: torch.Tensor | None = None,  # [batch] int64
    alpha: torch.Tensor | None = None,  # [batch] fp32
    draft_probs_t1: torch.Tensor | None = None,  # [batch, k, V_q]
    cross: CrossProposal | None = None,
    exact_match: bool = False,
    rules: Collection[int] | None = None,  # the rule ids `rule` holds
    support_only: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Speculative sampling of a drafted block against a deferral rule (maths in ``kernels/verify.py``).

    ``draft_probs`` is the distribution each draft was sampled from: over the target vocabulary
    (``V_q = V_t``), or, with ``cross``, over the drafter's (``V_q = V_d``, twins folded) and read into
    the target vocabulary as ``kernels/proposal.py`` defines. ``draft_ids`` may hold -1 where nothing was
    proposed (ragged drafts). ``rule``/``alpha`` pick a deferral rule per row (``kernels/cascade.py``'s
    ``RULES``; None: exact speculative sampling); the rules read ``draft_probs_t1``, the drafter's
    ``T = 1`` distribution (None: ``draft_probs``). ``exact_match=True`` verifies by exact match against
    draws from ``p`` (``kernels/match.py``: lossless for any proposal; ``draft_probs`` and ``uniforms``
    unused, ``noise`` [batch, k+1, V_t], ``accept_probs`` the target's ``p_j(y_j)``, every draft deferred).
    ``rules``, with ``rule``, promises the rule ids ``rule`` holds (a request's one rule, say): the torch
    reference then computes only those, also where it cannot read them off ``rule`` (a CUDA tensor, a
    captured stage); the kernel computes each row's own rule anyway. The outputs do not depend on it.
    ``support_only=True`` (with ``rule``) restricts ``q`` and its ``T = 1`` law to the tokens whose target
    logits are finite at each position (the logits processors' support; a draft elsewhere counts as nothing
    proposed): a cascade across vocabularies then keeps no token the processors forbid
    (``kernels/verify.py``).

    Returns ``num_accepted`` [batch] int64, ``output_tokens`` [batch, k+1] int64 (-1 padded; the
    recovered or bonus token follows the accepted ones), ``accept_probs`` [batch, k] fp32, ``deferred``
    [batch, k] bool and ``invalid`` [batch, k+1] bool (positions whose target logits hold NaN/+inf or are all
    -inf; what they emit is not a draw from anything, so a position that counts must be valid: the rounds
    count those whose token they keep).
    """
    _check("target_logits", target_logits, 3, dtypes=_FLOATS)
    device = target_logits.device
    batch, width, vocab = target_logits.shape
    k = width - 1
    _check("draft_ids", draft_ids, 2, dtypes=(torch.int64,), device=device)
    if draft_ids.shape != (batch, k):
        raise ValueError(f"`draft_ids` must be [batch, k] = {(batch, k)}, got {tuple(draft_ids.shape)}")
    if cross is not None:
        vocab_q = cross.d2t.shape[0]
        _check("cross.t2d", cross.t2d, 1, dtypes=(torch.int32,), device=device)
        _check("cross.d2t", cross.d2t, 1, dtypes=(torch.int32,), device=device)
        if cross.t2d.shape[0] != vocab:
            raise ValueError(f"`cross.t2d` must have the target's {vocab} ids, got {cross.t2d.shape[0]}")
        for name, dtype in (
            ("drafter_ids", torch.int64), ("source", torch.int64), ("span_end", torch.int64),
            ("path", torch.float32), ("path_t1", torch.float32),
        ):  # fmt: skip
            tensor = getattr(cross, name)
            if tensor is None:  # path, path_t1: optional
                continue
            _check(f"cross.{name}", tensor, 2, dtypes=(dtype,), device=device)
            if tensor.shape != (batch, k):
                raise ValueError(
                    f"`cross.{name}` must be [batch, k] = {(batch, k)}, got {tuple(tensor.shape)}"
                )
    else:
        vocab_q = vocab
    for name, probs in (("draft_probs", draft_probs), ("draft_probs_t1", draft_probs_t1)):
        if probs is None:
            continue
        _check(name, probs, 3, dtypes=(torch.float32,), device=device)
        if probs.shape != (batch, k, vocab_q):
            raise ValueError(
                f"`{name}` must be [batch, k, V] = {(batch, k, vocab_q)}, got {tuple(probs.shape)}"
            )
    if draft_probs is None and not exact_match:
        raise ValueError("`draft_probs` is required unless exact_match=True")
    _check("uniforms", uniforms, 2, dtypes=(torch.float32,), device=device)
    if uniforms.shape != draft_ids.shape:
        raise ValueError(
            f"`uniforms` must be [batch, k] = {tuple(draft_ids.shape)}, got {tuple(uniforms.shape)}"
        )
    if (rule is None) != (alpha is None):
        raise ValueError("`rule` and `alpha` go together: give both (a deferral rule) or neither (exact)")
    if exact_match and rule is not None:
        raise ValueError("exact_match=True verifies by the exact rule only: pass `rule=None, alpha=None`")
    if rule is not None:
        _check("rule", rule, 1, dtypes=(torch.int64,), device=device)
        _check("alpha", alpha, 1, dtypes=(torch.float32,), device=device)
        if rule.shape[0] != batch or alpha.shape[0] != batch:
            raise ValueError(f"`rule` and `alpha` must have one entry per row ({batch})")
    if support_only and rule is None:
        raise ValueError("`support_only` restricts what the deferral rules read: give it with `rule` only")
    if rules is not None:
        if rule is None:
            raise ValueError("`rules` names the rule ids `rule` holds: give it with `rule` only")
        rules = frozenset(rules)
        if not rules or not rules <= RULE_IDS:
            raise ValueError(f"`rules` must be rule ids of kernels/cascade.py's RULES (0..{len(RULE_IDS) - 1}), got "
                             f"{sorted(rules)}")  # fmt: skip
    _check_sampling(temperature, top_k, top_p)
    if temperature > 0:
        shape = (batch, width, vocab) if exact_match else (batch, vocab)
        if noise is None:
            raise ValueError(f"`noise` ({list(shape)} Exp(1) draws) is required when temperature > 0")
        _check("noise", noise, len(shape), dtypes=(torch.float32,), device=device)
        if noise.shape != shape:
            raise ValueError(f"`noise` must be {list(shape)}, got {list(noise.shape)}")
    # q' is read through `cross` inside the kernel. An infinite temperature (uniform draws) stays on the
    # reference: the kernels' -inf padding lanes divided by it would be NaN.
    kernel = runs_kernels(target_logits) and math.isfinite(temperature)
    if exact_match:
        match = match_triton if kernel else match_reference
        num_accepted, output_tokens, target_probs, invalid = match(
            target_logits, draft_ids, noise, temperature, top_k, top_p
        )
        return (
            num_accepted,
            output_tokens,
            target_probs,
            torch.ones_like(draft_ids, dtype=torch.bool),
            invalid,
        )
    if kernel:
        if rule is None:
            rule = torch.zeros(batch, dtype=torch.int64, device=device)
            alpha = torch.zeros(batch, dtype=torch.float32, device=device)
        return verify_triton(
            target_logits, draft_ids, draft_probs, draft_probs_t1, uniforms, noise, rule, alpha, temperature,
            top_k, top_p, cross, support_only=support_only,
        )  # fmt: skip
    # The reference reads q' through `cross` too, densely only where a deferral rule reads whole rows, and
    # computes only the rules `rule` holds (read off a CPU tensor outside captures: kernels/verify.py).
    return verify_reference(
        target_logits, draft_ids, draft_probs, draft_probs_t1, uniforms, noise, rule, alpha, temperature, top_k,
        top_p, cross, rules=rules, support_only=support_only,
    )  # fmt: skip


def commit(
    tokens: torch.Tensor,  # [batch, slots]
    lengths: torch.Tensor,  # [batch]
    generated: torch.Tensor,  # [batch]
    done: torch.Tensor,  # [batch]
    output_tokens: torch.Tensor,  # [batch, k+1]
    num_accepted: torch.Tensor,  # [batch]
    eos_ids: torch.Tensor,  # [num_eos]
    *,
    max_new_tokens: int,
) -> torch.Tensor:
    """Append each row's kept output tokens in place (EOS and ``max_new_tokens`` applied); returns the counts kept."""
    _check("tokens", tokens, 2, dtypes=(torch.int64,))
    device = tokens.device
    batch = tokens.shape[0]
    for name, tensor, dtype in (
        ("lengths", lengths, torch.int64),
        ("generated", generated, torch.int64),
        ("done", done, torch.bool),
        ("num_accepted", num_accepted, torch.int64),
    ):
        _check(name, tensor, 1, dtypes=(dtype,), device=device)
        if tensor.shape[0] != batch:
            raise ValueError(f"`{name}` must be [batch] = [{batch}], got {tuple(tensor.shape)}")
    _check("output_tokens", output_tokens, 2, dtypes=(torch.int64,), device=device)
    if output_tokens.shape[0] != batch:
        raise ValueError(
            f"`output_tokens` must be [batch, k+1] with batch = {batch}, got {tuple(output_tokens.shape)}"
        )
    _check("eos_ids", eos_ids, 1, dtypes=(torch.int64,), device=device)
    if max_new_tokens < 1:
        raise ValueError(f"`max_new_tokens` must be >= 1, got {max_new_tokens}")
    return commit_reference(
        tokens, lengths, generated, done, output_tokens, num_accepted, eos_ids, max_new_tokens
    )


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:  # [..., vocab] -> [...] bool
    """Rows a sampler cannot use: any NaN or +inf, or every entry -inf."""
    if not isinstance(logits, torch.Tensor) or logits.dtype not in _FLOATS:
        raise TypeError("`logits` must be a floating-point torch.Tensor")
    return nonfinite_rows_reference(logits)


def translate(
    draft_ids: torch.Tensor,  # [batch, k] drafter ids
    d2t: torch.Tensor,  # [V_d] int32
    *,
    table: tuple[torch.Tensor, ...] | None = None,  # the n-gram table's tensors (ngram_lookup's)
    splits: tuple[torch.Tensor, torch.Tensor, int] | None = None,  # (d2ts, d2ts_len, V_t)
    drafted: torch.Tensor | None = None,  # [batch] int64 each row's draft length (None: k)
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drafted block -> target ids [batch, k] (-1 after the first token that neither maps nor merges),
    lengths [batch], source and span ends [batch, k] (the drafter tokens behind each target position, and
    past the last the stop; see ``kernels/translate.py``). With ``table``, runs of drafter tokens merge into
    one target token (longest match). With ``splits``, ``d2t`` is the bridge's ``units`` map and a drafted
    token with no target twin becomes the target tokens that spell it. With ``drafted``, a row translates
    only its first ``drafted`` tokens."""
    _check("draft_ids", draft_ids, 2, dtypes=(torch.int64,))
    _check("d2t", d2t, 1, dtypes=(torch.int32,), device=draft_ids.device)
    if drafted is not None:
        _check("drafted", drafted, 1, dtypes=(torch.int64,), device=draft_ids.device)
        if drafted.shape[0] != draft_ids.shape[0]:
            raise ValueError(f"`drafted` must have {draft_ids.shape[0]} rows, got {tuple(drafted.shape)}")
    if table is not None:
        if not isinstance(table, tuple | list) or len(table) != 2:
            raise ValueError(
                "`table` must be the n-gram table's `(key_ids, values)`, as `NGramTable.tensors` gives"
            )
        _check_table(*table)
        if table[0].device != draft_ids.device:
            raise ValueError(f"the n-gram table is on {table[0].device}, the drafts on {draft_ids.device}")
    if splits is not None:
        d2ts, d2ts_len, vocab_t = splits
        _check("d2ts", d2ts, 2, dtypes=(torch.int32,), device=draft_ids.device)
        _check("d2ts_len", d2ts_len, 1, dtypes=(torch.int32,), device=draft_ids.device)
        if d2ts.shape[0] != d2t.shape[0] or d2ts_len.shape[0] != d2t.shape[0]:
            raise ValueError(
                f"`d2ts` and `d2ts_len` must have one row per drafter id ({d2t.shape[0]}, as `d2t`), got "
                f"{d2ts.shape[0]} and {d2ts_len.shape[0]}"
            )
    batch, k = draft_ids.shape
    if batch == 0 or k == 0:  # nothing drafted: every path's answer, with no block to index
        blank = torch.zeros(batch, k, dtype=torch.int64, device=draft_ids.device)
        return blank - 1, torch.zeros(batch, dtype=torch.int64, device=draft_ids.device), blank, blank.clone()
    if table is None:
        out = (translate_triton if runs_kernels(draft_ids) else translate_reference)(
            draft_ids, d2t, drafted=drafted
        )
    else:
        out = (translate_triton if runs_kernels(draft_ids) else translate_ngram_reference)(
            draft_ids, d2t, *table, drafted=drafted
        )
    if splits is None:
        return out
    ids, _, source, span_end = out
    return split_reference(ids, source, span_end, d2ts, d2ts_len, vocab_t)


def commit_drafter(
    tokens: torch.Tensor,  # [batch, slots]
    lengths: torch.Tensor,  # [batch]
    draft_ids: torch.Tensor,  # [batch, k]
    drafted: torch.Tensor,  # [batch]
    spelling: torch.Tensor,  # [batch, width]
    spelling_len: torch.Tensor,  # [batch]
    active: torch.Tensor,  # [batch]
) -> None:
    """Append, in place, each active row's first ``drafted`` drafter tokens (those its accepted target positions
    consumed: ``feedback.kept_drafts``) and the drafter spelling of the target tokens the round emitted but did
    not draft (the recovered/bonus token, after any accepted pieces of a split token a rejection cut) to the
    drafter's context (see ``kernels/commit.py``)."""
    _check("tokens", tokens, 2, dtypes=(torch.int64,))
    device, batch = tokens.device, tokens.shape[0]
    for name, tensor, ndim, dtype in (
        ("lengths", lengths, 1, torch.int64),
        ("draft_ids", draft_ids, 2, torch.int64),
        ("drafted", drafted, 1, torch.int64),
        ("spelling", spelling, 2, torch.int64),
        ("spelling_len", spelling_len, 1, torch.int64),
        ("active", active, 1, torch.bool),
    ):
        _check(name, tensor, ndim, dtypes=(dtype,), device=device)
        if tensor.shape[0] != batch:
            raise ValueError(f"`{name}` must have {batch} rows, got {tuple(tensor.shape)}")
    commit_drafter_reference(tokens, lengths, draft_ids, drafted, spelling, spelling_len, active)


def lookup(
    tokens: torch.Tensor,  # [batch, slots] int64 committed token ids by slot
    start: torch.Tensor,  # [batch] int64 each row's first slot
    lengths: torch.Tensor,  # [batch] int64 one past each row's last committed slot
    k: int,
    max_ngram: int,
) -> tuple[torch.Tensor, torch.Tensor]:  # ids [batch, k] int64, drafted [batch] int64
    """Prompt lookup's draft for every row: up to ``k`` tokens continuing the leftmost earlier occurrence of
    the row's longest matching suffix of at most ``max_ngram`` tokens (see ``kernels/lookup.py``; Triton on
    CUDA)."""
    _check("tokens", tokens, 2, dtypes=(torch.int64,))
    for name, tensor in (("start", start), ("lengths", lengths)):
        _check(name, tensor, 1, dtypes=(torch.int64,), device=tokens.device)
        if tensor.shape[0] != tokens.shape[0]:
            raise ValueError(f"`{name}` must be [batch] = [{tokens.shape[0]}], got {tuple(tensor.shape)}")
    for name, value in (("k", k), ("max_ngram", max_ngram)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    if tokens.shape[1] < 1:
        raise ValueError("`tokens` must have at least one slot")
    return (lookup_triton if runs_kernels(tokens) else lookup_reference)(tokens, start, lengths, k, max_ngram)


def _check_table(key_ids: torch.Tensor, values: torch.Tensor) -> None:
    _check("key_ids", key_ids, 2, dtypes=(torch.int32,))
    _check("values", values, 1, dtypes=(torch.int32,), device=key_ids.device)
    capacity = key_ids.shape[0]
    if capacity < 1 or capacity & (capacity - 1) or values.shape[0] != capacity:
        raise ValueError(
            f"the table's capacity must be a power of two shared by `key_ids` and `values`, got {capacity}"
        )
    if not (key_ids.is_contiguous() and values.is_contiguous()):
        raise ValueError("the table's `key_ids` and `values` must be contiguous")


def ngram_lookup(
    key_ids: torch.Tensor,  # [C, N] int32
    values: torch.Tensor,  # [C] int32
    queries: torch.Tensor,  # [Q, N] int64, -1 padded
) -> torch.Tensor:  # [Q] int64
    """Value of each query key in the n-gram hash table, or -1 (see ``kernels/ngram.py``; Triton on CUDA)."""
    _check_table(key_ids, values)
    _check("queries", queries, 2, dtypes=(torch.int64,), device=key_ids.device)
    if queries.shape[1] != key_ids.shape[1]:
        raise ValueError(
            f"`queries` must have {key_ids.shape[1]} columns (the table's N), got {queries.shape[1]}"
        )
    lookup = ngram_lookup_triton if runs_kernels(key_ids) else ngram_lookup_reference
    return lookup(key_ids, values, queries)


def ngram_insert(
    hashes: torch.Tensor,  # [C] int64
    key_ids: torch.Tensor,  # [C, N] int32
    values: torch.Tensor,  # [C] int32
    counts: torch.Tensor,  # [C] int64
    keys: torch.Tensor,  # [Q, N] int64
    new_values: torch.Tensor,  # [Q] int64
    hits: torch.Tensor,  # [Q] int64
) -> torch.Tensor:  # [] int64 rows not placed
    """Insert keys (or add hits to present ones) in place; returns how many rows found no slot, on the
    table's device (see ``kernels/ngram.py``; Triton on CUDA). A key is its leading ids in ``[0, 2^31)``,
    then -1 padding; a -1 before an id, or an id outside that range, is not checked (that would read
    the device from the host) and makes keys that differ look equal."""
    _check_table(key_ids, values)
    for name, tensor, dtype in (("hashes", hashes, torch.int64), ("counts", counts, torch.int64)):
        _check(name, tensor, 1, dtypes=(dtype,), device=key_ids.device)
        if tensor.shape[0] != key_ids.shape[0] or not tensor.is_contiguous():
            raise ValueError(f"`{name}` must be contiguous with one entry per slot ({key_ids.shape[0]})")
    _check("keys", keys, 2, dtypes=(torch.int64,), device=key_ids.device)
    if keys.shape[1] != key_ids.shape[1]:
        raise ValueError(f"`keys` must have {key_ids.shape[1]} columns (the table's N), got {keys.shape[1]}")
    for name, tensor in (("new_values", new_values), ("hits", hits)):
        _check(name, tensor, 1, dtypes=(torch.int64,), device=key_ids.device)
        if tensor.shape[0] != keys.shape[0]:
            raise ValueError(f"`{name}` must have one entry per key ({keys.shape[0]}), got {tensor.shape[0]}")
    insert = ngram_insert_triton if runs_kernels(key_ids) else ngram_insert_reference
    return insert(hashes, key_ids, values, counts, keys, new_values, hits)
