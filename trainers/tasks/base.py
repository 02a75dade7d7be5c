"""What a system gives the trainers: stages (model + data + loss + eval + samples) and an export step.

The trainers know nothing about any model family: every per-family decision lives in a task
module (``trainers/tasks/<system>.py``) that subclasses ``Task`` and ``Stage``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch

if TYPE_CHECKING:  # pragma: no cover
    from accelerate import Accelerator
    from PIL import Image

    from ..arguments import ExperimentConfig


@dataclass
class StepOutput:
    """The loss to back-propagate plus scalar terms to log (``train/<name>``)."""

    loss: torch.Tensor
    logs: dict = field(default_factory=dict)
    num_items: int = 0  # samples (or tokens) in the local batch, for throughput


class Stage:
    """One trained model of a system (e.g. the VQ tokenizer, then the code GPT)."""

    name: str = "model"
    throughput_unit: str = "samples"
    # True for a stage whose ``build_model`` continues the model that the previous stage of this run saved (under
    # LoRA that model, not the base run's, is the stage's base)
    starts_from_previous_stage: bool = False

    def __init__(self, task: "Task"):
        self.task = task

    # -- building ---------------------------------------------------------------------------
    def build_model(self) -> torch.nn.Module:
        raise NotImplementedError

    def build_datasets(self, accelerator: "Accelerator") -> tuple[Any, Optional[Any]]:
        """``(train_dataset, eval_dataset)``; each item is a dict that ``collate_fn`` batches."""
        raise NotImplementedError

    def collate_fn(self) -> Optional[Callable]:
        return None

    def peft_target_modules(self) -> list[str]:
        """Default LoRA ``target_modules`` of this stage's model (``peft.target_modules`` overrides)."""
        return []

    def peft_target_parameters(self) -> list[str]:
        """Default LoRA ``target_parameters`` (raw ``nn.Parameter`` names), used when there are no target modules."""
        return []

    def peft_modules_to_save(self) -> list[str]:
        """Modules trained in full and saved with the adapter under LoRA (e.g. ones with EMA-updated buffers)."""
        return []

    # -- training ---------------------------------------------------------------------------
    def compute_loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> StepOutput:
        """One forward pass. ``generator`` is seeded from (seed, step, rank): use it for any
        training-time randomness so a resumed run draws exactly what an uninterrupted one would."""
        raise NotImplementedError

    # -- evaluation, samples and export -----------------------------------------------------
    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, dataloader, accelerator: "Accelerator") -> dict:
        return {}

    @torch.no_grad()
    def sample_grid(self, model: torch.nn.Module, accelerator: "Accelerator") -> Optional["Image.Image"]:
        return None

    def save(self, model: torch.nn.Module, directory: str):
        model.save_pretrained(directory, safe_serialization=True)

    def load(self, directory: str) -> torch.nn.Module:
        raise NotImplementedError


class Task:
    """A system: an ordered list of stages and the export of the final artefact."""

    name: str = "task"
    family: str = "task"  # hub card template name

    def __init__(self, config: "ExperimentConfig"):
        self.config = config

    @property
    def output_dir(self) -> str:
        return self.config.training.output_dir

    def stages(self) -> list[Stage]:
        raise NotImplementedError

    def finalize(self, accelerator: "Accelerator", models: dict) -> dict:
        """Export the pipeline/models into ``output_dir`` and compute final metrics.

        ``models`` maps stage name -> trained (unwrapped) model. Runs on every process;
        writing is done by the main process. Returns the evaluation results.
        """
        raise NotImplementedError
