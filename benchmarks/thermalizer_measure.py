"""What a finished run's thermalizer does to the statistics on its own, without the emulator: the flow statistics of
code grids it produces, against the true frames of a split.

    python benchmarks/thermalizer_measure.py --output-dir outputs/thermalizer_kolmogorov --levels 15 40 90 150

Rows (each decoded by the run's VQ tokenizer and compared with ``--reference-frames`` true frames of ``--split``):

- ``vq_reconstruction``: ``--samples`` true frames encoded and decoded, the floor every arm shares; these grids are
  the clean inputs of the rows below.
- ``unconditional``: the thermalizer as a generative model: diffusers' sampling loop (``set_timesteps`` /
  ``step``) from Gaussian noise at the top level down to level 0 in ``--sampling-steps`` steps, re-quantized. A
  thermalizer that knows the invariant measure gives grids with the floor's statistics.
- ``thermalized_L{L}``: one thermalize step (the run's scheduler: ``s_stop``, strided steps, ``eta``...; ``--eta``,
  ``--num-denoising-steps`` and ``--renoise`` change it) of the clean grids read at level ``L``, re-quantized: what the pipeline does to a state its classifier reads at ``L``. A rollout
  whose states read at ``L`` gets this correction on every fired step, so a bias here is one it compounds.
- ``iterated_{n}``: the pipeline's step with an identity emulator, ``n`` times: each round the classifier reads the
  grid and the fired ones are thermalized and re-quantized (fire rate and mean level in the row).

Each row gives the spectrum distance (and shell by shell, ``spectrum_log_ratio``: log10 of the row's energy over the
truth's in shells 1, 2, ...) and the enstrophy-histogram distance (the evaluation's metrics), the mean energy
over the true frames' (``energy_ratio``) and the fraction of codes changed from the clean grids. Writes
``benchmarks/results/NAME.json`` (default ``thermalizer_measure``). The training split is the default reference, so
choices made from these rows leave the test split unseen.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import machine, run_task, write_results


RUN = object()  # --num-denoising-steps not given: the run's


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/thermalizer_kolmogorov", help="a finished thermalizer run")
    parser.add_argument("--split", choices=("train", "test"), default="train", help="the true frames compared with")
    parser.add_argument("--samples", type=int, default=256, help="grids per row")
    parser.add_argument("--reference-frames", type=int, default=2048, help="true frames of the split in the reference")
    parser.add_argument("--sampling-steps", type=int, default=100,
                        help="steps of the unconditional sampling loop (0 leaves the row out)")
    parser.add_argument("--levels", type=int, nargs="*", default=None,
                        help="levels the clean grids are read at for one thermalization (default: s_init, the middle "
                             "of s_init..s_max, s_max)")
    parser.add_argument("--iterations", type=int, nargs="*", default=[1, 3, 10, 30],
                        help="rows of the iterated step after these many rounds")
    parser.add_argument("--eta", type=float, default=None,
                        help="the scheduler's eta (DDIM steps; 0 is deterministic) for the thermalize rows (default: the run's)")
    parser.add_argument("--num-denoising-steps", type=lambda v: None if v.lower() == "none" else int(v), default=RUN,
                        metavar="K", help="the scheduler's num_denoising_steps (an int, or none for one level per step; "
                                          "default: the run's)")
    parser.add_argument("--renoise", choices=("true", "false"), default=None,
                        help="the scheduler's renoise (fresh noise at the read level first; default: the run's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-name", default="thermalizer_measure",
                        help="the figures go to benchmarks/results/NAME.json")
    parser.add_argument("--results-file", default=None, help="write the figures here instead")
    args = parser.parse_args()
    for name in ("samples", "reference_frames"):
        if getattr(args, name) < 2:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 2")
    if args.sampling_steps < 0:
        parser.error(f"--sampling-steps={args.sampling_steps} must be >= 0 (0 leaves the unconditional row out)")
    if any(n < 1 for n in args.iterations):
        parser.error(f"--iterations {args.iterations}: every count must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)

    from hf_models.metrics.rollout_stability import flow_statistics, histogram_distance, spectrum_log_ratio
    from hf_models.pipelines import ThermalizedRolloutPipeline
    from hf_models.schedulers import ThermalizerScheduler
    from trainers.tasks.thermalizer import THRESHOLD_KEYS

    out = Path(args.output_dir)
    task = run_task(out)
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    overrides = {k: v for k, v in (("eta", args.eta), ("renoise", None if args.renoise is None else args.renoise == "true"))
                 if v is not None}
    if args.num_denoising_steps is not RUN:
        overrides["num_denoising_steps"] = args.num_denoising_steps
    try:
        scheduler = pipe.scheduler.with_config(**overrides) if overrides else pipe.scheduler
    except ValueError as err:
        parser.error(f"scheduler settings {overrides}: {err}")
    pipe.scheduler = scheduler  # the thermalize rows are the pipeline's step with these settings
    thermalizer, vq = pipe.thermalizer.eval(), pipe.vq_tokenizer.eval()
    cfg = scheduler.config
    top = cfg.num_train_timesteps - 1
    levels = args.levels if args.levels is not None else [cfg.s_init, (cfg.s_init + cfg.s_max) // 2, cfg.s_max]
    bad = [level for level in levels if not 0 <= level <= top]
    if bad:
        parser.error(f"--levels {bad}: a level must lie in [0, {top}] (the thermalizer's num_train_timesteps - 1)")
    if args.sampling_steps > cfg.num_train_timesteps:
        parser.error(f"--sampling-steps={args.sampling_steps} must be at most num_train_timesteps={cfg.num_train_timesteps}")

    generator = torch.Generator().manual_seed(args.seed)
    pool = task.frames(args.split).flatten(0, 1)
    if len(pool) < max(args.samples, args.reference_frames):
        parser.error(f"the {args.split} split has {len(pool)} frames: --samples and --reference-frames must not exceed it")
    reference = pool[torch.randperm(len(pool), generator=generator)[: args.reference_frames]]
    reference_stats = flow_statistics(reference)
    clean_codes = pipe.encode_frames(pool[torch.randperm(len(pool), generator=generator)[: args.samples]])
    h, w = clean_codes.shape[-2:]

    def quantize(sample: torch.Tensor) -> torch.LongTensor:
        return vq.quantize(thermalizer.denormalize(sample).to(vq.device)).view(-1, h, w).cpu()

    def row(codes: torch.LongTensor, **extra) -> dict:
        frames = pipe.decode_codes(codes)
        stats = flow_statistics(frames)
        shells = spectrum_log_ratio(frames, reference)
        return {"spectrum_distance": float(shells.abs().mean()),
                "spectrum_log_ratio": [round(float(v), 4) for v in shells],
                "enstrophy_histogram_distance": histogram_distance(stats["enstrophy"], reference_stats["enstrophy"]),
                "energy_ratio": float(stats["energy"].mean() / reference_stats["energy"].mean()),
                "codes_changed": float((codes != clean_codes).float().mean()), **extra}

    rows = {"vq_reconstruction": row(clean_codes)}
    clean = thermalizer.normalize(vq.embed(clean_codes.to(vq.device)).to(thermalizer.device))
    seconds = {}
    with torch.no_grad():
        if args.sampling_steps:
            start = time.perf_counter()
            sampler = ThermalizerScheduler.from_config(cfg)
            sampler.set_timesteps(args.sampling_steps)
            x = torch.randn(clean.shape, generator=generator).to(clean)
            for t in sampler.timesteps:
                x = sampler.step(thermalizer(sample=x).noise_pred, t, x, generator=generator).prev_sample
            rows["unconditional"] = row(quantize(x), from_level=int(sampler.timesteps[0]), steps=args.sampling_steps)
            seconds["unconditional"] = time.perf_counter() - start
        for level in levels:
            out_ = pipe.thermalize_codes(clean_codes, levels=level, generator=generator)
            rows[f"thermalized_L{level}"] = row(out_.codes, level=level, fired=float(out_.fired.float().mean()))
        codes = clean_codes.clone()
        for n in range(1, max(args.iterations, default=0) + 1):
            out_ = pipe.thermalize_codes(codes, generator=generator)
            codes = out_.codes
            if n in args.iterations:
                rows[f"iterated_{n}"] = row(codes, rounds=n, fired=float(out_.fired.float().mean()),
                                            level_mean=float(out_.levels.float().mean()),
                                            stopped=float(out_.stopped.float().mean()))

    for name, values in rows.items():
        print(f"{name:24s} spectrum {values['spectrum_distance']:.4f}  enstrophy histogram "
              f"{values['enstrophy_histogram_distance']:.4f}  energy ratio {values['energy_ratio']:.3f}  "
              f"codes changed {values['codes_changed']:.3f}")
    result = {"output_dir": str(out), "split": args.split, "samples": args.samples, "reference_frames": args.reference_frames,
              "seed": args.seed, "scheduler_overrides": overrides,
              "thresholds": {k: scheduler.config[k] for k in THRESHOLD_KEYS},
              "num_train_timesteps": cfg.num_train_timesteps, "rows": rows, "seconds": seconds, "machine": machine()}
    print("wrote", write_results(args.results_name, result, args.results_file))


if __name__ == "__main__":
    main()
