"""DeepSpeedTrainer: the AccelerateTrainer loop on a ``deepspeed.initialize`` engine (ZeRO 0-3, CPU or GPU).

accelerate only enables DeepSpeed on accelerators (on CPU an accelerate DeepSpeed config silently
leaves every rank training alone on all the data), so this trainer drives DeepSpeed itself:

* ``deepspeed.init_distributed`` with ``gloo`` on CPU, ``nccl`` on GPU; one ``Accelerator`` on the
  same process group only for what the tasks and the parent class use (``is_main_process``,
  ``gather_for_metrics`` on the evaluation loader, trackers, ``main_process_first``);
* the JSON named by ``training.deepspeed_config`` (``configs/deepspeed/zero2.json`` by default),
  whose ``"auto"`` values are filled from the training arguments (batch sizes, accumulation,
  clipping, optimizer and scheduler parameters, bf16/fp16, ZeRO bucket sizes from
  ``model.config.hidden_size``); a concrete JSON value that contradicts the YAML is an error;
* the optimizer (AdamW, decay/no-decay groups) and the ``transformers.get_scheduler`` schedule are
  the AccelerateTrainer's unless the JSON has ``optimizer`` / ``scheduler`` sections;
* training data sharded with a seeded ``DistributedSampler`` (``set_epoch`` each epoch): with the
  same seed a run sees, per optimizer step, the same global batch as a one-process run;
* checkpoints ``checkpoints/<stage>/checkpoint-{step}`` written by ``engine.save_checkpoint`` on
  every rank (plus per-rank RNG states and the usual manifest), resumed with
  ``engine.load_checkpoint``; the final weights are the fp32 master weights gathered from every
  rank (ZeRO-3 included) into a plain model that is saved with ``save_pretrained``.

Launch::

    torchrun --nproc_per_node 2 -m trainers.train CONFIG.yaml --trainer deepspeed
    deepspeed --num_gpus 2 --module trainers.train CONFIG.yaml --trainer deepspeed   # CPU: 2 ranks too

The logged ``train/loss`` (and the other ``train/*`` terms) is the mean over all ranks, i.e. the
loss of the global batch, as in AccelerateTrainer.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import shutil
import socket
import warnings
from pathlib import Path
from typing import Optional

import numpy as np
import torch

if not torch.cuda.is_available():  # say it rather than let deepspeed guess (and warn) on every rank
    os.environ.setdefault("DS_ACCELERATOR", "cpu")

try:
    import deepspeed
    from deepspeed import DeepSpeedEngine
    from deepspeed.utils import safe_get_full_fp32_param
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(f"{err}; install it after torch with: pip install --no-build-isolation 'latentheat[deepspeed]'") from err

from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, send_to_device, set_seed
from torch.utils.data import DataLoader, DistributedSampler
from transformers import get_scheduler

from .accelerate_trainer import AccelerateTrainer, _LogWindow, _SignalFlag, _step_seed, available_trackers
from .arguments import ConfigError, ExperimentConfig, TrainingArguments, resolve_deepspeed_config
from .checkpointing import (
    CheckpointError,
    find_resume_checkpoint,
    prune_checkpoints,
    read_trainer_state,
    write_checkpoint_manifest,
)
from .tasks import build_task
from .tasks.base import Stage, Task


# DeepSpeed 0.19 gathers ZeRO partitions with torch's deprecated all_gather_into_tensor on every step; torch warns
# once per call site and process, which floods the log of a CPU run. The call is DeepSpeed's, not the user's.
warnings.filterwarnings("ignore", message=r".*all_gather_into_tensor.* is deprecated", category=FutureWarning)

logger = get_logger(__name__)

DS_TAG = "deepspeed"  # engine.save_checkpoint(checkpoint-N, tag) -> checkpoint-N/deepspeed/*.pt + latest + zero_to_fp32.py
_ABSENT = object()


# ----------------------------------------------------------------------------------------------
def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b or a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) <= 1e-12 * max(1.0, abs(float(a)), abs(float(b)))
    return a == b


def _get(tree: dict, path: tuple):
    node = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return _ABSENT
        node = node[key]
    return node


def _set(tree: dict, path: tuple, value):
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _autos(tree, prefix=""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _autos(value, f"{prefix}{key}.")
    elif tree == "auto":
        yield prefix[:-1]


def model_hidden_size(model) -> Optional[int]:
    """``model.config.hidden_size`` (the largest of ``hidden_sizes``), or None if the model has neither."""
    config = getattr(model, "config", None)
    size = getattr(config, "hidden_size", None)
    if size is None and getattr(config, "hidden_sizes", None):
        size = max(config.hidden_sizes)
    return int(size) if isinstance(size, (int, float)) and size > 0 else None


def fill_deepspeed_config(raw: dict, args: TrainingArguments, world_size: int, hidden_size: Optional[int] = None, *, where: str = "the DeepSpeed config", on_cpu: bool = False) -> dict:
    """Resolve a DeepSpeed JSON against the training arguments.

    ``"auto"`` is replaced by the value derived from ``args`` (as accelerate's and the HF
    Trainer's DeepSpeed integrations do); batch sizes, accumulation and clipping are added when
    absent so that DeepSpeed and the data loader agree; a concrete value that differs from the
    training arguments raises ``ConfigError`` (set each value once, in the YAML, and keep
    ``"auto"`` in the JSON). ZeRO bucket sizes left at ``"auto"`` on a model without
    ``config.hidden_size`` fall back to DeepSpeed's defaults.
    """
    cfg = copy.deepcopy(raw)
    micro, accum = args.per_device_train_batch_size, args.gradient_accumulation_steps
    # (path in the JSON, value, where it comes from, add when absent)
    rules = [
        (("train_micro_batch_size_per_gpu",), micro, "training.per_device_train_batch_size", True),
        (("gradient_accumulation_steps",), accum, "training.gradient_accumulation_steps", True),
        (("train_batch_size",), micro * accum * world_size, f"per_device_train_batch_size x gradient_accumulation_steps x {world_size} processes", True),
        (("gradient_clipping",), float(args.max_grad_norm or 0.0), "training.max_grad_norm (null = 0.0, no clipping)", True),
        (("bf16", "enabled"), args.mixed_precision == "bf16", f"training.mixed_precision={args.mixed_precision!r}", args.mixed_precision == "bf16"),
        (("fp16", "enabled"), args.mixed_precision == "fp16", f"training.mixed_precision={args.mixed_precision!r}", args.mixed_precision == "fp16"),
    ]
    if "optimizer" in cfg:
        rules += [
            (("optimizer", "params", "lr"), args.learning_rate, "training.learning_rate", True),
            (("optimizer", "params", "betas"), [args.adam_beta1, args.adam_beta2], "training.adam_beta1/adam_beta2", True),
            (("optimizer", "params", "eps"), args.adam_epsilon, "training.adam_epsilon", True),
            (("optimizer", "params", "weight_decay"), args.weight_decay, "training.weight_decay", True),
        ]
    if "scheduler" in cfg:
        rules += [
            (("scheduler", "params", "warmup_num_steps"), args.warmup_steps, "training.warmup_steps", False),
            (("scheduler", "params", "total_num_steps"), args.max_steps, "training.max_steps", False),
            (("scheduler", "params", "warmup_max_lr"), args.learning_rate, "training.learning_rate", False),
            (("scheduler", "params", "warmup_min_lr"), 0.0, "0", False),
        ]
    for path, value, source, add in rules:
        current = _get(cfg, path)
        if current == "auto" or (current is _ABSENT and add):
            _set(cfg, path, value)
        elif current is not _ABSENT and not _same(current, value):
            raise ConfigError(
                f"{where} sets {'.'.join(path)}={current!r} but {source} gives {value!r}: write \"auto\" in the JSON "
                f"and set the value once, in the experiment YAML"
            )
    zero = cfg.get("zero_optimization")
    if isinstance(zero, dict):
        buckets = {"reduce_bucket_size": lambda h: h * h, "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h), "stage3_param_persistence_threshold": lambda h: 10 * h}
        for key, rule in buckets.items():
            if zero.get(key) == "auto":
                if hidden_size is None:
                    del zero[key]  # DeepSpeed's default
                else:
                    zero[key] = rule(hidden_size)
    optimizer = cfg.get("optimizer")
    if on_cpu and isinstance(optimizer, dict) and str(optimizer.get("type", "")).lower() in ("adam", "adamw"):
        # DeepSpeed's FusedAdam is a C++ extension compiled on first use; torch's AdamW needs no build
        optimizer.setdefault("params", {}).setdefault("torch_adam", True)
    left = list(_autos(cfg))
    if left:
        raise ConfigError(f"{where} has \"auto\" values the trainer cannot fill: {', '.join(left)}; give them a value in the JSON")
    return cfg


def load_deepspeed_json(args: TrainingArguments) -> tuple[dict, Path]:
    path = resolve_deepspeed_config(args.deepspeed_config)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"training.deepspeed_config {path} is not valid JSON: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"training.deepspeed_config {path} must hold a JSON object")
    return raw, path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed_distributed():
    """``deepspeed.init_distributed``: gloo on CPU, nccl on GPU; a world of one under plain ``python``."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if not torch.cuda.is_available():
        # DeepSpeed's CPU backend JIT-compiles a shared-memory all-reduce op (minutes on 2 cores) that
        # only inference all-reduce uses; training collectives go through gloo. `__compatible_ops__`
        # is a cached dict that deepspeed consults before building an op.
        import deepspeed.ops

        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo", verbose=False)


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict):
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------
class DeepSpeedTrainer(AccelerateTrainer):
    """Train every stage of a task on a DeepSpeed engine; same Task API, loop, logs and outputs as AccelerateTrainer.

    Example (under ``torchrun --nproc_per_node 2``)::

        cfg = load_config("configs/experiments/code_image_mnist_tiny.yaml", ["--trainer", "deepspeed", "--training.deepspeed_config", "zero3"])
        results = DeepSpeedTrainer(cfg).train()
    """

    def __init__(self, config: ExperimentConfig, task: Optional[Task] = None):
        self.config = config
        args = config.training
        load_deepspeed_json(args)  # a bad JSON fails before the process group starts
        self.task = task or build_task(config)
        from .peft_utils import check_peft

        check_peft(config, self.task)  # base folders and LoRA targets, before the process group starts
        self.output_dir = Path(args.output_dir)
        trackers = available_trackers(args.trackers)
        init_deepspeed_distributed()
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
        # precision is DeepSpeed's (bf16/fp16 sections); the Accelerator shares the process group
        self.accelerator = Accelerator(
            cpu=not torch.cuda.is_available(),
            mixed_precision="no",
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        )
        self.has_trackers = bool(trackers)
        self.signal_flag = _SignalFlag()
        self._engine = None
        self._ema = None
        self.ds_configs: dict = {}  # stage -> the resolved DeepSpeed config

    # ------------------------------------------------------------------------------------------
    @staticmethod
    def _param_groups(model, args: TrainingArguments) -> list[dict]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [
            {"params": [p for p in params if p.ndim >= 2], "weight_decay": args.weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
        ]

    @staticmethod
    def _autocast(model):
        """bf16/fp16 DeepSpeed engines hold low-precision weights: run their forward passes under autocast so
        fp32 inputs (pixels, noise) meet them in the weights' dtype, as accelerate's mixed precision does."""
        if isinstance(model, DeepSpeedEngine) and (model.bfloat16_enabled() or model.fp16_enabled()):
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
            return torch.autocast(device_type, dtype=torch.bfloat16 if model.bfloat16_enabled() else torch.float16)
        return contextlib.nullcontext()

    def train_stage(self, stage: Stage, stage_index: int):
        acc = self.accelerator
        args = self.config.stage_training(stage.name)
        ckpt_root, final_dir, resume, done = self._stage_paths(stage, args)
        if done is not None:
            return done

        raw_ds, ds_path = load_deepspeed_json(args)
        set_seed(args.seed + stage_index)
        with acc.main_process_first():
            train_dataset, eval_dataset = stage.build_datasets(acc)
        collate = stage.collate_fn()
        # seed + epoch permutation, rank r takes every world-th index: per step the global batch equals
        # a one-process run's (accelerate's seedable sampler draws the same permutation)
        sampler = DistributedSampler(train_dataset, num_replicas=acc.num_processes, rank=acc.process_index, shuffle=True, seed=args.seed, drop_last=True)
        train_dl = DataLoader(
            train_dataset,
            batch_size=args.per_device_train_batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
        )
        if len(train_dl) == 0:
            raise ConfigError(
                f"stage {stage.name}: the training set ({len(train_dataset)} items) gives no full batch of "
                f"{args.per_device_train_batch_size} per process on {acc.num_processes} process(es)"
            )

        model = self._build_model(stage, args)
        eval_dl = None
        if eval_dataset is not None:  # accelerate shards it and de-duplicates in gather_for_metrics
            eval_dl = acc.prepare(DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, shuffle=False, collate_fn=collate))
        ds_config = fill_deepspeed_config(raw_ds, args, acc.num_processes, model_hidden_size(model), where=str(ds_path), on_cpu=not torch.cuda.is_available())
        self.ds_configs[stage.name] = ds_config
        zero_stage = int((ds_config.get("zero_optimization") or {}).get("stage", 0))
        if args.use_ema and zero_stage == 3:
            raise ConfigError(f"training.use_ema=true with ZeRO-3 ({ds_path}): EMA needs whole parameters on every rank; use ZeRO-1/2 or turn EMA off")
        optimizer = None if "optimizer" in ds_config else self._build_optimizer(model, args)
        def transformers_schedule(opt):
            return get_scheduler(args.lr_scheduler_type, optimizer=opt, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)

        # a "scheduler" section in the DeepSpeed config is DeepSpeed's own scheduler
        schedule = None if "scheduler" in ds_config else transformers_schedule
        ema = None
        if args.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(model.parameters(), decay=args.ema_decay)
            ema.to(acc.device)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=self._param_groups(model, args) if optimizer is None else None,
            lr_scheduler=schedule,
            config=ds_config,
            dist_init_required=False,
        )
        self._engine, self._ema = engine, ema

        global_step = 0
        if resume is not None:
            path = find_resume_checkpoint(ckpt_root, resume, skip_corrupt=args.skip_corrupt_checkpoints, stage=stage.name)
            if path is not None:
                global_step = self._load_checkpoint(path, engine, ema)
                logger.info(f"stage {stage.name}: resumed from {path} at step {global_step}")

        micro_per_epoch = len(train_dl)
        first_epoch, skip_batches = divmod(global_step * args.gradient_accumulation_steps, micro_per_epoch)
        progress, index_log = self._start_loop(
            stage, stage_index, args, len(train_dataset), engine.train_batch_size(), global_step,
            extra=(f"DeepSpeed config = {ds_path} (ZeRO stage {zero_stage})",),
        )

        engine.train()
        window = _LogWindow()
        micro_step = global_step * args.gradient_accumulation_steps
        stopped = False
        epoch = first_epoch
        try:
            while global_step < args.max_steps and not stopped:
                sampler.set_epoch(epoch)
                active = acc.skip_first_batches(train_dl, skip_batches) if (epoch == first_epoch and skip_batches) else train_dl
                for batch in active:
                    if index_log is not None and "index" in batch:
                        index_log.write(" ".join(str(int(i)) for i in batch["index"].tolist()) + "\n")
                    batch = send_to_device(batch, acc.device)
                    boundary = engine.is_gradient_accumulation_boundary()  # this micro-batch ends an optimizer step
                    gen = torch.Generator(device="cpu").manual_seed(_step_seed(args.seed, stage_index, micro_step, acc.process_index))
                    with self._autocast(engine):
                        out = stage.compute_loss(engine, batch, gen)
                    self._check_finite(out, stage, global_step, ckpt_root)
                    engine.backward(out.loss)  # scales by 1/accumulation like accelerate's backward
                    engine.step()  # on the boundary: reduce, clip, optimizer and scheduler step, zero grads
                    micro_step += 1
                    window.add(out)
                    if not boundary:
                        continue
                    global_step += 1
                    if ema is not None:
                        ema.step(engine.module.parameters())
                    if self._after_optimizer_step(stage, args, global_step, epoch, engine, ema, eval_dl, ckpt_root, progress, window, lambda: engine.get_lr()[0]):
                        stopped = True
                        break
                    if global_step >= args.max_steps:
                        break
                epoch += 1
        finally:
            progress.close()
            if index_log is not None:
                index_log.close()
        if stopped:
            self._release(engine)
            return None

        if eval_dl is not None:
            self._evaluate(stage, engine, eval_dl, global_step, ema)
        unwrapped = self._consolidated_model(stage, engine)
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        self._samples(stage, unwrapped, global_step, None)
        unwrapped = self._save_final(stage, unwrapped, final_dir, ckpt_root, global_step)
        self._release(engine)
        unwrapped.eval()
        return unwrapped

    def _release(self, engine):
        engine.destroy()
        self._engine = self._ema = None
        self.accelerator.free_memory()

    # ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _consolidated_model(self, stage: Stage, engine) -> torch.nn.Module:
        """A plain copy of the model holding the fp32 master weights (gathered from every rank under
        ZeRO-1/2/3). Collective: every rank calls it and gets the copy."""
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
            from .peft_utils import fresh_model

            fresh = fresh_model(stage, self.config.peft)  # a PeftModel under LoRA: same parameter names
        targets = dict(fresh.named_parameters())
        for name, param in engine.module.named_parameters():
            full = safe_get_full_fp32_param(param) if param.requires_grad else None
            if full is None and hasattr(param, "ds_id"):  # ZeRO-3 parameter outside the optimizer (frozen)
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    full = param.detach().clone()
            if full is None:  # no ZeRO partition (stage 0): the module holds the weights
                full = param.detach()
            target = targets[name]
            target.copy_(full.reshape(target.shape).to(device=target.device, dtype=target.dtype))
        buffers = dict(fresh.named_buffers())
        for name, buffer in engine.module.named_buffers():
            if name in buffers:
                buffers[name].copy_(buffer.to(device=buffers[name].device, dtype=buffers[name].dtype))
        return fresh.to(self.accelerator.device)

    def _evaluate(self, stage: Stage, model, eval_dl, step: int, ema):
        with self._autocast(model):
            return super()._evaluate(stage, model, eval_dl, step, ema)

    def _samples(self, stage: Stage, model, step: int, ema):
        if isinstance(model, DeepSpeedEngine) and model.zero_optimization_partition_weights():
            # ZeRO-3: sampling runs on the main process only, so it needs whole weights, not shards
            model = self._consolidated_model(stage, model)
        with self._autocast(model):
            super()._samples(stage, model, step, ema)

    # ------------------------------------------------------------------------------------------
    def _save_checkpoint(self, root: Path, step: int, stage: Stage, args: TrainingArguments, epoch: int):
        """``engine.save_checkpoint`` on every rank into a hidden folder, then the manifest, then the rename."""
        acc, engine = self.accelerator, self._engine
        final = root / f"checkpoint-{step}"
        tmp = root / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if args.save_total_limit is not None:
                prune_checkpoints(root, keep=args.save_total_limit - 1)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        client_state = {"latentheat_ema": self._ema.state_dict()} if self._ema is not None else {}
        engine.save_checkpoint(str(tmp), tag=DS_TAG, client_state=client_state)
        torch.save(_rng_state(), tmp / f"rng_state_{acc.process_index}.pth")
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "global_step": step,
                "epoch": epoch,
                "stage": stage.name,
                "training": dataclasses.asdict(args),
                "experiment": self.config.to_dict(),
                "num_processes": acc.num_processes,
                "trainer": "deepspeed",
                "deepspeed_config": self.ds_configs.get(stage.name),
            }
            write_checkpoint_manifest(tmp, state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            logger.info(f"saved {final}")
        acc.wait_for_everyone()

    def _load_checkpoint(self, path: Path, engine, ema) -> int:
        acc = self.accelerator
        state = read_trainer_state(path)
        if state.get("trainer") != "deepspeed" or not (path / DS_TAG).is_dir():
            raise CheckpointError(f"checkpoint {path} was not written by the DeepSpeed trainer; resume it with the trainer that wrote it")
        if state.get("num_processes") != acc.num_processes:
            raise CheckpointError(
                f"checkpoint {path} holds ZeRO shards of {state.get('num_processes')} process(es) but this run has "
                f"{acc.num_processes}; resume with the same number of processes (or export fp32 weights with {path}/zero_to_fp32.py)"
            )
        load_path, client_state = engine.load_checkpoint(str(path), tag=DS_TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load checkpoint {path}")
        if ema is not None:
            if "latentheat_ema" not in (client_state or {}):
                raise CheckpointError(f"checkpoint {path} has no EMA state but training.use_ema=true")
            ema.load_state_dict(client_state["latentheat_ema"])
        rng = path / f"rng_state_{acc.process_index}.pth"
        if rng.is_file():
            _set_rng_state(torch.load(rng, weights_only=False))
        return int(state["global_step"])
