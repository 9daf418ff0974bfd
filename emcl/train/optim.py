"""Optimiser parameter groups, the reference's Adam, and warmup + cosine schedules."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

# the reference decays every parameter whose name lacks these (CLIP's ln_* weights are decayed)
REFERENCE_NO_DECAY = ("bias", "LayerNorm.bias", "LayerNorm.weight")


def param_groups(
    model: nn.Module,
    lr: float,
    coef_lr: float,
    weight_decay: float,
    backbone_prefix: str = "clip.",
    faithful: bool = False,
) -> list[dict]:
    """Four groups: {backbone, new} x {decay, no decay}; the backbone learns at ``lr * coef_lr``.

    Ours excludes every parameter of fewer than two dimensions (biases, norm gains, ``logit_scale``,
    class/position embeddings stay 2-D and decay) from weight decay; ``faithful`` uses the reference's
    name rule instead, which decays CLIP's LayerNorm weights and ``logit_scale``.
    """
    groups: dict[tuple[bool, bool], list[torch.Tensor]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        name = name.removeprefix("module.")
        backbone = name.startswith(backbone_prefix)
        if faithful:
            decay = not any(nd in name for nd in REFERENCE_NO_DECAY)
        else:
            decay = p.ndim >= 2 and not name.endswith(("positional_embedding", "class_embedding"))
        groups.setdefault((backbone, decay), []).append(p)
    out = []
    for (backbone, decay), params in sorted(groups.items()):
        out.append(
            {
                "params": params,
                "lr": lr * coef_lr if backbone else lr,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{'backbone' if backbone else 'new'}_{'decay' if decay else 'no_decay'}",
            }
        )
    return out


class ReferenceAdam(torch.optim.Optimizer):
    """The reference's BertAdam step: Adam without bias correction, decoupled weight decay added to
    the update before the learning rate (``p -= lr * (m / (sqrt(v) + eps) + wd * p)``).

    Used only under ``--faithful``; gradient clipping is done by the training loop as for AdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas=(0.9, 0.98),
        eps: float = 1e-6,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):  # noqa: D102 - torch API
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                m, v = state["exp_avg"], state["exp_avg_sq"]
                m.mul_(b1).add_(p.grad, alpha=1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = m / (v.sqrt() + group["eps"])
                if group["weight_decay"]:
                    update.add_(p, alpha=group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss


def build_optimizer(
    groups: list[dict], faithful: bool, betas=(0.9, 0.98), eps: float = 1e-6
) -> torch.optim.Optimizer:
    """AdamW (fused where the parameters live on CUDA) or, under ``faithful``, :class:`ReferenceAdam`."""
    if faithful:
        return ReferenceAdam(groups, betas=betas, eps=eps)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, betas=betas, eps=eps, fused=on_cuda or None)


def warmup_cosine(total_steps: int, warmup: float = 0.1, faithful: bool = False):
    """Multiplier of the base lr at step ``s``: linear warmup over ``warmup * total`` steps, then cosine
    to zero over the rest. ``faithful``: the reference's curve, cosine over the whole run's progress
    (``0.5 * (1 + cos(pi * s / total))`` after warmup), which jumps down slightly at the warmup's end."""
    total = max(1, total_steps)
    n_warm = warmup * total

    def fn(step: int) -> float:
        if step < n_warm:
            return (step + 1) / max(1.0, n_warm) if not faithful else step / n_warm
        progress = (step - n_warm) / max(1.0, total - n_warm) if not faithful else step / total
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return fn


def build_scheduler(
    optimizer: torch.optim.Optimizer, total_steps: int, warmup: float = 0.1, faithful: bool = False
) -> LambdaLR:
    """torch's LambdaLR over :func:`warmup_cosine`, stepped once per optimiser step."""
    return LambdaLR(optimizer, warmup_cosine(total_steps, warmup, faithful))
