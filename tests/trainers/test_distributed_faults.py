"""Distributed runs on one machine: two torchrun "nodes" meeting at a real c10d rendezvous on 127.0.0.1, and a rank
killed with SIGKILL mid-run followed by a resume that ends where an uninterrupted run ends.

Both use the tiny 28x28 DTM (gloo DDP on CPU, one thread per rank)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port, subprocess_env

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "dtm_mnist_tiny.yaml")
COMMON = ["--training.disable_progress_bar", "true", "--training.num_threads", "1", "--evaluation.num_samples", "16"]

pytestmark = pytest.mark.distributed




def _train_cmd(out, *overrides):
    return ["-m", "trainers.train", TINY, "--training.output_dir", str(out), *COMMON, *overrides]


def _losses(out):
    """step -> all-rank mean loss; a resumed run appends, so the last record of a step wins."""
    rows = [json.loads(line) for line in (Path(out) / "logs" / "log_history.jsonl").read_text().splitlines()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def test_two_nodes_rendezvous_on_localhost(tmp_path):
    """`torchrun --nnodes 2` twice (one process per "node") with a c10d rendezvous: both nodes train on disjoint
    shards, node 0 writes the pipeline."""
    out = tmp_path / "nodes"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "latentheat-test",
               *_train_cmd(out, "--training.record_data_indices", "true", "--training.logging_steps", "1")]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, results):
        assert p.returncode == 0, stderr[-6000:]
    seen = [(out / "logs" / f"data_indices_dtm_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 10 * 16  # 10 steps x 16 per rank
    assert not set(seen[0]) & set(seen[1]), "the two nodes trained on the same samples"
    state = json.loads((out / "checkpoints" / "dtm" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2
    assert (out / "model_index.json").is_file() and (out / "dtm" / "model.safetensors").is_file()


def test_sigkill_of_a_rank_then_resume_matches_an_uninterrupted_run(tmp_path):
    steps = ["--training.max_steps", "240", "--training.checkpointing_steps", "40", "--training.logging_steps", "1",
             "--training.save_total_limit", "3"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]

    straight = tmp_path / "straight"
    proc = subprocess.run([*launcher, "--master_port", str(free_port()), *_train_cmd(straight, *steps)], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]

    crashed = tmp_path / "crashed"
    proc = subprocess.Popen([*launcher, "--master_port", str(free_port()), *_train_cmd(crashed, *steps)], cwd=REPO, env=subprocess_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = crashed / "logs" / "log_history.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 100):
        time.sleep(0.2)
    workers = [c for c in psutil.Process(proc.pid).children(recursive=True) if "trainers.train" in " ".join(c.cmdline())]
    rank1 = [w for w in workers if w.environ().get("RANK") == "1"]
    assert len(rank1) == 1, [w.cmdline() for w in workers]
    os.kill(rank1[0].pid, signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode != 0, "torchrun should report the killed rank"
    killed_at = max(_losses(crashed))
    assert killed_at < 240 and not (crashed / "model_index.json").exists()
    assert not (crashed / "checkpoints" / "dtm" / "stage_complete.json").exists()

    # resume: a checkpoint half-written at the moment of the kill is skipped because we ask for it
    proc = subprocess.run([*launcher, "--master_port", str(free_port()),
                           *_train_cmd(crashed, *steps, "--training.resume_from_checkpoint", "latest", "--training.skip_corrupt_checkpoints", "true")],
                          cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    resumed_from = [line for line in proc.stderr.splitlines() if "resumed from" in line]
    assert resumed_from, proc.stderr[-3000:]

    a, b = _losses(straight), _losses(crashed)
    assert sorted(a) == sorted(b) == list(range(1, 241))
    for step in range(1, 241):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])
    wa, wb = load_file(str(straight / "dtm" / "model.safetensors")), load_file(str(crashed / "dtm" / "model.safetensors"))
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6), name
