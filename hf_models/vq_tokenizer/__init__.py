"""VQ image tokenizer: images <-> grids of discrete codes."""

from transformers import AutoConfig, AutoModel

from .configuration_vq_tokenizer import VQTokenizerConfig
from .modeling_vq_tokenizer import (
    VQTokenizerModel,
    VQTokenizerOutput,
    VQTokenizerPreTrainedModel,
    VQTokenizerQuantizer,
)

AutoConfig.register("vq_tokenizer", VQTokenizerConfig, exist_ok=True)
AutoModel.register(VQTokenizerConfig, VQTokenizerModel, exist_ok=True)

__all__ = [
    "VQTokenizerConfig",
    "VQTokenizerModel",
    "VQTokenizerOutput",
    "VQTokenizerPreTrainedModel",
    "VQTokenizerQuantizer",
]
