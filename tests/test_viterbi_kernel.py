"""The tq_viterbi Metal kernel (trellis-coded encode) against trellis.search, on the CPU emulator.

The kernel runs through metal_emu (`patched_mlx(check_races=True)`); on a Mac the same tests run the real
kernel.  Exact ties in the path costs may be broken either way by another rounding, so the tests ask for
the same squared error (1e-5 relative) on every vector and identical windows on nearly all.
"""

import logging

import mlx.core as mx
import numpy as np
import pytest
from emu import emulated
from test_metal_kernels import mean_and_weights

from tq_mlx import kernels as K
from tq_mlx import trellis
from tq_mlx.packing import unpack
from tq_mlx.turboquant import TurboQuant

pytestmark = pytest.mark.emu


def _windows(codes, bits, n):
    return trellis.windows(unpack(codes, bits, n), bits)


def _sq_error(w, z, bits):
    return np.array(mx.sum((trellis.table(bits)[w] - z) ** 2, axis=-1))


@pytest.mark.parametrize("bits,n", [(2, 64), (3, 64), (4, 64), (2, 128), (3, 128), (4, 128), (3, 256)])
def test_kernel_search_gives_the_windows_of_search(bits, n):
    z = mx.array(np.random.default_rng(10 * n + bits).standard_normal((12, n)).astype(np.float32))
    ref = trellis.search(z, bits)
    with emulated():
        codes, _ = K.viterbi_encode(z[None, None], None, None, trellis.table(bits), bits, mx.float32)
        mx.eval(codes)
    got = _windows(codes[0, 0], bits, n)
    np.testing.assert_allclose(_sq_error(got, z, bits), _sq_error(ref, z, bits), rtol=1e-5)
    same = np.array(mx.all(got == ref, axis=-1))
    assert same.mean() >= 0.9, same  # measured: all identical


def test_unsupported_sizes_are_refused_with_what_is_allowed():
    z = mx.zeros((1, 1, 2, 512))
    with pytest.raises(ValueError, match="even D from 2 to 256"):
        K.viterbi_encode(z, None, None, trellis.table(4), 4)
    with pytest.raises(ValueError, match="table of 2"):
        K.viterbi_encode(z[..., :64], None, None, trellis.table(4), 5)


@pytest.mark.parametrize("D,bits,weights", [(128, 4, None), (64, 2, "diag"), (96, 3, "full")])
def test_codec_encodes_through_the_kernel_as_on_the_reference_path(D, bits, weights):
    """Centring, weights and rotation (Hadamard at 64 / 128, dense at 96) in the kernel: a last-bit difference
    in the rotated coordinates may move a near-tie, so the squared errors agree closely and the codes mostly."""
    H, T = 2, 5
    mean, w = mean_and_weights(H, D, weights)
    ref_codec = TurboQuant(D, H, bits, mean=mean, weight=w, seed=bits, grid="trellis")
    kern_codec = TurboQuant(D, H, bits, mean=mean, weight=w, seed=bits, grid="trellis", use_kernels=True)
    assert kern_codec.kernel_encode
    x = mx.random.normal((1, H, T, D), key=mx.random.key(D))
    ref = ref_codec.encode(x)
    with emulated():
        got = kern_codec.encode(x)
        mx.eval(got)
    assert kern_codec.kernel_encode  # the kernel ran (no fallback)
    a, b = np.array(unpack(got["codes0"], bits, D)), np.array(unpack(ref["codes0"], bits, D))
    assert (a == b).all(axis=-1).mean() >= 0.8
    y = kern_codec.to_stored(x - mean[:, None, :])
    err = [float(mx.sum((c.segment_values(e) - y) ** 2)) for c, e in ((kern_codec, got), (ref_codec, ref))]
    assert abs(err[0] - err[1]) <= 1e-3 * err[1], err
    np.testing.assert_allclose(
        np.array(got["norm0"].astype(mx.float32)), np.array(ref["norm0"].astype(mx.float32)), rtol=2e-3
    )


def test_a_viterbi_kernel_that_fails_to_build_falls_back_with_one_warning(monkeypatch, caplog):
    broken = K.source("tq_viterbi").replace("constexpr int NS = 64;", "constexpr int NS = 64; this is not MSL;")
    monkeypatch.setitem(K._SOURCES, "tq_viterbi", broken)
    monkeypatch.setattr(K, "_KERNELS", {})
    monkeypatch.setattr(K, "_VERIFIED", {})
    ref_codec = TurboQuant(64, 1, 3, seed=3, grid="trellis")
    kern_codec = TurboQuant(64, 1, 3, seed=3, grid="trellis", use_kernels=True)
    x = mx.random.normal((1, 1, 3, 64), key=mx.random.key(5))
    ref = ref_codec.encode(x)
    with caplog.at_level(logging.WARNING, logger="tq_mlx"), emulated(check_races=False):
        got = [kern_codec.encode(x) for _ in range(2)]
    for g in got:
        for k in ref:
            np.testing.assert_array_equal(np.array(g[k]), np.array(ref[k]))
    assert not kern_codec.kernel_encode
    warnings = [r.getMessage() for r in caplog.records if "failed" in r.getMessage()]
    assert len(warnings) == 1 and "viterbi" in warnings[0] and "reference path" in warnings[0]
