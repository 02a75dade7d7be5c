"""Configuration of the thermalizer: a timestep-free UNet over VQ embedding grids that predicts the DDPM noise and
classifies the noise level (Pedersen, Zanna & Bruna, "Thermalizer: Stable autoregressive neural emulation of
spatiotemporal chaos", ICML 2025, arXiv:2503.18731)."""

import math

from transformers import PretrainedConfig


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class ThermalizerConfig(PretrainedConfig):
    r"""
    Configuration for [`ThermalizerModel`]: a UNet without timestep input over embedding grids `(B, C, H, W)` (the
    codebook vectors of a VQ tokenizer at each code position, `C = in_channels`, `H = W = sample_size`). It returns a
    DDPM noise prediction of the input's shape and logits over the `num_train_timesteps` noise levels.

    Args:
        in_channels (`int`, *optional*, defaults to 64):
            Channels `C` of the embedding grid (the tokenizer's codebook dimension).
        sample_size (`int`, *optional*, defaults to 16):
            Side of the (square) training grid. Must be divisible by `2**(len(block_out_channels) - 1)`; the model
            accepts any `H`, `W` divisible by that factor.
        block_out_channels (`tuple[int]`, *optional*, defaults to `(128, 256, 256)`):
            Channels of each UNet level; every level but the last halves the resolution (16 -> 8 -> 4 at seed size).
            Stored as a list.
        layers_per_block (`int`, *optional*, defaults to 2):
            Residual blocks per level, on the way down and on the way up.
        norm_num_groups (`int`, *optional*, defaults to 32):
            Groups of every `GroupNorm`; each entry of `block_out_channels` must be divisible by it.
        num_train_timesteps (`int`, *optional*, defaults to 1000):
            Number of DDPM noise levels `T`; the level head has `T` logits and `timesteps` lie in `[0, T)`.
        level_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight `w` of the level loss: `loss = mse(noise_pred, noise) + w * cross_entropy(level_logits, timesteps)`.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout inside each residual block, in `[0, 1)`.
        padding_mode (`str`, *optional*, defaults to `"circular"`):
            Padding of every convolution: `"circular"` for a periodic domain (the noise prediction is then
            equivariant to periodic shifts by multiples of the down-sampling factor) or `"zeros"`.
        data_mean (`list[float]`, *optional*):
            Per-channel mean of the clean embeddings (length `in_channels`); `normalize` subtracts it. `None` means 0.
        data_std (`list[float]`, *optional*):
            Per-channel standard deviation of the clean embeddings (length `in_channels`, every entry > 0);
            `normalize` divides by it. `None` means 1.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the level head's initial weights.
    """

    model_type = "thermalizer"

    def __init__(
        self,
        in_channels=64,
        sample_size=16,
        block_out_channels=(128, 256, 256),
        layers_per_block=2,
        norm_num_groups=32,
        num_train_timesteps=1000,
        level_loss_weight=1.0,
        dropout=0.0,
        padding_mode="circular",
        data_mean=None,
        data_std=None,
        initializer_range=0.02,
        **kwargs,
    ):
        kwargs.pop("hidden_size", None)  # derived (a property); dropped if a serialised dict carries it
        for name, value, low in (
            ("in_channels", in_channels, 1),
            ("sample_size", sample_size, 1),
            ("layers_per_block", layers_per_block, 1),
            ("norm_num_groups", norm_num_groups, 1),
            ("num_train_timesteps", num_train_timesteps, 2),
        ):
            if not _is_int(value) or value < low:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= {low}")
        block_out_channels = (
            list(block_out_channels) if isinstance(block_out_channels, (list, tuple)) else block_out_channels
        )
        if not isinstance(block_out_channels, list) or not block_out_channels or not all(
            _is_int(c) and c > 0 for c in block_out_channels
        ):
            raise ValueError(
                f"block_out_channels={block_out_channels!r} is invalid: expected a non-empty list of positive ints"
            )
        bad = [c for c in block_out_channels if c % norm_num_groups]
        if bad:
            raise ValueError(
                f"block_out_channels={block_out_channels} has channel counts {bad} not divisible by "
                f"norm_num_groups={norm_num_groups}; every GroupNorm needs channels divisible by the group count"
            )
        factor = 2 ** (len(block_out_channels) - 1)
        if sample_size % factor:
            raise ValueError(
                f"sample_size={sample_size} is not divisible by 2**(len(block_out_channels) - 1)={factor} "
                f"(block_out_channels={block_out_channels}); every level but the last halves the resolution"
            )
        if not _is_number(level_loss_weight) or level_loss_weight < 0:
            raise ValueError(f"level_loss_weight={level_loss_weight!r} is invalid: expected a finite float >= 0")
        if not _is_number(dropout) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout!r} is invalid: expected 0 <= dropout < 1")
        if padding_mode not in ("circular", "zeros"):
            raise ValueError(f"padding_mode={padding_mode!r} is invalid: expected 'circular' or 'zeros'")
        data_mean = self._check_statistics("data_mean", data_mean, in_channels, positive=False)
        data_std = self._check_statistics("data_std", data_std, in_channels, positive=True)
        if not _is_number(initializer_range) or initializer_range <= 0:
            raise ValueError(f"initializer_range={initializer_range!r} is invalid: expected a finite float > 0")

        self.in_channels = in_channels
        self.sample_size = sample_size
        self.block_out_channels = block_out_channels
        self.layers_per_block = layers_per_block
        self.norm_num_groups = norm_num_groups
        self.num_train_timesteps = num_train_timesteps
        self.level_loss_weight = float(level_loss_weight)
        self.dropout = float(dropout)
        self.padding_mode = padding_mode
        self.data_mean = data_mean
        self.data_std = data_std
        self.initializer_range = float(initializer_range)
        super().__init__(**kwargs)

    @staticmethod
    def _check_statistics(name, values, in_channels, positive):
        if values is None:
            return None
        if hasattr(values, "tolist"):  # a tensor or an array
            values = values.tolist()
        if not isinstance(values, (list, tuple)) or not all(_is_number(v) for v in values):
            raise ValueError(f"{name}={values!r} is invalid: expected None or a list of {in_channels} finite floats")
        if len(values) != in_channels:
            raise ValueError(
                f"{name} has length {len(values)}, expected in_channels={in_channels} (one statistic per channel)"
            )
        if positive and not all(v > 0 for v in values):
            raise ValueError(f"{name}={list(values)!r} is invalid: every entry must be > 0")
        return [float(v) for v in values]

    @property
    def hidden_size(self) -> int:
        """Widest feature width (the bottleneck); read by DeepSpeed's "auto" bucket sizes."""
        return max(self.block_out_channels)

    @property
    def downsample_factor(self) -> int:
        """`2**(len(block_out_channels) - 1)`: input heights and widths must be multiples of it."""
        return 2 ** (len(self.block_out_channels) - 1)


__all__ = ["ThermalizerConfig"]
