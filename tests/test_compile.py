"""emcl.train.compile: modes, in-place compile with unchanged keys, and the fallback to eager."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from emcl.train.compile import compile_modules, compile_wanted, is_compiled, release_compile_workers


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))


def _failing_backend(gm, example_inputs):  # what an inductor / toolchain failure looks like to dynamo
    raise RuntimeError("synthetic backend failure")


def test_modes():
    assert compile_wanted("auto", "cuda") and not compile_wanted("auto", "cpu")
    assert compile_wanted("1", "cpu") and not compile_wanted("0", "cuda")
    assert compile_wanted(True, "cpu") and not compile_wanted(False, "cuda")
    with pytest.raises(ValueError, match="--compile"):
        compile_wanted("yes", "cpu")
    net = _net()
    assert compile_modules([net], "auto", torch.device("cpu")) is False and not is_compiled(net)
    assert compile_modules([net], "0", torch.device("cpu")) is False and not is_compiled(net)


def test_failure_at_first_call_falls_back_to_eager_with_one_warning(caplog):
    torch._dynamo.reset()
    a, b, ref = _net(), _net(), _net()
    keys = list(a.state_dict())
    with caplog.at_level(logging.WARNING, logger="emcl.compile"):
        assert compile_modules([a, b], "1", torch.device("cpu"), names=["a", "b"], backend=_failing_backend)
        assert is_compiled(a) and is_compiled(b)
        x = torch.randn(4, 6, requires_grad=True)
        xr = x.detach().clone().requires_grad_(True)
        ya, yb, yr = a(x), b(x), ref(xr)
        # the failing call itself returned eager results, and training goes on (backward works)
        torch.testing.assert_close(ya, yr, rtol=0, atol=0)
        torch.testing.assert_close(yb, yr, rtol=0, atol=0)
        (ya.sum() + yb.sum()).backward()
        (2 * yr.sum()).backward()  # a and b hold the same weights as ref
        torch.testing.assert_close(x.grad, xr.grad)
        ref.zero_grad()
        ref(xr).sum().backward()
        for p, q in zip(a.parameters(), ref.parameters()):
            torch.testing.assert_close(p.grad, q.grad)
        # later calls run eagerly without further warnings
        torch.testing.assert_close(a(x), yr)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and r.name == "emcl.compile"]
    assert len(warnings) == 1, [r.getMessage() for r in warnings]
    assert "synthetic backend failure" in warnings[0].getMessage() and "eager" in warnings[0].getMessage()
    assert not is_compiled(a) and not is_compiled(b)
    assert list(a.state_dict()) == keys
    torch._dynamo.reset()


def test_backward_compile_failure_falls_back_at_the_first_call(caplog):
    from torch._dynamo.backends.common import aot_autograd

    torch._dynamo.reset()
    net, ref = _net(), _net()
    backend = aot_autograd(fw_compiler=lambda gm, example_inputs: gm, bw_compiler=_failing_backend)
    with caplog.at_level(logging.WARNING, logger="emcl.compile"):
        assert compile_modules([net], "1", torch.device("cpu"), backend=backend)
        x = torch.randn(3, 6)
        y = net(x)  # the backward is compiled (and fails) here, not in backward()
        y.sum().backward()
    ref(x).sum().backward()
    assert not is_compiled(net)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    for p, q in zip(net.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad)
    torch._dynamo.reset()


def test_failure_at_compile_time_falls_back(caplog):
    net = _net()
    with caplog.at_level(logging.WARNING, logger="emcl.compile"):
        ok = compile_modules([net], "1", torch.device("cpu"), backend="no_such_backend_xyz")
    assert ok is False and not is_compiled(net)
    assert sum(r.levelno == logging.WARNING for r in caplog.records) == 1
    x = torch.randn(2, 6)
    torch.testing.assert_close(net(x), _net()(x))


def test_working_compile_keeps_keys_and_results():
    torch._dynamo.reset()
    net, ref = _net(), _net()
    keys = list(net.state_dict())
    assert compile_modules([net], "1", torch.device("cpu"), backend="eager")
    x = torch.randn(5, 6)
    torch.testing.assert_close(net(x), ref(x))
    assert is_compiled(net) and list(net.state_dict()) == keys
    release_compile_workers()  # no inductor pool was started: a no-op
    torch._dynamo.reset()


def test_out_of_memory_is_not_swallowed():
    net = _net()

    def oom_backend(gm, example_inputs):
        def run(*args):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")

        return run

    torch._dynamo.reset()
    compile_modules([net], "1", torch.device("cpu"), backend=oom_backend)
    with pytest.raises(torch.OutOfMemoryError):
        net(torch.randn(2, 6))
    assert is_compiled(net)
    torch._dynamo.reset()


def test_activation_memory_budget_setting():
    import torch._functorch.config as functorch_config

    from emcl.train.compile import set_activation_memory_budget

    before = functorch_config.activation_memory_budget
    try:
        set_activation_memory_budget(0.5)
        assert functorch_config.activation_memory_budget == 0.5
        set_activation_memory_budget(None)  # leaves it alone
        assert functorch_config.activation_memory_budget == 0.5
        with pytest.raises(ValueError, match="within"):
            set_activation_memory_budget(1.5)
    finally:
        functorch_config.activation_memory_budget = before
