"""Survival of the true dynamics under the evaluation's criterion: the ceiling of any emulator's survival.

    python benchmarks/thermalizer_truth_survival.py --output-dir outputs/thermalizer_kolmogorov_16x16 --steps 4000

The evaluation calls a rollout "in range" while its enstrophy and energy stay inside the interval seen over the
training trajectories (widened by ``evaluation.range_margin``). A finite sample's extremes are exceeded by a long
enough sample of the same process, so the true flow itself leaves that interval after a while; how long it takes
bounds what an emulator, thermalized or not, can show. This script continues each evaluation initial condition (the
same test trajectories and frame) with the solver for ``--steps`` emulator steps (``data.frame_stride`` stored
frames each, at the data set's resolution and time step), pools the frames as the data set does, and measures
survival with the run's own ranges: on the frames as the run's VQ tokenizer represents them (encoded and decoded,
as the ranges are; the default figure) and on the pooled frames themselves. It reads the emulator and thermalizer
arms from the run's ``eval_results.json`` (or ``--eval-results``, and ``--extended`` for a thermalizer arm from
``thermalizer_extend.py``) and reports the truth's median against theirs: ``median(truth) / median(emulator)`` is
the largest survival ratio a perfect emulator could reach at this length. The evaluation has the same truth arm over
its own length (``evaluation.truth_arm``); this script runs it longer, with the pooled frames' figure besides.

Writes ``benchmarks/results/NAME.json`` (default ``thermalizer_truth_survival``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import machine, run_task, write_results


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/thermalizer_kolmogorov_16x16", help="a finished thermalizer run")
    parser.add_argument("--steps", type=int, required=True, help="emulator steps of the true continuation")
    parser.add_argument("--eval-results", default=None, help="the evaluation (default: OUTPUT_DIR/eval_results.json)")
    parser.add_argument("--extended", default=None,
                        help="a thermalizer_extend.py JSON of the same run: its (longer) thermalizer arm is compared too")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-name", default="thermalizer_truth_survival", help="benchmarks/results/NAME.json")
    parser.add_argument("--results-file", default=None, help="write the figures here instead")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit(f"error: --steps={args.steps} must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_models.metrics.rollout_stability import survival_steps
    from hf_models.pipelines import ThermalizedRolloutPipeline

    out = Path(args.output_dir)
    task = run_task(out)
    arms = {}
    for name, path in (("evaluation", Path(args.eval_results) if args.eval_results else out / "eval_results.json"),
                       ("extended", Path(args.extended) if args.extended else None)):
        if path is None:
            continue
        if not path.is_file():
            raise SystemExit(f"error: {path} is missing")
        saved = json.loads(path.read_text())
        length = int(saved["steps"] if name == "extended" else saved["rollout_steps"])
        keys = ("survival_thermalizer",) if name == "extended" else ("survival_emulator", "survival_thermalizer", "survival_noise_control")
        for key in keys:
            if key not in saved:
                raise SystemExit(f"error: {path} has no {key}: re-run it")
            arms[f"{key.removeprefix('survival_')}{'_extended' if name == 'extended' else ''}"] = (
                [int(v) for v in saved[key]], length)
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(out))
    ranges = task.survival_ranges(pipe)

    begin = time.perf_counter()
    truth = task.true_rollouts(args.steps)
    solver_seconds = time.perf_counter() - begin
    represented = task.represented(pipe, truth)

    from hf_models.metrics.rollout_stability import flow_statistics

    result = {"benchmark": "thermalizer_truth_survival", **machine(), "output_dir": str(out), "steps": args.steps,
              "num_initial_conditions": len(truth), "initial_split": task.eval_args.initial_split,
              "initial_frame": task.eval_args.initial_frame, "range_margin": task.eval_args.range_margin,
              "ranges": {k: list(v) for k, v in ranges.items()}, "solver_seconds": round(solver_seconds, 1)}
    for label, frames in (("represented", represented), ("pooled", truth)):
        stats = flow_statistics(frames)
        per = {name: survival_steps(stats[name], *ranges[name]) for name in ranges}
        survival = torch.stack(list(per.values())).amin(0)
        result[f"survival_truth_{label}"] = [int(v) for v in survival]
        for name, values in per.items():
            result[f"survival_truth_{label}_{name}"] = [int(v) for v in values]
        result[f"median_survival_truth_{label}"] = float(survival.float().median())
        result[f"in_range_at_end_truth_{label}"] = int((survival >= args.steps).sum())
        for name in ranges:
            result[f"{name}_min_truth_{label}"] = float(stats[name].min())
            result[f"{name}_max_truth_{label}"] = float(stats[name].max())
    median_truth = result["median_survival_truth_represented"]
    lines = [f"truth ({args.steps} steps, solver {solver_seconds:.0f} s): median survival {median_truth:.0f} as the "
             f"tokenizer represents it ({result['in_range_at_end_truth_represented']} of {len(truth)} in range at the end), "
             f"{result['median_survival_truth_pooled']:.0f} on the pooled frames"]
    for arm, (survival, length) in arms.items():
        median = float(torch.tensor(survival).float().median())
        result[f"median_survival_{arm}"] = median
        result[f"rollout_steps_{arm}"] = length
        # truth survival seen over the arm's length, so both are capped alike
        truth_capped = float(torch.tensor([min(v, length) for v in result["survival_truth_represented"]]).float().median())
        result[f"median_survival_truth_at_{arm}_length"] = truth_capped
        lines.append(f"{arm}: median {median:.0f} over {length} steps (truth over the same length: {truth_capped:.0f})")
    if "emulator" in arms:
        emulator_median = result["median_survival_emulator"]
        result["truth_to_emulator_ratio"] = median_truth / max(emulator_median, 1.0)
        result["truth_to_emulator_ratio_capped"] = median_truth >= args.steps
        lines.append(f"truth / emulator: {result['truth_to_emulator_ratio']:.2f}"
                     f"{' (at least: the truth median is capped)' if result['truth_to_emulator_ratio_capped'] else ''}"
                     " - the largest survival ratio any emulator can show under this criterion")
    print("\n".join(lines))
    write_results(args.results_name, result, args.results_file)


if __name__ == "__main__":
    main()
