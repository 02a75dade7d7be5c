"""Rollout speed of the thermalized emulator: frames per second with and without the thermalizer (and the noise-only
control), the emulator step with a static against a dynamic KV cache, and the Kolmogorov solver it replaces, all
measured in the same run.

    python benchmarks/rollout.py --output-dir outputs/thermalizer_kolmogorov --trajectories 16 --steps 200

The pipeline comes from a finished ``thermalizer_kolmogorov`` run (how often the thermalizer fires, and so its cost,
depends on the trained classifier). The solver peer integrates the same number of trajectories over the same physical
time at its own resolution (``grid_size``), so ``emulator_speedup_over_solver`` is what the learned emulator buys.
Writes ``benchmarks/results/rollout.json`` (``--name`` changes the file name).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import machine, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/thermalizer_kolmogorov", help="a finished thermalizer run")
    parser.add_argument("--trajectories", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200, help="emulator steps per timed rollout")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--name", default="rollout", help="results file benchmarks/results/NAME.json")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_models.data.kolmogorov import KolmogorovSolver
    from hf_models.pipelines import ThermalizedRolloutPipeline
    from trainers.arguments import load_config
    from trainers.tasks.thermalizer import KolmogorovDataArguments

    out = Path(args.output_dir)
    if not (out / "model_index.json").is_file():
        raise SystemExit(f"{out} is not a finished thermalizer run (no model_index.json); train it first:\n"
                         "  python -m trainers.train configs/experiments/thermalizer_kolmogorov.yaml")
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    data_args = KolmogorovDataArguments(**load_config(str(out / "config.yaml")).data)
    test = data_args.load()["test"]
    if len(test) < args.trajectories:
        raise SystemExit(f"--trajectories={args.trajectories} but the run has {len(test)} test trajectories")
    initial = test[: args.trajectories, 0]

    timings = {}
    fire = {}
    for arm, kwargs in (("emulator", {"thermalize": False, "track_levels": False}),
                        ("emulator_with_levels", {"thermalize": False, "track_levels": True}),
                        ("thermalizer", {"thermalize": True}),
                        ("noise_control", {"thermalize": True, "noise_control": True})):
        pipe(initial[:2], num_steps=2, **kwargs)  # warm-up
        start = time.perf_counter()
        result = pipe(initial, num_steps=args.steps, generator=torch.Generator().manual_seed(0), **kwargs)
        timings[arm] = time.perf_counter() - start
        fire[arm] = float(result.fired.float().mean())
    fps = {arm: args.trajectories * args.steps / seconds for arm, seconds in timings.items()}

    # the emulator's KV cache: the static one against transformers' dynamic one (the default of sample_next_frame),
    # chained draws from the same seed (autoregressive decoding only; with parallel decoding there is no cache)
    cache = {}  # the JSON fields
    if pipe.emulator.config.frame_decoding == "autoregressive":
        codes0 = pipe.encode_frames(initial).flatten(1)
        cache_steps = min(args.steps, 20)
        cache_fps, drawn = {}, {}
        for name, implementation in (("static", "static"), ("dynamic", None)):
            pipe.emulator.sample_next_frame(codes0[:2], cache_implementation=implementation)  # warm-up
            g, codes = torch.Generator().manual_seed(0), codes0
            start = time.perf_counter()
            for _ in range(cache_steps):
                codes = pipe.emulator.sample_next_frame(codes, generator=g, cache_implementation=implementation)
            cache_fps[name] = args.trajectories * cache_steps / (time.perf_counter() - start)
            drawn[name] = codes
        cache = {
            "emulator_cache_steps": cache_steps,
            "frames_per_s_emulator_step_static_cache": round(cache_fps["static"], 2),
            "frames_per_s_emulator_step_dynamic_cache": round(cache_fps["dynamic"], 2),
            "ratio_static_over_dynamic_cache": round(cache_fps["static"] / cache_fps["dynamic"], 3),
            "static_and_dynamic_cache_draw_the_same_codes": bool(torch.equal(drawn["static"], drawn["dynamic"])),
        }

    # the solver peer: the same trajectories over the same physical time
    solver_config = data_args.solver_config()
    solver = KolmogorovSolver(solver_config)
    steps_per_frame = solver_config.steps_per_frame * data_args.frame_stride
    state = solver.initial_condition(args.trajectories, seed=0)
    omega_hat = solver.to_spectral(state)
    solver.advance(omega_hat, 2)  # warm-up
    solver_steps = max(steps_per_frame * min(args.steps, 20), 1)
    start = time.perf_counter()
    solver.advance(omega_hat, solver_steps)
    solver_seconds = time.perf_counter() - start
    solver_steps_per_s = solver_steps / solver_seconds
    solver_fps = args.trajectories * solver_steps_per_s / steps_per_frame

    result = {
        "benchmark": "thermalized_rollout",
        "device": "cpu",
        **machine(),
        "output_dir": str(out),
        "trajectories": args.trajectories,
        "steps": args.steps,
        "frames_per_s_emulator": round(fps["emulator"], 2),
        "frames_per_s_emulator_with_levels": round(fps["emulator_with_levels"], 2),
        "frames_per_s_thermalizer": round(fps["thermalizer"], 2),
        "frames_per_s_noise_control": round(fps["noise_control"], 2),
        "ratio_thermalizer_over_emulator": round(fps["thermalizer"] / fps["emulator"], 3),
        "fire_rate_thermalizer": fire["thermalizer"],
        "frame_decoding": pipe.emulator.config.frame_decoding,
        "codes_per_frame": pipe.emulator.config.num_codes,
        **cache,
        "solver_grid_size": solver_config.grid_size,
        "solver_steps_per_frame": steps_per_frame,
        "solver_steps_per_s": round(solver_steps_per_s, 2),
        "solver_trajectory_steps_per_s": round(solver_steps_per_s * args.trajectories, 1),
        "frames_per_s_solver": round(solver_fps, 2),
        "emulator_speedup_over_solver": round(fps["emulator"] / solver_fps, 3),
        "thermalized_speedup_over_solver": round(fps["thermalizer"] / solver_fps, 3),
    }
    print(json.dumps(result, indent=2))
    write_results(args.name, result)


if __name__ == "__main__":
    main()
