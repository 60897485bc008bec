"""Fast scans equal the reference step loops, in values and gradients (every fast path has a reference)."""

import logging

import pytest
import torch

from mamba_interp.models.ops import cpu_kernel
from mamba_interp.models.ops.cpu_kernel import selective_scan_compiled
from mamba_interp.models.ops.selective_scan import (
    selective_scan_loop,
    selective_scan_parallel,
    selective_scan_ref,
)
from mamba_interp.models.ops.ssd import segsum, segsum_unstable, ssd_chunked, ssd_ref
from tests.models.helpers import needs_cpu_kernel


def _m1_inputs(b, l, e, n, dt_scale, seed, dtype=torch.float32, h0=False):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, l, e, generator=g, dtype=dtype)
    delta = torch.rand(b, l, e, generator=g, dtype=dtype) * dt_scale  # "init" ~0.1, "stress" up to 20
    A = -torch.exp(torch.randn(e, n, generator=g, dtype=dtype)) * 4  # A spans ~[-40, -0.1]
    B = torch.randn(b, l, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, n, generator=g, dtype=dtype)
    D = torch.randn(e, generator=g, dtype=dtype)
    hs = torch.randn(b, e, n, generator=g, dtype=dtype) if h0 else None
    return [u, delta, A, B, C, D, hs]


def _m2_inputs(b, l, h, p, g_, n, dt_scale, seed, dtype=torch.float32, h0=False, d_hdim=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, l, h, p, generator=g, dtype=dtype)
    dt = torch.rand(b, l, h, generator=g, dtype=dtype) * dt_scale
    A = -torch.rand(h, generator=g, dtype=dtype) * 15 - 1
    B = torch.randn(b, l, g_, n, generator=g, dtype=dtype)
    C = torch.randn(b, l, g_, n, generator=g, dtype=dtype)
    D = torch.randn(h, p, generator=g, dtype=dtype) if d_hdim else torch.randn(h, generator=g, dtype=dtype)
    hs = torch.randn(b, h, p, n, generator=g, dtype=dtype) if h0 else None
    return [x, dt, A, B, C, D, hs]


def _compare(fast, ref, inputs, tol_y, tol_g):
    inputs_f = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    inputs_r = [t.clone().requires_grad_(True) if t is not None else None for t in inputs]
    y_f, h_f = fast(*inputs_f)
    y_r, h_r = ref(*inputs_r)
    scale = y_r.abs().max()
    assert ((y_f - y_r).abs().max() / scale) < tol_y
    assert ((h_f - h_r).abs().max() / h_r.abs().max().clamp_min(1e-12)) < tol_y
    g = torch.Generator().manual_seed(99)
    wy, wh = torch.randn(y_r.shape, generator=g, dtype=y_r.dtype), torch.randn(h_r.shape, generator=g, dtype=h_r.dtype)
    ((y_f * wy).sum() + (h_f * wh).sum()).backward()
    ((y_r * wy).sum() + (h_r * wh).sum()).backward()
    for i, (a, b) in enumerate(zip(inputs_f, inputs_r)):
        if a is None:
            continue
        err = (a.grad - b.grad).abs().max() / b.grad.abs().max().clamp_min(1e-12)
        assert err < tol_g, f"gradient of input {i}: relative error {err:.2e}"


M1_FAST = {"compiled": selective_scan_compiled, "loop": selective_scan_loop, "parallel": selective_scan_parallel}


@pytest.mark.parametrize("impl", [pytest.param("compiled", marks=needs_cpu_kernel), "loop", "parallel"])
@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 130])
@pytest.mark.parametrize("dt_scale", [0.1, 20.0], ids=["init", "large-dt"])
def test_mamba1_fast_scans_match_reference(impl, length, dt_scale):
    inputs = _m1_inputs(2, length, 12, 5, dt_scale, seed=length, h0=length % 2 == 1)
    _compare(M1_FAST[impl], selective_scan_ref, inputs, tol_y=2e-6, tol_g=2e-5)


def test_mamba1_loop_long_sequence_against_float64():
    inputs = _m1_inputs(1, 3000, 8, 4, 1.0, seed=3)
    y_ref, _ = selective_scan_ref(*[t.double() if t is not None else None for t in inputs])
    y, _ = selective_scan_loop(*inputs)
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5


@needs_cpu_kernel
@pytest.mark.parametrize("shape", [(3, 17, 37, 16), (2, 64, 16, 1), (1, 33, 48, 7)], ids=str)
@pytest.mark.parametrize("block", [1, 5, 16])
def test_mamba1_compiled_tiles_blocks_and_threads(shape, block):
    """Full 16-channel tiles beside a partial one (e = 37), d_state 1..16, lengths that are not a multiple of the
    checkpoint block; one thread and two give the same values (the split only changes which thread sums what)."""
    b, length, e, n = shape
    inputs = _m1_inputs(b, length, e, n, 2.0, seed=length + block, h0=b != 2)
    _compare(lambda *a: selective_scan_compiled(*a, block=block), selective_scan_ref, inputs, 2e-6, 2e-5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        y1, h1 = selective_scan_compiled(*inputs)
        torch.set_num_threads(2)
        y2, h2 = selective_scan_compiled(*inputs)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)  # each tile's arithmetic is one thread's, in one order


@needs_cpu_kernel
def test_mamba1_compiled_long_sequence_against_float64_and_underflowing_decays():
    inputs = _m1_inputs(1, 3000, 20, 4, 1.0, seed=3)
    y_ref, _ = selective_scan_ref(*[t.double() if t is not None else None for t in inputs])
    y, _ = selective_scan_compiled(*inputs)
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5
    inputs = _m1_inputs(2, 40, 18, 4, 300.0, seed=4, h0=True)  # Δ·A down to -1.2e4: exp clamps at -87
    _compare(selective_scan_compiled, selective_scan_ref, inputs, 2e-6, 2e-5)


@needs_cpu_kernel
def test_mamba1_compiled_propagates_nan_and_refuses_what_it_cannot_take():
    u, delta, A, B, C, D, _ = _m1_inputs(1, 6, 17, 3, 1.0, seed=5)
    u[0, 2, 16] = float("nan")
    y, _ = selective_scan_compiled(u, delta, A, B, C, D)
    assert y[0, :2].isfinite().all() and y[0, 2:, 16].isnan().all() and y[0, :, :16].isfinite().all()
    with pytest.raises(ValueError, match="float64"):
        selective_scan_compiled(*(t.double() for t in (u, delta, A, B, C, D)))
    with pytest.raises(ValueError, match="d_state <= 256"):
        selective_scan_compiled(u, delta, torch.zeros(17, 257), torch.zeros(1, 6, 257), torch.zeros(1, 6, 257), D)


def test_cpu_kernel_build_failure_is_reported_not_raised(tmp_path, monkeypatch, caplog):
    """A compiler that fails (or none) makes the kernel unavailable with one log line; nothing half-written."""
    monkeypatch.setenv("MAMBA_INTERP_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    cpu_kernel._library.cache_clear()
    try:
        with caplog.at_level(logging.INFO, logger="mamba_interp"):
            assert not cpu_kernel.available()
        assert "compiled Mamba-1 CPU scan is unavailable" in caplog.text
        assert list(tmp_path.iterdir()) == []
        monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
        cpu_kernel._library.cache_clear()
        assert not cpu_kernel.available() and list(tmp_path.iterdir()) == []
        monkeypatch.setenv("CC", "cc")
        monkeypatch.setenv("MAMBA_INTERP_CPU_KERNEL", "0")
        cpu_kernel._library.cache_clear()
        assert not cpu_kernel.available()
    finally:
        cpu_kernel._library.cache_clear()


@needs_cpu_kernel
def test_an_unwritable_cache_folder_falls_back_to_the_temporary_folder(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("MAMBA_INTERP_CACHE", str(blocker / "cache"))  # mkdir fails: a file is in the way
    cpu_kernel._library.cache_clear()
    try:
        assert cpu_kernel.available()
        inputs = _m1_inputs(1, 9, 17, 3, 1.0, seed=6)
        _compare(selective_scan_compiled, selective_scan_ref, inputs, 2e-6, 2e-5)
    finally:
        cpu_kernel._library.cache_clear()


def test_mamba1_loop_float64_gradcheck():
    inputs = _m1_inputs(1, 9, 3, 2, 1.0, seed=4, dtype=torch.float64, h0=True)
    args = [t.requires_grad_(True) for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: selective_scan_loop(*a, block=4), args)


@pytest.mark.parametrize("length", [1, 7, 64, 65, 200])
@pytest.mark.parametrize("dt_scale", [0.1, 10.0], ids=["init", "large-dt"])
@pytest.mark.parametrize("groups", [1, 2])
def test_mamba2_chunked_matches_reference(length, dt_scale, groups):
    inputs = _m2_inputs(2, length, 4, 3, groups, 5, dt_scale, seed=length + groups, h0=length % 2 == 1,
                        d_hdim=groups == 2)
    _compare(lambda *a: ssd_chunked(*a, chunk=16), ssd_ref, inputs, tol_y=2e-6, tol_g=2e-5)


@pytest.mark.parametrize("length", [7, 64, 130])
def test_mamba2_chunked_large_states_take_the_long_cpu_chunk_and_match_reference(length):
    """headdim · d_state >= LARGE_STATE: the default chunk is LARGE_STATE_CHUNK (faster there), same values."""
    from mamba_interp.models.ops.ssd import LARGE_STATE, LARGE_STATE_CHUNK, cpu_chunk

    assert cpu_chunk(64, 64) == LARGE_STATE_CHUNK and 64 * 64 >= LARGE_STATE and cpu_chunk(64, 16) == 16
    inputs = _m2_inputs(1, length, 2, 64, 1, 64, 1.0, seed=length, h0=length % 2 == 1)
    _compare(ssd_chunked, ssd_ref, inputs, tol_y=2e-6, tol_g=2e-5)


def test_mamba2_chunked_long_sequence_against_float64():
    inputs = _m2_inputs(1, 2500, 2, 4, 1, 4, 1.0, seed=5)
    y_ref, h_ref = ssd_ref(*[t.double() if t is not None else None for t in inputs])
    y, h = ssd_chunked(*inputs)
    assert ((y.double() - y_ref).abs().max() / y_ref.abs().max()) < 1e-5


def test_segsum_stable_where_difference_of_cumsums_is_not():
    """Large log-decays: the cumsum reaches -1.2e5 and the difference form loses the small exponents."""
    a = torch.full((64,), -3000.0)
    a[40:] = -1e-3
    exact = torch.exp(segsum(a.double()))
    assert (torch.exp(segsum(a)) - exact).abs().max() < 1e-6
    assert (torch.exp(segsum_unstable(a)) - exact).abs().max() > 1e-3
