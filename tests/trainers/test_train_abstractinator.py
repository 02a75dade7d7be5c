"""End-to-end training of the Abstractinator on Shakespeare's bytes: the tiny run in one process, its output folder and
metrics, re-evaluation, resume, two processes under `accelerate launch`, the Hub round trip, LoRA, config errors."""

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "abstractinator_shakespeare_tiny.yaml")
STAGE = "abstractinator"  # stage 2 and the exported model
STAGES = ("autoencoder", STAGE)


def run_train(output_dir, *overrides, launcher=None, check=True, timeout=600):
    cmd = list(launcher or [sys.executable]) + ["-m", "trainers.train", TINY, "--training.output_dir", str(output_dir),
                                                "--training.disable_progress_bar", "true", *overrides]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def history(output_dir, stage="autoencoder", key="train/loss"):
    rows = [json.loads(line) for line in (Path(output_dir) / "logs" / "log_history.jsonl").read_text().splitlines()]
    return [r for r in rows if r["stage"] == stage and key in r]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("abstractinator") / "run"
    run_train(out, "--training.logging_steps", "1")
    return out


def test_tiny_run_writes_the_output_folder(tiny_run):
    out = tiny_run
    for name in ("README.md", "eval_results.json", "samples.md", "config.yaml", f"{STAGE}/model.safetensors",
                 f"{STAGE}/config.json", "modeling_abstractinator.py", "configuration_abstractinator.py"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval_results.json").read_text())
    for key in ("bits_per_byte", "code_bits_per_byte", "expander_bits_per_byte", "entropy_model_bits_per_byte",
                "bytes_per_code", "codebook_usage", "code_perplexity", "teacher_forced_accuracy",
                "greedy_reconstruction_byte_error_rate", "greedy_reconstruction_exact_match", "gzip_bits_per_byte",
                "bzip2_bits_per_byte", "xz_bits_per_byte", "generated_bytes_mean"):
        assert isinstance(results[key], float) and math.isfinite(results[key]) and results[key] >= 0, key
    assert results["bits_per_byte"] == pytest.approx(results["code_bits_per_byte"] + results["expander_bits_per_byte"])
    # segments are at most max_segment_length = 8 bytes long, and at least one byte
    assert 1.0 <= results["bytes_per_code"] <= 8.0
    assert results["seq_len"] == 64 and results["num_test_windows"] == 32
    # the compressors see real English: between 2 and 5 bits per byte on 2 KB
    assert 2.0 < results["bzip2_bits_per_byte"] < 5.0
    losses = [r["train/loss"] for r in history(out)]
    assert len(losses) == 20 and sum(losses[-5:]) / 5 < sum(losses[:5]) / 5, losses
    for key in ("train/reconstruction_loss", "train/aux_lm_loss", "train/code_lm_loss", "train/commitment_loss"):
        assert len(history(out, "autoencoder", key)) == 20, key
    # stage 2 trains the code LM alone: its loss is the code LM's
    rows = history(out, STAGE)
    assert len(rows) == 10 and all(r["train/loss"] == r["train/code_lm_loss"] for r in rows)
    assert not history(out, STAGE, "train/reconstruction_loss")
    card = (out / "README.md").read_text()
    assert "model-index" in card and "pipeline_tag: text-generation" in card and "bits_per_byte" in card
    assert 'subfolder="abstractinator"' in card and "greedy reconstructions" in card  # samples.md is in the card
    assert (out / "samples.md").read_text().count("```text") == 2 + 2 * 2  # 2 samples, 2 windows + reconstructions


def test_stage_two_changes_the_code_lm_only(tiny_run):
    """Everything but the code LM (compressors, codebooks, expanders) is stage 1's, bit for bit; the code LM moved."""
    from safetensors.torch import load_file

    first = load_file(str(tiny_run / "autoencoder" / "model.safetensors"))
    final = load_file(str(tiny_run / STAGE / "model.safetensors"))
    assert first.keys() == final.keys()
    frozen = [k for k in first if not k.startswith("code_lm.")]
    assert any("quantizer.codebook" in k for k in frozen) and any(k.startswith("expanders.") for k in frozen)
    assert all(torch.equal(first[k], final[k]) for k in frozen)
    assert any(not torch.equal(first[k], final[k]) for k in first if k.startswith("code_lm."))
    results = json.loads((tiny_run / "eval_results.json").read_text())
    stage_one = [r for r in history(tiny_run, "autoencoder", "eval/expander_bits_per_byte")]
    assert results["expander_bits_per_byte"] == pytest.approx(stage_one[-1]["eval/expander_bits_per_byte"], rel=1e-6)


def test_model_from_the_output_folder_and_re_evaluation(tiny_run):
    from hf_models.abstractinator import AbstractinatorModel
    from hf_models.data.bytes import shakespeare_bytes

    model = AbstractinatorModel.from_pretrained(str(tiny_run / STAGE)).eval()
    window = torch.tensor([list(shakespeare_bytes("test")[:64])])
    bits = model.causal_bits(window)
    assert bits["num_bytes"].item() == 64 and bits["bits"].item() > 0
    torch.manual_seed(0)
    assert isinstance(model.generate_bytes("Now is the winter", max_new_codes=2), bytes)
    proc = subprocess.run([sys.executable, "-m", "trainers.evaluate", str(tiny_run)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    again = json.loads(proc.stdout)
    first = json.loads((tiny_run / "eval_results.json").read_text())
    for key in ("bits_per_byte", "entropy_model_bits_per_byte", "bytes_per_code", "teacher_forced_accuracy"):
        assert again[key] == pytest.approx(first[key], abs=1e-6), key


def test_resume_continues_the_same_loss_curve(tiny_run, tmp_path):
    """20 autoencoder steps straight vs 10 + resume + 10: the same losses (fp32, 1e-6), the EMA codebook and RNG
    restored."""
    straight = history(tiny_run)
    resumed = tmp_path / "resumed"
    shutil.copytree(tiny_run, resumed)
    for stage in STAGES:
        shutil.rmtree(resumed / stage)
        (resumed / "checkpoints" / stage / "stage_complete.json").unlink()
    shutil.rmtree(resumed / "checkpoints" / STAGE)
    (resumed / "logs" / "log_history.jsonl").unlink()
    run_train(resumed, "--training.logging_steps", "1", "--training.resume_from_checkpoint", "latest")
    after = history(resumed)
    assert [r["step"] for r in after] == list(range(11, 21))
    for a, b in zip(after, straight[10:]):
        assert abs(a["train/loss"] - b["train/loss"]) <= 1e-6, (a, b)
    assert [r["step"] for r in history(resumed, STAGE)] == list(range(1, 11))


@pytest.mark.distributed
def test_two_processes_under_accelerate_launch(tmp_path):
    """`accelerate launch` with two CPU processes: DDP over gloo, the codebook statistics all-reduced."""
    from tests.helpers import free_port

    out = tmp_path / "ddp"
    # the shipped config (accelerate 1.15 starts one process for a bare `--cpu --num_processes 2`; see the file)
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", str(free_port())]
    run_train(out, "--training.logging_steps", "1", "--stages.autoencoder.max_steps", "6",
              "--stages.abstractinator.max_steps", "3", "--training.record_data_indices", "true", launcher=launcher)
    rows = history(out)
    assert [r["step"] for r in rows] == list(range(1, 7)) and all(math.isfinite(r["train/loss"]) for r in rows)
    assert [r["step"] for r in history(out, STAGE)] == [1, 2, 3]
    # both ranks drew 6 batches of 16 windows, different ones
    drawn = [[set(map(int, line.split())) for line in (out / "logs" / f"data_indices_autoencoder_rank{r}.txt").read_text().splitlines()]
             for r in (0, 1)]
    assert len(drawn[0]) == len(drawn[1]) == 6
    assert all(len(a) == len(b) == 16 and not a & b for a, b in zip(*drawn))
    results = json.loads((out / "eval_results.json").read_text())
    assert results["bits_per_byte"] > 0


@pytest.mark.distributed
def test_zero2_torchrun_trains_both_stages(tmp_path):
    """`torchrun --nproc_per_node 2 -m trainers.train ... --trainer deepspeed`: ZeRO-2 over gloo on CPU, the frozen
    autoencoder of stage 2 included (its parameters need no gradients)."""
    from tests.helpers import free_port

    out = tmp_path / "ds"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())]
    run_train(out, "--trainer", "deepspeed", "--training.logging_steps", "1", "--training.checkpointing_steps", "3",
              "--stages.autoencoder.max_steps", "4", "--stages.abstractinator.max_steps", "3", launcher=launcher)
    assert [r["step"] for r in history(out)] == [1, 2, 3, 4]
    assert [r["step"] for r in history(out, STAGE)] == [1, 2, 3]
    ckpt = out / "checkpoints" / "autoencoder" / "checkpoint-3" / "deepspeed"
    assert {p.name for p in ckpt.glob("*optim_states.pt")} == {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)}
    assert json.loads((out / "eval_results.json").read_text())["bits_per_byte"] > 0


def test_push_then_load_from_the_hub(tiny_run, hub_server, tmp_path):
    from tests.conftest import hub_env
    from tests.helpers import BLOCK_LATENTHEAT

    repo_id = "latentheat-test/abstractinator-tiny"
    push = subprocess.run([sys.executable, "-m", "trainers.push", str(tiny_run), repo_id], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert push.returncode == 0, push.stderr[-3000:]
    text = "Now is the winter of our discontent"
    remote = BLOCK_LATENTHEAT + textwrap.dedent(f"""
        import torch
        from transformers import AutoModel
        model = AutoModel.from_pretrained({repo_id!r}, subfolder="abstractinator", trust_remote_code=True).eval()
        assert "hf_models" not in type(model).__module__
        bits = model.causal_bits(torch.tensor([list({text!r}.encode())]))["bits"].item()
        print("remote bits", repr(bits))
    """)
    proc = subprocess.run([sys.executable, "-c", remote], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=hub_env(hub_server, tmp_path))
    assert proc.returncode == 0 and "remote bits" in proc.stdout, proc.stderr[-3000:]
    from hf_models.abstractinator import AbstractinatorModel

    local = AbstractinatorModel.from_pretrained(str(tiny_run / STAGE)).eval()
    expected = local.causal_bits(torch.tensor([list(text.encode())]))["bits"].item()
    assert float(proc.stdout.split("remote bits")[1]) == pytest.approx(expected, abs=1e-3)


def test_lora_fine_tunes_from_a_finished_run(tiny_run, tmp_path):
    """`peft.enabled`: stage 1 trains LoRA adapters on every attention projection (compressor, expander, code LM) with
    the codebook, an EMA buffer, kept whole; stage 2 on the code LM's alone. The base run's files stay untouched."""
    from safetensors.torch import load_file

    before = {p: p.read_bytes() for s in STAGES for p in (tiny_run / s).glob("*.safetensors")}
    out = tmp_path / "lora"
    run_train(out, "--peft.enabled", "true", "--peft.base_model", str(tiny_run), "--peft.r", "2",
              "--stages.autoencoder.max_steps", "4", "--stages.abstractinator.max_steps", "3")
    for stage in STAGES:
        adapter = load_file(str(out / stage / "adapter" / "adapter_model.safetensors"))
        names = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in adapter if ".lora_" in k}
        assert names == {"q_proj", "k_proj", "v_proj", "o_proj"}, (stage, names)
        assert all(v.abs().sum() > 0 for k, v in adapter.items() if ".lora_B." in k), stage
        lora = [k for k in adapter if ".lora_" in k]
        if stage == "autoencoder":
            assert any("code_lm" in k for k in lora) and any("expanders" in k for k in lora)
            assert any("compressors" in k for k in lora)
        else:
            assert all("code_lm" in k for k in lora)
    assert all(p.read_bytes() == data for p, data in before.items())
    assert json.loads((out / "eval_results.json").read_text())["bits_per_byte"] > 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["--data.seq_len", "300"], "data.seq_len=300 exceeds model.abstractinator.max_position_embeddings=256"),
        (["--data.seq_len", "1"], "data.seq_len=1 is invalid"),
        (["--model.abstractinator.use_code_lm", "false"], "use_code_lm=false"),
        (["--model.abstractinator.aux_lm_loss_weight", "-1"], "aux_lm_loss_weight=-1"),
        (["--stages.decoder.max_steps", "3"], "unknown stage\\(s\\) \\['decoder'\\]; abstractinator has stages: autoencoder, abstractinator"),
        (["--evaluation.prompt_bytes", "0"], "evaluation.prompt_bytes=0 is invalid"),
        (["--evaluation.top_p", "1.5"], "evaluation.top_p=1.5 is invalid"),
    ],
)
def test_config_errors(overrides, message):
    """Bad settings fail when the task is built, before any data or training."""
    from trainers.arguments import ConfigError, load_config
    from trainers.tasks import build_task

    with pytest.raises(ConfigError, match=message):
        build_task(load_config(TINY, overrides))


def test_edit_distance():
    from trainers.tasks.abstractinator import edit_distance

    assert edit_distance(list(b"kitten"), list(b"sitting")) == 3
    assert edit_distance(list(b"abc"), list(b"abc")) == 0
    assert edit_distance([], [1, 2]) == 2 and edit_distance([1, 2], []) == 2
    # one dropped byte costs one error, not a shifted rest
    assert edit_distance(list(b"the wonders"), list(b"the wnders")) == 1
