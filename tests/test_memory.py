"""emcl.clip.memory: checkpointing levels and lean activations give the same loss and gradients."""

from __future__ import annotations

import pytest
import torch

from emcl.amp import autocast
from emcl.clip import build_clip
from emcl.clip.memory import LeanLayerNorm, LeanQuickGELU
from emcl.em import EMSettings
from video_retrieval.emcl_net.model import EMCLNet

TINY = dict(
    embed_dim=32,
    image_size=32,
    patch_size=8,
    vision_width=64,
    vision_layers=3,
    text_width=32,
    text_layers=3,
    quick_gelu=True,
    vocab_size=100,
    context_length=16,
)


def _model() -> EMCLNet:
    torch.manual_seed(0)
    return EMCLNet(build_clip(**TINY), agg_layers=1, em=EMSettings(k=4, stage_num=3))


def _batch():
    g = torch.Generator().manual_seed(1)
    n, t, words = 4, 3, 6
    frames = torch.randint(0, 256, (n, t, 3, 32, 32), dtype=torch.uint8, generator=g)
    fmask = torch.ones(n, t, dtype=torch.long)
    fmask[2:, 2:] = 0
    ids = torch.randint(1, 98, (n, words), generator=g)
    ids[:, -1] = 99  # EOT is the largest id
    return ids, torch.ones(n, words, dtype=torch.long), frames, fmask


def _loss_and_grads(model: EMCLNet, precision: str = "fp32"):
    model.train()
    with autocast("cpu", precision):
        loss = model(*_batch())
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("level,layers", [("blocks", None), ("mlp", 2), ("attn", None), ("blocks", 1)])
def test_checkpointing_levels_give_the_same_gradients(level, layers):
    ref_loss, ref = _loss_and_grads(_model())
    model = _model()
    keys = list(model.state_dict())
    model.clip.set_grad_checkpointing(level, layers)
    assert model.clip.grad_checkpointing == (level, layers or TINY["vision_layers"])
    assert list(model.state_dict()) == keys
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref.keys()
    for k in ref:
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-5, atol=1e-6, msg=k)
    model.clip.set_grad_checkpointing(False)
    assert model.clip.grad_checkpointing == ("none", 0)
    assert all("forward" not in b.__dict__ for b in model.clip.visual.transformer.resblocks)
    assert "forward" not in model.clip.visual.transformer.__dict__


def test_checkpointing_actually_recomputes():
    """The MLP level reruns the MLP of the checkpointed block in the backward pass, and only there."""
    model = _model()
    model.clip.set_grad_checkpointing("mlp", 1)
    calls = []
    for i in (0, 1):  # module hooks do not fire during recomputation: count calls of forward itself
        mlp = model.clip.visual.transformer.resblocks[i].mlp
        mlp.forward = lambda x, i=i, f=mlp.forward: (calls.append(i + 1), f(x))[1]
    _loss_and_grads(model)
    assert calls.count(1) == 2 and calls.count(2) == 1


def test_bad_level_is_rejected():
    with pytest.raises(ValueError, match="one of"):
        _model().clip.set_grad_checkpointing("everything")


def test_lean_activations_fp32_equal():
    ref_loss, ref = _loss_and_grads(_model())
    model = _model()
    keys = list(model.state_dict())
    assert model.clip.set_lean_activations(True) > 0
    assert any(isinstance(m, LeanQuickGELU) for m in model.modules())
    assert any(isinstance(m, LeanLayerNorm) for m in model.modules())
    assert list(model.state_dict()) == keys
    loss, grads = _loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    for k in ref:  # the QuickGELU backward is the same formula in another order: float32 round-off
        torch.testing.assert_close(grads[k], ref[k], rtol=1e-5, atol=1e-5, msg=k)


def test_lean_activations_bf16_within_bf16_rounding():
    ref_loss, ref = _loss_and_grads(_model(), "bf16")
    model = _model()
    model.clip.set_lean_activations(True)
    model.clip.set_grad_checkpointing("mlp", 2)  # the two compose
    loss, grads = _loss_and_grads(model, "bf16")
    assert abs(float(loss) - float(ref_loss)) < 1e-2 * abs(float(ref_loss))
    for k in ref:
        scale = ref[k].abs().max().clamp_min(1e-6)
        assert float((grads[k] - ref[k]).abs().max() / scale) < 5e-2, k
    model.clip.set_lean_activations(False)
    assert not any(isinstance(m, (LeanQuickGELU, LeanLayerNorm)) for m in model.modules())


def test_lean_quickgelu_gradient_matches_autograd():
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda v: LeanQuickGELU()(v), (x,))
    y = x.detach().clone().requires_grad_(True)
    (y * torch.sigmoid(1.702 * y)).sum().backward()
    LeanQuickGELU()(x).sum().backward()
    torch.testing.assert_close(x.grad, y.grad)


def test_whole_block_checkpointing_of_the_first_block_only():
    """Level "blocks" calls the block itself again in the backward pass (pre-hooks run twice), and only
    for the first ``layers`` blocks."""
    model = _model()
    model.clip.set_grad_checkpointing("blocks", 1)
    calls = []
    for i in (0, 1):
        block = model.clip.visual.transformer.resblocks[i]
        block.register_forward_pre_hook(lambda *_, i=i: calls.append(i))
    _loss_and_grads(model)
    assert calls.count(0) == 2 and calls.count(1) == 1
