"""ThermalizerScheduler: config round trip and validation, the thermalize step against the exact marginal of Gaussian
data with an oracle denoiser (and the noise-only control failing it), firing/stopping flags and per-item model
evaluations in mixed batches, determinism."""

import math
from types import SimpleNamespace

import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.schedulers.scheduling_ddpm import DDPMSchedulerOutput

from hf_models.schedulers import ThermalizerScheduler, ThermalizerSchedulerOutput


torch.set_num_threads(1)

T = 1000
MU, SIGMA = 0.7, 0.2


def test_config_round_trip_and_cosine_schedule(tmp_path):
    scheduler = ThermalizerScheduler(s_init=12, s_stop=3, s_max=150)
    assert scheduler.config.beta_schedule == "squaredcos_cap_v2" and scheduler.config.clip_sample is False
    reference = DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2")
    assert torch.equal(scheduler.alphas_cumprod, reference.alphas_cumprod)
    assert torch.equal(scheduler.betas, reference.betas)

    scheduler.save_config(tmp_path)
    loaded = ThermalizerScheduler.from_pretrained(tmp_path)
    assert type(loaded) is ThermalizerScheduler
    assert (loaded.config.s_init, loaded.config.s_stop, loaded.config.s_max) == (12, 3, 150)
    assert torch.equal(loaded.betas, scheduler.betas)
    assert torch.equal(loaded.alphas_cumprod, scheduler.alphas_cumprod)
    assert {k: v for k, v in loaded.config.items() if not k.startswith("_")} == {
        k: v for k, v in scheduler.config.items() if not k.startswith("_")
    }

    linear = ThermalizerScheduler(beta_schedule="linear", num_train_timesteps=300, s_max=250)
    linear.save_pretrained(tmp_path / "linear")
    loaded = ThermalizerScheduler.from_pretrained(tmp_path / "linear")
    assert loaded.config.num_train_timesteps == 300 and loaded.config.s_max == 250
    assert torch.equal(loaded.betas, DDPMScheduler(num_train_timesteps=300).betas)


@pytest.mark.parametrize(
    "kwargs, names",
    [
        (dict(s_stop=-1), ["s_stop=-1", "0 <= s_stop"]),
        (dict(s_stop=10, s_init=10), ["s_stop=10", "s_init=10", "s_stop < s_init"]),
        (dict(s_init=30, s_max=20), ["s_init=30", "s_max=20", "s_init <= s_max"]),
        (dict(s_max=1000), ["s_max=1000", "num_train_timesteps=1000", "s_max < num_train_timesteps"]),
        (dict(num_train_timesteps=100), ["s_max=200", "num_train_timesteps=100"]),
        (dict(s_init=10.5), ["s_init=10.5", "int"]),
        (dict(s_max=True), ["s_max=True", "int"]),
        (dict(prediction_type="v_prediction"), ["prediction_type='v_prediction'", "epsilon"]),
        (dict(variance_type="learned_range"), ["variance_type='learned_range'", "fixed_small"]),
    ],
)
def test_invalid_settings_raise_naming_the_fields(kwargs, names):
    with pytest.raises(ValueError) as info:
        ThermalizerScheduler(**kwargs)
    for name in names:
        assert name in str(info.value), (name, str(info.value))


def test_valid_boundaries_are_accepted():
    scheduler = ThermalizerScheduler(num_train_timesteps=20, s_stop=0, s_init=19, s_max=19)
    assert (scheduler.config.s_stop, scheduler.config.s_init, scheduler.config.s_max) == (0, 19, 19)


def test_step_is_one_ddpm_level_without_set_timesteps():
    """`step(eps, t, x)` on a fresh scheduler is the DDPM posterior step t -> t-1 (formula (7) of Ho et al.)."""
    scheduler = ThermalizerScheduler()
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    t = 37
    out = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(2))
    assert isinstance(out, DDPMSchedulerOutput)
    ab = scheduler.alphas_cumprod.double()
    a_t, a_prev = ab[t], ab[t - 1]
    beta = 1 - a_t / a_prev
    x0 = (x.double() - (1 - a_t).sqrt() * eps.double()) / a_t.sqrt()
    mean = a_prev.sqrt() * beta / (1 - a_t) * x0 + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x.double()
    z = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2)).double()
    expected = mean + ((1 - a_prev) / (1 - a_t) * beta).sqrt() * z
    assert torch.allclose(out.prev_sample.double(), expected, atol=1e-5)


# ---- exactness with the oracle denoiser of Gaussian data ----


class GaussianOracle(torch.nn.Module):
    """The optimal noise predictor for x0 ~ N(mu, sigma^2 I): E[eps | x_t] = sqrt(1-ab) (x_t - sqrt(ab) mu) /
    (ab sigma^2 + 1 - ab). The scheduler passes only the sample, so the oracle, used on a batch whose items all start
    at level `start`, assumes its k-th call is at level `start - k`; it records the levels it assumed, and the test
    checks them against the timesteps the scheduler actually stepped."""

    def __init__(self, alphas_cumprod, start, mu=MU, sigma=SIGMA):
        super().__init__()
        self.alphas_cumprod = alphas_cumprod.double()
        self.t, self.mu, self.sigma = start, mu, sigma
        self.levels_used = []

    def forward(self, x):
        ab = self.alphas_cumprod[self.t]
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mu) / (ab * self.sigma**2 + 1 - ab)
        self.levels_used.append(self.t)
        self.t -= 1
        return SimpleNamespace(noise_pred=eps.to(x.dtype), level_logits=None)


def record_steps(scheduler):
    """Wrap `scheduler.step` (on this instance) to record the timesteps it is called with."""
    seen, original = [], scheduler.step

    def step(model_output, timestep, sample, **kwargs):
        seen.append(int(timestep))
        return original(model_output, timestep, sample, **kwargs)

    scheduler.step = step
    return seen


def forward_law(ab, s, s_stop):
    """The exact forward-process law: x_stop ~ N(sqrt(ab_stop) mu, V_stop) and x_s = sqrt(ab_s / ab_stop) x_stop +
    independent noise, so the slope of E[x_stop | x_s] is sqrt(ab_s / ab_stop) V_stop / V_s."""
    v_stop, v_s = ab[s_stop] * SIGMA**2 + 1 - ab[s_stop], ab[s] * SIGMA**2 + 1 - ab[s]
    return math.sqrt(ab[s_stop]) * MU, v_stop, math.sqrt(ab[s] / ab[s_stop]) * v_stop / v_s


def ddpm_chain_law(ab, s, s_stop):
    """The law the DDPM chain with the oracle gives exactly (each step is linear-Gaussian): mean, variance and slope
    on x_s of x_stop."""
    m, v, slope = math.sqrt(ab[s]) * MU, ab[s] * SIGMA**2 + 1 - ab[s], 1.0
    for t in range(s, s_stop, -1):
        a_t, a_prev = ab[t], ab[t - 1]
        beta = 1 - a_t / a_prev
        k = math.sqrt(1 - a_t) / (a_t * SIGMA**2 + 1 - a_t)  # eps = k (x - sqrt(a_t) mu)
        c0, ct = math.sqrt(a_prev) * beta / (1 - a_t), math.sqrt(1 - beta) * (1 - a_prev) / (1 - a_t)
        A = c0 * (1 - math.sqrt(1 - a_t) * k) / math.sqrt(a_t) + ct
        bias = c0 * math.sqrt(1 - a_t) * k * MU
        m, v, slope = A * m + bias, A * A * v + (1 - a_prev) / (1 - a_t) * beta, A * slope
    return m, v, slope


def z_scores(x_s, x_stop, mean_exact, var_exact, slope_exact):
    """z-scores of the sample mean, variance and regression slope of x_stop on x_s (all entries are independent)."""
    a, b = x_s.double().flatten(), x_stop.double().flatten()
    n = a.numel()
    mean, var = b.mean(), b.var()
    slope = ((a - a.mean()) * (b - mean)).mean() / a.var()
    resid = b - mean - slope * (a - a.mean())
    return {
        "mean": float((mean - mean_exact) / math.sqrt(var_exact / n)),
        "var": float((var - var_exact) / (var_exact * math.sqrt(2 / n))),
        "slope": float((slope - slope_exact) / (resid.std() / (a.std() * math.sqrt(n)))),
    }


@pytest.mark.parametrize("noise_control", [False, True])
def test_thermalize_with_oracle_matches_exact_law(noise_control):
    s, s_stop = 60, 4
    scheduler = ThermalizerScheduler(s_init=10, s_stop=s_stop, s_max=200)
    ab = scheduler.alphas_cumprod.double().tolist()
    N = 4096
    gen = torch.Generator().manual_seed(0)
    x0 = MU + SIGMA * torch.randn(N, 1, 8, 8, generator=gen)
    x_s = scheduler.add_noise(x0, torch.randn(N, 1, 8, 8, generator=gen), torch.full((N,), s))

    # With the oracle, E[x_{t-1} | x_t] of each DDPM step is exact, so the mean and the slope of E[x_stop | x_s] are
    # those of the forward process. The fixed_small variance beta~_t drops c0^2 Var(x0 | x_t) per step, which sums to
    # about 1% of V_stop here (4 standard errors at this sample size), so the variance is checked against the
    # chain's exact value, and that against the marginal at 1.5%.
    mean_fwd, var_fwd, slope_fwd = forward_law(ab, s, s_stop)
    mean_chain, var_chain, slope_chain = ddpm_chain_law(ab, s, s_stop)
    assert math.isclose(mean_chain, mean_fwd, rel_tol=1e-9) and math.isclose(slope_chain, slope_fwd, rel_tol=1e-9)
    assert var_chain < var_fwd and math.isclose(var_chain, var_fwd, rel_tol=0.015)

    oracle = GaussianOracle(scheduler.alphas_cumprod, start=s)
    stepped = record_steps(scheduler)
    out = scheduler.thermalize(
        oracle, x_s, generator=torch.Generator().manual_seed(1), levels=torch.full((N,), s), noise_control=noise_control
    )
    assert isinstance(out, ThermalizerSchedulerOutput)
    assert bool(out.fired.all()) and not bool(out.stopped.any())
    assert stepped == list(range(s, s_stop, -1))
    z = z_scores(x_s, out.sample, mean_fwd, var_chain, slope_fwd)
    if not noise_control:
        assert oracle.levels_used == stepped and out.num_model_calls == s - s_stop
        assert all(abs(v) < 5 for v in z.values()), z
    else:
        # noise only: no model call; any zero-mean eps keeps the unconditional mean, but the variance grows instead
        # of shrinking and E[x_stop | x_s] is not pulled towards the data (slope ~ 1 instead of ~ 0.6)
        assert oracle.levels_used == [] and out.num_model_calls == 0
        assert abs(z["var"]) > 50 and abs(z["slope"]) > 50, z


# ---- flags and per-item evaluations ----


class TaggedModel:
    """Item i of the batch sits near 100 (i + 1) in every entry; with noise_pred = 0 a DDPM step multiplies a state
    by 1/sqrt(alpha_t) and adds noise of std < 0.2, which over <= 196 cosine steps (a factor < 1.055) keeps every
    row within 50 of its tag for i < 8, so each row the model sees names its item. Records the items of each call
    and returns one-hot `level_logits` at `levels[item]`."""

    def __init__(self, levels=None):
        self.levels = levels
        self.calls = []

    def __call__(self, x):
        ids = (x.double().mean(dim=(1, 2, 3)) / 100).round().long() - 1
        self.calls.append(ids.tolist())
        logits = None
        if self.levels is not None:
            logits = torch.nn.functional.one_hot(self.levels[ids], T).to(x.dtype)
        return SimpleNamespace(noise_pred=torch.zeros_like(x), level_logits=logits)


def tagged_batch(B, seed=0):
    noise = 0.01 * torch.randn(B, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    return noise + 100 * torch.arange(1, B + 1, dtype=torch.float32).view(B, 1, 1, 1)


# s_init=10, s_stop=4, s_max=200: below, at s_init (not fired), fired (incl. s_max itself), stopped
MIXED_LEVELS = torch.tensor([200, 0, 10, 11, 25, 201, 57, 999])


@pytest.mark.parametrize("classify", [False, True])
def test_mixed_batch_flags_and_model_evaluations(classify):
    scheduler = ThermalizerScheduler(s_init=10, s_stop=4, s_max=200)
    sample = tagged_batch(len(MIXED_LEVELS))
    before = sample.clone()
    model = TaggedModel(MIXED_LEVELS if classify else None)
    out = scheduler.thermalize(
        model, sample, generator=torch.Generator().manual_seed(0), levels=None if classify else MIXED_LEVELS
    )
    assert torch.equal(sample, before)  # the input is not modified
    assert torch.equal(out.levels, MIXED_LEVELS)
    expected_fired = torch.tensor([True, False, False, True, True, False, True, False])
    expected_stopped = torch.tensor([False, False, False, False, False, True, False, True])
    assert torch.equal(out.fired, expected_fired) and torch.equal(out.stopped, expected_stopped)
    assert torch.equal(out.sample[~expected_fired], sample[~expected_fired])  # bit-identical
    assert not torch.equal(out.sample[expected_fired], sample[expected_fired])

    calls = model.calls[1:] if classify else model.calls
    if classify:
        assert model.calls[0] == list(range(len(MIXED_LEVELS)))
    fired_ids = expected_fired.nonzero().flatten().tolist()
    expected_calls = [[i for i in fired_ids if MIXED_LEVELS[i] >= t] for t in range(200, 4, -1)]
    assert calls == expected_calls  # only the active sub-batch goes through the model, one call per level
    per_item = [sum(row.count(i) for row in calls) for i in range(len(MIXED_LEVELS))]
    assert per_item == [int(s) - 4 if f else 0 for s, f in zip(MIXED_LEVELS, expected_fired)]
    assert out.num_model_calls == len(expected_calls) + int(classify)


def test_nothing_fired_makes_no_denoising_call():
    scheduler = ThermalizerScheduler(s_init=10, s_stop=4, s_max=200)
    sample = tagged_batch(4)
    model = TaggedModel()
    out = scheduler.thermalize(model, sample, levels=torch.tensor([0, 10, 201, 500]))
    assert model.calls == [] and out.num_model_calls == 0
    assert torch.equal(out.sample, sample) and out.sample is not sample
    assert out.fired.tolist() == [False] * 4 and out.stopped.tolist() == [False, False, True, True]


def test_thermalize_steps_single_levels_after_set_timesteps():
    """A scheduler whose set_timesteps(50) was called (DDPM would then step 20 levels at a time) still thermalizes
    one level per step, identically to a fresh one, and keeps its inference schedule."""
    levels = torch.tensor([30, 3, 57])
    fresh = ThermalizerScheduler()
    used = ThermalizerScheduler()
    used.set_timesteps(50)
    timesteps = used.timesteps.clone()
    outs = []
    for scheduler in (fresh, used):
        model = TaggedModel()
        generator = torch.Generator().manual_seed(5)
        outs.append(scheduler.thermalize(model, tagged_batch(3), generator=generator, levels=levels))
        assert sum(len(c) for c in model.calls) == (30 - 4) + (57 - 4)
    assert torch.equal(outs[0].sample, outs[1].sample)
    assert used.num_inference_steps == 50 and torch.equal(used.timesteps, timesteps)


def test_levels_shape_is_checked():
    scheduler = ThermalizerScheduler()
    with pytest.raises(ValueError, match="levels has shape"):
        scheduler.thermalize(TaggedModel(), tagged_batch(3), levels=torch.tensor([20, 20]))


# ---- determinism ----


class TinyDenoiser(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.head = torch.nn.Linear(3, T)

    def forward(self, x):
        return SimpleNamespace(noise_pred=self.conv(x), level_logits=self.head(x.mean(dim=(2, 3))))


@pytest.mark.parametrize("noise_control", [False, True])
def test_same_seed_same_output_different_seed_differs(noise_control):
    scheduler = ThermalizerScheduler()
    model = TinyDenoiser()
    sample = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(3))
    levels = torch.tensor([40, 12, 5, 300, 25])

    def run(seed):
        return scheduler.thermalize(
            model, sample, generator=torch.Generator().manual_seed(seed), levels=levels, noise_control=noise_control
        ).sample

    a, b, c = run(0), run(0), run(1)
    fired = torch.tensor([True, True, False, False, True])
    assert torch.equal(a, b)
    assert not torch.allclose(a[fired], c[fired])
    assert torch.equal(a[~fired], c[~fired]) and torch.equal(a[~fired], sample[~fired])

    # the classifier path is deterministic too and uses the argmax of level_logits
    out = scheduler.thermalize(model, sample, generator=torch.Generator().manual_seed(0), noise_control=noise_control)
    assert torch.equal(out.levels, model(sample).level_logits.argmax(-1))
    again = scheduler.thermalize(model, sample, generator=torch.Generator().manual_seed(0), noise_control=noise_control)
    assert torch.equal(out.sample, again.sample)


@pytest.mark.parametrize("settings", [{}, {"num_denoising_steps": 4}, {"renoise": True}, {"eta": 0.5}])
@pytest.mark.parametrize("noise_control", [False, True])
def test_one_generator_per_item_gives_each_item_its_own_noise(settings, noise_control):
    """With a list of generators each item's thermalization is the one it gets alone with its generator, whichever
    other items fire beside it (diffusers' per-item generator convention)."""
    scheduler = ThermalizerScheduler(**settings)
    model = TinyDenoiser().double()  # float64: a sub-batch's convolution rounds as the full batch's
    sample = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    levels = torch.tensor([40, 12, 5, 25])  # s_init 10 by default: item 2 does not fire
    seeds = [20, 21, 22, 23]
    together = scheduler.thermalize(model, sample, generator=[torch.Generator().manual_seed(k) for k in seeds],
                                    levels=levels, noise_control=noise_control).sample
    for i in range(4):
        alone = scheduler.thermalize(model, sample[i: i + 1], generator=[torch.Generator().manual_seed(seeds[i])],
                                     levels=levels[i: i + 1], noise_control=noise_control).sample
        assert torch.allclose(alone[0], together[i], atol=1e-10), i
    assert torch.equal(together[2], sample[2])
    with pytest.raises(ValueError, match="one per item"):
        scheduler.thermalize(model, sample, generator=[torch.Generator()], levels=levels)


class GridOracle(torch.nn.Module):
    """The Gaussian oracle for strided thermalization: it is told the level sequence it will be called at."""

    def __init__(self, alphas_cumprod, levels, mu=MU, sigma=SIGMA):
        super().__init__()
        self.alphas_cumprod, self.levels, self.mu, self.sigma = alphas_cumprod.double(), list(levels), mu, sigma

    def forward(self, x):
        ab = self.alphas_cumprod[self.levels.pop(0)]
        eps = (1 - ab).sqrt() * (x.double() - ab.sqrt() * self.mu) / (ab * self.sigma**2 + 1 - ab)
        return SimpleNamespace(noise_pred=eps.to(x.dtype), level_logits=None)


def test_step_between_adjacent_levels_is_ddpm_step():
    scheduler = ThermalizerScheduler()
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(1))
    t = torch.full((4,), 37)
    ours = scheduler.step_between(eps, t, t - 1, x, generator=torch.Generator().manual_seed(2))
    ddpm = scheduler.step(eps, 37, x, generator=torch.Generator().manual_seed(2)).prev_sample
    assert torch.allclose(ours, ddpm, atol=1e-5)
    with pytest.raises(ValueError, match="prev_timesteps < timesteps"):
        scheduler.step_between(eps, t, t, x)


def test_strided_thermalization_uses_at_most_k_calls_and_is_exact_in_mean():
    """num_denoising_steps=K: K model calls from level s to s_stop; with the oracle, the mean and the regression slope
    of x_stop on x_s match the exact DDPM posterior chain's (strided DDPM keeps the conditional mean exact)."""
    s, s_stop, k = 60, 4, 5
    scheduler = ThermalizerScheduler(s_init=10, s_stop=s_stop, s_max=200, num_denoising_steps=k)
    grid = torch.linspace(s, s_stop, k + 1, dtype=torch.float64).round().long().tolist()
    ab = scheduler.alphas_cumprod.double()
    n = 64 * 64 * 64
    gen = torch.Generator().manual_seed(0)
    x0 = MU + SIGMA * torch.randn(64, 64, 8, 8, generator=gen, dtype=torch.float64)
    x_s = scheduler.add_noise(x0.float(), torch.randn(x0.shape, generator=gen).float(), torch.full((64,), s)).double()
    oracle = GridOracle(ab, grid[:-1])
    out = scheduler.thermalize(oracle, x_s.float(), generator=gen, levels=torch.full((64,), s))
    assert out.num_model_calls == k and out.fired.all()
    x_stop = out.sample.double()
    # exact conditional mean of x_stop given x_s through the chain of Gaussian posteriors: E = a x_s + b
    a, b = 1.0, 0.0
    for t, p in zip(grid[:-1], grid[1:]):
        ab_t, ab_p = ab[t], ab[p]
        alpha = ab_t / ab_p
        c = (1 - ab_t).sqrt() / (ab_t * SIGMA**2 + 1 - ab_t)  # eps = c (x - sqrt(ab_t) mu)
        c0 = ab_p.sqrt() * (1 - alpha) / (1 - ab_t) / ab_t.sqrt()
        c1 = alpha.sqrt() * (1 - ab_p) / (1 - ab_t)
        # mean = c0 (x - sqrt(1-ab_t) eps) + c1 x, linear in x
        slope = c0 * (1 - (1 - ab_t).sqrt() * c) + c1
        offset = c0 * (1 - ab_t).sqrt() * c * ab_t.sqrt() * MU
        a, b = slope * a, slope * b + offset
    predicted = a * x_s + b
    resid = x_stop - predicted
    assert abs(resid.mean().item()) < 5 * resid.std().item() / n**0.5
    # the slope of x_stop on x_s is the chain's: a wrong posterior (e.g. the noise control) is far off
    fitted = ((x_s - x_s.mean()) * (x_stop - x_stop.mean())).sum() / ((x_s - x_s.mean()) ** 2).sum()
    assert abs(fitted.item() - a.item()) < 0.02
    control = scheduler.thermalize(GridOracle(ab, grid[:-1]), x_s.float(), generator=torch.Generator().manual_seed(0),
                                   levels=torch.full((64,), s), noise_control=True).sample.double()
    fitted_control = ((x_s - x_s.mean()) * (control - control.mean())).sum() / ((x_s - x_s.mean()) ** 2).sum()
    assert abs(fitted_control.item() - a.item()) > 0.05


def test_strided_with_enough_steps_equals_single_levels():
    levels = torch.full((3,), 30)
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    single = ThermalizerScheduler().thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    strided = ThermalizerScheduler(num_denoising_steps=26).thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    assert strided.num_model_calls == single.num_model_calls == 26
    assert torch.allclose(strided.sample, single.sample, atol=1e-3)  # float64 vs DDPM float32 arithmetic, 26 steps


@pytest.mark.parametrize("value", [0, -1, 2.5, True])
def test_num_denoising_steps_is_validated(value):
    with pytest.raises(ValueError, match="num_denoising_steps"):
        ThermalizerScheduler(num_denoising_steps=value)


@pytest.mark.parametrize("num_denoising_steps", [None, 4])
def test_renoise_adds_the_level_noise_to_fired_items_first(num_denoising_steps, tmp_path):
    """renoise=True: each fired item is first noised to its level by `add_noise` with the call's generator (its
    first draw), then denoised as before; items that did not fire or were stopped stay bit-identical."""
    levels = torch.tensor([30, 2, 25, 250])  # fired, below s_init, fired, stopped (s_max=200)
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    plain = ThermalizerScheduler(s_init=10, s_stop=4, num_denoising_steps=num_denoising_steps)
    renoised = ThermalizerScheduler(s_init=10, s_stop=4, num_denoising_steps=num_denoising_steps, renoise=True)
    out = renoised.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)

    gen = torch.Generator().manual_seed(1)
    fired = torch.tensor([True, False, True, False])
    noise = torch.randn(x[fired].shape, generator=gen)
    by_hand = x.clone()
    by_hand[fired] = plain.add_noise(x[fired], noise, levels[fired])
    expected = plain.thermalize(TinyDenoiser(), by_hand, generator=gen, levels=levels)
    assert torch.equal(out.fired, fired) and torch.equal(out.stopped, torch.tensor([False, False, False, True]))
    assert torch.allclose(out.sample[fired], expected.sample[fired], atol=1e-6)
    assert torch.equal(out.sample[~fired], x[~fired])
    without = plain.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    assert not torch.allclose(out.sample[fired], without.sample[fired], atol=1e-2)

    renoised.save_config(tmp_path)
    assert ThermalizerScheduler.from_pretrained(tmp_path).config.renoise is True
    with pytest.raises(ValueError, match="renoise='yes'"):
        ThermalizerScheduler(renoise="yes")


@pytest.mark.parametrize("num_denoising_steps", [None, 4])
def test_s_floor_denoises_fired_items_from_at_least_that_level(num_denoising_steps, tmp_path):
    """s_floor: a fired item is denoised from max(level, s_floor), exactly as if its level had been given as that;
    which items fire is still decided by the predicted level against s_init, and the returned levels stay the
    predicted ones; unfired and stopped items stay bit-identical."""
    levels = torch.tensor([30, 2, 12, 250])  # fired above the floor, below s_init, fired below the floor, stopped
    x = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    floored = ThermalizerScheduler(s_init=10, s_stop=4, num_denoising_steps=num_denoising_steps, s_floor=20)
    out = floored.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    plain = ThermalizerScheduler(s_init=10, s_stop=4, num_denoising_steps=num_denoising_steps)
    expected = plain.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1),
                                levels=torch.tensor([30, 2, 20, 250]))
    assert torch.equal(out.fired, torch.tensor([True, False, True, False])) and torch.equal(out.levels, levels)
    assert torch.allclose(out.sample, expected.sample, atol=1e-6)
    assert torch.equal(out.sample[[1, 3]], x[[1, 3]])
    without = plain.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    assert not torch.allclose(out.sample[2], without.sample[2], atol=1e-2)  # the floor changed the low item

    floored.save_config(tmp_path)
    assert ThermalizerScheduler.from_pretrained(tmp_path).config.s_floor == 20
    for bad in (4, 200, 20.0, True):
        with pytest.raises(ValueError, match="s_floor="):
            ThermalizerScheduler(num_train_timesteps=200, s_init=10, s_stop=4, s_max=150, s_floor=bad)


@pytest.mark.parametrize("num_denoising_steps", [None, 4])
def test_s_ceiling_denoises_fired_items_from_at_most_that_level(num_denoising_steps, tmp_path):
    """s_ceiling: a fired item is denoised from min(level, s_ceiling) (after s_floor), exactly as if its level had
    been given as that; firing and stopping still follow the predicted level, which is returned unchanged."""
    levels = torch.tensor([30, 2, 12, 250, 18])  # fired above the ceiling, below s_init, fired below it, stopped, between
    x = torch.randn(5, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    capped = ThermalizerScheduler(s_init=10, s_stop=4, num_denoising_steps=num_denoising_steps, s_ceiling=20)
    out = capped.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    plain = ThermalizerScheduler(s_init=10, s_stop=4, num_denoising_steps=num_denoising_steps)
    expected = plain.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1),
                                levels=torch.tensor([20, 2, 12, 250, 18]))
    assert torch.equal(out.fired, torch.tensor([True, False, True, False, True])) and torch.equal(out.levels, levels)
    assert torch.allclose(out.sample, expected.sample, atol=1e-6)
    assert torch.equal(out.sample[[1, 3]], x[[1, 3]])
    without = plain.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    assert not torch.allclose(out.sample[0], without.sample[0], atol=1e-2)  # the ceiling changed the high item
    # with a floor: max then min, so a floor equal to the ceiling starts every fired item there
    both = ThermalizerScheduler(s_init=10, s_stop=4, num_denoising_steps=num_denoising_steps, s_floor=20, s_ceiling=20)
    fixed = both.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    at_20 = plain.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1),
                             levels=torch.tensor([20, 2, 20, 250, 20]))
    assert torch.allclose(fixed.sample, at_20.sample, atol=1e-6)

    capped.save_config(tmp_path)
    assert ThermalizerScheduler.from_pretrained(tmp_path).config.s_ceiling == 20
    for bad, kwargs in ((4, {}), (200, {}), (20.0, {}), (True, {}), (20, {"s_floor": 30})):
        with pytest.raises(ValueError, match="s_ceiling="):
            ThermalizerScheduler(num_train_timesteps=200, s_init=10, s_stop=4, s_max=150, s_ceiling=bad, **kwargs)


def test_with_config_overrides_keys_a_saved_config_lacks(tmp_path):
    """A scheduler loaded from a config saved before a key existed records that key as defaulted (diffusers'
    `_use_default_values`), and plain `from_config({**config, **overrides})` drops an override of it; `with_config`
    applies it."""
    import json

    ThermalizerScheduler(num_train_timesteps=200, s_init=15, s_stop=5, s_max=150).save_config(tmp_path)
    path = tmp_path / "scheduler_config.json"
    saved = json.loads(path.read_text())
    del saved["renoise"]  # as written before `renoise` existed
    path.write_text(json.dumps(saved))
    loaded = ThermalizerScheduler.from_pretrained(tmp_path)
    assert "renoise" in loaded.config["_use_default_values"]
    assert ThermalizerScheduler.from_config({**loaded.config, "renoise": True}).config.renoise is False  # the pitfall
    changed = loaded.with_config(num_denoising_steps=3, renoise=True, s_init=20)
    assert (changed.config.num_denoising_steps, changed.config.renoise, changed.config.s_init) == (3, True, 20)
    assert (changed.config.s_stop, changed.config.s_max, changed.config.num_train_timesteps) == (5, 150, 200)
    assert loaded.config.renoise is False and loaded.config.num_denoising_steps is None  # the original is untouched
    with pytest.raises(ValueError, match="s_init=3"):
        loaded.with_config(s_init=3)


def test_ddim_eta_one_is_the_ddpm_posterior_and_eta_zero_is_deterministic():
    """eta=1: DDIM's step between two levels has the DDPM posterior's mean and variance, so with the same generator
    the strided samples agree with the DDPM path's; without num_denoising_steps the DDIM path visits every level as
    the DDPM one does; eta=0 draws no randomness into the result."""
    levels = torch.tensor([40, 25, 3])  # two fired, one below s_init
    x = torch.randn(3, 3, 6, 6, generator=torch.Generator().manual_seed(0))
    ddpm = ThermalizerScheduler(num_denoising_steps=5).thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    ddim = ThermalizerScheduler(num_denoising_steps=5, eta=1.0).thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    assert ddim.num_model_calls == ddpm.num_model_calls == 5
    assert torch.allclose(ddim.sample, ddpm.sample, atol=1e-5)
    assert torch.equal(ddim.sample[2], x[2])
    single = ThermalizerScheduler().thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    ddim_single = ThermalizerScheduler(eta=1.0).thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels)
    assert ddim_single.num_model_calls == single.num_model_calls == 40 - 4
    zero = ThermalizerScheduler(num_denoising_steps=5, eta=0.0)
    a = zero.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(1), levels=levels).sample
    b = zero.thermalize(TinyDenoiser(), x, generator=torch.Generator().manual_seed(2), levels=levels).sample
    assert torch.equal(a, b) and not torch.allclose(a[:2], x[:2], atol=1e-2)


@pytest.mark.parametrize("value", [-0.1, 1.5, True, "1"])
def test_eta_is_validated(value):
    with pytest.raises(ValueError, match="eta="):
        ThermalizerScheduler(eta=value)
