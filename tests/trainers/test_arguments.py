"""Experiment files and overrides: unknown keys, wrong types and missing files are errors."""

from pathlib import Path

import pytest
import yaml

from trainers.arguments import ConfigError, TrainingArguments, build_config, load_config, parse_overrides
from trainers.tasks import build_task

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "experiments" / "code_image_mnist_tiny.yaml"


def test_experiment_files_load_and_build_their_task():
    for path in sorted((REPO / "configs" / "experiments").glob("*.yaml")):
        cfg = load_config(path)
        task = build_task(cfg)
        assert task.stages(), path


def test_overrides_are_typed_and_win_over_stage_values():
    cfg = load_config(TINY, ["--training.max_steps", "7", "--training.learning_rate=1e-4", "--model.code_gpt.hidden_size", "64"])
    assert cfg.training.max_steps == 7 and cfg.training.learning_rate == 1e-4
    assert cfg.model["code_gpt"]["hidden_size"] == 64
    # the file sets stages.code_gpt.max_steps; a CLI --training.max_steps caps every stage
    assert cfg.stage_training("code_gpt").max_steps == 7
    assert cfg.stage_training("code_gpt").per_device_train_batch_size == 16  # stage value kept
    assert load_config(TINY).stage_training("vq_tokenizer").max_steps == 20


def test_overrides_index_lists_of_mappings():
    """A numeric part indexes a list: one key of one level of the Abstractinator's compressor_level_configs."""
    path = REPO / "configs" / "experiments" / "abstractinator_shakespeare.yaml"
    cfg = load_config(path, ["--model.abstractinator.compressor_level_configs.0.entropy_delta", "1.0"])
    level = cfg.model["abstractinator"]["compressor_level_configs"][0]
    assert level["entropy_delta"] == 1.0 and level["codebook_size"] == 1024  # the rest of the level is kept
    assert build_task(cfg).model_config.compressor_level_configs[0]["entropy_delta"] == 1.0
    for bad, message in ((["--model.abstractinator.compressor_level_configs.1.entropy_delta", "1.0"], "0 to 0"),
                         (["--model.abstractinator.compressor_level_configs.first.entropy_delta", "1.0"], "'first' must index"),
                         (["--model.abstractinator.compressor_level_configs.0.entropy_delta.x", "1"], "is not a mapping")):
        with pytest.raises(ConfigError) as info:
            load_config(path, bad)
        assert message in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--training.max_stepz", "3"], "unknown key 'training.max_stepz'"),
        (["--training.max_steps", "ten"], "'training.max_steps'"),
        (["--training.max_steps", "0"], "training.max_steps=0"),
        (["--training.mixed_precision", "fp8"], "one of 'no', 'fp16', 'bf16'"),
        (["--training.lr_scheduler_type", "wobbly"], "lr_scheduler_type"),
        (["--trainer", "horovod"], "trainer='horovod'"),
        (["--bogus.key", "1"], "unknown override --bogus.key"),
        (["--stages.code_gpt.learning_rat", "1"], "stages.code_gpt.learning_rat"),
        (["--training.use_ema", "maybe"], "true or false"),
        (["--training.max_steps"], "has no value"),
    ],
)
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(ConfigError, match=None) as info:
        load_config(TINY, args)
    assert message in str(info.value), str(info.value)


def test_task_rejects_unknown_model_keys_before_training():
    cfg = load_config(TINY, ["--model.code_gpt.hiden_size", "64"])
    with pytest.raises(ConfigError, match="model.code_gpt.hiden_size"):
        build_task(cfg)
    cfg = load_config(TINY, ["--data.max_train_samples", "0"])
    with pytest.raises(ConfigError, match="data.max_train_samples"):
        build_task(cfg)
    cfg = load_config(TINY, ["--evaluation.temprature", "0.5"])
    with pytest.raises(ConfigError, match="evaluation.temprature"):
        build_task(cfg)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: code_image\ntraining: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(yaml.safe_dump({"task": "code_image", "trainning": {}}))
    with pytest.raises(ConfigError, match="unknown section"):
        load_config(unknown)
    with pytest.raises(ConfigError, match="not a latentheat system"):
        build_task(build_config({"task": "nope"}))


def test_parse_overrides_forms():
    assert parse_overrides(["--training.max_steps", "3", "--trainer=deepspeed", "--model.code_gpt.hidden_size=8"]) == [
        (["training", "max_steps"], 3),
        (["trainer"], "deepspeed"),
        (["model", "code_gpt", "hidden_size"], 8),
    ]
    with pytest.raises(ConfigError, match="unexpected argument"):
        parse_overrides(["training.max_steps", "3"])


def test_trackers_parsing():
    assert TrainingArguments(report_to="none").trackers == []
    assert TrainingArguments(report_to="tensorboard, mlflow").trackers == ["tensorboard", "mlflow"]
