"""Bootstrap intervals over users: coverage at the nominal rate, paired tests with known answers."""

from __future__ import annotations

import numpy as np
import pytest

from sonicrec.bootstrap import bootstrap_means


def test_interval_covers_the_true_mean_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(0)
    trials, covered = 300, 0
    for trial in range(trials):
        sample = rng.exponential(1.0, size=(150, 1))  # skewed, like per-user AP; true mean 1
        low, high = bootstrap_means(sample, n_resamples=400, seed=trial).interval(0.95)[0]
        covered += low <= 1.0 <= high
    # Binomial(300, 0.95) has sd 1.3%; the percentile interval of a skewed mean runs slightly short.
    assert 0.90 <= covered / trials <= 0.98


def paired_sample(rng: np.random.Generator, shift: float, n: int = 300) -> np.ndarray:
    """(n, 2) per-user metrics of two models: a large per-user effect shared by both, small noise."""
    user_effect = rng.beta(0.5, 3.0, size=n)
    noise = rng.normal(0.0, 0.03, size=(n, 2))
    return np.column_stack([user_effect + shift, user_effect]) + noise


def test_paired_difference_finds_a_planted_difference() -> None:
    reps = bootstrap_means(paired_sample(np.random.default_rng(1), shift=0.01), n_resamples=1000, seed=1)
    result = reps.difference(0, 1)
    assert result["p"] < 0.01
    low, high = result["interval"]
    assert 0.0 < low < 0.01 < high
    # Pairing matters: the separate intervals of the two models overlap, the paired one excludes 0.
    (low_a, high_a), (low_b, high_b) = reps.interval()
    assert low_a < high_b


def test_paired_difference_rejects_a_null_one_at_about_the_nominal_rate() -> None:
    rng = np.random.default_rng(2)
    trials = 200
    rejected = sum(
        bootstrap_means(paired_sample(rng, shift=0.0), n_resamples=400, seed=t).difference(0, 1)["p"] < 0.05
        for t in range(trials)
    )
    assert rejected / trials <= 0.10


def test_undefined_values_are_left_out_and_draws_are_seeded() -> None:
    values = np.array([[1.0, np.nan], [2.0, 4.0], [3.0, 6.0], [4.0, np.nan]])
    reps = bootstrap_means(values, n_resamples=200, seed=3)
    np.testing.assert_allclose(reps.estimate, [2.5, 5.0])
    assert reps.replicates.shape == (200, 2)
    assert np.nanmin(reps.replicates[:, 1]) >= 4.0 and np.nanmax(reps.replicates[:, 1]) <= 6.0
    again = bootstrap_means(values, n_resamples=200, seed=3)
    np.testing.assert_array_equal(reps.replicates, again.replicates)
    # The draws do not depend on the columns: a column alone has the same replicates.
    np.testing.assert_array_equal(bootstrap_means(values[:, :1], n_resamples=200, seed=3).replicates[:, 0],
                                  reps.replicates[:, 0])


def test_bad_shapes_raise() -> None:
    with pytest.raises(ValueError, match="shape"):
        bootstrap_means(np.zeros(5))
    with pytest.raises(ValueError, match="n_resamples"):
        bootstrap_means(np.zeros((5, 1)), n_resamples=0)
