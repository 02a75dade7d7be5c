"""The Abstractinator on windows of raw UTF-8 bytes, in two stages (the original's stage-1 autoencoder and its separate
top-LM experiment):

1. `autoencoder` trains the whole hierarchy (every level's compressor and expander, and the code language model) with
   the original's loss: reconstruction cross-entropy + commitment + `aux_lm_loss_weight` x the entropy models'
   next-byte loss + `code_lm_loss_weight` x the code LM's loss (on codes that still move);
2. `abstractinator` freezes the autoencoder and trains the code LM alone on its now fixed codes.

Exported as the `AbstractinatorModel` of stage 2 in `output_dir/abstractinator` (with its remote code at the root). Evaluation on
test windows: causal bits per byte (the code LM's bits for the top codes + the expanders' bits for the bytes given
those codes: a two-part code, DESIGN.md), split into its two parts, next to the level-0 entropy model's own bits per
byte and gzip / bzip2 / xz on the same bytes; bytes per top code; codebook use; teacher-forced and greedy
reconstruction; and `generate_bytes` samples from test prompts (`samples.md`).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..arguments import ConfigError, check_config_kwargs, check_section
from .base import Stage, StepOutput, Task
from .windows import TextSourceArguments, TokenWindows, batch_means, batches

STAGE = "abstractinator"  # the final model (stage 2); also the name of the model section
STAGES = ("autoencoder", STAGE)
LN2 = math.log(2)


@dataclass
class AbstractinatorDataArguments(TextSourceArguments):
    seq_len: int = 256  # bytes per window

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.seq_len, int) or isinstance(self.seq_len, bool) or self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len!r} is invalid: expected an int >= 2 (bytes per window)")


@dataclass
class AbstractinatorEvalArguments:
    # test windows decoded greedily from their own codes (exact match and byte accuracy)
    num_reconstructions: int = 16
    # generate_bytes samples, each prompted with the first `prompt_bytes` bytes of a test window
    num_samples: int = 8
    prompt_bytes: int = 32
    max_new_codes: int = 32
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    num_printed_samples: int = 4
    seed: int = 0

    def __post_init__(self):
        for name in ("num_reconstructions", "num_samples", "num_printed_samples"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ConfigError(f"evaluation.{name}={getattr(self, name)!r} is invalid: expected an int >= 0")
        for name in ("prompt_bytes", "max_new_codes"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name}={getattr(self, name)!r} is invalid: expected an int >= 1")
        if not isinstance(self.temperature, (int, float)) or not self.temperature > 0:
            raise ConfigError(f"evaluation.temperature={self.temperature!r} is invalid: expected a number > 0")
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise ConfigError(f"evaluation.top_k={self.top_k!r} is invalid: expected an int >= 1 or null")
        if self.top_p is not None and (not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1):
            raise ConfigError(f"evaluation.top_p={self.top_p!r} is invalid: expected a number in (0, 1] or null")


class AbstractinatorTask(Task):
    name = "abstractinator"
    family = "abstractinator"

    def __init__(self, config):
        super().__init__(config)
        from hf_models.abstractinator import AbstractinatorConfig

        source = config.source
        unknown = sorted(set(config.model) - {STAGE})
        if unknown:
            raise ConfigError(f"unknown model section(s) {unknown} for task abstractinator; allowed: {STAGE}")
        unknown_stages = sorted(set(config.stages) - set(STAGES))
        if unknown_stages:
            raise ConfigError(f"unknown stage(s) {unknown_stages}; abstractinator has stages: {', '.join(STAGES)}")
        self.data_args = check_section(config.data, AbstractinatorDataArguments, "data", source)
        self.eval_args = check_section(config.evaluation, AbstractinatorEvalArguments, "evaluation", source)
        kwargs = check_config_kwargs(AbstractinatorConfig, config.model.get(STAGE) or {}, f"model.{STAGE}", source)
        try:
            self.model_config = AbstractinatorConfig(**kwargs)
        except ValueError as err:
            raise ConfigError(f"model.{STAGE} in {source}: {err}") from None
        if self.data_args.seq_len > self.model_config.max_position_embeddings:
            raise ConfigError(f"data.seq_len={self.data_args.seq_len} exceeds model.{STAGE}.max_position_embeddings="
                              f"{self.model_config.max_position_embeddings}")
        if not self.model_config.use_code_lm:
            raise ConfigError(f"model.{STAGE}.use_code_lm=false: the task's evaluation (causal bits per byte, "
                              "generate_bytes) needs the code language model")
        self._stages = [AutoencoderStage(self), CodeLMStage(self)]
        self._windows: dict = {}

    def stages(self):
        return self._stages

    def windows(self, split: str) -> torch.Tensor:
        """Byte windows `(N, seq_len)` of a split ("train" or "test"), capped by `data.max_*_samples`."""
        if split not in self._windows:
            from hf_models.data.bytes import load_byte_windows

            d = self.data_args
            ds = load_byte_windows(split, d.seq_len, name_or_path=d.name_or_path, config_name=d.dataset_config)
            ids = torch.tensor(ds["input_ids"], dtype=torch.long)
            cap = d.max_train_samples if split == "train" else d.max_eval_samples
            self._windows[split] = ids[:cap] if cap else ids
        return self._windows[split]

    # -- export and evaluation ------------------------------------------------------------------
    def finalize(self, accelerator, models: dict) -> dict:
        out = Path(self.output_dir)
        model = models[STAGE]
        results = {}
        if accelerator.is_main_process:
            model.register_for_auto_class("AutoModel")
            model.eval().save_pretrained(str(out / STAGE), safe_serialization=True)
            # remote code ignores `subfolder` when it looks for code files: ship them at the root too
            for py in (out / STAGE).glob("*.py"):
                shutil.copy2(py, out / py.name)
            results = self.evaluate_model(model, write_samples=True)
        accelerator.wait_for_everyone()
        return results

    def evaluate_saved(self, output_dir) -> dict:
        """The metrics of an exported run under this task's `evaluation` settings."""
        from hf_models.abstractinator import AbstractinatorModel

        model = AbstractinatorModel.from_pretrained(str(Path(output_dir) / STAGE)).eval()
        results = self.evaluate_model(model)
        results.update({f"evaluation/{k}": v for k, v in vars(self.eval_args).items()})
        return results

    @torch.no_grad()
    def evaluate_model(self, model, write_samples: bool = False) -> dict:
        from hf_models.metrics.bits_per_byte import compressor_bits_per_byte

        from hf_models.data.bytes import bytes_to_text

        ev = self.eval_args
        model.eval()
        test = self.windows("test")
        tally = CodeTally(model.config)
        results = bits_metrics(model, batches(test, model.device), test.shape[1], tally=tally)
        results.update(tally.results())
        results.update(compressor_bits_per_byte(bytes(test.flatten().tolist())))
        recon = greedy_reconstructions(model, test[: ev.num_reconstructions])
        results.update(recon["metrics"])
        gen = torch.Generator().manual_seed(ev.seed)
        torch.manual_seed(ev.seed)  # generate() samples from torch's global generator
        prompts = [bytes(row[: ev.prompt_bytes].tolist()) for row in test[: ev.num_samples]]
        samples = [model.generate_bytes(p, max_new_codes=ev.max_new_codes, temperature=ev.temperature, top_k=ev.top_k,
                                        top_p=ev.top_p, generator=gen) for p in prompts]
        if samples:
            # how much of each sample is new text, and its bits per byte under the level-0 entropy model (a byte LM
            # trained on the same data; real test text gets `entropy_model_bits_per_byte`)
            results["generated_bytes_mean"] = sum(len(s) for s in samples) / len(samples)
            scored = [s for s in samples if len(s) >= 2]
            if scored:
                results["generated_entropy_model_bits_per_byte"] = entropy_model_bits(model, scored)
        results["seq_len"] = int(test.shape[1])
        results["num_test_windows"] = int(test.shape[0])
        if write_samples:
            lines = ["# Samples", "", f"`generate_bytes` from the first {ev.prompt_bytes} bytes of test windows "
                     f"(at most {ev.max_new_codes} new codes, temperature {ev.temperature}, seed {ev.seed}); the "
                     "output starts with the prompt as the expanders rebuild it:", ""]
            for prompt, sample in list(zip(prompts, samples))[: ev.num_printed_samples]:
                lines += [f"Prompt: `{bytes_to_text(list(prompt))!r}`", "", "```text", bytes_to_text(list(sample)),
                          "```", ""]
            lines += ["Test windows (above) and their greedy reconstructions from their own codes (below):", ""]
            for original, rebuilt in list(zip(test, recon["texts"]))[: ev.num_printed_samples]:
                lines += ["```text", bytes_to_text(original.tolist()), "```", "```text", rebuilt, "```", ""]
            (Path(self.output_dir) / "samples.md").write_text("\n".join(lines))
        return results


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------


def next_symbol_bits(logits: torch.Tensor, ids: torch.LongTensor) -> torch.Tensor:
    """Per row, the bits of symbols 2..L under next-symbol `logits` `(B, L, V)` (each predicted from the ones before)."""
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), ids[:, 1:].flatten(), reduction="none")
    return nll.view(len(ids), -1).sum(1) / LN2


class CodeTally:
    """Per level, over the forward outputs it is given: the codes' histogram (share of the codebook used, perplexity)
    and the expander's teacher-forced accuracy (symbols and end-of-segment marks)."""

    def __init__(self, config):
        self.counts = [torch.zeros(c["codebook_size"], dtype=torch.long) for c in config.compressor_level_configs]
        self.correct = [0] * config.num_levels
        self.total = [0] * config.num_levels

    def add(self, out) -> None:
        for level, (codes, mask) in enumerate(zip(out.codes, out.code_masks)):
            self.counts[level] += torch.bincount(codes[mask].cpu(), minlength=len(self.counts[level]))
            logits, labels = out.expander_logits[level], out.expander_labels[level]
            real = labels != -100
            self.correct[level] += int((logits.argmax(-1)[real] == labels[real]).sum())
            self.total[level] += int(real.sum())

    def results(self) -> dict:
        results = {}
        for level, count in enumerate(self.counts):
            p = count.double() / count.sum().clamp(min=1)
            nz = p[p > 0]
            suffix = "" if level == 0 else f"_level{level}"
            results[f"codebook_usage{suffix}"] = float((count > 0).double().mean())
            results[f"code_perplexity{suffix}"] = float(torch.exp(-(nz * nz.log()).sum()))
            results[f"teacher_forced_accuracy{suffix}"] = self.correct[level] / max(self.total[level], 1)
        return results


def bits_rows(model, ids, tally: Optional[CodeTally] = None) -> dict:
    """Per-row causal bits (code part, expander part) over the row's bytes, and the level-0 entropy model's bits for
    bytes 2..L, all from one forward pass (which `tally`, if given, also counts)."""
    bits = model.causal_bits(ids, return_outputs=True)
    out = bits["outputs"]
    if tally is not None:
        tally.add(out)
    length = ids.shape[1]
    return {
        "bits_per_byte": (bits["bits"], length),
        "code_bits_per_byte": (bits["code_bits"], length),
        "expander_bits_per_byte": (bits["expander_bits"], length),
        "entropy_model_bits_per_byte": (next_symbol_bits(out.entropy_logits[0], ids), length - 1),
        "codes_per_window": (bits["num_codes"].float(), 1),
    }


def bits_metrics(model, batches, seq_len: int, gather=None, tally: Optional[CodeTally] = None) -> dict:
    """`bits_rows` averaged over batches of `seq_len`-byte windows, and bytes per top code."""
    means = batch_means(batches, lambda ids: bits_rows(model, ids, tally), gather)
    means["bytes_per_code"] = seq_len / means.pop("codes_per_window")
    return means


def entropy_model_bits(model, samples: list) -> float:
    """Bits per byte (bytes 2..L) of byte strings under the level-0 entropy model, one string at a time."""
    total, count = 0.0, 0
    for sample in samples:
        ids = torch.tensor([list(sample)], dtype=torch.long, device=model.device)
        total += next_symbol_bits(model.compressors[0](ids, torch.ones_like(ids, dtype=torch.bool)).logits, ids).item()
        count += ids.shape[1] - 1
    return total / count


def edit_distance(a: list, b: list) -> int:
    """Levenshtein distance (insertions, deletions, substitutions) between two sequences."""
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        current = [i]
        for j, y in enumerate(b, 1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


@torch.no_grad()
def greedy_reconstructions(model, windows: torch.Tensor) -> dict:
    """Each window encoded to its top codes and decoded greedily by the expanders: the share of windows given back
    exactly, and the byte error rate (edit distance to the window / its length: one byte too many or too few costs
    one error, not a shifted rest)."""
    from hf_models.data.bytes import bytes_to_text

    exact, errors, count, texts = 0, 0, 0, []
    for row in windows:
        row = row.to(model.device)
        codes = model.encode(row[None])[0]
        rebuilt = model.decode_codes(codes, max_length=2 * len(row) + len(codes) + 8)
        errors += edit_distance(row.tolist(), rebuilt.tolist())
        count += len(row)
        exact += int(len(rebuilt) == len(row) and bool((rebuilt == row).all()))
        texts.append(bytes_to_text(rebuilt.tolist()))
    metrics = {}
    if len(windows):
        metrics = {"greedy_reconstruction_exact_match": exact / len(windows),
                   "greedy_reconstruction_byte_error_rate": errors / count}
    return {"metrics": metrics, "texts": texts}


# ---------------------------------------------------------------------------------------------------------------------
# stage
# ---------------------------------------------------------------------------------------------------------------------


class AutoencoderStage(Stage):
    """Stage 1: the whole model with the original's joint loss."""

    name = "autoencoder"
    throughput_unit = "bytes"

    def build_model(self):
        from hf_models.abstractinator import AbstractinatorModel

        return AbstractinatorModel(self.task.model_config)

    def load(self, directory):
        from hf_models.abstractinator import AbstractinatorModel

        return AbstractinatorModel.from_pretrained(directory)

    def build_datasets(self, accelerator):
        return TokenWindows(self.task.windows("train")), TokenWindows(self.task.windows("test"))

    def peft_target_modules(self):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def peft_modules_to_save(self):
        # the codebooks are EMA buffers, updated in every training step: kept and saved whole under LoRA
        return ["quantizer"]

    def model_inputs(self, batch) -> dict:
        return {"input_ids": batch["input_ids"], "labels": batch["input_ids"]}

    def compute_loss(self, model, batch, generator):
        ids = batch["input_ids"]
        out = model(**self.model_inputs(batch))
        logs = {name: getattr(out, name).item() for name in
                ("reconstruction_loss", "aux_lm_loss", "commitment_loss", "code_lm_loss", "bytes_per_code")
                if getattr(out, name) is not None}
        return StepOutput(loss=out.loss, logs=logs, num_items=ids.numel())

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        unwrapped = accelerator.unwrap_model(model)
        return bits_metrics(unwrapped, (batch["input_ids"] for batch in dataloader), self.task.data_args.seq_len,
                            accelerator.gather_for_metrics)


class CodeLMStage(AutoencoderStage):
    """Stage 2: the code LM alone on the frozen autoencoder's codes (loaded from stage 1's folder)."""

    name = STAGE
    starts_from_previous_stage = True

    def build_model(self):
        from hf_models.abstractinator import AbstractinatorModel

        directory = Path(self.task.output_dir) / "autoencoder"
        if (directory / "config.json").is_file():
            model = self.load(str(directory))
        else:  # the architecture alone, for the trainers' dry runs (LoRA targets) before stage 1 has run
            model = AbstractinatorModel(self.task.model_config)
            model.untrained_autoencoder = True
        model.requires_grad_(False)
        model.code_lm.requires_grad_(True)
        return model

    def peft_target_modules(self):
        # the code LM's attention only (the rest is frozen and runs without gradients in this stage)
        layers = self.task.model_config.code_lm_config.num_hidden_layers
        return [f"code_lm.model.layers.{i}.self_attn.{p}" for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj")]

    def peft_modules_to_save(self):
        return []

    def model_inputs(self, batch) -> dict:
        return {"input_ids": batch["input_ids"], "code_lm_only": True}

    def compute_loss(self, model, batch, generator):
        if getattr(model, "untrained_autoencoder", False) or getattr(getattr(model, "module", None), "untrained_autoencoder", False):
            raise RuntimeError(f"stage {self.name}: {Path(self.task.output_dir) / 'autoencoder'} held no trained "
                               "autoencoder when this stage was built")
        return super().compute_loss(model, batch, generator)
