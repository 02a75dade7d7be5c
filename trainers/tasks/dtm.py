"""Denoising thermodynamic model on binarized images: one stage (the DTM), exported as a ``DTMPipeline``.

Evaluated with the classifier FID of the foundation work, every set binarized and measured against the binarized
test set: the DTM's samples, the floor (binarized train images), an independent-Bernoulli-per-pixel baseline fitted
on the training set and, when ``evaluation.code_image_model`` names a trained code-image run, that system's samples.
Also written: ``samples.png``, ``denoising_strip.png`` (one column per reverse level) and ``mixing.json`` (the
autocorrelation of the magnetization across Gibbs sweeps at every reverse step).
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..arguments import ConfigError, check_config_kwargs, check_section
from .base import Stage, StepOutput, Task
from .mnist_data import MNISTDataArguments

logger = logging.getLogger(__name__)


MNIST_SIDE = 28
# RGB layouts colour each digit by its class: the bits of (label % 7) + 1 (never black)
_CLASS_COLOURS = torch.tensor([[(k >> 2) & 1, (k >> 1) & 1, k & 1] for k in range(1, 8)], dtype=torch.float32)


@dataclass
class DTMDataArguments(MNISTDataArguments):
    task_name: ClassVar[str] = "dtm"


@dataclass
class DTMEvalArguments:
    num_samples: int = 1000
    grid_samples: int = 64
    strip_samples: int = 8
    max_strip_columns: int = 16
    sweeps_per_step: Optional[int] = None  # default: the model config's
    mixing_chains: int = 64
    mixing_sweeps: int = 60
    mixing_burn_in: int = 10
    mixing_max_lag: int = 10
    code_image_model: Optional[str] = None  # a finished code_image run folder, for fid_code_image
    code_image_guidance_scale: Optional[float] = 1.5
    batch_size: int = 500
    seed: int = 0

    def __post_init__(self):
        for name in ("num_samples", "grid_samples", "strip_samples", "max_strip_columns", "mixing_chains", "batch_size", "mixing_max_lag"):
            if getattr(self, name) < 1:
                raise ConfigError(f"evaluation.{name}={getattr(self, name)} must be >= 1")
        if self.sweeps_per_step is not None and self.sweeps_per_step < 1:
            raise ConfigError(f"evaluation.sweeps_per_step={self.sweeps_per_step} must be >= 1 or null")
        if self.mixing_burn_in < 0 or self.mixing_sweeps < self.mixing_burn_in + 2 * self.mixing_max_lag:
            raise ConfigError(
                f"evaluation.mixing_sweeps={self.mixing_sweeps} is too short: expected >= mixing_burn_in + 2 * mixing_max_lag "
                f"= {self.mixing_burn_in + 2 * self.mixing_max_lag}"
            )


def binary_images(images: torch.Tensor, labels: torch.Tensor, image_size: int, num_channels: int, threshold: float) -> torch.Tensor:
    """uint8 MNIST ``(N, 28, 28)`` -> float ``{0, 1}`` images ``(N, C, S, S)``: bilinear resize to ``image_size``,
    binarized at ``threshold``; with 3 channels each digit takes its class colour (the bits of ``label % 7 + 1``)."""
    x = images.float().div(255.0).unsqueeze(1)
    if image_size != MNIST_SIDE:
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x > threshold).float()
    if num_channels == 3:
        x = x * _CLASS_COLOURS[labels % 7].view(-1, 3, 1, 1)
    elif num_channels != 1:
        raise ConfigError(f"model.dtm.num_channels={num_channels} is not supported with MNIST data; allowed: 1 (grey) or 3 (class-coloured RGB)")
    return x


class BinaryImageDataset(Dataset):
    """Binary images ``(N, C, S, S)`` held in memory -> ``{"pixel_values", "index"}``."""

    def __init__(self, images: torch.Tensor):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"pixel_values": self.images[i], "index": i}


def image_grid(images: torch.Tensor, nrow: int, pad: int = 2, pad_value: int = 128):
    """``(N, C, H, W)`` in [0, 1] -> a PIL grid (grey padding so black borders stay visible)."""
    from PIL import Image

    x = (images.clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.full((c, rows * (h + pad) + pad, nrow * (w + pad) + pad), pad_value, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top: top + h, left: left + w] = x[k]
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)


def magnetization_autocorrelation(series: torch.Tensor, max_lag: int) -> torch.Tensor:
    """Normalised autocorrelation ``rho(1..max_lag)`` of ``series`` ``(sweeps, chains)`` (each chain's mean removed,
    averaged over chains); ``nan`` where the magnetization does not move at all."""
    x = series.double() - series.double().mean(0, keepdim=True)
    var = (x * x).mean()
    if var <= 0:
        return torch.full((max_lag,), float("nan"), dtype=torch.float64)
    return torch.stack([(x[:-k] * x[k:]).mean() / var for k in range(1, max_lag + 1)])


def integrated_autocorrelation_time(rho: torch.Tensor) -> float:
    """``1 + 2 sum_k rho_k`` up to the first lag where ``rho`` drops below 0.05 (Sokal's window, truncated)."""
    if torch.isnan(rho).any():
        return float("nan")
    tau = 1.0
    for value in rho.tolist():
        if value < 0.05:
            break
        tau += 2.0 * value
    return tau


class DTMTask(Task):
    name = "dtm"
    family = "dtm"

    def __init__(self, config):
        super().__init__(config)
        from hf_models.dtm import DTMConfig

        source = config.source
        unknown = sorted(set(config.model) - {"dtm"})
        if unknown:
            raise ConfigError(f"unknown model section(s) {unknown} for task dtm; allowed: dtm")
        self.dtm_kwargs = check_config_kwargs(DTMConfig, config.model.get("dtm") or {}, "model.dtm", source)
        try:
            self.dtm_config = DTMConfig(**self.dtm_kwargs)
        except ValueError as err:
            raise ConfigError(f"model.dtm in {source}: {err}") from None
        if self.dtm_config.num_channels not in (1, 3):
            raise ConfigError(f"model.dtm.num_channels={self.dtm_config.num_channels} is not supported with MNIST data; allowed: 1 (grey) or 3 (class-coloured RGB)")
        self.data_args = check_section(config.data, DTMDataArguments, "data", source)
        self.eval_args = check_section(config.evaluation, DTMEvalArguments, "evaluation", source)
        unknown_stages = sorted(set(config.stages) - {"dtm"})
        if unknown_stages:
            raise ConfigError(f"unknown stage(s) {unknown_stages}; dtm has one stage: dtm")
        self._stages = [DTMStage(self)]
        self._images = {}

    def stages(self):
        return self._stages

    def images(self, split: str) -> torch.Tensor:
        """Binary images of a split in the model's layout ``(N, C, S, S)``, loaded once."""
        if split not in self._images:
            images, labels = self.data_args.load(split)
            c = self.dtm_config
            self._images[split] = binary_images(images, labels, c.image_size, c.num_channels, c.binarize_threshold)
        return self._images[split]

    def scheduler(self, config=None):
        from hf_models.schedulers import DTMScheduler

        return DTMScheduler.from_model_config(config or self.dtm_config)

    # ------------------------------------------------------------------------------------------
    def finalize(self, accelerator, models: dict) -> dict:
        from hf_models.pipelines import DTMPipeline

        out = Path(self.output_dir)
        dtm = models["dtm"]
        results = {}
        if accelerator.is_main_process:
            dtm.config.register_for_auto_class()
            dtm.register_for_auto_class("AutoModel")
            pipe = DTMPipeline(dtm=dtm, scheduler=self.scheduler(dtm.config))
            pipe.set_progress_bar_config(disable=True)
            pipe.save_pretrained(str(out))
            # remote code ignores `subfolder` when it looks for code files: ship them at the root too
            for py in (out / "dtm").glob("*.py"):
                shutil.copy2(py, out / py.name)
            results = self.evaluate_pipeline(pipe, out)
        accelerator.wait_for_everyone()
        return results

    def evaluate_saved(self, output_dir) -> dict:
        """The sample metrics of an exported pipeline under this task's ``evaluation`` settings."""
        from hf_models.pipelines import DTMPipeline

        pipe = DTMPipeline.from_pretrained(str(output_dir))
        pipe.set_progress_bar_config(disable=True)
        results = self.evaluate_pipeline(pipe, None)
        results.update({f"evaluation/{k}": v for k, v in vars(self.eval_args).items()})
        return results

    def _sample(self, pipe, n: int, generator: torch.Generator, callback=None) -> torch.Tensor:
        chunks, bs = [], self.eval_args.batch_size
        for start in range(0, n, bs):
            chunks.append(pipe(batch_size=min(bs, n - start), generator=generator, output_type="pt",
                               callback_on_step_end=callback).images.cpu())
        return torch.cat(chunks)

    @torch.no_grad()
    def evaluate_pipeline(self, pipe, out: Optional[Path]) -> dict:
        """FIDs (model, floor, Bernoulli, code-image), mixing diagnostic; with ``out``, also the PNGs and
        ``mixing.json`` there."""
        from hf_models.metrics.image_metrics import classifier_fid, predicted_class_entropy

        ev, config = self.eval_args, pipe.dtm.config
        if ev.sweeps_per_step is not None:
            pipe.scheduler.register_to_config(sweeps_per_step=ev.sweeps_per_step)
        n = ev.num_samples
        test, train = self.images("test"), self.images("train")
        if len(test) < n or len(train) < n:
            raise ConfigError(f"FID with {n} samples needs at least {n} test and train images; lower evaluation.num_samples or raise data.max_eval_samples")
        gen = torch.Generator().manual_seed(ev.seed)
        samples = self._sample(pipe, n, gen)
        test_ref = test[torch.randperm(len(test), generator=gen)[:n]]
        train_ref = train[torch.randperm(len(train), generator=gen)[:n]]
        bernoulli = (torch.rand(test_ref.shape, generator=gen) < train.mean(0)).float()

        def fid(images):  # the judge is a grey MNIST classifier: RGB layouts are judged on their luminance-free max
            def grey(x):
                x = x.amax(1, keepdim=True) if x.shape[1] > 1 else x
                return F.interpolate(x, size=(MNIST_SIDE, MNIST_SIDE), mode="area") if x.shape[-1] != MNIST_SIDE else x
            return float(classifier_fid(grey(images), grey(test_ref)))

        results = {
            "fid": fid(samples),
            "fid_floor": fid(train_ref),
            "fid_bernoulli": fid(bernoulli),
            "fid_code_image": None,
            "predicted_class_entropy": float(predicted_class_entropy(samples.amax(1, keepdim=True) if samples.shape[1] > 1 else samples)) if config.image_size == MNIST_SIDE else None,
            "num_fid_samples": n,
            "sweeps_per_step": pipe.scheduler.config.sweeps_per_step,
            "pixel_mean_samples": float(samples.mean()),
            "pixel_mean_test": float(test_ref.mean()),
        }
        if ev.code_image_model is not None:
            if (Path(ev.code_image_model) / "model_index.json").is_file():
                results["fid_code_image"] = fid(self._code_image_samples(n, config))
            else:  # checked here, not when the config loads: the comparison run may be trained while this one trains
                reason = f"evaluation.code_image_model={ev.code_image_model!r} is not a finished code_image run (no model_index.json); run `make demo` first"
                logger.warning(f"fid_code_image not measured: {reason}")
                results["fid_code_image_skipped"] = reason
        mixing = self.mixing_diagnostic(pipe)
        results.update({k: v for k, v in mixing.items() if not isinstance(v, list)})
        if out is not None:
            image_grid(samples[: ev.grid_samples], nrow=8).save(out / "samples.png")
            self.denoising_strip(pipe).save(out / "denoising_strip.png")
            (out / "mixing.json").write_text(json.dumps(mixing, indent=2) + "\n")
        return results

    def _code_image_samples(self, n: int, config) -> torch.Tensor:
        """``n`` samples of the code-image system (classes in turn), binarized into this model's layout."""
        from hf_models.pipelines import CodeImagePipeline

        pipe = CodeImagePipeline.from_pretrained(self.eval_args.code_image_model)
        pipe.set_progress_bar_config(disable=True)
        labels = torch.arange(n) % pipe.code_gpt.config.num_classes
        gen = torch.Generator().manual_seed(self.eval_args.seed + 7)
        chunks = []
        for start in range(0, n, self.eval_args.batch_size):
            chunks.append(pipe(class_labels=labels[start: start + self.eval_args.batch_size], guidance_scale=self.eval_args.code_image_guidance_scale, generator=gen, output_type="pt").images)
        grey = (torch.cat(chunks).clamp(0, 1) * 255).round().to(torch.uint8).squeeze(1)
        return binary_images(grey, labels, config.image_size, config.num_channels, config.binarize_threshold)

    @torch.no_grad()
    def mixing_diagnostic(self, pipe) -> dict:
        """At every reverse level, ``mixing_sweeps`` single Gibbs sweeps from ``x_t`` on ``mixing_chains`` chains of
        a reverse trajectory; the magnetization (mean spin per chain) after each sweep gives the autocorrelation
        ``rho(lag)`` after ``mixing_burn_in`` sweeps and the integrated autocorrelation time ``tau``."""
        from hf_models.dtm.gibbs import gibbs_sweeps

        ev, dtm = self.eval_args, pipe.dtm
        gen = torch.Generator().manual_seed(ev.seed + 3)
        x = pipe.scheduler.sample_prior((ev.mixing_chains, *dtm.config.image_shape), generator=gen, device=dtm.couplings.device)
        per_step = []
        for t in pipe.scheduler.timesteps.tolist():
            params = dtm.step_parameters(x, t)
            graph = params.graph
            state = torch.cat([x.reshape(len(x), -1), x.new_zeros(len(x), graph.num_sites - graph.num_visible)], 1)
            mags = []
            for _ in range(ev.mixing_sweeps):
                state = gibbs_sweeps(state, params.couplings, params.fields, graph, 1, gen)
                mags.append(state[:, : graph.num_visible].mean(1))
            rho = magnetization_autocorrelation(torch.stack(mags[ev.mixing_burn_in:]), ev.mixing_max_lag)
            per_step.append({"timestep": t, "autocorrelation": [round(float(r), 5) for r in rho],
                             "tau": integrated_autocorrelation_time(rho)})
            x = state[:, : graph.num_visible].reshape(x.shape)
        taus = torch.tensor([s["tau"] for s in per_step], dtype=torch.float64)
        lag1 = torch.tensor([s["autocorrelation"][0] for s in per_step], dtype=torch.float64)
        return {
            "mixing_tau_mean": float(taus.nanmean()),
            "mixing_tau_max": float(taus[~taus.isnan()].max()) if (~taus.isnan()).any() else float("nan"),
            "mixing_lag1_autocorrelation_mean": float(lag1.nanmean()),
            "mixing_sweeps": ev.mixing_sweeps,
            "per_step": per_step,
        }

    @torch.no_grad()
    def denoising_strip(self, pipe):
        """Rows: samples; columns: the prior, then ``x^{(t-1)}`` after each reverse step (at most
        ``max_strip_columns``, evenly spaced, always ending with the final sample)."""
        ev = self.eval_args
        frames = []
        prior = pipe.scheduler.sample_prior((ev.strip_samples, *pipe.dtm.config.image_shape), generator=torch.Generator().manual_seed(ev.seed + 5))

        def keep(p, i, t, tensors):
            frames.append(tensors["latents"].cpu())
            return {}

        pipe(batch_size=ev.strip_samples, latents=prior, generator=torch.Generator().manual_seed(ev.seed + 5), output_type="latent", callback_on_step_end=keep)
        frames = [prior.cpu()] + frames
        if len(frames) > ev.max_strip_columns:
            idx = torch.linspace(0, len(frames) - 1, ev.max_strip_columns).round().long().tolist()
            frames = [frames[i] for i in idx]
        cols = len(frames)
        strip = torch.stack(frames, 1).flatten(0, 1)  # (samples * cols, C, H, W), row-major per sample
        return image_grid((strip + 1) / 2, nrow=cols)


def _share_fantasy_chains(model):
    """Every rank starts its negative phase from rank 0's persistent chains, which are the ones a checkpoint saves, so
    a resumed multi-process run continues exactly. DDP does this itself (it broadcasts buffers before each forward);
    a DeepSpeed engine does not, so the chains are broadcast here."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    if isinstance(model, torch.nn.parallel.DistributedDataParallel) and model.broadcast_buffers:
        return
    module = getattr(model, "module", model)
    dist.broadcast(module.fantasy_chains, src=0)


class DTMStage(Stage):
    name = "dtm"

    def build_model(self):
        from hf_models.dtm import DTMModel

        return DTMModel(self.task.dtm_config)

    def load(self, directory):
        from hf_models.dtm import DTMModel

        return DTMModel.from_pretrained(directory)

    def peft_target_parameters(self):
        # the energies are raw parameters, not Linear/Conv layers (peft refuses top-level ones, see peft_utils)
        return ["couplings", "biases", "xt_couplings"]

    def build_datasets(self, accelerator):
        return BinaryImageDataset(self.task.images("train")), BinaryImageDataset(self.task.images("test"))

    def compute_loss(self, model, batch, generator):
        _share_fantasy_chains(model)
        out = model(pixel_values=batch["pixel_values"], generator=generator)
        logs = {"cd_loss": out.cd_loss.item(), "dsm_loss": out.dsm_loss.item()}
        if out.x0_loss is not None:
            logs["x0_loss"] = out.x0_loss.item()
        return StepOutput(loss=out.loss, logs=logs, num_items=batch["pixel_values"].shape[0])

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        """Denoising score-matching loss (pseudo-likelihood per spin) of test pairs at seeded timesteps and flips."""
        unwrapped = accelerator.unwrap_model(model)
        gen = torch.Generator().manual_seed(self.task.eval_args.seed + accelerator.process_index)
        has_x0 = unwrapped.field_network is not None
        total = torch.zeros(2, device=accelerator.device, dtype=torch.float64)  # dsm, x0 (sums over images)
        count = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        for batch in dataloader:
            out = unwrapped(pixel_values=batch["pixel_values"], generator=gen)
            n = batch["pixel_values"].shape[0]
            total[0] += out.dsm_loss.double() * n
            if has_x0:
                total[1] += out.x0_loss.double() * n
            count += n
        total, count = accelerator.reduce(total, "sum"), accelerator.reduce(count, "sum")
        metrics = {"dsm_loss": (total[0] / count.clamp(min=1)).item()}
        if has_x0:
            metrics["x0_loss"] = (total[1] / count.clamp(min=1)).item()
        return metrics

    @torch.no_grad()
    def sample_grid(self, model, accelerator):
        from hf_models.pipelines import DTMPipeline

        pipe = DTMPipeline(dtm=model, scheduler=self.task.scheduler(model.config))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(batch_size=32, generator=torch.Generator().manual_seed(0), output_type="pt").images
        return image_grid(images, nrow=8)
