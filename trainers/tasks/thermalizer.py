"""Embedding-space thermalizer on 2-D Kolmogorov flow: three stages, exported as a ``ThermalizedRolloutPipeline``.

1. ``vq_tokenizer``: a VQ tokenizer on vorticity frames (the solver's frames, average-pooled to ``data.frame_size``
   and divided by the training set's standard deviation, ``frame_scale``).
2. ``emulator``: a CodeGPT that predicts the next frame's codes (``data.frame_stride`` solver frames later) from the
   current frame's: all codes of a frame in parallel in one forward pass, or code by code with ``generate()``
   (``model.emulator.frame_decoding``, see ``CodeGPTForCausalLM.sample_next_frame``).
3. ``thermalizer``: data preparation first (clean embeddings = codebook vectors of the true frames' codes; drifted
   embeddings = codebook vectors along emulator-only rollouts from the training initial conditions, both saved as
   ``datasets.Dataset`` under ``output_dir/embeddings``), then a ``ThermalizerModel`` trained on the clean ones with
   the DDPM cosine forward process (noise MSE + noise-level CE).

The evaluation always rolls out three arms from the same test initial conditions with the same seeds: the emulator
alone, emulator + thermalizer, emulator + noise-only control (same firing decisions, the learned noise prediction
replaced by Gaussian noise). See ``ThermalizerTask.evaluate_pipeline`` for the metrics.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..arguments import ConfigError, check_config_kwargs, check_section
from .base import Stage, StepOutput, Task
from .code_image import VQTokenizerStage, _to_uint8_grid

logger = logging.getLogger(__name__)

ARMS = ("emulator", "thermalizer", "noise_control")

PERTURBATION_KINDS = ("random", "amplify", "mixed")  # data.perturbation_kind

# the settings of the thermalize step an evaluation may override (default: the saved scheduler's); its results record them
THRESHOLD_KEYS = ("s_init", "s_stop", "s_max", "num_denoising_steps", "renoise", "eta", "s_floor", "s_ceiling")


@dataclass
class KolmogorovDataArguments:
    """The solver's settings (see ``hf_models.data.kolmogorov.KolmogorovConfig``) and how frames are taken."""

    grid_size: int = 64
    reynolds_number: float = 1000.0
    dt: float = 0.01
    drag: float = 0.1
    spinup_time: float = 30.0
    frame_interval: float = 0.1
    num_frames: int = 200
    seed: int = 0
    num_train_trajectories: int = 32
    num_test_trajectories: int = 16
    chunk_size: int = 4
    frame_size: int = 32  # frames are average-pooled from grid_size to this
    frame_stride: int = 2  # one emulator step = frame_stride stored frames
    cache_dir: Optional[str] = None
    # data preparation of the thermalizer stage: drifted embeddings from emulator-only rollouts
    drift_rollout_steps: int = 200
    drift_trajectories: int = 16  # rolled out from the first training initial conditions
    drift_temperature: float = 1.0
    # share of the thermalizer's training grids corrupted by codebook substitutions as well as Gaussian noise (see
    # ``substitute_codes``): drift that stays on the codebook then registers as a noise level
    codebook_substitution: float = 0.0
    codebook_substitution_noise: bool = True  # false: substituted grids get no Gaussian noise (the level is read
    # from the substitutions alone)
    # with codebook_substitution_noise false: whether those grids are scaled by sqrt(abar) like a DDPM sample (true)
    # or stay on the codebook (false), so that a grid's overall amplitude is no cue to its level: emulator states are
    # never scaled, and with scaling the classifier reads strong (high-energy) states as clean
    codebook_substitution_scaled: bool = True
    # false: the noise loss leaves out the substituted grids (the level loss keeps them), so the denoiser learns only
    # the Gaussian forward process of the true frames, a diffusion model of the invariant measure as in the paper,
    # while the classifier still learns to read drift that stays on the codebook; for a thermalize step with
    # renoise, which turns a state into a Gaussian sample at its level first (benchmarks/RESULTS.md, stop 36)
    codebook_substitution_noise_loss: bool = True
    # share of the thermalizer's training grids that are one emulator step from a true frame (sampled at
    # drift_temperature), paired with the true next frame as the clean grid and read at the level whose noise-to-signal
    # ratio matches their squared error (``pair_levels``): a correction target on the states the thermalizer meets in a
    # rollout; these grids take no other corruption
    emulator_pairs: float = 0.0
    # share of the thermalizer's training grids that are a true training frame with a random large-scale field added
    # in physical space (wavenumbers 1..perturbation_max_wavenumber, rms a log-uniform share in
    # [perturbation_min_amplitude, perturbation_max_amplitude] of the frame's), re-tokenized, paired with the frame's
    # own grid and read at their ``pair_levels``: on-codebook drift of the largest scales, the kind that ends the
    # rollouts of a fine tokenizer's emulator (benchmarks/RESULTS.md); these grids take no other corruption. With
    # k <= 2 on 32^2 frames, a share 0.1 raises the energy by 5 % on average and 0.2 by 22 % (the true range is about
    # +-50 %), 0.5 by 2.4x
    large_scale_perturbation: float = 0.0
    perturbation_max_wavenumber: int = 2
    # "random": the added field is random (``large_scale_field``), with rms ``amplitude`` times the frame's;
    # "amplify": it is the frame's own part at those wavenumbers times ``amplitude`` (``large_scale_part``), so the
    # frame's large scales grow by a factor 1 + amplitude with their shape kept, as in the emulator's slow energy
    # excursions, which keep the flow's pattern and raise its amplitude (benchmarks/RESULTS.md, stop 25); "mixed":
    # each frame one of the two at even odds
    perturbation_kind: str = "random"
    perturbation_min_amplitude: float = 0.02
    perturbation_max_amplitude: float = 0.5

    def __post_init__(self):
        if self.drift_rollout_steps < 1 or self.drift_trajectories < 1:
            raise ConfigError("data.drift_rollout_steps and data.drift_trajectories must be >= 1")
        if not 0.0 <= self.codebook_substitution <= 1.0:
            raise ConfigError(f"data.codebook_substitution={self.codebook_substitution} must lie in [0, 1]")
        if not self.codebook_substitution_noise_loss and self.codebook_substitution <= 0:
            raise ConfigError("data.codebook_substitution_noise_loss=false leaves the substituted grids out of the noise "
                              f"loss, but data.codebook_substitution={self.codebook_substitution}: there are none (set it > 0)")
        if not 0.0 <= self.emulator_pairs <= 1.0:
            raise ConfigError(f"data.emulator_pairs={self.emulator_pairs} must lie in [0, 1]")
        if not 0.0 <= self.large_scale_perturbation <= 1.0:
            raise ConfigError(f"data.large_scale_perturbation={self.large_scale_perturbation} must lie in [0, 1]")
        if not 1 <= self.perturbation_max_wavenumber < self.frame_size // 2:
            raise ConfigError(f"data.perturbation_max_wavenumber={self.perturbation_max_wavenumber} must lie in "
                              f"[1, {self.frame_size // 2 - 1}] (below half of data.frame_size={self.frame_size})")
        if self.perturbation_kind not in PERTURBATION_KINDS:
            raise ConfigError(f"data.perturbation_kind={self.perturbation_kind!r} must be one of {PERTURBATION_KINDS}")
        if not 0.0 < self.perturbation_min_amplitude <= self.perturbation_max_amplitude:
            raise ConfigError(f"data.perturbation_min_amplitude={self.perturbation_min_amplitude} and "
                              f"data.perturbation_max_amplitude={self.perturbation_max_amplitude} must satisfy "
                              f"0 < min <= max")
        if self.frame_size < 4 or self.grid_size % self.frame_size:
            raise ConfigError(f"data.frame_size={self.frame_size} must be >= 4 and divide data.grid_size={self.grid_size}")
        if self.frame_stride < 1 or self.num_frames < 2 * self.frame_stride:
            raise ConfigError(f"data.frame_stride={self.frame_stride} must be >= 1 and leave at least 2 frames of data.num_frames={self.num_frames}")
        for name in ("num_train_trajectories", "num_test_trajectories", "chunk_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name}={getattr(self, name)} must be >= 1")
        try:
            self.solver_config()
        except ValueError as err:
            raise ConfigError(f"data: {err}") from None

    def solver_config(self):
        from hf_models.data.kolmogorov import KolmogorovConfig

        return KolmogorovConfig(grid_size=self.grid_size, reynolds_number=self.reynolds_number, dt=self.dt, drag=self.drag,
                                spinup_time=self.spinup_time, frame_interval=self.frame_interval,
                                num_frames=self.num_frames, seed=self.seed)

    def load(self) -> dict:
        """``{"train": (T, F, S, S), "test": ...}`` float32 vorticity, pooled (every stored frame: one emulator step is
        ``frame_stride`` of them)."""
        from hf_models.data.kolmogorov import build_kolmogorov_dataset

        ds = build_kolmogorov_dataset(self.solver_config(), self.num_train_trajectories, self.num_test_trajectories,
                                      cache_dir=self.cache_dir, chunk_size=self.chunk_size)
        out = {}
        for split in ("train", "test"):
            frames = ds[split].with_format("torch")[:]["vorticity"].float()  # (T, F, N, N)
            factor = self.grid_size // self.frame_size
            if factor > 1:
                t, f = frames.shape[:2]
                frames = F.avg_pool2d(frames.flatten(0, 1).unsqueeze(1), factor).view(t, f, self.frame_size, self.frame_size)
            out[split] = frames.contiguous()
        return out


def _rounded(values, digits: int = 5) -> list:
    return [round(float(v), digits) for v in values]


def firing_statistics(output) -> dict:
    """How often a rollout output's thermalizer fired (``fire_rate``) and how many codes its re-quantization changed
    per step (``requantized_changes_mean``), over the steps each rollout ran (``steps_run``; not the steps after a
    stop at ``s_max`` or an end, which have no state), and ``rounds_mean``, the thermalizations per fired step."""
    ran = (output.codes[:, 1:] >= 0).flatten(2).all(-1)  # (rollouts, steps)
    if not bool(ran.any()):
        return {"fire_rate": 0.0, "requantized_changes_mean": 0.0, "rounds_mean": 0.0, "steps_run": 0}
    fired = output.fired & ran
    return {"fire_rate": float(output.fired[ran].float().mean()),
            "requantized_changes_mean": float(output.requantized_changes[ran].float().mean()),
            "rounds_mean": float(output.rounds[fired].float().mean()) if output.rounds is not None and bool(fired.any()) else 0.0,
            "steps_run": int(ran.sum())}


@dataclass
class ThermalizerEvalArguments:
    num_initial_conditions: int = 16
    # independent rollouts from each initial condition (the emulator's draws differ; rows i*k .. i*k + k - 1 start
    # from initial condition i): survival medians pool them, and the ratio's bootstrap resamples initial conditions
    # with all their rollouts, so one lucky draw per initial condition no longer decides the reported ratio
    rollouts_per_initial_condition: int = 1
    rollout_steps: int = 2000
    temperature: float = 1.0
    range_margin: float = 0.1  # survival range = true [min, max] widened by this share of its span
    survival_statistics: list = field(default_factory=lambda: ["enstrophy", "energy"])
    late_window: int = 200
    early_window: int = 20  # the emulator's early steps: the reference quality for the late windows
    short_term_steps: int = 10
    strip_steps: list = field(default_factory=lambda: [0, 1, 5, 20, 100, 500, 1000, 2000])
    results_copy: Optional[str] = None  # e.g. benchmarks/results/thermalizer_survival.json
    # thresholds of the thermalize step for this evaluation (default: the saved scheduler's)
    s_init: Optional[int] = None
    s_stop: Optional[int] = None
    s_max: Optional[int] = None
    num_denoising_steps: Optional[int] = None
    renoise: Optional[bool] = None
    eta: Optional[float] = None
    s_floor: Optional[int] = None
    s_ceiling: Optional[int] = None
    thermalizer_input: str = "sampled"  # or "expected": the emulator's expected embedding (see the pipeline)
    # thermalizations drawn per fired state; the classifier keeps the least noisy (the pipeline's num_candidates)
    num_candidates: int = 1
    # at most this many thermalizations per fired step, while the classifier still reads the re-quantized grid above
    # s_init (the pipeline's thermalize_rounds; 1: the paper's single round)
    thermalize_rounds: int = 1
    seed: int = 0
    # one random stream per rollout (the pipeline's list of generators), seeded from `seed`: a rollout's draws do
    # not depend on the others (a stop beside it, a longer re-run that ends rollouts where they leave the range), and
    # the arms share them rollout by rollout. Off: one stream for the batch, which the stored results were made with
    generator_per_rollout: bool = False
    # where the rollouts start: frame `initial_frame` of the first trajectories of `initial_split`. "test" is the
    # reported evaluation; "train" is the split to tune thresholds on without looking at the test trajectories
    initial_split: str = "test"
    initial_frame: int = 0
    # a fourth arm, the truth: the solver continues each initial condition for rollout_steps, and its survival under
    # the same criterion is reported. The ranges come from a finite sample of the flow, which a long enough true
    # trajectory leaves too: its median is the most any emulator can show at this length (benchmarks/RESULTS.md)
    truth_arm: bool = True

    def __post_init__(self):
        if self.num_initial_conditions < 1 or self.rollout_steps < 1 or self.rollouts_per_initial_condition < 1:
            raise ConfigError("evaluation.num_initial_conditions, evaluation.rollouts_per_initial_condition and "
                              "evaluation.rollout_steps must be >= 1")
        for name in ("late_window", "early_window", "short_term_steps"):
            value = getattr(self, name)
            if not 1 <= value <= self.rollout_steps:
                raise ConfigError(f"evaluation.{name}={value} must lie in [1, rollout_steps={self.rollout_steps}]")
        bad = sorted(set(self.survival_statistics) - {"enstrophy", "energy"})
        if bad or not self.survival_statistics:
            raise ConfigError(f"evaluation.survival_statistics={self.survival_statistics} is invalid; allowed: a non-empty subset of enstrophy, energy")
        if self.thermalizer_input not in ("sampled", "expected"):
            raise ConfigError(f"evaluation.thermalizer_input={self.thermalizer_input!r} is invalid; allowed: sampled, expected")
        if self.num_candidates < 1:
            raise ConfigError(f"evaluation.num_candidates={self.num_candidates} must be >= 1")
        if isinstance(self.thermalize_rounds, bool) or not isinstance(self.thermalize_rounds, int) or self.thermalize_rounds < 1:
            raise ConfigError(f"evaluation.thermalize_rounds={self.thermalize_rounds!r} is invalid: expected an int >= 1 "
                              "(1: one thermalization per fired step)")
        if self.initial_split not in ("test", "train"):
            raise ConfigError(f"evaluation.initial_split={self.initial_split!r} is invalid; allowed: test, train")
        if self.initial_frame < 0:
            raise ConfigError(f"evaluation.initial_frame={self.initial_frame} must be >= 0")
        if self.range_margin < 0:
            raise ConfigError(f"evaluation.range_margin={self.range_margin} must be >= 0")


class TensorDictDataset(Dataset):
    def __init__(self, **tensors):
        self.tensors = tensors
        self.length = len(next(iter(tensors.values())))

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return {**{k: v[i] for k, v in self.tensors.items()}, "index": i}


def substitution_rate(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Share of positions replaced by random codebook vectors at each level: ``(1 - abar) / (2 abar)``, capped at 1.

    With unit-variance (normalized) embeddings a substitution changes a position by a squared distance of about 2 per
    channel, so this rate gives the substitutions the same expected squared error relative to the signal as the
    level's Gaussian noise, ``(1 - abar) / abar``: a level-``t`` grid carries as much substitution error as noise."""
    return ((1 - alphas_cumprod) / (2 * alphas_cumprod)).clamp(max=1.0)


def substitute_codes(x0, codebook_embeddings, rate, generator):
    """Replace each position of the normalized grids ``x0`` ``(B, D, h, w)`` by a uniformly drawn row of
    ``codebook_embeddings`` ``(K, D)`` (normalized the same way) with probability ``rate`` ``(B,)``; returns the
    corrupted grids and the boolean mask ``(B, 1, h, w)`` of replaced positions."""
    B, D, h, w = x0.shape
    codes = torch.randint(0, codebook_embeddings.shape[0], (B, h, w), generator=generator).to(x0.device)
    replacement = codebook_embeddings[codes].permute(0, 3, 1, 2).to(x0.dtype)
    mask = torch.rand(B, 1, h, w, generator=generator).to(x0.device) < rate.view(B, 1, 1, 1).to(x0.device)
    return torch.where(mask, replacement, x0), mask


def pair_levels(source, target, alphas_cumprod) -> torch.LongTensor:
    """The level of each grid of ``source`` read as a noisy version of ``target`` (both normalized, ``(B, D, h, w)``):
    the level whose noise-to-signal ratio ``(1 - abar) / abar`` is closest to the mean squared difference per element
    (a unit-variance signal under the level's noise has that much error: the same rule as ``substitution_rate``)."""
    mse = ((source - target) ** 2).mean((1, 2, 3))
    ratio = (1 - alphas_cumprod) / alphas_cumprod
    return (ratio.to(mse).view(1, -1) - mse.view(-1, 1)).abs().argmin(1)


def _weights_key(*folders: Path) -> str:
    digest = hashlib.sha256()
    for folder in folders:
        for path in sorted(Path(folder).glob("*.safetensors")):
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class ThermalizerTask(Task):
    name = "thermalizer"
    family = "thermalizer"

    def __init__(self, config):
        super().__init__(config)
        from hf_models.code_gpt import CodeGPTConfig
        from hf_models.schedulers import ThermalizerScheduler
        from hf_models.thermalizer import ThermalizerConfig
        from hf_models.vq_tokenizer import VQTokenizerConfig

        source = config.source
        allowed = {"vq_tokenizer", "emulator", "thermalizer", "scheduler"}
        unknown = sorted(set(config.model) - allowed)
        if unknown:
            raise ConfigError(f"unknown model section(s) {unknown} for task thermalizer; allowed: {', '.join(sorted(allowed))}")
        self.data_args = check_section(config.data, KolmogorovDataArguments, "data", source)
        self.eval_args = check_section(config.evaluation, ThermalizerEvalArguments, "evaluation", source)
        try:
            vq_kwargs = check_config_kwargs(VQTokenizerConfig, config.model.get("vq_tokenizer") or {}, "model.vq_tokenizer", source)
            for key, value in (("image_size", self.data_args.frame_size), ("num_channels", 1)):
                if vq_kwargs.get(key, value) != value:
                    raise ConfigError(f"model.vq_tokenizer.{key}={vq_kwargs[key]} but the frames give {value} (leave it unset)")
                vq_kwargs[key] = value
            self.vq_config = VQTokenizerConfig(**vq_kwargs)
            gpt_kwargs = check_config_kwargs(CodeGPTConfig, config.model.get("emulator") or {}, "model.emulator", source)
            derived = {"codebook_size": self.vq_config.codebook_size, "num_codes": self.vq_config.num_codes, "num_classes": 0,
                       "class_dropout_prob": 0.0}
            for key, value in derived.items():
                if gpt_kwargs.get(key, value) != value:
                    raise ConfigError(f"model.emulator.{key}={gpt_kwargs[key]} but the tokenizer gives {value} (leave it unset)")
            gpt_kwargs.update(derived)
            gpt_kwargs.setdefault("max_position_embeddings", 2 * self.vq_config.num_codes + 2)
            self.gpt_config = CodeGPTConfig(**gpt_kwargs)
            if self.gpt_config.max_position_embeddings < 2 * self.vq_config.num_codes + 2:
                raise ConfigError(f"model.emulator.max_position_embeddings={self.gpt_config.max_position_embeddings} is too small: the "
                                  f"emulator reads 2 * num_codes + 2 = {2 * self.vq_config.num_codes + 2} tokens")
            th_kwargs = check_config_kwargs(ThermalizerConfig, config.model.get("thermalizer") or {}, "model.thermalizer", source)
            for key, value in (("in_channels", self.vq_config.embedding_dim), ("sample_size", self.vq_config.latent_size)):
                if th_kwargs.get(key, value) != value:
                    raise ConfigError(f"model.thermalizer.{key}={th_kwargs[key]} but the tokenizer gives {value} (leave it unset)")
                th_kwargs[key] = value
            self.th_kwargs = th_kwargs
            self.th_config = ThermalizerConfig(**th_kwargs)
            sched_kwargs = dict(config.model.get("scheduler") or {})
            sched_kwargs.setdefault("num_train_timesteps", self.th_config.num_train_timesteps)
            if sched_kwargs["num_train_timesteps"] != self.th_config.num_train_timesteps:
                raise ConfigError(f"model.scheduler.num_train_timesteps={sched_kwargs['num_train_timesteps']} differs from "
                                  f"model.thermalizer.num_train_timesteps={self.th_config.num_train_timesteps}")
            self.scheduler = ThermalizerScheduler(**sched_kwargs)
        except (ValueError, TypeError) as err:
            if isinstance(err, ConfigError):
                raise
            raise ConfigError(f"model in {source}: {err}") from None
        unknown_stages = sorted(set(config.stages) - {"vq_tokenizer", "emulator", "thermalizer"})
        if unknown_stages:
            raise ConfigError(f"unknown stage(s) {unknown_stages}; thermalizer has stages: vq_tokenizer, emulator, thermalizer")
        ev, data = self.eval_args, self.data_args
        available = getattr(data, f"num_{ev.initial_split}_trajectories")
        if ev.num_initial_conditions > available:
            raise ConfigError(f"evaluation.num_initial_conditions={ev.num_initial_conditions} needs as many {ev.initial_split} "
                              f"trajectories; data.num_{ev.initial_split}_trajectories={available}")
        if ev.initial_frame >= data.num_frames - data.frame_stride:
            raise ConfigError(f"evaluation.initial_frame={ev.initial_frame} must leave at least one emulator step of "
                              f"data.num_frames={data.num_frames} (data.frame_stride={data.frame_stride})")
        self._stages = [FrameVQStage(self), EmulatorStage(self), ThermalizerStage(self)]
        self._frames = None
        self._codes: dict = {}
        self.vq_model = None
        self.emulator_model = None
        self.stage_metrics: dict = {}

    def stages(self):
        return self._stages

    # -- data ------------------------------------------------------------------------------------
    def frames(self, split: str) -> torch.Tensor:
        """Physical vorticity ``(trajectories, frames, S, S)`` of a split (pooled; every stored frame)."""
        if self._frames is None:
            self._frames = self.data_args.load()
        return self._frames[split]

    @functools.cached_property
    def frame_scale(self) -> float:
        """The standard deviation of the training vorticity: frames are divided by it for the tokenizer."""
        return float(self.frames("train").std())

    def vq(self):
        if self.vq_model is None:
            from hf_models.vq_tokenizer import VQTokenizerModel

            self.vq_model = VQTokenizerModel.from_pretrained(str(Path(self.output_dir) / "vq_tokenizer")).eval()
        return self.vq_model

    def emulator(self):
        if self.emulator_model is None:
            from hf_models.code_gpt import CodeGPTForCausalLM

            self.emulator_model = CodeGPTForCausalLM.from_pretrained(str(Path(self.output_dir) / "emulator")).eval()
        return self.emulator_model

    @torch.no_grad()
    def codes(self, split: str) -> torch.LongTensor:
        """Codes ``(trajectories, frames, h, w)`` of a split under the trained tokenizer; cached on disk keyed by its weights."""
        from safetensors.torch import load_file, save_file

        key = _weights_key(Path(self.output_dir) / "vq_tokenizer")
        if self._codes.get(split, (None,))[0] == key:
            return self._codes[split][1]
        path = Path(self.output_dir) / "codes" / f"{split}.safetensors"
        codes = None
        if path.is_file():
            from safetensors import safe_open

            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("vq") == key:
                    codes = load_file(str(path))["codes"]
        if codes is None:
            frames = self.frames(split)
            vq = self.vq()
            flat = frames.flatten(0, 1).unsqueeze(1) / self.frame_scale
            codes = torch.cat([vq.encode(flat[i: i + 1024]) for i in range(0, len(flat), 1024)]).view(*frames.shape[:2], vq.config.latent_size, vq.config.latent_size)
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            save_file({"codes": codes.contiguous()}, str(tmp), metadata={"vq": key})
            tmp.replace(path)
        self._codes[split] = (key, codes)
        return codes

    # -- export and evaluation ---------------------------------------------------------------------
    def pipeline(self, models: dict):
        from hf_models.pipelines import ThermalizedRolloutPipeline

        return ThermalizedRolloutPipeline(vq_tokenizer=models["vq_tokenizer"], emulator=models["emulator"],
                                          thermalizer=models["thermalizer"], scheduler=self.scheduler,
                                          frame_scale=self.frame_scale)

    def finalize(self, accelerator, models: dict) -> dict:
        out = Path(self.output_dir)
        results = {}
        if accelerator.is_main_process:
            for name, auto in (("vq_tokenizer", "AutoModel"), ("emulator", "AutoModelForCausalLM"), ("thermalizer", "AutoModel")):
                models[name].config.register_for_auto_class()
                models[name].register_for_auto_class(auto)
            pipe = self.pipeline({k: m.eval() for k, m in models.items()})
            pipe.set_progress_bar_config(disable=True)
            pipe.save_pretrained(str(out))
            for sub in ("vq_tokenizer", "emulator", "thermalizer"):
                for py in (out / sub).glob("*.py"):
                    shutil.copy2(py, out / py.name)
            results = self.evaluate_pipeline(pipe, out)
        accelerator.wait_for_everyone()
        return results

    def evaluate_saved(self, output_dir, write: bool = False) -> dict:
        """The metrics of an exported pipeline under this task's ``evaluation`` settings; with ``write``, the plots
        (and ``evaluation.results_copy``) are rewritten too."""
        from hf_models.pipelines import ThermalizedRolloutPipeline

        pipe = ThermalizedRolloutPipeline.from_pretrained(str(output_dir))
        pipe.set_progress_bar_config(disable=True)
        results = self.evaluate_pipeline(pipe, Path(output_dir) if write else None)
        results.update({f"evaluation/{k}": v for k, v in vars(self.eval_args).items() if not isinstance(v, list)})
        return results

    def initial_trajectories(self) -> torch.Tensor:
        """The true trajectories the rollouts start from, from ``evaluation.initial_frame`` on, at the emulator's
        steps: ``(num_initial_conditions, L, S, S)``."""
        ev = self.eval_args
        frames = self.frames(ev.initial_split)  # sizes checked against the data section when the task is built
        return frames[: ev.num_initial_conditions, ev.initial_frame:: self.data_args.frame_stride]

    def rollout_initial_frames(self) -> torch.Tensor:
        """Frame 0 of each initial condition, repeated ``evaluation.rollouts_per_initial_condition`` times in a row:
        ``(num_initial_conditions * k, S, S)``."""
        return self.initial_trajectories()[:, 0].repeat_interleave(self.eval_args.rollouts_per_initial_condition, 0)

    def rollout_generator(self, num_rollouts: int):
        """The rollouts' randomness: a generator seeded with ``evaluation.seed``, or with ``generator_per_rollout`` one
        per rollout, each seeded from a draw of that generator."""
        master = torch.Generator().manual_seed(self.eval_args.seed)
        if not self.eval_args.generator_per_rollout:
            return master
        return [torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=master)))
                for _ in range(num_rollouts)]

    @torch.no_grad()
    def rollouts(self, pipe) -> dict:
        """The three arms from the same initial conditions and the same seed."""
        ev = self.eval_args
        initial = self.rollout_initial_frames()
        arms = {}
        for arm in ARMS:
            arms[arm] = pipe(initial, num_steps=ev.rollout_steps, thermalize=arm != "emulator", noise_control=arm == "noise_control",
                             temperature=ev.temperature, generator=self.rollout_generator(len(initial)), output_type="pt",
                             thermalizer_input=ev.thermalizer_input, num_candidates=ev.num_candidates,
                             thermalize_rounds=ev.thermalize_rounds)
        return arms

    @torch.no_grad()
    def true_rollouts(self, steps: int, batch_size: int = 4) -> torch.Tensor:
        """The true continuation of the evaluation's initial conditions: pooled vorticity ``(num_initial_conditions,
        steps, S, S)`` at emulator steps ``1..steps``, integrated by the solver at the data set's resolution and time
        step from the stored (float32) initial frames, ``batch_size`` initial conditions at a time."""
        from hf_models.data.kolmogorov import KolmogorovSolver, build_kolmogorov_dataset

        data, ev = self.data_args, self.eval_args
        config = data.solver_config()
        ds = build_kolmogorov_dataset(config, data.num_train_trajectories, data.num_test_trajectories,
                                      cache_dir=data.cache_dir, chunk_size=data.chunk_size)
        start = ds[ev.initial_split].with_format("torch")[: ev.num_initial_conditions]["vorticity"][:, ev.initial_frame]
        solver = KolmogorovSolver(config)
        per_step = data.frame_stride * config.steps_per_frame
        factor = data.grid_size // data.frame_size
        out = []
        for first in range(0, len(start), batch_size):
            omega_hat = solver.to_spectral(start[first: first + batch_size])
            frames = []
            for _ in range(steps):
                omega_hat = solver.advance(omega_hat, per_step)
                frames.append(solver.to_physical(omega_hat).float())
            frames = torch.stack(frames, 1)  # (b, steps, N, N)
            if not torch.isfinite(frames).all():
                raise FloatingPointError("the solver blew up continuing the initial conditions")
            if factor > 1:
                b = frames.shape[0]
                frames = F.avg_pool2d(frames.flatten(0, 1).unsqueeze(1), factor).view(b, steps, data.frame_size, data.frame_size)
            out.append(frames)
        return torch.cat(out)

    @staticmethod
    @torch.no_grad()
    def represented(pipe, frames: torch.Tensor) -> torch.Tensor:
        """``frames`` ``(..., S, S)`` as the pipeline's VQ tokenizer represents them: encoded and decoded, 1,024 at a
        time."""
        flat = frames.reshape(-1, *frames.shape[-2:])
        out = torch.cat([pipe.decode_codes(pipe.encode_frames(flat[i: i + 1024])) for i in range(0, len(flat), 1024)])
        return out.view_as(frames)

    @torch.no_grad()
    def survival_ranges(self, pipe) -> dict:
        """The interval of each survival statistic over the true training trajectories as the tokenizer represents
        them (frames encoded and decoded: the emulator can at best produce those), widened by ``range_margin``."""
        from hf_models.metrics.rollout_stability import flow_statistics, statistic_range

        stats = flow_statistics(self.represented(pipe, self.frames("train").flatten(0, 1)))
        return {name: statistic_range(stats[name], self.eval_args.range_margin) for name in self.eval_args.survival_statistics}

    def survival(self, output, ranges: dict):
        """``(statistics, survival per statistic, survival)`` of a rollout output: steps until each statistic of
        ``evaluation.survival_statistics`` leaves its range (or the rollout was stopped), and the first of them."""
        from hf_models.metrics.rollout_stability import flow_statistics, survival_steps

        stats = flow_statistics(output.frames[:, 1:])
        per_statistic = {name: survival_steps(stats[name], *ranges[name], stopped_at=output.stopped_at)
                         for name in self.eval_args.survival_statistics}
        return stats, per_statistic, torch.stack(list(per_statistic.values())).amin(0)

    def late_statistics(self, output, test: torch.Tensor, test_enstrophy: torch.Tensor, test_codes: torch.Tensor,
                        codebook_size: int) -> dict:
        """An arm's late-window distances to the test trajectories: energy spectrum and enstrophy histogram over the
        last ``evaluation.late_window`` frames of its rollouts still running there (``inf`` if none is), code usage
        over their valid codes (1.0 if none)."""
        from hf_models.metrics.rollout_stability import (
            codebook_usage_distance,
            flow_statistics,
            histogram_distance,
            late_window,
            spectrum_log_ratio,
        )

        late = late_window(output.frames, self.eval_args.late_window)
        ratio = spectrum_log_ratio(late, test) if len(late) else None  # the distance is its mean absolute value
        late_codes = output.codes[:, -self.eval_args.late_window:]
        late_codes = late_codes[late_codes >= 0]
        return {
            "spectrum_distance": float(ratio.abs().mean()) if ratio is not None else float("inf"),
            # shell by shell (k = 1, 2, ...): where the distance lies, positive where the arm has too much energy
            "spectrum_log_ratio": _rounded(ratio) if ratio is not None else None,
            "enstrophy_histogram_distance": histogram_distance(flow_statistics(late)["enstrophy"], test_enstrophy) if len(late) else float("inf"),
            "codebook_usage_distance": codebook_usage_distance(late_codes, test_codes, codebook_size) if len(late_codes) else 1.0,
        }

    @torch.no_grad()
    def evaluate_pipeline(self, pipe, out: Optional[Path]) -> dict:
        """Survival, late-window spectrum / enstrophy-histogram / codebook-usage distances, short-term correlation,
        firing statistics per arm; with ``out``, the PNG plots there (and the results copy if configured)."""
        import time

        from hf_models.metrics.rollout_stability import (
            flow_statistics,
            histogram_distance,
            median_ratio_interval,
            short_term_correlation,
            spectrum_distance,
            spectrum_log_ratio,
            statistic_range,
        )

        ev = self.eval_args
        train, test = self.frames("train"), self.frames("test")
        thresholds = {k: getattr(ev, k) for k in THRESHOLD_KEYS if getattr(ev, k) is not None}
        if thresholds:
            try:
                pipe.scheduler = pipe.scheduler.with_config(**thresholds)
            except ValueError as err:
                raise ConfigError(f"evaluation thresholds {thresholds}: {err}") from None
        ranges = self.survival_ranges(pipe)
        test_pool = test.flatten(0, 1)
        test_enstrophy = flow_statistics(test_pool)["enstrophy"]
        test_codes = pipe.encode_frames(test_pool)
        size = pipe.vq_tokenizer.config.codebook_size
        start = time.perf_counter()
        arms = self.rollouts(pipe)
        rollout_seconds = time.perf_counter() - start
        truth_steps = self.initial_trajectories()  # the true trajectories at the emulator's steps
        num_truth = min(ev.short_term_steps, truth_steps.shape[1] - 1)
        per_ic = ev.rollouts_per_initial_condition
        truth_rows = truth_steps.repeat_interleave(per_ic, 0)  # one per rollout
        reconstructed_truth = pipe.decode_codes(test_codes.view(*test.shape[:2], *test_codes.shape[-2:]))
        results = {
            "num_initial_conditions": ev.num_initial_conditions,
            "rollouts_per_initial_condition": per_ic,
            "num_rollouts": ev.num_initial_conditions * per_ic,
            "initial_split": ev.initial_split,
            "initial_frame": ev.initial_frame,
            "rollout_steps": ev.rollout_steps,
            "rollout_seconds": rollout_seconds,
            "frames_per_second": 3 * ev.num_initial_conditions * per_ic * ev.rollout_steps / rollout_seconds,
            **{k: pipe.scheduler.config[k] for k in THRESHOLD_KEYS},
            "thermalizer_input": ev.thermalizer_input,
            "num_candidates": ev.num_candidates,
            "thermalize_rounds": ev.thermalize_rounds,
            "survival_ranges": {k: list(v) for k, v in ranges.items()},
            "survival_ranges_raw_truth": {k: list(statistic_range(flow_statistics(train)[k], ev.range_margin)) for k in ranges},
            "spectrum_distance_vq_reconstruction": spectrum_distance(reconstructed_truth, test),
            "spectrum_log_ratio_vq_reconstruction": _rounded(spectrum_log_ratio(reconstructed_truth, test)),
            "enstrophy_histogram_distance_vq_reconstruction": histogram_distance(flow_statistics(reconstructed_truth)["enstrophy"], test_enstrophy),
        }
        curves = {}
        for arm, output in arms.items():
            frames = output.frames  # (B, L + 1, S, S)
            stats, per_statistic, survival = self.survival(output, ranges)
            results.update({f"median_survival_{arm}_{name}": float(v.float().median()) for name, v in per_statistic.items()})
            corr = short_term_correlation(frames[:, 1: num_truth + 1], truth_rows[:, 1: num_truth + 1])
            results.update({
                f"survival_{arm}": survival.tolist(),  # per rollout (initial condition i: rows i*k .. i*k + k - 1)
                f"median_survival_{arm}": float(survival.float().median()),
                f"mean_survival_{arm}": float(survival.float().mean()),
                f"survived_full_rollout_{arm}": int((survival == ev.rollout_steps).sum()),
                **{f"{name}_{arm}": v for name, v in self.late_statistics(output, test, test_enstrophy, test_codes, size).items()},
                f"short_term_correlation_{arm}": _rounded(corr),
                f"short_term_correlation_mean_{arm}": float(corr.mean()),
                **{f"{name}_{arm}": value for name, value in firing_statistics(output).items()},
                f"stopped_{arm}": int((output.stopped_at >= 0).sum()),
                f"predicted_level_mean_{arm}": float(output.levels[output.levels >= 0].float().mean()) if (output.levels >= 0).any() else None,
            })
            curves[arm] = {"survival": survival, "stats": stats, "levels": output.levels}
        early = arms["emulator"].frames[:, 1: ev.early_window + 1]
        results["spectrum_distance_emulator_early"] = spectrum_distance(early, test)
        results["spectrum_log_ratio_emulator_early"] = _rounded(spectrum_log_ratio(early, test))
        results["enstrophy_histogram_distance_emulator_early"] = histogram_distance(flow_statistics(early)["enstrophy"], test_enstrophy)
        results["survival_ratio"] = results["median_survival_thermalizer"] / max(results["median_survival_emulator"], 1.0)
        # how far the ratio can be trusted on this many initial conditions: a paired bootstrap over them (each with
        # all its rollouts)
        low, high = median_ratio_interval(curves["thermalizer"]["survival"], curves["emulator"]["survival"],
                                          cluster_size=per_ic)
        results["survival_ratio_ci95_low"], results["survival_ratio_ci95_high"] = low, high
        results["survival_ratio_noise_control"] = results["median_survival_noise_control"] / max(results["median_survival_emulator"], 1.0)
        if ev.truth_arm:
            results.update(self.truth_survival(pipe, ranges, curves, results["median_survival_emulator"]))
        results.update({k: v for k, v in self.stage_metrics.items()})
        if out is not None:
            self.plots(out, arms, curves, ranges, test, truth_steps[0])
            if ev.results_copy:
                copy = Path(ev.results_copy)
                copy.parent.mkdir(parents=True, exist_ok=True)
                copy.write_text(json.dumps({"output_dir": str(out), **results}, indent=2, default=float) + "\n")
        return results

    def truth_survival(self, pipe, ranges: dict, curves: dict, median_emulator: float) -> dict:
        """The truth arm: survival of the solver's continuation of each initial condition over ``rollout_steps``, on
        its frames as the tokenizer represents them (as the ranges are); adds its curve to ``curves``."""
        import time

        from hf_models.metrics.rollout_stability import flow_statistics, survival_steps

        start = time.perf_counter()
        truth = self.true_rollouts(self.eval_args.rollout_steps)
        seconds = time.perf_counter() - start
        stats = flow_statistics(self.represented(pipe, truth))
        per_statistic = {name: survival_steps(stats[name], *ranges[name]) for name in self.eval_args.survival_statistics}
        survival = torch.stack(list(per_statistic.values())).amin(0)
        curves["truth"] = {"survival": survival, "stats": stats}
        median = float(survival.float().median())
        return {
            **{f"median_survival_truth_{name}": float(v.float().median()) for name, v in per_statistic.items()},
            "survival_truth": survival.tolist(),  # per initial condition
            "median_survival_truth": median,
            "survived_full_rollout_truth": int((survival == self.eval_args.rollout_steps).sum()),
            # the largest survival ratio an emulator could show on these initial conditions at this length
            "survival_ratio_truth": median / max(median_emulator, 1.0),
            "truth_seconds": seconds,
        }

    def plots(self, out: Path, arms: dict, curves: dict, ranges: dict, test: torch.Tensor, truth: torch.Tensor):
        """survival_curves.png, enstrophy.png, spectra.png, frames.png (``truth``, the first initial condition's true
        trajectory at the emulator's steps, vs the arms) in ``out``."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        from hf_models.metrics.rollout_stability import late_window, mean_spectrum

        ev = self.eval_args
        colours = {"emulator": "tab:red", "thermalizer": "tab:blue", "noise_control": "tab:grey", "truth": "black"}
        steps = torch.arange(ev.rollout_steps + 1)
        fig, ax = plt.subplots(figsize=(6, 4))
        for arm, c in curves.items():
            alive = (c["survival"][None, :] >= steps[:, None]).float().mean(1)
            ax.step(steps, alive, where="post", label=arm.replace("_", " ") + (" (solver)" if arm == "truth" else ""),
                    color=colours[arm], ls="--" if arm == "truth" else "-")
        ax.set(xlabel="emulator step", ylabel="fraction of trajectories alive", ylim=(-0.02, 1.02), title="Survival")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "survival_curves.png", dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(7, 4))
        for arm, c in curves.items():
            ens = c["stats"]["enstrophy"]
            ax.plot(steps[1:], ens.nanmedian(0).values, color=colours[arm], label=f"{arm.replace('_', ' ')} (median)")
        if "enstrophy" in ranges:
            ax.axhspan(*ranges["enstrophy"], color="tab:green", alpha=0.15, label="survival range (truth)")
        ax.set(xlabel="emulator step", ylabel="enstrophy", yscale="log", title="Enstrophy along the rollouts")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "enstrophy.png", dpi=100)
        plt.close(fig)

        fig, ax = plt.subplots(figsize=(6, 4))
        k, e = mean_spectrum(test)
        kmax = test.shape[-1] // 3
        ax.loglog(k[1: kmax + 1], e[1: kmax + 1], "k-", lw=2, label="truth")
        for arm, output in arms.items():
            late = late_window(output.frames, ev.late_window)
            if len(late):
                k, e = mean_spectrum(late)
                ax.loglog(k[1: kmax + 1], e[1: kmax + 1], color=colours[arm], label=f"{arm.replace('_', ' ')} (last {ev.late_window} steps)")
        ax.set(xlabel="wavenumber k", ylabel="E(k)", title="Energy spectra")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "spectra.png", dpi=100)
        plt.close(fig)

        cols = [s for s in ev.strip_steps if s <= ev.rollout_steps] or [0, ev.rollout_steps]
        rows = [("truth", truth)] + [(arm, arms[arm].frames[0]) for arm in ARMS]
        vmax = float(truth.abs().max())
        fig, axes = plt.subplots(len(rows), len(cols), figsize=(1.6 * len(cols), 1.7 * len(rows)), squeeze=False)
        for r, (name, frames) in enumerate(rows):
            for c, s in enumerate(cols):
                ax = axes[r][c]
                ax.set_xticks([])
                ax.set_yticks([])
                if s < len(frames):
                    ax.imshow(frames[s].numpy(), cmap="RdBu_r", vmin=-vmax, vmax=vmax)
                if r == 0:
                    ax.set_title(f"step {s}", fontsize=8)
                if c == 0:
                    ax.set_ylabel(name.replace("_", " "), fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "frames.png", dpi=100)
        plt.close(fig)
        shutil.copy2(out / "frames.png", out / "samples.png")  # the card's picture


def _vorticity_grid(frames: torch.Tensor, nrow: int):
    """Normalised vorticity ``(N, 1, S, S)`` (about unit variance) -> a grey PIL grid, +-3 sigma mapped to [-1, 1]."""
    return _to_uint8_grid((frames / 3).clamp(-1, 1), nrow=nrow)


class FrameVQStage(VQTokenizerStage):
    """The code-image tokenizer stage on vorticity frames (divided by ``frame_scale``)."""

    def _pixels(self, split):
        frames = self.task.frames(split)
        return frames.flatten(0, 1).unsqueeze(1) / self.task.frame_scale

    def build_datasets(self, accelerator):
        return TensorDictDataset(pixel_values=self._pixels("train")), TensorDictDataset(pixel_values=self._pixels("test"))

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        err, norm, usage = torch.zeros((), device=accelerator.device), torch.zeros((), device=accelerator.device), None
        size = self.task.vq_config.codebook_size
        for batch in dataloader:
            out = model(pixel_values=batch["pixel_values"])
            e = (out.reconstruction - batch["pixel_values"]).pow(2).flatten(1).sum(1)
            n = batch["pixel_values"].pow(2).flatten(1).sum(1)
            e, n, codes = accelerator.gather_for_metrics((e, n, out.codes))
            err += e.sum()
            norm += n.sum()
            hist = torch.bincount(codes.flatten(), minlength=size)
            usage = hist if usage is None else usage + hist
        rel = math.sqrt((err / norm.clamp_min(1e-12)).item())
        probs = usage.float() / usage.sum()
        perplexity = torch.exp(-(probs[probs > 0] * probs[probs > 0].log()).sum()).item()
        metrics = {"recon_relative_error": rel, "codebook_usage": int((usage > 0).sum()), "codebook_perplexity": perplexity}
        self.task.stage_metrics.update(recon_relative_error=rel, codebook_usage=metrics["codebook_usage"])
        return metrics

    @torch.no_grad()
    def sample_grid(self, model, accelerator):
        pixels = self._pixels("test")
        pixels = pixels[:: max(1, len(pixels) // 16)][:16].to(accelerator.device)
        recon = model(pixel_values=pixels).reconstruction
        return _vorticity_grid(torch.cat([pixels, recon]), nrow=len(pixels))


class EmulatorStage(Stage):
    """CodeGPT on (codes_t, codes_{t+1}) pairs of consecutive (strided) frames of the training trajectories."""

    name = "emulator"
    throughput_unit = "tokens"

    def build_model(self):
        from hf_models.code_gpt import CodeGPTForCausalLM

        return CodeGPTForCausalLM(self.task.gpt_config)

    def load(self, directory):
        from hf_models.code_gpt import CodeGPTForCausalLM

        model = CodeGPTForCausalLM.from_pretrained(directory)
        self.task.emulator_model = model.eval()
        return model

    def save(self, model, directory):
        super().save(model, directory)
        self.task.emulator_model = model

    def peft_target_modules(self):
        return ["q_proj", "k_proj", "v_proj", "o_proj"]

    def _pairs(self, split):
        codes = self.task.codes(split).flatten(2)  # (T, F, n), every stored frame
        k = self.task.data_args.frame_stride  # a pair starts at every frame: frame_stride times the strided pairs
        return TensorDictDataset(current=codes[:, :-k].flatten(0, 1), target=codes[:, k:].flatten(0, 1))

    def build_datasets(self, accelerator):
        return self._pairs("train"), self._pairs("test")

    def compute_loss(self, model, batch, generator):
        n = self.task.gpt_config.num_codes
        inner = getattr(model, "module", model)
        logits = model(input_ids=inner.frame_pair_input_ids(batch["current"], inner.teacher_codes(batch["target"])),
                       logits_to_keep=n).logits
        logits = logits[..., : self.task.gpt_config.codebook_size].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["target"].reshape(-1))
        return StepOutput(loss=loss, num_items=batch["target"].numel())

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        """Bits per code of the next frame, argmax accuracy, and the persistence baseline (codes unchanged)."""
        inner = accelerator.unwrap_model(model)
        nll = torch.zeros((), device=accelerator.device, dtype=torch.float64)
        hits = torch.zeros_like(nll)
        same = torch.zeros_like(nll)
        count = torch.zeros_like(nll)
        for batch in dataloader:
            target = batch["target"]
            logits = inner.next_frame_logits(batch["current"], inner.teacher_codes(target)).float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum").double()
            hits += (logits.argmax(-1) == target).sum()
            same += (batch["current"] == target).sum()
            count += target.numel()
        nll, hits, same, count = (accelerator.reduce(x, "sum") for x in (nll, hits, same, count))
        metrics = {"bits_per_code": (nll / count / math.log(2)).item(), "next_code_accuracy": (hits / count).item(),
                   "persistence_accuracy": (same / count).item()}
        self.task.stage_metrics.update({f"emulator_{k}": v for k, v in metrics.items()})
        return metrics

    @torch.no_grad()
    def sample_grid(self, model, accelerator):
        """Row 1: true frames 0..7 of a test trajectory (through the tokenizer); row 2: an emulator rollout from frame 0."""
        vq = self.task.vq().to(accelerator.device)
        codes = self.task.codes("test")[0, :: self.task.data_args.frame_stride][:8].to(accelerator.device)
        side = codes.shape[-1]
        current, rollout = codes[:1].flatten(1), [codes[:1]]
        gen = torch.Generator().manual_seed(0)
        for _ in range(len(codes) - 1):
            current = model.sample_next_frame(current, generator=gen)
            rollout.append(current.view(1, side, side))
        images = vq.decode(torch.cat([codes, torch.cat(rollout)]))
        return _vorticity_grid(images, nrow=len(codes))


class ThermalizerStage(Stage):
    name = "thermalizer"

    def _embeddings(self, split) -> torch.Tensor:
        """Clean embeddings ``(N, D, h, w)``: codebook vectors of the true frames' codes."""
        codes = self.task.codes(split).flatten(0, 1)
        vq = self.task.vq()
        return torch.cat([vq.embed(codes[i: i + 4096]) for i in range(0, len(codes), 4096)]).detach()

    def build_model(self):
        from hf_models.thermalizer import ThermalizerConfig, ThermalizerModel

        kwargs = dict(self.task.th_kwargs)
        # the embedding statistics come from the trained tokenizer; before it exists (configs checked ahead of
        # training, e.g. by the LoRA target check) the architecture alone is built
        if self.task.vq_model is not None or (Path(self.task.output_dir) / "vq_tokenizer" / "config.json").is_file():
            clean = self._embeddings("train")
            kwargs["data_mean"] = clean.mean((0, 2, 3)).tolist()
            kwargs["data_std"] = clean.std((0, 2, 3)).clamp_min(1e-6).tolist()
        self.task.th_config = ThermalizerConfig(**kwargs)
        return ThermalizerModel(self.task.th_config)

    def load(self, directory):
        from hf_models.thermalizer import ThermalizerModel

        return ThermalizerModel.from_pretrained(directory)

    def peft_target_modules(self):
        # the ResBlocks' and the stem's convolutions and the level head's Linear
        return ["conv_in", "conv1", "conv2", "conv_out", "proj"]

    @torch.no_grad()
    def prepare_data(self) -> Path:
        """Clean (train/test) and drifted embeddings, and the optional emulator pairs, saved as ``datasets.Dataset``
        under ``output_dir/embeddings`` (rebuilt when the tokenizer or the emulator changes); then the optional
        large-scale perturbations (``prepare_perturbed``)."""
        from datasets import Dataset

        root = Path(self.task.output_dir) / "embeddings"
        key = _weights_key(Path(self.task.output_dir) / "vq_tokenizer", Path(self.task.output_dir) / "emulator")
        meta = root / "meta.json"
        prep = self.task.data_args
        settings = {"weights": key, "steps": prep.drift_rollout_steps, "trajectories": prep.drift_trajectories,
                    "temperature": prep.drift_temperature, "seed": self.task.config.training.seed}
        if prep.emulator_pairs > 0:
            settings["pairs"] = True
        if meta.is_file() and json.loads(meta.read_text()) == settings:
            self.prepare_perturbed(root)
            return root
        tmp = root.with_name("embeddings.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        for split in ("train", "test"):
            codes = self.task.codes(split)
            emb = self._embeddings(split).view(*codes.shape[:2], -1, *codes.shape[-2:])
            Dataset.from_dict({
                "embedding": emb.flatten(0, 1).numpy(),
                "trajectory": torch.arange(codes.shape[0]).repeat_interleave(codes.shape[1]).numpy(),
                "frame": torch.arange(codes.shape[1]).repeat(codes.shape[0]).numpy(),
            }).save_to_disk(str(tmp / f"clean_{split}"))
        vq, emulator = self.task.vq(), self.task.emulator()
        start = self.task.codes("train")[: prep.drift_trajectories, 0].flatten(1)
        gen = torch.Generator().manual_seed(self.task.config.training.seed)
        current, embeddings = start, []
        for _ in range(prep.drift_rollout_steps):
            current = emulator.sample_next_frame(current, temperature=prep.drift_temperature, generator=gen)
            embeddings.append(vq.embed(current.view(-1, vq.config.latent_size, vq.config.latent_size)))
        drifted = torch.stack(embeddings, 1)  # (B, steps, D, h, w)
        Dataset.from_dict({
            "embedding": drifted.flatten(0, 1).numpy(),
            "trajectory": torch.arange(len(start)).repeat_interleave(prep.drift_rollout_steps).numpy(),
            "step": torch.arange(1, prep.drift_rollout_steps + 1).repeat(len(start)).numpy(),
        }).save_to_disk(str(tmp / "drifted"))
        if prep.emulator_pairs > 0:
            # one emulator step from every true training frame, paired with the true frame it should have predicted
            codes, stride = self.task.codes("train"), prep.frame_stride
            source, target = codes[:, :-stride].flatten(0, 1), codes[:, stride:].flatten(0, 1)
            predicted = torch.cat([emulator.sample_next_frame(source[i: i + 1024].flatten(1), temperature=prep.drift_temperature, generator=gen)
                                   for i in range(0, len(source), 1024)]).view_as(source)
            Dataset.from_dict({
                "source": vq.embed(predicted).numpy(),
                "target": vq.embed(target).numpy(),
                "trajectory": torch.arange(codes.shape[0]).repeat_interleave(codes.shape[1] - stride).numpy(),
                "frame": torch.arange(stride, codes.shape[1]).repeat(codes.shape[0]).numpy(),
            }).save_to_disk(str(tmp / "pairs"))
        (tmp / "meta.json").write_text(json.dumps(settings))
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
        self.prepare_perturbed(root)
        return root

    @torch.no_grad()
    def prepare_perturbed(self, root: Path):
        """With ``large_scale_perturbation``: every true training frame once, with a large-scale field added in
        physical space and re-tokenized, saved with the frame's own grid as ``root/perturbed`` (its own settings in
        ``perturbed.json``: changing the perturbation does not redo the drift rollouts)."""
        from datasets import Dataset

        prep = self.task.data_args
        if prep.large_scale_perturbation <= 0:
            return
        settings = {"vq": _weights_key(Path(self.task.output_dir) / "vq_tokenizer"), "seed": self.task.config.training.seed,
                    "perturbation": [prep.perturbation_max_wavenumber, prep.perturbation_min_amplitude,
                                     prep.perturbation_max_amplitude]}
        if prep.perturbation_kind != "random":
            settings["kind"] = prep.perturbation_kind
        meta = root / "perturbed.json"
        if meta.is_file() and json.loads(meta.read_text()) == settings and (root / "perturbed").is_dir():
            return
        meta.unlink(missing_ok=True)
        vq, gen = self.task.vq(), torch.Generator().manual_seed(self.task.config.training.seed + 1)
        shutil.rmtree(root / "perturbed.tmp", ignore_errors=True)
        frames = self.task.frames("train")
        pixels = frames.flatten(0, 1) / self.task.frame_scale
        lo, hi = math.log(prep.perturbation_min_amplitude), math.log(prep.perturbation_max_amplitude)
        amplitude = (lo + (hi - lo) * torch.rand(len(pixels), generator=gen, dtype=torch.float64)).exp().float()
        from hf_models.data.kolmogorov import large_scale_field, large_scale_part

        kind, k_max = prep.perturbation_kind, prep.perturbation_max_wavenumber
        if kind != "amplify":
            rms = pixels.pow(2).mean((1, 2)).sqrt()
            field = (amplitude * rms).view(-1, 1, 1) * large_scale_field(pixels.shape, k_max, gen)
        if kind == "amplify":
            field = amplitude.view(-1, 1, 1) * large_scale_part(pixels, k_max)
        elif kind == "mixed":  # each frame one of the two, at even odds
            grown = (torch.rand(len(pixels), generator=gen) < 0.5).view(-1, 1, 1)
            field = torch.where(grown, amplitude.view(-1, 1, 1) * large_scale_part(pixels, k_max), field)
        perturbed = (pixels + field).unsqueeze(1)
        codes = torch.cat([vq.encode(perturbed[i: i + 1024]) for i in range(0, len(perturbed), 1024)])
        Dataset.from_dict({
            "source": vq.embed(codes).numpy(),
            "target": self._embeddings("train").numpy(),
            "amplitude": amplitude.numpy(),
            "trajectory": torch.arange(frames.shape[0]).repeat_interleave(frames.shape[1]).numpy(),
            "frame": torch.arange(frames.shape[1]).repeat(frames.shape[0]).numpy(),
        }).save_to_disk(str(root / "perturbed.tmp"))
        shutil.rmtree(root / "perturbed", ignore_errors=True)
        (root / "perturbed.tmp").rename(root / "perturbed")
        meta.write_text(json.dumps(settings))

    def build_datasets(self, accelerator):
        from datasets import load_from_disk

        if accelerator.is_main_process:
            self.prepare_data()
        accelerator.wait_for_everyone()
        root = Path(self.task.output_dir) / "embeddings"
        out = []
        for split in ("train", "test"):
            emb = load_from_disk(str(root / f"clean_{split}")).with_format("torch")[:]["embedding"]
            out.append(TensorDictDataset(embedding=emb))
        return out[0], out[1]

    def normalized_codebook(self, inner) -> torch.Tensor:
        """Every codebook vector ``(K, D)``, normalized with the thermalizer's embedding statistics (computed once:
        the tokenizer and the statistics are fixed while the thermalizer trains)."""
        cached = getattr(self, "_normalized_codebook", None)
        if cached is not None and cached.device == inner.device:
            return cached
        vq = self.task.vq()
        K = vq.config.codebook_size
        vectors = vq.embed(torch.arange(K).view(1, K, 1)).to(inner.device)  # (1, D, K, 1)
        mean, std = inner._statistics(vectors)  # per channel, as in normalize (which wants a grid shape)
        if mean is not None:
            vectors = vectors - mean
        if std is not None:
            vectors = vectors / std
        self._normalized_codebook = vectors[0, :, :, 0].t().detach()
        return self._normalized_codebook

    def corrupt(self, inner, x0, generator, substitution: Optional[float] = None, return_substituted: bool = False):
        """``(noisy, noise target, t)``: Gaussian noise at a uniform level ``t``; on a share ``codebook_substitution``
        of the grids, codebook substitutions at ``substitution_rate(t)`` first (followed by the level's Gaussian
        noise unless ``codebook_substitution_noise`` is false, when the substituted grid is scaled by
        ``sqrt(abar)`` only, or left unscaled with ``codebook_substitution_scaled`` false), with the noise target then the noise that explains the corrupted grid as a level-``t``
        sample of the clean one, ``(x_t - sqrt(abar) x0) / sqrt(1 - abar)`` (so the denoiser learns to undo the
        substitutions too). With ``return_substituted``, a fourth item: which grids were picked for substitutions."""
        sched = self.task.scheduler
        share = self.task.data_args.codebook_substitution if substitution is None else substitution
        t = torch.randint(0, sched.config.num_train_timesteps, (len(x0),), generator=generator).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator).to(x0.device, x0.dtype)
        if share <= 0:
            out = sched.add_noise(x0, noise, t), noise, t
            return (*out, torch.zeros(len(x0), dtype=torch.bool, device=x0.device)) if return_substituted else out
        abar = sched.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, 1, 1, 1)
        picked = (torch.rand(len(x0), generator=generator) < share).to(x0.device)
        rate = substitution_rate(abar.flatten()) * picked
        source, _ = substitute_codes(x0, self.normalized_codebook(inner), rate, generator)
        noisy = abar.sqrt() * source + (1 - abar).sqrt() * noise
        if not self.task.data_args.codebook_substitution_noise:
            alone = source if not self.task.data_args.codebook_substitution_scaled else abar.sqrt() * source
            noisy = torch.where(picked.view(-1, 1, 1, 1), alone, noisy)
        out = noisy, (noisy - abar.sqrt() * x0) / (1 - abar).sqrt(), t
        return (*out, picked) if return_substituted else out

    def prepared_pairs(self, inner, name: str = "pairs"):
        """``(source, target, level)`` of a prepared pair data set (normalized), with each pair's level
        (``pair_levels``); loaded once. ``"pairs"``: the emulator steps and their true next frames; ``"perturbed"``:
        the large-scale perturbed frames and their own grids."""
        cached = getattr(self, "_prepared", {}).get(name)
        if cached is not None and cached[0].device == inner.device:
            return cached
        from datasets import load_from_disk

        pairs = load_from_disk(str(Path(self.task.output_dir) / "embeddings" / name)).with_format("torch")[:]
        source, target = (inner.normalize(pairs[k].to(inner.device)).detach() for k in ("source", "target"))
        levels = pair_levels(source, target, self.task.scheduler.alphas_cumprod.to(inner.device))
        self._prepared = {**getattr(self, "_prepared", {}), name: (source, target, levels)}
        return self._prepared[name]

    def pair(self, inner, x0, noisy, target, t, generator, return_paired: bool = False):
        """Replace a share ``emulator_pairs`` of a corrupted batch by emulator pairs, then a share
        ``large_scale_perturbation`` by perturbed frames. The grid is the pair's source (the emulator's step, or the
        perturbed frame's grid), the clean grid its target (the true next frame, or the frame's own grid), the level
        ``pair_levels`` of the two and the noise target the one that explains the source as a level-``t`` sample of
        the target, ``(x_t - sqrt(abar) x0) / sqrt(1 - abar)``. With ``return_paired``, a fourth item: which grids
        were replaced."""
        paired = torch.zeros(len(x0), dtype=torch.bool, device=x0.device)
        for name, share in (("pairs", self.task.data_args.emulator_pairs),
                            ("perturbed", self.task.data_args.large_scale_perturbation)):
            if share <= 0:
                continue
            source, truth, levels = self.prepared_pairs(inner, name)
            picked = (torch.rand(len(x0), generator=generator) < share).to(x0.device)
            idx = torch.randint(0, len(source), (len(x0),), generator=generator).to(x0.device)
            t = torch.where(picked, levels[idx], t)
            noisy = torch.where(picked.view(-1, 1, 1, 1), source[idx].to(noisy.dtype), noisy)
            abar = self.task.scheduler.alphas_cumprod.to(x0.device, x0.dtype)[t].view(-1, 1, 1, 1)
            paired_target = (noisy - abar.sqrt() * truth[idx].to(x0.dtype)) / (1 - abar).sqrt()
            target = torch.where(picked.view(-1, 1, 1, 1), paired_target, target)
            paired |= picked
        return (noisy, target, t, paired) if return_paired else (noisy, target, t)

    def compute_loss(self, model, batch, generator):
        inner = getattr(model, "module", model)
        x0 = inner.normalize(batch["embedding"])
        noisy, noise, t, substituted = self.corrupt(inner, x0, generator, return_substituted=True)
        noisy, noise, t, paired = self.pair(inner, x0, noisy, noise, t, generator, return_paired=True)
        out = model(sample=noisy, noise=noise, timesteps=t)
        loss, noise_loss = out.loss, out.noise_loss
        if not self.task.data_args.codebook_substitution_noise_loss:
            # the noise loss over the grids whose target is Gaussian noise (or a pair's correction) only
            kept = ~(substituted & ~paired)
            noise_loss = (F.mse_loss(out.noise_pred[kept].float(), noise[kept].float()) if bool(kept.any())
                          else out.noise_pred.sum() * 0.0)
            loss = noise_loss + inner.config.level_loss_weight * out.level_loss
        return StepOutput(loss=loss, logs={"noise_loss": noise_loss.item(), "level_loss": out.level_loss.item()},
                          num_items=len(x0))

    @torch.no_grad()
    def evaluate(self, model, dataloader, accelerator):
        """Test noise MSE and level CE at seeded levels; the classifier's mean |level error|; and its mean predicted
        level on clean test embeddings, on the same with 10 % of the positions replaced by random codebook vectors
        (does it see drift that stays on the codebook?), and on drifted ones (early and late in the emulator-only
        rollouts)."""
        from datasets import load_from_disk

        inner = accelerator.unwrap_model(model)
        gen = torch.Generator().manual_seed(self.task.eval_args.seed + accelerator.process_index)
        steps = self.task.scheduler.config.num_train_timesteps
        sums = torch.zeros(4, device=accelerator.device, dtype=torch.float64)  # noise, level, |level err|, count
        clean_levels, substituted_levels = [], []
        codebook = self.normalized_codebook(inner)
        for batch in dataloader:
            x0 = inner.normalize(batch["embedding"])
            t = torch.randint(0, steps, (len(x0),), generator=gen).to(x0.device)
            noise = torch.randn(x0.shape, generator=gen).to(x0.device, x0.dtype)
            out = inner(sample=self.task.scheduler.add_noise(x0, noise, t), noise=noise, timesteps=t)
            err = (out.level_logits.argmax(-1) - t).abs().double().sum()
            sums += torch.stack([out.noise_loss.double() * len(x0), out.level_loss.double() * len(x0), err, torch.tensor(float(len(x0)), dtype=torch.float64)])
            clean_levels.append(inner.predict_level(x0).double())
            substituted, _ = substitute_codes(x0, codebook, torch.full((len(x0),), 0.1), gen)
            substituted_levels.append(inner.predict_level(substituted).double())
        sums = accelerator.reduce(sums, "sum")
        metrics = {"noise_mse": (sums[0] / sums[3]).item(), "level_ce": (sums[1] / sums[3]).item(), "level_mae": (sums[2] / sums[3]).item(),
                   "level_clean_mean": float(torch.cat(clean_levels).mean()),
                   "level_substituted_10pct_mean": float(torch.cat(substituted_levels).mean())}
        drifted = load_from_disk(str(Path(self.task.output_dir) / "embeddings" / "drifted")).with_format("torch")[:]
        last = int(drifted["step"].max())
        for name, mask in (("early", drifted["step"] <= max(1, last // 10)), ("late", drifted["step"] > last - max(1, last // 10))):
            emb = drifted["embedding"][mask].to(accelerator.device)
            levels = torch.cat([inner.predict_level(inner.normalize(emb[i: i + 512])) for i in range(0, len(emb), 512)])
            metrics[f"level_drifted_{name}_mean"] = float(levels.double().mean())
        # the classifier's reading of each prepared pair set (one emulator step from a true frame; a perturbed
        # frame), and the level the pairs train it on
        for name, key, share in (("pairs", "emulator_step", self.task.data_args.emulator_pairs),
                                 ("perturbed", "perturbed", self.task.data_args.large_scale_perturbation)):
            if share > 0:
                source, _, levels = self.prepared_pairs(inner, name)
                metrics[f"level_{key}_mean"] = float(torch.cat([inner.predict_level(source[i: i + 512]) for i in range(0, len(source), 512)]).double().mean())
                metrics[f"level_{key}_label_mean"] = float(levels.double().mean())
        self.task.stage_metrics.update({f"thermalizer_{k}": v for k, v in metrics.items()})
        return metrics

    @torch.no_grad()
    def sample_grid(self, model, accelerator):
        """Decoded frames: clean, noised at 4 levels, and denoised back to s_stop by the thermalize step."""
        vq = self.task.vq().to(accelerator.device)
        emb = self._embeddings("test")[:4].to(accelerator.device)
        sched = self.task.scheduler
        x0 = model.normalize(emb)
        gen = torch.Generator().manual_seed(0)
        rows = [emb]
        levels = [sched.config.s_init + 1, (sched.config.s_init + sched.config.s_max) // 2]
        for s in levels:
            t = torch.full((len(x0),), s, dtype=torch.long)
            noisy = sched.add_noise(x0, torch.randn(x0.shape, generator=gen).to(x0), t)
            rows.append(model.denormalize(noisy))
            rows.append(model.denormalize(sched.thermalize(model, noisy, generator=gen, levels=t.to(x0.device)).sample))
        images = torch.cat([vq.decode(vq.quantize(r)) for r in rows])
        return _vorticity_grid(images, nrow=len(x0))
