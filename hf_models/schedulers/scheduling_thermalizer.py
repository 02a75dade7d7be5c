"""Scheduler of the thermalizer (Pedersen, Zanna, Bruna, ICML 2025): a DDPM schedule over embedding grids plus the
`thermalize` step that pulls drifted emulator states back onto the invariant measure."""

from dataclasses import dataclass
from typing import Optional, Union

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_ddpm import DDPMScheduler
# diffusers' pipeline loader looks the loadable base classes up in the component's own module by name
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor


# `thermalize` feeds the model's `noise_pred` to the DDPM step and draws no variance from the model
PREDICTION_TYPES = ("epsilon",)
VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


@dataclass
class ThermalizerSchedulerOutput(BaseOutput):
    r"""
    sample (`torch.FloatTensor` of shape `(batch, C, H, W)`):
        The batch after thermalization: fired items denoised to level `s_stop`, all others bit-identical to the input.
    levels (`torch.LongTensor` of shape `(batch,)`):
        The noise level of each input item (given, or the argmax of the model's `level_logits`).
    fired (`torch.BoolTensor` of shape `(batch,)`):
        `s_init < levels <= s_max`: the items that were denoised.
    stopped (`torch.BoolTensor` of shape `(batch,)`):
        `levels > s_max`: the rollout of that item is declared dead; the item is returned unchanged.
    num_model_calls (`int`):
        Forward passes of `model` made by this call (the level classification when `levels` was not given, plus one
        per denoising level; each pass sees only the items active at that level). `0` for `noise_control=True` with
        `levels` given.
    """

    sample: torch.FloatTensor
    levels: torch.LongTensor
    fired: torch.BoolTensor
    stopped: torch.BoolTensor
    num_model_calls: int = 0


def select_generators(generator, rows, repeat: int = 1):
    """The generators of a sub-batch: with a list (one `torch.Generator` per item, diffusers' convention) those of the
    items `rows`, each `repeat` times in a row; a single generator (or `None`) is shared by any sub-batch."""
    if isinstance(generator, (list, tuple)):
        return [generator[int(r)] for r in rows for _ in range(repeat)]
    return generator


class ThermalizerScheduler(DDPMScheduler):
    r"""
    DDPM noise schedule over embedding grids `(B, C, H, W)` (normalized to about unit variance by the caller) with the
    thermalizer's corrective step. A subclass of diffusers' `DDPMScheduler`: `add_noise`, `set_timesteps`, `step` (one
    reverse step `t -> t-1`, returning `DDPMSchedulerOutput`) and the schedule tables are DDPM's, only the defaults
    differ (cosine betas, no clipping: embeddings are not in `[-1, 1]`). The `__init__` takes every `DDPMScheduler`
    argument, so the saved `scheduler_config.json` is complete (`DDPMScheduler.from_config` reads it too, ignoring
    the `s_*` fields with a warning).

    `thermalize(model, sample)` reads each item's noise level `s` from the model's classifier head. Items with
    `s_init < s <= s_max` are treated as DDPM samples at level `s` and denoised by ancestral DDPM steps down to level
    `s_stop`; items with `s > s_max` are flagged `stopped` (the rollout is dead); all items that are not denoised are
    returned bit-identical.

    Args:
        num_train_timesteps (`int`, defaults to 1000): number of noise levels `T`; levels are `0, ..., T-1`.
        beta_schedule (`str`, defaults to `"squaredcos_cap_v2"`): DDPM's beta schedule (cosine by default).
        variance_type (`str`, defaults to `"fixed_small"`): one of `VARIANCE_TYPES` (the model predicts no variance).
        clip_sample (`bool`, defaults to `False`): DDPM's clipping of the predicted `x_0`.
        prediction_type (`str`, defaults to `"epsilon"`): the model predicts the noise (`noise_pred`).
        s_init (`int`, defaults to 10): an item whose predicted level exceeds `s_init` is thermalized.
        s_stop (`int`, defaults to 4): the level thermalization denoises down to.
        s_max (`int`, defaults to 200): an item whose predicted level exceeds `s_max` is flagged `stopped`.
        num_denoising_steps (`int`, *optional*): at most this many DDPM steps per thermalization: item `i` jumps along
            `K + 1` evenly spaced levels from `s_i` to `s_stop` (rounded; the DDPM posterior between non-adjacent
            levels, as in strided DDPM sampling). `None` (default, the paper's) steps one level at a time.
        renoise (`bool`, defaults to `False`): before denoising, add fresh Gaussian noise to each fired item at its
            level `s` (`add_noise`, as in SDEdit), so a state that drifted without Gaussian noise (an emulator state
            whose codes stay on the codebook) is turned into a DDPM sample at level `s` the denoiser was trained on.
            `False` (the paper's) takes the state itself as that sample.
        s_floor (`int`, *optional*): a fired item is denoised from level `max(s, s_floor)` instead of its predicted
            level `s` (`s_stop < s_floor < num_train_timesteps`): a deeper, fixed-strength correction of every fired
            state, whatever the classifier read, while `s_init` still decides which states fire. `None` (default, the
            paper's) starts at `s`.
        s_ceiling (`int`, *optional*): a fired item is denoised from level `min(s, s_ceiling)` (after `s_floor`;
            `s_stop < s_ceiling < num_train_timesteps`, at least `s_floor`): a state the classifier reads far above
            the levels where one thermalization keeps a true grid's statistics is corrected as if it read
            `s_ceiling`, while `s_init` and `s_max` still decide which states fire and stop. `None` (default, the
            paper's) starts at `s`.
        eta (`float`, *optional*): denoise with DDIM steps of this `eta` instead (`0` deterministic, `1` the DDPM
            posterior's variance): `x_p = sqrt(abar_p) x0_pred + sqrt(1 - abar_p - sigma^2) eps + sigma z` with
            `sigma^2 = eta^2 (1 - abar_p) / (1 - abar_t) (1 - abar_t / abar_p)`. `None` (default) takes DDPM steps.
        Other arguments: as in `DDPMScheduler`.

    Example:

    ```python
    >>> scheduler = ThermalizerScheduler(s_init=10, s_stop=4, s_max=200)
    >>> generator = torch.Generator().manual_seed(0)
    >>> out = scheduler.thermalize(thermalizer_model, state, generator=generator)  # state: (B, C, H, W)
    >>> state, alive = out.sample, ~out.stopped
    ```
    """

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "squaredcos_cap_v2",
        trained_betas: Optional[Union[np.ndarray, list]] = None,
        variance_type: str = "fixed_small",
        clip_sample: bool = False,
        prediction_type: str = "epsilon",
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        clip_sample_range: float = 1.0,
        sample_max_value: float = 1.0,
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        rescale_betas_zero_snr: bool = False,
        s_init: int = 10,
        s_stop: int = 4,
        s_max: int = 200,
        num_denoising_steps: Optional[int] = None,
        renoise: bool = False,
        eta: Optional[float] = None,
        s_floor: Optional[int] = None,
        s_ceiling: Optional[int] = None,
    ):
        if not isinstance(num_train_timesteps, int) or isinstance(num_train_timesteps, bool) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps!r} is invalid: expected an int >= 2")
        for name, value in (("s_init", s_init), ("s_stop", s_stop), ("s_max", s_max)):
            if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: expected an int")
        if not 0 <= s_stop < s_init <= s_max < num_train_timesteps:
            raise ValueError(
                f"s_stop={s_stop}, s_init={s_init}, s_max={s_max} with num_train_timesteps={num_train_timesteps} are "
                f"invalid: expected 0 <= s_stop < s_init <= s_max < num_train_timesteps"
            )
        if s_floor is not None and (
            not isinstance(s_floor, (int, np.integer)) or isinstance(s_floor, bool) or not s_stop < s_floor < num_train_timesteps
        ):
            raise ValueError(
                f"s_floor={s_floor!r} is invalid: expected null (start at the predicted level) or an int with "
                f"s_stop={s_stop} < s_floor < num_train_timesteps={num_train_timesteps}"
            )
        if s_ceiling is not None and (
            not isinstance(s_ceiling, (int, np.integer)) or isinstance(s_ceiling, bool)
            or not s_stop < s_ceiling < num_train_timesteps or (s_floor is not None and s_ceiling < s_floor)
        ):
            raise ValueError(
                f"s_ceiling={s_ceiling!r} is invalid: expected null (start at the predicted level) or an int with "
                f"s_stop={s_stop} < s_ceiling < num_train_timesteps={num_train_timesteps}"
                + (f" and s_ceiling >= s_floor={s_floor}" if s_floor is not None else "")
            )
        if num_denoising_steps is not None and (
            not isinstance(num_denoising_steps, (int, np.integer)) or isinstance(num_denoising_steps, bool) or num_denoising_steps < 1
        ):
            raise ValueError(
                f"num_denoising_steps={num_denoising_steps!r} is invalid: expected null (one level per step) or an int >= 1"
            )
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 <= eta <= 1):
            raise ValueError(f"eta={eta!r} is invalid: expected null (DDPM steps) or a number in [0, 1]")
        if not isinstance(renoise, (bool, np.bool_)):
            raise ValueError(f"renoise={renoise!r} is invalid: expected true or false")
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={prediction_type!r} is invalid: expected one of {PREDICTION_TYPES} (the "
                f"thermalizer's model predicts the noise)"
            )
        if variance_type not in VARIANCE_TYPES:
            raise ValueError(
                f"variance_type={variance_type!r} is invalid: expected one of {VARIANCE_TYPES} (the thermalizer's "
                f"model predicts no variance)"
            )
        # DDPM's own decorated __init__ registers the same values again (a merge, no conflict)
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            variance_type=variance_type,
            clip_sample=clip_sample,
            prediction_type=prediction_type,
            thresholding=thresholding,
            dynamic_thresholding_ratio=dynamic_thresholding_ratio,
            clip_sample_range=clip_sample_range,
            sample_max_value=sample_max_value,
            timestep_spacing=timestep_spacing,
            steps_offset=steps_offset,
            rescale_betas_zero_snr=rescale_betas_zero_snr,
        )

    def with_config(self, **overrides) -> "ThermalizerScheduler":
        """A new scheduler with this one's config and `overrides` (validated as in `__init__`).

        `from_config({**scheduler.config, **overrides})` is not enough for a loaded scheduler: diffusers records the
        keys its saved config lacked (`_use_default_values`) and `from_config` drops those keys, so an override of one
        of them (e.g. `renoise` of a run saved before that option existed) would be silently ignored."""
        config = {k: v for k, v in self.config.items() if k != "_use_default_values"}
        return type(self).from_config({**config, **overrides})

    def step_between(self, noise_pred: torch.Tensor, timesteps: torch.LongTensor, prev_timesteps: torch.LongTensor,
                     sample: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """One ancestral DDPM step per item from level `timesteps[i]` to `prev_timesteps[i] < timesteps[i]` (DDPM's
        `step` with `prev_t` given, vectorised over items with different levels; `fixed_small` variance)."""
        if not bool((prev_timesteps < timesteps).all()) or int(prev_timesteps.min()) < 0:
            raise ValueError("step_between needs 0 <= prev_timesteps < timesteps for every item")
        shape = (-1,) + (1,) * (sample.ndim - 1)
        ab = self.alphas_cumprod.to(sample.device, torch.float64)
        ab_t, ab_p = ab[timesteps.to(sample.device)].view(shape), ab[prev_timesteps.to(sample.device)].view(shape)
        alpha = ab_t / ab_p
        beta = 1 - alpha
        x_t, eps = sample.double(), noise_pred.double()
        x0 = (x_t - (1 - ab_t).sqrt() * eps) / ab_t.sqrt()
        if self.config.eta is not None:
            variance = self.config.eta**2 * (1 - ab_p) / (1 - ab_t) * beta
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype).double()
            direction = (1 - ab_p - variance).clamp_min(0).sqrt() * eps
            return (ab_p.sqrt() * x0 + direction + variance.sqrt() * noise).to(sample.dtype)
        mean = ab_p.sqrt() * beta / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_p) / (1 - ab_t) * x_t
        variance = (beta * (1 - ab_p) / (1 - ab_t)).clamp_min(1e-20)
        noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype).double()
        return (mean + variance.sqrt() * noise).to(sample.dtype)

    @staticmethod
    def _noise_pred(output) -> torch.Tensor:
        return output if isinstance(output, torch.Tensor) else output.noise_pred

    @torch.no_grad()
    def thermalize(
        self,
        model,
        sample: torch.Tensor,
        generator: Optional[torch.Generator] = None,
        levels: Optional[torch.Tensor] = None,
        noise_control: bool = False,
        return_dict: bool = True,
    ) -> Union[ThermalizerSchedulerOutput, tuple]:
        """
        One thermalization of a batch of emulator states.

        For every fired item (`s_init < levels <= s_max`), its start level is `levels[i]` (raised to `s_floor` and
        lowered to `s_ceiling` where those are set); the loop `t = max(start[fired]), ..., s_stop + 1` runs the items with
        `start >= t` (only that sub-batch goes through `model`) through one DDPM reverse step `t -> t-1`
        (`self.step`), so item `i` gets exactly `start[i] - s_stop` steps and ends at level `s_stop`.
        Steps are always single levels, whatever `set_timesteps` was called with before (it is restored after).

        Args:
            model (`Callable`): `model(x)` returns an object with `.noise_pred` (the shape of `x`) and `.level_logits`
                `(batch, num_train_timesteps)` (a `ThermalizerModel`); a plain tensor is taken as `noise_pred`.
            sample (`torch.FloatTensor` of shape `(batch, C, H, W)`): the states; not modified.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): the only source of randomness; a list
                gives each item its own (diffusers' convention), so an item's noise does not depend on the others.
            levels (`torch.LongTensor` of shape `(batch,)`, *optional*): noise levels of the items; by default
                `model(sample).level_logits.argmax(-1)`.
            noise_control (`bool`, defaults to `False`): the noise-only control arm. Same levels, firing decisions
                and DDPM steps (with their ancestral noise), but the model's `noise_pred` is replaced by standard
                Gaussian noise drawn from `generator`: no learned denoising, so it isolates the effect of the
                noising/renoising mechanics from that of the denoiser. The model is then only called to classify
                levels (when `levels` is `None`).
            return_dict (`bool`, defaults to `True`): return a `ThermalizerSchedulerOutput`, else its tuple.
        """
        if sample.ndim < 2:
            raise ValueError(f"sample has shape {tuple(sample.shape)}: expected (batch, C, H, W)")
        B = sample.shape[0]
        if isinstance(generator, (list, tuple)) and len(generator) != B:
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {B}: expected one per item")

        num_model_calls = 0
        if levels is None:
            levels = model(sample).level_logits.argmax(-1)
            num_model_calls += 1
        levels = torch.as_tensor(levels).to(device=sample.device, dtype=torch.long)
        if levels.shape != (B,):
            raise ValueError(f"levels has shape {tuple(levels.shape)}: expected ({B},), one level per item of sample")
        cfg = self.config
        stopped = levels > cfg.s_max
        fired = (levels > cfg.s_init) & ~stopped
        # the level each fired item is denoised from (the predicted one, at least s_floor and at most s_ceiling); read
        # at fired items only
        start_levels = levels if cfg.s_floor is None else levels.clamp_min(cfg.s_floor)
        if cfg.s_ceiling is not None:
            start_levels = start_levels.clamp_max(cfg.s_ceiling)
        x = sample.clone()
        if cfg.renoise and bool(fired.any()):
            rows = fired.nonzero().flatten()
            noise = randn_tensor(x[rows].shape, generator=select_generators(generator, rows), device=x.device, dtype=x.dtype)
            x[rows] = self.add_noise(x[rows], noise, start_levels[rows]).to(x.dtype)
        if bool(fired.any()) and (cfg.num_denoising_steps is not None or cfg.eta is not None):
            rows_all = fired.nonzero().flatten()
            start = start_levels[rows_all].double()
            # DDIM steps without num_denoising_steps: one level per step, as the DDPM path
            K = cfg.num_denoising_steps or int(start.max()) - cfg.s_stop
            frac = torch.arange(K + 1, dtype=torch.float64, device=start.device) / K
            grid = (start[:, None] + (cfg.s_stop - start[:, None]) * frac[None]).round().long()  # (n, K + 1)
            for k in range(K):
                t, prev = grid[:, k], grid[:, k + 1]
                act = t > prev
                if not bool(act.any()):
                    continue
                rows = rows_all[act]
                x_t, gen = x[rows], select_generators(generator, rows)
                if noise_control:
                    eps = randn_tensor(x_t.shape, generator=gen, device=x_t.device, dtype=x_t.dtype)
                else:
                    eps = self._noise_pred(model(x_t))
                    num_model_calls += 1
                x[rows] = self.step_between(eps, t[act], prev[act], x_t, generator=gen).to(x.dtype)
        elif bool(fired.any()):
            top = int(start_levels[fired].max())
            saved = self.num_inference_steps, self.custom_timesteps
            # with neither set, DDPM's previous_timestep(t) is t - 1
            self.num_inference_steps, self.custom_timesteps = None, False
            try:
                for t in range(top, cfg.s_stop, -1):
                    active = fired & (start_levels >= t)
                    x_t, gen = x[active], select_generators(generator, active.nonzero().flatten())
                    if noise_control:
                        eps = randn_tensor(x_t.shape, generator=gen, device=x_t.device, dtype=x_t.dtype)
                    else:
                        eps = self._noise_pred(model(x_t))
                        num_model_calls += 1
                        if eps.shape != x_t.shape:
                            raise ValueError(
                                f"model returned noise_pred of shape {tuple(eps.shape)} for input of shape "
                                f"{tuple(x_t.shape)}: expected the same shape"
                            )
                    x[active] = self.step(eps, t, x_t, generator=gen).prev_sample.to(x.dtype)
            finally:
                self.num_inference_steps, self.custom_timesteps = saved
        if not return_dict:
            return (x, levels, fired, stopped, num_model_calls)
        return ThermalizerSchedulerOutput(
            sample=x, levels=levels, fired=fired, stopped=stopped, num_model_calls=num_model_calls
        )


__all__ = ["ThermalizerScheduler", "ThermalizerSchedulerOutput", "select_generators"]
