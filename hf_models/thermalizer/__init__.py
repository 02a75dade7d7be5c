"""Thermalizer: a timestep-free UNet over VQ embedding grids that predicts DDPM noise and classifies the noise level."""

from transformers import AutoConfig, AutoModel

from .configuration_thermalizer import ThermalizerConfig
from .modeling_thermalizer import ThermalizerModel, ThermalizerOutput, ThermalizerPreTrainedModel

AutoConfig.register("thermalizer", ThermalizerConfig, exist_ok=True)
AutoModel.register(ThermalizerConfig, ThermalizerModel, exist_ok=True)

__all__ = [
    "ThermalizerConfig",
    "ThermalizerModel",
    "ThermalizerOutput",
    "ThermalizerPreTrainedModel",
]
