"""The EM layer against docs/reference.md, 'The EM layer' written out independently in float64 numpy."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from emcl.em import EMCL, em_reconstruct


def reference_em(x: np.ndarray, mu: np.ndarray, t: int, lamd: float, beta: float, multiply: bool = False):
    """docs/reference.md, 'The EM layer', step by step, float64, one explicit loop per equation."""
    n, d = x.shape
    u = np.ones((n, 1)) @ mu.reshape(1, -1)
    for _ in range(t):
        logits = x.T @ u * (lamd if multiply else 1.0 / lamd)
        logits = logits - logits.max(axis=1, keepdims=True)
        z = np.exp(logits)
        z = z / z.sum(axis=1, keepdims=True)
        z = z / (1e-6 + z.sum(axis=0, keepdims=True))
        u = x @ z
        u = u / (1e-6 + np.sqrt((u**2).sum(axis=0, keepdims=True)))
    r = u @ z.T
    return x + beta * r, u.mean(axis=0, keepdims=True)


def count_distinct(u: torch.Tensor, tol: float = 1e-3) -> int:
    reps: list[torch.Tensor] = []
    for col in u.T:
        if all((col - r).abs().max() > tol for r in reps):
            reps.append(col)
    return len(reps)


def rel_err(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / (np.abs(b).max() + 1e-12))


@pytest.mark.parametrize("k,t,lamd,beta", [(32, 9, 1.0, 3.0), (7, 10, 0.1, 4.0), (16, 5, 1.0, 1.0)])
@pytest.mark.parametrize("init", ["upstream", "gaussian"])
def test_matches_spec(k, t, lamd, beta, init):
    torch.manual_seed(k)
    x = torch.nn.functional.normalize(torch.randn(160, 512), dim=-1)  # the layer's real sizes
    layer = EMCL(k=k, stage_num=t, lamd=lamd, beta=beta, momentum=0.9, init=init).train()
    mu0 = layer.mu.clone()
    y = layer(x)
    y_ref, mean_u = reference_em(x.double().numpy(), mu0.double().numpy(), t, lamd, beta)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert rel_err(y.numpy(), y_ref) < 1e-4
    assert rel_err(layer.mu.numpy(), 0.9 * mu0.double().numpy() + 0.1 * mean_u) < 1e-4


def test_upstream_init_is_pm_one_and_collapses_to_two_bases():
    layer = EMCL(k=32)
    assert set(layer.mu.abs().flatten().round(decimals=4).tolist()) == {1.0}
    g = torch.Generator().manual_seed(0)
    low_rank = torch.randn(200, 16, generator=g) @ torch.randn(16, 512, generator=g)
    x = torch.nn.functional.normalize(low_rank + 0.3 * torch.randn(200, 512, generator=g), dim=-1).double()
    _, u = em_reconstruct(x, layer.mu, 9)
    for sign in (1, -1):
        group = u[:, layer.mu[0].sign() == sign]
        assert (group - group[:, :1]).abs().max() < 1e-4  # one basis per sign
    for init in ("gaussian", "linspace"):
        _, u = em_reconstruct(x, EMCL(k=32, init=init).mu, 9)
        assert count_distinct(u) > 16, init  # the alternatives keep most of the K bases apart


def test_eval_does_not_update_and_state_dict_roundtrip():
    layer = EMCL(k=8, stage_num=3)
    assert "mu" in layer.state_dict() and "mu" in dict(layer.named_buffers())
    assert not any(p.requires_grad for p in layer.parameters())
    x = torch.randn(10, 6)
    layer.eval()
    mu0 = layer.mu.clone()
    layer(x)
    assert torch.equal(layer.mu, mu0)
    layer.train()
    layer(x)
    assert not torch.equal(layer.mu, mu0)
    other = EMCL(k=8, stage_num=3, seed=123)
    other.load_state_dict(layer.state_dict())
    assert torch.equal(other.mu, layer.mu)
    assert torch.equal(other.eval()(x), layer.eval()(x))


def test_gradient_is_identity():
    layer = EMCL(k=16, stage_num=5, beta=3.0).train()
    x = torch.randn(12, 8, requires_grad=True)
    w = torch.randn(12, 8)
    (layer(x) * w).sum().backward()
    assert torch.allclose(x.grad, w)


def test_autocast_computes_in_float32_and_keeps_dtype():
    layer = EMCL(k=8, stage_num=4)
    x = torch.nn.functional.normalize(torch.randn(64, 512), dim=-1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x.bfloat16())
    assert y.dtype == torch.bfloat16 and layer.mu.dtype == torch.float32
    y_ref, _ = reference_em(x.bfloat16().double().numpy(), EMCL(k=8).mu.double().numpy(), 4, 1.0, 3.0)
    assert rel_err(y.float().numpy(), y_ref) < 2e-2


def test_batched_modalities_match_per_modality_and_mmt_options():
    m, k = 3, 8
    layer = EMCL(k=k, stage_num=5, num_modalities=m, lamd=0.5, lamd_mode="multiply", normalize_output=True)
    assert layer.mu.shape == (m, 1, k)
    # upstream init normalises across modalities, as the reference's MMT variant
    assert torch.allclose(layer.mu.norm(dim=0), torch.ones(1, k), atol=1e-4)
    x = torch.nn.functional.normalize(torch.randn(m, 64, 512), dim=-1)
    mu0 = layer.mu.clone()
    y = layer.train()(x)
    assert torch.allclose(y.norm(dim=-1), torch.ones(m, 64), atol=1e-5)
    for i in range(m):
        yi, mean_u = reference_em(x[i].double().numpy(), mu0[i].double().numpy(), 5, 0.5, 3.0, multiply=True)
        yi = yi / np.linalg.norm(yi, axis=1, keepdims=True)
        assert rel_err(y[i].detach().numpy(), yi) < 1e-4
        assert rel_err(layer.mu[i].numpy(), 0.9 * mu0[i].double().numpy() + 0.1 * mean_u) < 1e-4
    with pytest.raises(ValueError, match="modalities"):
        layer(torch.randn(2, 10, 512))


def _worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.manual_seed(rank)
    layer = EMCL(k=8, stage_num=3).train()
    layer(torch.randn(10, 6))  # different data per rank
    torch.save(layer.mu, f"{out}.{rank}")
    dist.destroy_process_group()


def test_two_ranks_agree_on_mu(tmp_path):
    out = str(tmp_path / "mu")
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), out), nprocs=2)
    mu0, mu1 = torch.load(f"{out}.0"), torch.load(f"{out}.1")
    assert torch.equal(mu0, mu1)
    # the shared value is the mean of what each rank alone would have computed
    singles = []
    for rank in range(2):
        torch.manual_seed(rank)
        layer = EMCL(k=8, stage_num=3, sync_ranks=False).train()
        layer(torch.randn(10, 6))
        singles.append(layer.mu)
    assert torch.allclose(mu0, (singles[0] + singles[1]) / 2, atol=1e-6)
