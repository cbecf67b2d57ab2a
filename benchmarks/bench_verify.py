"""Verification of a drafted block (goals on an H100 at [8 rows x 9 positions, 128256] bf16 logits: >= 80%
of the device-to-device copy bandwidth, >= 3x the eager reference, >= 1.5x its ``torch.compile``).

    python -m pytest benchmarks/bench_verify.py --benchmark-only [--benchmark-json out.json]

Implementations: the eager torch reference ``verify_reference``, ``torch.compile`` of the same, and
``verify_triton``; plus ``copy``, a device-to-device copy of the logits, the bandwidth yardstick. Sampling
at T = 0.8. Rules (``rules``): ``mix``, a mix over the rows (exact, chow, token_v2, lossy), at every shape;
``exact`` (every row) and ``token_v2`` (every row, one deferral rule) at the goal shape. The references are
told the case's rules (``verify_reference(rules=...)``) and compute only those, as the kernel computes
only each row's rule; they read ``q'`` through ``cross`` as the kernel does (densely only for rows with a
deferral rule, which read whole rows; exact rows read it at the drafts and the stop position). Before
2026-12-02 the eager baseline computed every rule at every position and built ``q'`` densely for exact
rows too, which inflated its time (see TUNING.md). ``extra_info`` records the bytes the op must move at
least (logits once; ``q`` once for rows with a deferral rule, else only at the stop position; noise;
outputs) and the bandwidth that implies.
"""

from __future__ import annotations

import pytest
import torch
from _timing import synced
from omnidraft_fast.kernels.cascade import RULES
from omnidraft_fast.kernels.proposal import CrossProposal
from omnidraft_fast.kernels.verify import verify_reference, verify_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
torch._dynamo.config.recompile_limit = 128  # one compilation per case (dynamic=False): 58 cases

BATCHES = [1, 8, 64]
KS = [1, 4, 8]
VOCABS = [32000, 128256, 151936]
DRAFTER_VOCAB = 32000  # cross-vocabulary cases: a Llama-2-sized drafter
TEMPERATURE = 0.8
MIX = ("exact", "chow", "token_v2", "lossy")
RULE_SETS = {
    "mix": MIX,
    "exact": ("exact",),
    "token_v2": ("token_v2",),
}  # each row's rule: row b takes [b % len]


def _reference(logits, draft_ids, probs, uniforms, noise, rule, alpha, cross, rules):
    """The eager reference told the case's rule ids (``rules``, a constant to torch.compile)."""
    return verify_reference(
        logits, draft_ids, probs, None, uniforms, noise, rule, alpha, TEMPERATURE, 0, 1.0, cross, rules=rules
    )


_COMPILED = torch.compile(_reference, dynamic=False)
IMPLEMENTATIONS = {
    "eager": _reference,
    "compile": _COMPILED,
    "triton": lambda logits, ids, probs, u, noise, rule, alpha, cross, rules: verify_triton(
        logits, ids, probs, None, u, noise, rule, alpha, TEMPERATURE, 0, 1.0, cross
    ),
}


def verify_inputs(
    batch: int,
    k: int,
    vocab: int,
    cross_vocab: bool,
    seed: int = 0,
    rules: str = "mix",
    *,
    device: str = "cuda",
    drafter_vocab: int = DRAFTER_VOCAB,
) -> tuple:
    """(logits, draft_ids, probs, uniforms, noise, rule, alpha, cross, rule ids) of one verification on
    ``device``, the rows' rules from ``RULE_SETS[rules]``."""
    generator = torch.Generator(device=device).manual_seed(seed)
    vocab_q = drafter_vocab if cross_vocab else vocab
    logits = torch.randn(batch, k + 1, vocab, generator=generator, device=device).bfloat16()
    probs = torch.randn(batch, k, vocab_q, generator=generator, device=device).mul(3).softmax(-1)
    draft = torch.multinomial(probs.view(-1, vocab_q), 1, generator=generator).view(batch, k)
    uniforms = torch.rand(batch, k, generator=generator, device=device)
    noise = torch.empty(batch, vocab, device=device).exponential_(generator=generator)
    names = RULE_SETS[rules]
    rule = torch.tensor([RULES.index(names[b % len(names)]) for b in range(batch)], device=device)
    alpha = torch.full((batch,), 0.3, device=device)
    cross = None
    if cross_vocab:
        t2d = torch.full((vocab,), -1, dtype=torch.int32, device=device)
        mapped = torch.randperm(vocab, generator=generator, device=device)[: vocab_q // 2]
        t2d[mapped] = torch.arange(vocab_q // 2, dtype=torch.int32, device=device)
        d2t = torch.full((vocab_q,), -1, dtype=torch.int32, device=device)
        d2t[: vocab_q // 2] = mapped.int()
        draft = draft % (vocab_q // 2)
        positions = torch.arange(k, device=device).expand(batch, k)
        cross = CrossProposal(draft, positions, positions + 1, d2t, t2d)
        draft_ids = d2t[draft].long()
    else:
        draft_ids = draft
    return logits, draft_ids, probs, uniforms, noise, rule, alpha, cross, held_rules(rules, batch)


def held_rules(rules: str, batch: int) -> frozenset[int]:
    """The rule ids the rows of ``verify_inputs(batch, ..., rules=rules)`` hold (the references are told them)."""
    return frozenset(RULES.index(name) for name in RULE_SETS[rules][:batch])


def verify_bytes(
    batch: int, k: int, vocab: int, vocab_q: int, logits: torch.Tensor, rule: torch.Tensor
) -> int:
    deferring = int((rule != 0).sum())  # rows whose rule reads all of q; exact rows read one row of it
    q_rows = deferring * k + (batch - deferring)
    return logits.numel() * logits.element_size() + q_rows * vocab_q * 4 + batch * vocab * 4 + batch * k * 14


# The rule mix at every shape; one rule and exact at the goal shape only.
CASES = [
    *((batch, k, vocab, "mix") for batch in BATCHES for k in KS for vocab in VOCABS),
    *((8, 8, 128256, rules) for rules in RULE_SETS if rules != "mix"),
]


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "copy"])
@pytest.mark.parametrize("cross_vocab", [False, True], ids=["shared", "cross"])
@pytest.mark.parametrize(("batch", "k", "vocab", "rules"), CASES)
def test_verify(benchmark, implementation, cross_vocab, batch, k, vocab, rules):
    args = verify_inputs(batch, k, vocab, cross_vocab, rules=rules)
    logits = args[0]
    if implementation == "copy":
        out = torch.empty_like(logits)
        run = synced(lambda: out.copy_(logits))

        moved = 2 * logits.numel() * logits.element_size()
    else:
        verify = IMPLEMENTATIONS[implementation]
        got, want = verify(*args), _reference(*args)
        assert torch.equal(got[1], want[1]) and torch.equal(got[0], want[0])

        run = synced(lambda: verify(*args))

        moved = verify_bytes(batch, k, vocab, args[2].shape[-1], logits, args[5])
    benchmark(run)
    seconds = benchmark.stats.stats.median
    benchmark.extra_info.update(
        bytes_moved=moved, gb_per_s=moved / seconds / 1e9, device=torch.cuda.get_device_name()
    )
