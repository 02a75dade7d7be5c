"""TokCom: token compression with a text VAE and a flow-matching latent denoiser (TokCom v5.2).

- [`TokComVAEModel`] compresses each chunk of `chunk_size` tokens to one latent vector: a causal Qwen2 stack reads the
  chunk and its last position gives a Gaussian posterior; a bidirectional Qwen2 stack reads the latent followed by
  `chunk_size` omni tokens and predicts the chunk's tokens in parallel. Trained with cross-entropy (+ optional KL).
- [`TokComDenoiserModel`] is a DiT over the latent sequence (Qwen2 attention and MLP blocks, adaLN-Zero timestep
  conditioning, no causal mask) that predicts the clean latents `x_1` from `x_t = (1 - t) x_0 + t x_1`.

Self-contained (torch + transformers + this folder) so `register_for_auto_class` can ship it as remote code.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2Attention,
    Qwen2DecoderLayer,
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
)
from transformers.utils import ModelOutput

from .configuration_tokcom import TokComDenoiserConfig, TokComVAEConfig


@dataclass
class TokComVAEOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        `ce_loss + kl_weight * kl_loss`; only when `labels` are given.
    ce_loss (`torch.FloatTensor` of shape `()`, *optional*):
        Mean token cross-entropy of the reconstruction.
    kl_loss (`torch.FloatTensor` of shape `()`, *optional*):
        `KL(q(z|x) || N(0, I))` summed over a latent's dimensions, averaged over latents.
    logits (`torch.FloatTensor` of shape `(batch, seq_len, vocab_size)`):
        Reconstruction logits of every token.
    latents (`torch.FloatTensor` of shape `(batch, seq_len // chunk_size, latent_size)`):
        The decoded latents (a posterior sample in training when `sample_posterior`, else the means).
    mean (`torch.FloatTensor` of shape `(batch, seq_len // chunk_size, latent_size)`):
        Posterior means.
    logvar (`torch.FloatTensor` of shape `(batch, seq_len // chunk_size, latent_size)`):
        Posterior log-variances.
    """

    loss: Optional[torch.FloatTensor] = None
    ce_loss: Optional[torch.FloatTensor] = None
    kl_loss: Optional[torch.FloatTensor] = None
    logits: Optional[torch.FloatTensor] = None
    latents: Optional[torch.FloatTensor] = None
    mean: Optional[torch.FloatTensor] = None
    logvar: Optional[torch.FloatTensor] = None


@dataclass
class TokComDenoiserOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`, *optional*):
        Mean squared error between `sample` and `target`; only when `target` is given.
    sample (`torch.FloatTensor` of shape `(batch, num_chunks, latent_size)`):
        Predicted clean latents `x_1`.
    """

    loss: Optional[torch.FloatTensor] = None
    sample: Optional[torch.FloatTensor] = None


def _causal_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """Additive `(1, 1, L, L)` mask, 0 on and below the diagonal (read by eager and sdpa attention alike)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


class TokComPreTrainedModel(PreTrainedModel):
    base_model_prefix = "tokcom"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "TokComDiTBlock"]
    _supports_sdpa = True

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Also registers the config class, so the saved `auto_map` names both and
        `AutoModel.from_pretrained(path, trust_remote_code=True)` works without latentheat installed."""
        cls.config_class.register_for_auto_class("AutoConfig")
        super().register_for_auto_class(auto_class)

    def __init__(self, config, *inputs, **kwargs):
        super().__init__(config, *inputs, **kwargs)
        # the Qwen2 blocks read the attention implementation from the backbone config: follow the model's
        config.backbone_config._attn_implementation = config._attn_implementation

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            if getattr(module, "_tokcom_zero_init", False):
                init.zeros_(module.weight)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, Qwen2RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, TokComVAEModel):
            init.normal_(module.omni_embedding, mean=0.0, std=std)
        elif isinstance(module, Qwen2RotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class TokComVAEModel(TokComPreTrainedModel):
    r"""
    Example:

    ```python
    >>> config = TokComVAEConfig(vocab_size=100, backbone_config={"hidden_size": 32, "intermediate_size": 64,
    ...     "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> vae = TokComVAEModel(config)
    >>> ids = torch.randint(0, 100, (2, 8))
    >>> latents = vae.encode(ids)            # (2, 2, 32): one latent per chunk of 4 tokens
    >>> vae.decode(latents).shape            # logits of every token
    torch.Size([2, 8, 100])
    ```
    """

    config_class = TokComVAEConfig
    main_input_name = "input_ids"

    def __init__(self, config: TokComVAEConfig):
        super().__init__(config)
        backbone = config.backbone_config
        hidden = backbone.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, hidden)
        self.encoder_layers = nn.ModuleList([Qwen2DecoderLayer(backbone, i) for i in range(backbone.num_hidden_layers)])
        self.encoder_norm = Qwen2RMSNorm(hidden, eps=backbone.rms_norm_eps)
        self.to_posterior = nn.Linear(hidden, 2 * config.latent_size)
        self.from_latent = nn.Linear(config.latent_size, hidden)
        self.omni_embedding = nn.Parameter(torch.empty(hidden))
        self.decoder_layers = nn.ModuleList([Qwen2DecoderLayer(backbone, i) for i in range(backbone.num_hidden_layers)])
        for layer in self.decoder_layers:
            layer.self_attn.is_causal = False  # the omni positions read each other and the latent
        self.decoder_norm = Qwen2RMSNorm(hidden, eps=backbone.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, config.vocab_size, bias=False)
        self.rotary_emb = Qwen2RotaryEmbedding(config=backbone)
        self.gradient_checkpointing = False
        self.post_init()

    def _positions(self, x: torch.Tensor):
        position_ids = torch.arange(x.shape[1], device=x.device)[None]
        return self.rotary_emb(x, position_ids)

    def _chunks(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
        batch, length = input_ids.shape
        c = self.config.chunk_size
        if length == 0 or length % c:
            raise ValueError(f"seq_len={length} is not a positive multiple of chunk_size={c}; pad the text to whole chunks")
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids hold ids outside [0, vocab_size={self.config.vocab_size}): min {low}, max {high}")
        return input_ids.reshape(batch * (length // c), c)  # one row per chunk

    def posterior(self, input_ids: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance, each `(batch, seq_len // chunk_size, latent_size)`."""
        batch = input_ids.shape[0]
        chunks = self._chunks(input_ids)
        h = self.embed_tokens(chunks)  # (batch * num_chunks, chunk_size, hidden)
        mask = _causal_mask(h.shape[1], h.dtype, h.device)
        pe = self._positions(h)
        for layer in self.encoder_layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        last = self.encoder_norm(h[:, -1])  # the chunk's last position has read the whole chunk
        mean, logvar = self.to_posterior(last).chunk(2, dim=-1)
        logvar = logvar.clamp(-30.0, 20.0)  # exp() stays finite; a bound of the parametrization, not of the data
        return mean.reshape(batch, -1, self.config.latent_size), logvar.reshape(batch, -1, self.config.latent_size)

    def encode(self, input_ids: torch.LongTensor, sample: bool = False, generator: Optional[torch.Generator] = None):
        """Latents `(batch, seq_len // chunk_size, latent_size)`: the posterior means, or a sample when `sample`."""
        mean, logvar = self.posterior(input_ids)
        if not sample:
            return mean
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean + (0.5 * logvar).exp() * noise

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Token logits `(batch, num_chunks * chunk_size, vocab_size)` of latents `(batch, num_chunks, latent_size)`."""
        if latents.dim() != 3 or latents.shape[-1] != self.config.latent_size:
            raise ValueError(
                f"latents must be (batch, num_chunks, latent_size={self.config.latent_size}); got shape "
                f"{tuple(latents.shape)}"
            )
        batch, num_chunks, _ = latents.shape
        c = self.config.chunk_size
        z = self.from_latent(latents.reshape(batch * num_chunks, 1, -1))
        omni = self.omni_embedding.to(z.dtype).expand(batch * num_chunks, c, -1)
        h = torch.cat([z, omni], dim=1)  # (batch * num_chunks, 1 + chunk_size, hidden)
        pe = self._positions(h)
        for layer in self.decoder_layers:
            h = layer(h, attention_mask=None, position_embeddings=pe)
        logits = self.lm_head(self.decoder_norm(h[:, 1:]))
        return logits.reshape(batch, num_chunks * c, -1)

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: Optional[torch.LongTensor] = None,
        generator: Optional[torch.Generator] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, seq_len)`), `seq_len` a multiple of `chunk_size`.
        labels (`torch.LongTensor` of shape `(batch, seq_len)`, *optional*):
            Tokens to reconstruct (usually `input_ids`); positions set to -100 are ignored.
        generator (`torch.Generator`, *optional*):
            Draws the posterior sample in training.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        mean, logvar = self.posterior(input_ids)
        if self.training and self.config.sample_posterior:
            noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
            latents = mean + (0.5 * logvar).exp() * noise
        else:
            latents = mean
        logits = self.decode(latents)
        loss = ce_loss = kl_loss = None
        if labels is not None:
            ce_loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)
            kl_loss = 0.5 * (mean.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float()).sum(-1).mean()
            loss = ce_loss + self.config.kl_weight * kl_loss
        output = TokComVAEOutput(loss=loss, ce_loss=ce_loss, kl_loss=kl_loss, logits=logits, latents=latents, mean=mean, logvar=logvar)
        return output if return_dict else output.to_tuple()


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding `(batch, dim)` of flow times `t` in [0, 1] (scaled by 1000, as DiT's integer steps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


class TokComDiTBlock(GradientCheckpointingLayer):
    """A DiT block: adaLN-Zero modulated (non-affine LayerNorm -> Qwen2 attention / Qwen2 MLP), gated residuals."""

    def __init__(self, config: TokComDenoiserConfig, layer_idx: int):
        super().__init__()
        backbone = config.backbone_config
        hidden = backbone.hidden_size
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.self_attn = Qwen2Attention(backbone, layer_idx)
        self.self_attn.is_causal = False  # every latent reads the whole sequence
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.mlp = Qwen2MLP(backbone)
        self.adaLN_modulation = nn.Linear(hidden, 6 * hidden)
        self.adaLN_modulation._tokcom_zero_init = True  # adaLN-Zero: each block starts as the identity

    def forward(self, hidden_states, conditioning, position_embeddings, attention_mask=None):
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(F.silu(conditioning))[:, None].chunk(6, dim=-1)
        h = self.norm1(hidden_states) * (1 + scale1) + shift1
        h, _ = self.self_attn(hidden_states=h, position_embeddings=position_embeddings, attention_mask=attention_mask)
        hidden_states = hidden_states + gate1 * h
        h = self.norm2(hidden_states) * (1 + scale2) + shift2
        return hidden_states + gate2 * self.mlp(h)


class TokComDenoiserModel(TokComPreTrainedModel):
    r"""
    Example:

    ```python
    >>> config = TokComDenoiserConfig(latent_size=16, max_chunks=8, backbone_config={"hidden_size": 32,
    ...     "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4, "num_key_value_heads": 2})
    >>> model = TokComDenoiserModel(config)
    >>> x_t, t = torch.randn(2, 8, 16), torch.rand(2)
    >>> model(x_t, t).sample.shape           # predicted clean latents x_1
    torch.Size([2, 8, 16])
    ```
    """

    config_class = TokComDenoiserConfig
    main_input_name = "sample"

    def __init__(self, config: TokComDenoiserConfig):
        super().__init__(config)
        backbone = config.backbone_config
        hidden = backbone.hidden_size
        self.proj_in = nn.Linear(config.latent_size, hidden)
        self.time_embed = nn.Sequential(nn.Linear(config.time_embed_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))
        self.layers = nn.ModuleList([TokComDiTBlock(config, i) for i in range(backbone.num_hidden_layers)])
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(hidden, 2 * hidden)
        self.adaLN_out._tokcom_zero_init = True
        self.proj_out = nn.Linear(hidden, config.latent_size)
        self.proj_out._tokcom_zero_init = True
        self.rotary_emb = Qwen2RotaryEmbedding(config=backbone)
        self.gradient_checkpointing = False
        self.post_init()

    def forward(
        self,
        sample: torch.Tensor,
        timesteps: torch.Tensor,
        target: Optional[torch.Tensor] = None,
        return_dict: Optional[bool] = None,
        **kwargs,
    ):
        r"""
        sample (`torch.FloatTensor` of shape `(batch, num_chunks, latent_size)`): the noised latents `x_t`.
        timesteps (`torch.FloatTensor` of shape `(batch,)` or a number): flow times `t` in [0, 1] (1 = clean).
        target (`torch.FloatTensor`, *optional*): clean latents `x_1`; gives `loss` (MSE).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        cfg = self.config
        if sample.dim() != 3 or sample.shape[-1] != cfg.latent_size:
            raise ValueError(f"sample must be (batch, num_chunks, latent_size={cfg.latent_size}); got {tuple(sample.shape)}")
        if sample.shape[1] > cfg.max_chunks:
            raise ValueError(f"sample has {sample.shape[1]} latents; this model takes at most max_chunks={cfg.max_chunks}")
        timesteps = torch.as_tensor(timesteps, device=sample.device, dtype=torch.float32)
        if timesteps.dim() == 0:
            timesteps = timesteps.expand(sample.shape[0])
        if timesteps.shape != (sample.shape[0],):
            raise ValueError(f"timesteps must be a number or (batch={sample.shape[0]},); got shape {tuple(timesteps.shape)}")
        c = self.time_embed(timestep_embedding(timesteps, cfg.time_embed_dim).to(sample.dtype))
        h = self.proj_in(sample)
        position_ids = torch.arange(h.shape[1], device=h.device)[None]
        pe = self.rotary_emb(h, position_ids)
        for layer in self.layers:
            h = layer(h, c, pe)
        shift, scale = self.adaLN_out(F.silu(c))[:, None].chunk(2, dim=-1)
        out = self.proj_out(self.norm_out(h) * (1 + scale) + shift)
        loss = F.mse_loss(out.float(), target.float()) if target is not None else None
        output = TokComDenoiserOutput(loss=loss, sample=out)
        return output if return_dict else output.to_tuple()
