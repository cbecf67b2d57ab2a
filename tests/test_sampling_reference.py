"""sampling_probs_reference's CPU shortcuts against the plain formula they replace (bit for bit)."""

from __future__ import annotations

import pytest
import torch
from omnidraft_fast.kernels.sampling import (
    nonfinite_rows_reference,
    sample_reference,
    sampling_probs_reference,
)
from torch.utils._python_dispatch import TorchDispatchMode


def _full_sort(logits, temperature, top_k, top_p, mask=None):
    """The filters as written before the shortcuts: torch.topk's k-th value and a full torch.sort for top-p."""
    z = logits.float()
    if mask is not None:
        z = z.masked_fill(~mask, float("-inf"))
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


def _same(logits, temperature, top_k, top_p, mask=None):
    expected = _full_sort(logits, temperature, top_k, top_p, mask)
    got = sampling_probs_reference(logits, temperature, top_k, top_p, mask)
    torch.testing.assert_close(got, expected, rtol=0, atol=0, equal_nan=True)
    return got


@pytest.mark.parametrize("top_k", [0, 1, 5, 40])
@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.8, 0.95, 1 - 1e-7])
def test_random_logits_with_ties(top_k, top_p):
    """Logits on a coarse grid (many ties, also at the top-k and top-p boundaries), masked or not, 2-D and
    3-D, at several temperatures."""
    generator = torch.Generator().manual_seed(top_k + int(top_p * 1000))
    for trial in range(40):
        vocab = (7, 64, 300, 1000)[trial % 4]
        step = (0.0, 0.5, 0.25, 1.0)[trial // 4 % 4]  # 0: no grid (few ties)
        logits = torch.randn(3, 2, vocab, generator=generator) * (1 + trial % 3)
        if step:
            logits = (logits / step).round() * step
        mask = torch.rand(vocab, generator=generator) > 0.3 if trial % 5 == 0 else None
        if mask is not None:
            mask[0] = True
        temperature = (1.0, 0.7, 1.6)[trial % 3]
        _same(logits, temperature, top_k, top_p, mask)
        _same(logits[0], temperature, top_k, top_p, mask)
        _same(logits.half(), temperature, top_k, top_p, mask)


def test_a_tie_across_the_top_p_boundary_is_torch_sorts(monkeypatch):
    """The shortcut decides without torch.sort unless equal logits straddle the top-p boundary, where which
    of them are dropped is torch.sort's order: then it sorts that row (and only that row)."""
    rows_sorted = []
    sort = torch.sort

    def counted(input, *args, **kwargs):
        rows_sorted.append(input.shape[:-1].numel())
        return sort(input, *args, **kwargs)

    def check(logits, top_p, kept, sorted_rows):
        expected = _full_sort(logits, 1.0, 0, top_p)
        rows_sorted.clear()
        probs = sampling_probs_reference(logits, 1.0, 0, top_p)
        torch.testing.assert_close(probs, expected, rtol=0, atol=0)
        assert (probs > 0).sum(-1).tolist() == kept
        assert sum(rows_sorted) == sorted_rows

    monkeypatch.setattr(torch, "sort", counted)
    distinct = [1.0, 1.5, 1.25, 3.0, 0.0, 0.75, 1.1, -2.0]
    tied = [1.0, 1.0, 1.0, 1.0, 3.0, 0.0, 1.0, -2.0]  # 4 of the five 1.0 dropped
    below = [0.0, 0.0, 0.0, 4.0, 3.9, -1.0, -1.0, 0.0]  # equal logits wholly below the boundary
    check(torch.tensor([distinct]), 0.6, [2], 0)
    check(torch.tensor([tied]), 0.6, [2], 1)
    check(torch.tensor([below]), 0.9, [2], 0)
    check(torch.tensor([[distinct, tied], [tied, below]]), 0.6, [[2, 2], [2, 2]], 2)
    # -0.0 and +0.0 are equal logits: a tie, though they differ in sign.
    check(torch.tensor([[-0.0, 0.0, -5.0, 0.0, -0.0]]), 0.5, [3], 1)  # -5 and one of the zeros dropped


def test_top_k_needs_no_topk_on_the_cpu(monkeypatch):
    """The k-th largest value, ties counted, is a value: numpy's partition finds the one torch.topk does."""
    logits = torch.tensor(
        [[0.0, 2.0, 1.0, 1.0, 1.0, -1.0, 1.0, 0.5], [-0.0, 3.0, 0.0, 0.0, -1.0, 2.0, 9.0, -0.0]]
    )
    expected = {k: _full_sort(logits, 1.0, k, 1.0) for k in range(1, 8)}

    def refused(*args, **kwargs):
        raise AssertionError("torch.topk called")

    monkeypatch.setattr(torch, "topk", refused)
    for k, probs in expected.items():
        torch.testing.assert_close(sampling_probs_reference(logits, 1.0, k, 1.0), probs, rtol=0, atol=0)
    assert ((expected[3] > 0).sum(-1) == torch.tensor([5, 3])).all()  # ties at the k-th kept
    assert ((expected[4] > 0).sum(-1) == torch.tensor([5, 7])).all()  # -0.0 == +0.0


def test_rows_that_cannot_be_sampled_and_extreme_top_p():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    logits[0, 7] = float("nan")
    logits[1, 3] = float("inf")
    logits[2] = float("-inf")
    logits[3, 1:] = float("-inf")  # one token left
    logits[4, :25] = float("-inf")
    logits[5] = -1e30
    for top_k in (0, 3):
        for top_p in (1e-6, 0.5, 0.999999):
            _same(logits, 1.0, top_k, top_p)
    _same(logits[:0], 1.0, 0, 0.5)  # no rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_rows_a_sampler_cannot_use(dtype):
    """nonfinite_rows: a row holding a NaN or a +inf, or whose every entry is -inf (a vocabulary of none
    too); not a row with some -inf entries (masked tokens) or one finite token."""
    inf, nan = float("inf"), float("nan")
    rows = [[0.0, 1.0, -2.0], [0.0, nan, 1.0], [0.0, inf, 1.0], [-inf, -inf, -inf], [-inf, 3.0, -inf],
            [-inf, nan, -inf], [1e4, -1e4, 0.0]]  # fmt: skip
    logits = torch.tensor(rows, dtype=dtype)
    want = [False, True, True, True, False, True, False]
    assert nonfinite_rows_reference(logits).tolist() == want
    assert nonfinite_rows_reference(logits.view(7, 1, 3).expand(7, 2, 3)).tolist() == [[w, w] for w in want]
    assert nonfinite_rows_reference(torch.tensor([[5.0], [-inf]], dtype=dtype)).tolist() == [False, True]
    assert nonfinite_rows_reference(torch.zeros(2, 0, dtype=dtype)).tolist() == [True, True]


def test_strided_and_grad_logits():
    logits = torch.randn(4, 2, 300, generator=torch.Generator().manual_seed(4))
    _same(logits[:, 1], 0.8, 0, 0.7)  # rows a stride apart
    _same(logits.transpose(0, 1), 0.8, 10, 0.7)
    _same(logits.transpose(1, 2), 1.0, 0, 0.7)  # the vocabulary not contiguous: the sort path
    leaf = logits.clone().requires_grad_()
    with torch.no_grad():
        expected = _full_sort(leaf, 1.0, 5, 0.7)
    torch.testing.assert_close(sampling_probs_reference(leaf, 1.0, 5, 0.7).detach(), expected, rtol=0, atol=0)


def test_under_torch_compile():
    """torch.compile traces numpy calls as torch ops (and has no partition): the shortcuts step aside there."""
    compiled = torch.compile(sampling_probs_reference, backend="eager", dynamic=False)
    logits = torch.randn(3, 500, generator=torch.Generator().manual_seed(5)) * 3
    for top_k, top_p in ((0, 0.8), (20, 1.0), (20, 0.7)):
        expected = _full_sort(logits, 1.0, top_k, top_p)
        torch.testing.assert_close(compiled(logits, 1.0, top_k, top_p), expected, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_greedy_takes_the_argmax_once(dtype):
    """sample_reference returns the argmax the greedy one-hot is built at, not the one-hot's argmax: the
    one-hot and ids of the formula before, bit for bit (ties, NaN/+inf rows, rows all -inf, a mask, strided
    rows; float64 near-ties that fp32 merges)."""
    logits = torch.randn(8, 64, generator=torch.Generator().manual_seed(6)).to(dtype)
    logits[0, 3] = logits[0, 9] = logits[0].max() + 1  # a tie: the first
    logits[1, 7] = float("nan")
    logits[2, 5] = float("inf")
    logits[3] = float("-inf")
    logits[4] = -10.0
    logits[4, 2], logits[4, 4] = 1.0, 1.0 + 1e-12  # distinct in float64 (argmax 4), equal in fp32 (2)
    mask = torch.rand(64, generator=torch.Generator().manual_seed(7)) < 0.7
    for x in (logits, logits.t().contiguous().t(), logits[:, ::2]):
        for m in (None, mask[: x.shape[-1]]):
            z = x.float() if m is None else x.float().masked_fill(~m, float("-inf"))
            want = torch.zeros_like(z).scatter_(-1, z.argmax(-1, keepdim=True), 1.0)
            assert torch.equal(sampling_probs_reference(x, 0.0, 0, 1.0, m), want)
            ids, probs = sample_reference(x, None, 0.0, 0, 1.0, m)
            assert torch.equal(probs, want) and torch.equal(ids, want.argmax(-1))
            assert torch.equal(sample_reference(x, None, 0.0, 0, 1.0, m, probs=False)[0], ids)  # ids only
    assert sample_reference(logits, None, 0.0, 0, 1.0)[0][4] == 2


def test_greedy_ids_only_build_no_distribution():
    """``probs=False`` at T = 0 is the masked argmax alone: no one-hot row allocated or scattered into."""

    class Ops(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(8))
    mask = torch.arange(50) % 3 > 0
    for m, expected in ((None, ["argmax"]), (mask, ["bitwise_not", "masked_fill", "argmax"])):
        with Ops() as ops:
            ids, probs = sample_reference(logits, None, 0.0, 0, 1.0, m, probs=False)
        assert probs is None and ops.names == expected
        assert torch.equal(ids, sample_reference(logits, None, 0.0, 0, 1.0, m)[0])
