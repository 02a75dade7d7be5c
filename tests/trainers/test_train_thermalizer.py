"""End-to-end training of the thermalizer system on solver data: three stages from one experiment file, data
preparation, the three-arm evaluation (recomputed independently here), pipeline loading, Hub round trip, DeepSpeed."""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.helpers import run_benchmark, run_entry_point, train, train_history

REPO = Path(__file__).resolve().parents[2]
TINY = str(REPO / "configs" / "experiments" / "thermalizer_kolmogorov_tiny.yaml")
ARMS = ("emulator", "thermalizer", "noise_control")


def run_train(output_dir, *overrides, config=TINY, launcher=None, timeout=900):
    return train(config, output_dir, *overrides, launcher=launcher, timeout=timeout)


history = train_history


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("thermalizer") / "run"
    run_train(out, "--training.logging_steps", "1")
    return out


def test_tiny_run_writes_pipeline_data_plots_metrics_and_card(tiny_run):
    out = tiny_run
    for name in ("model_index.json", "vq_tokenizer/model.safetensors", "emulator/model.safetensors", "thermalizer/model.safetensors",
                 "scheduler/scheduler_config.json", "README.md", "samples.png", "survival_curves.png", "enstrophy.png",
                 "spectra.png", "frames.png", "config.yaml", "eval_results.json"):
        assert (out / name).is_file(), name
    results = json.loads((out / "eval_results.json").read_text())
    assert results["num_initial_conditions"] == 4 and results["rollout_steps"] == 30
    assert results["rollouts_per_initial_condition"] == 2 and results["num_rollouts"] == 8
    for arm in ARMS:
        assert 0 <= results[f"median_survival_{arm}"] <= 30
        assert len(results[f"short_term_correlation_{arm}"]) == 3
        assert results[f"spectrum_distance_{arm}"] >= 0
    assert results["fire_rate_emulator"] == 0.0 and results["requantized_changes_mean_emulator"] == 0.0
    assert results["survival_ratio"] == results["median_survival_thermalizer"] / max(results["median_survival_emulator"], 1.0)
    # the truth arm: one solver continuation per initial condition (checked against the stored trajectories in
    # test_truth_survival_benchmark_continues_the_initial_conditions_with_the_solver)
    assert len(results["survival_truth"]) == 4 and all(0 <= v <= 30 for v in results["survival_truth"])
    assert results["survival_ratio_truth"] == results["median_survival_truth"] / max(results["median_survival_emulator"], 1.0)
    # all three stages trained and logged their own losses
    rows = history(out)
    stages = {r.get("stage") for r in rows}
    assert {"vq_tokenizer", "emulator", "thermalizer"} <= stages, stages
    assert any("train/noise_loss" in r and "train/level_loss" in r for r in rows)
    # the classifier's reading of codebook substitutions is measured (the tiny config trains with them)
    logged = [json.loads(line) for line in (out / "logs" / "log_history.jsonl").read_text().splitlines()]
    probe = [v for r in logged for k, v in r.items() if k.endswith("level_substituted_10pct_mean")]
    assert probe and all(0 <= v < 1000 for v in probe), probe
    # and of emulator steps, next to the level the emulator pairs train it on (a level of the schedule)
    step = [(r[k], r[k.replace("_mean", "_label_mean")]) for r in logged for k in r if k.endswith("level_emulator_step_mean")]
    assert step and all(0 <= a < 1000 and 0 <= b < 1000 for a, b in step), step
    perturbed = [(r[k], r[k.replace("_mean", "_label_mean")]) for r in logged for k in r if k.endswith("level_perturbed_mean")]
    assert perturbed and all(0 <= a < 1000 and 0 <= b < 1000 for a, b in perturbed), perturbed
    card = (out / "README.md").read_text()
    assert "ThermalizedRolloutPipeline" in card and "median_survival_thermalizer" in card and "model-index" in card
    assert "code by code" in card and "frame_decoding: autoregressive" in card  # says how the emulator draws a frame


def test_prepared_embeddings_are_codebook_vectors(tiny_run):
    """Clean and drifted embeddings are saved as datasets; every vector is a row of the trained codebook."""
    from datasets import load_from_disk

    from hf_models.vq_tokenizer import VQTokenizerModel

    vq = VQTokenizerModel.from_pretrained(str(tiny_run / "vq_tokenizer"))
    codebook = vq.quantizer.lookup(torch.arange(vq.config.codebook_size))  # (K, D)
    drifted = load_from_disk(str(tiny_run / "embeddings" / "drifted")).with_format("torch")[:]
    assert len(drifted["step"]) == 4 * 10  # drift_trajectories x drift_rollout_steps
    assert sorted(set(drifted["step"].tolist())) == list(range(1, 11))
    for name in ("drifted", "clean_train", "clean_test"):
        emb = load_from_disk(str(tiny_run / "embeddings" / name)).with_format("torch")[:]["embedding"]
        vectors = emb.permute(0, 2, 3, 1).reshape(-1, emb.shape[1])
        distance = (vectors[:, None, :] - codebook[None]).abs().amax(-1).amin(1)  # exact: no cdist round-off
        assert distance.max() == 0, name
    clean = load_from_disk(str(tiny_run / "embeddings" / "clean_train"))
    assert len(clean) == 4 * 24  # 4 trajectories x 24 stored frames
    # emulator pairs: one emulator step (codebook vectors) from each true frame, with the true frame 2 later
    pairs = load_from_disk(str(tiny_run / "embeddings" / "pairs")).with_format("torch")[:]
    assert len(pairs["frame"]) == 4 * 22 and pairs["frame"].min() == 2 and pairs["frame"].max() == 23
    clean = clean.with_format("torch")[:]
    for i in (0, 37, 87):
        j = int(pairs["trajectory"][i]) * 24 + int(pairs["frame"][i])
        assert int(clean["trajectory"][j]) == int(pairs["trajectory"][i]) and int(clean["frame"][j]) == int(pairs["frame"][i])
        assert torch.equal(pairs["target"][i], clean["embedding"][j])
    vectors = pairs["source"].permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert (vectors[:, None, :] - codebook[None]).abs().amax(-1).amin(1).max() == 0
    # large-scale perturbations: every true training frame once, re-tokenized (codebook vectors), with its own grid
    perturbed = load_from_disk(str(tiny_run / "embeddings" / "perturbed")).with_format("torch")[:]
    assert len(perturbed["frame"]) == 4 * 24
    assert torch.equal(perturbed["target"], clean["embedding"])
    assert perturbed["amplitude"].min() >= 0.02 and perturbed["amplitude"].max() <= 0.5  # the defaults
    vectors = perturbed["source"].permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert (vectors[:, None, :] - codebook[None]).abs().amax(-1).amin(1).max() == 0
    # the perturbation moves codes, more of them the larger it is
    changed = (perturbed["source"] != perturbed["target"]).any(1).flatten(1).float().mean(1)
    order = perturbed["amplitude"].argsort()
    assert changed[order[-24:]].mean() > changed[order[:24]].mean() > 0


def test_evaluation_numbers_are_reproduced_from_the_saved_pipeline(tiny_run):
    """Re-run the emulator-alone and thermalizer arms from the exported pipeline and recompute survival and the
    late-window spectrum distance with the metric functions: they match what the run wrote."""
    from hf_models.metrics.rollout_stability import (
        flow_statistics,
        median_ratio_interval,
        spectrum_distance,
        spectrum_log_ratio,
        statistic_range,
        survival_steps,
    )
    from hf_models.pipelines import ThermalizedRolloutPipeline
    from trainers.arguments import load_config
    from trainers.tasks.thermalizer import KolmogorovDataArguments

    results = json.loads((tiny_run / "eval_results.json").read_text())
    config = load_config(str(tiny_run / "config.yaml"))
    data = KolmogorovDataArguments(**config.data).load()
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(tiny_run))
    pipe.set_progress_bar_config(disable=True)
    assert abs(pipe.config.frame_scale - float(data["train"].std())) < 1e-6
    train = data["train"].flatten(0, 1)
    stats = flow_statistics(pipe.decode_codes(pipe.encode_frames(train)))  # the truth as the tokenizer represents it
    ranges = {k: statistic_range(stats[k], 0.1) for k in ("enstrophy", "energy")}
    assert [list(v) for v in ranges.values()] == [results["survival_ranges"][k] for k in ranges]
    for arm in ("emulator", "thermalizer"):
        initial = data["test"][:4, 0].repeat_interleave(2, 0)  # 2 rollouts per initial condition, in a row
        out = pipe(initial, num_steps=30, thermalize=arm != "emulator", generator=torch.Generator().manual_seed(0))
        s = flow_statistics(out.frames[:, 1:])
        survival = torch.stack([survival_steps(s[k], *ranges[k], stopped_at=out.stopped_at) for k in ranges]).amin(0)
        assert float(survival.float().median()) == results[f"median_survival_{arm}"], arm
        assert survival.tolist() == results[f"survival_{arm}"], arm  # per rollout
        late = out.frames[:, -10:]
        late = late[torch.isfinite(late).flatten(1).all(1)]
        if len(late):
            assert abs(spectrum_distance(late, data["test"]) - results[f"spectrum_distance_{arm}"]) < 1e-9, arm
            ratio = spectrum_log_ratio(late, data["test"])  # shell by shell, rounded to 5 digits in the results
            assert len(results[f"spectrum_log_ratio_{arm}"]) == len(ratio) == data["test"].shape[-1] // 3
            assert torch.allclose(torch.tensor(results[f"spectrum_log_ratio_{arm}"], dtype=torch.float64), ratio, atol=1e-5)
        else:
            assert results[f"spectrum_log_ratio_{arm}"] is None
        ran = (out.codes[:, 1:] >= 0).flatten(2).all(-1)  # the steps each rollout made (none after a stop)
        assert abs(out.fired[ran].float().mean().item() - results[f"fire_rate_{arm}"]) < 1e-9
        assert results[f"steps_run_{arm}"] == int(ran.sum())
    # the ratio's bootstrap interval is the one of those survivals, resampling initial conditions with their rollouts
    low, high = results["survival_ratio_ci95_low"], results["survival_ratio_ci95_high"]
    assert [low, high] == list(median_ratio_interval(results["survival_thermalizer"], results["survival_emulator"],
                                                     cluster_size=2))
    assert low <= high


def test_bad_thermalizer_config_fails_before_training(tmp_path):
    cases = []
    for override, words in ((["--model.scheduler.s_stop", "5"], ["s_stop", "s_init"]),
                            (["--model.thermalizer.in_channels", "5"], ["in_channels", "tokenizer"]),
                            (["--evaluation.num_initial_conditions", "9"], ["num_initial_conditions", "num_test_trajectories"]),
                            (["--evaluation.initial_split", "valid"], ["initial_split", "test, train"]),
                            (["--evaluation.initial_split", "train", "--evaluation.num_initial_conditions", "9"],
                             ["num_initial_conditions", "num_train_trajectories"]),
                            (["--evaluation.initial_frame", "1000"], ["initial_frame", "num_frames"]),
                            (["--data.perturbation_max_wavenumber", "8"], ["perturbation_max_wavenumber", "[1, 7]"]),
                            (["--data.perturbation_min_amplitude", "2.0"], ["perturbation_min_amplitude", "0 < min <= max"]),
                            (["--data.perturbation_kind", "shift"], ["perturbation_kind", "random", "amplify", "mixed"]),
                            (["--evaluation.rollouts_per_initial_condition", "0"], ["rollouts_per_initial_condition", ">= 1"]),
                            (["--evaluation.num_candidates", "0"], ["num_candidates", ">= 1"]),
                            (["--evaluation.thermalize_rounds", "0"], ["thermalize_rounds", ">= 1"]),
                            (["--model.emulator.frame_decoding", "raster"], ["frame_decoding", "autoregressive"])):
        cases.append(([TINY, "--training.output_dir", str(tmp_path / f"bad{len(cases)}"), *override], words))
    # one interpreter runs the entry point on every case (13 fresh interpreters spent two minutes importing torch)
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from accelerate.state import AcceleratorState
        from trainers.train import main
        results = []
        for argv in json.loads(sys.argv[1]):
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                rc = main(argv)
            AcceleratorState._reset_state(True)
            results.append({"rc": rc, "stderr": err.getvalue()})
        print(json.dumps(results))
    """)
    proc = subprocess.run([sys.executable, "-c", script, json.dumps([argv for argv, _ in cases])], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == len(cases)
    for (argv, words), result in zip(cases, results):
        assert result["rc"] != 0, argv
        for word in words:
            assert word in result["stderr"], (argv, result["stderr"][-2000:])
        assert not (Path(argv[2]) / "checkpoints").exists()


def test_push_then_load_the_pipeline_from_the_hub(tiny_run, hub_server, tmp_path):
    from tests.conftest import hub_env

    repo_id = "latentheat-test/thermalizer-tiny"
    push = subprocess.run([sys.executable, "-m", "trainers.push", str(tiny_run), repo_id], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=hub_env(hub_server, tmp_path))
    assert push.returncode == 0, push.stderr[-3000:]
    script = textwrap.dedent(f"""
        import torch
        from hf_models.pipelines import ThermalizedRolloutPipeline
        def roll(pipe):
            pipe.set_progress_bar_config(disable=True)
            frames = torch.linspace(-3, 3, 2 * 16 * 16).view(2, 16, 16)
            return pipe(frames, num_steps=4, generator=torch.Generator().manual_seed(1)).codes
        hub = roll(ThermalizedRolloutPipeline.from_pretrained({repo_id!r}))
        local = roll(ThermalizedRolloutPipeline.from_pretrained({str(tiny_run)!r}))
        assert torch.equal(hub, local), "hub pipeline differs from the local one"
        from huggingface_hub import hf_hub_download
        card = open(hf_hub_download({repo_id!r}, "README.md")).read()
        hf_hub_download({repo_id!r}, "survival_curves.png")
        assert "median_survival_thermalizer" in card
        from transformers import AutoModel
        th = AutoModel.from_pretrained({repo_id!r}, subfolder="thermalizer", trust_remote_code=True)
        assert type(th).__name__ == "ThermalizerModel"
        print("pipeline ok")
    """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=hub_env(hub_server, tmp_path))
    assert proc.returncode == 0 and "pipeline ok" in proc.stdout, proc.stderr[-3000:]


def test_evaluate_cli_reevaluates_with_another_rollout_length(tiny_run):
    proc = subprocess.run([sys.executable, "-m", "trainers.evaluate", str(tiny_run), "--evaluation.rollout_steps", "12",
                           "--evaluation.late_window", "4"], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert results["rollout_steps"] == 12 and results["evaluation/rollout_steps"] == 12
    assert all(0 <= results[f"median_survival_{arm}"] <= 12 for arm in ARMS)
    assert results["initial_split"] == "test" and results["initial_frame"] == 0

    # the tuning split: rollouts from training trajectories at a later frame, compared with their own truth
    proc = run_entry_point("trainers.evaluate", tiny_run, "--evaluation.rollout_steps", "12", "--evaluation.late_window", "4",
                           "--evaluation.initial_split", "train", "--evaluation.initial_frame", "6")
    assert proc.returncode == 0, proc.stderr[-3000:]
    tuned = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert tuned["initial_split"] == "train" and tuned["initial_frame"] == 6
    assert tuned["short_term_correlation_emulator"] != results["short_term_correlation_emulator"]

    # the thermalize step's settings are evaluation overrides too, including ones the saved scheduler left at default
    proc = run_entry_point("trainers.evaluate", tiny_run, "--evaluation.rollout_steps", "12", "--evaluation.late_window", "4",
                           "--evaluation.renoise", "true", "--evaluation.eta", "0.0", "--evaluation.s_init", "2",
                           "--evaluation.num_candidates", "3", "--evaluation.s_floor", "8", "--evaluation.thermalize_rounds", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    changed = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert (changed["renoise"], changed["eta"], changed["s_init"], changed["num_candidates"], changed["s_floor"]) == (True, 0.0, 2, 3, 8)
    assert (results["renoise"], results["eta"], results["num_candidates"], results["s_floor"]) == (False, None, 1, None)
    assert (changed["thermalize_rounds"], results["thermalize_rounds"]) == (2, 1)
    # rounds are counted per fired step: 1 with one round, between 1 and 2 with two
    assert results["rounds_mean_thermalizer"] == (1.0 if results["fire_rate_thermalizer"] > 0 else 0.0)
    assert changed["fire_rate_thermalizer"] == 0 or 1.0 <= changed["rounds_mean_thermalizer"] <= 2.0
    assert changed["median_survival_emulator"] == results["median_survival_emulator"]  # same random numbers


@pytest.mark.distributed
def test_deepspeed_zero2_trains_the_thermalizer(tmp_path):
    """`--trainer deepspeed` under torchrun (2 gloo ranks) trains all three stages and exports the pipeline."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ds"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    run_train(out, "--trainer", "deepspeed", "--training.logging_steps", "1", "--evaluation.rollout_steps", "6",
              "--evaluation.late_window", "3", "--evaluation.early_window", "3", launcher=launcher)
    for stage in ("vq_tokenizer", "emulator", "thermalizer"):
        state = json.loads((out / "checkpoints" / stage / "checkpoint-10" / "trainer_state.json").read_text())
        assert state["num_processes"] == 2 and state["deepspeed_config"]["zero_optimization"]["stage"] == 2
    results = json.loads((out / "eval_results.json").read_text())
    assert results["rollout_steps"] == 6
    from hf_models.pipelines import ThermalizedRolloutPipeline

    pipe = ThermalizedRolloutPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    assert pipe(torch.zeros(1, 16, 16) + 1.0, num_steps=2).frames.shape == (1, 3, 16, 16)


def test_lora_on_every_stage_from_the_tiny_run(tiny_run, tmp_path):
    """``peft.enabled`` with the tiny run as base: each stage trains only LoRA adapters on its default targets (the
    thermalizer's convolutions and level head included), the base run's weights stay bit-identical and the adapter
    on the base reproduces the merged thermalizer."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from hf_models.thermalizer import ThermalizerModel

    base_files = {p.relative_to(tiny_run).as_posix(): p.read_bytes() for p in tiny_run.rglob("*.safetensors")}
    out = tmp_path / "lora"
    run_train(out, "--peft.enabled", "true", "--peft.base_model", str(tiny_run), "--peft.r", "2", "--peft.lora_alpha", "4",
              "--stages.vq_tokenizer.max_steps", "3", "--stages.emulator.max_steps", "3", "--stages.thermalizer.max_steps", "3",
              "--evaluation.rollout_steps", "4", "--evaluation.late_window", "2", "--evaluation.early_window", "2",
              "--evaluation.short_term_steps", "2", "--data.drift_rollout_steps", "3")
    assert {p.relative_to(tiny_run).as_posix(): p.read_bytes() for p in tiny_run.rglob("*.safetensors")} == base_files
    targets = {"vq_tokenizer": {"conv_in", "conv1", "conv2", "conv_out"}, "emulator": {"q_proj", "k_proj", "v_proj", "o_proj"},
               "thermalizer": {"conv_in", "conv1", "conv2", "conv_out", "proj"}}
    for stage, expected in targets.items():
        config = json.loads((out / stage / "adapter" / "adapter_config.json").read_text())
        assert set(config["target_modules"]) == expected, stage
        adapter = load_file(str(out / stage / "adapter" / "adapter_model.safetensors"))
        assert any(".lora_A" in k for k in adapter) and any(".lora_B" in k for k in adapter)
    base = ThermalizerModel.from_pretrained(str(tiny_run / "thermalizer")).eval()
    merged = ThermalizerModel.from_pretrained(str(out / "thermalizer")).eval()
    # the LoRA run computes its own embedding statistics (its tokenizer was adapted too): compare on the same config
    adapted = PeftModel.from_pretrained(ThermalizerModel.from_pretrained(str(tiny_run / "thermalizer"), config=merged.config),
                                        str(out / "thermalizer" / "adapter")).eval()
    from trainers.peft_utils import match_lora_conv_padding

    # peft before 0.22 gives lora_A zero padding (the base convs are circular); later releases copy the padding mode
    match_lora_conv_padding(adapted)
    pairs = [(m.base_layer, conv) for m in adapted.modules() if isinstance(getattr(m, "base_layer", None), torch.nn.Conv2d)
             for conv in m.lora_A.values()]
    assert pairs and all(conv.padding_mode == base_conv.padding_mode == "circular" for base_conv, conv in pairs)
    x = torch.randn(3, 8, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, m, b = adapted(sample=x), merged(sample=x), base(sample=x)
    assert torch.allclose(a.noise_pred, m.noise_pred, atol=1e-5) and torch.allclose(a.level_logits, m.level_logits, atol=1e-5)
    assert (m.level_logits - b.level_logits).abs().max() > 1e-6  # the adapter changed the model


# ---------------------------------------------------------------------------------------------------------------------
# codebook-substitution corruption of the thermalizer's training grids
# ---------------------------------------------------------------------------------------------------------------------


def test_substitution_rate_matches_the_noise_to_signal_ratio():
    from trainers.tasks.thermalizer import substitution_rate

    abar = torch.tensor([1.0, 0.99, 0.8, 2 / 3, 0.5, 0.01])
    expected = torch.tensor([0.0, 0.01 / 1.98, 0.2 / 1.6, 0.25, 0.5, 1.0])
    assert torch.allclose(substitution_rate(abar), expected)


def test_substitute_codes_replaces_positions_by_codebook_rows_at_the_rate():
    from trainers.tasks.thermalizer import substitute_codes

    gen = torch.Generator().manual_seed(0)
    codebook = torch.randn(32, 4, generator=gen)
    x0 = torch.randn(400, 4, 8, 8, generator=gen)
    rate = torch.linspace(0, 1, 400)
    out, mask = substitute_codes(x0, codebook, rate, gen)
    assert mask.shape == (400, 1, 8, 8)
    assert torch.equal(out[~mask.expand_as(out)], x0[~mask.expand_as(x0)])  # untouched positions keep x0
    replaced = out.permute(0, 2, 3, 1)[mask.squeeze(1)]  # (n, 4)
    assert (replaced[:, None] - codebook[None]).abs().amax(-1).min(1).values.max() == 0  # every replacement is a codebook row
    per_grid = mask.float().mean((1, 2, 3))
    assert per_grid[0] == 0 and per_grid[-1] == 1
    # empirical rate against the asked one: 64 positions per grid, 400 grids
    assert abs(per_grid.mean().item() - 0.5) < 0.02
    assert torch.corrcoef(torch.stack([per_grid, rate]))[0, 1] > 0.95


def test_corruption_target_explains_the_grid_as_a_level_t_sample():
    """With substitutions, `noisy = sqrt(abar) x0 + sqrt(1 - abar) target` holds exactly (the DDPM x_0 estimate from
    the true target is the clean grid), and the target differs from the Gaussian noise drawn with the same seed
    exactly at the substituted positions, at about `substitution_rate(t)` of them; with share 0 the corruption is
    diffusers' add_noise with that Gaussian noise."""
    from types import SimpleNamespace

    from hf_models.schedulers import ThermalizerScheduler
    from trainers.tasks.thermalizer import ThermalizerStage, substitution_rate

    scheduler = ThermalizerScheduler(num_train_timesteps=50, s_max=40)
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(16, 3, generator=gen)
    stage = ThermalizerStage.__new__(ThermalizerStage)
    args = SimpleNamespace(codebook_substitution=1.0, codebook_substitution_noise=True, codebook_substitution_scaled=True)
    stage.task = SimpleNamespace(scheduler=scheduler, data_args=args)
    stage.normalized_codebook = lambda inner: codebook
    x0 = codebook[torch.randint(0, 16, (2000, 4, 4), generator=gen)].permute(0, 3, 1, 2)  # clean codebook grids
    noisy, target, t = stage.corrupt(None, x0, torch.Generator().manual_seed(2))
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy, abar.sqrt() * x0 + (1 - abar).sqrt() * target, atol=1e-4)

    noisy0, noise, t0 = stage.corrupt(None, x0, torch.Generator().manual_seed(2), substitution=0.0)
    assert torch.equal(t0, t)
    assert torch.allclose(noisy0, scheduler.add_noise(x0, noise, t))
    changed = (target - noise).abs().amax(1) > 1e-4  # (B, h, w): positions whose code was replaced (by another)
    expected = substitution_rate(scheduler.alphas_cumprod[t]) * 15 / 16  # a draw of the same code changes nothing
    observed = changed.float().mean((1, 2))
    assert abs(observed.mean() - expected.mean()) < 0.02, (observed.mean(), expected.mean())
    assert observed[t < 5].mean() < 0.05 and observed[t > 45].mean() > 0.5

    # substitutions alone: the grid is the scaled substituted one, and the target still explains it exactly
    args.codebook_substitution_noise = False
    noisy_s, target_s, t_s = stage.corrupt(None, x0, torch.Generator().manual_seed(2))
    assert torch.equal(t_s, t)
    abar = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    assert torch.allclose(noisy_s, abar.sqrt() * x0 + (1 - abar).sqrt() * target_s, atol=1e-4)
    kept = ~changed.unsqueeze(1).expand_as(x0)  # the same substitutions are drawn: untouched positions are x0 scaled
    assert torch.allclose(noisy_s[kept], (abar.sqrt() * x0).expand_as(x0)[kept], atol=1e-6)

    # unscaled: the grid stays on the codebook (untouched positions are x0 itself, replaced ones codebook rows), and
    # the target still explains it as a level-t sample of x0
    args.codebook_substitution_scaled = False
    noisy_u, target_u, t_u = stage.corrupt(None, x0, torch.Generator().manual_seed(2))
    assert torch.equal(t_u, t)
    assert torch.allclose(noisy_u, abar.sqrt() * x0 + (1 - abar).sqrt() * target_u, atol=1e-4)
    assert torch.equal(noisy_u[kept], x0.expand_as(x0)[kept])
    on_codebook = (noisy_u.permute(0, 2, 3, 1).reshape(-1, 1, 3) - codebook).abs().amax(-1).amin(-1)
    assert on_codebook.max() < 1e-6
    assert torch.allclose(noisy_u, noisy_s / abar.sqrt(), atol=1e-5)


def test_noise_loss_without_the_substituted_grids():
    """data.codebook_substitution_noise_loss false: the noise loss is the MSE over the grids that were not picked for
    substitutions (Gaussian noise of the true grids) and the level loss keeps every grid; true is the model's own
    loss. A config with no substitutions to leave out is refused."""
    from types import SimpleNamespace

    import torch.nn.functional as F

    from hf_models.schedulers import ThermalizerScheduler
    from hf_models.thermalizer import ThermalizerConfig, ThermalizerModel
    from trainers.arguments import ConfigError
    from trainers.tasks.thermalizer import KolmogorovDataArguments, ThermalizerStage

    torch.manual_seed(0)
    model = ThermalizerModel(ThermalizerConfig(in_channels=3, sample_size=4, block_out_channels=[8, 16], layers_per_block=1,
                                               norm_num_groups=4, num_train_timesteps=50, level_loss_weight=0.3))
    with torch.no_grad():
        model.conv_out.weight.normal_(0, 0.1)
    model.requires_grad_(False)  # the losses are compared as numbers here
    gen = torch.Generator().manual_seed(1)
    codebook = torch.randn(16, 3, generator=gen)
    stage = ThermalizerStage.__new__(ThermalizerStage)
    args = SimpleNamespace(codebook_substitution=0.5, codebook_substitution_noise=False, codebook_substitution_scaled=False,
                           codebook_substitution_noise_loss=False, emulator_pairs=0.0, large_scale_perturbation=0.0)
    stage.task = SimpleNamespace(scheduler=ThermalizerScheduler(num_train_timesteps=50, s_max=40), data_args=args)
    stage.normalized_codebook = lambda inner: codebook
    batch = {"embedding": codebook[torch.randint(0, 16, (64, 4, 4), generator=gen)].permute(0, 3, 1, 2)}

    noisy, noise, t, picked = stage.corrupt(model, model.normalize(batch["embedding"]), torch.Generator().manual_seed(3),
                                            return_substituted=True)
    assert 0 < int(picked.sum()) < 64
    out = model(sample=noisy, noise=noise, timesteps=t)
    masked = stage.compute_loss(model, batch, torch.Generator().manual_seed(3))
    kept = F.mse_loss(out.noise_pred[~picked], noise[~picked])
    assert masked.logs["noise_loss"] == pytest.approx(float(kept), rel=1e-5)
    assert float(masked.loss) == pytest.approx(float(kept + 0.3 * out.level_loss), rel=1e-5)
    assert masked.logs["noise_loss"] != pytest.approx(float(out.noise_loss), rel=1e-3)  # the substituted grids differ
    args.codebook_substitution_noise_loss = True
    full = stage.compute_loss(model, batch, torch.Generator().manual_seed(3))
    assert float(full.loss) == pytest.approx(float(out.loss), rel=1e-5)
    with pytest.raises(ConfigError, match="codebook_substitution_noise_loss"):
        KolmogorovDataArguments(codebook_substitution_noise_loss=False)


def test_pair_levels_match_the_noise_to_signal_ratio():
    """A pair's level is the one whose (1 - abar) / abar is nearest its mean squared difference: a grid noised like
    a DDPM sample at level t (without the sqrt(abar) scaling, as emulator steps are not scaled) reads near t."""
    from hf_models.schedulers import ThermalizerScheduler
    from trainers.tasks.thermalizer import pair_levels

    scheduler = ThermalizerScheduler(num_train_timesteps=100, s_max=80)
    abar = scheduler.alphas_cumprod
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(6, 8, 16, 16, generator=gen)
    t = torch.tensor([0, 5, 20, 40, 60, 90])
    ratio = ((1 - abar) / abar)[t].view(-1, 1, 1, 1)
    source = target + ratio.sqrt() * torch.randn(target.shape, generator=gen)
    levels = pair_levels(source, target, abar)
    assert (levels - t).abs().max() <= 2, levels
    assert pair_levels(target, target, abar).tolist() == [0] * 6
    assert torch.equal(pair_levels(source[[3, 1]], target[[3, 1]], abar), levels[[3, 1]])  # per grid


@pytest.mark.parametrize("name, share", [("pairs", "emulator_pairs"), ("perturbed", "large_scale_perturbation")])
def test_prepared_pairs_replace_their_share_of_the_batch(name, share):
    """With share 1 every grid is a pair's source (an emulator step, a perturbed frame) read at its pair level, and
    `noisy = sqrt(abar) truth + sqrt(1 - abar) target` holds with the pair's target (the true next frame, the frame's
    own grid); with share 0 the batch is untouched; about the share is replaced."""
    from types import SimpleNamespace

    from hf_models.schedulers import ThermalizerScheduler
    from trainers.tasks.thermalizer import ThermalizerStage, pair_levels

    scheduler = ThermalizerScheduler(num_train_timesteps=50, s_max=40)
    gen = torch.Generator().manual_seed(1)
    truth = torch.randn(300, 3, 4, 4, generator=gen)
    source = truth + 0.5 * torch.randn(truth.shape, generator=gen)
    levels = pair_levels(source, truth, scheduler.alphas_cumprod)
    stage = ThermalizerStage.__new__(ThermalizerStage)
    args = SimpleNamespace(emulator_pairs=0.0, large_scale_perturbation=0.0)
    setattr(args, share, 1.0)
    stage.task = SimpleNamespace(scheduler=scheduler, data_args=args)
    stage.prepared_pairs = lambda inner, which: {name: (source, truth, levels)}[which]
    x0 = torch.randn(400, 3, 4, 4, generator=gen)
    noisy, target, t = x0 * 0.5, torch.randn(x0.shape, generator=gen), torch.randint(0, 50, (400,), generator=gen)

    out, out_target, out_t = stage.pair(None, x0, noisy, target, t, torch.Generator().manual_seed(2))
    rows = (out.flatten(1)[:, None] == source.flatten(1)[None]).all(-1)  # (400, 300): which pair each grid is
    assert rows.sum(1).eq(1).all()  # every grid is one emulator step
    idx = rows.float().argmax(1)
    assert torch.equal(out_t, levels[idx])
    abar = scheduler.alphas_cumprod[out_t].view(-1, 1, 1, 1)
    assert torch.allclose(out, abar.sqrt() * truth[idx] + (1 - abar).sqrt() * out_target, atol=1e-5)

    setattr(args, share, 0.0)
    kept = stage.pair(None, x0, noisy, target, t, torch.Generator().manual_seed(2))
    assert all(a is b for a, b in zip(kept, (noisy, target, t)))
    setattr(args, share, 0.25)
    out, out_target, out_t = stage.pair(None, x0, noisy, target, t, torch.Generator().manual_seed(2))
    replaced = (out != noisy).flatten(1).any(1)
    assert 0.15 < replaced.float().mean() < 0.35
    assert torch.equal(out_target[~replaced], target[~replaced]) and torch.equal(out_t[~replaced], t[~replaced])


def test_large_scale_field_has_unit_rms_and_only_low_wavenumbers():
    from hf_models.data.kolmogorov import large_scale_field

    field = large_scale_field((6, 32, 32), 2, torch.Generator().manual_seed(0))
    assert field.shape == (6, 32, 32) and field.dtype == torch.float32
    assert torch.allclose(field.pow(2).mean((1, 2)), torch.ones(6), atol=1e-5)
    power = torch.fft.fft2(field.double()).abs() ** 2
    k = torch.fft.fftfreq(32, 1 / 32)
    kk = (k.view(-1, 1) ** 2 + k.view(1, -1) ** 2).sqrt()
    assert power[:, (kk < 1) | (kk > 2)].max() < 1e-12 * power.max()  # no mean, nothing above |k| = 2
    assert (power[:, (kk >= 1) & (kk <= 2)].sum((-1)) > 0).all()
    assert torch.equal(field, large_scale_field((6, 32, 32), 2, torch.Generator().manual_seed(0)))
    assert not torch.equal(field, large_scale_field((6, 32, 32), 2, torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="max_wavenumber=16 must lie in"):
        large_scale_field((1, 32, 32), 16, torch.Generator())


def test_sigterm_during_the_final_evaluation_stops_it(tiny_run, tmp_path):
    """After the last stage there is no step boundary left: SIGTERM stops the export/evaluation at once (exit 0, no
    new eval_results.json), and resuming re-runs only the evaluation."""
    import shutil
    import signal
    import time

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    (run / "eval_results.json").unlink()
    (run / "config.yaml").unlink()
    index = run / "model_index.json"
    exported = index.stat().st_mtime_ns
    cmd = [sys.executable, "-m", "trainers.train", TINY, "--training.output_dir", str(run), "--training.disable_progress_bar",
           "true", "--training.resume_from_checkpoint", "latest", "--evaluation.rollout_steps", "100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and index.stat().st_mtime_ns == exported:
        time.sleep(0.2)
    time.sleep(2)  # into the 100,000-step rollouts
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-3000:]
    assert "stopped by SIGTERM during the final export/evaluation" in stderr  # trainers.train's own line
    assert not (run / "eval_results.json").exists()
    assert history(run) == history(tiny_run)  # nothing retrained
    # the run's settings are written when it starts, so a stopped run still names them (benchmarks read them)
    from trainers.arguments import load_config

    config = load_config(str(run / "config.yaml"))
    assert config.evaluation["rollout_steps"] == 100000 and config.training.output_dir == str(run)


def test_extend_benchmark_repeats_the_evaluation_or_refuses(tiny_run, tmp_path):
    """benchmarks/thermalizer_extend.py rolls out the thermalizer arm again, longer: its first steps must repeat the
    evaluation's arm (common random numbers), and it refuses a run whose emulator rollouts outlived the evaluation."""
    saved = json.loads((tiny_run / "eval_results.json").read_text())
    steps = saved["rollout_steps"] + 10
    result_file = tmp_path / "extend.json"
    proc = run_benchmark("thermalizer_extend", "--output-dir", str(tiny_run),
                         "--steps", str(steps), "--results-file", str(result_file))
    if max(saved["survival_emulator"]) >= saved["rollout_steps"]:
        assert proc.returncode != 0 and "still in range" in proc.stderr, proc.stderr
        assert not result_file.exists()
        return
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["survival_emulator"] == saved["survival_emulator"]
    n = saved["rollout_steps"]
    assert [min(v, n) for v in result["survival_thermalizer"]] == [min(v, n) for v in saved["survival_thermalizer"]]
    assert all(0 <= v <= steps for v in result["survival_thermalizer"])
    assert result["survival_ratio"] == result["median_survival_thermalizer"] / max(result["median_survival_emulator"], 1.0)
    assert result["survival_thermalizer"] == [min(a, b) for a, b in zip(result["survival_thermalizer_energy"], result["survival_thermalizer_enstrophy"])]
    # at the evaluation's own length the arm is the evaluation's, so are its late-window statistics
    proc = run_benchmark("thermalizer_extend", "--output-dir", str(tiny_run),
                         "--steps", str(n), "--results-file", str(result_file))
    assert proc.returncode == 0, proc.stderr
    same = json.loads(result_file.read_text())
    assert same["late_window"] == 10  # the tiny file's evaluation.late_window
    for key in ("spectrum_distance_thermalizer", "enstrophy_histogram_distance_thermalizer", "codebook_usage_distance_thermalizer",
                "requantized_changes_mean_thermalizer"):
        assert same[key] == pytest.approx(saved[key], rel=1e-6), key


def test_extend_benchmark_at_the_evaluations_length_takes_an_emulator_arm_still_in_range(tiny_run, tmp_path):
    """Up to the evaluation's length the emulator arm is known even where a rollout is still in range (both arms are
    capped there), so a new arm at that length is compared with it. Past it, such an arm is taken only while its
    median is known (more than half of the emulator rollouts ended in the evaluation), without an interval."""
    saved = json.loads((tiny_run / "eval_results.json").read_text())
    n = saved["rollout_steps"]
    rollouts = len(saved["survival_emulator"])

    def extend(steps, emulator):
        copy = tmp_path / "eval.json"
        copy.write_text(json.dumps({**saved, "survival_emulator": emulator}))
        result_file = tmp_path / f"extend_{steps}.json"
        proc = run_benchmark("thermalizer_extend", "--output-dir", str(tiny_run),
                             "--steps", str(steps), "--eval-results", str(copy), "--candidates", "2",
                             "--results-file", str(result_file))
        return proc, result_file

    # more than half of the rollouts still in range: the lower median is one of them, so it is not known past n
    most = [n] * (rollouts // 2 + 1) + [n // 2] * (rollouts - rollouts // 2 - 1)
    proc, result_file = extend(n + 5, most)
    assert proc.returncode != 0 and "median survival is not known" in proc.stderr, proc.stderr
    assert not result_file.exists()
    proc, result_file = extend(n - 5, most)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["survival_emulator"] == [min(v, n - 5) for v in most]
    assert all(0 <= v <= n - 5 for v in result["survival_thermalizer"])
    assert result["survival_emulator_lower_bounds"] == 0 and result["survival_ratio_ci95_low"] is not None
    # one still in range, the others ended: the median is known, that rollout's survival is a lower bound
    one = [n] + [n // 2] * (rollouts - 1)
    proc, result_file = extend(n + 5, one)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["survival_emulator"] == one and result["median_survival_emulator"] == n // 2
    assert result["survival_emulator_lower_bounds"] == 1
    assert result["survival_ratio_ci95_low"] is None and result["survival_ratio_ci95_high"] is None
    assert "lower bounds" in proc.stdout


def test_extend_benchmark_with_another_floor_keeps_the_emulator_arm(tiny_run, tmp_path):
    """--s-floor rolls out a new thermalizer arm (not checked as a repeat) against the evaluation's emulator arm, read
    from --eval-results; a floor the scheduler does not allow is refused by name and writes nothing."""
    saved = json.loads((tiny_run / "eval_results.json").read_text())
    # the tiny run's emulator leaves the range within its 30 steps (else the script refuses, as tested above)
    assert max(saved["survival_emulator"]) < saved["rollout_steps"], saved["survival_emulator"]
    copy = tmp_path / "copied_eval.json"
    copy.write_text(json.dumps(saved))

    def extend(floor, name, *extra):
        result_file = tmp_path / f"{name}.json"
        proc = run_benchmark("thermalizer_extend", "--output-dir", str(tiny_run),
                             "--steps", str(saved["rollout_steps"] + 5), "--eval-results", str(copy), "--s-floor", str(floor),
                             "--results-file", str(result_file), *extra)
        return proc, result_file

    proc, result_file = extend(saved["s_stop"] + 5, "floor")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["s_floor"] == saved["s_stop"] + 5 and result["changed_thresholds"] == ["s_floor"]
    assert result["repeats_the_evaluation"] is False and result["eval_results"] == str(copy)
    assert result["survival_emulator"] == saved["survival_emulator"]
    assert result["survival_ratio"] == result["median_survival_thermalizer"] / max(result["median_survival_emulator"], 1.0)
    proc, result_file = extend(saved["s_stop"], "bad")
    assert proc.returncode != 0 and "s_floor" in proc.stderr and "s_stop" in proc.stderr, proc.stderr
    assert not result_file.exists()
    # --candidates: best of K thermalizations, also a new arm against the same emulator arm; K < 1 is refused
    proc, result_file = extend(saved["s_stop"] + 5, "candidates", "--candidates", "3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["num_candidates"] == 3 and result["changed_thresholds"] == ["num_candidates", "s_floor"]
    assert result["repeats_the_evaluation"] is False and result["survival_emulator"] == saved["survival_emulator"]
    proc, result_file = extend(saved["s_stop"] + 5, "no_candidates", "--candidates", "0")
    assert proc.returncode != 0 and "--candidates=0" in proc.stderr and ">= 1" in proc.stderr, proc.stderr
    # --rounds: more thermalizations of a fired step, a new arm too
    proc, result_file = extend(saved["s_stop"] + 5, "rounds", "--rounds", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["thermalize_rounds"] == 2 and result["changed_thresholds"] == ["s_floor", "thermalize_rounds"]
    assert result["survival_emulator"] == saved["survival_emulator"]
    proc, result_file = extend(saved["s_stop"] + 5, "no_rounds", "--rounds", "0")
    assert proc.returncode != 0 and "--rounds=0" in proc.stderr and ">= 1" in proc.stderr, proc.stderr
    assert not result_file.exists()
    # --s-ceiling: fired states denoised from at most this level, a new arm; one below the floor is refused by name
    proc, result_file = extend(saved["s_stop"] + 5, "ceiling", "--s-ceiling", str(saved["s_stop"] + 7))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["s_ceiling"] == saved["s_stop"] + 7 and result["changed_thresholds"] == ["s_ceiling", "s_floor"]
    assert result["survival_emulator"] == saved["survival_emulator"]
    proc, result_file = extend(saved["s_stop"] + 5, "low_ceiling", "--s-ceiling", str(saved["s_stop"] + 3))
    assert proc.returncode != 0 and "s_ceiling" in proc.stderr and "s_floor" in proc.stderr, proc.stderr
    assert not result_file.exists()


def test_thresholds_benchmark_rows_do_not_depend_on_the_emulator_arm(tiny_run, tmp_path):
    """benchmarks/thermalizer_thresholds.py draws every arm from a fresh generator: a row rolled out with
    --skip-emulator is the same rollout as with the emulator arm before it, and the emulator arm alone (--pairs with
    none) the same as with rows after it, so two thermalizers of one emulator can be compared without rolling the
    emulator out twice; without the emulator arm there is no ratio, and without either there is nothing to run."""
    def run(name, *extra, pairs=("5:2",)):
        result_file = tmp_path / f"{name}.json"
        proc = run_benchmark("thermalizer_thresholds", "--output-dir", str(tiny_run),
                             "--initial-conditions", "4", "--initial-frame", "2", "--steps", "12", "--pairs", *pairs,
                             "--results-file", str(result_file), *extra)
        if proc.returncode != 0:
            assert not result_file.exists()
            return proc
        return json.loads(result_file.read_text())

    full, alone, emulator = run("full"), run("alone", "--skip-emulator"), run("emulator", pairs=())
    timeless = lambda arm: {k: v for k, v in arm.items() if k != "seconds"}
    assert emulator["pairs"] == [] and timeless(emulator["emulator"]) == timeless(full["emulator"])
    refused = run("nothing", "--skip-emulator", pairs=())
    assert refused.returncode == 2 and "nothing to roll out" in refused.stderr
    assert full["emulator"] is not None and len(full["emulator"]["survival"]) == 4
    assert alone["emulator"] is None and alone["pairs"][0]["survival_ratio"] is None
    for key in ("survival", "fire_rate", "requantized_changes_mean", "spectrum_distance_late", "spectrum_log_ratio_late"):
        assert alone["pairs"][0][key] == full["pairs"][0][key], key
    # the shell-by-shell spectrum (shells 1..N/3) averages, in absolute value, to the distance
    for window in ("early", "late"):
        shells = full["emulator"][f"spectrum_log_ratio_{window}"]
        if shells is not None:
            assert len(shells) == 16 // 3  # the tiny file's 16x16 frames
            mean = sum(abs(v) for v in shells) / len(shells)
            assert abs(mean - full["emulator"][f"spectrum_distance_{window}"]) < 1e-3, window
    assert full["pairs"][0]["survival_ratio"] == full["pairs"][0]["median_survival"] / max(full["emulator"]["median_survival"], 1.0)
    # --rounds: the pipeline's thermalize_rounds in every row, counted per fired step
    rounds = run("rounds", "--skip-emulator", "--rounds", "2")
    assert rounds["thermalize_rounds"] == 2 and full["thermalize_rounds"] == 1
    assert full["pairs"][0]["rounds_mean"] == (1.0 if full["pairs"][0]["fire_rate"] > 0 else 0.0)
    assert rounds["pairs"][0]["fire_rate"] == 0 or 1.0 <= rounds["pairs"][0]["rounds_mean"] <= 2.0
    refused = run("no_rounds", "--rounds", "0")
    assert refused.returncode == 2 and "--rounds=0" in refused.stderr
    # --late-window / --early-window: the spectra's windows instead of the run's
    windows = run("windows", "--skip-emulator", "--late-window", "5", "--early-window", "3")
    assert (windows["late_window"], windows["early_window"]) == (5, 3)
    assert (full["late_window"], full["early_window"]) != (5, 3)
    assert windows["pairs"][0]["survival"] == full["pairs"][0]["survival"]
    refused = run("no_window", "--late-window", "0")
    assert refused.returncode == 2 and "--late-window=0" in refused.stderr
    # --renoise: the scheduler's option in every row, a different rollout where anything fires
    renoised = run("renoise", "--skip-emulator", "--renoise", "true", "--s-ceiling", "10")
    assert renoised["pairs"][0]["renoise"] is True and full["pairs"][0]["renoise"] is False
    assert renoised["pairs"][0]["s_ceiling"] == 10 and full["pairs"][0]["s_ceiling"] is None
    if full["pairs"][0]["fire_rate"] > 0:
        assert renoised["pairs"][0]["requantized_changes_mean"] != full["pairs"][0]["requantized_changes_mean"]


def test_large_scale_part_is_the_band_of_the_field_itself():
    """`large_scale_part` keeps exactly the field's Fourier content at 1 <= |k| <= k_max: applying it twice changes
    nothing, the rest has no power there, and a field built only from such modes is returned as it is."""
    from hf_models.data.kolmogorov import large_scale_field, large_scale_part

    gen = torch.Generator().manual_seed(3)
    fields = torch.randn(5, 32, 32, generator=gen, dtype=torch.float64) + 2.0  # a mean and every wavenumber
    part = large_scale_part(fields, 2)
    assert part.shape == fields.shape and part.dtype == torch.float64
    assert torch.allclose(large_scale_part(part, 2), part, atol=1e-12)
    k = torch.fft.fftfreq(32, 1 / 32)
    kk = (k.view(-1, 1) ** 2 + k.view(1, -1) ** 2).sqrt()
    band = (kk >= 1) & (kk <= 2)
    rest = torch.fft.fft2(fields - part).abs() ** 2
    assert rest[:, band].max() < 1e-18 * rest.max()
    assert torch.fft.fft2(part)[:, ~band].abs().max() < 1e-9
    low = large_scale_field((5, 32, 32), 2, gen)
    assert torch.allclose(large_scale_part(low, 2), low, atol=1e-6)
    assert large_scale_part(low, 1).pow(2).mean() < low.pow(2).mean()  # |k| = 2 (and sqrt 2) modes removed
    with pytest.raises(ValueError, match="max_wavenumber=16 must lie in"):
        large_scale_part(fields, 16)


@pytest.mark.parametrize("kind", ["amplify", "mixed"])
def test_amplified_perturbations_are_the_frames_own_large_scales_grown(tiny_run, tmp_path, kind):
    """`data.perturbation_kind` amplify: each perturbed grid is the tokenization of the frame plus `amplitude` times
    its own part at 1 <= |k| <= k_max (so its energy grows); mixed: each is either that or a random-field grid, both
    kinds present; the cache is redone when the kind changes and kept when it does not."""
    import shutil

    from datasets import load_from_disk

    from hf_models.data.kolmogorov import large_scale_part
    from hf_models.metrics.rollout_stability import flow_statistics
    from trainers.arguments import load_config
    from trainers.tasks.thermalizer import ThermalizerTask

    run = tmp_path / "run"
    for name in ("vq_tokenizer", "embeddings"):
        shutil.copytree(tiny_run / name, run / name)
    shutil.copy(tiny_run / "config.yaml", run)
    random_grids = load_from_disk(str(run / "embeddings" / "perturbed")).with_format("torch")[:]["source"]
    config = load_config(str(run / "config.yaml"), ["--training.output_dir", str(run), "--data.perturbation_kind", kind])
    task = ThermalizerTask(config)
    stage = task._stages[-1]
    stage.prepare_perturbed(run / "embeddings")
    assert json.loads((run / "embeddings" / "perturbed.json").read_text())["kind"] == kind
    out = load_from_disk(str(run / "embeddings" / "perturbed")).with_format("torch")[:]
    pixels = task.frames("train").flatten(0, 1) / task.frame_scale
    grown = pixels + out["amplitude"].view(-1, 1, 1) * large_scale_part(pixels, 2)
    vq = task.vq()
    expected = vq.embed(vq.encode(grown.unsqueeze(1)))
    same = (out["source"] == expected).flatten(1).all(1)
    assert (flow_statistics(grown)["energy"] > flow_statistics(pixels)["energy"]).all()
    if kind == "amplify":
        assert same.all()
    else:
        assert 0.2 < same.float().mean() < 0.8, same.float().mean()
        assert not torch.equal(out["source"], random_grids)
    stamp = (run / "embeddings" / "perturbed").stat().st_mtime_ns
    stage.prepare_perturbed(run / "embeddings")  # same settings: the cache is kept
    assert (run / "embeddings" / "perturbed").stat().st_mtime_ns == stamp


def test_drift_spectrum_benchmark_bins_every_state(tiny_run, tmp_path):
    """benchmarks/thermalizer_drift_spectrum.py: every drifted state and every true training frame falls in exactly one
    energy bin, each ratio row has one entry per shell, and the truth's rows average back to 1 with their counts
    (the ratio is against the truth's own mean spectrum); unsorted bins are refused by name."""
    from datasets import load_from_disk

    result_file = tmp_path / "drift.json"
    script = ["--output-dir", str(tiny_run),
              "--shells", "4", "--results-file", str(result_file)]
    proc = run_benchmark("thermalizer_drift_spectrum", *script, "--bins", "0", "1", "2")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    drifted = len(load_from_disk(str(tiny_run / "embeddings" / "drifted")))
    counts = {name: sum(r["count"] for r in result["rows"] if r["states"] == name) for name in ("drifted", "truth")}
    assert counts == {"drifted": drifted, "truth": 4 * 24}, counts
    assert result["shells"] == [1, 2, 3, 4] and all(len(r["ratio"]) == 4 for r in result["rows"])
    truth = [r for r in result["rows"] if r["states"] == "truth"]
    for k in range(4):
        pooled = sum(r["ratio"][k] * r["count"] for r in truth) / counts["truth"]
        assert abs(pooled - 1) < 1e-3, (k, pooled)
    proc = run_benchmark("thermalizer_drift_spectrum", *script, "--bins", "1", "0")
    assert proc.returncode != 0 and "strictly increasing" in proc.stderr


def test_measure_benchmark_rows_start_from_the_tokenizer_floor(tiny_run, tmp_path):
    """benchmarks/thermalizer_measure.py: the clean grids are the floor row (no code changed); a level at or below
    s_init fires nothing, so its row is the floor's exactly, one above it fires on every grid; the unconditional
    and iterated rows are finite; a level outside the thermalizer's range is refused by name, writing nothing."""
    config = json.loads((tiny_run / "scheduler" / "scheduler_config.json").read_text())
    s_init, s_max = config["s_init"], config["s_max"]
    result_file = tmp_path / "measure.json"
    script = ["--output-dir", str(tiny_run),
              "--samples", "16", "--reference-frames", "64", "--sampling-steps", "4", "--iterations", "1", "2",
              "--results-file", str(result_file)]
    proc = run_benchmark("thermalizer_measure", *script, "--levels", str(s_init), str(s_max))
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(result_file.read_text())["rows"]
    assert set(rows) == {"vq_reconstruction", "unconditional", f"thermalized_L{s_init}", f"thermalized_L{s_max}", "iterated_1", "iterated_2"}
    floor = rows["vq_reconstruction"]
    assert floor["codes_changed"] == 0.0
    quiet, fired = rows[f"thermalized_L{s_init}"], rows[f"thermalized_L{s_max}"]
    assert quiet["fired"] == 0.0 and {k: quiet[k] for k in floor} == floor
    assert fired["fired"] == 1.0 and fired["level"] == s_max
    assert rows["unconditional"]["steps"] == 4 and rows["unconditional"]["codes_changed"] > 0
    for name, row in rows.items():
        assert all(math.isfinite(row[k]) and row[k] >= 0 for k in ("spectrum_distance", "enstrophy_histogram_distance", "energy_ratio")), name
        # shell by shell (the tiny file's 16x16 frames: shells 1..5), averaging to the distance in absolute value
        assert len(row["spectrum_log_ratio"]) == 16 // 3, name
        assert abs(sum(abs(v) for v in row["spectrum_log_ratio"]) / 5 - row["spectrum_distance"]) < 1e-3, name
    assert rows["iterated_2"]["rounds"] == 2 and 0 <= rows["iterated_2"]["fired"] <= 1
    result_file.unlink()
    top = config["num_train_timesteps"]
    proc = run_benchmark("thermalizer_measure", *script, "--levels", str(top))
    assert proc.returncode == 2 and f"--levels [{top}]" in proc.stderr and "num_train_timesteps" in proc.stderr
    assert not result_file.exists()
    # scheduler settings for the thermalize rows; no unconditional or iterated rows when asked for none
    proc = run_benchmark("thermalizer_measure", *script, "--levels", str(s_max), "--sampling-steps", "0", "--iterations", "--eta", "0",
                         "--num-denoising-steps", "none")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert set(result["rows"]) == {"vq_reconstruction", f"thermalized_L{s_max}"}
    assert result["scheduler_overrides"] == {"eta": 0.0, "num_denoising_steps": None}
    assert result["thresholds"]["eta"] == 0.0 and result["thresholds"]["num_denoising_steps"] is None
    result_file.unlink()
    proc = run_benchmark("thermalizer_measure", *script, "--eta", "-1")
    assert proc.returncode == 2 and "eta" in proc.stderr and not result_file.exists()


def test_truth_survival_benchmark_continues_the_initial_conditions_with_the_solver(tiny_run, tmp_path):
    """benchmarks/thermalizer_truth_survival.py: the solver's continuation of the evaluation's initial conditions is the
    stored test trajectory where the data set has it (same time step and stride), and its survival is measured with the
    run's ranges on the frames as the tokenizer represents them, by the script and by the evaluation's truth arm."""
    from hf_models.metrics.rollout_stability import flow_statistics, survival_steps
    from hf_models.pipelines import ThermalizedRolloutPipeline
    from trainers.evaluate import load_run_task

    task = load_run_task(tiny_run)
    saved = json.loads((tiny_run / "eval_results.json").read_text())
    stored = task.initial_trajectories()[:, 1:]  # the emulator steps the data set holds after the initial frame
    steps = max(len(stored[0]) + 3, saved["rollout_steps"])
    continued = task.true_rollouts(steps)
    assert continued.shape == (len(stored), steps, *stored.shape[2:])
    torch.testing.assert_close(continued[:, : len(stored[0])], stored, rtol=1e-3, atol=1e-3)

    result_file = tmp_path / "truth.json"
    proc = run_benchmark("thermalizer_truth_survival", "--output-dir", str(tiny_run),
                         "--steps", str(steps), "--results-file", str(result_file))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["median_survival_emulator"] == float(torch.tensor(saved["survival_emulator"]).float().median())
    pipe = ThermalizedRolloutPipeline.from_pretrained(str(tiny_run))
    ranges = task.survival_ranges(pipe)
    represented = pipe.decode_codes(pipe.encode_frames(continued.flatten(0, 1))).view_as(continued)
    stats = flow_statistics(represented)
    expected = torch.stack([survival_steps(stats[name], *ranges[name]) for name in ranges]).amin(0)
    assert result["survival_truth_represented"] == [int(v) for v in expected]
    # the evaluation's truth arm is the same continuation over its own length
    length = saved["rollout_steps"]
    assert saved["survival_truth"] == [int(v) for v in expected.clamp(max=length)]
    assert saved["median_survival_truth"] == float(expected.clamp(max=length).float().median())
    assert all(0 <= v <= steps for v in result["survival_truth_pooled"])
    assert result["truth_to_emulator_ratio"] == result["median_survival_truth_represented"] / max(result["median_survival_emulator"], 1.0)

    proc = run_benchmark("thermalizer_truth_survival", "--output-dir", str(tiny_run),
                         "--steps", "0")
    assert proc.returncode != 0 and "--steps=0 must be >= 1" in proc.stderr
    proc = run_benchmark("thermalizer_truth_survival", "--output-dir", str(tmp_path),
                         "--steps", "3")
    assert proc.returncode != 0 and "is not a finished run" in proc.stderr


def test_extend_benchmark_stop_on_exit_ends_rollouts_where_they_leave_and_the_arm_at_its_median(tiny_run, tmp_path):
    """--stop-on-exit ends each rollout at the step it leaves the range and the arm once more than half have: up to
    the first exit it is the evaluation's arm, the median is exact and the rollouts still running are lower bounds."""
    saved = json.loads((tiny_run / "eval_results.json").read_text())
    n = saved["rollout_steps"]
    assert max(saved["survival_emulator"]) < n, saved["survival_emulator"]
    result_file = tmp_path / "stop_on_exit.json"
    proc = run_benchmark("thermalizer_extend", "--output-dir", str(tiny_run),
                         "--steps", str(n + 20), "--stop-on-exit", "--results-file", str(result_file))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    survival, bounds = result["survival_thermalizer"], result["survival_thermalizer_lower_bounds"]
    assert result["changed_thresholds"] == ["stop_on_exit"] and result["repeats_the_evaluation"] is False
    # until the first rollout ends, the arm is the evaluation's (same random numbers)
    first = min(saved["survival_thermalizer"])
    assert min(survival) == first
    assert [i for i, v in enumerate(survival) if v == first] == [i for i, v in enumerate(saved["survival_thermalizer"]) if v == first]
    ended = sorted(v for i, v in enumerate(survival) if i not in bounds)
    needed = (len(survival) - 1) // 2 + 1
    assert len(ended) >= needed
    assert result["median_survival_thermalizer"] == sorted(survival)[(len(survival) - 1) // 2] == ended[needed - 1]
    if result["median_known_at_step"] is not None:
        # the arm stopped at the exit that fixed the median; the others were still in range there
        assert result["median_known_at_step"] == ended[needed - 1] + 1 == result["steps_rolled_out"]
        assert bounds and all(survival[i] == result["median_known_at_step"] for i in bounds)
        assert result["survival_ratio_ci95_low"] is None and "lower bounds" in proc.stdout
    else:
        assert not bounds
    assert "left the range" in proc.stdout
    # every rollout ended by the watch records what left the range, and which way
    exits = result["exits_thermalizer"]
    assert set(exits) <= {str(i) for i in range(len(survival))}
    assert all(v and all(e.split("_")[0] in ("enstrophy", "energy") and e.split("_")[-1] in ("above", "below", "finite")
                         for e in v) for v in exits.values())
    assert not set(exits) & {str(i) for i in bounds}


def test_extend_benchmark_with_one_generator_per_rollout_repeats_the_evaluation_with_stop_on_exit(tiny_run, tmp_path):
    """With evaluation.generator_per_rollout each rollout draws from its own stream, so ending rollouts where they
    leave the range does not change the others: --stop-on-exit then repeats the evaluation's arm (the script checks
    every survival time against it)."""
    import shutil

    import yaml

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["evaluation"]["generator_per_rollout"] = True
    config["training"]["output_dir"] = str(run)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_entry_point("trainers.evaluate", run, "--evaluation.truth_arm", "false", "--write")
    assert proc.returncode == 0, proc.stderr[-3000:]
    saved = json.loads((run / "eval_results.json").read_text())
    old = json.loads((tiny_run / "eval_results.json").read_text())
    assert saved["evaluation/generator_per_rollout"] is True
    # other random numbers than the batch stream's (the emulator arm of 8 rollouts would not repeat by chance)
    assert saved["survival_emulator"] != old["survival_emulator"] or saved["survival_thermalizer"] != old["survival_thermalizer"]
    n = saved["rollout_steps"]
    result_file = tmp_path / "per_rollout.json"
    proc = run_benchmark("thermalizer_extend", "--output-dir", str(run),
                         "--steps", str(n), "--stop-on-exit", "--results-file", str(result_file))
    assert proc.returncode == 0, proc.stderr
    result = json.loads(result_file.read_text())
    assert result["repeats_the_evaluation"] is True and result["changed_thresholds"] == []
    bounds = result["survival_thermalizer_lower_bounds"]
    for i, (new, evaluated) in enumerate(zip(result["survival_thermalizer"], saved["survival_thermalizer"])):
        assert (evaluated >= new) if i in bounds else (new == evaluated), (i, new, evaluated)
    assert result["median_survival_thermalizer"] == saved["median_survival_thermalizer"]
