"""Kolmogorov-flow solver speed: IF-RK4 steps per second at the default 64x64 grid, float64 against float32.

Both precisions integrate the same initial conditions; the float32 run is checked against the float64 one after the
timed steps (relative difference printed). The ratio is float32 steps/s over float64 steps/s, measured in the same
run. The batch is timed as one tensor and, as `simulate` does, in sub-batches of `--sub_batch` trajectories (on CPU
float64 batches above ~4 64² fields x 4 FFT inputs fall out of cache and run several times slower per trajectory).
Writes benchmarks/results/solver.json.

    python benchmarks/solver.py [--batch 16] [--sub_batch 4] [--steps 100] [--repeats 3] [--threads N]
"""

import argparse
import json

import torch

from common import best_of, machine, write_results
from hf_models.data.kolmogorov import KolmogorovConfig, KolmogorovSolver


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--grid_size", type=int, default=64)
    parser.add_argument("--sub_batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    rates, sub_rates, states = {}, {}, {}
    start_omega = KolmogorovSolver(KolmogorovConfig(grid_size=args.grid_size)).initial_condition(args.batch, seed=0)

    for dtype in ("float64", "float32"):
        solver = KolmogorovSolver(KolmogorovConfig(grid_size=args.grid_size, dtype=dtype))
        start_hat = solver.to_spectral(start_omega)
        chunks = start_hat.split(args.sub_batch)

        def whole():
            states[dtype] = solver.advance(start_hat, args.steps)

        def in_chunks():
            return [solver.advance(c, args.steps) for c in chunks]

        rates[dtype] = args.steps / best_of(whole, args.repeats)
        sub_rates[dtype] = args.steps / best_of(in_chunks, args.repeats)
    w64 = torch.fft.irfft2(states["float64"], s=(args.grid_size,) * 2)
    w32 = torch.fft.irfft2(states["float32"], s=(args.grid_size,) * 2).double()
    rel_diff = ((w32 - w64).norm() / w64.norm()).item()
    result = {
        "benchmark": "kolmogorov_solver",
        "device": "cpu",
        **machine(),  # other work on the cores (the load average) slows both runs
        "grid_size": args.grid_size,
        "batch": args.batch,
        "steps": args.steps,
        "stepper": "IF-RK4 (4 nonlinear evaluations, 5 FFTs each, per step)",
        "steps_per_s_float64": round(rates["float64"], 2),
        "steps_per_s_float32": round(rates["float32"], 2),
        "trajectory_steps_per_s_float64": round(rates["float64"] * args.batch, 1),
        "ratio_float32_over_float64": round(rates["float32"] / rates["float64"], 3),
        "sub_batch": args.sub_batch,
        "sub_batched_steps_per_s_float64": round(sub_rates["float64"], 2),
        "sub_batched_steps_per_s_float32": round(sub_rates["float32"], 2),
        "sub_batched_ratio_float32_over_float64": round(sub_rates["float32"] / sub_rates["float64"], 3),
        "sub_batched_speedup_float64": round(sub_rates["float64"] / rates["float64"], 3),
        "relative_l2_difference_after_steps": rel_diff,
    }
    print(json.dumps(result, indent=2))
    write_results("solver", result)


if __name__ == "__main__":
    main()
