"""Rollout-stability metrics on analytic cases: single Fourier modes, scaled and shifted ensembles, hand-made
trajectories and code histograms."""

import math

import numpy as np
import pytest
import torch

from hf_models.metrics.rollout_stability import (
    codebook_usage_distance,
    flow_statistics,
    histogram_distance,
    late_window,
    mean_spectrum,
    median_ratio_interval,
    short_term_correlation,
    spectrum_distance,
    spectrum_log_ratio,
    statistic_range,
    survival_steps,
)

torch.set_num_threads(1)


def grid(n):
    """Coordinates of an ``n x n`` grid on ``[0, 2 pi)^2`` (the solver's domain): ``y`` rows, ``x`` columns."""
    x = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
    return x[:, None].expand(n, n), x[None, :].expand(n, n)


# ------------------------------------------------------------------------------------------------ flow_statistics
@pytest.mark.parametrize("k", [1, 3])
def test_single_fourier_mode_energy_and_enstrophy(k):
    """omega = cos(k x): psi = cos(k x) / k^2, |u| = |sin(k x)| / k, so E = 1/2 <|u|^2> = 1/(4 k^2), Z = 1/2 <w^2> = 1/4."""
    y, x = grid(16)
    omega = torch.stack([torch.cos(k * x), 2 * torch.cos(k * y)])  # a second frame: a y-mode of amplitude 2
    stats = flow_statistics(omega)
    assert set(stats) == {"energy", "enstrophy"}
    assert stats["energy"].dtype == torch.float64 and stats["energy"].shape == (2,)
    torch.testing.assert_close(stats["enstrophy"], torch.tensor([0.25, 1.0], dtype=torch.float64))
    torch.testing.assert_close(stats["energy"], torch.tensor([1 / (4 * k**2), 4 / (4 * k**2)], dtype=torch.float64))


def test_flow_statistics_keeps_leading_dims_and_accepts_numpy_float32():
    y, x = grid(8)
    frames = np.broadcast_to(np.cos(2 * x.numpy()).astype(np.float32), (3, 5, 8, 8)).copy()
    stats = flow_statistics(frames)
    assert stats["energy"].shape == (3, 5) and stats["enstrophy"].dtype == torch.float64
    torch.testing.assert_close(stats["energy"], torch.full((3, 5), 1 / 16, dtype=torch.float64), rtol=1e-6, atol=0)


def test_flow_statistics_rejects_integer_and_non_square_frames():
    with pytest.raises(ValueError, match="float"):
        flow_statistics(torch.zeros(2, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"\(\.\.\., N, N\)"):
        flow_statistics(torch.zeros(2, 8, 6))
    with pytest.raises(ValueError, match=r"\(\.\.\., N, N\)"):
        flow_statistics(torch.zeros(8))


def test_mean_spectrum_of_a_single_mode_sits_in_its_shell():
    y, x = grid(16)
    frames = torch.stack([torch.cos(3 * x), torch.cos(3 * y)])  # same spectrum, 1/36 in shell 3
    k, spectrum = mean_spectrum(frames)
    assert torch.equal(k, torch.arange(len(spectrum)))
    expected = torch.zeros(len(spectrum), dtype=torch.float64)
    expected[3] = 1 / 36
    torch.testing.assert_close(spectrum, expected, atol=1e-15, rtol=1e-12)


# ----------------------------------------------------------------------------------------------- statistic_range
def test_statistic_range_margin_arithmetic_ignores_non_finite_values():
    values = torch.tensor([[1.0, 3.0], [float("nan"), 2.0], [float("inf"), -float("inf")]])
    low, high = statistic_range(values, margin=0.1)
    assert low == pytest.approx(0.8) and high == pytest.approx(3.2)
    assert statistic_range(values, margin=0) == (1.0, 3.0)
    assert statistic_range([2.0, 6.0], margin=0.5) == (0.0, 8.0)
    assert statistic_range([5.0], margin=2.0) == (5.0, 5.0)  # zero span: no widening


def test_statistic_range_errors():
    with pytest.raises(ValueError, match="margin"):
        statistic_range([1.0, 2.0], margin=-0.1)
    with pytest.raises(ValueError, match="finite"):
        statistic_range([float("nan"), float("inf")])
    with pytest.raises(ValueError, match="finite"):
        statistic_range(torch.zeros(0))


# ------------------------------------------------------------------------------------------------ survival_steps
def test_survival_counts_steps_before_the_first_bad_value():
    nan = float("nan")
    values = torch.tensor(
        [
            [0.5, 0.5, 2.0, 0.5, 0.5],  # leaves above at index 2 (and comes back: still 2)
            [-0.1, 0.5, 0.5, 0.5, 0.5],  # leaves below at once
            [0.5, nan, 0.5, 0.5, 0.5],  # NaN counts as out
            [0.5, 0.5, 0.5, float("inf"), 0.5],  # inf too
            [0.0, 1.0, 0.5, 0.2, 0.9],  # never leaves (bounds are inclusive): the full length
        ]
    )
    steps = survival_steps(values, 0.0, 1.0)
    assert steps.dtype == torch.int64
    assert steps.tolist() == [2, 0, 1, 3, 5]


def test_survival_is_capped_by_the_stop_flag():
    values = torch.tensor([[0.5] * 6, [0.5] * 6, [0.5, 0.5, 9.0, 0.5, 0.5, 0.5], [0.5] * 6, [0.5] * 6])
    # stopped at step 4 -> survived 3; -1 = never stopped; stop after leaving changes nothing; stop at step 1 -> 0
    stopped_at = torch.tensor([4, -1, 5, 1, 6])
    assert survival_steps(values, 0.0, 1.0, stopped_at=stopped_at).tolist() == [3, 6, 2, 0, 5]
    assert survival_steps(values, 0.0, 1.0, stopped_at=[-1, -1, -1, -1, -1]).tolist() == [6, 6, 2, 6, 6]


def test_survival_bad_inputs():
    with pytest.raises(ValueError, match="trajectories, steps"):
        survival_steps(torch.zeros(5), 0.0, 1.0)
    with pytest.raises(ValueError, match="trajectories, steps"):
        survival_steps(torch.zeros(2, 3, 4), 0.0, 1.0)
    with pytest.raises(ValueError, match="low"):
        survival_steps(torch.zeros(2, 3), 1.0, 0.0)


# --------------------------------------------------------------------------------------------- spectrum_distance
def test_spectrum_distance_zero_for_identical_and_log_c2_for_scaled_frames():
    gen = torch.Generator().manual_seed(0)
    frames = torch.randn(4, 3, 32, 32, generator=gen, dtype=torch.float64)
    assert spectrum_distance(frames, frames) == 0.0
    for c in (2.0, 0.1):
        # the spectrum is quadratic in the field: every shell moves by log10(c^2)
        assert spectrum_distance(c * frames, frames) == pytest.approx(abs(math.log10(c**2)), rel=1e-9)
        assert spectrum_distance(frames, c * frames, max_wavenumber=4) == pytest.approx(abs(math.log10(c**2)), rel=1e-9)


def test_spectrum_distance_averages_over_the_resolved_shells_only():
    y, x = grid(12)
    # one mode in each resolved shell 1..4 (default max_wavenumber = 12 // 3); b has 4x the energy in shell 1 only
    a = (torch.cos(x) + torch.sin(2 * y) + torch.cos(3 * x) + torch.cos(4 * y))[None]
    b = a + torch.cos(x)[None]
    assert spectrum_distance(b, a) == pytest.approx(math.log10(4) / 4, rel=1e-9)
    assert spectrum_distance(b, a, max_wavenumber=1) == pytest.approx(math.log10(4), rel=1e-9)
    assert spectrum_distance(b, a, max_wavenumber=2) == pytest.approx(math.log10(4) / 2, rel=1e-9)
    # a mode beyond the resolved band is invisible
    assert spectrum_distance(a + torch.cos(5 * y), a) == pytest.approx(0.0, abs=1e-9)


def test_spectrum_log_ratio_is_signed_per_shell_and_averages_to_the_distance():
    y, x = grid(12)
    a = (torch.cos(x) + torch.sin(2 * y) + torch.cos(3 * x) + torch.cos(4 * y))[None]
    b = a + torch.sin(2 * y)[None]  # shell 2 has 4 times the energy, the others are unchanged
    ratio = spectrum_log_ratio(b, a)
    assert ratio.shape == (4,)
    assert ratio.tolist() == pytest.approx([0.0, math.log10(4), 0.0, 0.0], abs=1e-9)
    assert spectrum_log_ratio(a, b)[1] == pytest.approx(-math.log10(4), rel=1e-9)  # too little energy: negative
    assert float(ratio.abs().mean()) == pytest.approx(spectrum_distance(b, a), rel=1e-12)
    assert torch.isinf(spectrum_log_ratio(torch.full_like(a, float("nan")), a)).all()
    with pytest.raises(ValueError, match="max_wavenumber=100"):
        spectrum_log_ratio(a, a, max_wavenumber=100)


def test_spectrum_distance_inf_for_nan_and_errors():
    frames = torch.randn(2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    broken = frames.clone()
    broken[1, 3, 3] = float("nan")
    assert spectrum_distance(broken, frames) == float("inf")
    with pytest.raises(ValueError, match="max_wavenumber"):
        spectrum_distance(frames, frames, max_wavenumber=100)


# -------------------------------------------------------------------------------------------- histogram_distance
def test_late_window_keeps_the_trajectories_finite_over_the_whole_window():
    frames = torch.randn(4, 10, 8, 8)
    frames[1, 9, 0, 0] = float("nan")  # stopped in the window
    frames[2, 2] = float("nan")  # NaN only before the window
    frames[3, 7:] = float("inf")
    late = late_window(frames, 3)
    assert late.shape == (2, 3, 8, 8)
    assert torch.equal(late, frames[[0, 2], -3:])
    assert late_window(frames, 10).shape == (1, 10, 8, 8)  # the whole rollout: only trajectory 0 is finite
    for bad in (0, 11):
        with pytest.raises(ValueError, match="window"):
            late_window(frames, bad)
    with pytest.raises(ValueError, match="trajectories, steps"):
        late_window(frames[0], 3)


def test_histogram_distance_of_a_shift_is_shift_over_std():
    gen = torch.Generator().manual_seed(0)
    reference = torch.randn(500, generator=gen, dtype=torch.float64) * 3 + 1
    assert histogram_distance(reference, reference) == 0.0
    assert histogram_distance(reference[torch.randperm(500, generator=gen)], reference) == pytest.approx(0.0, abs=1e-12)
    std = float(np.asarray(reference).std())
    for shift in (0.5, -2.0):
        # W1 between a sample and its translate is |shift|
        assert histogram_distance(reference + shift, reference) == pytest.approx(abs(shift) / std, rel=1e-9)


def test_histogram_distance_hand_computed_and_edge_cases():
    # W1({0, 0}, {0, 1}) = 0.5, std({0, 1}) = 0.5 -> 1.0
    assert histogram_distance([0.0, 0.0], [0.0, 1.0]) == pytest.approx(1.0)
    # constant reference: std 0 -> scale 1, plain W1
    assert histogram_distance([1.0, 3.0], [2.0, 2.0]) == pytest.approx(1.0)
    assert histogram_distance([1.0, float("nan")], [1.0, 2.0]) == float("inf")
    with pytest.raises(ValueError, match="non-empty"):
        histogram_distance([], [1.0])


# ---------------------------------------------------------------------------------------- short_term_correlation
def test_short_term_correlation_identical_negated_independent():
    gen = torch.Generator().manual_seed(0)
    truth = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
    same = short_term_correlation(truth, truth)
    assert same.shape == (3,) and same.dtype == torch.float64
    torch.testing.assert_close(same, torch.ones(3, dtype=torch.float64))
    # Pearson: invariant to a positive affine map, sign-flipped by a negation
    torch.testing.assert_close(short_term_correlation(2 * truth + 5, truth), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(short_term_correlation(-truth, truth), -torch.ones(3, dtype=torch.float64))
    noise = torch.randn(8, 3, 32, 32, generator=gen, dtype=torch.float64)
    assert short_term_correlation(noise, truth).abs().max() < 0.1  # ~ 1 / (32 sqrt 8) = 0.011 std


def test_short_term_correlation_per_step_and_nan_frames_count_zero():
    gen = torch.Generator().manual_seed(2)
    truth = torch.randn(2, 3, 8, 8, generator=gen, dtype=torch.float64)
    frames = truth.clone()
    frames[:, 1] = -truth[:, 1]  # step 1 anti-correlated in both trajectories
    frames[0, 2] = float("nan")  # step 2: trajectory 0 dead (0), trajectory 1 perfect (1)
    torch.testing.assert_close(short_term_correlation(frames, truth), torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))


def test_short_term_correlation_shape_errors():
    with pytest.raises(ValueError, match="must both be"):
        short_term_correlation(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4, 8, 8))
    with pytest.raises(ValueError, match="must both be"):
        short_term_correlation(torch.zeros(3, 8, 8), torch.zeros(3, 8, 8))


# --------------------------------------------------------------------------------------- codebook_usage_distance
def test_codebook_usage_distance_on_hand_made_histograms():
    assert codebook_usage_distance(torch.tensor([0, 1, 2, 3]), torch.tensor([3, 2, 1, 0]), 4) == 0.0
    # [1/2, 1/2, 0] vs [1, 0, 0]: TV = 1/2
    assert codebook_usage_distance([0, 0, 1, 1], [0, 0, 0, 0], 3) == pytest.approx(0.5)
    # disjoint supports: TV = 1
    assert codebook_usage_distance([[0, 0], [0, 0]], [1, 2], 3) == pytest.approx(1.0)
    # [3/4, 1/4, 0, 0] vs [1/4, 1/4, 1/4, 1/4]: (1/2 + 0 + 1/4 + 1/4) / 2 = 1/2
    assert codebook_usage_distance([0, 0, 0, 1], [0, 1, 2, 3], 4) == pytest.approx(0.5)
    # the histograms are normalised: different sample sizes of the same distribution give 0
    assert codebook_usage_distance([0, 1], [0, 0, 1, 1, 0, 1], 2) == pytest.approx(0.0)


def test_codebook_usage_distance_rejects_codes_outside_the_codebook():
    with pytest.raises(ValueError, match="codebook_size=4"):
        codebook_usage_distance([0, 4], [0, 1], 4)
    with pytest.raises(ValueError, match="codebook_size=4"):
        codebook_usage_distance([0, 1], [7], 4)


# ------------------------------------------------------------------------------------------------ median_ratio_interval
def test_median_ratio_interval_resamples_pairs():
    """Trajectories are resampled in pairs: an arm that survives exactly 10x as long on every initial condition has
    the interval [10, 10] however spread the survivals are (an unpaired bootstrap would not); a zero median counts
    as 1 as in the reported ratio."""
    base = torch.tensor([3, 5, 8, 13, 21, 34, 55, 89, 144, 233, 12, 7, 29, 2, 40, 61])
    low, high = median_ratio_interval(10 * base, base)
    assert low == pytest.approx(10) and high == pytest.approx(10)
    low, high = median_ratio_interval(torch.full((8,), 6), torch.zeros(8))
    assert low == high == 6


def test_median_ratio_interval_covers_the_estimate_and_narrows_with_more_trajectories():
    gen = torch.Generator().manual_seed(0)
    emulator = torch.randint(10, 60, (16,), generator=gen)
    thermalizer = emulator * torch.randint(2, 20, (16,), generator=gen)
    ratio = float(thermalizer.float().median() / emulator.float().median())
    low, high = median_ratio_interval(thermalizer, emulator)
    assert low < ratio < high
    assert median_ratio_interval(thermalizer, emulator) == (low, high)  # seeded
    narrow = median_ratio_interval(thermalizer, emulator, confidence=0.5)
    assert low <= narrow[0] <= narrow[1] <= high
    many = median_ratio_interval(thermalizer.repeat(16), emulator.repeat(16))  # the same sample, 16x the trajectories
    assert many[1] - many[0] < (high - low) / 2


def test_median_ratio_interval_cluster_bootstrap_resamples_initial_conditions():
    """k rollouts per initial condition (rows i*k .. i*k + k - 1): with cluster_size=k the bootstrap resamples
    initial conditions with all their rollouts. Copies of one sample k times over carry no more information than the
    sample: the cluster interval stays about as wide as the sample's own, while treating the copies as independent
    rollouts shrinks it; pairing still holds within clusters."""
    gen = torch.Generator().manual_seed(0)
    emulator = torch.randint(10, 60, (16,), generator=gen)
    thermalizer = emulator * torch.randint(2, 20, (16,), generator=gen)
    low, high = median_ratio_interval(thermalizer, emulator)
    copies = thermalizer.repeat_interleave(8), emulator.repeat_interleave(8)
    clustered = median_ratio_interval(*copies, cluster_size=8)
    naive = median_ratio_interval(*copies)
    assert clustered[0] <= float(thermalizer.float().median() / emulator.float().median()) <= clustered[1]
    assert (clustered[1] - clustered[0]) > 0.6 * (high - low)
    assert (naive[1] - naive[0]) < 0.5 * (clustered[1] - clustered[0])
    assert median_ratio_interval(*copies, cluster_size=8) == clustered  # seeded
    spread = torch.randint(1, 300, (16 * 4,), generator=gen)
    assert median_ratio_interval(10 * spread, spread, cluster_size=4) == pytest.approx((10.0, 10.0))


@pytest.mark.parametrize("kwargs, match", [
    (dict(numerator=[1, 2, 3], denominator=[1, 2]), "one length"),
    (dict(numerator=[], denominator=[]), "non-empty"),
    (dict(numerator=[1, 2], denominator=[1, 2], confidence=1.0), "confidence"),
    (dict(numerator=[1, 2], denominator=[1, 2], num_resamples=0), "num_resamples"),
    (dict(numerator=[1, 2, 3], denominator=[1, 2, 3], cluster_size=2), "cluster_size"),
    (dict(numerator=[1, 2], denominator=[1, 2], cluster_size=0), "cluster_size"),
])
def test_median_ratio_interval_rejects_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        median_ratio_interval(**kwargs)

