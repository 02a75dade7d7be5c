"""Rollout-stability metrics of an emulated 2-D flow against the true dynamics.

Frames are vorticity fields ``(..., N, N)`` in physical units (float tensors or arrays). Every function compares
like with like: statistics of the emulator's frames against the same statistics of the true solver's frames.

- `flow_statistics`: energy and enstrophy per frame (the statistics survival is judged on).
- `statistic_range`: the interval a statistic spans in the true dynamics, widened by a margin.
- `survival_steps`: per trajectory, the first rollout step whose statistic leaves that interval (or is not finite,
  or the rollout was stopped); trajectories that never leave count the full length (censored).
- `late_window`: the last frames of the trajectories still finite there (what late-window statistics are taken on).
- `spectrum_distance`: mean absolute difference of ``log10`` ensemble energy spectra over the resolved shells;
  `spectrum_log_ratio` gives that difference shell by shell.
- `histogram_distance`: 1-D Wasserstein-1 distance between two samples of a statistic, in units of the
  reference's standard deviation (0 = same distribution; 1 = shifted by one standard deviation).
- `short_term_correlation`: per step, the pattern (Pearson) correlation between predicted and true frames,
  averaged over trajectories.
- `codebook_usage_distance`: total-variation distance between two code-usage histograms.
- `median_ratio_interval`: a paired bootstrap interval for the ratio of two arms' median survivals over the same
  initial conditions (how far a ratio measured on a few initial conditions can be trusted).

```python
from hf_models.metrics.rollout_stability import flow_statistics, statistic_range, survival_steps
stats = flow_statistics(rollout)                    # rollout (B, L, N, N) -> {"energy": (B, L), "enstrophy": (B, L)}
low, high = statistic_range(flow_statistics(truth)["enstrophy"], margin=0.1)
steps = survival_steps(stats["enstrophy"], low, high)  # (B,) int64
```
"""

from __future__ import annotations

import functools
from typing import Optional

import numpy as np
import torch

from ..data.kolmogorov import energy, energy_spectrum, enstrophy


def _frames(frames) -> torch.Tensor:
    frames = torch.as_tensor(frames)
    if not frames.is_floating_point():
        raise ValueError(f"frames must be a float tensor (..., N, N), got dtype {frames.dtype}")
    if frames.ndim < 2 or frames.shape[-1] != frames.shape[-2]:
        raise ValueError(f"frames must have shape (..., N, N), got {tuple(frames.shape)}")
    return frames.to(torch.float64)


def flow_statistics(frames) -> dict:
    """``{"energy": (...), "enstrophy": (...)}`` of vorticity frames ``(..., N, N)`` (domain means, float64)."""
    frames = _frames(frames)
    return {"energy": energy(frames), "enstrophy": enstrophy(frames)}


def statistic_range(values, margin: float = 0.1) -> tuple[float, float]:
    """``[min - margin * span, max + margin * span]`` of the finite ``values`` of the true dynamics."""
    if margin < 0:
        raise ValueError(f"margin={margin!r} must be >= 0")
    values = torch.as_tensor(values, dtype=torch.float64).flatten()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        raise ValueError("statistic_range needs at least one finite value")
    low, high = float(values.min()), float(values.max())
    span = high - low
    return low - margin * span, high + margin * span


def exit_side(value: float, low: float, high: float) -> Optional[str]:
    """How a statistic's value stands against its survival range ``[low, high]``: ``None`` inside, else ``"above"``,
    ``"below"`` or ``"not_finite"`` (NaN)."""
    if low <= value <= high:
        return None
    return "above" if value > high else "below" if value < low else "not_finite"


def survival_steps(values, low: float, high: float, stopped_at=None) -> torch.Tensor:
    """Survival of each trajectory ``(B,)``: for ``values`` of shape ``(B, L)`` (the statistic at rollout steps
    ``1..L``), the 1-based step of the first value outside ``[low, high]`` or not finite, minus one, i.e. the number of
    steps survived; ``L`` when the trajectory never leaves. ``stopped_at`` (``(B,)``, step of a stop flag or ``-1``)
    caps the survival at the step before the stop."""
    values = torch.as_tensor(values, dtype=torch.float64)
    if values.ndim != 2:
        raise ValueError(f"values must have shape (trajectories, steps), got {tuple(values.shape)}")
    if not low <= high:
        raise ValueError(f"low={low} must be <= high={high}")
    bad = ~torch.isfinite(values) | (values < low) | (values > high)
    length = values.shape[1]
    first = torch.where(bad.any(1), bad.float().argmax(1), torch.full((values.shape[0],), length))
    if stopped_at is not None:
        stopped_at = torch.as_tensor(stopped_at, dtype=torch.long)
        first = torch.where(stopped_at >= 0, torch.minimum(first, stopped_at - 1).clamp_min(0), first)
    return first.long()


def late_window(frames, window: int) -> torch.Tensor:
    """The last ``window`` frames of the trajectories ``(B, L, N, N)`` that are finite over all of them
    ``(B', window, N, N)``: the late-window statistics of an arm are those of its rollouts still running at the end
    (a stopped rollout's frames are NaN)."""
    frames = torch.as_tensor(frames)
    if frames.ndim != 4:
        raise ValueError(f"frames must have shape (trajectories, steps, N, N), got {tuple(frames.shape)}")
    if not 1 <= window <= frames.shape[1]:
        raise ValueError(f"window={window} must lie in [1, {frames.shape[1]}] (the rollout's frames)")
    late = frames[:, -window:]
    return late[torch.isfinite(late).flatten(1).all(1)]


def mean_spectrum(frames) -> tuple[torch.Tensor, torch.Tensor]:
    """Wavenumbers and the ensemble-mean energy spectrum of frames ``(..., N, N)``."""
    frames = _frames(frames)
    k, spectrum = energy_spectrum(frames.reshape(-1, *frames.shape[-2:]))
    return k, spectrum.mean(0)


def spectrum_log_ratio(frames, reference, max_wavenumber: Optional[int] = None) -> torch.Tensor:
    """Per shell ``k = 1..max_wavenumber`` (default ``N/3``, the solver's resolved band), ``log10 E(k) - log10
    E_ref(k)`` of the ensemble-mean spectra ``(max_wavenumber,)``: where an arm's spectrum error lies (positive:
    too much energy at that scale). Non-finite frames give ``inf`` in every shell."""
    frames, reference = _frames(frames), _frames(reference)
    n = frames.shape[-1]
    kmax = int(max_wavenumber or n // 3)
    if not torch.isfinite(frames).all():
        return torch.full((kmax,), float("inf"), dtype=torch.float64)
    _, e = mean_spectrum(frames)
    _, e_ref = mean_spectrum(reference)
    if kmax >= min(len(e), len(e_ref)):
        raise ValueError(f"max_wavenumber={kmax} is beyond the spectra ({min(len(e), len(e_ref)) - 1} shells)")
    tiny = 1e-300
    return (torch.log10(e[1 : kmax + 1] + tiny) - torch.log10(e_ref[1 : kmax + 1] + tiny)).double()


def spectrum_distance(frames, reference, max_wavenumber: Optional[int] = None) -> float:
    """Mean over shells ``1..max_wavenumber`` (default ``N/3``, the solver's resolved band) of
    ``|log10 E(k) - log10 E_ref(k)|`` of the ensemble-mean spectra (`spectrum_log_ratio`). Non-finite frames give
    ``inf``."""
    return float(spectrum_log_ratio(frames, reference, max_wavenumber).abs().mean())


def histogram_distance(values, reference) -> float:
    """Wasserstein-1 distance between the empirical distributions of ``values`` and ``reference`` divided by the
    reference's standard deviation; ``inf`` if ``values`` holds a non-finite entry."""
    from scipy.stats import wasserstein_distance

    values = np.asarray(torch.as_tensor(values, dtype=torch.float64).flatten())
    reference = np.asarray(torch.as_tensor(reference, dtype=torch.float64).flatten())
    if values.size == 0 or reference.size == 0:
        raise ValueError("histogram_distance needs non-empty samples")
    if not np.isfinite(values).all():
        return float("inf")
    scale = reference.std() or 1.0
    return float(wasserstein_distance(values, reference) / scale)


def short_term_correlation(frames, truth) -> torch.Tensor:
    """Pattern correlation per step ``(L,)`` between ``frames`` and ``truth`` of shape ``(B, L, N, N)``: Pearson
    correlation over the grid of each frame pair, averaged over the ``B`` trajectories (NaN frames count 0)."""
    frames, truth = _frames(frames), _frames(truth)
    if frames.shape != truth.shape or frames.ndim != 4:
        raise ValueError(f"frames {tuple(frames.shape)} and truth {tuple(truth.shape)} must both be (B, L, N, N)")
    a = frames.flatten(2) - frames.flatten(2).mean(-1, keepdim=True)
    b = truth.flatten(2) - truth.flatten(2).mean(-1, keepdim=True)
    corr = (a * b).sum(-1) / (a.norm(dim=-1) * b.norm(dim=-1)).clamp_min(1e-30)
    return torch.nan_to_num(corr, nan=0.0).mean(0)


def codebook_usage_distance(codes, reference_codes, codebook_size: int) -> float:
    """Total-variation distance between the code-usage histograms of two integer code tensors."""
    hist = torch.bincount(torch.as_tensor(codes).flatten().long(), minlength=codebook_size).double()
    ref = torch.bincount(torch.as_tensor(reference_codes).flatten().long(), minlength=codebook_size).double()
    if hist.numel() != codebook_size or ref.numel() != codebook_size:
        raise ValueError(f"codes must lie in [0, codebook_size={codebook_size})")
    return float(0.5 * (hist / hist.sum() - ref / ref.sum()).abs().sum())


def median_ratio_interval(numerator, denominator, confidence: float = 0.95, num_resamples: int = 2000, seed: int = 0,
                          cluster_size: int = 1) -> tuple[float, float]:
    """Percentile bootstrap interval (``scipy.stats.bootstrap``) of ``median(numerator) / median(denominator)`` for
    per-trajectory survivals of two arms ``(B,)`` from the same initial conditions: trajectories are resampled in
    pairs (``paired=True``: the same indices for both arms), with a seeded generator so the interval is
    reproducible. Medians are the lower median and a zero median in the denominator counts as 1, as in the reported
    ratio.

    With ``cluster_size`` k > 1 the trajectories come in runs of k from one initial condition each (rows
    ``i*k .. i*k + k - 1``), and the bootstrap resamples initial conditions with all their trajectories (a cluster
    bootstrap): rollouts from one initial condition are not independent, so resampling them one by one would make
    the interval too narrow."""
    from scipy.stats import bootstrap

    numerator = np.asarray(numerator, dtype=np.float64).ravel()
    denominator = np.asarray(denominator, dtype=np.float64).ravel()
    if numerator.shape != denominator.shape or numerator.size == 0:
        raise ValueError(f"numerator and denominator must be non-empty and of one length (one value per initial "
                         f"condition), got {numerator.shape} and {denominator.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence={confidence!r} must lie in (0, 1)")
    if num_resamples < 1:
        raise ValueError(f"num_resamples={num_resamples!r} must be >= 1")
    if isinstance(cluster_size, bool) or not isinstance(cluster_size, int) or cluster_size < 1 or numerator.size % cluster_size:
        raise ValueError(f"cluster_size={cluster_size!r} must be an int >= 1 that divides the {numerator.size} trajectories")

    def ratio(a, b, axis=-1):
        lower_median = functools.partial(np.quantile, q=0.5, method="lower", axis=axis)
        return lower_median(a) / np.maximum(lower_median(b), 1.0)

    options = dict(n_resamples=num_resamples, confidence_level=confidence, method="percentile",
                   rng=np.random.default_rng(seed))
    if cluster_size == 1:
        result = bootstrap((numerator, denominator), ratio, paired=True, vectorized=True, **options)
    else:
        num, den = numerator.reshape(-1, cluster_size), denominator.reshape(-1, cluster_size)

        def clustered(index, axis=-1):  # index: resampled initial conditions (..., n)
            index = np.asarray(index).astype(np.int64)
            return ratio(num[index].reshape(*index.shape[:-1], -1), den[index].reshape(*index.shape[:-1], -1))

        result = bootstrap((np.arange(len(num)),), clustered, vectorized=True, **options)
    return float(result.confidence_interval.low), float(result.confidence_interval.high)


__all__ = [
    "codebook_usage_distance",
    "flow_statistics",
    "histogram_distance",
    "mean_spectrum",
    "median_ratio_interval",
    "short_term_correlation",
    "spectrum_distance",
    "spectrum_log_ratio",
    "statistic_range",
    "survival_steps",
]
