"""Distributed helpers: single-process no-ops, and a 2-process gloo run on CPU.

The gradient test checks the scaling documented in emcl.dist: with every rank computing the same
contrastive loss on the gathered full batch and parameter gradients averaged like DDP,
``reduce_grads=True`` equals the single-process full-batch gradient, ``reduce_grads=False`` equals 1/W of it.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from emcl.dist import (
    DistInfo,
    all_gather_object_list,
    all_gather_with_grad,
    barrier,
    cleanup,
    gather_tensors_no_grad,
    get_rank,
    get_world_size,
    init_distributed,
    is_dist,
    is_main,
    reduce_mean,
    seed_everything,
)

WORLD = 2
ROWS_PER_RANK = 3
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _problem() -> tuple[torch.Tensor, torch.Tensor, torch.nn.ModuleDict]:
    """Fixed inputs for the whole batch and two small encoders, identical in every process."""
    g = torch.Generator().manual_seed(0)
    n = WORLD * ROWS_PER_RANK
    text, video = torch.randn(n, 5, generator=g), torch.randn(n, 5, generator=g)
    torch.manual_seed(1)
    heads = torch.nn.ModuleDict({"t": torch.nn.Linear(5, 4), "v": torch.nn.Linear(5, 4)})
    return text, video, heads


def _contrastive(t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE on the full batch: every row's gradient depends on every other row."""
    logits = 5.0 * F.normalize(t, dim=-1) @ F.normalize(v, dim=-1).T
    labels = torch.arange(logits.shape[0])
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


def _full_batch_grads() -> tuple[float, list[torch.Tensor]]:
    text, video, heads = _problem()
    loss = _contrastive(heads["t"](text), heads["v"](video))
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in heads.parameters()]


def _ddp_like_grads(rank: int, reduce_grads: bool) -> tuple[float, list[torch.Tensor]]:
    text, video, heads = _problem()
    rows = slice(rank * ROWS_PER_RANK, (rank + 1) * ROWS_PER_RANK)
    t = all_gather_with_grad(heads["t"](text[rows]), reduce_grads=reduce_grads)
    v = all_gather_with_grad(heads["v"](video[rows]), reduce_grads=reduce_grads)
    loss = _contrastive(t, v)
    loss.backward()
    grads = []
    for p in heads.parameters():  # what DDP does: average parameter gradients over ranks
        g = p.grad.clone()
        dist.all_reduce(g)
        grads.append(g / WORLD)
    return float(loss.detach()), grads


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    info = init_distributed("cpu", init_method=f"file://{init_file}", timeout_s=60)
    res: dict = {}
    try:
        res["info"] = info
        res["queries"] = (is_dist(), get_rank(), get_world_size(), is_main())
        x = torch.arange(6, dtype=torch.float32).reshape(3, 2) + 100 * rank
        res["gather"] = all_gather_with_grad(x)
        var = torch.arange(2 if rank == 0 else 5).repeat_interleave(3).reshape(-1, 3) + 10 * rank
        res["gather_var"] = gather_tensors_no_grad(var)
        # ranks of different lengths (a skipped video), with gradient: d(sum(w * all))/dx is w's slice
        xv = torch.ones(1 if rank == 0 else 3, 2, requires_grad=True)
        allv = all_gather_with_grad(xv * (rank + 1), variable=True)
        weights = torch.arange(8, dtype=torch.float32).reshape(4, 2)
        (allv * weights).sum().backward()
        res["gather_var_grad"] = (allv.detach(), xv.grad.clone())
        res["gather_empty"] = gather_tensors_no_grad(torch.full((0 if rank == 0 else 2, 2), 7.0))
        try:
            gather_tensors_no_grad(torch.zeros(2, 3 if rank == 0 else 4))
        except ValueError as err:
            res["mismatch_error"] = str(err)
        res["objects"] = all_gather_object_list({"rank": rank, "ids": ["v"] * rank})
        res["mean_tensor"] = reduce_mean(torch.tensor(float(rank)))
        res["mean_float"] = reduce_mean(2.0 * rank + 1)
        barrier()
        res["grad_sum"] = _ddp_like_grads(rank, reduce_grads=True)
        res["grad_local"] = _ddp_like_grads(rank, reduce_grads=False)
    finally:
        cleanup()
    torch.save(res, Path(out_dir) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory) -> list[dict]:
    tmp = tmp_path_factory.mktemp("dist")
    ctx = mp.spawn(_worker, args=(str(tmp / "init"), str(tmp)), nprocs=WORLD, join=False)
    deadline = time.monotonic() + 90
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("2-process gloo run did not finish in 90 s")
    return [torch.load(tmp / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.fixture
def no_dist_env(monkeypatch):
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)


def test_single_process_is_a_no_op(no_dist_env):
    info = init_distributed("cpu")
    assert info == DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)
    assert not is_dist()
    assert (get_rank(), get_world_size(), is_main()) == (0, 1, True)
    x = torch.randn(4, 3, requires_grad=True)
    y = all_gather_with_grad(x)
    assert y is x
    (y * 2).sum().backward()
    assert torch.equal(x.grad, torch.full((4, 3), 2.0))
    g = gather_tensors_no_grad(x)
    assert torch.equal(g, x) and not g.requires_grad
    assert all_gather_object_list({"a": 1}) == [{"a": 1}]
    assert reduce_mean(3.5) == 3.5
    assert torch.equal(reduce_mean(torch.tensor(2.0)), torch.tensor(2.0))
    barrier()
    cleanup()
    assert not is_dist()


def test_init_errors(no_dist_env, monkeypatch):
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            init_distributed("cuda")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match="RANK is required"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "two")
    with pytest.raises(ValueError, match="RANK='two'"):
        init_distributed("cpu")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", "0")
    with pytest.raises(ValueError, match=r"RANK=2 is outside"):
        init_distributed("cpu")
    assert not is_dist()


def test_seed_everything_repeats_and_differs_by_rank():
    def draw():
        return random.random(), float(np.random.rand()), float(torch.rand(()))

    assert seed_everything(7) == 7
    a = draw()
    seed_everything(7)
    assert draw() == a
    assert seed_everything(7, rank=1) == 8
    assert draw() != a


def test_two_ranks_gather_values(two_rank_results):
    base = torch.arange(6, dtype=torch.float32).reshape(3, 2)
    want = torch.cat([base, base + 100])
    for rank, res in enumerate(two_rank_results):
        assert res["info"] == DistInfo(rank, WORLD, rank, torch.device("cpu"), rank == 0)
        assert res["queries"] == (True, rank, WORLD, rank == 0)
        assert torch.equal(res["gather"], want)
        assert res["objects"] == [{"rank": 0, "ids": []}, {"rank": 1, "ids": ["v"]}]
        assert res["mean_tensor"].item() == pytest.approx(0.5)
        assert res["mean_float"] == pytest.approx(2.0)


def test_two_ranks_gather_variable_lengths(two_rank_results):
    want = torch.cat(
        [
            torch.arange(2).repeat_interleave(3).reshape(-1, 3),
            torch.arange(5).repeat_interleave(3).reshape(-1, 3) + 10,
        ]
    )
    for res in two_rank_results:
        assert res["gather_var"].dtype == torch.long
        assert torch.equal(res["gather_var"], want)
        assert torch.equal(res["gather_empty"], torch.full((2, 2), 7.0))
        assert "trailing shape" in res["mismatch_error"]


def test_two_ranks_gather_with_grad_variable_lengths(two_rank_results):
    for rank, res in enumerate(two_rank_results):
        allv, grad = res["gather_var_grad"]
        assert torch.equal(allv, torch.tensor([[1.0, 1.0], [2.0, 2.0], [2.0, 2.0], [2.0, 2.0]]))
        weights = torch.arange(8, dtype=torch.float32).reshape(4, 2)
        rows = slice(0, 1) if rank == 0 else slice(1, 4)
        # every rank computed the same loss, so the summed slice gradient is W x (its rows of weights)
        assert torch.equal(grad, 2 * weights[rows] * (rank + 1))


def test_two_ranks_gradient_scaling(two_rank_results):
    full_loss, full = _full_batch_grads()
    assert all(g.abs().sum() > 0 for g in full)
    for res in two_rank_results:
        for key, scale in (("grad_sum", 1.0), ("grad_local", 1.0 / WORLD)):
            loss, grads = res[key]
            assert loss == pytest.approx(full_loss, rel=1e-6)
            for g, f in zip(grads, full):
                torch.testing.assert_close(g, f * scale, rtol=1e-5, atol=1e-7)
