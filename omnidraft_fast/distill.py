"""Online hybrid distillation of the drafter (OmniDraft, SPEC §4): the LoRA adapter and the loss.

At a drafter position ``u`` whose emitted target token ``t`` has a drafter twin, the drafter learns the
target's next-token distribution by reverse KL over the directly mapped vocabulary ``S`` (canonical
drafter ids with a target twin; every id when the vocabulary is shared):

    q~(v) = q_fold(v) / sum_{w in S} q_fold(w)         q_fold: q with each twin's mass on its canonical id
    p~(v) = softmax_{w in S}(z_t[d2t[w]])(v)            z_t: the target's logits at that position
    KL(q~ || p~) = sum_{v in S} q~(v) (log q~(v) - log p~(v))

Where ``t`` has no twin (an n-gram token, spelled by several drafter tokens), each of its drafter
sub-tokens ``d`` adds ``lambda * -log q(d)``, and so does a drafted split token ``d`` whose target pieces
were all emitted (``EngineConfig.split_tokens``; its pieces get no KL). The loss is the mean over the labelled positions.
Reverse KL is mode-seeking: the drafter spends its small capacity on the target's likely tokens, which
is what acceptance rewards.

The adapter is a peft LoRA adapter built on the drafter (one per target, by name), in fp32 whatever the
drafter's dtype. Training runs it unmerged, its LoRA layers put into the drafter for the step only.
Serving runs it merged: each adapted layer's weight tensor is swapped for ``W + delta`` (kept beside
``W``, recomputed only after an update), so drafting costs what the base drafter costs. Outside a
training step the drafter's modules are its own, and several engines can share one drafter.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F

from .config import DistillConfig
from .kernels.proposal import fold_twins_

__all__ = ["LoraAdapter", "adapter_names", "hybrid_distillation_loss", "reverse_kl"]


# model -> {adapter name: the LoraAdapter (weakly)}: the names taken on a drafter by live engines
_ADAPTERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adapter_names(model: torch.nn.Module) -> set[str]:
    """The names of the live engines' adapters on ``model``."""
    return {name for name, ref in _ADAPTERS.get(model, {}).items() if ref() is not None}


class LoraAdapter:
    """A named LoRA adapter on ``model`` (a Hugging Face causal LM), created with ``config``.

    peft builds the LoRA layers around the drafter's projections, but they are put in the drafter only for
    training (:meth:`active`): outside it the drafter's modules are its own again (its ``state_dict``,
    ``save_pretrained``, ``load_state_dict``, ``.to()`` see the base model), and the layers go away with the
    adapter. ``frozen``: parameters that must not be adapted (the target's: a drafter sharing weights with
    its target would change the target's law when served merged)."""

    def __init__(
        self,
        model: torch.nn.Module,
        config: DistillConfig,
        name: str,
        merge_always: bool = False,
        frozen: Iterable[torch.nn.Parameter] = (),
    ):
        from peft import LoraConfig, inject_adapter_in_model
        from peft.tuners.lora import LoraLayer

        if name in adapter_names(model) or name in (getattr(model, "peft_config", None) or {}):
            raise ValueError(
                f"the drafter already carries an adapter named {name!r}; give `DistillConfig(adapter_name=...)` "
                "another name"
            )
        foreign = next((n for n, m in model.named_modules() if isinstance(m, LoraLayer)), None)
        if foreign is not None:
            raise ValueError(
                f"the drafter carries peft LoRA layers of its own (at `{foreign}`), which online distillation "
                "would switch off: merge them into its weights first (peft's `merge_and_unload()`)"
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
        had_config = "peft_config" in vars(model)
        peft_config = vars(model).get("peft_config")
        self.model, self.name = model, name
        try:
            with warnings.catch_warnings():  # peft warns about Conv1D layers (GPT-2): handled
                warnings.simplefilter("ignore")
                try:
                    inject_adapter_in_model(lora, model, adapter_name=name)
                except ValueError as error:
                    raise ValueError(
                        f"cannot put a LoRA adapter on the drafter ({error}); check `DistillConfig.target_modules`"
                    ) from error
        finally:
            # peft freezes the base model and leaves its config on it: the drafter is not ours to change.
            for parameter in training:
                parameter.requires_grad_(True)
            if had_config:
                # peft added ours to the drafter's dict in place: taken out (the name was not there before)
                model.peft_config = peft_config
                if isinstance(peft_config, dict):
                    peft_config.pop(name, None)
            else:
                vars(model).pop("peft_config", None)
            # (parent module, attribute, LoRA layer, qualified name) of every layer peft put in, also before
            # failing on a later module: all out of the drafter until `active` (it is left as it was)
            self._slots = [
                (
                    model.get_submodule(qualified.rpartition(".")[0]),
                    qualified.rpartition(".")[2],
                    layer,
                    qualified,
                )
                for qualified, layer in model.named_modules()
                if isinstance(layer, LoraLayer)
            ]
            self._detach()
        self._check(frozen)
        self.layers = [layer for *_, layer, _ in self._slots]
        self.parameters: list[torch.nn.Parameter] = []
        for layer in self.layers:
            # The layers are this adapter's alone (peft built them around the drafter's own modules), so
            # it is on in them for good: `active` only puts them in the drafter and takes them out.
            layer.set_adapter(name)
            layer.enable_adapters(True)
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
        _ADAPTERS.setdefault(model, {})[name] = weakref.ref(self)
        self.version = 0  # adapter updates so far (see `updated`)
        self._merged: list[tuple[torch.nn.Module, torch.Tensor]] = []  # (base layer, W + delta)
        self._merged_version = 0
        self._merged_from: list[int] = []  # the base weights' version counters at the merge
        # (layer, its own weight) for each layer whose merged weight serves
        self._pristine: list[tuple[torch.nn.Module, torch.Tensor]] = []
        self._serving = False
        # Serve from merged copies even untrained, so that an update reaches rounds captured before it: in
        # the middle of a request (EngineConfig.in_flight_rounds), or between requests (graphs kept).
        self.merge_always = merge_always

    @property
    def scaling(self) -> float:
        """The factor of the adapter's update ``B A`` (LoRA's ``lora_alpha / r``)."""
        return float(self.layers[0].scaling[self.name])

    def _check(self, frozen: Iterable[torch.nn.Parameter]) -> None:
        """Refuse layers whose weight is shared: with the target (``frozen``), or with another module of the
        drafter (a tied LM head: serving its merged weight would change the tied embedding too)."""
        frozen = list(frozen)
        frozen_ids = {id(p) for p in frozen}
        frozen_storage = {p.untyped_storage().data_ptr() for p in frozen if p.device.type != "meta"}
        counts: dict[int, int] = {}
        for _, parameter in self.model.named_parameters(remove_duplicate=False):
            counts[id(parameter)] = counts.get(id(parameter), 0) + 1
        for *_, layer, qualified in self._slots:
            weight = layer.get_base_layer().weight
            if id(weight) in frozen_ids or (
                weight.device.type != "meta" and weight.untyped_storage().data_ptr() in frozen_storage
            ):
                raise ValueError(
                    f"the drafter's `{qualified}` shares its weight with the target: a LoRA adapter on it would "
                    "change the target's output; distil a separate drafter (e.g. `copy.deepcopy(drafter)`)"
                )
            if counts.get(id(weight), 0) > 1:
                raise ValueError(
                    f"the drafter's `{qualified}` shares its weight with another of its modules (tied "
                    "embeddings?): leave it out of `DistillConfig.target_modules`"
                )
            if self.name not in layer.lora_A:  # peft LoRA on an embedding (lora_embedding_*): never trained
                raise ValueError(
                    f"the drafter's `{qualified}` is not a linear layer: leave it out of "
                    "`DistillConfig.target_modules`"
                )

    def _attach(self) -> None:
        for parent, attribute, layer, _ in self._slots:
            setattr(parent, attribute, layer)

    def _detach(self) -> None:
        for parent, attribute, layer, _ in self._slots:
            setattr(parent, attribute, layer.base_layer)

    def updated(self) -> None:
        """Mark the adapter's weights as changed (after an optimiser step or a load)."""
        self.version += 1

    @contextmanager
    def serving(self) -> Iterator[None]:
        """The drafter with this adapter merged into its weights, for the duration (a pointer swap): the
        drafter's own modules, so serving pays nothing for the adapter's bookkeeping."""
        try:  # a swap cut short (an exception, Ctrl-C) is undone too: the drafter's own weights come back
            self._serve(True)
            yield
        finally:
            _cleanup(self._serve, False)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Inside :meth:`serving`: the drafter's base weights for the duration (training puts the LoRA layers
        in, :meth:`active`), then serving again with the merged weights rewritten in place (no-op outside
        serving)."""
        if not self._serving:
            yield
            return
        self._serve(False)
        try:
            yield
        finally:
            self._serve(True)

    def _serve(self, on: bool) -> None:
        """Swap the merged weights in, or the base weights back. ``_pristine`` holds (layer, its own weight)
        for every layer swapped, recorded before the swap and dropped one by one as each is restored, so a
        swap or a restore cut short by an exception is completed by the next call instead of being lost."""
        # First restore whatever is still swapped in (also the remains of an interrupted swap or restore):
        # a merged tensor must never be taken for the drafter's own weight.
        while self._pristine:
            base, weight = self._pristine[-1]
            base.weight.data = weight
            self._pristine.pop()
        self._serving = on
        if not on:
            return
        if self.version == 0 and not self.merge_always:  # untrained: W + delta = W
            return
        bases = [layer.get_base_layer() for layer in self.layers if self.name in layer.lora_A]
        # The caller may have cast the drafter (merged copies of another dtype or device: new ones) or
        # loaded weights into it in place (seen by their version counters: merged again, in place).
        rebuild = not self._merged or any(
            merged.dtype != base.weight.dtype or merged.device != base.weight.device
            for base, merged in self._merged
        )
        stale = rebuild or self._merged_from != [base.weight._version for base in bases]
        if self._merged_version != self.version or stale:
            # Written in place after the first merge: a captured round (graphs.py) that holds these
            # tensors sees every update, also one made in the middle of a request (``paused``).
            with torch.no_grad():
                merged_weights = []
                for layer, base in zip(
                    (layer for layer in self.layers if self.name in layer.lora_A), bases, strict=True
                ):
                    delta = layer.get_delta_weight(self.name).to(base.weight.device)
                    merged_weights.append(base.weight.float() + delta.float())
                if rebuild:
                    self._merged = [
                        (base, merged.to(base.weight.dtype))
                        for base, merged in zip(bases, merged_weights, strict=True)
                    ]
                else:
                    for (_, kept), merged in zip(self._merged, merged_weights, strict=True):
                        kept.copy_(merged)
            self._merged_version = self.version
            self._merged_from = [base.weight._version for base in bases]
        self._pristine = [(base, base.weight.data) for base, _ in self._merged]
        for base, merged in self._merged:
            base.weight.data = merged

    @contextmanager
    def active(self) -> Iterator[None]:
        """Put the LoRA layers, this adapter on in them, in the drafter for the duration."""
        try:
            self._attach()
            yield
        finally:
            _cleanup(self._detach)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The adapter's weights under peft's key names (``...q_proj.lora_A.weight``)."""
        tensors = {}
        for *_, layer, qualified in self._slots:
            if self.name in layer.lora_A:
                tensors[f"{qualified}.lora_A.weight"] = layer.lora_A[self.name].weight
                tensors[f"{qualified}.lora_B.weight"] = layer.lora_B[self.name].weight
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors (same keys and shapes: ``state.py`` checks them), in place."""
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor.copy_(tensors[name])
        self.updated()


def _cleanup(restore, *args) -> None:
    """``restore(*args)`` in a ``finally`` that gives the caller's drafter back: an exception landing in it (a
    Ctrl-C) runs it once more, to the end, before going on (it is idempotent)."""
    try:
        restore(*args)
    except BaseException:
        restore(*args)
        raise


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
