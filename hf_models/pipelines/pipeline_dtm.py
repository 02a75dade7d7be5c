"""DTMPipeline: unconditional binary images from a denoising thermodynamic model and its Gibbs scheduler."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from ..validation import check_count
from .pipeline_utils import LatentheatPipelineMixin, check_output_type


class DTMPipeline(LatentheatPipelineMixin, DiffusionPipeline):
    r"""
    Pipeline for unconditional generation of binary images with a block-sparse denoising thermodynamic model.

    Starts from uniform random spins and runs the reverse bit-flip process: at every level `t` the scheduler's
    `step` draws `x^{(t-1)}` by chromatic block Gibbs sweeps on the Ising model that `dtm.step_parameters(x_t, t)`
    gives. There is no neural network call: the "model output" of a step is its sparse couplings and fields.

    Args:
        dtm ([`DTMModel`]): one sparse Ising energy per reverse step.
        scheduler ([`DTMScheduler`]): the bit-flip schedule and the Gibbs sampler (`sweeps_per_step`, `backend`).

    Example:

    ```py
    >>> import torch
    >>> from hf_models.pipelines import DTMPipeline
    >>> pipe = DTMPipeline.from_pretrained("outputs/dtm_mnist")
    >>> images = pipe(batch_size=16, generator=torch.Generator().manual_seed(0)).images
    >>> images[0].save("digit.png")
    ```
    """

    model_cpu_offload_seq = "dtm"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, dtm, scheduler):
        super().__init__()
        self.register_modules(dtm=dtm, scheduler=scheduler)
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    def check_inputs(self, batch_size, latents, callback_on_step_end_tensor_inputs):
        config = self.dtm.config
        check_count("batch_size", batch_size)
        if self.scheduler.config.num_train_timesteps != config.num_train_timesteps:
            raise ValueError(
                f"scheduler.config.num_train_timesteps={self.scheduler.config.num_train_timesteps} does not match "
                f"dtm.config.num_train_timesteps={config.num_train_timesteps}: one energy model per step"
            )
        for name in ("bitflip_rate", "time_grid", "log_grid_min_time"):
            if self.scheduler.config[name] != getattr(config, name):
                raise ValueError(
                    f"scheduler.config.{name}={self.scheduler.config[name]!r} differs from dtm.config.{name}="
                    f"{getattr(config, name)!r}: the sampler must reverse the forward process the model was trained on"
                )
        if latents is not None:
            shape = (batch_size, *config.image_shape)
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents has shape {tuple(latents.shape)}: expected {shape}")
            if not bool(((latents == 1) | (latents == -1)).all()):
                raise ValueError("latents must be spins with values in {-1, +1}")
        bad = [k for k in callback_on_step_end_tensor_inputs or [] if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs has {bad}; allowed: {self._callback_tensor_inputs}")

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[torch.Generator] = None,
        latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
        callback_on_step_end_tensor_inputs: Optional[list] = None,
    ):
        r"""
        Args:
            batch_size (`int`, defaults to 1): number of images.
            generator (`torch.Generator`, *optional*): the only source of randomness (same seed, same images; a CPU
                generator drives sampling on any device).
            latents (`torch.FloatTensor` of shape `(batch_size, C, H, W)`, *optional*): spins in {-1, +1} to start
                from instead of uniform random spins (the top level `x^{(T-1)}`).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"`, `"pt"` (images in {0, 1}) or `"latent"`
                (spins in {-1, +1}).
            return_dict (`bool`, defaults to `True`): return an `ImagePipelineOutput` instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called after every reverse step as
                `callback_on_step_end(self, i, t, {"latents": x^{(t-1)}})` (diffusers convention); a returned dict
                with `"latents"` replaces the state.
            callback_on_step_end_tensor_inputs (`list`, *optional*): tensors passed to the callback; `["latents"]`.
        """
        check_output_type(output_type)
        callback_on_step_end_tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_inputs(batch_size, latents, callback_on_step_end_tensor_inputs)
        device = self.dtm.couplings.device
        shape = (batch_size, *self.dtm.config.image_shape)
        if latents is None:
            latents = self.scheduler.sample_prior(shape, generator=generator, device=device)
        latents = latents.to(device=device, dtype=torch.float32)
        self.scheduler.set_timesteps(device=device)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as progress_bar:
            for i, t in enumerate(timesteps):
                params = self.dtm.step_parameters(latents, t)
                latents = self.scheduler.step(params, t, latents, generator=generator).prev_sample
                if callback_on_step_end is not None:
                    step_tensors = {"latents": latents}
                    tensors = {k: step_tensors[k] for k in callback_on_step_end_tensor_inputs}
                    returned = callback_on_step_end(self, i, t, tensors) or {}
                    latents = returned.pop("latents", latents)
                progress_bar.update()
        if output_type == "latent":
            images = latents
        else:
            images = self.image_processor.postprocess(latents, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)


__all__ = ["DTMPipeline"]
