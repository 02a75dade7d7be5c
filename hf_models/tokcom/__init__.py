"""TokCom: a text VAE (one latent per chunk of tokens) and a flow-matching latent denoiser, on Qwen2 blocks."""

from transformers import AutoConfig, AutoModel

from .configuration_tokcom import TokComDenoiserConfig, TokComVAEConfig
from .modeling_tokcom import (
    TokComDenoiserModel,
    TokComDenoiserOutput,
    TokComPreTrainedModel,
    TokComVAEModel,
    TokComVAEOutput,
)

AutoConfig.register("tokcom_vae", TokComVAEConfig, exist_ok=True)
AutoConfig.register("tokcom_denoiser", TokComDenoiserConfig, exist_ok=True)
AutoModel.register(TokComVAEConfig, TokComVAEModel, exist_ok=True)
AutoModel.register(TokComDenoiserConfig, TokComDenoiserModel, exist_ok=True)

__all__ = [
    "TokComDenoiserConfig",
    "TokComDenoiserModel",
    "TokComDenoiserOutput",
    "TokComPreTrainedModel",
    "TokComVAEConfig",
    "TokComVAEModel",
    "TokComVAEOutput",
]
