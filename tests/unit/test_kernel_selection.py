"""kernels="auto" survives a Triton without ``triton.knobs`` (before 3.4) or one that fails to
import: the interpreter mode is read from the environment, and the loss falls back to the torch
kernels with a warning instead of dying on the first step."""

from __future__ import annotations

import builtins
import importlib.util
import sys
import types

import pytest
import torch

from megatron_mel.ops import fused_loss
from megatron_mel.ops.logit_kernels import TorchLogitKernels

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


@needs_triton
def test_interpreter_mode_without_knobs_reads_the_environment():
    from megatron_mel.ops.triton_kernels import interpreter_mode

    old_triton = types.SimpleNamespace(__version__="3.2.0")  # no `knobs` attribute
    assert interpreter_mode(old_triton, {"TRITON_INTERPRET": "1"}) is True
    assert interpreter_mode(old_triton, {"TRITON_INTERPRET": "0"}) is False
    assert interpreter_mode(old_triton, {}) is False
    new_triton = types.SimpleNamespace(
        knobs=types.SimpleNamespace(runtime=types.SimpleNamespace(interpret=True))
    )
    assert interpreter_mode(new_triton, {}) is True


@pytest.mark.parametrize("error", [AttributeError, ImportError])
def test_auto_falls_back_to_torch_kernels_when_triton_breaks(monkeypatch, error):
    real_import = builtins.__import__

    def broken(name, *args, **kwargs):
        if name == "megatron_mel.ops.triton_kernels":
            raise error("module 'triton' has no attribute 'knobs'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "megatron_mel.ops.triton_kernels", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr(fused_loss, "_TRITON_FALLBACK_WARNED", False)
    with pytest.warns(UserWarning, match="Triton kernels unavailable"):
        kernels = fused_loss.resolve_kernels("auto", torch.device("cuda", 0))
    assert isinstance(kernels, TorchLogitKernels)
    with pytest.raises(error):  # asking for Triton explicitly still fails loudly
        fused_loss.resolve_kernels("triton", torch.device("cuda", 0))


def test_auto_on_cpu_is_the_torch_kernels():
    assert isinstance(fused_loss.resolve_kernels("auto", torch.device("cpu")), TorchLogitKernels)
