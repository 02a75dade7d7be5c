"""Thermalizer (Pedersen, Zanna & Bruna, ICML 2025, arXiv:2503.18731) in the embedding space of a VQ tokenizer.

A UNet with no timestep input over embedding grids `(B, C, H, W)`: it predicts the DDPM noise `epsilon` of a noised
grid and, from its bottleneck, classifies the noise level. At inference the level head says how far an emulated
state has drifted from the data distribution and the noise prediction pulls it back ("thermalizes" it).

Self-contained (torch + transformers + this folder) so `register_for_auto_class` can ship it as remote code.
"""

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_thermalizer import ThermalizerConfig


@dataclass
class ThermalizerOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `noise_loss + level_loss_weight * level_loss`; only when `noise` and `timesteps` are given.
    noise_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Mean squared error between `noise_pred` and `noise`.
    level_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Cross-entropy of `level_logits` against `timesteps`.
    noise_pred (`torch.FloatTensor` of shape `(batch, in_channels, height, width)`):
        Predicted DDPM noise `epsilon`.
    level_logits (`torch.FloatTensor` of shape `(batch, num_train_timesteps)`):
        Logits over the noise levels `t` in `[0, num_train_timesteps)`.
    """

    loss: Optional[torch.FloatTensor] = None
    noise_loss: Optional[torch.FloatTensor] = None
    level_loss: Optional[torch.FloatTensor] = None
    noise_pred: Optional[torch.FloatTensor] = None
    level_logits: Optional[torch.FloatTensor] = None


def _conv3x3(in_channels: int, out_channels: int, padding_mode: str, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, padding_mode=padding_mode)


class ThermalizerResBlock(GradientCheckpointingLayer):
    """`skip(x) + conv(drop(act(norm(conv(act(norm(x)))))))`, the DDPM residual block without time embedding."""

    def __init__(self, config: ThermalizerConfig, in_channels: int, out_channels: int):
        super().__init__()
        groups, padding_mode = config.norm_num_groups, config.padding_mode
        # in_channels divides by the group count: it is a level's width, or the sum of two (up-path concatenations)
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=1e-6)
        self.conv1 = _conv3x3(in_channels, out_channels, padding_mode)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=1e-6)
        self.dropout = nn.Dropout(config.dropout)
        self.conv2 = _conv3x3(out_channels, out_channels, padding_mode)
        self.act = nn.SiLU()
        self.skip = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        residual = hidden_states if self.skip is None else self.skip(hidden_states)
        hidden_states = self.conv1(self.act(self.norm1(hidden_states)))
        hidden_states = self.conv2(self.dropout(self.act(self.norm2(hidden_states))))
        return residual + hidden_states


class ThermalizerUpsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv (no checkerboard artefacts, and shift-equivariant)."""

    def __init__(self, channels: int, padding_mode: str):
        super().__init__()
        self.conv = _conv3x3(channels, channels, padding_mode)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(hidden_states, scale_factor=2.0, mode="nearest"))


class ThermalizerDownBlock(nn.Module):
    def __init__(self, config: ThermalizerConfig, in_channels: int, out_channels: int, add_downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ThermalizerResBlock(config, in_channels if i == 0 else out_channels, out_channels)
            for i in range(config.layers_per_block)
        )
        # stride-2 3x3 conv: halves H and W
        self.downsample = (
            _conv3x3(out_channels, out_channels, config.padding_mode, stride=2) if add_downsample else None
        )


class ThermalizerUpBlock(nn.Module):
    def __init__(self, config: ThermalizerConfig, in_channels: int, out_channels: int, add_upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ThermalizerResBlock(config, in_channels if i == 0 else out_channels, out_channels)
            for i in range(config.layers_per_block)
        )
        self.upsample = ThermalizerUpsample(out_channels, config.padding_mode) if add_upsample else None


class ThermalizerLevelHead(nn.Module):
    """Bottleneck features `(B, c, h, w)` -> GroupNorm, SiLU, global average pool -> Linear -> logits `(B, T)`."""

    def __init__(self, config: ThermalizerConfig):
        super().__init__()
        channels = config.block_out_channels[-1]
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6)
        self.act = nn.SiLU()
        self.proj = nn.Linear(channels, config.num_train_timesteps)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        pooled = self.act(self.norm(hidden_states)).mean(dim=(2, 3))  # (B, c)
        return self.proj(pooled)


class ThermalizerPreTrainedModel(PreTrainedModel):
    config_class = ThermalizerConfig
    base_model_prefix = "thermalizer"
    main_input_name = "sample"
    supports_gradient_checkpointing = True
    _no_split_modules = ["ThermalizerResBlock"]

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Also registers the config class, so the saved `auto_map` names both and
        `AutoModel.from_pretrained(path, trust_remote_code=True)` works without latentheat installed."""
        cls.config_class.register_for_auto_class("AutoConfig")
        super().register_for_auto_class(auto_class)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, nn.Conv2d):
            if getattr(module, "_thermalizer_zero_init", False):
                # the output conv starts at 0: the untrained model predicts no noise
                init.zeros_(module.weight)
            else:
                # torch's default conv init (kaiming-uniform, a=sqrt(5)); N(0, 0.02) starves deep conv stacks
                init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)


class ThermalizerModel(ThermalizerPreTrainedModel):
    r"""
    Example:

    ```python
    >>> from diffusers import DDPMScheduler
    >>> config = ThermalizerConfig(in_channels=4, sample_size=8, block_out_channels=(32, 64), norm_num_groups=8)
    >>> model = ThermalizerModel(config)
    >>> scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    >>> clean = model.normalize(torch.randn(2, 4, 8, 8))  # VQ embeddings (B, C, H, W)
    >>> noise, timesteps = torch.randn_like(clean), torch.randint(0, 1000, (2,))
    >>> out = model(scheduler.add_noise(clean, noise, timesteps), noise=noise, timesteps=timesteps)
    >>> out.loss.backward()
    >>> model.predict_level(clean)  # (2,) noise level of each grid
    ```
    """

    def __init__(self, config: ThermalizerConfig):
        super().__init__(config)
        channels = config.block_out_channels
        num_levels = len(channels)
        self.conv_in = _conv3x3(config.in_channels, channels[0], config.padding_mode)

        self.down_blocks = nn.ModuleList()
        in_ch = channels[0]
        for i, out_ch in enumerate(channels):
            self.down_blocks.append(ThermalizerDownBlock(config, in_ch, out_ch, add_downsample=i < num_levels - 1))
            in_ch = out_ch

        self.mid_blocks = nn.ModuleList(ThermalizerResBlock(config, channels[-1], channels[-1]) for _ in range(2))
        self.level_head = ThermalizerLevelHead(config)

        # up level i (from the bottleneck back to full resolution) concatenates the skip of down level i
        self.up_blocks = nn.ModuleList()
        in_ch = channels[-1]
        for i in reversed(range(num_levels)):
            self.up_blocks.append(ThermalizerUpBlock(config, in_ch + channels[i], channels[i], add_upsample=i > 0))
            in_ch = channels[i]

        self.norm_out = nn.GroupNorm(config.norm_num_groups, channels[0], eps=1e-6)
        self.act = nn.SiLU()
        self.conv_out = _conv3x3(channels[0], config.in_channels, config.padding_mode)
        self.conv_out._thermalizer_zero_init = True
        self.post_init()

    # ---------------------------------------------------------------- validation
    def _check_sample(self, sample: torch.Tensor, name: str = "sample") -> None:
        if not isinstance(sample, torch.Tensor) or sample.dim() != 4:
            shape = tuple(sample.shape) if isinstance(sample, torch.Tensor) else type(sample)
            raise ValueError(f"{name} must have shape (batch, in_channels, height, width), got {shape}")
        if not sample.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got dtype {sample.dtype}")
        _, channels, height, width = sample.shape
        if channels != self.config.in_channels:
            raise ValueError(
                f"{name} has shape {tuple(sample.shape)}: {channels} channels, "
                f"config.in_channels={self.config.in_channels}"
            )
        factor = self.config.downsample_factor
        if height % factor or width % factor:
            raise ValueError(
                f"{name} has shape {tuple(sample.shape)}: height={height} and width={width} must be divisible by "
                f"2**(len(block_out_channels) - 1)={factor}"
            )

    def _check_targets(
        self, sample: torch.Tensor, noise: torch.Tensor, timesteps: Union[torch.Tensor, int]
    ) -> torch.LongTensor:
        if not isinstance(noise, torch.Tensor) or noise.shape != sample.shape:
            shape = tuple(noise.shape) if isinstance(noise, torch.Tensor) else type(noise)
            raise ValueError(f"noise must have the shape of sample {tuple(sample.shape)}, got {shape}")
        batch = sample.shape[0]
        if not isinstance(timesteps, torch.Tensor):
            timesteps = torch.tensor(timesteps)
        if timesteps.is_floating_point() or timesteps.is_complex() or timesteps.dtype == torch.bool:
            raise ValueError(f"timesteps must be an integer tensor, got dtype {timesteps.dtype}")
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(batch)
        if timesteps.shape != (batch,):
            raise ValueError(
                f"timesteps must have shape (batch,)=({batch},) or be a scalar, got {tuple(timesteps.shape)}"
            )
        if timesteps.numel():
            low, high = int(timesteps.min()), int(timesteps.max())
            if low < 0 or high >= self.config.num_train_timesteps:
                raise ValueError(
                    f"timesteps must lie in [0, num_train_timesteps={self.config.num_train_timesteps}), "
                    f"got values in [{low}, {high}]"
                )
        return timesteps.to(device=sample.device, dtype=torch.long)

    # ---------------------------------------------------------------- API
    def _statistics(self, reference: torch.Tensor):
        """Per-channel `(mean, std)` of shape `(1, C, 1, 1)` on `reference`'s device, or `None` for identity."""
        mean, std = self.config.data_mean, self.config.data_std
        kwargs = dict(device=reference.device, dtype=reference.dtype)
        mean = None if mean is None else torch.tensor(mean, **kwargs).view(1, -1, 1, 1)
        std = None if std is None else torch.tensor(std, **kwargs).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, embeddings: torch.Tensor) -> torch.FloatTensor:
        """Clean embeddings `(B, C, H, W)` -> `(x - data_mean) / data_std` per channel (identity when unset)."""
        self._check_sample(embeddings, "embeddings")
        mean, std = self._statistics(embeddings)
        if mean is not None:
            embeddings = embeddings - mean
        if std is not None:
            embeddings = embeddings / std
        return embeddings

    def denormalize(self, sample: torch.Tensor) -> torch.FloatTensor:
        """Inverse of `normalize`: `sample * data_std + data_mean` per channel."""
        self._check_sample(sample)
        mean, std = self._statistics(sample)
        if std is not None:
            sample = sample * std
        if mean is not None:
            sample = sample + mean
        return sample

    @torch.no_grad()
    def predict_level(self, sample: torch.Tensor) -> torch.LongTensor:
        """Normalized (noisy) grids `(B, C, H, W)` -> most likely noise level `(B,)` in `[0, num_train_timesteps)`."""
        return self(sample).level_logits.argmax(dim=-1)

    def forward(
        self,
        sample: torch.Tensor,
        noise: Optional[torch.Tensor] = None,
        timesteps: Optional[Union[torch.Tensor, int]] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ) -> Union[ThermalizerOutput, tuple]:
        r"""
        sample (`torch.FloatTensor` of shape `(batch, in_channels, height, width)`):
            Normalized embedding grids, already noised by the caller (`scheduler.add_noise(x0, noise, timesteps)`).
            `height` and `width` must be multiples of `2**(len(block_out_channels) - 1)`.
        noise (`torch.FloatTensor` of the shape of `sample`, *optional*):
            The noise that was added; target of `noise_pred`. Give it together with `timesteps`.
        timesteps (`torch.LongTensor` of shape `(batch,)` or an int, *optional*):
            The noise level of each grid in `[0, num_train_timesteps)`; target of `level_logits`. The model never
            sees it as an input.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        self._check_sample(sample)
        if (noise is None) != (timesteps is None):
            given, missing = ("noise", "timesteps") if timesteps is None else ("timesteps", "noise")
            raise ValueError(f"{given} was given without {missing}: pass both (to get a loss) or neither")
        if timesteps is not None:
            timesteps = self._check_targets(sample, noise, timesteps)

        hidden = self.conv_in(sample)  # (B, c0, H, W)
        skips = []
        for block in self.down_blocks:
            for resnet in block.resnets:
                hidden = resnet(hidden)
            skips.append(hidden)  # (B, c_i, H / 2**i, W / 2**i)
            if block.downsample is not None:
                hidden = block.downsample(hidden)
        for resnet in self.mid_blocks:
            hidden = resnet(hidden)  # (B, c_last, h, w)
        level_logits = self.level_head(hidden)  # (B, T)
        for block in self.up_blocks:
            hidden = torch.cat([hidden, skips.pop()], dim=1)
            for resnet in block.resnets:
                hidden = resnet(hidden)
            if block.upsample is not None:
                hidden = block.upsample(hidden)
        noise_pred = self.conv_out(self.act(self.norm_out(hidden)))  # (B, C, H, W)

        loss = noise_loss = level_loss = None
        if timesteps is not None:
            noise_loss = F.mse_loss(noise_pred.float(), noise.float())
            level_loss = F.cross_entropy(level_logits.float(), timesteps)
            loss = noise_loss + self.config.level_loss_weight * level_loss
        output = ThermalizerOutput(
            loss=loss,
            noise_loss=noise_loss,
            level_loss=level_loss,
            noise_pred=noise_pred,
            level_logits=level_logits,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["ThermalizerOutput", "ThermalizerPreTrainedModel", "ThermalizerModel"]
