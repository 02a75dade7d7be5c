"""CodeGPT: a Llama decoder over VQ code sequences with class tokens."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_code_gpt import CodeGPTConfig
from .modeling_code_gpt import (
    CodeGPTCodeOnlyLogitsProcessor,
    CodeGPTForCausalLM,
    CodeGPTMultinomialLogitsProcessor,
    CodeGPTPreTrainedModel,
)

AutoConfig.register("code_gpt", CodeGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(CodeGPTConfig, CodeGPTForCausalLM, exist_ok=True)

__all__ = [
    "CodeGPTConfig",
    "CodeGPTForCausalLM",
    "CodeGPTPreTrainedModel",
    "CodeGPTCodeOnlyLogitsProcessor",
    "CodeGPTMultinomialLogitsProcessor",
]
