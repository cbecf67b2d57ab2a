"""Online hybrid distillation of the drafter (OmniDraft, SPEC §4): the LoRA adapter and the loss.

At a drafter position ``u`` whose emitted target token ``t`` has a drafter twin, the drafter learns the
target's next-token distribution by reverse KL over the directly mapped vocabulary ``S`` (canonical
drafter ids with a target twin; every id when the vocabulary is shared):

    q~(v) = q_fold(v) / sum_{w in S} q_fold(w)         q_fold: q with each twin's mass on its canonical id
    p~(v) = softmax_{w in S}(z_t[d2t[w]])(v)            z_t: the target's logits at that position
    KL(q~ || p~) = sum_{v in S} q~(v) (log q~(v) - log p~(v))

Where ``t`` has no twin (an n-gram token, spelled by several drafter tokens), each of its drafter
sub-tokens ``d`` adds ``lambda * -log q(d)``. The loss is the mean over the labelled positions.
Reverse KL is mode-seeking: the drafter spends its small capacity on the target's likely tokens, which
is what acceptance rewards.

The adapter is a peft LoRA adapter injected into the drafter in place (one per target, by name), in
fp32 whatever the drafter's dtype. Training runs it unmerged. Serving runs it merged: each adapted
layer's weight tensor is swapped for ``W + delta`` (kept beside ``W``, recomputed only after an update),
so drafting costs what the base drafter costs. Outside its engine's requests and training the drafter
module is the base model, and several engines can share one drafter.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .config import DistillConfig
from .kernels.proposal import fold_twins_

__all__ = ["LoraAdapter", "hybrid_distillation_loss", "reverse_kl"]


class LoraAdapter:
    """A named LoRA adapter on ``model`` (a Hugging Face causal LM), created with ``config``."""

    def __init__(self, model: torch.nn.Module, config: DistillConfig, name: str, merge_always: bool = False):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        existing = getattr(model, "peft_config", {}) or {}
        if name in existing:
            raise ValueError(
                f"the drafter already carries an adapter named {name!r}; give `DistillConfig(adapter_name=...)` "
                "another name"
            )
        lora = LoraConfig(
            r=config.rank,
            lora_alpha=config.lora_alpha if config.lora_alpha is not None else config.rank,
            lora_dropout=0.0,
            target_modules=list(config.target_modules)
            if isinstance(config.target_modules, tuple)
            else config.target_modules,
        )
        training = [p for p in model.parameters() if p.requires_grad]
        with warnings.catch_warnings():  # peft warns that a second adapter joins the first: it is meant to
            warnings.simplefilter("ignore")
            try:
                inject_adapter_in_model(lora, model, adapter_name=name)
            except ValueError as error:
                raise ValueError(
                    f"cannot put a LoRA adapter on the drafter ({error}); check `DistillConfig.target_modules`"
                ) from error
        # peft freezes the base model; the base weights are not ours to change.
        for parameter in training:
            parameter.requires_grad_(True)
        self.model, self.name, self.config = model, name, config
        self.layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self.parameters: list[torch.nn.Parameter] = []
        for layer in self.layers:
            for table in (layer.lora_A, layer.lora_B):
                if name in table:
                    for parameter in table[name].parameters():
                        parameter.data = parameter.data.float()  # fp32 adapter on a half drafter
                        parameter.requires_grad_(True)
                        self.parameters.append(parameter)
        if not self.parameters:
            raise ValueError(
                f"`target_modules`={config.target_modules!r} matched no linear layer of the drafter"
            )
        self.version = 0  # adapter updates so far (see `updated`)
        self._merged: list[tuple[torch.nn.Module, torch.Tensor]] = []  # (base layer, W + delta)
        self._merged_version = 0
        self._pristine: list[torch.Tensor] = []  # the base weights while the merged ones serve
        self._serving = False
        # Serve from merged copies even untrained, so that an update reaches rounds captured before it: in
        # the middle of a request (EngineConfig.in_flight_rounds), or between requests (graphs kept).
        self.merge_always = merge_always
        self._switch(None)

    def updated(self) -> None:
        """Mark the adapter's weights as changed (after an optimiser step or a load)."""
        self.version += 1

    @contextmanager
    def serving(self) -> Iterator[None]:
        """The drafter with this adapter merged into its weights, for the duration (a pointer swap).

        The LoRA layers are bypassed altogether (each calls its base layer directly), so serving pays
        nothing for the adapter's bookkeeping either."""
        self._switch(None)
        self._serve(True)
        try:
            yield
        finally:
            self._serve(False)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inside :meth:`serving`: the drafter as training sees it (base weights, LoRA layers live) for the
        duration, then serving again with the merged weights rewritten in place (no-op outside serving)."""
        if not self._serving:
            yield
            return
        self._serve(False)
        try:
            yield
        finally:
            self._serve(True)

    def _serve(self, on: bool) -> None:
        """Swap the merged weights in (and bypass the LoRA layers), or the base weights back."""
        self._serving = on
        if not on:
            for (base, _), weight in zip(self._merged, self._pristine, strict=True):
                base.weight.data = weight
            self._pristine = []
            for layer in self.layers:
                del layer.forward
            return
        for layer in self.layers:
            layer.forward = layer.get_base_layer().forward  # an instance attribute shadows the method
        if self.version == 0 and not self.merge_always:  # untrained: W + delta = W
            return
        if self._merged_version != self.version or not self._merged:
            # Written in place after the first merge: a captured round (graphs.py) that holds these
            # tensors sees every update, also one made in the middle of a request (``paused``).
            first = not self._merged
            with torch.no_grad():
                for index, layer in enumerate(layer for layer in self.layers if self.name in layer.lora_A):
                    base = layer.get_base_layer()
                    merged = base.weight.float() + layer.get_delta_weight(self.name).float()
                    if first:
                        self._merged.append((base, merged.to(base.weight.dtype)))
                    else:
                        self._merged[index][1].copy_(merged)
            self._merged_version = self.version
        self._pristine = [base.weight.data for base, _ in self._merged]
        for base, merged in self._merged:
            base.weight.data = merged

    @contextmanager
    def active(self) -> Iterator[None]:
        """Switch this adapter on (and the drafter's other adapters off) for the duration."""
        self._switch(self.name)
        try:
            yield
        finally:
            self._switch(None)

    def _switch(self, name: str | None) -> None:
        for layer in self.layers:
            if name is None:
                layer.enable_adapters(False)
            elif name in layer.lora_A:
                layer.set_adapter(name)
                layer.enable_adapters(True)
            else:
                layer.enable_adapters(False)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under peft's key names (``...q_proj.lora_A.weight``)."""
        from peft import get_peft_model_state_dict

        return get_peft_model_state_dict(self.model, adapter_name=self.name)

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors (same keys and shapes: ``state.py`` checks them)."""
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(self.model, tensors, adapter_name=self.name)
        self.updated()


def reverse_kl(
    logits: torch.Tensor,  # [P, V_d] the drafter's logits
    target_logits: torch.Tensor,  # [P, V_d] the target's logits read into drafter ids
    support: torch.Tensor,  # [V_d] bool: S
    twins: torch.Tensor,  # [2, D] int64
) -> torch.Tensor:  # [P]
    """``KL(q~ || p~)`` of the module docstring, per position."""
    # A copy to fold into: softmax's backward needs its own output unchanged.
    q = fold_twins_(logits.float().softmax(-1).clone(), twins).masked_fill(~support, 0.0)
    q = q / q.sum(-1, keepdim=True).clamp_min(1e-30)
    log_p = target_logits.float().masked_fill(~support, -torch.inf).log_softmax(-1)
    log_ratio = q.clamp_min(1e-30).log() - log_p.clamp_min(-69.0)  # p~ = 0 costs as much as 1e-30
    return torch.where(support, q * log_ratio, 0.0).sum(-1)


def hybrid_distillation_loss(
    kl_logits: torch.Tensor,  # [P, V_d] the drafter's logits at the KL positions
    kl_targets: torch.Tensor,  # [P, V_d] the target's logits there, in drafter ids
    ce_logits: torch.Tensor,  # [Q, V_d] the drafter's logits at the n-gram sub-token positions
    ce_tokens: torch.Tensor,  # [Q] int64 the sub-tokens
    support: torch.Tensor,  # [V_d] bool
    twins: torch.Tensor,  # [2, D] int64
    ngram_weight: float,
    kl_mask: torch.Tensor | None = None,  # [P] bool
    ce_mask: torch.Tensor | None = None,  # [Q] bool
) -> torch.Tensor:  # [] mean over the P + Q positions
    """The module docstring's loss. With masks only the marked positions count (fixed shapes, for a
    captured step): the mean is then over the marked positions, counted on the device. Unmarked
    positions must hold finite inputs (a NaN there would reach the gradient through ``torch.where``)."""
    kl = reverse_kl(kl_logits, kl_targets, support, twins)
    ce = F.cross_entropy(ce_logits.float(), ce_tokens, reduction="none")
    if kl_mask is None:
        return (kl.sum() + ngram_weight * ce.sum()) / max(1, kl.numel() + ce.numel())
    total = torch.where(kl_mask, kl, 0.0).sum() + ngram_weight * torch.where(ce_mask, ce, 0.0).sum()
    return total / (kl_mask.sum() + ce_mask.sum()).clamp_min(1)
