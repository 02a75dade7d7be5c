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
