"""AccelerateTrainer step time against a bare torch loop on the same model and batches.

Both train the demo-size CodeGPT on the same fixed code sequences with the same DataLoader
settings, AdamW, cosine schedule and clipping; the first half of the steps is warm-up, the
second half is timed. Prints trainer time per step / bare time per step (aim: <= 1.05) and
writes benchmarks/results/trainer_overhead.json.

    python benchmarks/trainer_overhead.py [--steps 120] [--batch 16]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from transformers import get_scheduler

from common import write_results
from hf_models.code_gpt import CodeGPTConfig, CodeGPTForCausalLM
from trainers.accelerate_trainer import AccelerateTrainer
from trainers.arguments import build_config
from trainers.tasks.base import Stage, StepOutput, Task


class Sequences(Dataset):
    def __init__(self, ids):
        self.ids = ids

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i]}


def make_model(config):
    torch.manual_seed(0)
    return CodeGPTForCausalLM(config)


class BenchStage(Stage):
    name = "code_gpt"
    throughput_unit = "tokens"

    def __init__(self, task, config, data):
        super().__init__(task)
        self.model_config, self.data = config, data

    def build_model(self):
        return make_model(self.model_config)

    def build_datasets(self, accelerator):
        return self.data, None

    def compute_loss(self, model, batch, generator):
        ids = batch["input_ids"]
        return StepOutput(loss=model(input_ids=ids, labels=ids).loss, num_items=ids.numel())


class BenchTask(Task):
    name = family = "bench"

    def __init__(self, config, stage_args):
        super().__init__(config)
        self._stages = [BenchStage(self, *stage_args)]

    def stages(self):
        return self._stages


def bare_loop(config, data, args):
    model = make_model(config).train()
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": 0.0}, {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups, lr=1e-3)
    sched = get_scheduler("cosine", optimizer=opt, num_warmup_steps=0, num_training_steps=args.steps)
    loader = DataLoader(data, batch_size=args.batch, shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(0))
    step, start = 0, None
    while step < args.steps:
        for batch in loader:
            if step == args.steps // 2:
                start = time.perf_counter()
            ids = batch["input_ids"]
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            loss.item()
            step += 1
            if step >= args.steps:
                break
    return (time.perf_counter() - start) / (args.steps - args.steps // 2)


def trainer_loop(config, data, args):
    with tempfile.TemporaryDirectory() as tmp:
        half = args.steps // 2
        cfg = build_config({
            "task": "bench",
            "training": {"output_dir": tmp, "max_steps": args.steps, "per_device_train_batch_size": args.batch, "learning_rate": 1e-3,
                         "lr_scheduler_type": "cosine", "logging_steps": half, "checkpointing_steps": 0, "report_to": "none",
                         "disable_progress_bar": True, "weight_decay": 0.0, "num_threads": args.threads},
        })
        trainer = AccelerateTrainer(cfg, task=BenchTask(cfg, (config, data)))
        trainer.train_stage(trainer.task.stages()[0], 0)
        rows = [json.loads(l) for l in (Path(tmp) / "logs" / "log_history.jsonl").read_text().splitlines()]
        tokens_per_second = rows[-1]["train/tokens_per_second"]
    return args.batch * data.ids.shape[1] / tokens_per_second


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads; 1 is robust on a shared 2-core machine")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    config = CodeGPTConfig(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
                           max_position_embeddings=64, codebook_size=256, num_classes=10, num_codes=49)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 256, (4096, 52), generator=g)
    data = Sequences(ids)
    bare, trainer = [], []
    for _ in range(args.rounds):  # interleave to spread machine noise over both
        bare.append(bare_loop(config, data, args))
        trainer.append(trainer_loop(config, data, args))
    bare_s, trainer_s = min(bare), min(trainer)  # the least-disturbed round of each
    ratio = trainer_s / bare_s
    result = {
        "benchmark": "trainer_overhead",
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "dtype": "float32",
        "batch": args.batch,
        "timed_steps": args.steps - args.steps // 2,
        "bare_seconds_per_step": bare_s,
        "trainer_seconds_per_step": trainer_s,
        "bare_rounds": bare,
        "trainer_rounds": trainer,
        "ratio_trainer_over_bare": ratio,
    }
    write_results("trainer_overhead", result)
    print(f"bare torch loop: {bare_s * 1000:.1f} ms/step, AccelerateTrainer: {trainer_s * 1000:.1f} ms/step; ratio trainer / bare: {ratio:.3f} (aim <= 1.05)")


if __name__ == "__main__":
    main()
