"""DeepSpeedTrainer on CPU (gloo): real 2-rank ZeRO training under torchrun.

* ZeRO-2 trains the tiny code-image system end to end through the CLI and writes a loadable pipeline.
* Equivalence: a toy regression task (below; fp32, no dropout, same seed) trained by a one-process
  AccelerateTrainer with a global batch of 16 and by 2-rank DeepSpeed ZeRO-1 (8 per rank), ZeRO-2
  (4 per rank x 2 accumulation steps), ZeRO-3 and ZeRO-3 with CPU offload and a JSON-defined optimizer
  (8 per rank): the same global batches, so the same loss curve, learning rates and final weights up to
  float32 summation order (tolerances below).
* Resume: ZeRO-2 (with EMA) and ZeRO-3 runs rolled back to their step-4 checkpoints continue the same curve.

Run as a script this file trains the toy task (the tests start it with ``torchrun``)::

    torchrun --nproc_per_node 2 tests/trainers/test_deepspeed.py OUT deepspeed
    python tests/trainers/test_deepspeed.py OUT accelerate
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "code_image_mnist_tiny.yaml")

# float32, different summation order (a mean over 16 samples vs the mean of per-rank / per-micro-batch means, then
# gloo's all-reduce of the gradients): measured over the 8 steps, DeepSpeed ZeRO-1/2/3 differ from the one-process
# run by at most 1.4e-7 relative on the loss and 1.2e-7 absolute on the final weights; the learning rates agree
# exactly. The bounds leave ~70x headroom and stay far below a one-step or one-batch slip (>1e-2 on this curve).
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-5
TOY_STEPS = 8

pytestmark = [
    pytest.mark.distributed,
    pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="deepspeed is not installed (make install adds it; pip install --no-build-isolation 'latentheat[deepspeed]')"),
]


# ---------------------------------------------------------------------------------------------- toy system
def _toy_classes():
    import torch
    from transformers import PretrainedConfig, PreTrainedModel
    from transformers.utils import ModelOutput

    from trainers.tasks.base import Stage, StepOutput, Task

    class ToyConfig(PretrainedConfig):
        model_type = "latentheat_toy"

        def __init__(self, input_size=8, hidden_size=32, **kwargs):
            super().__init__(**kwargs)
            self.input_size, self.hidden_size = input_size, hidden_size

    class ToyModel(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.inp = torch.nn.Linear(config.input_size, config.hidden_size)
            self.norm = torch.nn.LayerNorm(config.hidden_size)
            self.out = torch.nn.Linear(config.hidden_size, 1)
            self.post_init()

        def forward(self, x, labels=None):
            pred = self.out(torch.tanh(self.norm(self.inp(x)))).squeeze(-1)
            loss = torch.nn.functional.mse_loss(pred, labels) if labels is not None else None
            return ModelOutput(loss=loss, pred=pred)

    class ToyDataset(torch.utils.data.Dataset):
        def __init__(self, x, y):
            self.x, self.y = x, y

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return {"x": self.x[i], "y": self.y[i], "index": i}

    class ToyStage(Stage):
        name = "toy"

        def build_model(self):
            return ToyModel(ToyConfig())

        def build_datasets(self, accelerator):
            g = torch.Generator().manual_seed(1234)
            x = torch.randn(256, 8, generator=g)
            y = torch.sin(x @ torch.randn(8, generator=g)) + 0.1 * x[:, 0] ** 2
            return ToyDataset(x[:192], y[:192]), ToyDataset(x[192:], y[192:])

        def compute_loss(self, model, batch, generator):
            out = model(batch["x"], labels=batch["y"])
            return StepOutput(loss=out.loss, logs={"pred_mean": out.pred.detach().mean().item()}, num_items=len(batch["x"]))

        @torch.no_grad()
        def evaluate(self, model, dataloader, accelerator):
            err, n = 0.0, 0
            for batch in dataloader:
                sq = accelerator.gather_for_metrics((model(batch["x"]).pred - batch["y"]) ** 2)
                err, n = err + sq.sum().item(), n + sq.numel()
            return {"mse": err / n, "count": n}

        def load(self, directory):
            return ToyModel.from_pretrained(directory)

    class ToyTask(Task):
        name = "toy"
        family = "code_image"  # any shipped card template

        def stages(self):
            return [ToyStage(self)]

        def finalize(self, accelerator, models):
            accelerator.wait_for_everyone()
            return {"num_parameters": sum(p.numel() for p in models["toy"].parameters())}

    return ToyTask, ToyModel


TOY_RUNS = {
    # name: (trainer, deepspeed_config, per-device batch, accumulation, extra training keys)
    "accelerate": ("accelerate", "zero2", 16, 1, {}),
    "zero1": ("deepspeed", "zero1", 8, 1, {}),
    "zero2": ("deepspeed", "zero2", 4, 2, {"checkpointing_steps": 2, "save_total_limit": 2, "use_ema": True, "ema_decay": 0.9}),
    "zero3": ("deepspeed", "zero3", 8, 1, {"checkpointing_steps": 4}),
    # the JSON defines the optimizer (DeepSpeed builds it from the decay/no-decay groups; torch AdamW on CPU)
    "zero3_offload": ("deepspeed", "zero3_offload", 8, 1, {}),
}
ROLLED_BACK = {"zero2": ["checkpoint-6"], "zero3": []}  # resume both from checkpoint-4


def _toy_config(out: Path, name: str, **extra):
    from trainers.arguments import build_config

    trainer, ds, batch, accum, keys = TOY_RUNS[name]
    training = {
        "output_dir": str(out / name), "seed": 0, "max_steps": TOY_STEPS, "per_device_train_batch_size": batch,
        "gradient_accumulation_steps": accum, "per_device_eval_batch_size": 16, "learning_rate": 1e-2,
        "weight_decay": 0.01, "max_grad_norm": 0.5, "lr_scheduler_type": "cosine", "warmup_steps": 2,
        "logging_steps": 1, "checkpointing_steps": 0, "report_to": "none", "disable_progress_bar": True,
        "deepspeed_config": ds, **keys, **extra,
    }
    return build_config({"task": "toy", "trainer": trainer, "training": training})


def _train_toy(config):
    ToyTask, _ = _toy_classes()
    if config.trainer == "deepspeed":
        from trainers.deepspeed_trainer import DeepSpeedTrainer as Trainer
    else:
        from trainers.accelerate_trainer import AccelerateTrainer as Trainer
    return Trainer(config, task=ToyTask(config)).train()


def toy_main(out: Path, which: str):
    if which == "accelerate":
        _train_toy(_toy_config(out, "accelerate"))
        return
    import torch.distributed as dist

    for name in ("zero1", "zero2", "zero3", "zero3_offload"):
        _train_toy(_toy_config(out, name))
    # roll the ZeRO-2 and ZeRO-3 runs back to their step-4 checkpoints and resume them
    for name, newer in ROLLED_BACK.items():
        resumed = out / f"{name}_resumed"
        if int(os.environ.get("RANK", "0")) == 0:
            shutil.copytree(out / name, resumed)
            for path in [resumed / "toy", resumed / "logs", *(resumed / "checkpoints" / "toy" / c for c in newer)]:
                shutil.rmtree(path)
            (resumed / "checkpoints" / "toy" / "stage_complete.json").unlink()
        dist.barrier()
        _train_toy(_toy_config(out, name, output_dir=str(resumed), resume_from_checkpoint="latest"))


# ---------------------------------------------------------------------------------------------- helpers
def _env():
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath}


def _torchrun(*args, timeout=400):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port()), *args]
    return _run(cmd, timeout)


def _run(cmd, timeout=400):
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env())
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-8000:]}")
    return time.perf_counter() - start


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def history(run: Path, stage: str, key="train/loss"):
    rows = [json.loads(line) for line in (run / "logs" / "log_history.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and key in r]


def _weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="session")
def toy_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ds_toy")
    seconds = {
        "accelerate": _run([sys.executable, str(Path(__file__).resolve()), str(out), "accelerate"]),
        "deepspeed": _torchrun(str(Path(__file__).resolve()), str(out), "deepspeed"),
    }
    print(f"toy runs: {seconds}")
    return out


# ---------------------------------------------------------------------------------------------- tests
def test_fill_deepspeed_config_fills_auto_and_rejects_contradictions():
    from trainers.arguments import ConfigError, TrainingArguments, resolve_deepspeed_config
    from trainers.deepspeed_trainer import fill_deepspeed_config

    args = TrainingArguments(per_device_train_batch_size=4, gradient_accumulation_steps=3, max_grad_norm=None, learning_rate=2e-4, weight_decay=0.1, mixed_precision="bf16")
    raw = json.loads(resolve_deepspeed_config("zero3").read_text())
    raw["optimizer"] = {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto", "weight_decay": "auto"}}
    cfg = fill_deepspeed_config(raw, args, world_size=2, hidden_size=64, on_cpu=True)
    assert (cfg["train_micro_batch_size_per_gpu"], cfg["gradient_accumulation_steps"], cfg["train_batch_size"]) == (4, 3, 24)
    assert cfg["gradient_clipping"] == 0.0 and cfg["bf16"]["enabled"] is True and cfg["fp16"]["enabled"] is False
    assert cfg["optimizer"]["params"] == {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True}
    zero = cfg["zero_optimization"]
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"], zero["stage3_param_persistence_threshold"]) == (4096, 3686, 640)
    assert "auto" not in json.dumps(cfg)
    # no hidden size: the bucket keys fall back to DeepSpeed's defaults
    assert "reduce_bucket_size" not in fill_deepspeed_config(raw, args, world_size=2)["zero_optimization"]
    with pytest.raises(ConfigError, match="gradient_accumulation_steps=8 but training.gradient_accumulation_steps gives 3"):
        fill_deepspeed_config({**raw, "gradient_accumulation_steps": 8}, args, world_size=2)
    with pytest.raises(ConfigError, match="foo.bar"):
        fill_deepspeed_config({**raw, "foo": {"bar": "auto"}}, args, world_size=2)
    with pytest.raises(ConfigError, match="zero1.json, zero2.json, zero3.json"):
        resolve_deepspeed_config("zero9")
    # every shipped JSON resolves completely from the defaults
    shipped = sorted(resolve_deepspeed_config("zero2").parent.glob("*.json"))
    assert [p.stem for p in shipped] == ["zero1", "zero2", "zero3", "zero3_offload"]
    for path in shipped:
        assert "auto" not in json.dumps(fill_deepspeed_config(json.loads(path.read_text()), TrainingArguments(), world_size=2, hidden_size=32))


def test_unknown_deepspeed_config_fails_before_launch():
    from trainers.arguments import ConfigError, load_config

    with pytest.raises(ConfigError, match="training.deepspeed_config='nope.json' is not a file"):
        load_config(TINY, ["--trainer", "deepspeed", "--training.deepspeed_config", "nope.json"])
    assert load_config(TINY, ["--training.deepspeed_config", "nope.json"]).trainer == "accelerate"  # only checked for deepspeed


def test_zero2_torchrun_trains_code_image_and_writes_a_loadable_pipeline(tmp_path):
    import torch

    from trainers.checkpointing import verify_checkpoint

    out = tmp_path / "ds"
    _torchrun(
        "-m", "trainers.train", TINY, "--trainer", "deepspeed", "--training.output_dir", str(out),
        "--training.disable_progress_bar", "true", "--stages.vq_tokenizer.max_steps", "6", "--stages.code_gpt.max_steps", "6",
        "--training.logging_steps", "1", "--training.checkpointing_steps", "3", "--training.record_data_indices", "true",
        "--data.max_train_samples", "512", "--data.max_eval_samples", "128",
        "--evaluation.num_samples_per_class", "2", "--evaluation.grid_samples_per_class", "2",
    )
    for name in ("model_index.json", "README.md", "eval_results.json", "samples.png", "config.yaml", "vq_tokenizer/model.safetensors", "code_gpt/model.safetensors"):
        assert (out / name).is_file(), name
    assert json.loads((out / "eval_results.json").read_text())["bits_per_code"] > 0
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    for stage, unit in (("vq_tokenizer", "samples"), ("code_gpt", "tokens")):
        rows = history(out, stage)
        assert [r["step"] for r in rows] == list(range(1, 7))
        assert {"train/loss", "train/lr", f"train/{unit}_per_second"} <= set(rows[0])
        # ZeRO-2 over 2 ranks: each rank wrote its own optimizer shard into the verified checkpoint
        ckpt = out / "checkpoints" / stage / "checkpoint-3"
        state = verify_checkpoint(ckpt)
        assert state["num_processes"] == 2 and state["deepspeed_config"]["zero_optimization"]["stage"] == 2
        assert {p.name for p in (ckpt / "deepspeed").glob("*optim_states.pt")} == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    # the two ranks trained on disjoint halves of each global batch
    seen = [set((out / "logs" / f"data_indices_vq_tokenizer_rank{r}.txt").read_text().split()) for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 6 * 32 and not seen[0] & seen[1]

    from hf_models.pipelines import CodeImagePipeline

    pipe = CodeImagePipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(class_labels=[1, 7], generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 28, 28) and torch.isfinite(images).all()


@pytest.mark.slow
def test_deepspeed_launcher_runs_zero3_on_cpu(tmp_path):
    """`deepspeed --num_gpus 2 --module trainers.train ...`: the launcher counts CPU 'devices' and appends --local_rank."""
    out = tmp_path / "launcher"
    _run([
        str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(_free_port()), "--module", "trainers.train", TINY,
        "--trainer", "deepspeed", "--training.deepspeed_config", "zero3", "--training.output_dir", str(out), "--training.disable_progress_bar", "true",
        "--stages.vq_tokenizer.max_steps", "2", "--stages.code_gpt.max_steps", "2", "--training.checkpointing_steps", "0", "--training.report_to", "none",
        "--data.max_train_samples", "256", "--data.max_eval_samples", "128", "--evaluation.num_samples_per_class", "2", "--evaluation.grid_samples_per_class", "2",
    ])
    assert (out / "model_index.json").is_file() and (out / "code_gpt" / "model.safetensors").is_file()
    assert [r["step"] for r in history(out, "code_gpt")] == [2]


@pytest.mark.parametrize("name", ["zero1", "zero2", "zero3", "zero3_offload"])
def test_deepspeed_matches_one_process_accelerate(toy_runs, name):
    ref, run = history(toy_runs / "accelerate", "toy"), history(toy_runs / name, "toy")
    assert [r["step"] for r in run] == [r["step"] for r in ref] == list(range(1, TOY_STEPS + 1))
    for a, b in zip(run, ref):
        assert a["train/lr"] == pytest.approx(b["train/lr"], rel=1e-12)
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=LOSS_RTOL), (name, a, b)
        assert a["train/pred_mean"] == pytest.approx(b["train/pred_mean"], rel=LOSS_RTOL, abs=1e-6)
    # the curve moved: these tolerances would catch a one-step or one-batch slip
    losses = [r["train/loss"] for r in ref]
    assert min(abs(x - y) / abs(y) for x, y in zip(losses[1:], losses[:-1])) > 100 * LOSS_RTOL
    evals = [history(toy_runs / n, "toy", "eval/mse")[-1] for n in ("accelerate", name)]
    assert evals[0]["eval/count"] == evals[1]["eval/count"] == 64  # sharded eval, gathered without duplicates
    if name != "zero2":  # zero2 evaluates and exports its EMA weights (checked by the resume test)
        assert evals[1]["eval/mse"] == pytest.approx(evals[0]["eval/mse"], rel=LOSS_RTOL)
        want, got = _weights(toy_runs / "accelerate" / "toy"), _weights(toy_runs / name / "toy")
        assert want.keys() == got.keys()
        for key in want:
            assert got[key].dtype == want[key].dtype and (got[key] - want[key]).abs().max().item() <= WEIGHT_ATOL, key


@pytest.mark.parametrize("name", ["zero2", "zero3"])
def test_deepspeed_resume_continues_the_same_curve(toy_runs, name):
    from trainers.checkpointing import list_checkpoints, verify_checkpoint

    straight, resumed = toy_runs / name, toy_runs / f"{name}_resumed"
    # zero2 saves every 2 steps with save_total_limit=2: checkpoint-2 was pruned; each kept one passes its manifest
    kept = {"zero2": ["checkpoint-4", "checkpoint-6"], "zero3": ["checkpoint-4"]}[name]
    assert [p.name for p in list_checkpoints(straight / "checkpoints" / "toy")] == kept
    ckpt = straight / "checkpoints" / "toy" / "checkpoint-4"
    assert verify_checkpoint(ckpt)["global_step"] == 4
    assert {"rng_state_0.pth", "rng_state_1.pth", "zero_to_fp32.py", "latest"} <= {p.name for p in ckpt.iterdir()}
    after, before = history(resumed, "toy"), history(straight, "toy")
    assert [r["step"] for r in after] == list(range(5, TOY_STEPS + 1))
    for a, b in zip(after, before[4:]):
        assert a["train/loss"] == pytest.approx(b["train/loss"], rel=1e-6, abs=1e-7), (a, b)
        assert a["train/lr"] == pytest.approx(b["train/lr"], rel=1e-12)
    # the same final weights (zero2: EMA weights): optimizer, scheduler, EMA and data position were restored
    want, got = _weights(straight / "toy"), _weights(resumed / "toy")
    for key in want:
        assert (got[key] - want[key]).abs().max().item() <= 1e-6, key


def test_accelerate_example_configs_parse():
    """The GPU examples in configs/accelerate load with accelerate's own parser and name shipped JSONs."""
    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for path in sorted((REPO / "configs" / "accelerate").glob("*.yaml")):
        config = load_config_from_file(str(path))
        kinds[path.stem] = str(config.distributed_type).rsplit(".", 1)[-1]
        ds_file = (config.deepspeed_config or {}).get("deepspeed_config_file")
        if ds_file:
            assert "auto" in (REPO / ds_file).read_text(), ds_file
    assert {"single_gpu": "NO", "multi_gpu": "MULTI_GPU", "deepspeed_zero2": "DEEPSPEED", "deepspeed_zero3": "DEEPSPEED", "fsdp": "FSDP"}.items() <= kinds.items()


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    toy_main(Path(sys.argv[1]), sys.argv[2])
