"""Where an emulator's energy excess lives: the shell spectra of its drifted states (the emulator-only rollouts the
thermalizer stage prepares, ``embeddings/drifted``) against the true training frames as the tokenizer represents them,
binned by the state's energy, next to the true frames' own high-energy bins.

    python benchmarks/thermalizer_drift_spectrum.py --output-dir outputs/thermalizer_kolmogorov_16x16

Each row is the bin's mean shell energy ``E(k)`` divided by the truth's mean ``E(k)`` (the peer measured in the same
run): a drift that raises the energy the way the true dynamics do has the true high-energy bins' pattern. Writes
``benchmarks/results/thermalizer_drift_spectrum.json``. Reads the training split only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from common import machine, run_task, write_results


DEFAULT_BINS = (0.0, 0.9, 1.1, 1.3, 1.5)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/thermalizer_kolmogorov_16x16", help="a finished thermalizer run")
    parser.add_argument("--bins", type=float, nargs="+", default=list(DEFAULT_BINS),
                        help="lower edges of the energy bins (the last bin is open above)")
    parser.add_argument("--shells", type=int, default=8, help="shells 1..N in the table")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--results-name", default="thermalizer_drift_spectrum",
                        help="the figures go to benchmarks/results/NAME.json")
    parser.add_argument("--results-file", default=None, help="write the figures here instead")
    args = parser.parse_args()
    if sorted(args.bins) != args.bins or len(set(args.bins)) != len(args.bins):
        parser.error(f"--bins {args.bins} must be strictly increasing")
    if args.threads:
        torch.set_num_threads(args.threads)

    from datasets import load_from_disk

    from hf_models.data.kolmogorov import energy_spectrum
    from hf_models.pipelines import ThermalizedRolloutPipeline

    out = Path(args.output_dir)
    task = run_task(out)
    drifted_dir = out / "embeddings" / "drifted"
    if not drifted_dir.is_dir():
        raise SystemExit(f"error: {drifted_dir} does not exist: the thermalizer stage's data preparation writes it")
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(out))
    vq = pipe.vq_tokenizer
    torch.set_grad_enabled(False)

    truth = pipe.decode_codes(pipe.encode_frames(task.frames("train").flatten(0, 1))).double()
    drifted = load_from_disk(str(drifted_dir)).with_format("torch")[:]
    codes = torch.cat([vq.quantize(e) for e in drifted["embedding"].split(512)])
    drift = pipe.decode_codes(codes).double()
    _, truth_spectra = energy_spectrum(truth)
    _, drift_spectra = energy_spectrum(drift)
    if args.shells >= truth_spectra.shape[-1]:
        parser.error(f"--shells {args.shells} must be below {truth_spectra.shape[-1]} (the frames' shells)")
    mean = truth_spectra.mean(0)
    shells = list(range(1, args.shells + 1))

    def rows(spectra: torch.Tensor, name: str) -> list:
        energy = spectra.sum(-1)
        edges = [*args.bins, float("inf")]
        found = []
        for low, high in zip(edges[:-1], edges[1:]):
            mask = (energy >= low) & (energy < high)
            if mask.any():
                ratio = spectra[mask].mean(0) / mean
                found.append({"states": name, "energy_low": low, "energy_high": high, "count": int(mask.sum()),
                              "ratio": [round(float(ratio[k]), 4) for k in shells]})
        return found

    table = rows(drift_spectra, "drifted") + rows(truth_spectra, "truth")
    truth_energy = truth_spectra.sum(-1)
    print(f"truth: energy mean {truth_energy.mean():.3f}, range {truth_energy.min():.3f}-{truth_energy.max():.3f}; "
          f"drifted: {len(drift)} states ({int(drifted['step'].max())} steps x {len(drift) // int(drifted['step'].max())} rollouts)")
    print(f"{'':28s}" + " ".join(f"{k:6d}" for k in shells))
    print(f"{'truth E(k)':28s}" + " ".join(f"{float(mean[k]):6.3f}" for k in shells))
    for row in table:
        label = f"{row['states']} E in [{row['energy_low']}, {row['energy_high']}) n={row['count']}"
        print(f"{label:28s}" + " ".join(f"{v:6.2f}" for v in row["ratio"]))
    path = write_results(args.results_name, {
        "output_dir": out.name, "shells": shells, "truth_spectrum": [float(mean[k]) for k in shells],
        "truth_energy_mean": float(truth_energy.mean()), "rows": table, "machine": machine(),
    }, args.results_file)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
