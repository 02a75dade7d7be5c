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
import os
import platform
import time
from pathlib import Path

import torch

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

    def best_time(fn):
        fn()  # warm-up
        best = float("inf")
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        return best

    for dtype in ("float64", "float32"):
        solver = KolmogorovSolver(KolmogorovConfig(grid_size=args.grid_size, dtype=dtype))
        start_hat = solver.to_spectral(start_omega)
        chunks = start_hat.split(args.sub_batch)

        def whole():
            states[dtype] = solver.advance(start_hat, args.steps)

        def in_chunks():
            return [solver.advance(c, args.steps) for c in chunks]

        rates[dtype] = args.steps / best_time(whole)
        sub_rates[dtype] = args.steps / best_time(in_chunks)
    w64 = torch.fft.irfft2(states["float64"], s=(args.grid_size,) * 2)
    w32 = torch.fft.irfft2(states["float32"], s=(args.grid_size,) * 2).double()
    rel_diff = ((w32 - w64).norm() / w64.norm()).item()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None  # other work on the cores slows both runs
    result = {
        "benchmark": "kolmogorov_solver",
        "device": "cpu",
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_1min": load,
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
        "torch": torch.__version__,
    }
    print(json.dumps(result, indent=2))
    out = Path(__file__).resolve().parent / "results" / "solver.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
