"""Code-image autoregressive system: stage 1 VQ tokenizer, stage 2 CodeGPT on its codes.

Exported together as a ``CodeImagePipeline``; evaluated with classifier-feature FID, class
accuracy of the samples (judged by the shipped MNIST classifier), bits per code on the test
set and the tokenizer's reconstruction PSNR.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Optional

import numpy as np
import torch
from torch.utils.data import Dataset

from ..arguments import ConfigError, check_config_kwargs, check_section
from .base import Stage, StepOutput, Task
from .mnist_data import MNISTDataArguments
from .windows import TokenWindows


@dataclass
class CodeImageDataArguments(MNISTDataArguments):
    task_name: ClassVar[str] = "code_image"


@dataclass
class CodeImageEvalArguments:
    num_samples_per_class: int = 100
    grid_samples_per_class: int = 10
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    guidance_scale: Optional[float] = None
    seed: int = 0

    def __post_init__(self):
        if self.num_samples_per_class < 1 or self.grid_samples_per_class < 1:
            raise ConfigError("evaluation.num_samples_per_class and evaluation.grid_samples_per_class must be >= 1")


class ImageDataset(Dataset):
    """uint8 (N, 28, 28) images -> ``pixel_values`` in [-1, 1] of shape (1, 28, 28)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        x = self.images[i].float().div(127.5).sub(1.0).unsqueeze(0)
        return {"pixel_values": x, "labels": self.labels[i], "index": i}


def _to_uint8_grid(images: torch.Tensor, nrow: int):
    """(N, 1, H, W) in [-1, 1] -> a PIL grid."""
    from PIL import Image

    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    n, c, h, w = x.shape
    rows = (n + nrow - 1) // nrow
    grid = torch.zeros(c, rows * (h + 2) + 2, nrow * (w + 2) + 2, dtype=torch.uint8)
    for k in range(n):
        r, col = divmod(k, nrow)
        grid[:, 2 + r * (h + 2): 2 + r * (h + 2) + h, 2 + col * (w + 2): 2 + col * (w + 2) + w] = x[k]
    array = grid.permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if c == 1 else array)


class CodeImageTask(Task):
    name = "code_image"
    family = "code_image"

    def __init__(self, config):
        super().__init__(config)
        from hf_models.code_gpt import CodeGPTConfig
        from hf_models.vq_tokenizer import VQTokenizerConfig

        source = config.source
        unknown = sorted(set(config.model) - {"vq_tokenizer", "code_gpt"})
        if unknown:
            raise ConfigError(f"unknown model section(s) {unknown} for task code_image; allowed: vq_tokenizer, code_gpt")
        self.vq_kwargs = check_config_kwargs(VQTokenizerConfig, config.model.get("vq_tokenizer") or {}, "model.vq_tokenizer", source)
        self.gpt_kwargs = check_config_kwargs(CodeGPTConfig, config.model.get("code_gpt") or {}, "model.code_gpt", source)
        # build both configs now so bad values fail before any training starts
        self.vq_config = VQTokenizerConfig(**self.vq_kwargs)
        num_codes = self.vq_config.latent_size**2
        if self.gpt_kwargs.get("num_codes", num_codes) != num_codes:
            raise ConfigError(f"model.code_gpt.num_codes={self.gpt_kwargs['num_codes']} but the tokenizer makes {num_codes} codes per image")
        if self.gpt_kwargs.get("codebook_size", self.vq_config.codebook_size) != self.vq_config.codebook_size:
            raise ConfigError(f"model.code_gpt.codebook_size={self.gpt_kwargs['codebook_size']} differs from model.vq_tokenizer.codebook_size={self.vq_config.codebook_size}")
        self.gpt_kwargs.update(num_codes=num_codes, codebook_size=self.vq_config.codebook_size)
        self.gpt_config = CodeGPTConfig(**self.gpt_kwargs)
        self.data_args = check_section(config.data, CodeImageDataArguments, "data", source)
        self.eval_args = check_section(config.evaluation, CodeImageEvalArguments, "evaluation", source)
        unknown_stages = sorted(set(config.stages) - {"vq_tokenizer", "code_gpt"})
        if unknown_stages:
            raise ConfigError(f"unknown stage(s) {unknown_stages}; code_image has stages: vq_tokenizer, code_gpt")
        self._stages = [VQTokenizerStage(self), CodeGPTStage(self)]
        self._mnist = {}
        self.vq_model = None
        self.stage_metrics: dict = {}

    def stages(self):
        return self._stages

    def mnist(self, split: str):
        """uint8 images (N, 28, 28) and int64 labels of a split, loaded once."""
        if split not in self._mnist:
            images, labels = self.data_args.load(split)
            self._mnist[split] = (images, labels)
        return self._mnist[split]

    # ------------------------------------------------------------------------------------------
    def finalize(self, accelerator, models: dict) -> dict:
        from hf_models.pipelines import CodeImagePipeline

        out = Path(self.output_dir)
        vq, gpt = models["vq_tokenizer"], models["code_gpt"]
        results = {}
        if accelerator.is_main_process:
            vq.config.register_for_auto_class()
            vq.register_for_auto_class("AutoModel")
            gpt.config.register_for_auto_class()
            gpt.register_for_auto_class("AutoModelForCausalLM")
            pipe = CodeImagePipeline(vq_tokenizer=vq, code_gpt=gpt)
            pipe.set_progress_bar_config(disable=True)
            pipe.save_pretrained(str(out))
            # remote code ignores `subfolder` when it looks for code files: ship them at the root too
            for sub in ("vq_tokenizer", "code_gpt"):
                for py in (out / sub).glob("*.py"):
                    shutil.copy2(py, out / py.name)
            results = self.evaluate_pipeline(pipe)
            grid_labels = torch.arange(gpt.config.num_classes).repeat_interleave(self.eval_args.grid_samples_per_class)
            grid = pipe(
                class_labels=grid_labels,
                temperature=self.eval_args.temperature,
                top_k=self.eval_args.top_k,
                top_p=self.eval_args.top_p,
                guidance_scale=self.eval_args.guidance_scale,
                generator=torch.Generator().manual_seed(self.eval_args.seed + 1),
                output_type="pt",
            ).images
            _to_uint8_grid(grid * 2 - 1, nrow=self.eval_args.grid_samples_per_class).save(out / "samples.png")
        accelerator.wait_for_everyone()
        return results

    def evaluate_saved(self, output_dir) -> dict:
        """The sample metrics of an exported pipeline under this task's ``evaluation`` settings."""
        from hf_models.pipelines import CodeImagePipeline

        pipe = CodeImagePipeline.from_pretrained(str(output_dir))
        pipe.set_progress_bar_config(disable=True)
        results = self.evaluate_pipeline(pipe)
        results.update({f"evaluation/{k}": v for k, v in vars(self.eval_args).items()})
        return results

    @torch.no_grad()
    def evaluate_pipeline(self, pipe) -> dict:
        from hf_models.metrics.image_metrics import class_accuracy, classifier_fid, predicted_class_entropy

        ev = self.eval_args
        num_classes = pipe.code_gpt.config.num_classes
        labels = torch.arange(num_classes).repeat_interleave(ev.num_samples_per_class)
        images = pipe(
            class_labels=labels,
            temperature=ev.temperature,
            top_k=ev.top_k,
            top_p=ev.top_p,
            guidance_scale=ev.guidance_scale,
            generator=torch.Generator().manual_seed(ev.seed),
            output_type="pt",
        ).images  # (N, 1, 28, 28) in [0, 1]
        n = len(images)
        test_images, _ = self.mnist("test")
        train_images, _ = self.mnist("train")
        if len(test_images) < n or len(train_images) < n:
            raise ConfigError(f"FID with {n} samples needs at least {n} test and train images; lower evaluation.num_samples_per_class or raise data.max_eval_samples")
        gen = torch.Generator().manual_seed(ev.seed)
        test_ref = test_images[torch.randperm(len(test_images), generator=gen)[:n]]
        train_ref = train_images[torch.randperm(len(train_images), generator=gen)[:n]]
        results = {
            "fid": float(classifier_fid(images, test_ref)),
            "fid_floor": float(classifier_fid(test_ref, train_ref)),
            "class_accuracy": float(class_accuracy(images, labels)),
            "predicted_class_entropy": float(predicted_class_entropy(images)),
            "num_fid_samples": n,
        }
        results.update({k: v for k, v in self.stage_metrics.items()})
        return results


class VQTokenizerStage(Stage):
    name = "vq_tokenizer"

    def build_model(self):
        from hf_models.vq_tokenizer import VQTokenizerModel

        return VQTokenizerModel(self.task.vq_config)

    def load(self, directory):
        from hf_models.vq_tokenizer import VQTokenizerModel

        model = VQTokenizerModel.from_pretrained(directory)
        self.task.vq_model = model.eval()
        return model

    def build_datasets(self, accelerator):
        train = ImageDataset(*self.task.mnist("train"))
        test = ImageDataset(*self.task.mnist("test"))
        return train, test

    def compute_loss(self, model, batch, generator):
        out = model(pixel_values=batch["pixel_values"])
        logs = {"recon_loss": out.recon_loss.item(), "commit_loss": out.commit_loss.item(), "perplexity": float(out.perplexity)}
        return StepOutput(loss=out.loss, logs=logs, num_items=batch["pixel_values"].shape[0])

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        sq_err, count, usage = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device), None
        size = self.task.vq_config.codebook_size
        for batch in dataloader:
            out = model(pixel_values=batch["pixel_values"])
            # PSNR on the [0, 1] scale: data range 1
            err = ((out.reconstruction.clamp(-1, 1) - batch["pixel_values"]) / 2).pow(2).flatten(1).mean(1)
            err, codes = accelerator.gather_for_metrics((err, out.codes))
            sq_err += err.sum()
            count += err.numel()
            hist = torch.bincount(codes.flatten(), minlength=size)
            usage = hist if usage is None else usage + hist
        mse = (sq_err / count).item()
        probs = usage.float() / usage.sum()
        perplexity = torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()).item()
        metrics = {"recon_psnr": 10 * np.log10(1.0 / max(mse, 1e-12)), "codebook_usage": int((usage > 0).sum()), "codebook_perplexity": perplexity}
        self.task.stage_metrics.update(recon_psnr=metrics["recon_psnr"], codebook_usage=metrics["codebook_usage"])
        return metrics

    @torch.no_grad()
    def sample_grid(self, model, accelerator):
        images, _ = self.task.mnist("test")
        x = ImageDataset(images[:16], torch.zeros(16))
        pixels = torch.stack([x[i]["pixel_values"] for i in range(len(x))]).to(accelerator.device)
        recon = model(pixel_values=pixels).reconstruction
        return _to_uint8_grid(torch.cat([pixels, recon]), nrow=16)

    def save(self, model, directory):
        super().save(model, directory)
        self.task.vq_model = model

    def peft_target_modules(self):
        # every Conv2d of the encoder and decoder except the strided down-samplers (named by index); the
        # decoder's ConvTranspose2d up-samplers have no LoRA layer in peft
        return ["conv_in", "conv1", "conv2", "conv_out"]

    def peft_modules_to_save(self):
        # the codebook follows the (adapted) encoder by EMA: its buffers are saved with the adapter
        return ["quantizer"]


class CodeGPTStage(Stage):
    name = "code_gpt"
    throughput_unit = "tokens"

    def build_model(self):
        from hf_models.code_gpt import CodeGPTForCausalLM

        return CodeGPTForCausalLM(self.task.gpt_config)

    def load(self, directory):
        from hf_models.code_gpt import CodeGPTForCausalLM

        return CodeGPTForCausalLM.from_pretrained(directory)

    def peft_target_modules(self):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def _vq(self):
        if self.task.vq_model is None:
            from hf_models.vq_tokenizer import VQTokenizerModel

            self.task.vq_model = VQTokenizerModel.from_pretrained(str(Path(self.task.output_dir) / "vq_tokenizer")).eval()
        return self.task.vq_model

    def _codes(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """Encode a split with the trained tokenizer; cached under output_dir/codes/<split> keyed by its weights."""
        from hf_models.data.codes import load_codes, save_codes

        vq_dir = Path(self.task.output_dir) / "vq_tokenizer"
        weights = sorted(vq_dir.glob("*.safetensors"))
        key = hashlib.sha256(b"".join(p.read_bytes() for p in weights)).hexdigest()[:16]
        images, labels = self.task.mnist(split)
        cache = Path(self.task.output_dir) / "codes" / split
        meta = cache / "meta.json"
        if meta.is_file() and json.loads(meta.read_text()) == {"vq": key, "n": len(images)}:
            return load_codes(cache)
        vq = self._vq()
        chunks = []
        for start in range(0, len(images), 1000):
            x = images[start: start + 1000].float().div(127.5).sub(1.0).unsqueeze(1)
            chunks.append(vq.encode(x).flatten(1).cpu())
        codes = torch.cat(chunks).numpy().astype(np.int64)
        tmp = cache.with_name(cache.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save_codes(tmp, codes, labels.numpy())
        (tmp / "meta.json").write_text(json.dumps({"vq": key, "n": len(images)}))
        shutil.rmtree(cache, ignore_errors=True)
        tmp.rename(cache)
        return codes, labels.numpy()

    def build_datasets(self, accelerator):
        from hf_models.data.codes import build_code_sequences

        out = []
        for split in ("train", "test"):
            codes, labels = self._codes(split)
            ds = build_code_sequences(codes, labels, self.task.gpt_config)
            out.append(TokenWindows(torch.tensor(ds["input_ids"], dtype=torch.long)))
        return out[0], out[1]

    def compute_loss(self, model, batch, generator):
        cfg = self.task.gpt_config
        input_ids = batch["input_ids"]
        if cfg.num_classes > 0 and cfg.class_dropout_prob > 0:
            drop = torch.rand(input_ids.shape[0], generator=generator) < cfg.class_dropout_prob
            input_ids = input_ids.clone()
            input_ids[drop.to(input_ids.device), 0] = cfg.null_class_token_id
        labels = input_ids.clone()
        out = model(input_ids=input_ids, labels=labels)
        return StepOutput(loss=out.loss, num_items=input_ids.numel())

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        cfg = self.task.gpt_config
        prefix = 2 if cfg.num_classes > 0 else 1  # [class][BOS] or [BOS]
        total, count = torch.zeros((), device=accelerator.device, dtype=torch.float64), 0
        for batch in dataloader:
            ids = batch["input_ids"]
            logits = model(input_ids=ids).logits.float()
            # code c_j sits at position prefix + j and is predicted from position prefix + j - 1
            pred = logits[:, prefix - 1: prefix - 1 + cfg.num_codes]
            target = ids[:, prefix: prefix + cfg.num_codes]
            nll = torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1), reduction="none").view(len(ids), -1).sum(1)
            nll = accelerator.gather_for_metrics(nll)
            total += nll.double().sum()
            count += nll.numel() * cfg.num_codes
        bits = (total / count / np.log(2)).item()
        self.task.stage_metrics["bits_per_code"] = bits
        return {"bits_per_code": bits}

    @torch.no_grad()
    def sample_grid(self, model, accelerator):
        cfg = self.task.gpt_config
        vq = self._vq().to(accelerator.device)
        per = 8
        labels = torch.arange(max(cfg.num_classes, 1)).repeat_interleave(per).to(accelerator.device)
        codes = model.generate_codes(labels if cfg.num_classes else None, num_codes=cfg.num_codes, generator=torch.Generator().manual_seed(0), **({} if cfg.num_classes else {"batch_size": per}))
        side = self.task.vq_config.latent_size
        images = vq.decode(codes.view(-1, side, side))
        return _to_uint8_grid(images, nrow=per)
