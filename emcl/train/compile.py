"""``torch.compile`` of model parts in place, with a fallback to eager and a prompt process exit.

``compile_modules(modules, mode, device)`` calls ``module.compile()`` on each module: the compiled
function is stored on the module itself, so module trees, ``state_dict`` keys and checkpoints do not
change. Compilation is lazy: dynamo traces and inductor generates code at the first call (and again
on recompiles, e.g. when evaluation switches grad mode or a batch has a new shape). Any failure there
(a dynamo ``Unsupported``, an inductor ``BackendCompilerFailed``, a missing compiler or Triton) would
stop the run. So every compiled call is wrapped: when it raises, the module is switched back to eager
(its compiled function dropped), ONE warning is logged for the group of modules, and that same call is
run again eagerly. Out-of-memory errors are not compile failures and propagate unchanged.

The backward graph: AOTAutograd normally compiles it lazily at the first ``backward()``, where a failure
would raise from ``loss.backward()`` in the caller, outside the module's call. ``compile_modules`` sets
``torch._functorch.config.force_non_lazy_backward_lowering`` (where this torch has it) so that the
backward is compiled together with the forward at the first call, and its failures fall back as well.

Exit: inductor compiles kernels in a pool of worker processes (a "sidecar" process that forks
workers, ``torch._inductor.compile_worker``). torch shuts the pool down from an ``atexit`` handler and
waits for the sidecar (up to 300 s in torch 2.14, without a limit in some earlier releases); a sidecar
wedged while tearing down its own worker pool therefore keeps a finished process alive for minutes.
``release_compile_workers`` shuts the pools down explicitly, waits ``timeout_s`` and kills what is left,
so the caller decides when the workers go (after the last compile) and the process exits promptly.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = [
    "compile_wanted",
    "compile_modules",
    "is_compiled",
    "release_compile_workers",
    "set_activation_memory_budget",
]

log = logging.getLogger("emcl.compile")

MODES = ("auto", "0", "1")


def compile_wanted(mode: str | int | bool, device: torch.device | str) -> bool:
    """Whether ``--compile MODE`` compiles on ``device``: "1" always, "0" never, "auto" on CUDA only."""
    if isinstance(mode, bool):
        mode = "1" if mode else "0"
    mode = str(mode)
    if mode not in MODES:
        raise ValueError(f"--compile must be one of {', '.join(MODES)}, got {mode!r}")
    return mode == "1" or (mode == "auto" and torch.device(device).type == "cuda")


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()[:200]


class _Group:
    """Shared by the modules of one ``compile_modules`` call: one warning for all of them."""

    def __init__(self) -> None:
        self.warned = False
        self.lock = threading.Lock()

    def fallback(self, module: nn.Module, name: str, exc: BaseException) -> None:
        module._compiled_call_impl = None  # nn.Module.__call__ runs the eager _call_impl again
        with self.lock:
            first, self.warned = not self.warned, True
        msg = "torch.compile failed for %s (%s: %s); running it eagerly from now on"
        text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        args = (name, type(exc).__name__, text[:400])
        if first:
            log.warning(msg, *args)
        else:
            log.info(msg, *args)


def _guarded(compiled: Callable[..., Any], module: nn.Module, name: str, group: _Group) -> Callable[..., Any]:
    """``compiled`` that, on failure, switches ``module`` back to eager and reruns the call eagerly."""

    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return compiled(*args, **kwargs)
        except Exception as exc:  # dynamo / inductor / toolchain errors of any type
            if _is_oom(exc):
                raise
            group.fallback(module, name, exc)
            return module._call_impl(*args, **kwargs)

    call.__wrapped__ = compiled  # type: ignore[attr-defined]
    return call


def compile_modules(
    modules: Sequence[nn.Module],
    mode: str = "auto",
    device: torch.device | str | None = None,
    *,
    names: Sequence[str] | None = None,
    **compile_kwargs: Any,
) -> bool:
    """Compile ``modules`` in place when ``compile_wanted(mode, device)``; True if they were compiled.

    Each module's ``compile()`` result is wrapped so that a failure at its first (or any later) call
    logs one warning for the whole group, returns the module to eager and reruns that call eagerly;
    the run goes on. ``compile_kwargs`` go to ``torch.compile`` (e.g. ``backend``, ``mode``).
    ``names`` label the modules in the warning. State-dict keys are unchanged. ``device`` None: CUDA
    when available, else CPU.
    """
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not compile_wanted(mode, device):
        return False
    names = list(names) if names is not None else [type(m).__name__ for m in modules]
    if len(names) != len(modules):
        raise ValueError(f"compile_modules: {len(modules)} modules but {len(names)} names")
    import torch._functorch.config as functorch_config

    if hasattr(functorch_config, "force_non_lazy_backward_lowering"):
        # compile the backward at the first call too, inside the guarded call (see the module docstring)
        functorch_config.force_non_lazy_backward_lowering = True
    group = _Group()
    any_compiled = False
    for module, name in zip(modules, names):
        try:
            module.compile(**compile_kwargs)
        except Exception as exc:  # e.g. dynamo unsupported on this Python, an unknown backend
            group.fallback(module, name, exc)
            continue
        module._compiled_call_impl = _guarded(module._compiled_call_impl, module, name, group)
        any_compiled = True
    if any_compiled:
        log.info("torch.compile: %s (compiled at the first call)", ", ".join(names))
    return any_compiled


def set_activation_memory_budget(budget: float | None) -> None:
    """Compiled training: let the partitioner recompute activations to keep about ``budget`` (0..1) of
    what it would save (``torch._functorch.config.activation_memory_budget``; 1 = its default, None =
    leave the setting alone). Affects graphs compiled after the call; eager code is unaffected."""
    if budget is None:
        return
    if not 0.0 <= float(budget) <= 1.0:
        raise ValueError(f"activation memory budget must be within [0, 1], got {budget}")
    import torch._functorch.config as functorch_config

    functorch_config.activation_memory_budget = float(budget)


def is_compiled(module: nn.Module) -> bool:
    """Whether ``module`` currently runs a compiled function (False after a fallback)."""
    return getattr(module, "_compiled_call_impl", None) is not None


def release_compile_workers(timeout_s: float = 15.0) -> None:
    """Shut down inductor's compile-worker pools now; kill sidecars that do not exit in ``timeout_s``.

    Safe to call at any time and more than once (a later compile starts a new pool). Call it when
    compiling is done (after the first steps and evaluation) or at the end of a run, so the process
    does not wait on torch's ``atexit`` shutdown. Does nothing when inductor was never imported.
    """
    import sys

    mod = sys.modules.get("torch._inductor.async_compile")
    if mod is None:
        return
    pools = list(getattr(mod, "_pool_set", ()))
    if not pools:
        return
    done = threading.Event()

    def shutdown() -> None:
        try:
            mod.shutdown_compile_workers()
        except Exception as exc:  # a pool's own shutdown failing must not fail the run
            log.debug("compile-worker shutdown raised %r", exc)
        done.set()

    threading.Thread(target=shutdown, name="emcl-release-compile-workers", daemon=True).start()
    if done.wait(timeout_s):
        return
    log.warning("inductor compile workers did not shut down within %.0f s; killing them", timeout_s)
    for pool in pools:
        proc = getattr(pool, "process", None)  # SubprocPool: the sidecar process
        if proc is not None and proc.poll() is None:
            proc.kill()
        for p in list(getattr(pool, "_processes", {}).values()):  # ProcessPoolExecutor workers
            try:
                os.kill(p.pid, 9)
            except (OSError, AttributeError):
                pass
