"""Small pieces shared by several test modules."""

import textwrap

# Put at the top of a subprocess script to simulate a user who has not installed latentheat:
# any import of hf_models / trainers fails, and the script checks that it does.
BLOCK_LATENTHEAT = textwrap.dedent(
    """
    import importlib.abc, sys
    class _Block(importlib.abc.MetaPathFinder):  # simulate a user without latentheat installed
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in ("hf_models", "trainers"):
                raise ModuleNotFoundError(name)
    sys.meta_path.insert(0, _Block())
    for _name in [m for m in sys.modules if m.split(".")[0] in ("hf_models", "trainers")]:
        del sys.modules[_name]
    try:
        import hf_models  # noqa: F401
        raise SystemExit("hf_models importable")
    except ModuleNotFoundError:
        pass
    """
)


def train(config, output_dir, *overrides, launcher=None, timeout=900, quiet=True):
    """Run ``python -m trainers.train CONFIG --training.output_dir OUTPUT_DIR [overrides]`` (or under ``launcher``, e.g.
    torchrun) from the repository root; a failed run raises with the tail of its output."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    cmd = list(launcher or [sys.executable]) + ["-m", "trainers.train", str(config), "--training.output_dir", str(output_dir)]
    if quiet:
        cmd += ["--training.disable_progress_bar", "true"]
    proc = subprocess.run(cmd + list(overrides), cwd=repo, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def train_history(output_dir):
    """The training rows (those with ``train/loss``) of a run's ``logs/log_history.jsonl``."""
    import json
    from pathlib import Path

    rows = [json.loads(line) for line in (Path(output_dir) / "logs" / "log_history.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for rendezvous and master ports)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def subprocess_env() -> dict:
    """The environment for launched training processes: the repository on PYTHONPATH, one OpenMP thread each."""
    import os
    from pathlib import Path

    repo = str(Path(__file__).resolve().parents[1])
    pythonpath = os.pathsep.join(p for p in (repo, os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath, "OMP_NUM_THREADS": "1"}


def run_without_latentheat(tmp_path, script, inputs, timeout=300):
    """Run ``script`` (which should start with ``BLOCK_LATENTHEAT``) in a fresh interpreter as
    ``script.py REPO IN OUT`` with ``REPO = tmp_path / "repo"``, ``IN`` a safetensors file of ``inputs`` and no
    ``PYTHONPATH``, offline, from an empty folder; a failed run raises with its stderr. Returns the tensors the
    script saved to ``OUT``."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    save_file(inputs, tmp_path / "in.safetensors")
    (tmp_path / "script.py").write_text(script)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    (tmp_path / "cwd").mkdir()
    result = subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), str(tmp_path / "repo"), str(tmp_path / "in.safetensors"),
         str(tmp_path / "out.safetensors")],
        cwd=tmp_path / "cwd", env=env, capture_output=True, text=True, timeout=timeout,
    )
    if result.returncode != 0:
        raise AssertionError(f"the script failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return load_file(tmp_path / "out.safetensors")


def _in_process(argv, call):
    """Run ``call()`` as the command ``argv`` would run in a fresh interpreter, from the repository root: ``sys.argv``
    is ``argv``, an int returned or a ``SystemExit`` is the exit status (a message goes to stderr with status 1), an
    uncaught exception its traceback with status 1. ``sys.argv``, ``sys.path``, the working folder and torch's thread
    count are restored after. Returns a ``subprocess.CompletedProcess`` with the captured stdout and stderr."""
    import contextlib
    import io
    import subprocess
    import sys
    import traceback
    from pathlib import Path

    import torch

    repo = Path(__file__).resolve().parents[1]
    saved_argv, saved_path, threads = sys.argv, list(sys.path), torch.get_num_threads()
    out, err = io.StringIO(), io.StringIO()
    sys.argv = list(argv)
    try:
        with contextlib.chdir(repo), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = call()
                returncode = code if isinstance(code, int) else 0
            except SystemExit as exit_:
                if exit_.code is None or isinstance(exit_.code, int):
                    returncode = exit_.code or 0
                else:
                    print(exit_.code, file=sys.stderr)
                    returncode = 1
            except Exception:  # noqa: BLE001 - what the interpreter would print before exiting with 1
                traceback.print_exc()
                returncode = 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        torch.set_num_threads(threads)
    return subprocess.CompletedProcess(argv, returncode, out.getvalue(), err.getvalue())


def run_benchmark(name, *args):
    """``python benchmarks/NAME.py ARGS`` in this interpreter, not a fresh one (the imports of torch, transformers and
    diffusers cost seconds per process, and the thermalizer's tests run these scripts a few dozen times), with
    ``benchmarks/`` first on ``sys.path`` as for the command. See ``_in_process``."""
    import runpy
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    if not script.is_file():
        raise FileNotFoundError(script)

    def call():
        sys.path.insert(0, str(script.parent))
        runpy.run_path(str(script), run_name="__main__")

    return _in_process([str(script), *map(str, args)], call)


def run_entry_point(module, *args):
    """``python -m MODULE ARGS`` for a module with ``main(argv) -> int`` (``trainers.evaluate``...), in this
    interpreter. The tests that start the command itself in a fresh process keep doing so; this is for the further
    calls of one test. See ``_in_process``."""
    import importlib

    main = importlib.import_module(module).main
    argv = [str(a) for a in args]
    return _in_process([module, *argv], lambda: main(argv))
