"""The EM subspace layer of EMCL (docs/reference.md, 'The EM layer'), the paper's contribution.

The D feature channels of a batch ``X`` (N samples x D channels) are treated as EM data points in
sample space; K bases ``U`` (N x K) are fitted by T rounds of EM, and the low-rank reconstruction
``R = U Z^T`` is added back: ``Y = X + beta * R``. EM and ``R`` carry no gradient, so gradients reach the
network only through the identity term. The state ``mu`` (one 1 x K row per modality) seeds the bases
and follows a momentum update in training.

The functional core :func:`em_reconstruct` works on any leading batch shape, so the blocked evaluation
of the reference runs every block in one batched call instead of a Python loop.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

Init = Literal["upstream", "gaussian", "linspace"]
LamdMode = Literal["divide", "multiply"]


@torch.no_grad()
def em_reconstruct(
    x: torch.Tensor,
    mu: torch.Tensor,
    stage_num: int,
    lamd: float = 1.0,
    lamd_mode: LamdMode = "divide",
    eps: float = 1e-6,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run T EM rounds on ``x`` (..., N, D) from bases seeded by ``mu`` (..., 1, K).

    Returns the reconstruction ``R`` (..., N, D) and the final bases ``U`` (..., N, K), without gradient,
    in float32 (float64 for float64 input). Leading dimensions of ``x`` and ``mu`` broadcast.

    Conditioning: bases seeded by equal ``mu`` entries form an unstable fixed point. With few channels
    (small D) and a sharp softmax (small lambda) round-off can split them apart, so two correct
    implementations may then disagree; at the real sizes (D = 512, N >= 100) float32 agrees with
    float64 to ~1e-7 (tests/test_em.py).
    """
    dtype = torch.promote_types(x.dtype, torch.float32)
    x = x.to(dtype)
    mu = mu.to(dtype)
    n = x.shape[-2]
    scale = (1.0 / lamd) if lamd_mode == "divide" else lamd
    # U^0 = 1_N mu: every row the same. Materialised: a stride-0 operand sends matmul down a slow path
    # (10x the CPU time of the whole paper-block scoring with 2 threads).
    u = mu.expand(*mu.shape[:-2], n, mu.shape[-1]).contiguous()
    xt = x.transpose(-1, -2)  # (..., D, N)
    z = x.new_zeros(())
    for _ in range(stage_num):
        z = torch.softmax(torch.matmul(xt, u) * scale, dim=-1)  # (..., D, K), softmax over K
        z = z / (eps + z.sum(dim=-2, keepdim=True))  # column sums over D
        u = torch.matmul(x, z)  # (..., N, K)
        u = u / (eps + u.norm(dim=-2, keepdim=True))  # column L2 norms over N
    r = torch.matmul(u, z.transpose(-1, -2))  # (..., N, D)
    return r, u


def init_mu(shape: tuple[int, ...], init: Init, generator: torch.Generator | None = None) -> torch.Tensor:
    """Initial ``mu`` of ``shape`` (1, K) or (M, 1, K).

    ``upstream``: the reference's ``g / (1e-6 + ||g||)`` with the norm over dim 0, g ~ N(0, 2/K). For a
    single modality every entry is +-1, so bases of equal sign stay identical: at most two distinct bases.
    For (M, 1, K) the norm runs across modalities, as in the reference's MMT variant.
    ``gaussian``: the same draw without normalisation: K distinct values, so K distinct bases.
    ``linspace``: K evenly spaced values in [-1, 1], deterministic and well conditioned.
    """
    k = shape[-1]
    if init == "upstream":
        g = torch.randn(shape, generator=generator) * math.sqrt(2.0 / k)
        return g / (1e-6 + g.norm(dim=0, keepdim=True))
    if init == "gaussian":
        return torch.randn(shape, generator=generator) * math.sqrt(2.0 / k)
    if init == "linspace":
        return torch.linspace(-1.0, 1.0, k).expand(shape).clone()
    raise ValueError(f"unknown EMCL init {init!r}; choose upstream, gaussian or linspace")


class EMCL(nn.Module):
    """EM subspace layer: ``forward(x)`` returns ``x + beta * R`` with the same shape and dtype as ``x``.

    Args:
        k: number of bases K.
        stage_num: EM iterations T.
        momentum: rho of the training-time update of ``mu``.
        lamd: softmax temperature lambda.
        beta: weight of the reconstruction.
        init: initialisation of ``mu`` (see :func:`init_mu`); ``upstream`` is the reference's.
        num_modalities: None for the (N, D) form with ``mu`` (1, K); M for the batched (M, N, D) form
            with ``mu`` (M, 1, K), as in the MMT variant.
        lamd_mode: ``divide`` (EMCL-Net, inference module) or ``multiply`` (the MMT variant).
        normalize_output: L2-normalise the output over D (the MMT variant).
        sync_ranks: average the ``mu`` update over ``torch.distributed`` ranks so all hold the same.
        seed: seed of the ``mu`` draw, so a model built twice starts identical.
    """

    mu: torch.Tensor

    def __init__(
        self,
        k: int = 32,
        stage_num: int = 9,
        momentum: float = 0.9,
        lamd: float = 1.0,
        beta: float = 3.0,
        init: Init = "upstream",
        num_modalities: int | None = None,
        lamd_mode: LamdMode = "divide",
        normalize_output: bool = False,
        sync_ranks: bool = True,
        seed: int | None = 0,
    ) -> None:
        super().__init__()
        if k < 1 or stage_num < 1:
            raise ValueError(f"EMCL needs k >= 1 and stage_num >= 1, got k={k}, stage_num={stage_num}")
        if lamd_mode not in ("divide", "multiply"):
            raise ValueError(f"lamd_mode must be 'divide' or 'multiply', got {lamd_mode!r}")
        self.k, self.stage_num, self.momentum = k, stage_num, momentum
        self.lamd, self.beta, self.init = lamd, beta, init
        self.num_modalities, self.lamd_mode = num_modalities, lamd_mode
        self.normalize_output, self.sync_ranks = normalize_output, sync_ranks
        shape = (1, k) if num_modalities is None else (num_modalities, 1, k)
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("mu", init_mu(shape, init, gen))

    def extra_repr(self) -> str:
        return (
            f"k={self.k}, stage_num={self.stage_num}, momentum={self.momentum}, lamd={self.lamd}, "
            f"beta={self.beta}, init={self.init!r}, lamd_mode={self.lamd_mode!r}, "
            f"normalize_output={self.normalize_output}, modalities={self.num_modalities}"
        )

    def _check(self, x: torch.Tensor) -> None:
        want = 2 if self.num_modalities is None else 3
        if x.dim() != want:
            form = "(N, D)" if want == 2 else f"({self.num_modalities}, N, D)"
            raise ValueError(f"EMCL expects input of shape {form}, got {tuple(x.shape)}")
        if want == 3 and x.shape[0] != self.num_modalities:
            raise ValueError(f"EMCL built for {self.num_modalities} modalities, got {x.shape[0]}")

    def reconstruct(self, x: torch.Tensor, update: bool | None = None) -> torch.Tensor:
        """The reconstruction ``R`` (no gradient); updates ``mu`` when ``update`` (default: in training)."""
        self._check(x)
        update = self.training if update is None else update
        with torch.autocast(device_type=x.device.type, enabled=False):
            r, u = em_reconstruct(x.detach(), self.mu, self.stage_num, self.lamd, self.lamd_mode)
            if update:
                self._update_mu(u)
        return r

    @torch.no_grad()
    def _update_mu(self, u: torch.Tensor) -> None:
        new = u.mean(dim=-2, keepdim=True)  # mean over rows: (1, K) or (M, 1, K)
        if self.sync_ranks and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(new, op=dist.ReduceOp.SUM)
            new = new / dist.get_world_size()
        self.mu.mul_(self.momentum).add_(new.to(self.mu.dtype), alpha=1.0 - self.momentum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.reconstruct(x)
        y = x + (self.beta * r).to(x.dtype)
        if self.normalize_output:
            y = F.normalize(y, dim=-1)
        return y


@dataclass(frozen=True)
class EMSettings:
    """The settings of a model's EMCL layer (the flags ``--centerK --stage_num --momentum --lamd --beta
    --em_init`` and the run's seed); a model without EMCL takes ``None`` instead."""

    k: int = 32
    stage_num: int = 9
    momentum: float = 0.9
    lamd: float = 1.0
    beta: float = 3.0
    init: Init = "upstream"
    seed: int = 0

    def layer(self, **extra: Any) -> EMCL:
        """The layer, with ``extra`` arguments of :class:`EMCL` (e.g. MMT's per-modality options)."""
        return EMCL(k=self.k, stage_num=self.stage_num, momentum=self.momentum, lamd=self.lamd,
                    beta=self.beta, init=self.init, seed=self.seed, **extra)
