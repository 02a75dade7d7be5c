"""Extend the thermalizer arm of a finished run's evaluation past its rollout length, to measure a survival ratio the
evaluation's length caps (a median at ``rollout_steps`` says only "at least").

    python benchmarks/thermalizer_extend.py --output-dir outputs/thermalizer_kolmogorov_16x16 --steps 2100

Only the thermalizer arm is rolled out again, which halves the cost of a longer evaluation. The emulator arm is read
from the run's ``eval_results.json``: its median is only known when more than half of the emulator rollouts left
the range within the evaluation's length, and the script refuses otherwise (the rest are lower bounds, kept at the
evaluation's length, and the ratio's bootstrap interval is left out, ``null``). The arm draws from the evaluation's seed with the
evaluation's thresholds (common random numbers), so its first ``rollout_steps`` steps must repeat the evaluation's
thermalizer arm. The script checks this on every survival time the evaluation saw end and stops with an error if
one differs: another machine kind rounds differently, and then the two arms no longer share their random numbers.
The survival ratio is ``median(thermalizer) / median(emulator)`` (lower medians) with the evaluation's paired
bootstrap interval. Writes ``benchmarks/results/NAME.json`` (default ``thermalizer_extend``).

At the evaluation's length or shorter (``--steps`` at most its ``rollout_steps``) the emulator arm is known even where
a rollout is still in range (both arms are capped there), so a new arm (``--candidates``, ``--s-floor``, ``--s-ceiling``) can be read
against it at that length.

``--eval-results FILE`` reads the evaluation from another file than the run's ``eval_results.json`` (the copy a run
keeps in ``benchmarks/results``, for a run re-trained without its evaluation); it must have been written with the
run's evaluation settings. ``--s-floor N`` rolls out the thermalizer arm with that floor instead of the evaluation's
(a threshold tuned after the evaluation was read): the emulator arm does not depend on the thermalizer's thresholds,
so it is still the evaluation's, but the thermalizer arm is a new one and cannot be checked against the evaluation's
(``repeats_the_evaluation`` is then false); ``--s-ceiling N`` likewise. ``--candidates K`` does the same for the pipeline's ``num_candidates``
(best of K thermalizations of each fired state, by the classifier), and ``--rounds R`` for its ``thermalize_rounds``
(up to R thermalizations of a fired step while the classifier still reads drift).

    python benchmarks/thermalizer_extend.py --output-dir outputs/thermalizer_kolmogorov_16x16 --steps 2100 \
        --eval-results benchmarks/results/thermalizer_survival_16x16.json --s-floor 30

``--stop-on-exit`` makes a long arm affordable: a rollout ends at the step its statistic leaves the range (the
pipeline's ``callback_on_step_end``), so the emulator spends nothing on it, and the whole arm ends once its lower
median is known (more than half of the rollouts have left). The rollouts still in range then have lower bounds for
survival times (``survival_thermalizer_lower_bounds``), the median is exact, and the interval is left out. The other
rollouts' random numbers change at the first ended one, so the arm is a new draw, not a repeat of the evaluation's,
unless the evaluation drew one stream per rollout (``evaluation.generator_per_rollout``): then every rollout repeats
the evaluation's up to where it ends, and the script checks that as for a plain repeat.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import machine, run_task, write_results


def late_statistics(task, pipe, output) -> dict:
    """The evaluation's late-window distances to the test trajectories (the task's own ``late_statistics``) over the
    last ``late_window`` steps of the extended arm."""
    from hf_models.metrics.rollout_stability import flow_statistics, late_window

    test = task.frames("test")
    test_pool = test.flatten(0, 1)
    distances = task.late_statistics(output, test, flow_statistics(test_pool)["enstrophy"], pipe.encode_frames(test_pool),
                                     pipe.vq_tokenizer.config.codebook_size)
    return {
        "late_window": task.eval_args.late_window,
        "late_window_rollouts_thermalizer": len(late_window(output.frames, task.eval_args.late_window)),
        **{f"{name}_thermalizer": value for name, value in distances.items()},
    }


class ExitWatch:
    """``callback_on_step_end`` of the rollout pipeline for ``--stop-on-exit``: ends each rollout at the step a
    survival statistic of its decoded frame leaves its range (or a stop at ``s_max`` removed it), and interrupts the
    arm once more than half have ended, when the lower median of the survival times is known."""

    def __init__(self, ranges: dict, num_rollouts: int):
        self.ranges = ranges
        self.running = set(range(num_rollouts))
        self.exited: set = set()
        self.exits: dict = {}  # rollout -> the statistics that left the range at its exit, with their side
        self.needed = (num_rollouts - 1) // 2 + 1  # exits that fix the lower median
        self.median_known_at = None

    def __call__(self, pipe, i, t, kwargs):
        from hf_models.metrics.rollout_stability import exit_side, flow_statistics

        rows = [int(r) for r in kwargs["rows"]]
        before = set(self.exited)
        self.exited |= self.running - set(rows)  # stopped at s_max by the pipeline
        stats = flow_statistics(pipe.decode_codes(kwargs["codes"].cpu()))
        end = torch.zeros(len(rows), dtype=torch.bool)
        for name, (low, high) in self.ranges.items():
            for j, value in enumerate(stats[name].tolist()):  # which statistic left, and which way
                side = exit_side(value, low, high)
                if side is not None:
                    self.exits.setdefault(rows[j], []).append(f"{name}_{side}")
                    end[j] = True
        self.exited |= {r for r, e in zip(rows, end.tolist()) if e}
        self.running = set(rows) - self.exited
        if self.exited != before:
            print(f"step {t}: rollouts {sorted(self.exited - before)} left the range ({len(self.exited)} of "
                  f"{len(self.exited) + len(self.running)})", flush=True)
        if len(self.exited) >= self.needed and self.running:
            self.median_known_at = t
            pipe._interrupt = True
        return {"end": end}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/thermalizer_kolmogorov_16x16",
                        help="a finished thermalizer run, evaluated (its eval_results.json)")
    parser.add_argument("--steps", type=int, required=True, help="emulator steps of the extended thermalizer arm")
    parser.add_argument("--eval-results", default=None,
                        help="the evaluation to extend (default: OUTPUT_DIR/eval_results.json), written with the run's settings")
    parser.add_argument("--s-floor", type=int, default=None,
                        help="thermalize with this s_floor instead of the evaluation's (the arm is then not a repeat)")
    parser.add_argument("--s-ceiling", type=int, default=None,
                        help="thermalize with this s_ceiling instead of the evaluation's (the arm is then not a repeat)")
    parser.add_argument("--candidates", type=int, default=None,
                        help="thermalize with this num_candidates instead of the evaluation's (the arm is then not a repeat)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="thermalize with this thermalize_rounds instead of the evaluation's (the arm is then not a repeat)")
    parser.add_argument("--stop-on-exit", action="store_true",
                        help="end each rollout when it leaves the range, and the arm once its median is known")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-name", default="thermalizer_extend", help="the figures go to benchmarks/results/NAME.json")
    parser.add_argument("--results-file", default=None, help="write the figures here instead")
    args = parser.parse_args()
    if args.steps < 1:
        raise SystemExit(f"error: --steps={args.steps} must be >= 1")
    if args.candidates is not None and args.candidates < 1:
        raise SystemExit(f"error: --candidates={args.candidates} must be >= 1 (1: the paper's single thermalization)")
    if args.rounds is not None and args.rounds < 1:
        raise SystemExit(f"error: --rounds={args.rounds} must be >= 1 (1: one thermalization per fired step)")
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_models.metrics.rollout_stability import median_ratio_interval
    from hf_models.pipelines import ThermalizedRolloutPipeline
    from trainers.tasks.thermalizer import THRESHOLD_KEYS, firing_statistics

    out = Path(args.output_dir)
    evaluated = Path(args.eval_results) if args.eval_results else out / "eval_results.json"
    if not evaluated.is_file():
        raise SystemExit(f"error: {evaluated} is missing: evaluate the run first (python -m trainers.evaluate {out} --write)")
    saved = json.loads(evaluated.read_text())
    try:
        emulator = [int(v) for v in saved["survival_emulator"]]
        thermalizer_saved = [int(v) for v in saved["survival_thermalizer"]]
        evaluated_steps = int(saved["rollout_steps"])
    except (KeyError, TypeError, ValueError) as err:
        raise SystemExit(f"error: {evaluated} has no per-rollout survival ({err}): re-run the evaluation") from None
    # past the evaluation's length an emulator rollout still in range there has an unknown survival; the (lower)
    # median is still known when more than half of them ended within the evaluation, but the interval is not
    in_range = sum(v >= evaluated_steps for v in emulator)
    median_known = sum(v < evaluated_steps for v in emulator) > (len(emulator) - 1) // 2
    if args.steps > evaluated_steps and in_range and not median_known:
        raise SystemExit(f"error: {in_range} emulator rollouts were still in range at the evaluation's {evaluated_steps} "
                         f"steps, so the emulator's median survival is not known: evaluate with more "
                         f"--evaluation.rollout_steps instead")
    emulator_lower_bounds = in_range if args.steps > evaluated_steps else 0
    # at the evaluation's length or shorter the emulator arm is known (capped where it is still in range)
    emulator = [min(v, args.steps) for v in emulator]
    task = run_task(out)  # the run's evaluation settings: seed, initial conditions, temperature
    ev = task.eval_args
    if ev.rollout_steps != evaluated_steps or ev.num_initial_conditions * ev.rollouts_per_initial_condition != len(emulator):
        raise SystemExit(f"error: {evaluated} was written with other evaluation settings than {out / 'config.yaml'} "
                         f"({evaluated_steps} steps, {len(emulator)} rollouts): re-run the evaluation")
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    thresholds = {k: saved[k] for k in THRESHOLD_KEYS if saved.get(k) is not None}
    changed = {name: value for name, value in (("s_floor", args.s_floor), ("s_ceiling", args.s_ceiling))
               if value is not None and value != thresholds.get(name)}
    try:
        pipe.scheduler = pipe.scheduler.with_config(**{**thresholds, **changed})
    except ValueError as err:  # the scheduler names the allowed range
        raise SystemExit(f"error: {err}") from None
    num_candidates = ev.num_candidates
    if args.candidates is not None and args.candidates != ev.num_candidates:
        num_candidates = args.candidates
        changed["num_candidates"] = num_candidates
    rounds = ev.thermalize_rounds
    if args.rounds is not None and args.rounds != ev.thermalize_rounds:
        rounds = args.rounds
        changed["thermalize_rounds"] = rounds
    ranges = task.survival_ranges(pipe)
    initial = task.rollout_initial_frames()
    callback = None
    if args.stop_on_exit:
        if not ev.generator_per_rollout:  # one stream for the batch: ending a rollout changes the others' draws
            changed["stop_on_exit"] = True
        callback = ExitWatch(ranges, len(initial))
    start = time.perf_counter()
    output = pipe(initial, num_steps=args.steps, thermalize=True, noise_control=False,
                  temperature=ev.temperature, generator=task.rollout_generator(len(initial)), output_type="pt",
                  thermalizer_input=ev.thermalizer_input, num_candidates=num_candidates, thermalize_rounds=rounds,
                  callback_on_step_end=callback)
    seconds = time.perf_counter() - start
    _, per_statistic, survival = task.survival(output, ranges)
    survival = [int(v) for v in survival]
    # rollouts the arm's interrupt ended while still in range: their survival is a lower bound
    lower_bounds = [] if callback is None else [i for i in range(len(survival))
                                                if i not in callback.exited and int(output.ended_at[i]) >= 0]
    common = min(args.steps, evaluated_steps)
    # a repeat of the evaluation's arm must agree with it; an arm with changed thresholds is a new one
    # (a rollout the arm's interrupt ended in range has only a lower bound, which the evaluation's must not be below)
    differ = [] if changed else [i for i, (new, old) in enumerate(zip(survival, thermalizer_saved))
                                 if (min(old, common) < min(new, common) if i in lower_bounds else min(new, common) != min(old, common))]
    if differ:
        raise SystemExit(f"error: rollouts {differ} do not repeat the evaluation's thermalizer arm within its first "
                         f"{common} steps (survival {[survival[i] for i in differ]} against {[thermalizer_saved[i] for i in differ]}): "
                         "the arms no longer share their random numbers (another machine kind?); evaluate with more "
                         "--evaluation.rollout_steps instead")
    median_emulator = float(torch.tensor(emulator).float().median())
    median_thermalizer = float(torch.tensor(survival).float().median())
    low = high = None  # resamples would take the emulator's lower bounds for survival times
    if not emulator_lower_bounds and not lower_bounds:
        low, high = median_ratio_interval(survival, emulator, cluster_size=ev.rollouts_per_initial_condition)
    result = {
        "benchmark": "thermalizer_extend",
        **machine(),
        "output_dir": str(out),
        "evaluated_steps": evaluated_steps,
        "steps": args.steps,
        "seconds": round(seconds, 1),
        "eval_results": str(evaluated),
        **thresholds,
        "num_candidates": num_candidates,
        "thermalize_rounds": rounds,
        **changed,
        "changed_thresholds": sorted(changed),
        "survival_emulator": emulator,
        "survival_emulator_lower_bounds": emulator_lower_bounds,
        "survival_thermalizer": survival,
        "survival_thermalizer_lower_bounds": lower_bounds,
        "steps_rolled_out": int((output.codes >= 0).flatten(2).all(-1).any(0).sum()) - 1,
        "median_survival_emulator": median_emulator,
        "median_survival_thermalizer": median_thermalizer,
        "survived_full_rollout_thermalizer": sum(v >= args.steps for v in survival),
        "survival_ratio": median_thermalizer / max(median_emulator, 1.0),
        "survival_ratio_ci95_low": low,
        "survival_ratio_ci95_high": high,
        "survival_ratio_capped": median_thermalizer >= args.steps,
        "median_known_at_step": None if callback is None else callback.median_known_at,
        "exits_thermalizer": None if callback is None else {str(k): v for k, v in sorted(callback.exits.items())},
        # over the steps each rollout ran (a rollout that --stop-on-exit or a stop ended has no later steps)
        **{f"{name}_thermalizer": value for name, value in firing_statistics(output).items()},
        **{f"survival_thermalizer_{name}": [int(v) for v in values] for name, values in per_statistic.items()},
        **late_statistics(task, pipe, output),
        "repeats_the_evaluation": not changed,
    }
    print(f"{args.steps} steps ({seconds:.0f} s): median survival emulator {median_emulator:.0f} / thermalizer "
          f"{median_thermalizer:.0f}{' (capped)' if result['survival_ratio_capped'] else ''}, ratio {result['survival_ratio']:.2f} "
          + (f"(95 % interval {low:.2f}-{high:.2f})" if low is not None else
             f"(no interval: {emulator_lower_bounds} emulator survivals are lower bounds)")
          + (f"; the arm ended at step {callback.median_known_at}, when its median was known, with "
             f"{len(lower_bounds)} of {len(survival)} still in range (their survivals are lower bounds)"
             if callback is not None and callback.median_known_at else
             f"; {result['survived_full_rollout_thermalizer']} of {len(survival)} in range at the end")
          + (f"; {changed} instead of the evaluation's thresholds: a new arm, not a repeat" if changed else ""))
    write_results(args.results_name, result, args.results_file)


if __name__ == "__main__":
    main()
