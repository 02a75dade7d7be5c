"""LoRA fine-tuning (peft) shared by AccelerateTrainer and DeepSpeedTrainer.

``peft.enabled: true`` fine-tunes every stage of a task from a pretrained base:

* the base of stage ``S`` is ``<peft.base_model>/<S>`` (a finished run's output folder: each stage's final
  folder, which is also the exported pipeline's component folder), or ``<peft.base_model>`` itself when it
  holds a model (``config.json``) and the task has one stage; a stage that continues the previous stage's
  model (``Stage.starts_from_previous_stage``) takes this run's previous stage as its base instead;
* the architecture comes from the experiment file (``model:``), the weights from the base (a size or name
  mismatch is an error);
* LoRA targets are ``peft.target_modules`` (a list for every stage, or a mapping stage -> list) or the
  stage's defaults (``Stage.peft_target_modules()``); ``Stage.peft_modules_to_save()`` names modules whose
  state (e.g. EMA-updated buffers) is trained and saved with the adapter;
* only adapter tensors train; the base weights stay bit-identical;
* at the end of a stage, ``<output_dir>/<S>/adapter/`` holds the adapter alone (``adapter_config.json``,
  ``adapter_model.safetensors``, a README card) and ``<output_dir>/<S>/`` the merged model
  (``merge_and_unload``), so the exported pipeline loads as usual.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch

from .arguments import ConfigError, PeftArguments

if TYPE_CHECKING:  # pragma: no cover
    from .tasks.base import Stage, Task

logger = logging.getLogger(__name__)

ADAPTER_DIR = "adapter"


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return False
    return isinstance(model, PeftModel)


def base_model_dir(peft_args: PeftArguments, stage: "Stage", num_stages: int) -> Path:
    """The folder holding the pretrained weights of ``stage`` (see the module docstring)."""
    root = Path(str(peft_args.base_model)).expanduser()
    per_stage = root / stage.name
    if (per_stage / "config.json").is_file():
        return per_stage
    if num_stages == 1 and (root / "config.json").is_file():
        return root
    looked = f"{per_stage}/config.json" + (f" or {root}/config.json" if num_stages == 1 else "")
    raise ConfigError(
        f"peft.base_model={peft_args.base_model!r}: no pretrained {stage.name!r} model there (looked for {looked}); "
        f"give the output folder of a finished run of this task"
        + ("" if num_stages > 1 else " or the folder of the model itself")
    )


def stage_target_modules(peft_args: PeftArguments, stage: "Stage") -> list[str]:
    targets = peft_args.target_modules
    if isinstance(targets, dict):
        targets = targets.get(stage.name)
    return list(targets) if targets else list(stage.peft_target_modules())


def lora_config(peft_args: PeftArguments, stage: "Stage"):
    from peft import LoraConfig

    modules = stage_target_modules(peft_args, stage)
    params = [] if modules else list(stage.peft_target_parameters())
    if not modules and not params:
        raise ConfigError(f"peft.enabled=true: stage {stage.name} has no default LoRA targets; set peft.target_modules")
    kwargs = dict(
        r=peft_args.r,
        lora_alpha=peft_args.lora_alpha,
        lora_dropout=peft_args.lora_dropout,
        modules_to_save=list(stage.peft_modules_to_save()) or None,
    )
    if modules:
        kwargs["target_modules"] = modules
    else:
        kwargs["target_modules"] = []
        kwargs["target_parameters"] = params
    return LoraConfig(**kwargs)


def _short_name(name: str) -> str:
    """``encoder.blocks.0.0.conv1`` -> ``conv1``; ``encoder.down.1`` -> ``down.1`` (what target_modules matches)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def apply_lora(stage: "Stage", model: torch.nn.Module, peft_args: PeftArguments):
    """Wrap ``model`` in a ``PeftModel`` with fresh LoRA adapters; everything else is frozen."""
    import peft
    from peft import get_peft_model

    config = lora_config(peft_args, stage)
    targets = config.target_modules or config.target_parameters
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as err:
        what = "target_parameters" if config.target_parameters else "target_modules"
        hint = ""
        if "top-level module" in str(err):
            hint = (
                f" {type(model).__name__} keeps its energy tables as nn.Parameters of the model itself (no Linear "
                f"or Conv layer holds them) and peft {peft.__version__} cannot put LoRA on parameters of the top-level module, "
                f"so stage {stage.name} cannot be LoRA-tuned; train it without peft (peft.enabled=false)."
            )
        else:
            names = sorted({_short_name(n) for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Embedding))})
            hint = f" Adaptable layer names in {type(model).__name__}: {', '.join(names) or 'none'}."
        message = str(err).rstrip(".")
        raise ConfigError(f"peft: stage {stage.name}: LoRA with {what}={sorted(targets) if isinstance(targets, (set, list)) else targets} failed: {message}.{hint}") from None
    match_lora_conv_padding(wrapped)
    trainable = sum(p.numel() for p in wrapped.parameters() if p.requires_grad)
    logger.info(f"stage {stage.name}: {trainable} trainable LoRA parameters of {sum(p.numel() for p in wrapped.parameters())}")
    return wrapped


def match_lora_conv_padding(model: torch.nn.Module) -> int:
    """Give every LoRA ``lora_A`` convolution the padding mode of the convolution it adapts; returns how many changed.

    peft before 0.22 builds ``lora_A`` with the base layer's kernel, stride and padding but always zero padding (0.22
    copies the padding mode, and then nothing changes here), so on a layer with
    ``padding_mode="circular"`` (the thermalizer's periodic domain) the unmerged adapter differs from the merged
    weights at the borders. With matching padding the adapter computes exactly what the merged export does. Call it
    after ``PeftModel.from_pretrained`` too."""
    changed = 0
    for module in model.modules():
        base, lora_a = getattr(module, "base_layer", None), getattr(module, "lora_A", None)
        if not isinstance(base, torch.nn.modules.conv._ConvNd) or not isinstance(lora_a, torch.nn.ModuleDict):
            continue
        for conv in lora_a.values():
            if isinstance(conv, torch.nn.modules.conv._ConvNd) and conv.padding_mode != base.padding_mode:
                conv.padding_mode = base.padding_mode
                changed += 1
    return changed


def load_base_weights(stage: "Stage", model: torch.nn.Module, directory: Path) -> torch.nn.Module:
    """The experiment's architecture (``model``'s config) with the weights of ``directory``; any missing,
    unexpected or mis-shaped tensor is an error."""
    cls = type(model)
    try:
        loaded, info = cls.from_pretrained(str(directory), config=model.config, output_loading_info=True)
    except (RuntimeError, ValueError, OSError) as err:
        raise ConfigError(f"peft.base_model: cannot load stage {stage.name} from {directory} into the experiment's model: {err}") from None
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ConfigError(
            f"peft.base_model: {directory} does not match the experiment's {stage.name} model ({problems}); "
            f"the model: section must describe the base model's architecture"
        )
    return loaded


def load_stage_base(stage: "Stage", model: torch.nn.Module, peft_args: PeftArguments, num_stages: int) -> torch.nn.Module:
    """``model``'s architecture with the weights of the stage's base (``base_model_dir``); a stage that starts from
    this run's previous stage keeps the weights its ``build_model`` loaded."""
    if stage.starts_from_previous_stage:
        logger.info(f"stage {stage.name}: LoRA on this run's previous stage")
        return model
    directory = base_model_dir(peft_args, stage, num_stages)
    logger.info(f"stage {stage.name}: LoRA on the base model {directory}")
    return load_base_weights(stage, model, directory)


def check_peft(config, task: "Task"):
    """Fail before any training: the base folders exist and the LoRA targets match every stage's model."""
    peft_args = config.peft
    if not peft_args.enabled:
        return
    try:
        import peft  # noqa: F401
    except ImportError as err:  # pragma: no cover
        raise ConfigError("peft.enabled=true needs the 'peft' package (pip install peft)") from err
    stages = task.stages()
    names = {s.name for s in stages}
    if isinstance(peft_args.target_modules, dict):
        unknown = sorted(set(peft_args.target_modules) - names)
        if unknown:
            raise ConfigError(f"peft.target_modules names unknown stage(s) {unknown}; {task.name} has stages: {', '.join(s.name for s in stages)}")
    for stage in stages:  # targets first: a family peft cannot adapt says so whatever the base
        with torch.random.fork_rng(devices=[]):  # the dry run must not move the training RNG
            apply_lora(stage, stage.build_model(), peft_args)
    for stage in stages:
        if not stage.starts_from_previous_stage:
            base_model_dir(peft_args, stage, len(stages))


ADAPTER_CARD = """---
library_name: peft
tags:
- lora
- latentheat
- {family}
---

# LoRA adapter: {family} / {stage}

A LoRA adapter (r={r}, lora_alpha={alpha}, targets: {targets}) for the `{stage}` model ({model_class}) of a
latentheat `{family}` run, trained with `peft.enabled: true` from the base model `{base}`.

```python
from peft import PeftModel
from {module} import {model_class}

base = {model_class}.from_pretrained("BASE_RUN/{stage}")   # the base model named above
model = PeftModel.from_pretrained(base, "THIS_FOLDER_OR_REPO")
model = model.merge_and_unload()                          # optional: plain weights
```

The merged model (base + adapter) is saved next to this folder as the run's `{stage}` model.
"""


def _write_adapter_card(directory: Path, stage: "Stage", model, peft_args: PeftArguments):
    base = model.get_base_model()
    cfg = model.peft_config["default"]
    targets = sorted(cfg.target_modules or []) or sorted(cfg.target_parameters or [])
    text = ADAPTER_CARD.format(
        family=stage.task.family,
        stage=stage.name,
        r=cfg.r,
        alpha=cfg.lora_alpha,
        targets=", ".join(f"`{t}`" for t in targets),
        model_class=type(base).__name__,
        module=type(base).__module__.rsplit(".", 1)[0],
        base=peft_args.base_model,
    )
    (directory / "README.md").write_text(text)


def save_stage(stage: "Stage", model, directory: str, peft_args: PeftArguments, write: bool = True):
    """The end of a stage. A ``PeftModel`` writes its adapter to ``directory/adapter`` (main process), is
    merged on every process and the merged model is saved with ``stage.save``; returns the model to
    export. Other models are saved as they are."""
    if not is_peft_model(model):
        if write:
            stage.save(model, directory)
        return model
    if write:
        adapter_dir = Path(directory) / ADAPTER_DIR
        model.save_pretrained(str(adapter_dir), safe_serialization=True)
        _write_adapter_card(adapter_dir, stage, model, peft_args)
        (adapter_dir / "latentheat_adapter.json").write_text(json.dumps({"stage": stage.name, "base_model": str(peft_args.base_model)}, indent=2) + "\n")
    merged = model.merge_and_unload()
    if write:
        stage.save(merged, directory)
    return merged


def fresh_model(stage: "Stage", peft_args: Optional[PeftArguments]):
    """An empty model with the same parameter names as the trained one (for DeepSpeed's consolidation)."""
    model = stage.build_model()
    if peft_args is not None and peft_args.enabled:
        model = apply_lora(stage, model, peft_args)
    return model
