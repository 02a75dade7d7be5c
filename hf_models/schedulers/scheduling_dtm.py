"""Scheduler of the denoising thermodynamic model: bit-flip forward process and block-Gibbs reverse steps."""

from dataclasses import dataclass
from typing import Optional, Union

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..dtm.gibbs import DTMStepParameters, bitflip_schedule, flip_spins, gibbs_sweeps, thrml_gibbs_sweeps
from ..validation import check_count


BACKENDS = ("torch", "thrml")


@dataclass
class DTMSchedulerOutput(BaseOutput):
    r"""
    prev_sample (`torch.FloatTensor` of shape `(batch, C, H, W)`):
        `x^{(t-1)}` in {-1, +1} (the clean sample `x_0` after `timestep == 0`).
    latent_sample (`torch.FloatTensor` of shape `(batch, num_latent_sites)`, *optional*):
        Final state of the latent spins (`None` for a model without latents).
    """

    prev_sample: torch.FloatTensor
    latent_sample: Optional[torch.FloatTensor] = None


class DTMScheduler(SchedulerMixin, ConfigMixin):
    r"""
    Bit-flip diffusion over spins in {-1, +1} and its reverse: `step` runs chromatic block Gibbs sweeps on the
    Ising model that `DTMModel.step_parameters(x_t, t)` supplies, starting from `x_t`. Timesteps follow diffusers:
    level `t` in `[0, T)` is `x_0` after `t + 1` flip steps, and `step(..., t, x^{(t)})` returns `x^{(t-1)}`.

    Args:
        num_train_timesteps (`int`, defaults to 100): `T`, one energy model per step.
        bitflip_rate (`float`, defaults to 6.0): `lambda`; a grid step `dtau` flips a bit with probability
            `1/2 (1 - exp(-lambda dtau))` (total time 1).
        time_grid (`str`, defaults to `"linear"`): `"linear"` or `"log"` (see `hf_models.dtm.gibbs.time_grid_points`).
        log_grid_min_time (`float`, defaults to 1e-3): first time of the `"log"` grid.
        sweeps_per_step (`int`, defaults to 6): Gibbs sweeps per reverse step.
        backend (`str`, defaults to `"torch"`): `"torch"` (CPU and GPU) or `"thrml"` (optional extra).

    Example:

    ```python
    >>> scheduler = DTMScheduler(num_train_timesteps=4, sweeps_per_step=2)
    >>> generator = torch.Generator().manual_seed(0)
    >>> x_t = scheduler.add_noise(torch.ones(2, 1, 8, 8), torch.tensor([3, 3]), generator=generator)
    >>> x = scheduler.sample_prior((2, 1, 8, 8), generator=generator)
    >>> for t in scheduler.timesteps:
    ...     x = scheduler.step(model.step_parameters(x, t), t, x, generator=generator).prev_sample
    ```
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 100,
        bitflip_rate: float = 6.0,
        time_grid: str = "linear",
        log_grid_min_time: float = 1e-3,
        sweeps_per_step: int = 6,
        backend: str = "torch",
    ):
        check_count("num_train_timesteps", num_train_timesteps)
        check_count("sweeps_per_step", sweeps_per_step)
        if not bitflip_rate > 0:
            raise ValueError(f"bitflip_rate={bitflip_rate!r} is invalid: expected > 0")
        if not 0 < log_grid_min_time < 1:
            raise ValueError(f"log_grid_min_time={log_grid_min_time!r} is invalid: expected 0 < value < 1")
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r} is invalid: expected one of {BACKENDS}")
        # raises ValueError naming time_grid when it is unknown
        self.step_flip_probs, self.cumulative_flip_probs = bitflip_schedule(
            num_train_timesteps, bitflip_rate, time_grid, log_grid_min_time
        )
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)

    @classmethod
    def from_model_config(cls, model_config, **overrides) -> "DTMScheduler":
        """A scheduler matching a `DTMConfig` (same forward process and sweeps); `overrides` win."""
        kwargs = {
            name: getattr(model_config, name)
            for name in ("num_train_timesteps", "bitflip_rate", "time_grid", "log_grid_min_time", "sweeps_per_step")
        }
        kwargs.update(overrides)
        return cls(**kwargs)

    def __len__(self):
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device] = None):
        """`timesteps = [T-1, ..., 0]`. Every step has its own energy model trained for one flip step, so no step can
        be skipped: `num_inference_steps` must be `None` or `T`."""
        T = self.config.num_train_timesteps
        if num_inference_steps is not None and num_inference_steps != T:
            raise ValueError(
                f"num_inference_steps={num_inference_steps} is invalid: each of the {T} energy models denoises one "
                f"flip step, so expected num_inference_steps == num_train_timesteps == {T}"
            )
        self.num_inference_steps = T
        self.timesteps = torch.arange(T - 1, -1, -1, dtype=torch.long, device=device)

    def scale_model_input(self, sample: torch.Tensor, timestep: Optional[int] = None) -> torch.Tensor:
        return sample

    def _probs(self, table, timestep, device):
        t = torch.as_tensor(timestep, device="cpu", dtype=torch.long)
        if bool(((t < 0) | (t >= self.config.num_train_timesteps)).any()):
            raise ValueError(f"timestep={timestep} is out of range [0, {self.config.num_train_timesteps})")
        return table[t].to(device=device, dtype=torch.float32)

    def flip_probability(self, timestep, device=None) -> torch.Tensor:
        """Closed-form probability that a bit of `x_0` is flipped in `x^{(t)}`: `1/2 (1 - exp(-lambda tau_{t+1}))`."""
        return self._probs(self.cumulative_flip_probs, timestep, device)

    def step_flip_probability(self, timestep, device=None) -> torch.Tensor:
        """Probability `p_t` that the single step `x^{(t-1)} -> x^{(t)}` flips a bit."""
        return self._probs(self.step_flip_probs, timestep, device)

    def add_noise(
        self, original_samples: torch.Tensor, timesteps, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Forward process: `x^{(t)}` from spins `x_0` `(B, ...)` by independent flips with `flip_probability(t)`
        (`timesteps`: int or `(B,)`)."""
        return flip_spins(original_samples, self.flip_probability(timesteps, original_samples.device), generator)

    def sample_prior(
        self,
        shape,
        generator: Optional[torch.Generator] = None,
        device: Union[str, torch.device, None] = None,
        dtype: torch.dtype = torch.float32,
    ) -> torch.Tensor:
        """Uniform random spins (the `t -> infinity` limit of the forward process) of `shape`."""
        gen_device = generator.device if generator is not None else (device or "cpu")
        bits = torch.randint(0, 2, tuple(shape), generator=generator, device=gen_device)
        return (bits * 2 - 1).to(device=device or gen_device, dtype=dtype)

    def step(
        self,
        model_output: DTMStepParameters,
        timestep: Union[int, torch.Tensor],
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        return_dict: bool = True,
    ) -> Union[DTMSchedulerOutput, tuple]:
        """
        One reverse step: `sweeps_per_step` chromatic Gibbs sweeps of the step's Ising model with `x^{(t)}` clamped
        (it enters through `model_output.fields`), started from `x^{(t-1)} = x^{(t)}`. Latent spins are a colour of
        their own, updated first in each sweep, so their initial value does not matter.

        Args:
            model_output (`DTMStepParameters`): from `DTMModel.step_parameters(sample, timestep)`.
            timestep (`int`): the current level `t`.
            sample (`torch.FloatTensor` of shape `(batch, C, H, W)`): `x^{(t)}` in {-1, +1}.
            generator (`torch.Generator`, *optional*): the only source of randomness.
        """
        if not isinstance(model_output, DTMStepParameters):
            raise TypeError(
                f"model_output is a {type(model_output).__name__}: expected DTMStepParameters from "
                f"DTMModel.step_parameters(x_t, t)"
            )
        t = int(torch.as_tensor(timestep))
        if model_output.timestep is not None and model_output.timestep != t:
            raise ValueError(f"model_output is for timestep {model_output.timestep}, but step got timestep={t}")
        graph = model_output.graph
        B = sample.shape[0]
        if sample[0].numel() != graph.num_visible or model_output.fields.shape[0] != B:
            raise ValueError(
                f"sample has shape {tuple(sample.shape)} and fields {tuple(model_output.fields.shape)}: expected "
                f"(batch, ...) with {graph.num_visible} visible spins per sample and the same batch"
            )
        state = torch.cat(
            [sample.reshape(B, -1), sample.new_zeros(B, graph.num_sites - graph.num_visible)], dim=1
        )
        if self.config.backend == "thrml":
            if model_output.condition is None:
                raise ValueError("the thrml backend needs DTMStepParameters with bias/condition (a scalar timestep)")
            state = thrml_gibbs_sweeps(
                state, model_output.couplings, model_output.bias, model_output.condition_coupling,
                model_output.condition, graph, self.config.sweeps_per_step, generator,
            )
        else:
            state = gibbs_sweeps(
                state, model_output.couplings, model_output.fields, graph, self.config.sweeps_per_step, generator
            )
        prev_sample = state[:, : graph.num_visible].reshape(sample.shape).to(sample.dtype)
        latent_sample = state[:, graph.num_visible :] if graph.num_sites > graph.num_visible else None
        if not return_dict:
            return (prev_sample,)
        return DTMSchedulerOutput(prev_sample=prev_sample, latent_sample=latent_sample)


__all__ = ["DTMScheduler", "DTMSchedulerOutput"]
