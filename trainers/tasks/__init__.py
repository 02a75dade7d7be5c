"""Task registry: ``task: <name>`` in an experiment file picks one of these."""

from __future__ import annotations

import importlib

from ..arguments import ConfigError

TASKS = {
    "abstractinator": "trainers.tasks.abstractinator:AbstractinatorTask",
    "code_image": "trainers.tasks.code_image:CodeImageTask",
    "dtm": "trainers.tasks.dtm:DTMTask",
    "thermalizer": "trainers.tasks.thermalizer:ThermalizerTask",
    "tokcom": "trainers.tasks.tokcom:TokComTask",
}


def build_task(config):
    if config.task not in TASKS:
        raise ConfigError(f"task={config.task!r} is not a latentheat system; available: {', '.join(sorted(TASKS))}")
    module, cls = TASKS[config.task].split(":")
    return getattr(importlib.import_module(module), cls)(config)
