"""ThermalizedRolloutPipeline: a token-space emulator rolled out with an embedding-space thermalizer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput

from ..schedulers.scheduling_thermalizer import select_generators
from ..validation import check_count
from .pipeline_utils import LatentheatPipelineMixin, check_output_type


@dataclass
class ThermalizedRolloutOutput(BaseOutput):
    """
    Args:
        frames (`torch.Tensor` or `np.ndarray` of shape `(B, num_steps + 1, H, W)`):
            The trajectory in the units of `initial_frames`: frame 0 is the tokenized initial condition (its
            reconstruction through the VQ tokenizer), frame `k` the state after `k` emulator steps. NaN after a stop.
        codes (`torch.LongTensor` of shape `(B, num_steps + 1, h, w)`): the code grids (-1 after a stop).
        levels (`torch.LongTensor` of shape `(B, num_steps)`): the noise level the thermalizer's classifier predicts
            for the emulator's output at each step (-1 when not tracked or after a stop).
        fired (`torch.BoolTensor` of shape `(B, num_steps)`): whether the thermalizer (or the noise control) acted.
        requantized_changes (`torch.LongTensor` of shape `(B, num_steps)`): how many of a frame's codes the
            re-quantization of the thermalized embeddings changed.
        stopped_at (`torch.LongTensor` of shape `(B,)`): the step at which the predicted level exceeded the
            scheduler's `s_max` and the trajectory was stopped, or -1.
        ended_at (`torch.LongTensor` of shape `(B,)`): the last step of a trajectory that `callback_on_step_end` ended
            (or that was running when the callback interrupted the rollout), or -1. Its later frames are NaN.
        rounds (`torch.LongTensor` of shape `(B, num_steps)`, *optional*): how many thermalizations a step made (0 when
            it did not fire; more than 1 only with `thermalize_rounds > 1`).
    """

    frames: Union[torch.Tensor, np.ndarray]
    codes: torch.Tensor
    levels: torch.Tensor
    fired: torch.Tensor
    requantized_changes: torch.Tensor
    stopped_at: torch.Tensor
    ended_at: Optional[torch.Tensor] = None
    rounds: Optional[torch.Tensor] = None


@dataclass
class ThermalizeCodesOutput(BaseOutput):
    """
    Args:
        codes (`torch.LongTensor` of shape `(B, h, w)`): the code grids after one thermalization and re-quantization;
            a grid that did not fire (read at or below `s_init`, or above `s_max`) keeps its own codes.
        levels (`torch.LongTensor` of shape `(B,)`): the level each grid was read at (the classifier's, or the given).
        fired (`torch.BoolTensor` of shape `(B,)`): whether the grid was thermalized.
        stopped (`torch.BoolTensor` of shape `(B,)`): whether the grid read above `s_max` (a rollout would stop there).
    """

    codes: torch.Tensor
    levels: torch.Tensor
    fired: torch.Tensor
    stopped: torch.Tensor


class ThermalizedRolloutPipeline(LatentheatPipelineMixin, DiffusionPipeline):
    r"""
    Autoregressive rollout of a token-space emulator, stabilised by a thermalizer in the codebook's embedding space.

    Per step: codes `c_t` -> `emulator.sample_next_frame` (all codes of the next frame in one forward pass, or code
    by code with `generate()` for an emulator with `frame_decoding="autoregressive"`) ->
    codebook lookup (`vq_tokenizer.embed`) -> the thermalizer's classifier predicts the embedding grid's noise level
    `s`; if `s > s_init` the scheduler denoises it from `s` to `s_stop` with the thermalizer's noise predictor; if
    `s > s_max` the trajectory is stopped (flag in `stopped_at`) -> re-quantization to the nearest codebook vectors
    -> `c_{t+1}`. Frames are decoded by the tokenizer at the end.

    Args:
        vq_tokenizer ([`VQTokenizerModel`]): frames <-> code grids (trained on frames divided by `frame_scale`).
        emulator ([`CodeGPTForCausalLM`]): next-frame codes from the current frame's codes.
        thermalizer ([`ThermalizerModel`]): noise predictor + noise-level classifier over embedding grids.
        scheduler ([`ThermalizerScheduler`]): DDPM cosine schedule with the `thermalize` step (`s_init`, `s_stop`,
            `s_max`).
        frame_scale (`float`, defaults to 1.0): physical frames are divided by it before the tokenizer (and the
            decoded frames multiplied by it).

    Example:

    ```py
    >>> import torch
    >>> from hf_models.pipelines import ThermalizedRolloutPipeline
    >>> pipe = ThermalizedRolloutPipeline.from_pretrained("outputs/thermalizer_kolmogorov")
    >>> out = pipe(initial_frames, num_steps=1000, generator=torch.Generator().manual_seed(0))
    >>> out.frames.shape, out.fired.float().mean()
    ```
    """

    model_cpu_offload_seq = "emulator->thermalizer->vq_tokenizer"

    def __init__(self, vq_tokenizer, emulator, thermalizer, scheduler, frame_scale: float = 1.0):
        super().__init__()
        if not frame_scale > 0:
            raise ValueError(f"frame_scale={frame_scale!r} must be > 0")
        self.register_modules(vq_tokenizer=vq_tokenizer, emulator=emulator, thermalizer=thermalizer, scheduler=scheduler)
        self.register_to_config(frame_scale=float(frame_scale))

    def check_components(self):
        vq, gpt, therm = self.vq_tokenizer.config, self.emulator.config, self.thermalizer.config
        if gpt.codebook_size != vq.codebook_size or gpt.num_codes != vq.latent_size**2:
            raise ValueError(
                f"emulator (codebook_size={gpt.codebook_size}, num_codes={gpt.num_codes}) does not match the tokenizer "
                f"(codebook_size={vq.codebook_size}, {vq.latent_size}x{vq.latent_size} codes)"
            )
        if therm.in_channels != vq.embedding_dim:
            raise ValueError(f"thermalizer.config.in_channels={therm.in_channels} differs from the tokenizer's "
                             f"embedding_dim={vq.embedding_dim}")
        if self.scheduler.config.num_train_timesteps != therm.num_train_timesteps:
            raise ValueError(f"scheduler.config.num_train_timesteps={self.scheduler.config.num_train_timesteps} differs "
                             f"from thermalizer.config.num_train_timesteps={therm.num_train_timesteps}")

    def encode_frames(self, frames: torch.Tensor) -> torch.LongTensor:
        """Physical frames `(B, H, W)` or `(B, 1, H, W)` -> code grids `(B, h, w)`."""
        frames = torch.as_tensor(frames)
        if frames.dim() == 3:
            frames = frames.unsqueeze(1)
        size = self.vq_tokenizer.config.image_size
        if frames.dim() != 4 or frames.shape[1] != 1 or tuple(frames.shape[-2:]) != (size, size):
            raise ValueError(f"frames must have shape (batch, {size}, {size}) or (batch, 1, {size}, {size}) (the tokenizer's "
                             f"image_size), got {tuple(frames.shape)}")
        if not frames.is_floating_point() or not torch.isfinite(frames).all():
            raise ValueError("frames must be finite float tensors")
        pixels = (frames / self.config.frame_scale).to(self.vq_tokenizer.device, self.vq_tokenizer.dtype)
        return self.vq_tokenizer.encode(pixels)

    @torch.no_grad()
    def decode_codes(self, codes: torch.LongTensor, chunk_size: int = 512) -> torch.Tensor:
        """Code grids `(..., h, w)` (-1 = stopped) -> physical frames `(..., H, W)` (NaN where stopped)."""
        shape = codes.shape[:-2]
        flat = codes.reshape(-1, *codes.shape[-2:])
        valid = (flat >= 0).all(-1).all(-1)
        size = self.vq_tokenizer.config.image_size
        frames = torch.full((len(flat), size, size), float("nan"))
        index = valid.nonzero().flatten()
        for start in range(0, len(index), chunk_size):
            rows = index[start : start + chunk_size]
            decoded = self.vq_tokenizer.decode(flat[rows].to(self.vq_tokenizer.device))
            frames[rows] = decoded[:, 0].float().cpu() * self.config.frame_scale
        return frames.view(*shape, size, size)

    @torch.no_grad()
    def _select_candidate(self, candidates: torch.LongTensor, num_candidates: int, h: int, w: int) -> torch.LongTensor:
        """Code grids `(b * k, h * w)`, `k` candidates per state in a row -> `(b, h * w)`: per state the candidate
        with the lowest expected level `sum_t p(t) t` under the thermalizer's classifier."""
        embedded = self.vq_tokenizer.embed(candidates.view(-1, h, w).to(self.vq_tokenizer.device))
        logits = self.thermalizer(self.thermalizer.normalize(embedded.to(self.thermalizer.device))).level_logits
        expected = (logits.float().softmax(-1) * torch.arange(logits.shape[-1], device=logits.device)).sum(-1)
        pick = expected.view(-1, num_candidates).argmin(1).to(candidates.device)
        return candidates.view(-1, num_candidates, candidates.shape[-1])[torch.arange(len(pick)), pick]

    @torch.no_grad()
    def _thermalize(self, sample: torch.Tensor, level: torch.LongTensor, generator, num_candidates: int,
                    noise_control: bool, h: int, w: int):
        """One thermalization round of a batch of normalized embedding grids `sample` `(b, C, h, w)` read at `level`:
        `num_candidates` DDPM chains per state, re-quantized, the least noisy kept -> `(codes (b, h * w), fired (b,),
        stopped (b,))`; the codes of unfired states are the first candidate's (their input, re-quantized)."""
        out = self.scheduler.thermalize(self.thermalizer, sample.repeat_interleave(num_candidates, 0), generator=generator,
                                        levels=level.repeat_interleave(num_candidates), noise_control=noise_control)
        requantized = self.vq_tokenizer.quantize(self.thermalizer.denormalize(out.sample).to(self.vq_tokenizer.device)).flatten(1)
        # the candidates of a state share its level, so its firing and stop decisions
        fired, stop = out.fired[::num_candidates], out.stopped[::num_candidates].cpu()
        if num_candidates > 1:
            # only fired states have distinct candidates to choose from; the others keep their codes
            grouped = requantized.view(len(level), num_candidates, -1)
            requantized = grouped[:, 0].clone()
            chosen = fired.nonzero().flatten().to(requantized.device)
            if len(chosen):
                requantized[chosen] = self._select_candidate(grouped[chosen].flatten(0, 1), num_candidates, h, w)
        return requantized, fired, stop

    @torch.no_grad()
    def thermalize_codes(self, codes: torch.LongTensor, levels: Optional[torch.Tensor] = None, generator=None,
                         num_candidates: int = 1, noise_control: bool = False) -> ThermalizeCodesOutput:
        r"""
        One thermalization of code grids, the correction a rollout step applies to the emulator's output: codebook
        lookup, the classifier's level (or `levels`), the scheduler's `thermalize` step for the grids read above
        `s_init`, re-quantization.

        Args:
            codes (`torch.LongTensor` of shape `(B, h, w)`): code grids of the tokenizer's latent size.
            levels (`torch.LongTensor` of shape `(B,)` or an `int`, *optional*): the levels the grids are read at
                (`0 .. num_train_timesteps - 1`); by default the thermalizer's classifier reads them.
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): the DDPM noise; a list holds one
                generator per grid.
            num_candidates (`int`, defaults to 1): thermalizations per fired grid; the one the classifier reads as the
                least noisy is kept (as in `__call__`).
            noise_control (`bool`, defaults to `False`): the noise-only control's step instead.

        Returns:
            [`ThermalizeCodesOutput`]: the new codes, the levels read, and which grids fired or would stop.
        """
        codes = torch.as_tensor(codes)
        n = self.vq_tokenizer.config.latent_size
        if codes.dim() != 3 or tuple(codes.shape[-2:]) != (n, n) or codes.dtype != torch.long:
            raise ValueError(f"codes must be a LongTensor of shape (batch, {n}, {n}) (the tokenizer's latent grid), got "
                             f"{codes.dtype} of shape {tuple(codes.shape)}")
        size = self.vq_tokenizer.config.codebook_size
        if len(codes) and (codes.min() < 0 or codes.max() >= size):
            raise ValueError(f"codes must lie in [0, {size - 1}] (the codebook), got [{int(codes.min())}, {int(codes.max())}]")
        check_count("num_candidates", num_candidates)
        if isinstance(generator, (list, tuple)) and len(generator) != len(codes):
            raise ValueError(f"got a list of {len(generator)} generators for {len(codes)} code grids: expected one per grid")
        if levels is not None:
            top = self.scheduler.config.num_train_timesteps - 1
            levels = torch.as_tensor(levels, dtype=torch.long).expand(len(codes))
            if len(levels) and (levels.min() < 0 or levels.max() > top):
                raise ValueError(f"levels must lie in [0, {top}] (num_train_timesteps - 1), got "
                                 f"[{int(levels.min())}, {int(levels.max())}]")
        self.check_components()
        return self._thermalize_codes(codes, levels, generator, num_candidates, noise_control)

    @torch.no_grad()
    def _thermalize_codes(self, codes: torch.LongTensor, levels: Optional[torch.Tensor], generator, num_candidates: int,
                          noise_control: bool) -> ThermalizeCodesOutput:
        """`thermalize_codes` on checked input (`generator` one per grid when a list)."""
        n = codes.shape[-1]
        embedded = self.vq_tokenizer.embed(codes.to(self.vq_tokenizer.device))
        sample = self.thermalizer.normalize(embedded.to(self.thermalizer.device))
        levels = self.thermalizer.predict_level(sample) if levels is None else levels.to(sample.device)
        requantized, fired, stopped = self._thermalize(sample, levels, select_generators(generator, range(len(codes)), num_candidates),
                                                       num_candidates, noise_control, n, n)
        fired = fired.cpu()
        new = torch.where(fired[:, None], requantized.cpu(), codes.flatten(1).cpu()).view(-1, n, n)
        return ThermalizeCodesOutput(codes=new, levels=levels.cpu(), fired=fired, stopped=stopped.cpu())

    @torch.no_grad()
    def __call__(
        self,
        initial_frames: torch.Tensor,
        num_steps: int,
        thermalize: bool = True,
        noise_control: bool = False,
        temperature: float = 1.0,
        generator: Optional[Union[torch.Generator, list]] = None,
        track_levels: bool = True,
        thermalizer_input: str = "sampled",
        num_candidates: int = 1,
        thermalize_rounds: int = 1,
        output_type: str = "pt",
        return_dict: bool = True,
        callback_on_step_end: Optional[Callable] = None,
    ):
        r"""
        Args:
            initial_frames (`torch.Tensor` of shape `(B, H, W)` or `(B, 1, H, W)`): initial conditions in physical
                units.
            num_steps (`int`): emulator steps.
            thermalize (`bool`, defaults to `True`): apply the thermalizer when its classifier's level exceeds
                `s_init`. `False` is the emulator alone.
            noise_control (`bool`, defaults to `False`): the noise-only control arm (needs `thermalize=True`): same
                classifier decisions and DDPM steps, but the predicted noise is replaced by Gaussian noise, so any gain
                that is left comes from the perturbation and re-quantization rather than from the learned denoiser.
            temperature (`float`, defaults to 1.0): emulator sampling temperature (0 = argmax).
            generator (`torch.Generator` or `List[torch.Generator]`, *optional*): the only source of randomness. The
                emulator samples from it; the DDPM noise of thermalization comes from a second generator seeded from it
                once at the start, so with the same seed every arm sees the same emulator draws (common random
                numbers). A list (diffusers' convention) holds one generator per trajectory: each trajectory then
                draws from its own two streams, so its random numbers do not depend on which other trajectories are
                still running (a stop at `s_max` or a callback's end leaves the others' draws unchanged), and the arms
                share them trajectory by trajectory.
            track_levels (`bool`, defaults to `True`): record the classifier's level also when not thermalizing.
            thermalizer_input (`str`, defaults to `"sampled"`): what the thermalizer sees: `"sampled"`, the codebook
                vectors of the sampled codes (the original system's embedding lookup), or `"expected"`, the emulator's
                expected embedding `sum_k p_k e_k` per position (its uncertainty shows as a blend off the codebook).
                Either way an unfired step keeps the sampled codes.
            num_candidates (`int`, defaults to 1): thermalizations drawn per fired state (independent DDPM noise, one
                batched chain); the one whose re-quantized grid the classifier reads as the least noisy (lowest
                expected level) becomes the next state. `1` is the paper's single draw. The noise control selects
                among its candidates the same way, so the two arms keep the same mechanics.
            thermalize_rounds (`int`, defaults to 1): the most thermalizations of one emulator step. After a fired
                state is thermalized and re-quantized, the classifier reads the new grid; while it still reads above
                `s_init` (and at most `s_max`), the grid is thermalized again from that level, up to this many rounds
                in all (`rounds` in the output). A state the first round leaves clean costs nothing more, so the
                correction deepens only where the classifier still sees drift. `1` is the paper's single round. The
                stop at `s_max` is decided by the first reading only.
            output_type (`str`, defaults to `"pt"`): `"pt"` (torch) or `"np"` (numpy) frames.
            return_dict (`bool`, defaults to `True`): return a [`ThermalizedRolloutOutput`] instead of a tuple.
            callback_on_step_end (`Callable`, *optional*): called after every emulator step as
                `callback_on_step_end(self, i, t, {"codes": codes, "rows": rows})` (diffusers convention; `t = i + 1`
                is the number of steps done), with the new code grids `(b, h, w)` of the trajectories still running
                and their indices `rows` in the batch. A returned dict with `"end"`, a bool tensor `(b,)`, ends those
                trajectories after this step (`ended_at`; e.g. once a statistic has left its range, so a long
                evaluation spends nothing on them); setting `self._interrupt = True` ends all of them. With one
                `generator` the random numbers of the trajectories still running then differ from a rollout without
                the callback (the emulator draws for the rows it runs); with one generator per trajectory they do not.
        """
        check_output_type(output_type, allowed=("pt", "np"))
        if thermalizer_input not in ("sampled", "expected"):
            raise ValueError(f"thermalizer_input={thermalizer_input!r} is invalid; allowed: 'sampled', 'expected'")
        check_count("num_steps", num_steps)
        check_count("num_candidates", num_candidates)
        check_count("thermalize_rounds", thermalize_rounds, hint=" (1: one thermalization per fired step)")
        if noise_control and not thermalize:
            raise ValueError("noise_control=True is the control arm of the thermalizer: it needs thermalize=True")
        self.check_components()
        codes0 = self.encode_frames(initial_frames)  # (B, h, w)
        batch, h, w = codes0.shape
        codes = torch.full((batch, num_steps + 1, h, w), -1, dtype=torch.long)
        codes[:, 0] = codes0.cpu()
        levels = torch.full((batch, num_steps), -1, dtype=torch.long)
        fired = torch.zeros(batch, num_steps, dtype=torch.bool)
        changes = torch.zeros(batch, num_steps, dtype=torch.long)
        rounds = torch.zeros(batch, num_steps, dtype=torch.long)
        stopped_at = torch.full((batch,), -1, dtype=torch.long)
        ended_at = torch.full((batch,), -1, dtype=torch.long)
        self._interrupt = False
        # common random numbers: the emulator draws from `generator`, the DDPM steps from a second generator seeded
        # from it once, so the arms (emulator alone, thermalizer, noise control) see the same emulator noise and differ
        # only by what thermalization does to the codes
        noise_generator = None
        if isinstance(generator, (list, tuple)):  # one per trajectory: each gets its own noise generator too
            if len(generator) != batch:
                raise ValueError(f"got a list of {len(generator)} generators for {batch} initial frames: expected one "
                                 "per trajectory")
            noise_generator = [torch.Generator(device=g.device).manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
                               for g in generator]
        elif generator is not None:
            seed = int(torch.randint(0, 2**62, (1,), generator=generator))
            noise_generator = torch.Generator(device=generator.device).manual_seed(seed)
        current = codes0.flatten(1).to(self.emulator.device)
        alive = torch.ones(batch, dtype=torch.bool)
        with self.progress_bar(total=num_steps) as progress_bar:
            for step in range(num_steps):
                rows = alive.nonzero().flatten()
                if len(rows) == 0:
                    progress_bar.update(num_steps - step)
                    break
                # the logits of the drawn codes (autoregressive decoding: each given the codes drawn before it)
                # only where the expected embedding needs them
                drawn = self.emulator.sample_next_frame(current[rows], temperature, select_generators(generator, rows),
                                                        return_logits=thermalizer_input == "expected")
                new, logits = drawn if thermalizer_input == "expected" else (drawn, None)
                if thermalize or track_levels:
                    therm_device = self.thermalizer.device
                    if thermalizer_input == "expected":
                        probs = self.emulator.frame_probabilities(logits, temperature)  # (b, n, K)
                        codebook = self.vq_tokenizer.embed(torch.arange(probs.shape[-1], device=self.vq_tokenizer.device).view(1, 1, -1))
                        expected = probs.to(codebook) @ codebook[0, :, 0].T  # (b, n, D)
                        embedded = expected.transpose(1, 2).reshape(len(rows), -1, h, w)
                    else:
                        embedded = self.vq_tokenizer.embed(new.view(-1, h, w))
                    sample = self.thermalizer.normalize(embedded.to(therm_device))
                    level = self.thermalizer.predict_level(sample)
                    levels[rows, step] = level.cpu()
                if thermalize:
                    requantized, fired_now, stop = self._thermalize(sample, level, select_generators(noise_generator, rows, num_candidates),
                                                                    num_candidates, noise_control, h, w)
                    requantized = requantized.to(new.device)
                    done = fired_now.long()
                    # further rounds for the fired states the classifier still reads above s_init (fired excludes stops)
                    active = fired_now.nonzero().flatten()
                    for _ in range(thermalize_rounds - 1):
                        if not len(active):
                            break
                        more = self._thermalize_codes(requantized[active.to(requantized.device)].view(-1, h, w), None,
                                                      select_generators(noise_generator, rows[active.cpu()]),
                                                      num_candidates, noise_control)
                        active = active[more.fired.to(active.device)]
                        requantized[active.to(requantized.device)] = more.codes[more.fired].flatten(1).to(requantized.device)
                        done[active] += 1
                    rounds[rows, step] = done.cpu()
                    fired[rows, step] = fired_now.cpu()
                    changes[rows, step] = (requantized != new).sum(1).cpu()
                    new = torch.where(fired_now.to(new.device)[:, None], requantized, new)
                    if stop.any():
                        stopped_at[rows[stop]] = step + 1
                        alive[rows[stop]] = False
                        keep = ~stop
                        rows, new = rows[keep], new[keep.to(new.device)]
                current[rows] = new
                codes[rows, step + 1] = new.view(-1, h, w).cpu()
                progress_bar.update()
                if callback_on_step_end is not None and len(rows):
                    returned = callback_on_step_end(self, step, step + 1, {"codes": new.view(-1, h, w), "rows": rows}) or {}
                    end = returned.get("end")
                    if end is not None:
                        end = torch.as_tensor(end, dtype=torch.bool).cpu()
                        if end.shape != rows.shape:
                            raise ValueError(f"callback_on_step_end returned 'end' of shape {tuple(end.shape)}: expected "
                                             f"{tuple(rows.shape)}, one flag per running trajectory")
                        ended_at[rows[end]] = step + 1
                        alive[rows[end]] = False
                    if self._interrupt:
                        running = alive.nonzero().flatten()
                        ended_at[running] = step + 1
                        alive[running] = False
                        progress_bar.update(num_steps - step - 1)
                        break
        frames = self.decode_codes(codes)
        if output_type == "np":
            frames = frames.numpy()
        self.maybe_free_model_hooks()
        if not return_dict:
            return frames, codes, levels, fired, changes, stopped_at, ended_at, rounds
        return ThermalizedRolloutOutput(frames=frames, codes=codes, levels=levels, fired=fired,
                                        requantized_changes=changes, stopped_at=stopped_at, ended_at=ended_at, rounds=rounds)


__all__ = ["ThermalizeCodesOutput", "ThermalizedRolloutOutput", "ThermalizedRolloutPipeline"]
