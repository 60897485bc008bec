"""Scan choice is explicit and logged; the mamba_ssm wrappers keep our shapes (checked with stand-in kernels)."""

import logging
from types import SimpleNamespace

import pytest
import torch

from mamba_interp import HookedMamba, MambaConfig
from mamba_interp.models.ops import cpu_kernel, dispatch, kernels
from mamba_interp.models.ops.selective_scan import selective_scan_ref
from mamba_interp.models.ops.ssd import ssd_ref
from tests.models.helpers import CPU_M1_SCAN, needs_cpu_kernel

CUDA = SimpleNamespace(type="cuda")
CPU = torch.device("cpu")


def fake_selective_scan_fn(u, delta, A, B, C, D, z=None, delta_bias=None, delta_softplus=False,
                           return_last_state=False):
    """mamba_ssm's layout: u, delta [b, e, l]; B, C [b, n, l]; returns y [b, e, l] and last state [b, e, n]."""
    y, last = selective_scan_ref(u.transpose(1, 2), delta.transpose(1, 2), A, B.transpose(1, 2),
                                 C.transpose(1, 2), D)
    return y.transpose(1, 2), last


def fake_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, initial_states=None,
                    dt_softplus=False, return_final_states=False):
    return ssd_ref(x, dt, A, B, C, D, initial_states)


@pytest.fixture
def fake_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "selective_scan_fn", fake_selective_scan_fn)
    monkeypatch.setattr(kernels, "mamba_chunk_scan_combined", fake_chunk_scan)


def test_auto_on_cpu():
    assert dispatch.choose_scan("mamba1", "auto", CPU, False)[0] == CPU_M1_SCAN  # "compiled" with a C compiler
    assert dispatch.choose_scan("mamba1", "auto", CPU, True, torch.bfloat16)[0] == CPU_M1_SCAN
    assert dispatch.choose_scan("mamba1", "auto", CPU, False, torch.float64)[0] == "loop"  # the kernel is float32
    assert dispatch.choose_scan("mamba2", "auto", CPU, False)[0] == "chunked"


def test_without_the_compiled_kernel_auto_takes_the_loop_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(cpu_kernel, "available", lambda: False)
    dispatch._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="mamba_interp"):
        assert dispatch.choose_scan("mamba1", "auto", CPU, False)[0] == "loop"
    assert "no C compiler built the fused kernel" in caplog.text
    with pytest.raises(RuntimeError, match="scan_impl='compiled' cannot run: no C compiler"):
        dispatch.choose_scan("mamba1", "compiled", CPU, False)


def test_explicit_compiled_request_fails_loudly_where_it_cannot_run():
    with pytest.raises(RuntimeError, match="not the CPU"):
        dispatch.choose_scan("mamba1", "compiled", CUDA, False)
    with pytest.raises(RuntimeError, match="float64"):
        dispatch.choose_scan("mamba1", "compiled", CPU, False, torch.float64)
    with pytest.raises(ValueError, match="not available for mamba2"):
        dispatch.choose_scan("mamba2", "compiled", CPU, False)


def test_auto_on_cuda_without_kernels_logs_reason(monkeypatch, caplog):
    monkeypatch.setattr(kernels, "selective_scan_fn", None)
    dispatch._log_once.cache_clear()
    with caplog.at_level(logging.INFO, logger="mamba_interp"):
        assert dispatch.choose_scan("mamba1", "auto", CUDA, False)[0] == "parallel"
    assert "mamba_ssm not installed" in caplog.text


def test_auto_on_cuda_with_kernels(fake_kernels):
    assert dispatch.choose_scan("mamba1", "auto", CUDA, False)[0] == "kernel"
    assert dispatch.choose_scan("mamba2", "auto", CUDA, True)[0] == "kernel"  # the SSD kernel takes h0
    assert dispatch.choose_scan("mamba1", "auto", CUDA, True)[0] == "parallel"  # the Mamba-1 kernel does not


def test_explicit_kernel_request_fails_loudly(monkeypatch):
    monkeypatch.setattr(kernels, "selective_scan_fn", None)
    with pytest.raises(RuntimeError, match="not CUDA"):
        dispatch.choose_scan("mamba1", "kernel", CPU, False)
    with pytest.raises(RuntimeError, match="mamba_ssm is not installed"):
        dispatch.choose_scan("mamba1", "kernel", CUDA, False)
    with pytest.raises(ValueError, match="not available for mamba2"):
        dispatch.choose_scan("mamba2", "loop", CPU, False)
    with pytest.raises(ValueError, match="not available for mamba1"):
        HookedMamba(MambaConfig(d_model=16, n_layer=1), scan_impl="chunked")


def test_kernel_wrappers_keep_shapes_and_values(fake_kernels):
    g = torch.Generator().manual_seed(0)
    u, delta = torch.randn(2, 9, 6, generator=g), torch.rand(2, 9, 6, generator=g)
    A, B, C, D = -torch.rand(6, 3, generator=g), torch.randn(2, 9, 3, generator=g), torch.randn(2, 9, 3, generator=g), torch.randn(6, generator=g)
    y, last = kernels.kernel_selective_scan(u, delta, A, B, C, D)
    y_ref, last_ref = selective_scan_ref(u, delta, A, B, C, D)
    assert torch.allclose(y, y_ref, atol=1e-6) and torch.allclose(last, last_ref, atol=1e-6)
    x, dt = torch.randn(2, 9, 4, 3, generator=g), torch.rand(2, 9, 4, generator=g)
    A2, B2, C2, D2 = -torch.rand(4, generator=g), torch.randn(2, 9, 2, 5, generator=g), torch.randn(2, 9, 2, 5, generator=g), torch.randn(4, generator=g)
    y2, last2 = kernels.kernel_ssd(x, dt, A2, B2, C2, D2)
    assert y2.shape == (2, 9, 4, 3) and last2.shape == (2, 4, 3, 5)
    with pytest.raises(ValueError, match="initial state"):
        kernels.kernel_selective_scan(u, delta, A, B, C, D, h0=torch.zeros(2, 6, 3))


@pytest.mark.parametrize("scan", ["reference", pytest.param("compiled", marks=needs_cpu_kernel), "loop",
                                  "parallel"])
def test_every_scan_impl_gives_the_same_model_output(scan):
    torch.manual_seed(0)
    model = HookedMamba(MambaConfig(d_model=16, n_layer=2, vocab_size=10))
    x = torch.randint(0, 10, (2, 70))
    ref = model(x)
    model.set_scan_impl(scan)
    assert torch.allclose(model(x), ref, atol=1e-5)
    assert model.last_scans == [scan, scan]
