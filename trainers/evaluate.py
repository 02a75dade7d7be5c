"""Re-evaluate a finished run: ``python -m trainers.evaluate OUTPUT_DIR [--evaluation.key value ...] [--write]``.

Loads the exported pipeline and the run's resolved ``config.yaml``, applies the overrides (e.g.
``--evaluation.guidance_scale 1.0`` to measure without classifier-free guidance) and prints the
sample metrics as JSON. ``--write`` merges them into ``eval_results.json`` (and, for tasks that draw plots, rewrites
them in OUTPUT_DIR).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from .arguments import ConfigError, build_config


def load_run_task(out: Path, overrides=()):
    """The task of a finished run in ``out`` (its resolved ``config.yaml`` with ``output_dir`` pointing at ``out``),
    with ``--section.key value`` overrides; a ``ConfigError`` if ``out`` is not a finished run or an override is bad."""
    out = Path(out)
    exported = (out / "model_index.json").is_file() or (out / "eval_results.json").is_file()
    if not (out / "config.yaml").is_file() or not exported:
        raise ConfigError(f"{out} is not a finished run: it needs config.yaml and model_index.json (a pipeline) or "
                          "eval_results.json (a model without a pipeline)")
    raw = yaml.safe_load((out / "config.yaml").read_text())
    raw["training"]["output_dir"] = str(out)
    config = build_config(raw, list(overrides), source=str(out / "config.yaml"))
    from .tasks import build_task

    return build_task(config)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0 if argv else 2
    out = Path(argv[0])
    write = "--write" in argv
    overrides = [a for a in argv[1:] if a != "--write"]
    try:
        task = load_run_task(out, overrides)
        if not hasattr(task, "evaluate_saved"):
            raise ConfigError(f"task {task.name!r} has no re-evaluation yet")
        import inspect

        if "write" in inspect.signature(task.evaluate_saved).parameters:  # tasks that also write plots
            results = task.evaluate_saved(out, write=write)
        else:
            results = task.evaluate_saved(out)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps(results, indent=2, sort_keys=True))
    if write:
        path = out / "eval_results.json"
        merged = json.loads(path.read_text()) if path.is_file() else {}
        merged.update(results)
        path.write_text(json.dumps(merged, indent=2, sort_keys=True) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
