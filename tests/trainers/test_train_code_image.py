"""End-to-end training of the code-image system: one process, two processes, resume, faults."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import run_entry_point

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "code_image_mnist_tiny.yaml")


def run_train(output_dir, *overrides, launcher=None, check=True, timeout=600, env=None):
    cmd = list(launcher or [sys.executable]) + ["-m", "trainers.train", TINY, "--training.output_dir", str(output_dir), "--training.disable_progress_bar", "true", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def history(output_dir, stage):
    path = Path(output_dir) / "logs" / "log_history.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and "train/loss" in r]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    run_train(out, "--training.logging_steps", "1")
    return out


def test_tiny_run_writes_the_output_folder(tiny_run):
    out = tiny_run
    for name in ("model_index.json", "README.md", "eval_results.json", "samples.png", "config.yaml", "vq_tokenizer/model.safetensors", "code_gpt/model.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.rglob("*.bin")) or all("checkpoints" in str(p) for p in out.rglob("*.bin"))  # weights are safetensors
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("fid", "fid_floor", "class_accuracy", "bits_per_code", "recon_psnr"):
        assert isinstance(results[key], float) and results[key] == results[key], key
    assert 0.0 <= results["class_accuracy"] <= 1.0
    assert results["fid"] > results["fid_floor"] > 0
    # the code GPT learned something: fewer bits per code than a uniform draw over the codebook
    codebook = json.loads((out / "vq_tokenizer" / "config.json").read_text())["codebook_size"]
    assert results["bits_per_code"] < torch.log2(torch.tensor(float(codebook))).item()
    card = (out / "README.md").read_text()
    assert "model-index" in card and "class_accuracy" in card
    # losses fell in both stages
    for stage in ("vq_tokenizer", "code_gpt"):
        losses = [r["train/loss"] for r in history(out, stage)]
        assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (stage, losses)
    # tensorboard events were written
    assert list((out / "logs").rglob("events.out.tfevents.*"))


def test_pipeline_from_output_folder_is_deterministic(tiny_run):
    from hf_models.pipelines import CodeImagePipeline

    pipe = CodeImagePipeline.from_pretrained(str(tiny_run))
    pipe.set_progress_bar_config(disable=True)
    a = pipe(class_labels=[1, 7], num_images_per_label=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(class_labels=[1, 7], num_images_per_label=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    c = pipe(class_labels=[1, 7], num_images_per_label=2, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert a.shape == (4, 1, 28, 28) and torch.equal(a, b) and not torch.equal(a, c)
    assert 0.0 <= a.min() and a.max() <= 1.0
    pil = pipe(class_labels=3, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 1 and pil[0].size == (28, 28)
    (codes,) = pipe(class_labels=[0, 9], output_type="latent", return_dict=False, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (2, 7, 7) and codes.dtype == torch.long
    with pytest.raises(ValueError, match="class_labels"):
        pipe(class_labels=[10])
    with pytest.raises(ValueError, match="output_type"):
        pipe(class_labels=[1], output_type="jpeg")


def test_remote_code_loads_without_latentheat(tiny_run, tmp_path):
    """AutoModel(..., trust_remote_code=True) from the output folder with hf_models unimportable."""
    from tests.helpers import BLOCK_LATENTHEAT

    script = BLOCK_LATENTHEAT + f"""
import torch
from transformers import AutoModel, AutoModelForCausalLM
vq = AutoModel.from_pretrained({str(tiny_run / 'vq_tokenizer')!r}, trust_remote_code=True)
gpt = AutoModelForCausalLM.from_pretrained({str(tiny_run / 'code_gpt')!r}, trust_remote_code=True)
assert type(vq).__module__.startswith('transformers_modules'), type(vq).__module__
x = torch.zeros(2, 1, 28, 28)
codes = vq.encode(x)
print(tuple(codes.shape), type(gpt).__name__)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env={**os.environ, "HF_HOME": str(tmp_path / "hf")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(2, 7, 7) CodeGPTForCausalLM" in proc.stdout


@pytest.mark.distributed
def test_two_processes_see_disjoint_data(tmp_path):
    out = tmp_path / "ddp"
    # accelerate 1.15: `--cpu --num_processes 2` starts one process; the config file starts two (see its comment)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml")]
    run_train(out, "--training.record_data_indices", "true", "--stages.code_gpt.max_steps", "5", launcher=launcher)
    seen = []
    for rank in (0, 1):
        rows = (out / "logs" / f"data_indices_vq_tokenizer_rank{rank}.txt").read_text().split()
        seen.append([int(i) for i in rows])
    # 20 steps x 32 per rank = 640 of the 1024 indices each rank owns in the first epoch
    assert len(seen[0]) == len(seen[1]) == 20 * 32
    assert not set(seen[0]) & set(seen[1]), "ranks trained on the same samples"
    assert len(set(seen[0])) == len(seen[0])
    assert json.loads((out / "eval_results.json").read_text())["bits_per_code"] > 0


@pytest.mark.parametrize("stage", ["vq_tokenizer", "code_gpt"])
def test_resume_continues_the_same_loss_curve(tiny_run, tmp_path, stage):
    """2N steps straight vs N + resume + N: same losses at every step after the resume (fp32, 1e-6)."""
    straight = history(tiny_run, stage)
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    # roll back to checkpoint-10 of `stage`: later stages and the final export are gone
    stages = ["vq_tokenizer", "code_gpt"]
    for later in stages[stages.index(stage):]:
        shutil.rmtree(resumed / later)
        (resumed / "checkpoints" / later / "stage_complete.json").unlink()
        if later != stage:
            shutil.rmtree(resumed / "checkpoints" / later)
    (resumed / "logs" / "log_history.jsonl").unlink()
    run_train(resumed, "--training.logging_steps", "1", "--training.resume_from_checkpoint", "latest")
    after = history(resumed, stage)
    assert [r["step"] for r in after] == list(range(11, 21))
    for a, b in zip(after, straight[10:]):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a, b)


def test_corrupt_checkpoint_is_reported_not_loaded(tiny_run, tmp_path):
    run = tmp_path / "corrupt"
    shutil.copytree(tiny_run, run)
    shutil.rmtree(run / "code_gpt")
    (run / "checkpoints" / "code_gpt" / "stage_complete.json").unlink()
    ckpt = run / "checkpoints" / "code_gpt" / "checkpoint-10"
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    proc = run_train(run, "--training.resume_from_checkpoint", "latest", check=False)
    assert proc.returncode != 0
    assert "checkpoint-10 is corrupt" in proc.stderr and "model.safetensors" in proc.stderr
    assert not (run / "code_gpt").exists()
    # with skip_corrupt_checkpoints the stage restarts from scratch (no older checkpoint is left)
    proc = run_train(run, "--training.resume_from_checkpoint", "latest", "--training.skip_corrupt_checkpoints", "true")
    assert (run / "code_gpt" / "model.safetensors").is_file()


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path):
    out = tmp_path / "nan"
    proc = run_train(out, "--stages.vq_tokenizer.learning_rate", "1e30", "--training.max_grad_norm", "null", "--training.checkpointing_steps", "1", check=False)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "non-finite loss" in proc.stderr and "Last good checkpoint" in proc.stderr
    assert not (out / "vq_tokenizer").exists() and not (out / "model_index.json").exists()


def test_sigterm_writes_a_checkpoint_and_exits_cleanly(tmp_path):
    out = tmp_path / "term"
    cmd = [sys.executable, "-m", "trainers.train", TINY, "--training.output_dir", str(out), "--training.disable_progress_bar", "true",
           "--stages.vq_tokenizer.max_steps", "100000", "--training.logging_steps", "1", "--training.checkpointing_steps", "0"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "logs" / "log_history.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and not (log.is_file() and log.read_text().count("\n") >= 3):
        time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 0, stderr[-3000:]
    assert "training stopped by SIGTERM after writing a checkpoint" in stderr
    ckpts = list((out / "checkpoints" / "vq_tokenizer").glob("checkpoint-*"))
    assert len(ckpts) == 1 and (ckpts[0] / "trainer_state.json").is_file()
    from trainers.checkpointing import verify_checkpoint

    state = verify_checkpoint(ckpts[0])
    assert 3 <= state["global_step"] < 100000


def test_push_then_load_pipeline_and_remote_code_from_the_hub(tiny_run, hub_server, tmp_path):
    """trainers.push to the loopback Hub, then load back into fresh caches in new processes."""
    import textwrap

    from tests.conftest import hub_env

    repo_id = "latentheat-test/code-image-tiny"
    push = subprocess.run([sys.executable, "-m", "trainers.push", str(tiny_run), repo_id], cwd=REPO, capture_output=True, text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert push.returncode == 0, push.stderr[-3000:]

    # both pipelines in one fresh process: same threads, same kernels, so samples must match exactly
    load_pipeline = textwrap.dedent(f"""
        import torch
        from hf_models.pipelines import CodeImagePipeline
        def draw(pipe):
            pipe.set_progress_bar_config(disable=True)
            return pipe(class_labels=[2, 5], generator=torch.Generator().manual_seed(3), output_type="pt").images
        hub = draw(CodeImagePipeline.from_pretrained({repo_id!r}))
        local = draw(CodeImagePipeline.from_pretrained({str(tiny_run)!r}))
        assert hub.shape == (2, 1, 28, 28) and torch.equal(hub, local), "hub pipeline differs from the local one"
        print("pipeline ok")
    """)
    proc = subprocess.run([sys.executable, "-c", load_pipeline], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert proc.returncode == 0 and "pipeline ok" in proc.stdout, proc.stderr[-3000:]

    from tests.helpers import BLOCK_LATENTHEAT

    remote_code = BLOCK_LATENTHEAT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        vq = AutoModel.from_pretrained({repo_id!r}, subfolder="vq_tokenizer", trust_remote_code=True)
        gpt = AutoModelForCausalLM.from_pretrained({repo_id!r}, subfolder="code_gpt", trust_remote_code=True)
        codes = gpt.generate_codes(torch.tensor([4]), generator=torch.Generator().manual_seed(0))
        image = vq.decode(codes.view(1, 7, 7))
        print("remote ok", tuple(image.shape))
    """)
    proc = subprocess.run([sys.executable, "-c", remote_code], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert proc.returncode == 0 and "remote ok (1, 1, 28, 28)" in proc.stdout, proc.stderr[-3000:]


def test_training_options_ema_accumulation_bf16_periodic_eval_and_hub_push(tmp_path, hub_server):
    """EMA, gradient accumulation, bf16 autocast, periodic eval/sample grids, pruning and hub.push in one run."""
    from tests.conftest import hub_env

    out = tmp_path / "options"
    repo_id = "latentheat-test/options-run"
    run_train(
        out,
        "--training.use_ema", "true", "--training.ema_decay", "0.9",
        "--training.gradient_accumulation_steps", "2",
        "--training.mixed_precision", "bf16",
        "--training.eval_steps", "5", "--training.sample_steps", "5",
        "--training.checkpointing_steps", "4", "--training.save_total_limit", "2",
        "--training.logging_steps", "1",
        "--hub.push", "true", "--hub.repo_id", repo_id,
        env=hub_env(hub_server, tmp_path),
    )
    # accumulation: 20 optimizer steps of 2 micro-batches each
    rows = history(out, "vq_tokenizer")
    assert [r["step"] for r in rows] == list(range(1, 21))
    evals = [json.loads(l) for l in (out / "logs" / "log_history.jsonl").read_text().splitlines() if "eval/recon_psnr" in l]
    assert [r["step"] for r in evals] == [5, 10, 15, 20]
    grids = sorted(p.name for p in (out / "logs" / "samples").glob("vq_tokenizer-step*.png"))
    assert grids == ["vq_tokenizer-step000005.png", "vq_tokenizer-step000010.png", "vq_tokenizer-step000015.png", "vq_tokenizer-step000020.png"]
    # pruning keeps the newest two of checkpoint-4/8/12/16
    assert sorted(p.name for p in (out / "checkpoints" / "vq_tokenizer").glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-16"]
    # the EMA state is part of each checkpoint
    assert list((out / "checkpoints" / "vq_tokenizer" / "checkpoint-16").glob("custom_checkpoint_1.*"))
    # pushed: the repo on the loopback Hub holds the card and the pipeline
    import urllib.request

    with urllib.request.urlopen(f"{hub_server.url}/api/models/{repo_id}") as response:
        info = json.loads(response.read())
    pushed = {s["rfilename"] for s in info["siblings"]}
    assert {"model_index.json", "README.md", "eval_results.json", "samples.png", "code_gpt/model.safetensors"} <= pushed
    assert not any(f.startswith(("checkpoints/", "logs/")) for f in pushed)


def test_evaluate_cli_reevaluates_a_finished_run(tiny_run, tmp_path):
    run = tmp_path / "eval"
    shutil.copytree(tiny_run, run)
    before = json.loads((run / "eval_results.json").read_text())
    proc = subprocess.run([sys.executable, "-m", "trainers.evaluate", str(run), "--evaluation.guidance_scale", "2.0", "--write"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert printed["evaluation/guidance_scale"] == 2.0 and 0.0 <= printed["class_accuracy"] <= 1.0
    after = json.loads((run / "eval_results.json").read_text())
    assert after["class_accuracy"] == printed["class_accuracy"] and after["bits_per_code"] == before["bits_per_code"]
    bad = run_entry_point("trainers.evaluate", run, "--evaluation.guidance", "2.0")
    assert bad.returncode == 2 and "evaluation.guidance" in bad.stderr
    missing = run_entry_point("trainers.evaluate", tmp_path / "nope")
    assert missing.returncode == 2 and "not a finished run" in missing.stderr


def test_mlflow_tracker_records_the_losses(tmp_path):
    pytest.importorskip("mlflow", reason="mlflow is in the dev extra; install with pip install -e '.[dev]'")
    out = tmp_path / "mlflow"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    cmd = [sys.executable, "-m", "trainers.train", TINY, "--training.output_dir", str(out), "--training.disable_progress_bar", "true",
           "--training.report_to", "tensorboard,mlflow", "--training.logging_steps", "1",
           "--stages.vq_tokenizer.max_steps", "4", "--stages.code_gpt.max_steps", "3"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out / 'logs' / 'mlflow.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name == "code_image"]
    (run,) = client.search_runs([experiment.experiment_id])
    history = client.get_metric_history(run.info.run_id, "vq_tokenizer/train/loss")
    assert [m.step for m in history] == [1, 2, 3, 4]
    assert run.data.params["training/output_dir"] == str(out)
