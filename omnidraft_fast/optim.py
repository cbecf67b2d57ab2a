"""AdamW whose step never reads the device, so that a captured stage (``graphs.py``) can hold it.

The online learners step both between requests (eagerly) and inside a request (a captured stage with
``EngineConfig(in_flight_rounds=n)``), on one set of moments. ``torch.optim.AdamW(capturable=True)``
keeps its step count on the device too, but refuses CPU tensors, so the CPU replay recorder could not
check it; this one is the same update (decoupled weight decay, bias-corrected moments) written as plain
in-place tensor ops:

    p <- p (1 - lr wd);   m <- b1 m + (1 - b1) g;   v <- b2 v + (1 - b2) g^2;   t <- t + 1
    p <- p - lr (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)

A step may be *gated* by a 0-d device tensor: with ``gate`` off (a window with no labels, a gradient
that is not finite) it changes nothing at all, not the parameters, the moments or the step count (the
gradient is not read: a NaN in it stays out), and the host never had to look.

Gradients are allocated once, at construction, and zeroed in place (:meth:`zero_grad`): a backward
pass then accumulates into the same tensors every time, as a replayed graph requires.
"""

from __future__ import annotations

import torch

__all__ = ["AdamW"]


class AdamW:
    """AdamW over ``params`` (module docstring): ``lr``, ``betas``, ``weight_decay``, ``eps`` as torch's."""

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        weight_decay: float = 0.01,
        eps: float = 1e-8,
    ):
        self.params: list[torch.nn.Parameter] = list(params)
        if not self.params:
            raise ValueError("AdamW got no parameters to optimise")
        self.lr, self.betas, self.weight_decay, self.eps = lr, betas, weight_decay, eps
        device = self.params[0].device
        self.steps = torch.zeros((), dtype=torch.float32, device=device)  # optimiser steps taken
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in self.params]
        for p in self.params:
            p.grad = torch.zeros_like(p)

    def zero_grad(self) -> None:
        """Zero the gradients in place (they are never set to ``None``)."""
        for p in self.params:
            if p.grad is None:  # someone reset it: allocate again (outside captured stages only)
                p.grad = torch.zeros_like(p)
            else:
                p.grad.zero_()

    @torch.no_grad()
    def step(self, gate: torch.Tensor | None = None) -> None:
        """One update from the parameters' gradients; ``gate`` (0-d bool) makes it conditional."""
        beta1, beta2 = self.betas
        on = 1.0 if gate is None else gate.float()
        self.steps += on
        t = self.steps.clamp_min(1.0)  # a gated-off first step must not divide by 1 - beta^0 = 0
        step_size = self.lr / (1 - beta1**t) * on  # 0-d tensors: no host read
        root_correction = (1 - beta2**t).sqrt()
        decay = 1 - self.lr * self.weight_decay * on
        # Multi-tensor ops: a few launches for all the parameters, not eight per parameter.
        grads = [p.grad if gate is None else torch.where(gate, p.grad, 0.0) for p in self.params]
        torch._foreach_mul_(self.params, decay)
        torch._foreach_mul_(self.exp_avg, 1 - (1 - beta1) * on)
        torch._foreach_add_(self.exp_avg, torch._foreach_mul(grads, (1 - beta1) * on))
        torch._foreach_mul_(self.exp_avg_sq, 1 - (1 - beta2) * on)
        torch._foreach_addcmul_(self.exp_avg_sq, grads, torch._foreach_mul(grads, (1 - beta2) * on))
        denom = torch._foreach_sqrt(self.exp_avg_sq)
        torch._foreach_div_(denom, root_correction)
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(self.params, torch._foreach_mul(self.exp_avg, step_size), denom, value=-1.0)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The step count and the moments: ``steps``, ``exp_avg.<i>`` and ``exp_avg_sq.<i>`` in parameter order."""
        tensors = {"steps": self.steps}
        for index, (m, v) in enumerate(zip(self.exp_avg, self.exp_avg_sq, strict=True)):
            tensors[f"exp_avg.{index}"], tensors[f"exp_avg_sq.{index}"] = m, v
        return tensors

    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore :meth:`state_dict`'s tensors (same keys and shapes), in place: captured stages keep
        reading the same memory."""
        with torch.no_grad():
            for name, tensor in self.state_dict().items():
                tensor.copy_(tensors[name])
