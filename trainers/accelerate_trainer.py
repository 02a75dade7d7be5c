"""AccelerateTrainer: one training loop for every latentheat system, on any accelerate config.

Follows diffusers' training examples and accelerate's ``by_feature`` scripts: one ``Accelerator``,
``prepare``, ``accumulate``, clipping and EMA on ``sync_gradients``, ``checkpoint-{step}`` folders
written with ``save_state`` and resumed with ``load_state`` + ``skip_first_batches``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Optional

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from .arguments import ConfigError, ExperimentConfig, TrainingArguments
from .checkpointing import (
    CheckpointError,
    find_resume_checkpoint,
    mark_stage_complete,
    prune_checkpoints,
    read_trainer_state,
    stage_is_complete,
    write_checkpoint_manifest,
)
from .tasks import build_task
from .tasks.base import Stage, Task

logger = get_logger(__name__)


class TrainingStopped(RuntimeError):
    """Raised when training cannot go on (e.g. a non-finite loss). The last good checkpoint is kept."""


def _step_seed(*parts: int) -> int:
    digest = hashlib.sha256(",".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, name + "/"))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


def available_trackers(requested: list[str]) -> list[str]:
    """Check the requested trackers are installed; unknown names and missing packages are errors."""
    import importlib.util

    packages = {"tensorboard": "tensorboard", "mlflow": "mlflow", "wandb": "wandb", "trackio": "trackio", "comet_ml": "comet_ml", "aim": "aim", "clearml": "clearml", "dvclive": "dvclive"}
    if requested == ["all"]:
        return [name for name, pkg in packages.items() if importlib.util.find_spec(pkg) is not None]
    out = []
    for name in requested:
        if name not in packages:
            raise ConfigError(f"training.report_to has unknown tracker {name!r}; allowed: {', '.join(packages)}, all, none")
        if importlib.util.find_spec(packages[name]) is None:
            raise ConfigError(f"training.report_to asks for {name!r} but the package '{packages[name]}' is not installed (pip install 'latentheat[trackers]')")
        out.append(name)
    return out


def use_cpu_backend() -> bool:
    """Run gloo DDP on CPU when several processes were launched on a machine without CUDA.

    accelerate only picks its MULTI_CPU mode when told ``cpu=True``; a ``torchrun`` or
    ``accelerate launch --multi_gpu`` start on a CPU-only machine would otherwise leave every
    rank training alone on all the data.
    """
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    world = int(os.environ.get("WORLD_SIZE", "1"))
    return world > 1 and not torch.cuda.is_available()


class _LogWindow:
    """Sums of the micro-batch losses, logged terms and items since the last logging step."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss, self.items, self.steps, self.terms, self.start = 0.0, 0, 0, {}, time.perf_counter()

    def add(self, out):
        self.loss += out.loss.detach().float().item()
        self.items += out.num_items
        self.steps += 1
        for key, value in out.logs.items():
            self.terms[key] = self.terms.get(key, 0.0) + float(value)


class _Terminated(Exception):
    """SIGTERM after the last stage finished training (during the final export and evaluation)."""


class _SignalFlag:
    """Remembers SIGTERM so the loop can checkpoint at the next step boundary and exit cleanly. Once every stage is
    trained (``interrupt`` set), there is no step boundary left to wait for: SIGTERM then stops the export and
    evaluation at once (every stage is already saved)."""

    def __init__(self):
        self.received = False
        self.interrupt = False
        self._previous = None

    def install(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not in the main thread
            self._previous = None

    def _handle(self, signum, frame):
        self.received = True
        if self.interrupt:
            raise _Terminated()

    def restore(self):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


class AccelerateTrainer:
    """Train every stage of a task with 🤗 Accelerate, then export the pipeline and its card.

    Example::

        from trainers.arguments import load_config
        from trainers.accelerate_trainer import AccelerateTrainer
        cfg = load_config("configs/experiments/code_image_mnist_tiny.yaml", ["--training.output_dir", "outputs/tiny"])
        results = AccelerateTrainer(cfg).train()
    """

    def __init__(self, config: ExperimentConfig, task: Optional[Task] = None):
        self.config = config
        self.task = task or build_task(config)
        args = config.training
        self.output_dir = Path(args.output_dir)
        trackers = available_trackers(args.trackers)
        from .peft_utils import check_peft

        check_peft(config, self.task)  # base folders and LoRA targets, before any training
        self.accelerator = Accelerator(
            cpu=use_cpu_backend(),
            mixed_precision=args.mixed_precision,
            log_with=trackers or None,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir), logging_dir=str(self.output_dir / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        )
        self.has_trackers = bool(trackers)
        if "mlflow" in trackers and not os.environ.get("MLFLOW_TRACKING_URI"):
            # mlflow 3 refuses its file store; keep runs next to the TensorBoard logs in a local SQLite file
            (self.output_dir / "logs").mkdir(parents=True, exist_ok=True)
            os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{(self.output_dir / 'logs' / 'mlflow.db').resolve()}"
        self.signal_flag = _SignalFlag()

    # ------------------------------------------------------------------------------------------
    def train(self) -> dict:
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            import yaml

            # the resolved config from the start, as transformers' Trainer saves its arguments: a run stopped before
            # its end (SIGTERM during the final evaluation, a killed job) still names its settings for
            # trainers.evaluate and the benchmarks
            (self.output_dir / "config.yaml").write_text(yaml.safe_dump(self.config.to_dict(), sort_keys=False))
        acc.wait_for_everyone()
        if self.has_trackers:
            acc.init_trackers(self.task.name, config=_flatten(self.config.to_dict()))
        self.signal_flag.install()
        models = {}
        try:
            for index, stage in enumerate(self.task.stages()):
                model = self.train_stage(stage, index)
                if model is None:  # stopped by SIGTERM after a checkpoint
                    return {"stopped": True}
                models[stage.name] = model
            self.signal_flag.interrupt = True
            try:
                results = self.task.finalize(acc, models)
            except _Terminated:
                logger.warning("SIGTERM during the final export/evaluation: stopped there. Every stage is trained and "
                               "saved; --training.resume_from_checkpoint latest re-runs only the export and evaluation")
                return {"stopped": True, "stopped_in": "finalize"}
            if acc.is_main_process:
                self._write_run_files(results)
            acc.wait_for_everyone()
            if self.config.hub.push and acc.is_main_process:
                from .hub import push_to_hub

                hub = self.config.hub
                push_to_hub(self.output_dir, hub.repo_id, private=hub.private, token=hub.token, commit_message=hub.commit_message)
            return results
        finally:
            self.signal_flag.restore()
            if self.has_trackers:
                acc.end_training()

    def _write_run_files(self, results: dict):
        (self.output_dir / "eval_results.json").write_text(json.dumps(results, indent=2, sort_keys=True) + "\n")
        from .hub import write_model_card

        write_model_card(self.output_dir, self.task.family, eval_results=results, config=self.config.to_dict())

    # ------------------------------------------------------------------------------------------
    def _build_optimizer(self, model, args: TrainingArguments):
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)

    def _any_process(self, *flags: bool) -> list[bool]:
        """OR each flag over all processes (one small all-reduce) so every rank takes the same branch."""
        values = torch.tensor([1.0 if f else 0.0 for f in flags], device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        return [bool(v > 0) for v in values.tolist()]

    def _stage_paths(self, stage: Stage, args: TrainingArguments):
        """``(checkpoint root, final folder, resume, loaded model or None)`` of a stage. A stage already
        complete under ``resume_from_checkpoint`` is loaded instead of trained; a fresh run clears the
        stage's old checkpoints so it never mixes with an earlier run's."""
        ckpt_root = self.output_dir / "checkpoints" / stage.name
        final_dir = self.output_dir / stage.name
        resume = args.resume_from_checkpoint
        if resume is not None and stage_is_complete(ckpt_root, final_dir):
            logger.info(f"stage {stage.name}: already complete in {final_dir}, loading it")
            return ckpt_root, final_dir, resume, stage.load(str(final_dir))
        if resume is None and self.accelerator.is_main_process:
            shutil.rmtree(ckpt_root, ignore_errors=True)
        return ckpt_root, final_dir, resume, None

    def _build_model(self, stage: Stage, args: TrainingArguments):
        model = stage.build_model()
        if self.config.peft.enabled:  # LoRA: the experiment's architecture with the base run's weights
            from .peft_utils import load_stage_base

            model = load_stage_base(stage, model, self.config.peft, len(self.task.stages()))
        if args.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise ConfigError(f"training.gradient_checkpointing=true but {type(model).__name__} does not support it")
            model.gradient_checkpointing_enable()
        if self.config.peft.enabled:
            from .peft_utils import apply_lora

            model = apply_lora(stage, model, self.config.peft)
        return model

    def train_stage(self, stage: Stage, stage_index: int):
        acc = self.accelerator
        args = self.config.stage_training(stage.name)
        ckpt_root, final_dir, resume, done = self._stage_paths(stage, args)
        if done is not None:
            return done

        set_seed(args.seed + stage_index)
        acc.gradient_accumulation_steps = args.gradient_accumulation_steps
        with acc.main_process_first():
            train_dataset, eval_dataset = stage.build_datasets(acc)
        collate = stage.collate_fn()
        train_dl = DataLoader(
            train_dataset,
            batch_size=args.per_device_train_batch_size,
            shuffle=True,
            drop_last=True,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
            # its own generator: creating an iterator must not draw from the global RNG, or a resumed
            # run (which creates one more iterator after load_state) would drift from an uninterrupted one
            generator=torch.Generator().manual_seed(args.seed),
        )
        eval_dl = None
        if eval_dataset is not None:
            eval_dl = DataLoader(eval_dataset, batch_size=args.per_device_eval_batch_size, shuffle=False, collate_fn=collate)

        model = self._build_model(stage, args)
        optimizer = self._build_optimizer(model, args)
        lr_scheduler = get_scheduler(args.lr_scheduler_type, optimizer=optimizer, num_warmup_steps=args.warmup_steps, num_training_steps=args.max_steps)
        ema = None
        if args.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(model.parameters(), decay=args.ema_decay)
        if eval_dl is not None:
            model, optimizer, train_dl, eval_dl = acc.prepare(model, optimizer, train_dl, eval_dl)
        else:
            model, optimizer, train_dl = acc.prepare(model, optimizer, train_dl)
        acc.register_for_checkpointing(lr_scheduler)
        if ema is not None:
            ema.to(acc.device)
            acc.register_for_checkpointing(ema)

        if len(train_dl) == 0:
            raise ConfigError(
                f"stage {stage.name}: the training set ({len(train_dataset)} items) gives no full batch of "
                f"{args.per_device_train_batch_size} per process on {acc.num_processes} process(es)"
            )

        global_step = 0
        if resume is not None:
            path = find_resume_checkpoint(ckpt_root, resume, skip_corrupt=args.skip_corrupt_checkpoints, stage=stage.name)
            if path is not None:
                state = read_trainer_state(path)
                if state.get("stage") != stage.name:
                    raise CheckpointError(f"{path} is a checkpoint of stage {state.get('stage')!r}, not of {stage.name!r} (the stage being trained)")
                acc.load_state(str(path))
                global_step = state["global_step"]
                logger.info(f"stage {stage.name}: resumed from {path} at step {global_step}")

        micro_per_epoch = len(train_dl)
        first_epoch, skip_batches = divmod(global_step * args.gradient_accumulation_steps, micro_per_epoch)
        total_batch = args.per_device_train_batch_size * acc.num_processes * args.gradient_accumulation_steps
        progress, index_log = self._start_loop(stage, stage_index, args, len(train_dataset), total_batch, global_step)

        model.train()
        window = _LogWindow()
        micro_step = global_step * args.gradient_accumulation_steps
        stopped = False
        epoch = first_epoch
        try:
            while global_step < args.max_steps and not stopped:
                if hasattr(train_dl, "set_epoch"):
                    train_dl.set_epoch(epoch)
                active = acc.skip_first_batches(train_dl, skip_batches) if (epoch == first_epoch and skip_batches) else train_dl
                for batch in active:
                    if index_log is not None and "index" in batch:
                        index_log.write(" ".join(str(int(i)) for i in batch["index"].tolist()) + "\n")
                    with acc.accumulate(model):
                        gen = torch.Generator(device="cpu").manual_seed(_step_seed(args.seed, stage_index, micro_step, acc.process_index))
                        out = stage.compute_loss(model, batch, gen)
                        self._check_finite(out, stage, global_step, ckpt_root)
                        acc.backward(out.loss)
                        if acc.sync_gradients and args.max_grad_norm is not None:
                            acc.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                        optimizer.step()
                        if acc.sync_gradients:
                            lr_scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                    micro_step += 1
                    window.add(out)
                    if not acc.sync_gradients:
                        continue
                    global_step += 1
                    if ema is not None:
                        ema.step(model.parameters())
                    if self._after_optimizer_step(stage, args, global_step, epoch, model, ema, eval_dl, ckpt_root, progress, window, lambda: lr_scheduler.get_last_lr()[0]):
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
            return None

        if eval_dl is not None:
            self._evaluate(stage, model, eval_dl, global_step, ema)
        unwrapped = self._full_model(stage, model)
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        self._samples(stage, model, global_step, None)
        unwrapped = self._save_final(stage, unwrapped, final_dir, ckpt_root, global_step)
        acc.free_memory()
        acc._custom_objects.clear()  # free_memory keeps objects registered for checkpointing
        unwrapped.eval()
        return unwrapped

    def _save_final(self, stage: Stage, unwrapped, final_dir: Path, ckpt_root: Path, global_step: int):
        """Write the stage's final folder atomically (``<stage>.tmp`` then rename) and mark the stage complete; under
        LoRA the adapter goes to ``<stage>/adapter`` and the merged model (on every process) is returned."""
        from .peft_utils import save_stage

        acc = self.accelerator
        acc.wait_for_everyone()
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        unwrapped = save_stage(stage, unwrapped, str(tmp), self.config.peft, write=acc.is_main_process)
        if acc.is_main_process:
            shutil.rmtree(final_dir, ignore_errors=True)
            os.replace(tmp, final_dir)
            mark_stage_complete(ckpt_root, global_step)
        acc.wait_for_everyone()
        return unwrapped

    @torch.no_grad()
    def _full_model(self, stage: Stage, model) -> torch.nn.Module:
        """The trained model with whole weights on every process. Under DDP (or one process) that is the unwrapped
        module; under FSDP or DeepSpeed-through-accelerate (GPU configs) the module holds shards, so the full state
        dict is gathered with ``accelerator.get_state_dict`` (collective: every rank calls it; the main process gets
        the weights), broadcast, and loaded into a fresh copy of the model."""
        from accelerate.utils import DistributedType, broadcast_object_list

        acc = self.accelerator
        if acc.distributed_type not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
            return acc.unwrap_model(model)
        state = acc.get_state_dict(model)
        payload = [{k: v.detach().cpu() for k, v in state.items()} if acc.is_main_process else None]
        broadcast_object_list(payload, from_process=0)
        with torch.random.fork_rng(devices=[]):  # building the copy must not move the training RNG
            from .peft_utils import fresh_model

            fresh = fresh_model(stage, self.config.peft)
        missing, unexpected = fresh.load_state_dict(payload[0], strict=False)
        if unexpected or [k for k in missing if not k.endswith("num_batches_tracked")]:
            raise RuntimeError(f"stage {stage.name}: the gathered state dict does not match the model (missing {missing[:5]}, unexpected {unexpected[:5]})")
        return fresh.to(acc.device)

    # ------------------------------------------------------------------------------------------
    def _with_ema(self, model, ema):
        """Context: swap EMA weights in for evaluation when EMA is on."""
        import contextlib

        if ema is None:
            return contextlib.nullcontext()

        @contextlib.contextmanager
        def swap():
            params = list(self.accelerator.unwrap_model(model).parameters())
            ema.store(params)
            ema.copy_to(params)
            try:
                yield
            finally:
                ema.restore(params)

        return swap()

    def _start_loop(self, stage: Stage, stage_index: int, args: TrainingArguments, num_examples: int, total_batch: int, global_step: int, extra: tuple = ()):
        """The ``***** Running training *****`` summary, the progress bar and the optional data-index log."""
        acc = self.accelerator
        logger.info(f"***** Running training ({type(self).__name__}) *****")
        logger.info(f"  Stage = {stage.name} ({stage_index + 1}/{len(self.task.stages())})")
        for line in extra:
            logger.info(f"  {line}")
        logger.info(f"  Num examples = {num_examples}")
        logger.info(f"  Num processes = {acc.num_processes}")
        logger.info(f"  Instantaneous batch size per device = {args.per_device_train_batch_size}")
        logger.info(f"  Total train batch size (w. parallel & accumulation) = {total_batch}")
        logger.info(f"  Gradient accumulation steps = {args.gradient_accumulation_steps}")
        logger.info(f"  Total optimization steps = {args.max_steps}")
        progress = tqdm(
            range(args.max_steps),
            initial=global_step,
            desc=f"{stage.name}",
            disable=args.disable_progress_bar or not acc.is_local_main_process,
            dynamic_ncols=True,
        )
        index_log = None
        if args.record_data_indices:
            log_dir = self.output_dir / "logs"
            log_dir.mkdir(parents=True, exist_ok=True)
            index_log = open(log_dir / f"data_indices_{stage.name}_rank{acc.process_index}.txt", "a")
        return progress, index_log

    def _check_finite(self, out, stage: Stage, global_step: int, ckpt_root: Path):
        """Stop every rank (before any backward) when a loss is NaN or infinite on any of them."""
        (nonfinite,) = self._any_process(not bool(torch.isfinite(out.loss.detach()).all()))
        if nonfinite:
            last = find_resume_checkpoint(ckpt_root, "latest", skip_corrupt=True, stage=stage.name, must_exist=False)
            raise TrainingStopped(
                f"stage {stage.name}: non-finite loss ({out.loss.item()}) at step {global_step + 1}; "
                f"training stopped. Last good checkpoint: {last or 'none'} (resume with "
                f"--training.resume_from_checkpoint latest after lowering the learning rate)"
            )

    def _reduce_window(self, window: _LogWindow) -> tuple[float, dict, float]:
        """Mean loss and terms over the micro-batches of all ranks (the global batch), and the items all
        ranks processed. Every rank reaches a logging step at the same time, so this one all-reduce is safe."""
        keys = sorted(window.terms)
        values = torch.tensor([window.loss, float(window.steps), float(window.items), *(window.terms[k] for k in keys)], dtype=torch.float64, device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            values = self.accelerator.reduce(values, reduction="sum")
        values = values.tolist()
        return values[0] / values[1], {k: v / values[1] for k, v in zip(keys, values[3:])}, values[2]

    def _after_optimizer_step(self, stage, args, global_step, epoch, model, ema, eval_dl, ckpt_root, progress, window, lr) -> bool:
        """Logging, periodic evaluation / sample grids / checkpoints and the SIGTERM check after one
        optimizer step (shared by both trainers). Returns True when the run must stop."""
        progress.update(1)
        if global_step % args.logging_steps == 0 or global_step == args.max_steps:
            elapsed = max(time.perf_counter() - window.start, 1e-9)
            loss, terms, items = self._reduce_window(window)
            prefix = f"{stage.name}/train/"
            rate_key = f"{prefix}{stage.throughput_unit}_per_second"
            logs = {f"{prefix}loss": loss, f"{prefix}lr": lr()}
            logs.update({f"{prefix}{k}": v for k, v in terms.items()})
            logs[rate_key] = items / elapsed
            if self.has_trackers:
                self.accelerator.log(logs, step=global_step)
            self._log_history(stage, global_step, logs)
            progress.set_postfix(loss=f"{loss:.4f}", lr=f"{logs[f'{prefix}lr']:.2e}", **{f"{stage.throughput_unit[:3]}/s": f"{logs[rate_key]:.0f}"})
            window.reset()
        before_end = global_step < args.max_steps
        if args.eval_steps and global_step % args.eval_steps == 0 and before_end and eval_dl is not None:
            self._evaluate(stage, model, eval_dl, global_step, ema)
        if args.sample_steps and global_step % args.sample_steps == 0 and before_end:
            self._samples(stage, model, global_step, ema)
        if args.checkpointing_steps and global_step % args.checkpointing_steps == 0 and before_end:
            self._save_checkpoint(ckpt_root, global_step, stage, args, epoch)
        (term,) = self._any_process(self.signal_flag.received)
        if term:
            logger.info(f"SIGTERM received: writing a checkpoint at step {global_step} and stopping")
            self._save_checkpoint(ckpt_root, global_step, stage, args, epoch)
        return term

    def _log_history(self, stage: Stage, step: int, logs: dict):
        """Append the logged scalars to ``logs/log_history.jsonl`` (the HF Trainer's ``log_history``)."""
        if self.accelerator.is_main_process:
            path = self.output_dir / "logs" / "log_history.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            prefix = f"{stage.name}/"
            record = {"stage": stage.name, "step": step, **{k[len(prefix):]: v for k, v in logs.items()}}
            with open(path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def _evaluate(self, stage: Stage, model, eval_dl, step: int, ema):
        model.eval()
        with self._with_ema(model, ema):
            metrics = stage.evaluate(model, eval_dl, self.accelerator)
        model.train()
        if metrics:
            logs = {f"{stage.name}/eval/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            logger.info(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in logs.items()))
            if self.has_trackers:
                self.accelerator.log(logs, step=step)
            self._log_history(stage, step, logs)
        return metrics

    def _samples(self, stage: Stage, model, step: int, ema):
        acc = self.accelerator
        if acc.is_main_process:
            model.eval()
            with self._with_ema(model, ema):
                grid = stage.sample_grid(acc.unwrap_model(model), acc)
            model.train()
            if grid is not None:
                sample_dir = self.output_dir / "logs" / "samples"
                sample_dir.mkdir(parents=True, exist_ok=True)
                grid.save(sample_dir / f"{stage.name}-step{step:06d}.png")
                if self.has_trackers:
                    import numpy as np

                    array = np.asarray(grid.convert("RGB"))[None]
                    for tracker in acc.trackers:
                        if tracker.name == "tensorboard":
                            tracker.log_images({f"{stage.name}/samples": array}, step=step, dataformats="NHWC")
        acc.wait_for_everyone()

    def _save_checkpoint(self, root: Path, step: int, stage: Stage, args: TrainingArguments, epoch: int):
        acc = self.accelerator
        final = root / f"checkpoint-{step}"
        tmp = root / f".checkpoint-{step}.tmp"
        if acc.is_main_process:
            root.mkdir(parents=True, exist_ok=True)
            if args.save_total_limit is not None:
                prune_checkpoints(root, keep=args.save_total_limit - 1)
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            state = {
                "global_step": step,
                "epoch": epoch,
                "stage": stage.name,
                "training": dataclasses.asdict(args),
                "experiment": self.config.to_dict(),
                "num_processes": acc.num_processes,
            }
            write_checkpoint_manifest(tmp, state)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            logger.info(f"saved {final}")
        acc.wait_for_everyone()
