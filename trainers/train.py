"""Entry point: ``python -m trainers.train CONFIG.yaml [--section.key value ...]``.

Launch it with ``accelerate launch``, ``torchrun`` or ``deepspeed``; ``--trainer deepspeed`` (or
``trainer: deepspeed`` in the file) picks the DeepSpeed trainer, e.g. ZeRO-3 on 2 CPU processes:

    torchrun --nproc_per_node 2 -m trainers.train CONFIG.yaml --trainer deepspeed --training.deepspeed_config zero3
    deepspeed --num_gpus 2 --module trainers.train CONFIG.yaml --trainer deepspeed
"""

from __future__ import annotations

import logging
import os
import sys

from .arguments import ConfigError, load_config


def _set_threads(requested):
    """Split the cores between the processes of this machine (2 procs x 2 threads on 2 cores is 1.5-15x slower)."""
    import torch

    if requested is None:
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        requested = max(1, (os.cpu_count() or 1) // max(local, 1))
    torch.set_num_threads(requested)


def _strip_local_rank(argv: list[str]) -> list[str]:
    """The ``deepspeed`` launcher appends ``--local_rank=N`` (unless ``--no_local_rank``); keep it as LOCAL_RANK."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if arg.startswith(("--local_rank=", "--local-rank=")):
            os.environ.setdefault("LOCAL_RANK", arg.split("=", 1)[1])
        elif arg in ("--local_rank", "--local-rank") and i + 1 < len(argv):
            os.environ.setdefault("LOCAL_RANK", argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out


def main(argv=None) -> int:
    argv = _strip_local_rank(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    try:
        config = load_config(argv[0], argv[1:])
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "fsspec", "accelerate.checkpointing", "accelerate.accelerator"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _set_threads(config.training.num_threads)
    from .accelerate_trainer import TrainingStopped
    from .checkpointing import CheckpointError

    try:
        if config.trainer == "deepspeed":
            try:
                from .deepspeed_trainer import DeepSpeedTrainer
            except ImportError as err:
                raise ConfigError(f"trainer=deepspeed is not available: {err}") from err
            results = DeepSpeedTrainer(config).train()
        else:
            from .accelerate_trainer import AccelerateTrainer

            results = AccelerateTrainer(config).train()
    except (ConfigError, CheckpointError, TrainingStopped) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    if results.get("stopped_in") == "finalize":
        print("stopped by SIGTERM during the final export/evaluation (every stage is trained and saved); finish with "
              "--training.resume_from_checkpoint latest", file=sys.stderr)
    elif results.get("stopped"):
        print("training stopped by SIGTERM after writing a checkpoint; resume with --training.resume_from_checkpoint latest", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
