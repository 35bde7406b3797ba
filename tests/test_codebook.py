"""Lloyd-Max codebooks for the exact coordinate law of a random unit vector (docs/turboquant.md)."""

import time

import numpy as np
import pytest

from tq_mlx import codebook as cbk

# Exact finite-d Lloyd-Max D_mse (docs/turboquant.md), b = 1..4
EXACT_MSE = {
    64: [0.3584, 0.1145, 0.0334, 0.0091],
    128: [0.3609, 0.1160, 0.0340, 0.0093],
    256: [0.3621, 0.1167, 0.0343, 0.0094],
}


@pytest.mark.parametrize("d", [16, 64, 128, 1024])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_codebook_is_sorted_symmetric_float32(d, bits):
    c = cbk.codebook(d, bits)
    assert c.shape == (2**bits,) and c.dtype == np.float32
    assert np.all(np.diff(c) > 0)
    np.testing.assert_array_equal(c, -c[::-1])
    assert -1 < c[0] and c[-1] < 1


def test_codebook_is_read_only():
    with pytest.raises(ValueError):
        cbk.codebook(128, 2)[0] = 0.0


def test_codebook_is_deterministic():
    fresh = cbk._beta_codebook.__wrapped__(128, 3)  # bypass the cache: a second, independent build
    np.testing.assert_array_equal(fresh, cbk.codebook(128, 3))


@pytest.mark.parametrize("d", sorted(EXACT_MSE))
def test_expected_mse_matches_exact_lloyd_max_table(d):
    got = [cbk.expected_mse(d, b) for b in (1, 2, 3, 4)]
    np.testing.assert_allclose(got, EXACT_MSE[d], atol=6e-5)


@pytest.mark.parametrize("d, outer, inner", [(64, 1.500, 0.452), (128, 1.505, 0.4525)])
def test_two_bit_levels_times_sqrt_d(d, outer, inner):
    np.testing.assert_allclose(np.sqrt(d) * cbk.codebook(d, 2), [-outer, -inner, inner, outer], atol=6e-4)


def test_one_bit_gaussian_levels_are_sqrt_2_over_pi():
    np.testing.assert_allclose(cbk.gaussian_codebook(1), [-np.sqrt(2 / np.pi), np.sqrt(2 / np.pi)], atol=1e-6)


def test_two_bit_gaussian_levels_are_max_1960():
    np.testing.assert_allclose(cbk.gaussian_codebook(2), [-1.510, -0.4528, 0.4528, 1.510], atol=1e-3)


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_codebook_converges_to_gaussian_levels_as_d_grows(bits):
    gap = [np.max(np.abs(np.sqrt(d) * cbk.codebook(d, bits) - cbk.gaussian_codebook(bits))) for d in (32, 128, 512)]
    assert gap[0] > gap[1] > gap[2]
    assert np.max(np.abs(np.sqrt(1024) * cbk.codebook(1024, bits) - cbk.gaussian_codebook(bits))) < 0.01


@pytest.mark.parametrize("d", [64, 128, 256])
def test_expected_mse_lies_between_the_bounds(d):
    for b in (1, 2, 3, 4):
        assert 4.0**-b < cbk.expected_mse(d, b) < np.sqrt(3) * np.pi / 2 * 4.0**-b


def test_expected_mse_falls_with_bits():
    got = [cbk.expected_mse(128, b) for b in range(1, 9)]
    assert all(a > b for a, b in zip(got, got[1:]))


def test_finite_d_beats_the_gaussian_limit():
    assert cbk.expected_mse(64, 3) < cbk.expected_mse(256, 3) < 0.0345


@pytest.mark.parametrize("d, bits", [(16, 4), (128, 4), (1024, 4), (128, 1)])
def test_codebook_builds_in_under_a_second(d, bits):
    start = time.perf_counter()
    cbk._beta_codebook.__wrapped__(d, bits)
    assert time.perf_counter() - start < 1.0


def test_boundaries_are_midpoints():
    c = cbk.codebook(64, 2)
    np.testing.assert_allclose(cbk.boundaries(c), (c[1:] + c[:-1]) / 2)


@pytest.mark.parametrize("d", [15, 1025, 0, 64.0, "64"])
def test_rejects_unsupported_dimension(d):
    with pytest.raises(ValueError, match="dimension"):
        cbk.codebook(d, 2)


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0])
def test_rejects_unsupported_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        cbk.codebook(128, bits)
