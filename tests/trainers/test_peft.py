"""PEFT LoRA fine-tuning: a tiny code-image base run, then a LoRA run from it (``--peft.enabled true
--peft.base_model BASE``); trainable counts, untouched base weights, adapter round trip through peft,
resume, bad configs, the dtm refusal, a DeepSpeed ZeRO-2 LoRA run and an adapter push."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "code_image_mnist_tiny.yaml")
DTM_TINY = str(REPO / "configs" / "experiments" / "dtm_binary64_tiny.yaml")
SMALL = [
    "--training.disable_progress_bar", "true", "--training.report_to", "none",
    "--stages.vq_tokenizer.max_steps", "4", "--stages.code_gpt.max_steps", "4", "--training.checkpointing_steps", "2",
    "--data.max_train_samples", "256", "--data.max_eval_samples", "64",
    "--evaluation.num_samples_per_class", "2", "--evaluation.grid_samples_per_class", "2",
]
R = 4
TARGETS = {"vq_tokenizer": ("conv_in", "conv1", "conv2", "conv_out"), "code_gpt": ("q_proj", "k_proj", "v_proj", "o_proj")}


def _env():
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": pythonpath}


def run_train(output_dir, *overrides, config=TINY, launcher=None, check=True, timeout=600):
    cmd = list(launcher or [sys.executable]) + ["-m", "trainers.train", config, "--training.output_dir", str(output_dir), *SMALL, *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=_env())
    if check and proc.returncode != 0:
        raise AssertionError(f"training failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def lora_args(base):
    return ["--peft.enabled", "true", "--peft.base_model", str(base), "--peft.r", str(R), "--peft.lora_alpha", "8"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("peft")
    base, lora = root / "base", root / "lora"
    run_train(base)
    base_files = {p.relative_to(base).as_posix(): p.read_bytes() for p in base.rglob("*.safetensors")}
    run_train(lora, *lora_args(base))
    return {"root": root, "base": base, "lora": lora, "base_files": base_files}


def expected_lora_count(stage: str, base_weights: dict) -> int:
    """r * (fan-in) + (fan-out) * r over every targeted Conv2d / Linear weight of the base."""
    total = 0
    for name, w in base_weights.items():
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module.rsplit(".", 1)[-1] in TARGETS[stage] and w.ndim in (2, 4):
            fan_in = w.shape[1] * (w.shape[2] * w.shape[3] if w.ndim == 4 else 1)
            total += R * fan_in + w.shape[0] * R
    return total


def _strip(key: str) -> str:
    """A PeftModel state-dict key -> the base model's key."""
    key = key.removeprefix("base_model.model.")
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


@pytest.mark.parametrize("stage", ["vq_tokenizer", "code_gpt"])
def test_only_adapters_train_and_base_weights_stay_bit_identical(runs, stage):
    base_weights = load_file(str(runs["base"] / stage / "model.safetensors"))
    expected = expected_lora_count(stage, base_weights)
    assert expected > 0
    # the saved adapter holds exactly the LoRA tensors (plus the quantizer's EMA buffers for the tokenizer)
    adapter = load_file(str(runs["lora"] / stage / "adapter" / "adapter_model.safetensors"))
    assert sum(v.numel() for k, v in adapter.items() if ".lora_" in k) == expected
    assert {k for k in adapter if ".lora_" not in k} == ({f"base_model.model.quantizer.{b}" for b in ("codebook", "ema_cluster_size", "ema_embed_sum")} if stage == "vq_tokenizer" else set())
    # a checkpoint mid-run holds the whole PeftModel: every base tensor equals the base run's, bit for bit
    ckpt = load_file(str(runs["lora"] / "checkpoints" / stage / "checkpoint-2" / "model.safetensors"))
    frozen = {_strip(k): v for k, v in ckpt.items() if ".lora_" not in k and ".modules_to_save." not in k}
    assert set(base_weights) <= set(frozen) and set(frozen) - set(base_weights) <= {"lm_head.weight"}  # tied to the embeddings
    for key, value in base_weights.items():
        assert torch.equal(frozen[key], value), key
    # the adapters moved away from their init (lora_B starts at zero)
    lora_b = [v for k, v in ckpt.items() if ".lora_B." in k]
    assert lora_b and all(v.abs().sum() > 0 for v in lora_b)
    # the base run's files were not touched by the LoRA run
    for rel, data in runs["base_files"].items():
        assert (runs["base"] / rel).read_bytes() == data, rel


def test_trainable_parameters_are_the_lora_parameters(runs):
    from trainers.arguments import load_config
    from trainers.peft_utils import apply_lora, load_stage_base
    from trainers.tasks import build_task

    cfg = load_config(TINY, lora_args(runs["base"]))
    task = build_task(cfg)
    for stage in task.stages():
        model = apply_lora(stage, load_stage_base(stage, stage.build_model(), cfg.peft, 2), cfg.peft)
        trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable), sorted(trainable)
        base_weights = load_file(str(runs["base"] / stage.name / "model.safetensors"))
        assert sum(p.numel() for p in trainable.values()) == expected_lora_count(stage.name, base_weights)


def test_adapter_on_the_base_reproduces_the_merged_export(runs):
    from peft import PeftModel

    from hf_models.code_gpt import CodeGPTForCausalLM
    from hf_models.pipelines import CodeImagePipeline
    from hf_models.vq_tokenizer import VQTokenizerModel

    base, lora = runs["base"], runs["lora"]
    pipe = CodeImagePipeline.from_pretrained(str(lora))  # the exported pipeline holds the merged weights
    torch.manual_seed(0)
    pixels = torch.rand(4, 1, 28, 28) * 2 - 1
    vq = PeftModel.from_pretrained(VQTokenizerModel.from_pretrained(str(base / "vq_tokenizer")), str(lora / "vq_tokenizer" / "adapter")).eval()
    plain = VQTokenizerModel.from_pretrained(str(base / "vq_tokenizer")).eval()
    with torch.no_grad():
        adapted, merged, original = vq(pixel_values=pixels), pipe.vq_tokenizer.eval()(pixel_values=pixels), plain(pixel_values=pixels)
    torch.testing.assert_close(adapted.reconstruction, merged.reconstruction, atol=1e-5, rtol=1e-4)
    assert torch.equal(adapted.codes, merged.codes)
    assert (merged.reconstruction - original.reconstruction).abs().max() > 1e-4  # the adapter changed the model

    gpt = PeftModel.from_pretrained(CodeGPTForCausalLM.from_pretrained(str(base / "code_gpt")), str(lora / "code_gpt" / "adapter")).eval()
    ids = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        a, m = gpt(input_ids=ids).logits, pipe.code_gpt.eval()(input_ids=ids).logits
        o = CodeGPTForCausalLM.from_pretrained(str(base / "code_gpt")).eval()(input_ids=ids).logits
    torch.testing.assert_close(a, m, atol=1e-5, rtol=1e-4)
    assert (m - o).abs().max() > 1e-5
    card = (lora / "code_gpt" / "adapter" / "README.md").read_text()
    assert "library_name: peft" in card and "q_proj" in card
    assert json.loads((lora / "code_gpt" / "adapter" / "adapter_config.json").read_text())["r"] == R


def test_lora_resume_continues_to_the_same_adapter(runs):
    """Drop the finished code_gpt stage, resume from its checkpoint-2: the final adapter equals the uninterrupted one."""
    resumed = runs["root"] / "resumed"
    shutil.copytree(runs["lora"], resumed)
    shutil.rmtree(resumed / "code_gpt")
    (resumed / "checkpoints" / "code_gpt" / "stage_complete.json").unlink()
    proc = run_train(resumed, *lora_args(runs["base"]), "--training.resume_from_checkpoint", "latest")
    assert "resumed from" in proc.stdout + proc.stderr
    a = load_file(str(runs["lora"] / "code_gpt" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed / "code_gpt" / "adapter" / "adapter_model.safetensors"))
    assert set(a) == set(b)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5, msg=key)


def _check(overrides, config=TINY):
    from trainers.arguments import load_config
    from trainers.peft_utils import check_peft
    from trainers.tasks import build_task

    cfg = load_config(config, overrides)
    check_peft(cfg, build_task(cfg))


def test_bad_peft_configs_fail_before_training(runs, tmp_path):
    from trainers.arguments import ConfigError

    base = str(runs["base"])
    with pytest.raises(ConfigError, match=r"peft\.r=0 .*>= 1"):
        _check(["--peft.r", "0"])
    with pytest.raises(ConfigError, match="needs peft.base_model"):
        _check(["--peft.enabled", "true"])
    with pytest.raises(ConfigError, match="no pretrained 'vq_tokenizer' model"):
        _check(lora_args(tmp_path))
    with pytest.raises(ConfigError, match="nonexistent_proj"):
        _check([*lora_args(base), "--peft.target_modules", "{code_gpt: [nonexistent_proj]}"])
    with pytest.raises(ConfigError, match="unknown stage"):
        _check([*lora_args(base), "--peft.target_modules", "{gpt: [q_proj]}"])
    _check([*lora_args(base), "--peft.target_modules", "{code_gpt: [q_proj, v_proj]}"])  # a valid per-stage override
    # through the entry point: exit code 1 (a config error found by the trainer), the message, nothing trained
    out = tmp_path / "bad"
    proc = run_train(out, *lora_args(base), "--peft.target_modules", "[nonexistent_proj]", check=False)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Running training" not in proc.stdout + proc.stderr
    assert "nonexistent_proj" in proc.stderr and "Adaptable layer names" in proc.stderr
    assert not (out / "checkpoints").exists() and not (out / "vq_tokenizer").exists()


def test_dtm_lora_is_refused_with_the_reason(tmp_path):
    """DTMModel has no Linear/Conv layers; peft refuses LoRA on top-level nn.Parameters (target_parameters)."""
    from trainers.arguments import ConfigError

    with pytest.raises(ConfigError, match=r"top-level.*couplings|couplings.*top-level") as err:
        _check(lora_args(tmp_path), config=DTM_TINY)
    assert "peft.enabled=false" in str(err.value)


def _free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_deepspeed_zero2_lora_run(runs):
    from peft import PeftModel

    from hf_models.code_gpt import CodeGPTForCausalLM

    out = runs["root"] / "ds"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    run_train(out, *lora_args(runs["base"]), "--trainer", "deepspeed", "--training.deepspeed_config", "zero2", launcher=torchrun)
    base_weights = load_file(str(runs["base"] / "code_gpt" / "model.safetensors"))
    adapter = load_file(str(out / "code_gpt" / "adapter" / "adapter_model.safetensors"))
    assert sum(v.numel() for k, v in adapter.items() if ".lora_" in k) == expected_lora_count("code_gpt", base_weights)
    gpt = PeftModel.from_pretrained(CodeGPTForCausalLM.from_pretrained(str(runs["base"] / "code_gpt")), str(out / "code_gpt" / "adapter")).eval()
    merged = CodeGPTForCausalLM.from_pretrained(str(out / "code_gpt")).eval()
    ids = torch.randint(0, 32, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(gpt(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-5, rtol=1e-4)
    assert (out / "model_index.json").is_file()
    # a real 2-rank ZeRO-2 run: each rank wrote its optimizer shard (of the LoRA parameters only)
    shards = sorted((out / "checkpoints" / "code_gpt" / "checkpoint-2" / "deepspeed").glob("*optim_states.pt"))
    assert [p.name for p in shards] == [f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in (0, 1)]
    state = json.loads((out / "checkpoints" / "code_gpt" / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["num_processes"] == 2


def test_adapter_pushes_on_its_own_and_loads_from_the_hub(runs, hub_server, tmp_path):
    from tests.conftest import hub_env

    adapter = runs["lora"] / "code_gpt" / "adapter"
    env = hub_env(hub_server, tmp_path)
    push = subprocess.run([sys.executable, "-m", "trainers.push", str(adapter), "latentheat-test/code-gpt-lora"], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert push.returncode == 0, push.stderr[-3000:]
    script = (
        "import sys, torch\n"
        "from peft import PeftModel\n"
        "from hf_models.code_gpt import CodeGPTForCausalLM\n"
        "base = CodeGPTForCausalLM.from_pretrained(sys.argv[1])\n"
        "model = PeftModel.from_pretrained(base, 'latentheat-test/code-gpt-lora').eval()\n"
        "merged = CodeGPTForCausalLM.from_pretrained(sys.argv[2]).eval()\n"
        "ids = torch.arange(12).view(1, 12)\n"
        "with torch.no_grad():\n"
        "    print(float((model(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max()))\n"
    )
    load = subprocess.run([sys.executable, "-c", script, str(runs["base"] / "code_gpt"), str(runs["lora"] / "code_gpt")], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert load.returncode == 0, load.stderr[-3000:]
    assert float(load.stdout.strip().splitlines()[-1]) < 1e-5
