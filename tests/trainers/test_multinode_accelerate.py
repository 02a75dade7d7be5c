"""Two `accelerate launch` "machines" on one host: configs/accelerate/multi_node.yaml started twice (machine_rank 0 and
1, one process each) meeting at 127.0.0.1 on a free port, training the tiny 28x28 DTM (gloo DDP on CPU, one thread per
rank). The command lines are the ones the config's header and the README give, with this host as both machines."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import free_port, subprocess_env, train_history

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "accelerate" / "multi_node.yaml"
TINY = str(REPO / "configs" / "experiments" / "dtm_mnist_tiny.yaml")
COMMON = ["--training.disable_progress_bar", "true", "--training.num_threads", "1", "--evaluation.num_samples", "16"]
TIMEOUT = 600  # seconds for the whole two-machine run; a stuck rendezvous or collective fails the test

pytestmark = pytest.mark.distributed




def _launch(machine_rank, port, out):
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIG),
           "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1", "--main_process_port", str(port),
           "-m", "trainers.train", TINY, "--training.output_dir", str(out), *COMMON,
           "--training.record_data_indices", "true", "--training.logging_steps", "1"]
    # own process group: on a timeout the launcher and its worker are killed together
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def test_config_describes_two_machines():
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIG))
    assert str(config.distributed_type).rsplit(".", 1)[-1] == "MULTI_GPU"
    assert (config.num_machines, config.num_processes, config.machine_rank) == (2, 2, 0)
    assert config.same_network and config.rdzv_backend == "static"


def test_two_machines_accelerate_launch_on_localhost(tmp_path):
    """Both launches exit 0, each machine runs one rank of a world of two, the ranks train on disjoint shards, and
    machine 0 writes the pipeline with the final weights (trained past the step-5 checkpoint)."""
    out = tmp_path / "machines"
    port = free_port()
    procs = [_launch(rank, port, out) for rank in (0, 1)]
    results = []
    try:
        for p in procs:
            results.append(p.communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
    for rank, (p, (stdout, stderr)) in enumerate(zip(procs, results)):
        assert p.returncode == 0, f"machine {rank} failed:\n{stderr[-6000:]}"

    seen = [(out / "logs" / f"data_indices_dtm_rank{r}.txt").read_text().split() for r in (0, 1)]
    assert len(seen[0]) == len(seen[1]) == 10 * 16  # 10 steps x 16 per rank
    assert not set(seen[0]) & set(seen[1]), "the two machines trained on the same samples"
    assert not (out / "logs" / "data_indices_dtm_rank2.txt").exists()

    ckpt = out / "checkpoints" / "dtm" / "checkpoint-5"
    assert json.loads((ckpt / "trainer_state.json").read_text())["num_processes"] == 2
    assert sorted(f.name for f in ckpt.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    rows = train_history(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert all(torch.isfinite(torch.tensor(r["train/loss"])) for r in rows)

    assert (out / "model_index.json").is_file() and (out / "eval_results.json").is_file()
    final = load_file(str(out / "dtm" / "model.safetensors"))
    halfway = load_file(str(ckpt / "model.safetensors"))
    assert final and final.keys() == halfway.keys()
    assert any(not torch.equal(final[k], halfway[k]) for k in final), "steps 6-10 did not change the saved weights"

    from hf_models.dtm import DTMModel

    model = DTMModel.from_pretrained(out / "dtm")
    for name, tensor in model.state_dict().items():
        if name in final:
            assert torch.equal(tensor, final[name]), name
