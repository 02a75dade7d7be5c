"""TokComPipeline: text from a flow-matching latent denoiser and a text VAE (generate, reconstruct, encode, decode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..validation import check_count
from .pipeline_utils import LatentheatPipelineMixin

OUTPUT_TYPES = ("str", "pt", "latent")


@dataclass
class TokComPipelineOutput(BaseOutput):
    """
    texts (`list[str]` or `None`): decoded text (`output_type="str"`).
    token_ids (`torch.LongTensor` of shape `(batch, num_chunks * chunk_size)` or `None`): argmax tokens of the VAE
        decoder (`"str"` and `"pt"`).
    latents (`torch.FloatTensor` of shape `(batch, num_chunks, latent_size)`): the denoised (or encoded) latents.
    """

    texts: Optional[list]
    token_ids: Optional[torch.Tensor]
    latents: torch.Tensor


class TokComPipeline(LatentheatPipelineMixin, DiffusionPipeline):
    r"""
    Pipeline for TokCom text generation: Euler integration of the flow from `x_0 ~ N(0, noise_std^2)` to clean latents
    `x_1` (the denoiser predicts `x_1`; the velocity handed to the flow-matching scheduler is `(x_t - x_1) / sigma`
    with diffusers' `sigma = 1 - t`), then the VAE decodes each latent into `chunk_size` tokens in parallel.

    Args:
        vae ([`TokComVAEModel`]): one latent per chunk of tokens, and back.
        denoiser ([`TokComDenoiserModel`]): predicts clean latents from noised ones.
        scheduler ([`FlowMatchEulerDiscreteScheduler`]): diffusers' Euler flow-matching scheduler (`shift` 1).
        tokenizer ([`PreTrainedTokenizerFast`]): text <-> token ids of the VAE's vocabulary.

    Example:

    ```py
    >>> import torch
    >>> from hf_models.pipelines import TokComPipeline
    >>> pipe = TokComPipeline.from_pretrained("outputs/tokcom_shakespeare")
    >>> pipe(batch_size=2, num_chunks=32, generator=torch.Generator().manual_seed(0)).texts
    >>> pipe.reconstruct(["To be, or not to be, that is the question"])
    ```
    """

    model_cpu_offload_seq = "denoiser->vae"

    def __init__(self, vae, denoiser, scheduler, tokenizer):
        super().__init__()
        if vae.config.latent_size != denoiser.config.latent_size:
            raise ValueError(
                f"vae.config.latent_size={vae.config.latent_size} differs from denoiser.config.latent_size="
                f"{denoiser.config.latent_size}"
            )
        self.register_modules(vae=vae, denoiser=denoiser, scheduler=scheduler, tokenizer=tokenizer)

    # -- text <-> ids ---------------------------------------------------------------------------
    @property
    def pad_token_id(self) -> int:
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an eos token: set tokenizer.pad_token")
        return pad

    def tokenize(self, texts: Union[str, list]) -> tuple[torch.LongTensor, list]:
        """Token ids `(batch, L)` padded with the pad token to a whole number of chunks (L the longest), and each
        text's own token count."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a string or a non-empty list of strings")
        ids = [self.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        if any(len(i) == 0 for i in ids):
            raise ValueError("an empty text has no chunk to encode")
        c = self.vae.config.chunk_size
        length = max(-(-len(i) // c) * c for i in ids)
        batch = torch.full((len(ids), length), self.pad_token_id, dtype=torch.long)
        for row, i in enumerate(ids):
            batch[row, : len(i)] = torch.tensor(i)
        return batch, [len(i) for i in ids]

    # -- modes ----------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, texts_or_ids: Union[str, list, torch.Tensor]) -> torch.Tensor:
        """Posterior means `(batch, num_chunks, latent_size)` of texts (or of token ids `(batch, L)`)."""
        ids = texts_or_ids if isinstance(texts_or_ids, torch.Tensor) else self.tokenize(texts_or_ids)[0]
        return self.vae.encode(ids.to(self._execution_device))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, output_type: str = "str", return_dict: bool = True):
        """Argmax tokens (and text) of latents `(batch, num_chunks, latent_size)`."""
        return self._finish(latents.to(self._execution_device), output_type, return_dict)

    @torch.no_grad()
    def reconstruct(self, texts: Union[str, list]) -> list:
        """Encode then decode texts; each reconstruction is cut to its text's own token count."""
        ids, lengths = self.tokenize(texts)
        tokens = self.vae.decode(self.vae.encode(ids.to(self._execution_device))).argmax(-1).cpu()
        return [self.tokenizer.decode(tokens[row, :n].tolist()) for row, n in enumerate(lengths)]

    def _finish(self, latents, output_type, return_dict):
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; allowed: {', '.join(OUTPUT_TYPES)}")
        texts = token_ids = None
        if output_type != "latent":
            token_ids = self.vae.decode(latents.to(self.vae.dtype)).argmax(-1).cpu()
            if output_type == "str":
                texts = self.tokenizer.batch_decode(token_ids.tolist())
        if not return_dict:
            return (texts, token_ids, latents)
        return TokComPipelineOutput(texts=texts, token_ids=token_ids, latents=latents)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        num_chunks: Optional[int] = None,
        num_inference_steps: int = 50,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "str",
        return_dict: bool = True,
    ):
        r"""
        Args:
            batch_size (`int`, defaults to 1): sequences to draw.
            num_chunks (`int`, *optional*): latents per sequence (`num_chunks * chunk_size` tokens); defaults to the
                denoiser's `max_chunks`.
            num_inference_steps (`int`, defaults to 50): Euler steps from `t = 0` to `t = 1`.
            generator (`torch.Generator`, *optional*): draws the source noise; same seed, same text.
            latents (`torch.FloatTensor`, *optional*): the source noise `x_0` `(batch, num_chunks, latent_size)`.
            output_type (`str`, defaults to `"str"`): `"str"` (texts and token ids), `"pt"` (token ids) or `"latent"`.
            return_dict (`bool`, defaults to `True`): a [`TokComPipelineOutput`] or a tuple.
        """
        cfg = self.denoiser.config
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not supported; allowed: {', '.join(OUTPUT_TYPES)}")
        check_count("num_inference_steps", num_inference_steps)
        device, dtype = self._execution_device, self.denoiser.dtype
        if latents is None:
            num_chunks = cfg.max_chunks if num_chunks is None else num_chunks
            check_count("batch_size", batch_size)
            if not isinstance(num_chunks, int) or not 1 <= num_chunks <= cfg.max_chunks:
                raise ValueError(f"num_chunks={num_chunks!r} must be an int in [1, max_chunks={cfg.max_chunks}]")
            noise = torch.randn((batch_size, num_chunks, cfg.latent_size), generator=generator, dtype=torch.float32)
            latents = cfg.noise_std * noise
        elif latents.dim() != 3 or latents.shape[-1] != cfg.latent_size:
            raise ValueError(f"latents must be (batch, num_chunks, latent_size={cfg.latent_size}); got {tuple(latents.shape)}")
        sample = latents.to(device=device, dtype=dtype)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        sigmas = self.scheduler.sigmas
        for i, timestep in enumerate(self.progress_bar(self.scheduler.timesteps)):
            sigma = sigmas[i].to(dtype)
            x1 = self.denoiser(sample, (1.0 - sigma).expand(sample.shape[0])).sample
            velocity = (sample - x1) / sigma  # d x / d sigma for x = sigma * x_0 + (1 - sigma) * x_1
            sample = self.scheduler.step(velocity, timestep, sample, generator=generator).prev_sample
        return self._finish(sample, output_type, return_dict)
