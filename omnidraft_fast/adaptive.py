"""Adaptive draft length (SpecDec++, OmniDraft; SPEC §5): the acceptance head, its stopping rule and loss;
and the drafter's own confidence as a rule that needs no head (``DraftLength``).

The head reads the drafter's last hidden state ``h_i`` at the step that drafted token ``i`` and gives

    a_i = sigmoid(f(h_i)),     f = Linear o (x + SiLU(W_b x)) o ... o (x + SiLU(W_1 x)),

the probability that token ``i`` is accepted given that every token before it was; or, with
``AdaptiveConfig(confidence_input=True)`` (ours), also from the drafter's own confidence in the token,
its T=1 probability ``c_i = q(y_i)``:

    a_i = sigmoid(f(h_i) + w logit(c_i)),     w = 1 and f = 0 at the start

so that the untrained head predicts the drafter's confidence (the stopping rule then stops a row once
the product of its confidences falls below ``1 - gamma``) and training corrects it from there.

A row stops drafting after token ``i`` once the probability that some drafted token is rejected passes
``gamma``:

    1 - prod_{j <= i} a_j > gamma          (only from i >= k_min; never past k_max)

Training targets are soft: verification's acceptance probability ``min(1, p(y)/q(y))`` of the drafted
token (``1[y = argmax p]`` when greedy; ``p(y)`` where verification is by exact match,
``EngineConfig(translation="exact")``: a draw from ``p`` must equal ``y``), with the reject side of the
cross-entropy weighted ``w``:

    loss = -mean( y log a + w (1 - y) log(1 - a) )

Recomputed under the current drafter (the alternating mode's replay), the label at a position with the
target's distribution at hand is the expected acceptance of a fresh draft, ``sum_v min(q(v), p~(v))``
over the directly mapped vocabulary (``q`` as verification reads it: folded over twins, and across
vocabularies split tokens' mass on their first piece, a TLI drafter's law over the directly mapped ids;
``p~`` the target's law there; both at the request's temperature and filtered by its top-k and top-p, as
drafting and verification filter them), which is ``1[argmax q = argmax p~]`` when greedy. A head with the
confidence input reads the drafted token ``y``, so its label is that token's acceptance,
``min(1, p~(y)/q(y))`` (``1[y = argmax p~]`` when greedy). Under exact-match verification they are
``sum_v q(v) p~(v)`` and ``p~(y)``, as verification's own labels are (the same when greedy).

Across vocabularies the target's logits are kept at the directly mapped ids only, and verification reads
the target's law over its whole vocabulary, which puts less on each of them wherever the target gives
mass to tokens without a drafter twin (renormalised over them, the labels came out 0.88 on average where
verification's were 0.79, tests/test_learning.py), and whose top-k and top-p keep the tokens the whole
vocabulary ranks highest. So the round keeps, per emitted token, two numbers of that law (``target_law``):
the smallest logit its filters keep, ``c``, and its log-normaliser ``n = log sum_{z_t >= c} exp(z_t / T)``
over the whole vocabulary (the argmax's logit, when greedy), and ``p~(t) = exp(z_t / T - n) [z_t >= c]``
at the mapped ids: the target's own law there, so that a drafted token's recomputed label is
verification's, filtered or not, greedy or sampled. Approximate are: a fresh draft's split tokens (counted
at their first piece, as if every later piece were accepted), a drafted split token's label (0: it has no
twin), and a request's logits processors (repetition penalty, min-p, ...), which the target's kept logits,
the model's own, do not replay.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SamplingParams
from .kernels.proposal import fold_twins_
from .kernels.sampling import sampling_probs_reference

__all__ = [
    "AcceptanceHead",
    "DraftLength",
    "acceptance_loss",
    "confidence_logit",
    "expected_acceptance",
    "stop_drafting",
    "target_law",
]


class AcceptanceHead(torch.nn.Module):
    """``a`` of the module docstring. The untrained head predicts ``prior`` everywhere, or with
    ``confidence_input`` the drafter's confidence."""

    def __init__(self, hidden_size: int, blocks: int = 2, prior: float = 0.8, confidence_input: bool = False):
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.Linear(hidden_size, hidden_size) for _ in range(blocks))
        self.out = torch.nn.Linear(hidden_size, 1)
        for block in self.blocks:
            torch.nn.init.zeros_(block.weight)  # residual blocks start as the identity
            torch.nn.init.zeros_(block.bias)
        torch.nn.init.zeros_(self.out.weight)
        torch.nn.init.constant_(self.out.bias, 0.0 if confidence_input else math.log(prior / (1 - prior)))
        self.confidence_weight = torch.nn.Parameter(torch.ones(())) if confidence_input else None

    @property
    def confidence_input(self) -> bool:
        return self.confidence_weight is not None

    def logits(self, hidden: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] (and [...] ``confidence_logit``, with ``confidence_input``) -> [...] pre-sigmoid outputs."""
        x = hidden.float()
        for block in self.blocks:
            x = x + F.silu(block(x))
        out = self.out(x)[..., 0]
        if self.confidence_weight is not None:
            out = out + self.confidence_weight * confidence.detach().float()
        return out

    def forward(self, hidden: torch.Tensor, confidence: torch.Tensor | None = None) -> torch.Tensor:
        """[..., H] (and [...] logit(c)) -> [...] acceptance probabilities."""
        return self.logits(hidden, confidence).sigmoid()


def confidence_logit(
    logits: torch.Tensor,  # [..., V_d] the drafter's logits where it drafted (or predicted) a token
    ids: torch.Tensor,  # [...] that token
) -> torch.Tensor:  # [...] fp32 logit(q(y)) at T=1, kept finite
    """The head's confidence input: ``logit(c)`` with ``c`` the drafter's T=1 probability of the token."""
    log_c = logits.float().log_softmax(-1).gather(-1, ids[..., None])[..., 0].clamp(-30.0, -1e-6)
    return log_c - torch.log(-torch.expm1(log_c))


def stop_drafting(
    log_keep: torch.Tensor,  # [batch] sum of log a_j over the tokens drafted so far
    drafted: int,  # tokens drafted so far (the same for every row still drafting)
    gamma: float,
    k_min: int,
) -> torch.Tensor:  # [batch] bool
    """Rows whose probability of a rejection among their drafted tokens passed ``gamma``."""
    return (-torch.expm1(log_keep) > gamma) & (drafted >= k_min)


class DraftLength:
    """A round's per-row stopping state: :meth:`reset` it at the round's start, then feed it each draft
    step; rows that stopped stay stopped. Its tensors are updated in place (a captured round reads them
    where they are, ``graphs.py``).

    Two stopping rules, each optional, a row stopping at the first that says so:

    - ``head``: the acceptance head's rule of the module docstring (``gamma``, ``k_min``);
    - ``confidence``: the drafter's own probability of the token it just drafted below ``confidence``
      (transformers' ``assistant_confidence_threshold``; the token is still proposed). It needs no training,
      and it is lossless like any rule that reads only the drafter's outputs.
    """

    def __init__(
        self,
        head: AcceptanceHead | None,
        batch: int,
        gamma: float,
        k_min: int,
        device: torch.device,
        confidence: float | None = None,
    ):
        if head is None and confidence is None:
            raise ValueError("DraftLength needs a stopping rule: an acceptance `head` and/or a `confidence`")
        self.head, self.gamma, self.k_min, self.confidence = head, gamma, k_min, confidence
        self.log_keep = torch.zeros(batch, dtype=torch.float32, device=device)  # sum log a_j
        self.stopped = torch.zeros(batch, dtype=torch.bool, device=device)
        self.drafted = torch.zeros(batch, dtype=torch.int64, device=device)  # [batch] tokens

    def reset(self, done: torch.Tensor) -> None:
        """A new round; ``done`` [batch] bool rows count as stopped from the start."""
        self.log_keep.zero_()
        self.stopped.copy_(done)
        self.drafted.zero_()

    def step(
        self,
        drafted: int,
        hidden: torch.Tensor | None,
        confidence: torch.Tensor | None,
        head_input: torch.Tensor | None = None,
    ) -> None:
        """Token number ``drafted`` (1-based) was drafted: ``hidden`` [batch, H] the states that drafted it
        (with a head), ``confidence`` [batch] the drafter's probability of it (with a threshold),
        ``head_input`` [batch] its ``confidence_logit`` (with a head that reads it)."""
        drafting = ~self.stopped
        self.drafted += drafting
        if self.head is not None:
            self.log_keep += torch.where(drafting, self.head(hidden, head_input).clamp_min(1e-6).log(), 0.0)
            self.stopped |= stop_drafting(self.log_keep, drafted, self.gamma, self.k_min)
        if self.confidence is not None:
            self.stopped |= confidence < self.confidence


def acceptance_loss(
    logits: torch.Tensor,  # [...] the head's pre-sigmoid outputs
    labels: torch.Tensor,  # [...] soft labels in [0, 1]
    reject_weight: float,
    mask: torch.Tensor | None = None,  # [...] bool: the labelled positions (fixed shapes); None: all
) -> torch.Tensor:  # []
    """Weighted binary cross-entropy of the module docstring (from logits, for stability), the mean over
    the labelled positions."""
    labels = labels.float()
    loss = labels * F.softplus(-logits) + reject_weight * (1 - labels) * F.softplus(logits)
    if mask is None:
        return loss.mean() if labels.numel() else logits.sum() * 0.0
    return torch.where(mask, loss, 0.0).sum() / mask.sum().clamp_min(1)


@torch.no_grad()
def expected_acceptance(
    logits: torch.Tensor,  # [n, V_d] the current drafter's logits
    target_logits: torch.Tensor,  # [n, V_d] the target's logits in drafter ids
    support: torch.Tensor,  # [V_d] bool directly mapped drafter ids
    twins: torch.Tensor,  # [2, D] int64
    sampling: SamplingParams,
    tokens: torch.Tensor | None = None,  # [n] int64 canonical drafter ids of drafted tokens
    exact_match: bool = False,
    law: torch.Tensor | None = None,  # [n, 2] fp32 the target's law over its vocabulary (target_law)
    draftable: torch.Tensor | None = None,  # [V_d] bool the ids the drafter may draft (TLI); None: all
) -> torch.Tensor:  # [n] fp32
    """The recomputed label of the module docstring: ``q`` and ``p~`` filtered as the request samples them,
    one-hot when greedy; with ``tokens``, the acceptance of those drafted tokens instead of a fresh draft's;
    with ``exact_match``, the acceptance of verification by exact match instead of speculative sampling's.
    Without ``law``, ``p~`` is the target's law over the support alone (the law of a shared vocabulary)."""
    drawn = sampling.temperature, sampling.top_k, sampling.top_p
    logits = logits if draftable is None else logits.masked_fill(~draftable, -torch.inf)
    q = fold_twins_(sampling_probs_reference(logits, *drawn), twins).masked_fill(~support, 0.0)
    z = target_logits.float().masked_fill(~support, -torch.inf)
    if law is None:
        p = sampling_probs_reference(z, *drawn)
    else:
        log_norm, cut = law[:, :1], law[:, 1:]
        if sampling.greedy:  # one-hot at the argmax, where the whole vocabulary's argmax has a twin
            p = sampling_probs_reference(z, *drawn) * (z.amax(-1, keepdim=True) >= cut)
        else:
            p = torch.where(z >= cut, (z / sampling.temperature - log_norm).exp(), 0.0)
    if tokens is None:
        return (q * p if exact_match else torch.minimum(q, p)).sum(-1)
    q_y, p_y = q.gather(1, tokens[:, None])[:, 0], p.gather(1, tokens[:, None])[:, 0]
    if exact_match:  # a draw from p~ must be y, whatever the drafter's probability of it
        return p_y
    # min(1, p/q); where the current drafter would not draft y (q = 0), whether the target would keep it
    return torch.where(q_y > 0, (p_y / q_y.clamp_min(1e-30)).clamp(max=1.0), (p_y > 0).float())


def target_law(
    target_logits: torch.Tensor,  # [..., V_t] the target's logits
    sampling: SamplingParams,
) -> torch.Tensor:  # [..., 2] fp32
    """``(n, c)`` of the module docstring: the log-normaliser of the request's law over the target's whole
    vocabulary (temperature, top-k and top-p applied; 0 when greedy) and the smallest logit it keeps (the
    largest when greedy; -inf unfiltered). Reads the target's whole vocabulary once (with top-k or top-p,
    the filters too)."""
    z = target_logits.float()
    if sampling.greedy:
        return torch.stack([torch.zeros_like(z[..., 0]), z.amax(-1)], -1)
    t = sampling.temperature
    if not (sampling.top_k or sampling.top_p < 1.0):
        return torch.stack([(z / t).logsumexp(-1), torch.full_like(z[..., 0], -torch.inf)], -1)
    kept = sampling_probs_reference(z, t, sampling.top_k, sampling.top_p) > 0
    cut = z.masked_fill(~kept, torch.inf).amin(-1)
    return torch.stack([(z / t).masked_fill(~kept, -torch.inf).logsumexp(-1), cut], -1)
