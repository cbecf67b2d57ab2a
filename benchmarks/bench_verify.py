"""Verification of a drafted block (goals on an H100 at [8 rows x 9 positions, 128256] bf16 logits: >= 80%
of the device-to-device copy bandwidth, >= 3x the eager reference, >= 1.5x its ``torch.compile``).

    python -m pytest benchmarks/bench_verify.py --benchmark-only [--benchmark-json out.json]

Implementations: the eager torch reference (``q'`` built densely by ``target_proposal_reference`` when the
vocabularies differ, then ``verify_reference``), ``torch.compile`` of the same, and ``verify_triton``;
plus ``copy``, a device-to-device copy of the logits, the bandwidth yardstick. Sampling at T = 0.8 with a
mix of rules over the rows (exact, chow, token_v2, lossy); ``extra_info`` records the bytes the op must
move at least (logits once; ``q`` once for rows with a deferral rule, else only at the stop position;
noise; outputs) and the bandwidth that implies.
"""

from __future__ import annotations

import pytest
import torch
from _timing import synced
from omnidraft_fast.kernels.cascade import RULES
from omnidraft_fast.kernels.proposal import CrossProposal, target_proposal_reference
from omnidraft_fast.kernels.verify import verify_reference, verify_triton

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
torch._dynamo.config.recompile_limit = 64  # one compilation per shape (dynamic=False)

BATCHES = [1, 8, 64]
KS = [1, 4, 8]
VOCABS = [32000, 128256, 151936]
DRAFTER_VOCAB = 32000  # cross-vocabulary cases: a Llama-2-sized drafter
TEMPERATURE = 0.8
MIX = ("exact", "chow", "token_v2", "lossy")


def _reference(logits, draft_ids, probs, uniforms, noise, rule, alpha, cross):
    q = probs if cross is None else target_proposal_reference(probs, draft_ids, cross)
    return verify_reference(logits, draft_ids, q, None, uniforms, noise, rule, alpha, TEMPERATURE, 0, 1.0)


_COMPILED = torch.compile(_reference, dynamic=False)
IMPLEMENTATIONS = {
    "eager": _reference,
    "compile": _COMPILED,
    "triton": lambda logits, ids, probs, u, noise, rule, alpha, cross: verify_triton(
        logits, ids, probs, None, u, noise, rule, alpha, TEMPERATURE, 0, 1.0, cross
    ),
}


def verify_inputs(batch: int, k: int, vocab: int, cross_vocab: bool, seed: int = 0) -> tuple:
    """(logits, draft_ids, probs, uniforms, noise, rule, alpha, cross) of one verification on CUDA."""
    generator = torch.Generator(device="cuda").manual_seed(seed)
    vocab_q = DRAFTER_VOCAB if cross_vocab else vocab
    logits = torch.randn(batch, k + 1, vocab, generator=generator, device="cuda").bfloat16()
    probs = torch.randn(batch, k, vocab_q, generator=generator, device="cuda").mul(3).softmax(-1)
    draft = torch.multinomial(probs.view(-1, vocab_q), 1, generator=generator).view(batch, k)
    uniforms = torch.rand(batch, k, generator=generator, device="cuda")
    noise = torch.empty(batch, vocab, device="cuda").exponential_(generator=generator)
    rule = torch.tensor([RULES.index(MIX[b % len(MIX)]) for b in range(batch)], device="cuda")
    alpha = torch.full((batch,), 0.3, device="cuda")
    cross = None
    if cross_vocab:
        t2d = torch.full((vocab,), -1, dtype=torch.int32, device="cuda")
        mapped = torch.randperm(vocab, generator=generator, device="cuda")[: vocab_q // 2]
        t2d[mapped] = torch.arange(vocab_q // 2, dtype=torch.int32, device="cuda")
        d2t = torch.full((vocab_q,), -1, dtype=torch.int32, device="cuda")
        d2t[: vocab_q // 2] = mapped.int()
        draft = draft % (vocab_q // 2)
        positions = torch.arange(k, device="cuda").expand(batch, k)
        cross = CrossProposal(draft, positions, positions + 1, d2t, t2d)
        draft_ids = d2t[draft].long()
    else:
        draft_ids = draft
    return logits, draft_ids, probs, uniforms, noise, rule, alpha, cross


def verify_bytes(
    batch: int, k: int, vocab: int, vocab_q: int, logits: torch.Tensor, rule: torch.Tensor
) -> int:
    deferring = int((rule != 0).sum())  # rows whose rule reads all of q; exact rows read one row of it
    q_rows = deferring * k + (batch - deferring)
    return logits.numel() * logits.element_size() + q_rows * vocab_q * 4 + batch * vocab * 4 + batch * k * 14


@pytest.mark.parametrize("implementation", [*IMPLEMENTATIONS, "copy"])
@pytest.mark.parametrize("cross_vocab", [False, True], ids=["shared", "cross"])
@pytest.mark.parametrize("vocab", VOCABS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("batch", BATCHES)
def test_verify(benchmark, implementation, cross_vocab, vocab, k, batch):
    args = verify_inputs(batch, k, vocab, cross_vocab)
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
