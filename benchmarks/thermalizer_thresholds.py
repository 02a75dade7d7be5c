"""Tune the thermalize step's thresholds on the training split: median survival of the emulator + thermalizer for each
(s_init, s_stop) pair, against the emulator alone from the same initial conditions and random numbers.

    python benchmarks/thermalizer_thresholds.py --output-dir outputs/thermalizer_kolmogorov --pairs 25:10 15:5 15:5:4

A third field sets the scheduler's ``num_denoising_steps`` for that row (default: the run's).

The initial conditions are frame ``--initial-frame`` of the first ``--initial-conditions`` *training* trajectories
(the task's ``evaluation.initial_split train``), so thresholds are chosen without looking at the test trajectories
the reported evaluation starts from. Survival is the task's: steps until enstrophy or energy leaves the range of the
true training trajectories as the tokenizer represents them. Each arm draws from a fresh ``torch.Generator`` seeded
with ``--seed``, so pairs are compared on common random numbers. Each row also gives the late-window energy-spectrum
distance (the last ``evaluation.late_window`` steps) to the training trajectories, next to the emulator's own for its
first ``evaluation.early_window`` steps: the quality a pair must keep while it extends survival; and both shell by
shell (``spectrum_log_ratio_*``, log10 of the arm's energy over the truth's in shells 1, 2, ...). ``--late-window`` and
``--early-window`` set the two windows instead of the run's (a run trained with a cut evaluation has cut windows). Writes ``benchmarks/results/thermalizer_thresholds.json``.

``--skip-emulator`` leaves out the emulator-alone arm (and the ratios): the rows are the same rollouts either way, so
two thermalizers trained on one emulator are compared by running this on each, the emulator arm on one of them only.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine, write_results


KEEP = "run"  # a pair without a third field keeps the run's num_denoising_steps


def parse_pair(text: str) -> tuple:
    """``S_INIT:S_STOP[:K]`` -> ``(s_init, s_stop, K)``; K is the scheduler's ``num_denoising_steps`` (an int, or
    ``none`` for one level per step) and defaults to the run's."""
    fields = text.split(":")
    try:
        if len(fields) not in (2, 3):
            raise ValueError
        s_init, s_stop = int(fields[0]), int(fields[1])
        steps = KEEP if len(fields) == 2 else (None if fields[2].lower() == "none" else int(fields[2]))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a threshold pair: expected S_INIT:S_STOP or S_INIT:S_STOP:K (K an int or none), e.g. 25:10 or 15:5:4"
        ) from None
    return s_init, s_stop, steps


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/thermalizer_kolmogorov", help="a finished thermalizer run")
    parser.add_argument("--pairs", type=parse_pair, nargs="*", default=[(25, 10, KEEP), (15, 5, KEEP)], metavar="S_INIT:S_STOP[:K]",
                        help="thermalized rows; --pairs with none rolls out the emulator arm alone")
    parser.add_argument("--initial-conditions", type=int, default=32)
    parser.add_argument("--initial-frame", type=int, default=100)
    parser.add_argument("--rollouts-per-ic", type=int, default=1,
                        help="independent rollouts from each initial condition (pooled in the medians)")
    parser.add_argument("--steps", type=int, default=400, help="emulator steps per rollout")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--late-window", type=int, default=None,
                        help="steps at the end of each rollout the late spectrum is taken over (default: the run's "
                             "evaluation.late_window, which a run trained with a cut evaluation has cut too)")
    parser.add_argument("--early-window", type=int, default=None,
                        help="first steps of each rollout the early spectrum is taken over (default: the run's "
                             "evaluation.early_window)")
    parser.add_argument("--eta", type=float, default=None,
                        help="the scheduler's eta for every row (DDIM steps; default: the run's, DDPM steps if unset)")
    parser.add_argument("--renoise", choices=("true", "false"), default=None,
                        help="the scheduler's renoise for every row (fresh Gaussian noise at the read level before "
                             "denoising; default: the run's)")
    parser.add_argument("--s-floor", type=int, default=None,
                        help="the scheduler's s_floor for every row: fired states are denoised from at least this level "
                             "(default: the run's, the predicted level if unset)")
    parser.add_argument("--s-ceiling", type=int, default=None,
                        help="the scheduler's s_ceiling for every row: fired states are denoised from at most this level "
                             "(default: the run's, the predicted level if unset)")
    parser.add_argument("--candidates", type=int, default=1,
                        help="thermalizations per fired state, the classifier keeping the least noisy (the pipeline's num_candidates)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="at most this many thermalizations per fired step while the classifier still reads the "
                             "grid above s_init (the pipeline's thermalize_rounds)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="the emulator's sampling temperature in every arm (default: the run's evaluation.temperature)")
    parser.add_argument("--skip-emulator", action="store_true",
                        help="roll out only the thermalized rows (no emulator-alone arm, no ratios): to compare two "
                             "thermalizers of one emulator whose emulator arm another run of this script measured")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-name", default="thermalizer_thresholds",
                        help="the figures go to benchmarks/results/NAME.json")
    parser.add_argument("--results-file", default=None, help="write the figures here instead")
    args = parser.parse_args()
    if args.skip_emulator and not args.pairs:
        parser.error("--skip-emulator with no --pairs leaves nothing to roll out")
    for name in ("late_window", "early_window"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.rounds < 1:
        parser.error(f"--rounds={args.rounds} must be >= 1 (1: one thermalization per fired step)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_models.metrics.rollout_stability import exit_side, late_window, spectrum_log_ratio
    from hf_models.pipelines import ThermalizedRolloutPipeline
    from trainers.arguments import ConfigError
    from trainers.evaluate import load_run_task
    from trainers.tasks.thermalizer import firing_statistics

    out = Path(args.output_dir)
    overrides = ["--evaluation.initial_split", "train", "--evaluation.initial_frame", str(args.initial_frame),
                 "--evaluation.num_initial_conditions", str(args.initial_conditions),
                 "--evaluation.rollouts_per_initial_condition", str(args.rollouts_per_ic)]
    try:
        task = load_run_task(out, overrides)
    except ConfigError as err:
        raise SystemExit(f"error: {err}; a finished thermalizer run is made by\n"
                         "  python -m trainers.train configs/experiments/thermalizer_kolmogorov.yaml") from None
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    saved = pipe.scheduler
    ranges = task.survival_ranges(pipe)
    initial = task.rollout_initial_frames()
    # the spectra are compared with the training trajectories too: the test split stays unseen
    reference = task.frames("train").flatten(0, 1)
    window = min(task.eval_args.late_window if args.late_window is None else args.late_window, args.steps)
    temperature = task.eval_args.temperature if args.temperature is None else args.temperature
    early_window = min(task.eval_args.early_window if args.early_window is None else args.early_window, args.steps)

    def spectrum(frames: torch.Tensor, name: str) -> dict:
        """The spectrum distance of ``frames`` to the reference and the same shell by shell (log10 E(k) / E_ref(k),
        k = 1, 2, ...; positive: too much energy at that scale), from one computation; inf / None without frames."""
        if not len(frames):
            return {f"spectrum_distance_{name}": float("inf"), f"spectrum_log_ratio_{name}": None}
        ratio = spectrum_log_ratio(frames, reference)
        return {f"spectrum_distance_{name}": float(ratio.abs().mean()),
                f"spectrum_log_ratio_{name}": [round(float(v), 4) for v in ratio]}

    def exits(stats: dict, survival: torch.Tensor, stopped_at: torch.Tensor) -> dict:
        """How the rollouts that died did: stopped at `s_max`, or which statistic left its range on which side."""
        counts = {"stopped": 0}
        for i, step in enumerate(survival.tolist()):
            if step >= args.steps:
                continue
            if 0 <= int(stopped_at[i]) <= step + 1:  # survival_steps caps a stopped rollout at the step before
                counts["stopped"] += 1
                continue
            for name, (low, high) in ranges.items():
                side = exit_side(float(stats[name][i, step]), low, high)
                if side is not None:
                    counts[f"{name}_{side}"] = counts.get(f"{name}_{side}", 0) + 1
                    break
        return {"exits": counts}

    def arm(thermalize: bool) -> dict:
        start = time.perf_counter()
        output = pipe(initial, num_steps=args.steps, thermalize=thermalize, generator=torch.Generator().manual_seed(args.seed),
                      num_candidates=args.candidates, thermalize_rounds=args.rounds, temperature=temperature)
        stats, _, survival = task.survival(output, ranges)
        return {"median_survival": float(survival.float().median()), "mean_survival": float(survival.float().mean()),
                "survival": survival.tolist(), **exits(stats, survival, output.stopped_at),
                **firing_statistics(output),  # over the steps each rollout ran
                **spectrum(late_window(output.frames, window), "late"),
                **spectrum(output.frames[:, 1: early_window + 1], "early"),
                "seconds": round(time.perf_counter() - start, 1)}

    emulator = None
    if not args.skip_emulator:
        emulator = arm(thermalize=False)
        print(f"emulator alone: median survival {emulator['median_survival']:.0f}, exits {emulator['exits']}, spectrum distance: first {early_window} steps "
              f"{emulator['spectrum_distance_early']:.3f}, last {window} {emulator['spectrum_distance_late']:.3f}", flush=True)
    rows = []
    for s_init, s_stop, steps in args.pairs:
        steps = saved.config.num_denoising_steps if steps == KEEP else steps
        try:
            # default: the run's
            extra = {k: v for k, v in (("eta", args.eta), ("s_floor", args.s_floor), ("s_ceiling", args.s_ceiling),
                                       ("renoise", None if args.renoise is None else args.renoise == "true")) if v is not None}
            pipe.scheduler = saved.with_config(s_init=s_init, s_stop=s_stop, num_denoising_steps=steps, **extra)
        except ValueError as err:
            raise SystemExit(f"error: pair {s_init}:{s_stop}:{steps}: {err}") from None
        row = {"s_init": s_init, "s_stop": s_stop, "num_denoising_steps": steps, "eta": pipe.scheduler.config.eta,
               "s_floor": pipe.scheduler.config.s_floor, "s_ceiling": pipe.scheduler.config.s_ceiling,
               "renoise": pipe.scheduler.config.renoise,
               **arm(thermalize=True)}
        row["survival_ratio"] = None if emulator is None else row["median_survival"] / max(emulator["median_survival"], 1.0)
        rows.append(row)
        ratio = "" if emulator is None else f" (ratio {row['survival_ratio']:.2f})"
        print(f"s_init {s_init:3d} s_stop {s_stop:3d} num_denoising_steps {steps} eta {row['eta']} s_floor {row['s_floor']} s_ceiling {row['s_ceiling']}: median survival {row['median_survival']:.0f}"
              f"{ratio}, exits {row['exits']}, fired {row['fire_rate']:.0%}, "
              f"{row['requantized_changes_mean']:.1f} codes changed per step, late spectrum distance "
              f"{row['spectrum_distance_late']:.3f}", flush=True)

    result = {
        "benchmark": "thermalizer_thresholds",
        **machine(),
        "output_dir": str(out),
        "initial_split": "train",
        "initial_frame": args.initial_frame,
        "initial_conditions": args.initial_conditions,
        "rollouts_per_initial_condition": args.rollouts_per_ic,
        "steps": args.steps,
        "late_window": window,
        "early_window": early_window,
        "spectrum_reference": "the training trajectories (all frames)",
        "seed": args.seed,
        "num_candidates": args.candidates,
        "thermalize_rounds": args.rounds,
        "temperature": temperature,
        "survival_ranges": {k: list(v) for k, v in ranges.items()},
        "emulator": emulator,
        "pairs": rows,
    }
    write_results(args.results_name, result, args.results_file)


if __name__ == "__main__":
    main()
