"""DTM: Gibbs sampler against exact enumeration, graph and colouring, energies and fields, forward process in the
model, training signal, save/load, remote code, config validation, seed size on the meta device."""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_models.dtm import DTMConfig, DTMModel, DTMOutput
from tests.helpers import BLOCK_LATENTHEAT, run_without_latentheat
from hf_models.dtm.gibbs import (
    build_lattice_graph,
    gibbs_sweeps,
    ising_energy,
    skip_offsets,
    thrml_gibbs_sweeps,
)


torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------------------------


def all_states(n):
    """All `2**n` spin configurations `(2**n, n)`; row `k` has spin `i = +1` iff bit `i` of `k` is set."""
    k = torch.arange(2**n).unsqueeze(1)
    return ((k >> torch.arange(n)) & 1).float() * 2 - 1


def state_index(states):
    return ((states > 0).long() << torch.arange(states.shape[1])).sum(1)


def total_variation(samples, probs):
    counts = torch.bincount(state_index(samples), minlength=probs.numel()).double()
    return 0.5 * (counts / samples.shape[0] - probs).abs().sum().item()


def tv_bound(probs, n, delta=1e-6):
    """Bound on the TV distance between the empirical distribution of `n` exact independent samples and `probs`:
    E[TV] <= 1/2 sum_k sqrt(p_k (1 - p_k) / n) (Jensen per state), and TV has bounded differences 1/n per sample,
    so by McDiarmid P(TV > E[TV] + sqrt(ln(1/delta) / (2n))) <= delta. A correct sampler fails with probability
    <= 1e-6 (plus its mixing error after the burn-in, negligible at these sizes)."""
    return 0.5 * torch.sqrt(probs * (1 - probs) / n).sum().item() + math.sqrt(math.log(1 / delta) / (2 * n))


def random_ising(graph, seed, coupling_scale=0.5, field_scale=0.5):
    gen = torch.Generator().manual_seed(seed)
    J = torch.randn(graph.num_edges, generator=gen, dtype=torch.float64).float() * coupling_scale
    h = torch.randn(1, graph.num_sites, generator=gen, dtype=torch.float64).float() * field_scale
    return J, h


def exact_probs(graph, J, h):
    states = all_states(graph.num_sites)
    energy = ising_energy(states.double(), J.double(), h.double(), graph)
    return torch.softmax(-energy, dim=0)


def small_graphs():
    return {
        # 3 x 4 lattice, 8-neighbour window: 12 spins, 4 colours
        "lattice_8nbr": build_lattice_graph(1, 3, window=1, block_size=12, width=4),
        # 2 channels on 2 x 3 pixels, 8-neighbour window inside 2x3 and a skip (0, 2): 12 spins
        "channels_skip": build_lattice_graph(2, 2, window=1, block_size=6, skip_connections=[[0, 2]], width=3),
        # 2 x 4 pixels in two 2x2 blocks, 2 latent spins per block: 8 visible + 4 latent spins
        "latents": build_lattice_graph(1, 2, window=1, block_size=2, latents_per_block=2, width=4),
    }


def one_color_graph(graph):
    """A deliberately wrong sampler's graph: every spin in one colour, i.e. all spins updated in parallel."""
    D = max(t.shape[1] for t in graph.neighbor_sites)
    pad = lambda t, v: torch.cat([t, torch.full((t.shape[0], D - t.shape[1]), v)], dim=1)  # noqa: E731
    sites = torch.cat(graph.color_sites)
    nbr = torch.cat([pad(t, graph.num_sites) for t in graph.neighbor_sites])
    nbr_e = torch.cat([pad(t, graph.num_edges) for t in graph.neighbor_edges])
    return dataclasses.replace(graph, color_sites=[sites], neighbor_sites=[nbr], neighbor_edges=[nbr_e])


def run_chains(graph, J, h, n_chains=20000, sweeps=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = torch.randint(0, 2, (n_chains, graph.num_sites), generator=gen).float() * 2 - 1
    return gibbs_sweeps(init, J, h, graph, sweeps, generator=gen)


# ---------------------------------------------------------------------------------------------------------------------
# Gibbs sampler against exact enumeration
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lattice_8nbr", "channels_skip", "latents"])
def test_gibbs_matches_exact_boltzmann_and_wrong_samplers_fail(name):
    graph = small_graphs()[name]
    assert graph.num_sites <= 12
    J, h = random_ising(graph, seed=1)
    probs = exact_probs(graph, J, h)
    n = 20000
    bound = tv_bound(probs, n)
    samples = run_chains(graph, J, h, n_chains=n)
    tv = total_variation(samples, probs)
    assert tv < bound, (name, tv, bound)
    # the same check catches a sign error in the couplings ...
    tv_wrong_sign = total_variation(run_chains(graph, -J, h, n_chains=n), probs)
    assert tv_wrong_sign > bound, (name, tv_wrong_sign, bound)
    # ... and a sampler that ignores the colouring (all spins updated at once)
    tv_parallel = total_variation(run_chains(one_color_graph(graph), J, h, n_chains=n), probs)
    assert tv_parallel > bound, (name, tv_parallel, bound)


def test_gibbs_per_chain_couplings_match_shared():
    graph = small_graphs()["lattice_8nbr"]
    J, h = random_ising(graph, seed=2)
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    init = torch.ones(6, graph.num_sites)
    a = gibbs_sweeps(init, J, h, graph, 3, generator=gen_a)
    b = gibbs_sweeps(init, J.expand(6, -1).contiguous(), h.expand(6, -1), graph, 3, generator=gen_b)
    assert torch.equal(a, b)
    # half precision on CPU is upcast for the draws and returned in the input dtype
    c = gibbs_sweeps(init.half(), J.half(), h.half(), graph, 3, generator=torch.Generator().manual_seed(5))
    assert c.dtype == torch.float16 and set(c.unique().tolist()) <= {-1.0, 1.0}


def thrml_condition(graph, seed, coupling_scale=0.5):
    """A real `x_t` condition for the thrml backend: couplings `(N_v,)` to a fixed condition image `(N_v,)` (+-1)."""
    gen = torch.Generator().manual_seed(seed)
    coupling = torch.randn(graph.num_visible, generator=gen, dtype=torch.float64).float() * coupling_scale
    condition = torch.randint(0, 2, (graph.num_visible,), generator=gen).float() * 2 - 1
    return coupling, condition


def condition_fields(graph, bias, coupling, condition):
    """`bias + pad(coupling * condition)`: the fields the torch sampler takes for the thrml backend's split."""
    pad = torch.zeros(*condition.shape[:-1], graph.num_sites - graph.num_visible)
    return bias + torch.cat([coupling * condition, pad], dim=-1)


def run_thrml_chains(graph, J, bias, coupling, condition, n_chains=20000, sweeps=40, seed=0):
    gen = torch.Generator().manual_seed(seed)
    init = torch.randint(0, 2, (n_chains, graph.num_sites), generator=gen).float() * 2 - 1
    return thrml_gibbs_sweeps(init, J, bias, coupling, condition.expand(n_chains, -1), graph, sweeps, generator=gen)


@pytest.mark.parametrize("name", ["lattice_8nbr", "channels_skip", "latents"])
def test_thrml_backend_matches_exact_boltzmann(name):
    """The thrml backend with a real `x_t` condition (clamped spins, nonzero coupling) samples the Boltzmann
    distribution of the fields `bias + coupling * x_t` (enumerated exactly), within the torch test's TV bound; the
    same bound rejects it with the couplings negated. Needs the `thrml` extra (`make test` installs it): without
    it this fails instead of skipping."""
    graph = small_graphs()[name]
    J, h = random_ising(graph, seed=1)
    coupling, condition = thrml_condition(graph, seed=3)
    probs = exact_probs(graph, J, condition_fields(graph, h[0], coupling, condition).unsqueeze(0))
    n = 20000
    bound = tv_bound(probs, n)
    tv = total_variation(run_thrml_chains(graph, J, h[0], coupling, condition, n_chains=n), probs)
    assert tv < bound, (name, tv, bound)
    tv_wrong_sign = total_variation(run_thrml_chains(graph, -J, h[0], coupling, condition, n_chains=n), probs)
    assert tv_wrong_sign > bound, (name, tv_wrong_sign, bound)


def two_sample_z(a, b):
    """Per-column z-scores of the difference of the means of two independent samples `(n_a, K)`, `(n_b, K)`; a
    column that is constant in both (zero variance) gets z = 0 when the means agree and inf when they do not."""
    a, b = a.double(), b.double()
    se = torch.sqrt(a.var(0) / a.shape[0] + b.var(0) / b.shape[0])
    diff = (a.mean(0) - b.mean(0)).abs()
    return torch.where(se > 0, diff / se.clamp_min(1e-300), torch.where(diff > 0, math.inf, 0.0))


def test_thrml_backend_agrees_with_torch_on_a_bigger_graph():
    """2 channels x 10 x 10 pixels in 5 x 5 blocks (8-neighbour window, skip (0, 5)) with one latent per block: 204
    spins, more than enumeration allows. From the same initial states both backends run the same sweeps (same colour
    order), so the distribution after `sweeps` sweeps is the same whether or not the chains have mixed. Per-spin means
    and per-edge correlations `s_i s_j` of `n` independent chains each must agree within `z` standard errors of the
    difference, `z` from a Bonferroni bound over all K statistics (a correct pair fails with probability <= 1e-4 in the
    normal approximation; the backends share the initial states and per-chain `x_t`, which correlates their estimates
    positively and only makes the summed-variance standard error conservative); the torch sampler with the couplings
    negated must not agree."""
    graph = build_lattice_graph(2, 10, window=1, block_size=5, skip_connections=[[0, 5]], latents_per_block=1)
    assert graph.num_sites == 204 and graph.num_visible == 200
    J, h = random_ising(graph, seed=4, coupling_scale=0.3, field_scale=0.3)
    coupling, _ = thrml_condition(graph, seed=5)
    n, sweeps = 4000, 30
    gen = torch.Generator().manual_seed(6)
    condition = torch.randint(0, 2, (n, graph.num_visible), generator=gen).float() * 2 - 1  # per-chain x_t
    init = torch.randint(0, 2, (n, graph.num_sites), generator=gen).float() * 2 - 1
    fields = condition_fields(graph, h[0], coupling, condition)
    i, j = graph.edges[:, 0], graph.edges[:, 1]
    stats = lambda s: torch.cat([s, s[:, i] * s[:, j]], dim=1)  # noqa: E731  (n, N + E)
    K = graph.num_sites + graph.num_edges
    z_max = -torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1e-4 / (2 * K), dtype=torch.float64)).item()
    thrml_stats = stats(thrml_gibbs_sweeps(init, J, h[0], coupling, condition, graph, sweeps, generator=gen))
    torch_stats = stats(gibbs_sweeps(init, J, fields, graph, sweeps, generator=gen))
    z = two_sample_z(thrml_stats, torch_stats)
    assert z.max() < z_max, (z.max().item(), z_max, int(z.argmax()))
    z_wrong_sign = two_sample_z(thrml_stats, stats(gibbs_sweeps(init, -J, fields, graph, sweeps, generator=gen)))
    assert z_wrong_sign.max() > z_max, (z_wrong_sign.max().item(), z_max)


def test_thrml_backend_takes_per_chain_biases():
    """A model with a field network gives each chain its own biases `(B, N)`: the thrml backend builds one program
    per chain inside its `vmap`. On a 2 x 6 x 6 graph with a latent per block, the means and edge correlations of the
    two backends agree within the same Bonferroni z bound; shuffling the biases across chains breaks the agreement."""
    graph = build_lattice_graph(2, 6, window=1, block_size=3, skip_connections=[[0, 3]], latents_per_block=1)
    J, _ = random_ising(graph, seed=7, coupling_scale=0.3)
    coupling, _ = thrml_condition(graph, seed=8)
    n, sweeps = 3000, 20
    gen = torch.Generator().manual_seed(9)
    condition = torch.randint(0, 2, (n, graph.num_visible), generator=gen).float() * 2 - 1
    bias = torch.randn(n, graph.num_sites, generator=gen) * 0.8  # per chain
    init = torch.randint(0, 2, (n, graph.num_sites), generator=gen).float() * 2 - 1
    fields = condition_fields(graph, bias, coupling, condition)
    i, j = graph.edges[:, 0], graph.edges[:, 1]
    # per-chain biases make each chain's own mean differ: compare s * sign(bias) (its mean is shared only if the
    # per-chain biases were used) and the edge correlations
    stats = lambda s: torch.cat([s * bias.sign(), s[:, i] * s[:, j]], dim=1)  # noqa: E731
    K = graph.num_sites + graph.num_edges
    z_max = -torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor(1e-4 / (2 * K), dtype=torch.float64)).item()
    thrml_stats = stats(thrml_gibbs_sweeps(init, J, bias, coupling, condition, graph, sweeps, generator=gen))
    torch_stats = stats(gibbs_sweeps(init, J, fields, graph, sweeps, generator=gen))
    z = two_sample_z(thrml_stats, torch_stats)
    assert z.max() < z_max, (z.max().item(), z_max)
    shuffled = condition_fields(graph, bias[torch.randperm(n, generator=gen)], coupling, condition)
    z_wrong = two_sample_z(thrml_stats, stats(gibbs_sweeps(init, J, shuffled, graph, sweeps, generator=gen)))
    assert z_wrong.max() > z_max, (z_wrong.max().item(), z_max)
    with pytest.raises(ValueError, match="bias has shape"):
        thrml_gibbs_sweeps(init, J, bias[:5], coupling, condition, graph, sweeps, generator=gen)


def test_thrml_backend_needs_the_extra(tmp_path):
    """Without thrml (its import blocked in a subprocess, whether or not it is installed here) the backend raises an
    ImportError naming the extra."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["thrml"] = None  # `import thrml` now raises ImportError
        import torch
        from hf_models.dtm.gibbs import build_lattice_graph, thrml_gibbs_sweeps

        graph = build_lattice_graph(1, 3, window=1, block_size=12, width=4)
        J, h = torch.zeros(graph.num_edges), torch.zeros(graph.num_sites)
        try:
            thrml_gibbs_sweeps(torch.ones(2, 12), J, h, torch.ones(12), torch.ones(2, 12), graph, 1)
        except ImportError as error:
            print("IMPORT_ERROR:", error)
        else:
            print("NO_ERROR")
        """
    )
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "IMPORT_ERROR:" in result.stdout, result.stdout
    assert "pip install latentheat[thrml]" in result.stdout, result.stdout
    assert "backend='torch'" in result.stdout, result.stdout


# ---------------------------------------------------------------------------------------------------------------------
# graph and colouring
# ---------------------------------------------------------------------------------------------------------------------


def assert_proper(graph):
    colors = graph.colors
    assert not bool((colors[graph.edges[:, 0]] == colors[graph.edges[:, 1]]).any())
    assert sorted(torch.cat(graph.color_sites).tolist()) == list(range(graph.num_sites))


def test_coloring_nearest_neighbour_and_8_neighbour_lattices():
    four = build_lattice_graph(1, 6, window=0, block_size=6, skip_connections=[[0, 1], [1, 0]])
    assert four.num_edges == 2 * 6 * 5 and four.num_colors == 2  # checkerboard
    assert_proper(four)
    eight = build_lattice_graph(1, 6, window=1, block_size=6)
    assert eight.num_edges == 2 * 6 * 5 + 2 * 5 * 5 and eight.num_colors == 4
    assert_proper(eight)


def test_graph_blocks_skips_channels_and_latents():
    graph = build_lattice_graph(3, 8, window=2, block_size=4, skip_connections=4, latents_per_block=2)
    assert_proper(graph)
    assert graph.num_sites == 3 * 64 + 2 * 4 and graph.num_visible == 3 * 64
    assert graph.color_sites[0].min() >= graph.num_visible  # latents form the first colour
    edges = graph.edges
    assert len({tuple(sorted(e)) for e in edges.tolist()}) == edges.shape[0]  # no duplicate edge
    pixel = lambda s: ((s % 64) // 8, s % 8)  # noqa: E731
    for i, j in edges.tolist():
        if j >= graph.num_visible:  # latent edge: visible i in the latent's block
            block = (j - graph.num_visible) // 2
            (y, x) = pixel(i)
            assert (y // 4) * 2 + x // 4 == block
            continue
        (y1, x1), (y2, x2) = pixel(i), pixel(j)
        d = (y2 - y1, x2 - x1)
        if max(abs(d[0]), abs(d[1])) <= 2:  # window edge: never crosses a block boundary
            assert (y1 // 4, x1 // 4) == (y2 // 4, x2 // 4)
        else:
            assert d in [(0, 4), (4, 0), (4, 4), (4, -4)]
    assert skip_offsets(6, 4) == [(0, 4), (4, 0), (4, 4), (4, -4), (0, 8), (8, 0)]


# ---------------------------------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------------------------------


class DTMModelTester:
    batch_size = 8

    def get_config(self, **overrides):
        kwargs = dict(
            image_size=4,
            num_channels=1,
            block_size=2,
            window=1,
            skip_connections=2,
            num_latent_spins=0,
            num_train_timesteps=3,
            sweeps_per_step=2,
            num_fantasy_chains=6,
            pcd_k=2,
        )
        kwargs.update(overrides)
        return DTMConfig(**kwargs)

    def get_model(self, seed=0, randomize=True, **overrides):
        torch.manual_seed(seed)
        model = DTMModel(self.get_config(**overrides))
        if randomize:  # give biases and x_t terms non-zero values so the tests see them
            with torch.no_grad():
                model.couplings.normal_(0, 0.5)
                model.biases.normal_(0, 0.5)
                model.xt_couplings.normal_(0, 0.5)
        return model

    def get_spins(self, shape, seed=0):
        gen = torch.Generator().manual_seed(seed)
        return torch.randint(0, 2, shape, generator=gen).float() * 2 - 1


tester = DTMModelTester()


def expected_num_edges(config):
    """Edges by formula: window pairs inside each block, channel pairs per pixel, skip pairs, latent-visible pairs."""
    C, S, b, r = config.num_channels, config.image_size, config.block_size, config.window
    offsets = {
        (dy, dx) if (dy, dx) > (0, 0) else (-dy, -dx)
        for dy in range(-r, r + 1)
        for dx in range(-r, r + 1)
        if (dy, dx) != (0, 0)
    }
    window = sum((b - abs(dy)) * (b - abs(dx)) for dy, dx in offsets) * C * C * config.num_blocks
    channel = C * (C - 1) // 2 * S * S
    skips = config.skip_connections
    if isinstance(skips, int):
        skips = [[m * b * u, m * b * v] for m in range(1, S) for u, v in ((0, 1), (1, 0), (1, 1), (1, -1))][:skips]
    skip = sum((S - abs(dy)) * (S - abs(dx)) for dy, dx in skips) * C * C
    latent = config.num_latent_sites * C * b * b
    return window + channel + skip + latent


def expected_num_parameters(config):
    N_v, L = config.num_visible_spins, config.num_latent_sites
    return config.num_train_timesteps * (expected_num_edges(config) + (N_v + L) + N_v)


def test_forward_shapes_and_output():
    model = tester.get_model()
    x = (torch.rand(8, 1, 4, 4, generator=torch.Generator().manual_seed(0)) > 0.5).float()
    out = model(x, generator=torch.Generator().manual_seed(1))
    assert isinstance(out, DTMOutput) and list(out.keys())[0] == "loss"
    assert out.positive_free_energy.shape == (8,) and out.negative_free_energy.shape == (6,)
    assert out.noisy_sample.shape == out.target_sample.shape == (8, 1, 4, 4)
    assert out.timesteps.shape == (8,) and int(out.timesteps.max()) < 3
    assert torch.isfinite(out.loss) and torch.allclose(out.loss, out.cd_loss + out.dsm_loss)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    as_tuple = model(x, generator=torch.Generator().manual_seed(1), return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 8


def test_per_batch_timesteps_share_one_step():
    model = tester.get_model(timestep_sampling="per_batch")
    out = model(tester.get_spins((8, 1, 4, 4)), generator=torch.Generator().manual_seed(0))
    assert out.timesteps.shape == (8,) and len(set(out.timesteps.tolist())) == 1 and torch.isfinite(out.loss)
    out.loss.backward()
    assert torch.isfinite(model.couplings.grad).all()
    t = int(out.timesteps[0])  # only that step's parameters get gradients
    assert model.couplings.grad[t].abs().sum() > 0
    assert all(model.couplings.grad[s].abs().sum() == 0 for s in range(3) if s != t)


def test_forward_is_deterministic_with_a_generator():
    x = tester.get_spins((8, 1, 4, 4))
    a, b = tester.get_model(), tester.get_model()
    out_a = a(x, generator=torch.Generator().manual_seed(3))
    out_b = b(x, generator=torch.Generator().manual_seed(3))
    for key in out_a.keys():
        assert torch.equal(out_a[key], out_b[key]), key
    assert torch.equal(a.fantasy_chains, b.fantasy_chains)
    out_c = b(x, generator=torch.Generator().manual_seed(4))
    assert not torch.equal(out_a.noisy_sample, out_c.noisy_sample)


def test_forward_process_in_training_matches_closed_form():
    """x_prev and x_t drawn inside forward flip x_0 at the cumulative / per-step closed-form rates (within 4 sigma)."""
    model = tester.get_model(num_train_timesteps=3, image_size=16, block_size=4, num_fantasy_chains=2, pcd_k=1)
    x0 = torch.ones(64, 1, 16, 16)
    n = x0.numel()
    for t in range(3):
        out = model(x0, timesteps=torch.full((64,), t), generator=torch.Generator().manual_seed(t))
        step = model._step_probs[t].item()
        prev = model._cumulative_probs[t - 1].item() if t > 0 else 0.0
        for observed, p in (
            ((out.noisy_sample != x0).float().mean().item(), model._cumulative_probs[t].item()),
            ((out.target_sample != x0).float().mean().item(), prev),
            ((out.noisy_sample != out.target_sample).float().mean().item(), step),
        ):
            assert abs(observed - p) <= 4 * math.sqrt(p * (1 - p) / n) + 1e-12, (t, observed, p)


@pytest.mark.parametrize("latents", [0, 1])
def test_local_fields_energy_and_free_energy_are_consistent(latents):
    model = tester.get_model(num_latent_spins=latents).double()
    x_prev, x_t = tester.get_spins((5, 1, 4, 4), 1).double(), tester.get_spins((5, 1, 4, 4), 2).double()
    t = torch.tensor([0, 1, 2, 1, 0])
    L = model.config.num_latent_sites
    h = tester.get_spins((5, L), 3).double() if L else None
    fields = model.local_fields(x_prev, x_t, t, latents=h)
    energy = model.energy(x_prev, x_t, t, latents=h) if L else model.energy(x_prev, x_t, t)
    for i in range(16):  # f_i = (E(s_i = -1) - E(s_i = +1)) / 2
        up, down = x_prev.clone().view(5, -1), x_prev.clone().view(5, -1)
        up[:, i], down[:, i] = 1.0, -1.0
        e_up = model.energy(up.view_as(x_prev), x_t, t, latents=h)
        e_down = model.energy(down.view_as(x_prev), x_t, t, latents=h)
        assert torch.allclose(fields.view(5, -1)[:, i], (e_down - e_up) / 2, atol=1e-9)
    assert energy.shape == (5,)
    if L:
        # free energy = -log sum_h exp(-E(v, h)), by enumeration of the 2**L latent states
        joint = torch.stack([model.energy(x_prev, x_t, t, latents=s.expand(5, -1)) for s in all_states(L).double()])
        assert torch.allclose(model.energy(x_prev, x_t, t), -torch.logsumexp(-joint, dim=0), atol=1e-9)
    # the pseudo-likelihood gap is F(flip_i v) - F(v)
    couplings, ext = model._step_tensors(x_t, t)
    graph = model.graph()
    v_state = model._state(x_prev, None)
    gap = model._flip_free_energy_gap(v_state, couplings, ext, graph)
    base = model.energy(x_prev, x_t, t)
    for i in (0, 5, 15):
        flipped = x_prev.clone().view(5, -1)
        flipped[:, i] *= -1
        assert torch.allclose(gap[:, i], model.energy(flipped.view_as(x_prev), x_t, t) - base, atol=1e-9)


def test_untrained_model_is_the_uniform_prior_posterior():
    """Couplings, biases and learned terms at 0: p(x_{t-1,i} = x_{t,i}) = 1 - p_t, from Gamma_t alone."""
    model = tester.get_model(randomize=False, initializer_range=0.0)
    x_t = tester.get_spins((2, 1, 4, 4))
    fields = model.local_fields(torch.ones_like(x_t), x_t, 1)
    stay = torch.sigmoid(2 * fields * x_t)
    assert torch.allclose(stay, torch.full_like(stay, 1 - model._step_probs[1].item()), atol=1e-6)


def bars_and_stripes(size=3):
    """All `size x size` images made of full rows or full columns (2 * 2**size - 2 patterns), as spins."""
    patterns = set()
    for bits in range(2**size):
        row = torch.tensor([(bits >> i) & 1 for i in range(size)]).float()
        patterns.add(tuple(row.view(size, 1).expand(size, size).flatten().tolist()))
        patterns.add(tuple(row.view(1, size).expand(size, size).flatten().tolist()))
    return torch.tensor(sorted(patterns)).view(-1, 1, size, size) * 2 - 1


def exact_conditional_nll(model, x_prev, x_t, t):
    """Mean `-log p_t(x_prev | x_t)` by enumerating all visible states (tiny models only)."""
    n = model.num_visible
    states = all_states(n).view(-1, *model.config.image_shape)
    with torch.no_grad():
        energy = model.energy(x_prev, x_t, t)
        all_energy = torch.stack(
            [model.energy(states, x_t[b : b + 1].expand_as(states), int(t[b])) for b in range(x_t.shape[0])]
        )  # (B, 2**n)
    return (energy + torch.logsumexp(-all_energy, dim=1)).mean().item()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(dsm_weight=0.0),  # PCD alone
        dict(dsm_weight=0.0, persistent_chains=False),  # CD alone
        dict(dsm_weight=1.0, dsm_loss="pseudo_likelihood"),
        dict(dsm_weight=1.0, dsm_loss="ratio_matching", num_latent_spins=1),
        dict(dsm_weight=0.5, timestep_sampling="per_batch", num_latent_spins=1),  # shared-coupling fast path
        dict(dsm_weight=1.0, field_network_channels=8, field_network_dilations=[1]),  # conditional field network
    ],
)
def test_training_lowers_the_exact_conditional_nll(overrides):
    """Bars and stripes (3x3): a few Adam steps on the loss lower the exact -log p_t(x_{t-1} | x_t) on held pairs."""
    config = dict(
        image_size=3, block_size=3, window=1, skip_connections=0, num_train_timesteps=2, bitflip_rate=3.0,
        num_fantasy_chains=32, pcd_k=3, initializer_range=0.01,
    )
    config.update(overrides)
    torch.manual_seed(0)
    model = DTMModel(tester.get_config(**config))
    data = bars_and_stripes(3)
    gen = torch.Generator().manual_seed(0)
    eval_x0 = data[torch.randint(0, len(data), (48,), generator=gen)]
    eval_t = torch.randint(0, 2, (48,), generator=gen)
    eval_out = model(eval_x0, timesteps=eval_t, generator=gen)  # one exact joint draw of (x_prev, x_t)
    pairs = (eval_out.target_sample, eval_out.noisy_sample, eval_t)
    before = exact_conditional_nll(model, *pairs)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for _ in range(40):
        batch = data[torch.randint(0, len(data), (32,), generator=gen)]
        out = model(batch, generator=gen)
        assert torch.isfinite(out.loss)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    after = exact_conditional_nll(model, *pairs)
    assert after < before - 0.3, (before, after)


def test_fantasy_chains_persist_in_training_only():
    model = tester.get_model()
    x = tester.get_spins((8, 1, 4, 4))
    before = model.fantasy_chains.clone()
    model.eval()
    model(x, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.fantasy_chains, before)
    model.train()
    model(x, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(model.fantasy_chains, before)
    assert set(model.fantasy_chains.unique().tolist()) == {-1.0, 1.0}


def test_save_and_load_pretrained(tmp_path):
    model = tester.get_model(num_latent_spins=1).train()
    x = tester.get_spins((8, 1, 4, 4))
    model(x, generator=torch.Generator().manual_seed(0))  # moves the fantasy chains: they must be saved
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    state = load_file(tmp_path / "model.safetensors")
    assert set(state) == {"couplings", "biases", "xt_couplings", "fantasy_chains"}
    loaded = DTMModel.from_pretrained(tmp_path)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config.to_dict()) == strip(model.config.to_dict())
    for name, value in model.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[name]), name
    x_t = tester.get_spins((8, 1, 4, 4), 1)
    assert torch.equal(model.energy(x, x_t, 2), loaded.energy(x, x_t, 2))
    a = model(x, generator=torch.Generator().manual_seed(1))
    b = loaded(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a.loss, b.loss)


def test_gradient_checkpointing_is_not_supported():
    model = tester.get_model()
    assert not model.supports_gradient_checkpointing  # no activations: one sparse bilinear form per step
    with pytest.raises(ValueError):
        model.activation_checkpointing_enable()


@pytest.mark.parametrize(
    "method, args, match",
    [
        ("energy", (torch.ones(2, 1, 4, 3), torch.ones(2, 1, 4, 4), 0), "x_prev"),
        ("energy", (torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4), 3), "timestep"),
        ("energy", (torch.ones(2, 1, 4, 4), torch.ones(2, 1, 4, 4), torch.tensor([0, 1, 2])), "timestep"),
        ("step_parameters", (torch.ones(2, 2, 4, 4), 0), "x_t"),
    ],
)
def test_input_validation(method, args, match):
    with pytest.raises(ValueError, match=match):
        getattr(tester.get_model(), method)(*args)
    with pytest.raises(ValueError, match="latents"):
        tester.get_model(num_latent_spins=1).local_fields(torch.ones(1, 1, 4, 4), torch.ones(1, 1, 4, 4), 0)


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 6),  # not divisible by block_size=4
        ("num_channels", 0),
        ("num_train_timesteps", 0),
        ("block_size", 0),
        ("window", 4),  # >= block_size
        ("window", -1),
        ("skip_connections", [[0, 1]]),  # inside the window
        ("skip_connections", [[0, 8]]),  # outside the image
        ("skip_connections", [[0, 4], [0, -4]]),  # duplicate
        ("skip_connections", 9),  # reaches d = 12 >= image_size
        ("skip_connections", -1),
        ("num_latent_spins", -1),
        ("sweeps_per_step", 0),
        ("num_fantasy_chains", 0),
        ("pcd_k", 0),
        ("time_grid", "cosine"),
        ("bitflip_rate", 0.0),
        ("log_grid_min_time", 1.0),
        ("dsm_weight", -1.0),
        ("dsm_loss", "mse"),
        ("timestep_sampling", "per_epoch"),
        ("field_network_channels", -1),
        ("field_network_channels", 1.5),
        ("field_network_dilations", [1, 0]),
        ("field_network_dilations", []),
        ("field_network_x0_weight", -0.1),
    ],
)
def test_config_validation(field, value):
    kwargs = dict(image_size=8, block_size=4, window=1, skip_connections=0)
    kwargs[field] = value
    with pytest.raises(ValueError, match=field):
        DTMConfig(**kwargs)


def test_config_round_trip_and_auto(tmp_path):
    from transformers import AutoConfig, AutoModel

    config = tester.get_config(skip_connections=[(0, 2), (2, -2)], num_latent_spins=1)
    assert config.hidden_size == 16 + 4 and config.image_shape == (1, 4, 4)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DTMConfig) and loaded.skip_connections == [[0, 2], [2, -2]]
    model = AutoModel.from_config(loaded)
    assert isinstance(model, DTMModel) and model.num_parameters() == expected_num_parameters(loaded)


def test_seed_config_on_meta_device():
    config = DTMConfig()
    assert (config.image_size, config.num_channels, config.block_size) == (64, 3, 8)
    assert (config.num_train_timesteps, config.sweeps_per_step, config.num_fantasy_chains, config.pcd_k) == (
        100, 6, 64, 5,
    )
    with torch.device("meta"):
        model = DTMModel(config)
    assert model.num_parameters() == expected_num_parameters(config) == 47_232_000
    assert model.couplings.shape == (100, expected_num_edges(config))
    assert model.fantasy_chains.shape == (64, 3, 64, 64)
    with torch.device("meta"):
        with_latents = DTMModel(DTMConfig(num_latent_spins=4, skip_connections=[[0, 8], [16, -8]]))
    assert with_latents.num_parameters() == expected_num_parameters(with_latents.config)
    for overrides in (dict(), dict(num_latent_spins=2, num_channels=2), dict(skip_connections=[[0, 2], [3, 3]])):
        tiny = tester.get_model(**overrides)
        assert tiny.num_parameters() == expected_num_parameters(tiny.config)
        assert tiny.num_edges == tiny.graph().num_edges


REMOTE_SCRIPT = BLOCK_LATENTHEAT + textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True)
    assert type(model).__name__ == "DTMModel" and "hf_models" not in type(model).__module__
    x = load_file(sys.argv[2])["x"]
    save_file({"energy": model.energy(x, x, 1).detach()}, sys.argv[3])
    """
)


def test_remote_code_loads_without_latentheat(tmp_path):
    model = tester.get_model(num_latent_spins=1)
    model.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path / "repo")
    files = set(os.listdir(tmp_path / "repo"))
    assert {"configuration_dtm.py", "modeling_dtm.py", "gibbs.py"} <= files
    auto_map = json.loads((tmp_path / "repo" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_dtm.DTMConfig", "AutoModel": "modeling_dtm.DTMModel"}
    x = tester.get_spins((3, 1, 4, 4))
    out = run_without_latentheat(tmp_path, REMOTE_SCRIPT, {"x": x})
    assert torch.allclose(out["energy"], model.energy(x, x, 1).detach())


@pytest.mark.parametrize("timestep_sampling", ["per_sample", "per_batch"])
def test_autocast_and_bf16_weights(timestep_sampling):
    """Mixed precision: the loss stays finite; Gibbs sweeps run in fp32 (CSR matmul has no bf16 CPU kernel)."""
    model = tester.get_model(num_latent_spins=1, timestep_sampling=timestep_sampling)
    x = tester.get_spins((8, 1, 4, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, generator=torch.Generator().manual_seed(0))
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(model.couplings.grad).all()
    bf16 = model.to(torch.bfloat16)
    out = bf16(x, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss.float()) and bf16.fantasy_chains.dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------------------------------
# conditional field network
# ---------------------------------------------------------------------------------------------------------------------


def field_model(seed=0, randomize_network=True, **overrides):
    """The tester's tiny model with a field network; its zero-initialised output conv randomised on request."""
    model = tester.get_model(seed=seed, field_network_channels=8, field_network_dilations=[1, 2], **overrides)
    if randomize_network:
        with torch.no_grad():
            model.field_network.conv_out.weight.normal_(0, 0.5)
            model.field_network.conv_out.bias.normal_(0, 0.5)
    return model


def test_untrained_field_network_leaves_the_ising_fields():
    """The output conv starts at zero: the model's fields equal those of the same model without a network."""
    with_net = field_model(randomize_network=False)
    plain = tester.get_model()
    plain.load_state_dict({k: v for k, v in with_net.state_dict().items() if not k.startswith("field_network.")})
    x_t, x_prev = tester.get_spins((4, 1, 4, 4), seed=1), tester.get_spins((4, 1, 4, 4), seed=2)
    for t in range(3):
        assert torch.allclose(with_net.local_fields(x_prev, x_t, t), plain.local_fields(x_prev, x_t, t), atol=1e-6)
    assert torch.equal(with_net.predict_x0(x_t, 1), torch.full_like(x_t, 0.5))


@pytest.mark.parametrize("t", [0, 1, 2])
def test_field_network_gives_the_bit_flip_posterior_of_its_x0_prediction(t):
    """The network's field on `x^{(t-1)}` is the exact log-odds (halved) of `x^{(t-1)}_i = +1` when `x_0` is drawn
    from the predicted `Bernoulli(pi)` and flipped with the cumulative probability `c` of level `t - 1`, computed
    here by summing over `x_0` in {-1, +1}; at `t = 0` (`c = 0`) it is `logit(pi) / 2`."""
    model = field_model(seed=3, bitflip_rate=1.0)  # a slow process, so level t - 1 still remembers x_0
    x_t = tester.get_spins((5, 1, 4, 4), seed=4)
    plain = tester.get_model(randomize=False, bitflip_rate=1.0)  # same couplings, biases and x_t terms, no network
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("field_network.")})
    x_prev = tester.get_spins((5, 1, 4, 4), seed=5)
    network_field = model.local_fields(x_prev, x_t, t) - plain.local_fields(x_prev, x_t, t)
    pi = model.predict_x0(x_t, t).double()
    c = 0.0 if t == 0 else model._cumulative_probs[t - 1].item()
    p_up = pi * (1 - c) + (1 - pi) * c  # sum over x_0 of P(x_0) q(x_{t-1} = +1 | x_0)
    expected = 0.5 * torch.log(p_up / (1 - p_up))
    assert torch.allclose(network_field.double(), expected, atol=1e-5)
    if t == 0:
        assert torch.allclose(network_field.double(), 0.5 * torch.logit(pi), atol=1e-5)
    assert network_field.abs().max() > 0.05  # the randomised network moves the fields


def test_field_network_step_parameters_split_and_per_sample_bias():
    """With a network the thrml split has per-sample biases `(B, N)` and still sums to the fields."""
    model = field_model(num_latent_spins=1)
    x_t = tester.get_spins((6, 1, 4, 4), seed=6)
    params = model.step_parameters(x_t, 1)
    assert params.bias.shape == (6, model.num_sites)
    pad = torch.zeros(6, model.num_sites - model.num_visible)
    rebuilt = params.bias + torch.cat([params.condition_coupling * params.condition, pad], dim=1)
    assert torch.allclose(rebuilt, params.fields, atol=1e-6)
    assert not torch.allclose(params.bias[0], params.bias[1])  # the network sees each sample's x_t


def test_field_network_loss_trains_the_x0_prediction():
    """The loss has the x_0 cross-entropy (weighted) and a few Adam steps on bars and stripes lower it on held data."""
    torch.manual_seed(0)
    model = DTMModel(tester.get_config(
        image_size=3, block_size=3, window=1, skip_connections=0, num_train_timesteps=2, bitflip_rate=1.0,
        field_network_channels=8, field_network_dilations=[1], field_network_x0_weight=2.0,
    ))
    data = bars_and_stripes(3)
    gen = torch.Generator().manual_seed(0)
    held = data[torch.randint(0, len(data), (64,), generator=gen)]
    t_held = torch.zeros(64, dtype=torch.long)  # 20 % of the bits flipped: x_0 is recoverable from the pattern

    def held_x0_loss():
        with torch.no_grad():
            return model(held, timesteps=t_held, generator=torch.Generator().manual_seed(1)).x0_loss.item()

    out = model(held, timesteps=t_held, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(out.loss, out.cd_loss + out.dsm_loss + 2.0 * out.x0_loss)
    before = held_x0_loss()
    assert abs(before - math.log(2)) < 1e-6  # untrained: P(x_0 = +1) = 1/2 everywhere
    optimizer = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(100):
        optimizer.zero_grad()
        model(data[torch.randint(0, len(data), (32,), generator=gen)], generator=gen).loss.backward()
        optimizer.step()
    assert held_x0_loss() < before - 0.1, (before, held_x0_loss())
    assert tester.get_model()(tester.get_spins((8, 1, 4, 4))).x0_loss is None  # no network, no x_0 term


def test_field_network_save_load_and_predict_x0_errors(tmp_path):
    model = field_model()
    model.save_pretrained(tmp_path)
    loaded = DTMModel.from_pretrained(tmp_path)
    assert loaded.config.field_network_channels == 8 and loaded.config.field_network_dilations == [1, 2]
    x_t = tester.get_spins((3, 1, 4, 4), seed=7)
    assert torch.equal(loaded.predict_x0(x_t, 2), model.predict_x0(x_t, 2))
    assert torch.equal(loaded.step_parameters(x_t, 2).fields, model.step_parameters(x_t, 2).fields)
    with pytest.raises(ValueError, match="field network"):
        tester.get_model().predict_x0(x_t, 1)
