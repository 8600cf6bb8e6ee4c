"""Shared by the kernel tests: activation columns holding NaN and inf, where kernels must do what float32 does."""

import numpy as np


def put_nonfinite(x: np.ndarray) -> int:
    """Write NaN/inf into the first columns of ``x`` (k >= 31, n) in place: column 0 NaN once, 1 +inf once,
    2 -inf and +inf, 3 inf and NaN (a single column, n == 1: the -inf/+inf pattern). Returns the
    number of columns touched."""
    n = x.shape[1]
    patterns = [{2: -np.inf, 9: np.inf}] if n == 1 else [{5: np.nan}, {2: np.inf}, {2: -np.inf, 9: np.inf},
                                                         {2: np.inf, 30: np.nan}]
    for c, pattern in enumerate(patterns):
        for i, value in pattern.items():
            x[i, c] = value
    return len(patterns)


def assert_nonfinite_as_float(got: np.ndarray, want: np.ndarray, n_bad: int) -> None:
    """``got`` has NaN, +inf and -inf exactly where the float reference ``want`` has them, and the case is a real
    one: its first ``n_bad`` columns hold all three outcomes and no finite value, the other columns only finite
    ones (their values are each test's own bound to check)."""
    assert np.isnan(want[:, :n_bad]).any() and np.isposinf(want).any() and np.isneginf(want).any()
    assert not np.isfinite(want[:, :n_bad]).any() and np.isfinite(want[:, n_bad:]).all()
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_array_equal(np.isposinf(got), np.isposinf(want))
    np.testing.assert_array_equal(np.isneginf(got), np.isneginf(want))
