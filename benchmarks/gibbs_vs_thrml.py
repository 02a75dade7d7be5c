"""DTM Gibbs sampling: the torch chromatic block-Gibbs backend (`gibbs_sweeps`) against the thrml (JAX) backend in
spin updates per second (chains x spins x sweeps / seconds), on the same graphs in the same run:

* `torus28_deg8`: a 28 x 28 torus, 8-neighbour couplings with periodic wrap (degree 8, 4 colours);
* `dtm_default`: the block-sparse graph of the default seed config (`DTMConfig()`: 3 x 64 x 64, 8 x 8 blocks,
  5 x 5 window, 4 skips).

Both run 256 chains with shared couplings, random fields split as `bias + coupling * x_t` (thrml clamps `x_t`).
thrml is timed on one jitted, vmapped program (built like `thrml_gibbs_sweeps`), compiled by a warm-up call and
excluded from the timing, with `block_until_ready`. Also estimates the arithmetic limit of the torch backend: flops per
spin update (`2 * degree` for the local field, plus bias, doubling, sigmoid and the comparison with the uniform),
the fraction of a measured matmul peak (a big `torch.mm`, same threads, same run) reached, and the share of the time
spent drawing the uniforms (`torch.rand` of the same sizes, timed alone). Writes
benchmarks/results/gibbs_vs_thrml.json.

    python benchmarks/gibbs_vs_thrml.py [--threads 2] [--chains 256] [--sweeps 20] [--repeats 3]
"""

import argparse
import os
import platform
import sys
import time
from pathlib import Path

from common import best_of, write_results


# flops per spin update besides the 2 * degree multiply-adds of the local field: + bias, * 2, sigmoid (neg, exp, add,
# reciprocal: 4), comparison with the uniform and the +-1 select (2)
FLOPS_PER_UPDATE_EXTRA = 1 + 1 + 4 + 2


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads and XLA intra-op threads")
    parser.add_argument("--chains", type=int, default=256)
    parser.add_argument("--sweeps", type=int, default=20, help="sweeps per timed call")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per backend; the best is kept")
    parser.add_argument("--graphs", default="torus28_deg8,dtm_default", help="comma-separated subset")
    parser.add_argument("--skip_thrml", action="store_true", help="torch backend only")
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "gibbs_vs_thrml.json"))
    return parser.parse_args()


def torus_graph(size=28):
    """`size x size` torus with the 8-neighbour couplings (offsets (0,1), (1,-1), (1,0), (1,1), wrapped)."""
    import torch

    from hf_models.dtm.gibbs import IsingGraph, greedy_coloring

    ys, xs = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    site = ys * size + xs
    offsets = [(0, 1), (1, -1), (1, 0), (1, 1)]
    edges = torch.cat([torch.stack([site, ((ys + dy) % size) * size + (xs + dx) % size], 1) for dy, dx in offsets])
    colors = greedy_coloring(size * size, edges)  # raster order: 4 colours, optimal (a 4-clique per 2x2 square)
    return IsingGraph.from_edges(size * size, edges, colors)


def dtm_graph():
    from hf_models.dtm import DTMConfig, DTMModel

    return DTMModel(DTMConfig()).graph()


def thrml_sampler(graph, couplings, bias, condition_coupling, num_sweeps):
    """The jitted, vmapped thrml program of `thrml_gibbs_sweeps` (same nodes, edges, blocks and schedule), built once:
    `run(keys (B,), init [per colour (B, n_c) bool], clamp [(B, N_v) bool]) -> (B, N) bool`."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import thrml
    from thrml.models import IsingEBM, IsingSamplingProgram

    N, N_v = graph.num_sites, graph.num_visible
    nodes = [thrml.SpinNode() for _ in range(N)]
    condition_nodes = [thrml.SpinNode() for _ in range(N_v)]
    edges = [(nodes[i], nodes[j]) for i, j in graph.edges.tolist()]
    edges += [(nodes[i], condition_nodes[i]) for i in range(N_v)]
    weights = np.concatenate([couplings.numpy(), condition_coupling.numpy()])
    ebm = IsingEBM(nodes, edges, jnp.asarray(bias.numpy()), jnp.asarray(weights), jnp.array(1.0))
    free_blocks = [thrml.Block([nodes[i] for i in sites.tolist()]) for sites in graph.color_sites]
    program = IsingSamplingProgram(ebm, free_blocks, [thrml.Block(condition_nodes)])
    schedule = thrml.SamplingSchedule(n_warmup=num_sweeps, n_samples=1, steps_per_sample=1)
    out_block = thrml.Block(nodes)

    def run(key, init_state, clamp_state):
        return thrml.sample_states(key, program, schedule, init_state, clamp_state, [out_block])[0][-1]

    return jax.jit(jax.vmap(run))


def matmul_peak_flops(torch, repeats, n=2048):
    a, b = torch.randn(n, n), torch.randn(n, n)
    return 2 * n**3 / best_of(lambda: torch.mm(a, b), repeats)


def bench_graph(name, graph, args, torch):
    from hf_models.dtm.gibbs import gibbs_sweeps

    B, N, N_v, S = args.chains, graph.num_sites, graph.num_visible, args.sweeps
    gen = torch.Generator().manual_seed(0)
    J = torch.randn(graph.num_edges, generator=gen) * 0.1
    bias = torch.randn(N, generator=gen) * 0.1
    condition_coupling = torch.randn(N_v, generator=gen) * 0.5
    condition = torch.randint(0, 2, (B, N_v), generator=gen).float() * 2 - 1
    init = torch.randint(0, 2, (B, N), generator=gen).float() * 2 - 1
    fields = bias.expand(B, -1).clone()
    fields[:, :N_v] += condition_coupling * condition
    updates = B * N * S

    # torch: the backend as the scheduler calls it (its per-call CSR setup included)
    gibbs_sweeps(init, J, fields, graph, 1, generator=gen)  # warm-up
    t_torch = best_of(lambda: gibbs_sweeps(init, J, fields, graph, S, generator=gen), args.repeats, warmup=False)
    # the uniforms alone: one (n_c, B) draw per colour per sweep, as gibbs_sweeps draws them
    sizes = [len(sites) for sites in graph.color_sites]

    def draws():
        for _ in range(S):
            for n_c in sizes:
                torch.rand((n_c, B), generator=gen)

    t_rand = best_of(draws, args.repeats)
    degree = 2 * graph.num_edges / N
    row = {
        "name": name,
        "num_spins": N,
        "num_edges": graph.num_edges,
        "mean_degree": degree,
        "num_colors": graph.num_colors,
        "chains": B,
        "sweeps": S,
        "seconds_torch": t_torch,
        "updates_per_s_torch": updates / t_torch,
        "flops_per_update": 2 * degree + FLOPS_PER_UPDATE_EXTRA,
        "rng_seconds": t_rand,
        "rng_fraction_torch": t_rand / t_torch,
    }
    if not args.skip_thrml:
        import jax

        start = time.perf_counter()
        run = thrml_sampler(graph, J, bias, condition_coupling, S)
        build = time.perf_counter() - start
        spins = (init > 0).numpy()
        init_blocks = [jax.numpy.asarray(spins[:, sites.numpy()]) for sites in graph.color_sites]
        clamp = [jax.numpy.asarray((condition > 0).numpy())]
        keys = jax.random.split(jax.random.key(0), B)
        start = time.perf_counter()
        out = run(keys, init_blocks, clamp).block_until_ready()  # compiles
        compile_s = time.perf_counter() - start
        assert out.shape == (B, N), out.shape
        t_thrml = best_of(lambda: run(keys, init_blocks, clamp).block_until_ready(), args.repeats, warmup=False)
        row.update(
            seconds_thrml=t_thrml,
            updates_per_s_thrml=updates / t_thrml,
            ratio=(updates / t_torch) / (updates / t_thrml),
            thrml_build_seconds=build,
            thrml_first_call_seconds=compile_s,
        )
    return row


def main():
    args = parse_args()
    # XLA reads its flags when jax is first imported: set them before anything imports jax
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + f" --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads={args.threads}"
    ).strip()
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    builders = {"torus28_deg8": torus_graph, "dtm_default": dtm_graph}
    peak = matmul_peak_flops(torch, args.repeats)
    rows = []
    for name in args.graphs.split(","):
        row = bench_graph(name, builders[name](), args, torch)
        row["torch_fraction_of_matmul_peak"] = row["updates_per_s_torch"] * row["flops_per_update"] / peak
        rows.append(row)
        print(f"{name}: done", flush=True)
    result = {
        "benchmark": "gibbs_vs_thrml",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "xla_flags": os.environ["XLA_FLAGS"],
        "dtype": "float32",
        "matmul_peak_gflops": peak / 1e9,
        "flops_per_update": f"2 * degree + {FLOPS_PER_UPDATE_EXTRA} (bias, x2, sigmoid 4, compare/select 2); RNG apart",
        "graphs": rows,
    }
    write_results("gibbs_vs_thrml", result, args.output)

    print(f"threads {args.threads}, matmul peak {peak / 1e9:.1f} GFLOP/s (torch.mm 2048^2)")
    header = f"{'graph':<14}{'spins':>7}{'edges':>8}{'colors':>7}{'torch Mupd/s':>14}{'thrml Mupd/s':>14}{'ratio':>8}"
    header += f"{'flop/upd':>10}{'% peak':>8}{'% RNG':>7}"
    print(header)
    for r in rows:
        thrml = f"{r['updates_per_s_thrml'] / 1e6:>14.2f}{r['ratio']:>8.2f}" if "ratio" in r else f"{'-':>14}{'-':>8}"
        print(
            f"{r['name']:<14}{r['num_spins']:>7}{r['num_edges']:>8}{r['num_colors']:>7}"
            f"{r['updates_per_s_torch'] / 1e6:>14.2f}{thrml}{r['flops_per_update']:>10.1f}"
            f"{100 * r['torch_fraction_of_matmul_peak']:>8.1f}{100 * r['rng_fraction_torch']:>7.1f}"
        )
    print("ratio = torch updates/s over thrml updates/s (thrml excludes compilation)")


if __name__ == "__main__":
    main()
