"""latentheat models: every family is a ``PreTrainedModel`` registered with the Auto classes.

Importing a family's subpackage registers its config with ``AutoConfig`` and its model with
``AutoModel``/``AutoModelForCausalLM``. diffusers loads pipeline components by importing the
module path recorded in ``model_index.json``; the classes are also exported here.
"""

from .abstractinator import AbstractinatorConfig, AbstractinatorModel
from .code_gpt import CodeGPTConfig, CodeGPTForCausalLM
from .dtm import DTMConfig, DTMModel
from .mnist_classifier import MNISTClassifierConfig, MNISTClassifierModel
from .thermalizer import ThermalizerConfig, ThermalizerModel
from .tokcom import TokComDenoiserConfig, TokComDenoiserModel, TokComVAEConfig, TokComVAEModel
from .vq_tokenizer import VQTokenizerConfig, VQTokenizerModel

__all__ = [
    "AbstractinatorConfig",
    "AbstractinatorModel",
    "CodeGPTConfig",
    "CodeGPTForCausalLM",
    "DTMConfig",
    "DTMModel",
    "MNISTClassifierConfig",
    "MNISTClassifierModel",
    "ThermalizerConfig",
    "ThermalizerModel",
    "TokComDenoiserConfig",
    "TokComDenoiserModel",
    "TokComVAEConfig",
    "TokComVAEModel",
    "VQTokenizerConfig",
    "VQTokenizerModel",
]
