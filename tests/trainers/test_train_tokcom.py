"""End-to-end training of TokCom on Shakespeare: the three stages in one process, the output folder and its metrics,
the pipeline's four modes, resume of the denoiser stage, ZeRO-2 under torchrun, the Hub round trip, config errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "tokcom_shakespeare_tiny.yaml")
STAGES = ("vae", "denoiser", "reference_lm")


def run_train(output_dir, *overrides, launcher=None, check=True, timeout=600):
    cmd = list(launcher or [sys.executable]) + ["-m", "trainers.train", TINY, "--training.output_dir", str(output_dir),
                                                "--training.disable_progress_bar", "true", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def history(output_dir, stage, key="train/loss"):
    rows = [json.loads(line) for line in (Path(output_dir) / "logs" / "log_history.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and key in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tokcom") / "run"
    run_train(out, "--training.logging_steps", "1")
    return out


def test_tiny_run_writes_the_output_folder(tiny_run):
    out = tiny_run
    for name in ("model_index.json", "README.md", "eval_results.json", "samples.md", "config.yaml", "vae/model.safetensors",
                 "denoiser/model.safetensors", "reference_lm/model.safetensors", "tokenizer/tokenizer.json",
                 "scheduler/scheduler_config.json", "modeling_tokcom.py"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("reconstruction_accuracy", "reconstruction_ce", "reconstruction_accuracy_noise_0.3", "denoiser_ce", "denoiser_mse",
                "generated_perplexity", "reference_perplexity", "reference_bits_per_byte", "gzip_bits_per_byte",
                "bzip2_bits_per_byte", "xz_bits_per_byte"):
        assert isinstance(results[key], float) and results[key] == results[key] and results[key] >= 0, key
    # noise on the latents can only cost accuracy (up to sampling noise), never buy it
    assert results["reconstruction_accuracy_noise_1"] <= results["reconstruction_accuracy"] + 0.02
    # the compressors see real English: between 2 and 4 bits per byte (DATA.md: 2.4-3.1 on the whole test split)
    assert 2.0 < results["bzip2_bits_per_byte"] < 4.0 and 2.0 < results["gzip_bits_per_byte"] < 4.5
    # the VAE's and the reference LM's losses fell (20 steps leave the VAE near a unigram model, so the denoiser's
    # cross-entropy through its decoder has nothing to fall to: the tiny run only checks that stage ran, finite)
    for stage in ("vae", "reference_lm"):
        losses = [r["train/loss"] for r in history(out, stage)]
        assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, (stage, losses)
    rows = history(out, "denoiser")
    assert len(rows) == 20 and all(r["train/loss"] == r["train/ce_loss"] and r["train/mse_loss"] >= 0 for r in rows)
    assert all(0 < r["train/loss"] < 20 for r in rows)
    card = (out / "README.md").read_text()
    assert "model-index" in card and "pipeline_tag: text-generation" in card and "generated_perplexity" in card
    assert "Test windows (above)" in card  # samples.md is in the card
    samples = (out / "samples.md").read_text()
    assert samples.count("```text") == 2 + 2 * 2  # num_printed_samples: 2 generated, 2 test windows + reconstructions


def test_pipeline_from_output_folder(tiny_run):
    from hf_models.pipelines import TokComPipeline

    pipe = TokComPipeline.from_pretrained(str(tiny_run))
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, num_chunks=3, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    b = pipe(batch_size=2, num_chunks=3, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert a.texts == b.texts and all(isinstance(t, str) for t in a.texts) and a.token_ids.shape == (2, 12)
    assert len(pipe.tokenizer) == 8192  # the BPE-8192 tokenizer trained on the Shakespeare train split
    text = "Now is the winter of our discontent"
    latents = pipe.encode(text)
    assert latents.shape[0] == 1 and latents.shape[2] == 16
    ids, (n,) = pipe.tokenize(text)
    assert pipe.reconstruct(text)[0] == pipe.tokenizer.decode(pipe.decode(latents).token_ids[0, :n].tolist())
    # the denoiser was trained at this run's 8 latents per window; more is refused
    with pytest.raises(ValueError, match="max_chunks=8"):
        pipe(num_chunks=9)


def test_resume_of_the_denoiser_continues_the_same_loss_curve(tiny_run, tmp_path):
    """20 denoiser steps straight vs 10 + resume + 10: the same losses (fp32, 1e-6); the frozen VAE is reloaded."""
    straight = history(tiny_run, "denoiser")
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    for later in ("denoiser", "reference_lm"):
        shutil.rmtree(resumed / later)
        (resumed / "checkpoints" / later / "stage_complete.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / "reference_lm")
    (resumed / "logs" / "log_history.jsonl").unlink()
    run_train(resumed, "--training.logging_steps", "1", "--training.resume_from_checkpoint", "latest")
    after = history(resumed, "denoiser")
    assert [r["step"] for r in after] == list(range(11, 21))
    for a, b in zip(after, straight[10:]):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a, b)


@pytest.mark.distributed
def test_zero2_torchrun_trains_tokcom(tmp_path):
    """The design's command: `torchrun --nproc_per_node 2 -m trainers.train tokcom_*.yaml --trainer deepspeed`."""
    out = tmp_path / "ds"
    port = __import__("tests.helpers", fromlist=["free_port"]).free_port()
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    run_train(out, "--trainer", "deepspeed", "--training.logging_steps", "1", "--training.checkpointing_steps", "3",
              *[arg for s in STAGES for arg in (f"--stages.{s}.max_steps", "6")], launcher=launcher, timeout=600)
    for stage in STAGES:
        rows = history(out, stage)
        assert [r["step"] for r in rows] == list(range(1, 7)), stage
        ckpt = out / "checkpoints" / stage / "checkpoint-3" / "deepspeed"
        assert {p.name for p in ckpt.glob("*optim_states.pt")} == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    results = json.loads((out / "eval_results.json").read_text())
    assert results["denoiser_ce"] > 0 and results["reference_perplexity"] > 1


def test_push_then_load_from_the_hub(tiny_run, hub_server, tmp_path):
    from tests.conftest import hub_env
    from tests.helpers import BLOCK_LATENTHEAT

    repo_id = "latentheat-test/tokcom-tiny"
    push = subprocess.run([sys.executable, "-m", "trainers.push", str(tiny_run), repo_id], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert push.returncode == 0, push.stderr[-3000:]
    load = textwrap.dedent(f"""
        import torch
        from hf_models.pipelines import TokComPipeline
        def draw(pipe):
            pipe.set_progress_bar_config(disable=True)
            return pipe(batch_size=2, num_chunks=4, num_inference_steps=3, generator=torch.Generator().manual_seed(1)).texts
        hub, local = draw(TokComPipeline.from_pretrained({repo_id!r})), draw(TokComPipeline.from_pretrained({str(tiny_run)!r}))
        assert hub == local, (hub, local)
        print("pipeline ok")
    """)
    proc = subprocess.run([sys.executable, "-c", load], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert proc.returncode == 0 and "pipeline ok" in proc.stdout, proc.stderr[-3000:]
    remote = BLOCK_LATENTHEAT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        vae = AutoModel.from_pretrained({repo_id!r}, subfolder="vae", trust_remote_code=True)
        den = AutoModel.from_pretrained({repo_id!r}, subfolder="denoiser", trust_remote_code=True)
        x1 = den(torch.zeros(1, 8, 16), 0.0).sample
        print("remote ok", tuple(vae.decode(x1).shape))
    """)
    proc = subprocess.run([sys.executable, "-c", remote], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert proc.returncode == 0 and "remote ok (1, 32, 8192)" in proc.stdout, proc.stderr[-3000:]


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--data.seq_len", "30"], "data.seq_len=30 is not a multiple of model.vae.chunk_size=4"),
        (["--model.vae.vocab_size", "100"], "model.vae.vocab_size=100 differs from the tokenizer's 8192"),
        (["--model.denoiser.latent_size", "8"], "model.denoiser.latent_size=8 differs from the VAE's 16"),
        (["--model.denoiser.max_chunks", "4"], "max_chunks=4 is shorter than data.seq_len / chunk_size = 8"),
        (["--model.vae.chunk_size", "0"], "chunk_size=0 is invalid"),
        (["--model.reference_lm.vocab_size", "10"], "model.reference_lm.vocab_size is derived"),
        (["--stages.decoder.max_steps", "3"], "unknown stage"),
    ],
)
def test_config_errors(overrides, message):
    """Bad settings fail when the task is built (or, for the vocabulary, when the tokenizer is known), before training."""
    from trainers.arguments import ConfigError, load_config
    from trainers.tasks import build_task

    with pytest.raises(ConfigError, match=message):
        task = build_task(load_config(TINY, overrides))
        task.vae_config  # noqa: B018 - the VAE config needs the tokenizer's vocabulary


def test_denoiser_loss_weights():
    """The denoiser stage trains on ce_loss_weight * CE (through the frozen decoder) + mse_loss_weight * MSE."""
    from hf_models.tokcom import TokComVAEConfig, TokComVAEModel
    from trainers.arguments import load_config
    from trainers.tasks import build_task

    task = build_task(load_config(TINY, ["--model.denoiser.ce_loss_weight", "0.5", "--model.denoiser.mse_loss_weight", "2.0"]))
    torch.manual_seed(0)
    task.vae_model = TokComVAEModel(TokComVAEConfig(vocab_size=8192, latent_size=16, backbone_config={
        "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 16}))
    stage = task.stages()[1]
    model = stage.build_model()
    batch = {"input_ids": torch.randint(0, 8192, (3, 32), generator=torch.Generator().manual_seed(1))}
    out = stage.compute_loss(model, batch, torch.Generator().manual_seed(2))
    assert out.loss.item() == pytest.approx(0.5 * out.logs["ce_loss"] + 2.0 * out.logs["mse_loss"], rel=1e-5)
    assert out.logs["mse_loss"] > 0 and out.num_items == 3 * 32


def test_lora_fine_tunes_every_stage_from_a_finished_run(tiny_run, tmp_path):
    """`peft.enabled` on TokCom: each stage trains LoRA adapters on its Qwen2 attention projections; the base run's
    files stay untouched and the exported pipeline (merged weights) still generates."""
    from safetensors.torch import load_file

    before = {p: p.read_bytes() for s in STAGES for p in (tiny_run / s).glob("*.safetensors")}
    out = tmp_path / "lora"
    run_train(out, "--peft.enabled", "true", "--peft.base_model", str(tiny_run), "--peft.r", "2",
              *[arg for s in STAGES for arg in (f"--stages.{s}.max_steps", "4")])
    for stage in STAGES:
        adapter = load_file(str(out / stage / "adapter" / "adapter_model.safetensors"))
        names = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter if ".lora_" in k}
        assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}, (stage, names)
        assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k), stage  # B starts at 0
    assert all(p.read_bytes() == data for p, data in before.items())
    from hf_models.pipelines import TokComPipeline

    pipe = TokComPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert len(pipe(batch_size=1, num_chunks=2, num_inference_steps=2).texts) == 1
