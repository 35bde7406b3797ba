"""The codec interface's shared input check (codec.check_input), run by the cache before any codec."""

import mlx.core as mx
import numpy as np
import pytest

from tq_mlx.codec import check_input


def test_rejects_a_wrong_trailing_dimension():
    with pytest.raises(ValueError, match="trailing dimension 64.*d=128"):
        check_input(mx.zeros((1, 1, 2, 64)), 128, "keys")


def test_rejects_a_wrong_number_of_heads():
    with pytest.raises(ValueError, match=r"keys must have shape \(B, 4, T, 64\)"):
        check_input(mx.zeros((1, 1, 2, 64)), 64, "keys", n_heads=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_rejects_non_finite_input(bad):
    x = np.zeros((1, 1, 3, 64), np.float32)
    x[0, 0, 1, 5] = bad
    with pytest.raises(ValueError, match="values contains 1 non-finite"):
        check_input(mx.array(x), 64, "values")


def test_finite_check_can_be_left_to_the_caller():
    x = mx.array(np.full((1, 1, 3, 64), np.nan, np.float32))
    check_input(x, 64, "keys", finite=False)  # shape and dtype only: no host sync


def test_rejects_integer_input():
    with pytest.raises(TypeError, match="float"):
        check_input(mx.zeros((1, 1, 2, 64), dtype=mx.int32), 64)
