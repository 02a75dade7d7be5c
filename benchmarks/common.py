"""What the benchmark scripts share: the best-of-N timer, the machine's description that goes with every figure,
loading a finished run's task, and writing the figures to ``benchmarks/results/NAME.json``. The scripts run as ``python benchmarks/NAME.py``, so
this folder is first on ``sys.path`` and they import it as ``common``."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def best_of(fn: Callable[[], object], repeats: int, warmup: bool = True) -> float:
    """The shortest of ``repeats`` wall-clock timings of ``fn()`` in seconds (after one untimed call if ``warmup``):
    the least disturbed run on a noisy machine."""
    if repeats < 1:
        raise ValueError(f"repeats={repeats} is invalid: expected at least 1")
    if warmup:
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def machine() -> dict:
    """The processor, torch's thread count, the 1-minute load average (other work on the cores slows a run) and the
    torch version."""
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }


def write_results(name: str, result: dict, path: str | os.PathLike | None = None) -> Path:
    """Write ``result`` as indented JSON to ``path`` (default ``benchmarks/results/NAME.json``); returns the path."""
    path = Path(path) if path is not None else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    return path


def run_task(output_dir: str | os.PathLike, overrides: list | None = None):
    """The task of the finished run in ``output_dir`` (its saved configuration, with ``overrides``), or exit with the
    configuration's error."""
    from trainers.arguments import ConfigError
    from trainers.evaluate import load_run_task

    try:
        return load_run_task(Path(output_dir), overrides or ())
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
