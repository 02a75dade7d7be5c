"""Kolmogorov-flow solver: exact solutions (Taylor-Green decay, laminar Kolmogorov shear), inviscid conservation,
velocity identities, diagnostics, determinism, a forced stationary run, and the cached data set."""

import json
import math

import pytest
import torch

from hf_models.data import kolmogorov
from hf_models.data.kolmogorov import (
    KolmogorovConfig,
    KolmogorovSolver,
    build_kolmogorov_dataset,
    cfl_number,
    energy,
    energy_spectrum,
    enstrophy,
    load_metadata,
    regenerate_split,
    simulate,
    velocity,
)


torch.set_num_threads(1)


def grid(n):
    """x_j = 2πj/n as (1, n) and y_i as (n, 1), matching the solver's (..., y, x) layout."""
    x = torch.arange(n, dtype=torch.float64) * (2 * math.pi / n)
    return x.reshape(1, n), x.reshape(n, 1)


def unforced(**overrides):
    kwargs = dict(grid_size=32, forcing_amplitude=0.0, drag=0.0, spinup_time=0.0, num_frames=1, frame_interval=0.01)
    kwargs.update(overrides)
    return KolmogorovConfig(**kwargs)


@pytest.mark.parametrize("k, drag", [(3, 0.0), (2, 0.05)])
def test_taylor_green_decays_at_the_exact_rate(k, drag):
    # ω = 2k cos(kx) cos(ky) is an exact steady-shape solution (u·∇ω = 0): ω(t) = ω(0) exp(-(2νk² + α) t)
    config = unforced(reynolds_number=100.0, dt=0.01, drag=drag)
    solver = KolmogorovSolver(config)
    x, y = grid(32)
    omega0 = 2 * k * torch.cos(k * x) * torch.cos(k * y)
    omega = solver.to_physical(solver.advance(solver.to_spectral(omega0[None]), 200))[0]
    t = 200 * config.dt
    exact = omega0 * math.exp(-(2 * config.viscosity * k**2 + drag) * t)
    assert (omega - exact).abs().max() / exact.abs().max() < 1e-10
    assert exact.abs().max() < 0.8 * omega0.abs().max()  # it did decay noticeably


def test_laminar_kolmogorov_flow_is_the_steady_state_and_has_the_documented_sign():
    # body force F = A sin(k_f y) x̂ balances ν∇²u - αu for u = A sin(k_f y)/(ν k_f² + α) x̂;
    # its vorticity ω = -A k_f cos(k_f y)/(ν k_f² + α) is the steady state at low Re (reached from rest)
    config = KolmogorovConfig(grid_size=32, reynolds_number=5.0, drag=0.1, forcing_amplitude=0.5, dt=0.02,
                              spinup_time=0.0, num_frames=1)
    solver = KolmogorovSolver(config)
    x, y = grid(32)
    kf, a = config.forcing_wavenumber, config.forcing_amplitude
    rate = config.viscosity * kf**2 + config.drag
    u_lam = (a * torch.sin(kf * y) / rate).expand(32, 32)
    omega_lam = (-a * kf * torch.cos(kf * y) / rate).expand(32, 32)
    omega = solver.to_physical(solver.advance(solver.to_spectral(torch.zeros(1, 32, 32)), 400))[0]  # t = 8
    assert (omega - omega_lam).abs().max() / omega_lam.abs().max() < 1e-8
    u, v = velocity(omega)
    assert (u - u_lam).abs().max() < 1e-8 and v.abs().max() < 1e-8


def test_nonlinear_term_matches_the_analytic_advection():
    # ω = cos x + cos 2y: ψ = cos x + cos(2y)/4, u = ψ_y = -sin(2y)/2, v = -ψ_x = sin x, so
    # u·∇ω = (-sin 2y / 2)(-sin x) + sin x (-2 sin 2y) = -1.5 sin x sin 2y and dω/dt = +1.5 sin x sin 2y
    solver = KolmogorovSolver(unforced(grid_size=16))
    x, y = grid(16)
    omega = torch.cos(x) + torch.cos(2 * y)
    tendency = torch.fft.irfft2(solver.nonlinear(solver.to_spectral(omega)), s=(16, 16))
    torch.testing.assert_close(tendency, 1.5 * torch.sin(x) * torch.sin(2 * y), rtol=0, atol=1e-13)


def test_time_stepper_is_fourth_order_on_a_forced_viscous_flow():
    # errors against a dt/8 reference fall ~16x per halving of dt when every term (exact linear factors, RK4 stages,
    # forcing, advection) is combined correctly; a slip in one of them leaves an O(dt) or O(dt²) error
    def run(dt):
        config = KolmogorovConfig(grid_size=32, reynolds_number=20.0, drag=0.1, dt=dt, spinup_time=0.0, num_frames=1,
                                  frame_interval=dt, ic_vorticity_rms=5.0)
        solver = KolmogorovSolver(config)
        omega_hat = solver.to_spectral(solver.initial_condition(1, seed=2))
        return solver.to_physical(solver.advance(omega_hat, round(0.8 / dt)))

    reference = run(0.0025)
    errors = [(run(dt) - reference).abs().max().item() for dt in (0.04, 0.02)]
    assert 10 < errors[0] / errors[1] < 24, errors


def test_inviscid_run_conserves_energy_and_enstrophy():
    # ν = α = f = 0: the 2/3-truncated Galerkin system conserves both invariants exactly; what is left is the IF-RK4
    # (= classical RK4 here) drift, measured ~1e-10 relative at CFL ~0.07 over 300 steps; tolerance 1e-9
    config = unforced(reynolds_number=float("inf"), dt=0.01, ic_max_wavenumber=4.0, ic_vorticity_rms=1.0)
    solver = KolmogorovSolver(config)
    omega0 = solver.initial_condition(2, seed=0)
    omega = solver.to_physical(solver.advance(solver.to_spectral(omega0), 300))
    assert ((omega - omega0).norm() / omega0.norm()) > 0.5  # the nonlinear term really moved the field
    for invariant in (energy, enstrophy):
        before, after = invariant(omega0), invariant(omega)
        assert ((after - before).abs() / before).max() < 1e-9, invariant.__name__


def test_velocity_is_divergence_free_and_its_curl_is_the_vorticity():
    solver = KolmogorovSolver(KolmogorovConfig(grid_size=32))
    omega = solver.initial_condition(3, seed=1)
    u, v = velocity(omega)
    ky, kx = kolmogorov._wavenumbers(32, torch.float64)

    def d(f, k):
        return torch.fft.irfft2(1j * k * torch.fft.rfft2(f), s=(32, 32))

    scale = omega.abs().max()
    assert (d(u, kx) + d(v, ky)).abs().max() < 1e-12 * scale
    assert (d(v, kx) - d(u, ky) - omega).abs().max() < 1e-12 * scale


def test_diagnostics_on_a_single_mode():
    k = 3
    x, y = grid(16)
    omega = torch.cos(k * x).expand(16, 16)  # ψ = cos(kx)/k², v = sin(kx)/k
    assert energy(omega).item() == pytest.approx(1 / (4 * k**2), rel=1e-12)
    assert enstrophy(omega).item() == pytest.approx(0.25, rel=1e-12)
    shells, spectrum = energy_spectrum(omega[None].repeat(2, 1, 1))
    assert spectrum.shape == (2, len(shells)) and shells[k] == k
    assert spectrum[0, k].item() == pytest.approx(1 / (4 * k**2), rel=1e-12)
    assert spectrum[0].sum().item() == pytest.approx(spectrum[0, k].item(), rel=1e-12)
    dt = 0.05  # max |v| = 1/k, dx = 2π/16
    assert cfl_number(omega, dt).item() == pytest.approx(dt * (1 / k) / (2 * math.pi / 16), rel=1e-3)


def test_spectrum_sums_to_energy_for_a_random_field():
    omega = torch.randn(2, 3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    _, spectrum = energy_spectrum(omega)
    torch.testing.assert_close(spectrum.sum(-1), energy(omega), rtol=1e-12, atol=0)


SMALL = dict(grid_size=32, reynolds_number=200.0, dt=0.02, spinup_time=1.0, frame_interval=0.2, num_frames=3)


def test_same_seed_is_bit_identical_and_seeds_differ():
    config = KolmogorovConfig(**SMALL)
    a = simulate(config, 2, seed=3)
    assert a.shape == (2, 3, 32, 32) and a.dtype == torch.float64
    assert torch.equal(a, simulate(config, 2, seed=3))
    b = simulate(config, 2, seed=4)
    assert (a - b).abs().max() > 1.0
    assert (a[0] - a[1]).abs().max() > 1.0  # trajectories within a batch differ too
    f32 = simulate(KolmogorovConfig(**SMALL, dtype="float32"), 2, seed=3)
    assert f32.dtype == torch.float32 and (f32.double() - a).abs().max() < 1e-3 * a.abs().max()


def test_forced_run_reaches_a_bounded_stationary_state():
    # from a random start the flow settles (energy ~1 with drag 0.1) and then fluctuates without decaying or growing
    config = KolmogorovConfig(grid_size=32, reynolds_number=200.0, dt=0.02, spinup_time=20.0, frame_interval=0.5,
                              num_frames=21)
    frames = simulate(config, 2, seed=0)
    e = energy(frames)  # (2, 21)
    assert torch.isfinite(frames).all()
    assert e.min() > 0.2 and e.max() < 5.0
    first, second = e[:, :10].mean(), e[:, 11:].mean()
    assert abs(first - second) / (first + second) < 0.2
    assert cfl_number(frames.flatten(0, 1), config.dt).max() < 0.8
    # not the laminar state: the flow still changes between frames
    assert ((frames[:, 1:] - frames[:, :-1]).norm() / frames[:, 1:].norm()) > 0.05


def test_config_validation():
    with pytest.raises(ValueError, match="frame_interval"):
        KolmogorovConfig(dt=0.03, spinup_time=0.09, frame_interval=0.1)
    with pytest.raises(ValueError, match="forcing_wavenumber"):
        KolmogorovConfig(grid_size=8, forcing_wavenumber=4)
    with pytest.raises(ValueError, match="dtype"):
        KolmogorovConfig(dtype="float16")
    # canonical numbers: an int Reynolds number names the same settings (and cache folder) as the float
    assert KolmogorovConfig(reynolds_number=1000, spinup_time=30).to_dict() == KolmogorovConfig().to_dict()


def test_dataset_splits_metadata_and_cache(tmp_path, monkeypatch):
    config = KolmogorovConfig(grid_size=16, spinup_time=0.5, dt=0.02, frame_interval=0.1, num_frames=3, seed=5)
    ds = build_kolmogorov_dataset(config, 3, 2, cache_dir=tmp_path, chunk_size=2)
    assert set(ds) == {"train", "test"} and len(ds["train"]) == 3 and len(ds["test"]) == 2
    train = ds["train"].with_format("torch")[:]["vorticity"]
    test = ds["test"].with_format("torch")[:]["vorticity"]
    assert train.shape == (3, 3, 16, 16) and train.dtype == torch.float32 and test.shape == (2, 3, 16, 16)
    assert (train[:2] - test).abs().max() > 0.1  # different seeds

    meta = load_metadata(ds)
    (folder,) = [p for p in (tmp_path / "kolmogorov").iterdir() if p.is_dir()]
    on_disk = json.loads((folder / "metadata.json").read_text())
    assert meta["config"] == config.to_dict() and on_disk["config"] == config.to_dict()
    assert meta["train_seed"] == 5 and meta["test_seed"] == 5 + kolmogorov.TEST_SEED_OFFSET
    assert folder.name == on_disk["settings_hash"] == kolmogorov.settings_hash(meta)
    # the metadata alone regenerates the split bit for bit
    assert torch.equal(regenerate_split(meta, "test").to(torch.float32), test)

    def boom(*args, **kwargs):
        raise AssertionError("cache miss: simulated again")

    monkeypatch.setattr(kolmogorov, "regenerate_split", boom)
    again = build_kolmogorov_dataset(config, 3, 2, cache_dir=tmp_path, chunk_size=2)
    assert torch.equal(again["train"].with_format("torch")[:]["vorticity"], train)
    # other settings -> another folder (and here a miss)
    with pytest.raises(AssertionError, match="cache miss"):
        build_kolmogorov_dataset(config, 3, 3, cache_dir=tmp_path, chunk_size=2)
    assert not [p for p in (tmp_path / "kolmogorov").iterdir() if p.name.startswith(".")]  # no temp folders left
