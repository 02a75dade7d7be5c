"""End-to-end training of the DTM in the original 64x64 RGB layout: output folder, pipeline, resume with the
persistent chains, Hub round trip."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import train, train_history
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "dtm_binary64_tiny.yaml")


def run_train(output_dir, *overrides, config=TINY, launcher=None, timeout=600):
    return train(config, output_dir, *overrides, launcher=launcher, timeout=timeout)


history = train_history


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dtm") / "run"
    run_train(out, "--training.logging_steps", "1")
    return out


def test_tiny_run_writes_pipeline_metrics_strip_and_card(tiny_run):
    out = tiny_run
    for name in ("model_index.json", "dtm/model.safetensors", "scheduler/scheduler_config.json", "README.md", "samples.png", "denoising_strip.png", "mixing.json", "config.yaml"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("fid", "fid_floor", "fid_bernoulli", "mixing_tau_mean"):
        assert isinstance(results[key], float) and results[key] == results[key], key
    assert "fid_code_image" in results and results["fid_code_image"] is None  # no code-image run given
    assert results["fid_floor"] < results["fid_bernoulli"]
    mixing = json.loads((out / "mixing.json").read_text())
    assert [s["timestep"] for s in mixing["per_step"]] == [3, 2, 1, 0]
    assert all(len(s["autocorrelation"]) == 4 for s in mixing["per_step"])
    rows = history(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert all("train/cd_loss" in r and "train/dsm_loss" in r for r in rows)
    card = (out / "README.md").read_text()
    assert "model-index" in card and "fid_bernoulli" in card and "DTMPipeline" in card
    # the strip: 2 rows, prior + 4 levels = 5 columns of 64x64 with 2-pixel padding
    from PIL import Image

    strip = Image.open(out / "denoising_strip.png")
    assert strip.size == (5 * 66 + 2, 2 * 66 + 2) and strip.mode == "RGB"


def test_pipeline_from_output_folder(tiny_run):
    from hf_models.pipelines import DTMPipeline

    pipe = DTMPipeline.from_pretrained(str(tiny_run))
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert a.shape == (2, 3, 64, 64) and torch.equal(a, b)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    # the fantasy chains are part of the saved weights
    weights = load_file(str(tiny_run / "dtm" / "model.safetensors"))
    assert weights["fantasy_chains"].shape == (8, 3, 64, 64)
    assert set(weights["fantasy_chains"].unique().tolist()) == {-1.0, 1.0}


def test_resume_restores_the_persistent_chains(tiny_run, tmp_path):
    """6 steps straight vs 3 + resume + 3: the same losses after the resume and the same final chains and couplings.
    The chains live in the checkpoint: with them reset, the loss curve would differ."""
    straight = history(tiny_run)
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    shutil.rmtree(resumed / "dtm")
    (resumed / "checkpoints" / "dtm" / "stage_complete.json").unlink()
    assert sorted(p.name for p in (resumed / "checkpoints" / "dtm").glob("checkpoint-*")) == ["checkpoint-3"]
    (resumed / "logs" / "log_history.jsonl").unlink()
    run_train(resumed, "--training.logging_steps", "1", "--training.resume_from_checkpoint", "latest")
    after = history(resumed)
    assert [r["step"] for r in after] == [4, 5, 6]
    for a, b in zip(after, straight[3:]):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a, b)
    w_straight = load_file(str(tiny_run / "dtm" / "model.safetensors"))
    w_resumed = load_file(str(resumed / "dtm" / "model.safetensors"))
    for name in ("fantasy_chains", "couplings", "biases", "xt_couplings"):
        assert torch.allclose(w_straight[name], w_resumed[name], atol=1e-6), name


def test_bad_dtm_config_fails_before_training(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.train", TINY, "--training.output_dir", str(tmp_path / "bad"), "--model.dtm.block_size", "7"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "block_size" in proc.stderr and "divisible" in proc.stderr
    assert not (tmp_path / "bad" / "checkpoints").exists()


def test_push_then_load_the_pipeline_from_the_hub(tiny_run, hub_server, tmp_path):
    from tests.conftest import hub_env

    repo_id = "latentheat-test/dtm-tiny"
    push = subprocess.run([sys.executable, "-m", "trainers.push", str(tiny_run), repo_id], cwd=REPO, capture_output=True, text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert push.returncode == 0, push.stderr[-3000:]
    script = textwrap.dedent(f"""
        import torch
        from hf_models.pipelines import DTMPipeline
        def draw(pipe):
            pipe.set_progress_bar_config(disable=True)
            return pipe(batch_size=2, generator=torch.Generator().manual_seed(3), output_type="pt").images
        hub_pipe = DTMPipeline.from_pretrained({repo_id!r})
        hub = draw(hub_pipe)
        local = draw(DTMPipeline.from_pretrained({str(tiny_run)!r}))
        assert torch.equal(hub, local), "hub pipeline differs from the local one"
        from huggingface_hub import hf_hub_download
        card = open(hf_hub_download({repo_id!r}, "README.md")).read()
        strip = hf_hub_download({repo_id!r}, "denoising_strip.png")
        assert "fid_bernoulli" in card
        print("pipeline ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert proc.returncode == 0 and "pipeline ok" in proc.stdout, proc.stderr[-3000:]


def test_evaluate_cli_reevaluates_with_more_sweeps(tiny_run):
    proc = subprocess.run(
        [sys.executable, "-m", "trainers.evaluate", str(tiny_run), "--evaluation.sweeps_per_step", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert results["sweeps_per_step"] == 3 and results["evaluation/sweeps_per_step"] == 3
    assert results["fid"] > 0


def test_magnetization_autocorrelation_of_an_ar1_series():
    """AR(1) chains x_{k+1} = phi x_k + noise have rho(lag) = phi**lag and tau = (1 + phi) / (1 - phi)."""
    from trainers.tasks.dtm import integrated_autocorrelation_time, magnetization_autocorrelation

    gen = torch.Generator().manual_seed(0)
    phi, sweeps, chains = 0.6, 4000, 64
    x = torch.zeros(sweeps, chains, dtype=torch.float64)
    noise = torch.randn(sweeps, chains, generator=gen, dtype=torch.float64)
    for k in range(1, sweeps):
        x[k] = phi * x[k - 1] + noise[k]
    rho = magnetization_autocorrelation(x[100:], max_lag=5)
    assert torch.allclose(rho, torch.tensor([phi**k for k in range(1, 6)], dtype=torch.float64), atol=0.02), rho
    tau = integrated_autocorrelation_time(rho)
    assert abs(tau - (1 + 2 * sum(phi**k for k in range(1, 6)))) < 0.1
    # independent draws: no correlation, tau = 1
    white = magnetization_autocorrelation(noise, max_lag=3)
    assert white.abs().max() < 0.02 and integrated_autocorrelation_time(white) == 1.0
    # frozen chains: undefined, reported as nan rather than a made-up number
    assert torch.isnan(magnetization_autocorrelation(torch.ones(50, 4), 3)).all()


def test_binary_images_layouts():
    from trainers.tasks.dtm import binary_images

    images = torch.zeros(3, 28, 28, dtype=torch.uint8)
    images[:, 10:18, 12:16] = 255
    labels = torch.tensor([0, 3, 6])
    grey = binary_images(images, labels, 28, 1, 0.5)
    assert grey.shape == (3, 1, 28, 28) and grey.sum().item() == 3 * 8 * 4
    rgb = binary_images(images, labels, 64, 3, 0.5)
    assert rgb.shape == (3, 3, 64, 64) and set(rgb.unique().tolist()) == {0.0, 1.0}
    # class colours: label 0 -> (0, 0, 1), 3 -> (1, 0, 0), 6 -> (1, 1, 1); never black
    on = rgb.amax(dim=(2, 3))
    assert on.tolist() == [[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [1.0, 1.0, 1.0]]


@pytest.mark.distributed
def test_deepspeed_zero2_trains_the_dtm(tmp_path):
    """`--trainer deepspeed` under torchrun (2 gloo ranks) trains the 28x28 tiny twin and exports a loadable pipeline
    with its fantasy chains; DeepSpeed's per-step deprecation warning does not flood the log."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ds"
    config = str(REPO / "configs" / "experiments" / "dtm_mnist_tiny.yaml")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    proc = run_train(out, "--trainer", "deepspeed", "--training.logging_steps", "1", config=config, launcher=launcher)
    assert proc.stderr.count("all_gather_into_tensor") == 0
    rows = history(out)
    assert [r["step"] for r in rows] == list(range(1, 11))
    state = json.loads((out / "checkpoints" / "dtm" / "checkpoint-5" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2 and state["deepspeed_config"]["zero_optimization"]["stage"] == 2
    from hf_models.pipelines import DTMPipeline

    pipe = DTMPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (2, 1, 28, 28)
    final = load_file(str(out / "dtm" / "model.safetensors"))
    assert set(final["fantasy_chains"].unique().tolist()) == {-1.0, 1.0}

    # roll back to checkpoint-5 and resume: the same losses and the same final chains (rank 0's chains are shared
    # with rank 1 at every step, so the checkpoint holds everything the run needs)
    resumed = tmp_path / "ds_resumed"
    shutil.copytree(out, resumed)
    shutil.rmtree(resumed / "dtm")
    (resumed / "checkpoints" / "dtm" / "stage_complete.json").unlink()
    (resumed / "logs" / "log_history.jsonl").unlink()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        launcher[-1] = str(s.getsockname()[1])
    run_train(resumed, "--trainer", "deepspeed", "--training.logging_steps", "1", "--training.resume_from_checkpoint", "latest", config=config, launcher=launcher)
    after = history(resumed)
    assert [r["step"] for r in after] == [6, 7, 8, 9, 10]
    for a, b in zip(after, rows[5:]):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a, b)
    again = load_file(str(resumed / "dtm" / "model.safetensors"))
    assert torch.equal(again["fantasy_chains"], final["fantasy_chains"])
