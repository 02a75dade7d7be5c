"""latentheat models: every family is a ``PreTrainedModel`` registered with the Auto classes.

diffusers loads pipeline components by importing the module path recorded in
``model_index.json``; the classes are also exported here for convenience.
"""

from .code_gpt import CodeGPTConfig, CodeGPTForCausalLM
from .vq_tokenizer import VQTokenizerConfig, VQTokenizerModel

__all__ = ["CodeGPTConfig", "CodeGPTForCausalLM", "VQTokenizerConfig", "VQTokenizerModel"]
