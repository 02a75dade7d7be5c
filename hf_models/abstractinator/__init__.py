"""The Abstractinator: a hierarchical byte autoencoder with discrete codes per level and a code language model."""

from transformers import AutoConfig, AutoModel

from .configuration_abstractinator import AbstractinatorConfig
from .modeling_abstractinator import (
    AbstractinatorByteSegmentCompressor,
    AbstractinatorCodeExpander,
    AbstractinatorCompressorOutput,
    AbstractinatorModel,
    AbstractinatorOutput,
    AbstractinatorPreTrainedModel,
)

AutoConfig.register("abstractinator", AbstractinatorConfig, exist_ok=True)
AutoModel.register(AbstractinatorConfig, AbstractinatorModel, exist_ok=True)

__all__ = [
    "AbstractinatorByteSegmentCompressor",
    "AbstractinatorCodeExpander",
    "AbstractinatorCompressorOutput",
    "AbstractinatorConfig",
    "AbstractinatorModel",
    "AbstractinatorOutput",
    "AbstractinatorPreTrainedModel",
]
