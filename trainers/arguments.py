"""Typed experiment configuration: YAML sections -> dataclasses, dotted CLI overrides.

An experiment file has the sections ``task``, ``trainer``, ``model``, ``data``,
``evaluation``, ``training``, ``stages``, ``peft`` and ``hub``. ``training`` and ``hub`` are
typed here; ``model``, ``data`` and ``evaluation`` are owned by the task, which validates them
against its own dataclasses and config classes (``trainers/tasks``). ``stages`` maps a stage
name to overrides of ``training`` for that stage (multi-stage systems).

Overrides come as ``--section.key value`` or ``--section.key=value``; values are parsed as
YAML scalars, then checked against the field's type. Unknown keys are errors that name the key
and the file.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

SECTIONS = ("task", "trainer", "model", "data", "evaluation", "training", "stages", "peft", "hub")
TRAINERS = ("accelerate", "deepspeed")


class ConfigError(ValueError):
    """A bad experiment file or override. The message names the key, the value and what is allowed."""


DEEPSPEED_CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


def resolve_deepspeed_config(value: str, where: str = "training.deepspeed_config") -> Path:
    """``training.deepspeed_config`` -> an existing JSON file.

    A path (absolute or relative to the working directory) is used as given; a bare name such as
    ``zero3`` or ``zero3.json`` names one of the files shipped in ``configs/deepspeed/``.
    """
    path = Path(value).expanduser()
    if path.is_file():
        return path
    if len(path.parts) == 1:
        shipped = DEEPSPEED_CONFIG_DIR / (value if value.endswith(".json") else value + ".json")
        if shipped.is_file():
            return shipped
    names = sorted(p.name for p in DEEPSPEED_CONFIG_DIR.glob("*.json"))
    raise ConfigError(f"{where}={value!r} is not a file; give a path to a DeepSpeed JSON or one of {', '.join(names)}")


@dataclass
class TrainingArguments:
    output_dir: str = "outputs/run"
    seed: int = 42
    max_steps: int = 1000
    per_device_train_batch_size: int = 32
    per_device_eval_batch_size: int = 256
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    max_grad_norm: Optional[float] = 1.0
    lr_scheduler_type: str = "cosine"
    warmup_steps: int = 0
    mixed_precision: str = "no"
    use_ema: bool = False
    ema_decay: float = 0.999
    gradient_checkpointing: bool = False
    logging_steps: int = 10
    eval_steps: int = 0
    sample_steps: int = 0
    checkpointing_steps: int = 500
    save_total_limit: Optional[int] = 2
    resume_from_checkpoint: Optional[str] = None
    skip_corrupt_checkpoints: bool = False
    report_to: str = "tensorboard"
    dataloader_num_workers: int = 0
    num_threads: Optional[int] = None
    record_data_indices: bool = False
    disable_progress_bar: bool = False
    # trainer=deepspeed: a JSON in configs/deepspeed/ ("zero2.json", "zero3") or a path to one
    deepspeed_config: str = "zero2.json"

    def __post_init__(self):
        checks = [
            ("max_steps", self.max_steps >= 1, "an integer >= 1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "an integer >= 1"),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size >= 1, "an integer >= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate > 0, "a float > 0"),
            ("weight_decay", self.weight_decay >= 0, "a float >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
            ("logging_steps", self.logging_steps >= 1, "an integer >= 1"),
            ("eval_steps", self.eval_steps >= 0, "an integer >= 0 (0 = only at the end)"),
            ("sample_steps", self.sample_steps >= 0, "an integer >= 0 (0 = only at the end)"),
            ("checkpointing_steps", self.checkpointing_steps >= 0, "an integer >= 0 (0 = never)"),
            ("ema_decay", 0.0 < self.ema_decay < 1.0, "a float in (0, 1)"),
            ("mixed_precision", self.mixed_precision in ("no", "fp16", "bf16"), "one of 'no', 'fp16', 'bf16'"),
            ("dataloader_num_workers", self.dataloader_num_workers >= 0, "an integer >= 0"),
            ("deepspeed_config", bool(self.deepspeed_config.strip()), "a DeepSpeed JSON: a name in configs/deepspeed/ or a path"),
        ]
        if self.max_grad_norm is not None:
            checks.append(("max_grad_norm", self.max_grad_norm > 0, "a float > 0 or null"))
        if self.save_total_limit is not None:
            checks.append(("save_total_limit", self.save_total_limit >= 1, "an integer >= 1 or null"))
        if self.num_threads is not None:
            checks.append(("num_threads", self.num_threads >= 1, "an integer >= 1 or null"))
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"training.{name}={getattr(self, name)!r} is invalid: expected {allowed}")
        from transformers.trainer_utils import SchedulerType

        allowed = [s.value for s in SchedulerType]
        if self.lr_scheduler_type not in allowed:
            raise ConfigError(f"training.lr_scheduler_type={self.lr_scheduler_type!r} is invalid: expected one of {allowed}")

    @property
    def trackers(self) -> list[str]:
        value = self.report_to.strip().lower()
        if value in ("", "none"):
            return []
        return [t.strip() for t in value.split(",") if t.strip()]


@dataclass
class HubArguments:
    push: bool = False
    repo_id: Optional[str] = None
    private: bool = False
    token: Optional[str] = None
    commit_message: Optional[str] = None

    def __post_init__(self):
        if self.push and not self.repo_id:
            raise ConfigError("hub.push=true needs hub.repo_id (e.g. 'my-user/dtm-mnist')")


@dataclass
class PeftArguments:
    """LoRA fine-tuning (peft) of every stage from a pretrained base (``trainers/peft_utils.py``).

    * ``base_model`` (required when ``enabled``): the output folder of a finished run of the same task. Stage
      ``S`` starts from ``<base_model>/<S>`` (the stage's final folder, also the exported pipeline's component
      folder); a one-stage task also takes the model folder itself. The architecture comes from the
      experiment's ``model:`` section and must match the base's weights. LoRA on random weights is refused:
      a low-rank update of an untrained model is a worse, slower way to train it from scratch, so a missing
      base is almost surely a mistake.
    * ``r`` (>= 1), ``lora_alpha`` (> 0), ``lora_dropout`` (in [0, 1)).
    * ``target_modules``: null (each stage's defaults, ``Stage.peft_target_modules()``: code_gpt q/k/v/o_proj,
      vq_tokenizer its Conv2d layers conv_in/conv1/conv2/conv_out), a list of module names for every stage, or
      a mapping stage -> list. Names that match nothing are an error before training starts.

    Only the adapters train; the base weights stay unchanged. At the end of stage ``S``,
    ``<output_dir>/<S>/adapter/`` holds the adapter alone (``adapter_config.json``,
    ``adapter_model.safetensors``, ``README.md``; ``PeftModel.from_pretrained(base, that folder)`` loads it,
    ``python -m trainers.push <output_dir>/<S>/adapter REPO_ID`` pushes it) and ``<output_dir>/<S>/`` plus the
    exported pipeline hold the merged weights. The dtm family cannot be LoRA-tuned (its weights are top-level
    ``nn.Parameter`` tensors, which peft does not adapt); it fails with a ConfigError saying so.
    """

    enabled: bool = False
    base_model: Optional[str] = None
    r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: Optional[object] = None  # list of names, or mapping stage -> list of names

    def __post_init__(self):
        if self.r < 1:
            raise ConfigError(f"peft.r={self.r!r} is invalid: expected an integer >= 1 (the LoRA rank)")
        if self.lora_alpha <= 0:
            raise ConfigError(f"peft.lora_alpha={self.lora_alpha!r} is invalid: expected an integer > 0")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"peft.lora_dropout={self.lora_dropout!r} is invalid: expected a float in [0, 1)")
        if self.base_model is not None and not str(self.base_model).strip():
            self.base_model = None

        def names_ok(value):
            return isinstance(value, list) and all(isinstance(v, str) and v for v in value)

        targets = self.target_modules
        if targets is not None and not (names_ok(targets) or (isinstance(targets, dict) and all(isinstance(k, str) and names_ok(v) for k, v in targets.items()))):
            raise ConfigError(
                f"peft.target_modules={targets!r} is invalid: expected null (the family's defaults), a list of module "
                f"names (e.g. [q_proj, v_proj]) or a mapping stage -> list of names"
            )
        if self.enabled and not self.base_model:
            raise ConfigError(
                "peft.enabled=true needs peft.base_model: the output folder of a finished run of this task (stage S "
                "starts from <base_model>/<S>); LoRA on randomly initialised weights is not supported"
            )


@dataclass
class ExperimentConfig:
    task: str
    trainer: str = "accelerate"
    model: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    training: TrainingArguments = field(default_factory=TrainingArguments)
    stages: dict = field(default_factory=dict)
    peft: PeftArguments = field(default_factory=PeftArguments)
    hub: HubArguments = field(default_factory=HubArguments)
    source: Optional[str] = None
    # training keys given on the command line: they win over per-stage values
    cli_training_keys: tuple = ()

    def stage_training(self, stage: str) -> TrainingArguments:
        """The training arguments of one stage: ``training``, then ``stages.<stage>``, then CLI ``--training.*``."""
        base = dataclasses.asdict(self.training)
        overrides = dict(self.stages.get(stage) or {})
        for key in self.cli_training_keys:
            overrides.pop(key, None)
        for key, value in overrides.items():
            base[key] = _coerce(TrainingArguments, key, value, f"stages.{stage}.{key}", self.source)
        return TrainingArguments(**base)

    def to_dict(self) -> dict:
        out = {
            "task": self.task,
            "trainer": self.trainer,
            "model": copy.deepcopy(self.model),
            "data": copy.deepcopy(self.data),
            "evaluation": copy.deepcopy(self.evaluation),
            "training": dataclasses.asdict(self.training),
            "stages": copy.deepcopy(self.stages),
            "peft": dataclasses.asdict(self.peft),
            "hub": {k: v for k, v in dataclasses.asdict(self.hub).items() if k != "token"},
        }
        return out


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(cls, key: str, value: Any, where: str, source: Optional[str]):
    """Check ``value`` against the type of ``cls.key``; ints are accepted for floats."""
    hints = typing.get_type_hints(cls)
    if key not in hints:
        allowed = ", ".join(sorted(f.name for f in dataclasses.fields(cls)))
        raise ConfigError(f"unknown key '{where}'{_in(source)}; allowed keys: {allowed}")
    tp = hints[key]
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    optional = origin in (Union, types.UnionType) and type(None) in args
    if optional:
        if value is None:
            return None
        tp = next(a for a in args if a is not type(None))
        origin = typing.get_origin(tp)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    check = origin or tp
    if check is bool and not isinstance(value, bool):
        raise ConfigError(f"'{where}'{_in(source)} must be true or false, got {value!r}")
    if check is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"'{where}'{_in(source)} must be an integer, got {value!r}")
    if not isinstance(value, check):
        raise ConfigError(f"'{where}'{_in(source)} must be {_type_name(check)}, got {value!r} ({type(value).__name__})")
    return value


def _in(source: Optional[str]) -> str:
    return f" in {source}" if source else ""


def _build_dataclass(cls, values: Any, section: str, source: Optional[str]):
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}'{_in(source)} must be a mapping, got {type(values).__name__}")
    kwargs = {k: _coerce(cls, k, v, f"{section}.{k}", source) for k, v in values.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except TypeError as err:  # pragma: no cover - guarded by _coerce
        raise ConfigError(f"section '{section}'{_in(source)}: {err}") from err


def parse_overrides(argv: list[str]) -> list[tuple[list[str], Any]]:
    """``['--training.max_steps', '10', '--trainer=deepspeed']`` -> ``[(['training','max_steps'], 10), ...]``."""
    out = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--") or len(arg) == 2:
            raise ConfigError(f"unexpected argument {arg!r}: overrides look like --section.key value")
        key = arg[2:]
        if "=" in key:
            key, raw = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"override {arg!r} has no value")
            raw = argv[i + 1]
            i += 2
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        path = key.split(".")
        if path[0] not in SECTIONS or any(not p for p in path):
            raise ConfigError(f"unknown override --{key}: the first part must be one of {', '.join(SECTIONS)}")
        out.append((path, value))
    return out


def _list_index(node: list, part: str, path: list[str]) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"cannot set {'.'.join(path)}: '{part}' must index the list of {len(node)} items there "
                          f"(0 to {len(node) - 1})")
    return int(part)


def _set_path(tree: dict, path: list[str], value: Any):
    """Set ``value`` at ``path`` in ``tree``; a numeric part indexes a list (``model.x.levels.0.key``)."""
    node = tree
    for part in path[:-1]:
        if isinstance(node, list):
            nxt = node[_list_index(node, part, path)]
        else:
            nxt = node.get(part)
            if nxt is None:
                nxt = node[part] = {}
        if not isinstance(nxt, (dict, list)):
            raise ConfigError(f"cannot set {'.'.join(path)}: '{part}' is not a mapping")
        node = nxt
    if isinstance(node, list):
        node[_list_index(node, path[-1], path)] = value
    else:
        node[path[-1]] = value


def load_config(path: Union[str, os.PathLike], overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Read an experiment YAML, apply ``--section.key value`` overrides and validate everything."""
    path = Path(path)
    source = str(path)
    if not path.is_file():
        raise ConfigError(f"experiment file {source} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{source} is not valid YAML: {err}") from err
    if not isinstance(raw, dict):
        raise ConfigError(f"{source} must hold a mapping with the sections {', '.join(SECTIONS)}")
    return build_config(raw, overrides, source=source)


def build_config(raw: dict, overrides: Optional[list[str]] = None, source: Optional[str] = None) -> ExperimentConfig:
    raw = copy.deepcopy(raw)
    unknown = sorted(set(raw) - set(SECTIONS))
    if unknown:
        raise ConfigError(f"unknown section(s) {unknown}{_in(source)}; allowed: {', '.join(SECTIONS)}")
    cli_training = []
    for path, value in parse_overrides(list(overrides or [])):
        if path[0] == "training" and len(path) == 2:
            cli_training.append(path[1])
        if len(path) == 1:
            raw[path[0]] = value
        else:
            if raw.get(path[0]) is None:
                raw[path[0]] = {}
            _set_path(raw, path, value)
    if "task" not in raw or not isinstance(raw["task"], str):
        raise ConfigError(f"{source or 'config'} needs a 'task' (a string naming the system, e.g. code_image)")
    trainer = raw.get("trainer", "accelerate")
    if trainer not in TRAINERS:
        raise ConfigError(f"trainer={trainer!r}{_in(source)} is invalid: expected one of {list(TRAINERS)}")
    for section in ("model", "data", "evaluation", "stages"):
        value = raw.get(section) or {}
        if not isinstance(value, dict):
            raise ConfigError(f"section '{section}'{_in(source)} must be a mapping, got {type(value).__name__}")
    stages = raw.get("stages") or {}
    for name, values in stages.items():
        if not isinstance(values, dict):
            raise ConfigError(f"stages.{name}{_in(source)} must be a mapping of training keys")
        for key, value in values.items():
            _coerce(TrainingArguments, key, value, f"stages.{name}.{key}", source)
    if trainer == "deepspeed":  # fail before launching, not inside every rank
        resolve_deepspeed_config(str((raw.get("training") or {}).get("deepspeed_config", TrainingArguments.deepspeed_config)))
        for name, values in stages.items():
            if "deepspeed_config" in values:
                resolve_deepspeed_config(str(values["deepspeed_config"]), f"stages.{name}.deepspeed_config")
    cfg = ExperimentConfig(
        task=raw["task"],
        trainer=trainer,
        model=raw.get("model") or {},
        data=raw.get("data") or {},
        evaluation=raw.get("evaluation") or {},
        training=_build_dataclass(TrainingArguments, raw.get("training"), "training", source),
        stages=stages,
        peft=_build_dataclass(PeftArguments, raw.get("peft"), "peft", source),
        hub=_build_dataclass(HubArguments, raw.get("hub"), "hub", source),
        source=source,
        cli_training_keys=tuple(cli_training),
    )
    return cfg


def check_section(values: dict, cls, section: str, source: Optional[str] = None):
    """Build a task-owned dataclass from a section, rejecting unknown keys and wrong types."""
    return _build_dataclass(cls, values, section, source)


def check_config_kwargs(config_cls, values: dict, section: str, source: Optional[str] = None) -> dict:
    """Reject keys that a ``PretrainedConfig`` subclass would silently swallow into ``**kwargs``."""
    import inspect

    if values is None:
        return {}
    if not isinstance(values, dict):
        raise ConfigError(f"section '{section}'{_in(source)} must be a mapping")
    allowed = set()
    for klass in config_cls.__mro__:
        if klass is object:
            continue
        try:
            params = inspect.signature(klass.__init__).parameters
        except (TypeError, ValueError):
            continue
        allowed |= {n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and n != "self"}
        if klass.__name__ in ("PretrainedConfig", "PreTrainedConfig"):
            break
    # dataclass-style configs (transformers 5.x) declare fields instead of __init__ parameters
    for klass in config_cls.__mro__:
        allowed |= set(getattr(klass, "__annotations__", {}))
    unknown = sorted(set(values) - allowed)
    if unknown:
        raise ConfigError(
            f"unknown key(s) {', '.join(section + '.' + k for k in unknown)}{_in(source)} for {config_cls.__name__}; "
            f"allowed: {', '.join(sorted(a for a in allowed if not a.startswith('_')))}"
        )
    return dict(values)
