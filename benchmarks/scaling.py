"""Data-parallel scaling on this machine: samples per second of the same model and global batch trained by

* 1 process (AccelerateTrainer), all cores' threads,
* 2 processes, gloo DDP (AccelerateTrainer under torchrun), 1 thread each,
* 2 processes, DeepSpeed ZeRO-2 (DeepSpeedTrainer under torchrun), 1 thread each,
* 1 process DeepSpeedTrainer (ZeRO-2 on one rank), all cores' threads: its step time against AccelerateTrainer's.

Each setting runs the real CLI (`python -m trainers.train` / `torchrun -m trainers.train`) in a fresh output folder;
the rate is the median of the logged `train/samples_per_second` windows after the first (the final evaluation and
export are not timed). Prints the ratios and writes benchmarks/results/scaling.json.

    python benchmarks/scaling.py [--config configs/experiments/dtm_mnist.yaml] [--steps 300] [--global-batch 64]
"""

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from common import write_results

REPO = Path(__file__).resolve().parents[1]

# per task: overrides that keep the final evaluation of a benchmark run short (it is not timed)
EVAL_OVERRIDES = {
    "dtm": ["--evaluation.code_image_model", "null", "--evaluation.num_samples", "16", "--evaluation.mixing_chains", "4",
            "--evaluation.mixing_sweeps", "30"],
    "code_image": ["--evaluation.num_samples_per_class", "2", "--evaluation.grid_samples_per_class", "2"],
}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_setting(name, config, task, nproc, trainer, threads, steps, global_batch, workdir):
    out = Path(workdir) / name
    overrides = [
        "--trainer", trainer, "--training.output_dir", str(out), "--training.disable_progress_bar", "true",
        "--training.max_steps", str(steps), "--training.logging_steps", str(max(steps // 10, 1)),
        "--training.checkpointing_steps", "0", "--training.eval_steps", "0", "--training.report_to", "none",
        "--training.per_device_train_batch_size", str(global_batch // nproc), "--training.num_threads", str(threads),
        *EVAL_OVERRIDES.get(task, []),
    ]
    if task == "code_image":  # one stage is enough to time
        overrides += ["--stages.code_gpt.max_steps", "1"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "trainers.train", config, *overrides]
        if trainer == "deepspeed":  # one rank of a torch.distributed job (DeepSpeed needs the env variables)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "1", "--master_port", str(_free_port()), "-m", "trainers.train", config, *overrides]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(_free_port()), "-m", "trainers.train", config, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "logs" / "log_history.jsonl").read_text().splitlines()]
    rates = [r["train/samples_per_second"] for r in rows if "train/samples_per_second" in r]
    rate = statistics.median(rates[1:] if len(rates) > 2 else rates)
    print(f"{name:<28} {nproc} proc x {threads} thr  {rate:9.1f} samples/s  ({len(rates)} windows)", flush=True)
    return {"name": name, "processes": nproc, "threads_per_process": threads, "trainer": trainer,
            "samples_per_second": rate, "windows": rates}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/experiments/dtm_mnist.yaml")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--global-batch", type=int, default=64)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    args = parser.parse_args()
    import yaml

    task = yaml.safe_load((REPO / args.config).read_text())["task"]
    settings = [
        ("accelerate_1proc", 1, "accelerate", args.cores),
        ("accelerate_ddp_2proc", 2, "accelerate", max(args.cores // 2, 1)),
        ("deepspeed_zero2_2proc", 2, "deepspeed", max(args.cores // 2, 1)),
        ("deepspeed_zero2_1proc", 1, "deepspeed", args.cores),
    ]
    with tempfile.TemporaryDirectory() as workdir:
        rows = {name: run_setting(name, str(REPO / args.config), task, n, trainer, thr, args.steps, args.global_batch, workdir)
                for name, n, trainer, thr in settings}
    rate = {k: v["samples_per_second"] for k, v in rows.items()}
    ratios = {
        "ddp_2proc_over_1proc": rate["accelerate_ddp_2proc"] / rate["accelerate_1proc"],
        "zero2_2proc_over_1proc": rate["deepspeed_zero2_2proc"] / rate["accelerate_1proc"],
        "zero2_2proc_over_ddp_2proc": rate["deepspeed_zero2_2proc"] / rate["accelerate_ddp_2proc"],
        # step time = global batch / rate, so DeepSpeed / Accelerate step time is the inverse rate ratio
        "deepspeed_over_accelerate_step_time_1proc": rate["accelerate_1proc"] / rate["deepspeed_zero2_1proc"],
    }
    for k, v in ratios.items():
        print(f"{k:<44} {v:.3f}")
    result = {"config": args.config, "steps": args.steps, "global_batch": args.global_batch, "cores": args.cores,
              "settings": list(rows.values()), "ratios": ratios}
    out = write_results("scaling", result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
