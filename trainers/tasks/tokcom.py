"""TokCom: stage 1 the text VAE (cross-entropy, one latent per chunk of tokens), stage 2 the flow-matching latent
denoiser (cross-entropy through the frozen VAE decoder, MSE logged), stage 3 an autoregressive reference LM
(transformers' `Qwen2ForCausalLM`) trained on the same token windows, which scores the generated text.

Exported as a `TokComPipeline` (VAE + denoiser + diffusers' `FlowMatchEulerDiscreteScheduler` + tokenizer); the
reference LM is saved beside it in `reference_lm/`. Evaluation: token reconstruction accuracy and cross-entropy of the
VAE, its accuracy with Gaussian noise added to the latents, the denoiser's cross-entropy and MSE, the perplexity of
generated text under the reference LM against the perplexity of real test text, and the reference LM's bits per byte
against gzip / bzip2 / xz on the same test text.
"""

from __future__ import annotations

import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..arguments import ConfigError, check_config_kwargs, check_section
from .base import Stage, StepOutput, Task
from .windows import TextSourceArguments, TokenWindows, batch_means
from .windows import batches as _batches

STAGES = ("vae", "denoiser", "reference_lm")


@dataclass
class TokComDataArguments(TextSourceArguments):
    # None: the BPE-8192 tokenizer trained on the Shakespeare train split; else a Hub id (e.g.
    # meta-llama/CodeLlama-7b-hf, the seed's) or a local tokenizer folder
    tokenizer: Optional[str] = None
    vocab_size: int = 8192
    seq_len: int = 64

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise ConfigError(f"data.seq_len={self.seq_len!r} is invalid: expected an int >= 1")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 257:
            raise ConfigError(f"data.vocab_size={self.vocab_size!r} is invalid: expected an int >= 257 (256 bytes + 1 special)")


@dataclass
class TokComEvalArguments:
    num_samples: int = 64
    num_inference_steps: int = 50
    # Gaussian noise added to the encoded latents, in units of the latents' standard deviation
    latent_noise_levels: list = field(default_factory=lambda: [0.1, 0.3, 1.0])
    num_printed_samples: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.num_samples < 1 or self.num_inference_steps < 1 or self.num_printed_samples < 0:
            raise ConfigError("evaluation.num_samples and evaluation.num_inference_steps must be >= 1, evaluation.num_printed_samples >= 0")
        levels = list(self.latent_noise_levels)
        if any(not isinstance(s, (int, float)) or isinstance(s, bool) or not s > 0 for s in levels):
            raise ConfigError(f"evaluation.latent_noise_levels={levels!r} is invalid: expected numbers > 0")
        self.latent_noise_levels = [float(s) for s in levels]


class TokComTask(Task):
    name = "tokcom"
    family = "tokcom"

    def __init__(self, config):
        super().__init__(config)
        from transformers import Qwen2Config

        from hf_models.tokcom import TokComDenoiserConfig, TokComVAEConfig

        source = config.source
        unknown = sorted(set(config.model) - set(STAGES))
        if unknown:
            raise ConfigError(f"unknown model section(s) {unknown} for task tokcom; allowed: {', '.join(STAGES)}")
        unknown_stages = sorted(set(config.stages) - set(STAGES))
        if unknown_stages:
            raise ConfigError(f"unknown stage(s) {unknown_stages}; tokcom has stages: {', '.join(STAGES)}")
        self.data_args = check_section(config.data, TokComDataArguments, "data", source)
        self.eval_args = check_section(config.evaluation, TokComEvalArguments, "evaluation", source)
        self.vae_kwargs = check_config_kwargs(TokComVAEConfig, config.model.get("vae") or {}, "model.vae", source)
        self.denoiser_kwargs = check_config_kwargs(TokComDenoiserConfig, config.model.get("denoiser") or {}, "model.denoiser", source)
        self.reference_kwargs = dict(config.model.get("reference_lm") or {})
        if "vocab_size" in self.reference_kwargs:
            raise ConfigError("model.reference_lm.vocab_size is derived from the tokenizer (leave it unset)")
        try:
            Qwen2Config(**self.reference_kwargs)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"model.reference_lm: {err}") from err
        # the configs that do not depend on the tokenizer are built now, so bad values fail before any data work
        try:
            probe = TokComVAEConfig(**{"vocab_size": 300, **self.vae_kwargs})
        except ValueError as err:
            raise ConfigError(f"model.vae: {err}") from err
        if self.data_args.seq_len % probe.chunk_size:
            raise ConfigError(f"data.seq_len={self.data_args.seq_len} is not a multiple of model.vae.chunk_size={probe.chunk_size}")
        num_chunks = self.data_args.seq_len // probe.chunk_size
        if self.denoiser_kwargs.get("latent_size", probe.latent_size) != probe.latent_size:
            raise ConfigError(f"model.denoiser.latent_size={self.denoiser_kwargs['latent_size']} differs from the VAE's {probe.latent_size}")
        self.denoiser_kwargs.update(latent_size=probe.latent_size)
        self.denoiser_kwargs.setdefault("max_chunks", num_chunks)
        if self.denoiser_kwargs["max_chunks"] < num_chunks:
            raise ConfigError(f"model.denoiser.max_chunks={self.denoiser_kwargs['max_chunks']} is shorter than data.seq_len / chunk_size = {num_chunks}")
        try:
            self.denoiser_config = TokComDenoiserConfig(**self.denoiser_kwargs)
        except ValueError as err:
            raise ConfigError(f"model.denoiser: {err}") from err
        self._stages = [TokComVAEStage(self), TokComDenoiserStage(self), ReferenceLMStage(self)]
        self._tokenizer = None
        self._windows: dict = {}
        self.vae_model = None

    def stages(self):
        return self._stages

    # -- data -----------------------------------------------------------------------------------
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from hf_models.data.text import load_text_tokenizer

            self._tokenizer = load_text_tokenizer(self.data_args.tokenizer, vocab_size=self.data_args.vocab_size)
        return self._tokenizer

    @property
    def vae_config(self):
        from hf_models.tokcom import TokComVAEConfig

        vocab = len(self.tokenizer)
        if self.vae_kwargs.get("vocab_size", vocab) != vocab:
            raise ConfigError(f"model.vae.vocab_size={self.vae_kwargs['vocab_size']} differs from the tokenizer's {vocab} (leave it unset)")
        return TokComVAEConfig(**{**self.vae_kwargs, "vocab_size": vocab, "pad_token_id": self.pad_token_id})

    @property
    def pad_token_id(self):
        """The tokenizer's pad token, else its eos token (what both the VAE and the reference LM pad with)."""
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def windows(self, split: str) -> torch.Tensor:
        """Token windows `(N, seq_len)` of a split ("train" or "test"), capped by `data.max_*_samples`."""
        if split not in self._windows:
            from hf_models.data.text import load_text_tokens

            d = self.data_args
            ds = load_text_tokens(split, self.tokenizer, d.seq_len, name_or_path=d.name_or_path, config_name=d.dataset_config)
            ids = torch.tensor(ds["input_ids"], dtype=torch.long)
            cap = d.max_train_samples if split == "train" else d.max_eval_samples
            self._windows[split] = ids[:cap] if cap else ids
        return self._windows[split]

    def frozen_vae(self, device):
        """The trained VAE (loaded from `output_dir/vae` when this process did not train it), frozen, on `device`."""
        if self.vae_model is None:
            from hf_models.tokcom import TokComVAEModel

            self.vae_model = TokComVAEModel.from_pretrained(str(Path(self.output_dir) / "vae"))
        self.vae_model.eval().requires_grad_(False)
        if self.vae_model.device != torch.device(device):
            self.vae_model.to(device)
        return self.vae_model

    # -- export and evaluation ------------------------------------------------------------------
    def finalize(self, accelerator, models: dict) -> dict:
        from diffusers import FlowMatchEulerDiscreteScheduler

        from hf_models.pipelines import TokComPipeline

        out = Path(self.output_dir)
        vae, denoiser, reference = models["vae"], models["denoiser"], models["reference_lm"]
        results = {}
        if accelerator.is_main_process:
            for model in (vae, denoiser):
                model.register_for_auto_class("AutoModel")
            pipe = TokComPipeline(vae=vae.eval(), denoiser=denoiser.eval(), scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=self.tokenizer)
            pipe.set_progress_bar_config(disable=True)
            pipe.save_pretrained(str(out))
            # remote code ignores `subfolder` when it looks for code files: ship them at the root too
            for py in (out / "vae").glob("*.py"):
                shutil.copy2(py, out / py.name)
            results = self.evaluate_pipeline(pipe, reference.eval(), write_samples=True)
        accelerator.wait_for_everyone()
        return results

    def evaluate_saved(self, output_dir) -> dict:
        """The metrics of an exported run under this task's `evaluation` settings."""
        from transformers import AutoModelForCausalLM

        from hf_models.pipelines import TokComPipeline

        pipe = TokComPipeline.from_pretrained(str(output_dir))
        pipe.set_progress_bar_config(disable=True)
        self._tokenizer = pipe.tokenizer
        reference = AutoModelForCausalLM.from_pretrained(str(Path(output_dir) / "reference_lm")).eval()
        results = self.evaluate_pipeline(pipe, reference)
        results.update({f"evaluation/{k}": v for k, v in vars(self.eval_args).items()})
        return results

    @torch.no_grad()
    def evaluate_pipeline(self, pipe, reference, write_samples: bool = False) -> dict:
        ev = self.eval_args
        test = self.windows("test")
        results = {}
        results.update(reconstruction_metrics(pipe.vae, test, ev.latent_noise_levels, seed=ev.seed))
        results.update(denoiser_metrics(pipe.vae, pipe.denoiser, test, seed=ev.seed))
        num_chunks = test.shape[1] // pipe.vae.config.chunk_size
        generated = pipe(batch_size=ev.num_samples, num_chunks=num_chunks, num_inference_steps=ev.num_inference_steps,
                         generator=torch.Generator().manual_seed(ev.seed), output_type="pt").token_ids
        lm = language_model_metrics(reference, test, self.tokenizer)
        results.update(lm)
        results["generated_perplexity"] = math.exp(mean_nll(reference, generated))
        results["generated_unique_token_share"] = float(generated.unique().numel() / min(generated.numel(), len(self.tokenizer)))
        results["test_unique_token_share"] = float(test[: ev.num_samples].unique().numel() / min(test[: ev.num_samples].numel(), len(self.tokenizer)))
        results["num_generated_samples"] = ev.num_samples
        results["seq_len"] = int(test.shape[1])
        if write_samples:
            self.write_samples(pipe, generated, test)
        return results

    def write_samples(self, pipe, generated: torch.Tensor, test: torch.Tensor):
        """`samples.md`: generated texts, and test windows next to their reconstructions."""
        n = self.eval_args.num_printed_samples
        tok = self.tokenizer
        lines = ["# Samples", "", f"Generated ({self.eval_args.num_inference_steps} Euler steps, seed {self.eval_args.seed}):", ""]
        for row in generated[:n]:
            lines += ["```text", tok.decode(row.tolist()), "```", ""]
        lines += ["Test windows (above) and their VAE reconstructions (below):", ""]
        recon = pipe.vae.decode(pipe.vae.encode(test[:n])).argmax(-1)
        for a, b in zip(test[:n], recon):
            lines += ["```text", tok.decode(a.tolist()), "```", "```text", tok.decode(b.tolist()), "```", ""]
        (Path(self.output_dir) / "samples.md").write_text("\n".join(lines))


# ---------------------------------------------------------------------------------------------------------------------
# metrics
# ---------------------------------------------------------------------------------------------------------------------


def vae_rows(vae, ids) -> dict:
    """Per-row reconstruction cross-entropy and correct tokens of `vae(input_ids)` (in eval mode: posterior means)."""
    logits = vae(input_ids=ids).logits.float()
    nll = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(len(ids), -1).sum(1)
    return {"reconstruction_ce": (nll, ids.shape[1]), "reconstruction_accuracy": ((logits.argmax(-1) == ids).sum(1), ids.shape[1])}


def denoiser_rows(vae, denoiser, ids, noise_std: float, generator: torch.Generator) -> dict:
    """Per-row cross-entropy (through the frozen VAE decoder), correct tokens and squared error of the denoiser's
    `x_1` predictions at `t ~ U[0, 1]`."""
    x1 = vae.encode(ids)
    xt, t = flow_batch(x1, noise_std, generator)
    pred = denoiser(xt, t).sample
    logits = vae.decode(pred).float()
    nll = F.cross_entropy(logits.flatten(0, 1), ids.flatten(), reduction="none").view(len(ids), -1).sum(1)
    return {
        "denoiser_ce": (nll, ids.shape[1]),
        "denoiser_accuracy": ((logits.argmax(-1) == ids).sum(1), ids.shape[1]),
        "denoiser_mse": ((pred.float() - x1.float()).pow(2).flatten(1).sum(1), x1[0].numel()),
    }


def lm_rows(model, ids) -> dict:
    """Per-row next-token negative log-likelihood (nats) of tokens 2..L."""
    logits = model(input_ids=ids).logits.float()
    nll = F.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten(), reduction="none").view(len(ids), -1).sum(1)
    return {"nll": (nll, ids.shape[1] - 1)}


@torch.no_grad()
def reconstruction_metrics(vae, windows: torch.Tensor, noise_levels, seed: int = 0) -> dict:
    """Token accuracy and cross-entropy of `decode(encode(x))` (posterior means), and the accuracy with Gaussian noise
    of `level` latent standard deviations added to the latents."""
    vae.eval()
    device = vae.device
    out = batch_means(_batches(windows, device), lambda ids: vae_rows(vae, ids))
    latents = torch.cat([vae.encode(b) for b in _batches(windows, device)])
    scale = latents.float().std().item()
    gen = torch.Generator().manual_seed(seed)
    count = windows.numel()
    noisy_correct = {s: 0.0 for s in noise_levels}
    for b, z in zip(_batches(windows, device), _batches(latents, device)):
        for s in noise_levels:
            noise = torch.randn(z.shape, generator=gen).to(device=device, dtype=z.dtype)
            noisy_correct[s] += (vae.decode(z + s * scale * noise).argmax(-1) == b).sum().item()
    out["latent_std"] = scale
    for s in noise_levels:
        out[f"reconstruction_accuracy_noise_{s:g}"] = noisy_correct[s] / count
    return out


def flow_batch(x1: torch.Tensor, noise_std: float, generator: torch.Generator):
    """`(x_t, t)` with `t ~ U[0, 1]`, `x_0 ~ N(0, noise_std^2)` and `x_t = (1 - t) x_0 + t x_1` (drawn on the CPU)."""
    t = torch.rand(x1.shape[0], generator=generator).to(x1.device)
    x0 = noise_std * torch.randn(x1.shape, generator=generator).to(device=x1.device, dtype=x1.dtype)
    tt = t.to(x1.dtype)[:, None, None]
    return (1 - tt) * x0 + tt * x1, t


@torch.no_grad()
def denoiser_metrics(vae, denoiser, windows: torch.Tensor, seed: int = 0) -> dict:
    """`denoiser_rows` averaged over `windows` (flow times and noise drawn from `seed`)."""
    vae.eval()
    denoiser.eval()
    gen = torch.Generator().manual_seed(seed)
    return batch_means(_batches(windows, denoiser.device),
                       lambda ids: denoiser_rows(vae, denoiser, ids, denoiser.config.noise_std, gen))


@torch.no_grad()
def mean_nll(model, windows: torch.Tensor) -> float:
    """Mean next-token negative log-likelihood (nats) of tokens 2..L of each window."""
    return batch_means(_batches(windows, model.device), lambda ids: lm_rows(model, ids))["nll"]


def language_model_metrics(model, windows: torch.Tensor, tokenizer) -> dict:
    """The reference LM's perplexity on test windows and its bits per byte, with gzip / bzip2 / xz on the same text.

    Bits per byte count the predicted tokens (2..L of each window) against their bytes; the compressors see the same
    windows' text (all of it, so they pay for slightly more text than the model)."""
    nll = mean_nll(model, windows)
    predicted_bytes = sum(len(tokenizer.decode(w[1:].tolist()).encode("utf-8")) for w in windows)
    tokens = windows[:, 1:].numel()
    text = "".join(tokenizer.decode(w.tolist()) for w in windows).encode("utf-8")
    from hf_models.metrics.bits_per_byte import compressor_bits_per_byte

    return {
        "reference_perplexity": math.exp(nll),
        "reference_bits_per_byte": nll * tokens / math.log(2) / predicted_bytes,
        "num_test_bytes": len(text),
        **compressor_bits_per_byte(text),
    }


# ---------------------------------------------------------------------------------------------------------------------
# stages
# ---------------------------------------------------------------------------------------------------------------------


def _loader_means(dataloader, accelerator, measure) -> dict:
    """`batch_means` over an evaluation loader, gathered across processes."""
    return batch_means((batch["input_ids"] for batch in dataloader), measure, accelerator.gather_for_metrics)


class _TextStage(Stage):
    throughput_unit = "tokens"

    def build_datasets(self, accelerator):
        return TokenWindows(self.task.windows("train")), TokenWindows(self.task.windows("test"))


class TokComVAEStage(_TextStage):
    name = "vae"

    def build_model(self):
        from hf_models.tokcom import TokComVAEModel

        return TokComVAEModel(self.task.vae_config)

    def load(self, directory):
        from hf_models.tokcom import TokComVAEModel

        model = TokComVAEModel.from_pretrained(directory)
        self.task.vae_model = model
        return model

    def save(self, model, directory):
        super().save(model, directory)
        self.task.vae_model = None  # the denoiser stage reloads the saved weights (every process the same)

    def peft_target_modules(self):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def compute_loss(self, model, batch, generator):
        ids = batch["input_ids"]
        out = model(input_ids=ids, labels=ids, generator=generator)
        return StepOutput(loss=out.loss, logs={"ce_loss": out.ce_loss.item(), "kl_loss": out.kl_loss.item()}, num_items=ids.numel())

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        return _loader_means(dataloader, accelerator, lambda ids: vae_rows(model, ids))


class TokComDenoiserStage(_TextStage):
    name = "denoiser"

    def build_model(self):
        from hf_models.tokcom import TokComDenoiserModel

        return TokComDenoiserModel(self.task.denoiser_config)

    def load(self, directory):
        from hf_models.tokcom import TokComDenoiserModel

        return TokComDenoiserModel.from_pretrained(directory)

    def peft_target_modules(self):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def compute_loss(self, model, batch, generator):
        ids = batch["input_ids"]
        vae = self.task.frozen_vae(ids.device)
        with torch.no_grad():
            x1 = vae.encode(ids)  # posterior means: the clean latents
        cfg = self.task.denoiser_config
        xt, t = flow_batch(x1, cfg.noise_std, generator)
        out = model(xt, t, target=x1)
        logits = vae.decode(out.sample).float()  # the VAE is frozen; the gradient reaches the prediction
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        loss = cfg.ce_loss_weight * ce + cfg.mse_loss_weight * out.loss
        return StepOutput(loss=loss, logs={"ce_loss": ce.item(), "mse_loss": out.loss.item()}, num_items=ids.numel())

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        vae = self.task.frozen_vae(accelerator.device)
        gen = torch.Generator().manual_seed(self.task.eval_args.seed)
        noise_std = self.task.denoiser_config.noise_std
        return _loader_means(dataloader, accelerator, lambda ids: denoiser_rows(vae, model, ids, noise_std, gen))


class ReferenceLMStage(_TextStage):
    name = "reference_lm"

    def _config(self):
        from transformers import Qwen2Config

        tok = self.task.tokenizer
        return Qwen2Config(**{**self.task.reference_kwargs, "vocab_size": len(tok), "pad_token_id": self.task.pad_token_id,
                              "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id})

    def build_model(self):
        from transformers import Qwen2ForCausalLM

        return Qwen2ForCausalLM(self._config())

    def load(self, directory):
        from transformers import Qwen2ForCausalLM

        return Qwen2ForCausalLM.from_pretrained(directory)

    def peft_target_modules(self):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def compute_loss(self, model, batch, generator):
        ids = batch["input_ids"]
        out = model(input_ids=ids, labels=ids)
        return StepOutput(loss=out.loss, num_items=ids.numel())

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        return {"reference_perplexity": math.exp(_loader_means(dataloader, accelerator, lambda ids: lm_rows(model, ids))["nll"])}
