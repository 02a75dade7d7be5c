"""Configurations of TokCom: a text VAE that compresses each chunk of tokens to one latent vector, and a flow-matching
transformer that denoises sequences of those latents. Both build on transformers' Qwen2 blocks (`backbone_config`).

Seed sizes (TokCom v5.2): CodeLlama vocabulary (32,016), chunks of 4 tokens, 1,024 tokens = 256 latents per sequence,
hidden size 896, 24 layers, 14 query heads / 2 key-value heads, MLP 4,864, flow noise std 0.05.
"""

import copy
import math

from transformers import PretrainedConfig, Qwen2Config

# the Qwen2 seed backbone (Qwen2-0.5B's block sizes, the seed's hidden size and depth)
SEED_BACKBONE = {
    "hidden_size": 896,
    "intermediate_size": 4864,
    "num_hidden_layers": 24,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
    "rope_theta": 1000000.0,
    "rms_norm_eps": 1e-6,
}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _backbone(backbone_config, **forced) -> Qwen2Config:
    """A `Qwen2Config` from `None` (the seed sizes), a dict or a `Qwen2Config` (copied: one object may serve the VAE
    and the denoiser, which force different fields on it), with `forced` fields set."""
    if isinstance(backbone_config, Qwen2Config):
        backbone_config = copy.deepcopy(backbone_config)
    if backbone_config is None:
        backbone_config = dict(SEED_BACKBONE)
    if isinstance(backbone_config, dict):
        values = {k: v for k, v in backbone_config.items() if k != "model_type"}
        values = {**SEED_BACKBONE, **values}
        backbone_config = Qwen2Config(**values)
    if not isinstance(backbone_config, Qwen2Config):
        raise ValueError(
            f"backbone_config={type(backbone_config).__name__} is invalid: expected a Qwen2Config, a dict of its "
            "fields, or None (the seed sizes)"
        )
    hidden, heads, kv = backbone_config.hidden_size, backbone_config.num_attention_heads, backbone_config.num_key_value_heads
    if hidden % heads:
        raise ValueError(f"backbone_config.hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    if heads % kv:
        raise ValueError(f"backbone_config.num_attention_heads={heads} is not divisible by num_key_value_heads={kv}")
    for name, value in forced.items():
        setattr(backbone_config, name, value)
    return backbone_config


class TokComVAEConfig(PretrainedConfig):
    r"""
    Configuration for [`TokComVAEModel`]. The encoder, a causal Qwen2 stack over the tokens of one chunk, reads its
    last position into a Gaussian posterior `N(mu, exp(logvar))` of dimension `latent_size`; the decoder, a second
    Qwen2 stack, reads the latent (projected to the hidden size) followed by `chunk_size` copies of a learned omni
    token and predicts the chunk's tokens in parallel at the omni positions.

    Args:
        vocab_size (`int`, *optional*, defaults to 32016):
            Token vocabulary (the seed's CodeLlama tokenizer: 32,016).
        chunk_size (`int`, *optional*, defaults to 4):
            Tokens per latent.
        latent_size (`int`, *optional*):
            Dimension of each latent; defaults to the backbone's hidden size (the seed: 896).
        kl_weight (`float`, *optional*, defaults to 0.0):
            Weight of the KL term `KL(q(z|x) || N(0, I))` in the loss; 0 trains with cross-entropy alone, as the seed
            does (the posterior noise still regularises the decoder when `sample_posterior` is on).
        sample_posterior (`bool`, *optional*, defaults to `True`):
            Whether training decodes a sample `mu + exp(logvar / 2) * eps` (a VAE) or `mu` (an autoencoder).
        backbone_config (`Qwen2Config` or `dict`, *optional*):
            Sizes of both Qwen2 stacks (`hidden_size`, `intermediate_size`, `num_hidden_layers`,
            `num_attention_heads`, `num_key_value_heads`, ...); `None` gives the seed's 896 / 4864 / 24 / 14 / 2.
            Its `vocab_size` is set to `vocab_size`.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initial linear and embedding weights.
    """

    model_type = "tokcom_vae"
    sub_configs = {"backbone_config": Qwen2Config}

    def __init__(
        self,
        vocab_size=32016,
        chunk_size=4,
        latent_size=None,
        kl_weight=0.0,
        sample_posterior=True,
        backbone_config=None,
        initializer_range=0.02,
        **kwargs,
    ):
        if not _is_int(vocab_size) or vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: expected an int >= 2")
        if not _is_int(chunk_size) or chunk_size < 1:
            raise ValueError(f"chunk_size={chunk_size!r} is invalid: expected an int >= 1")
        if not _is_number(kl_weight) or kl_weight < 0:
            raise ValueError(f"kl_weight={kl_weight!r} is invalid: expected a finite number >= 0")
        if not isinstance(sample_posterior, bool):
            raise ValueError(f"sample_posterior={sample_posterior!r} is invalid: expected true or false")
        if not _is_number(initializer_range) or initializer_range <= 0:
            raise ValueError(f"initializer_range={initializer_range!r} is invalid: expected a number > 0")
        self.backbone_config = _backbone(backbone_config, vocab_size=vocab_size)
        if latent_size is None:
            latent_size = self.backbone_config.hidden_size
        if not _is_int(latent_size) or latent_size < 1:
            raise ValueError(f"latent_size={latent_size!r} is invalid: expected an int >= 1 (or unset: the hidden size)")
        if self.backbone_config.max_position_embeddings < chunk_size + 1:
            raise ValueError(
                f"backbone_config.max_position_embeddings={self.backbone_config.max_position_embeddings} is shorter "
                f"than a decoder input (chunk_size + 1 = {chunk_size + 1})"
            )
        self.vocab_size = vocab_size
        self.chunk_size = chunk_size
        self.latent_size = latent_size
        self.kl_weight = float(kl_weight)
        self.sample_posterior = sample_posterior
        self.initializer_range = float(initializer_range)
        kwargs.pop("hidden_size", None)  # derived (a property)
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        """The backbone's hidden size (DeepSpeed's `"auto"` bucket sizes read it)."""
        return self.backbone_config.hidden_size


class TokComDenoiserConfig(PretrainedConfig):
    r"""
    Configuration for [`TokComDenoiserModel`]: a bidirectional transformer with adaLN-Zero timestep conditioning (DiT)
    over a sequence of TokCom latents. Flow matching: `x_t = (1 - t) x_0 + t x_1` with `x_0 ~ N(0, noise_std^2)` and
    `x_1` the clean latents; the model predicts `x_1` from `(x_t, t)`.

    Args:
        latent_size (`int`, *optional*, defaults to 896):
            Dimension of each latent (the VAE's `latent_size`).
        max_chunks (`int`, *optional*, defaults to 256):
            Longest latent sequence (the seed: 1,024 tokens / 4); the default generation length.
        noise_std (`float`, *optional*, defaults to 0.05):
            Standard deviation of the source noise `x_0`.
        ce_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the token cross-entropy through the frozen VAE decoder in the training loss (the seed trains on
            it alone).
        mse_loss_weight (`float`, *optional*, defaults to 0.0):
            Weight of the MSE between the predicted and the encoded clean latents (the seed only logs it). With the
            MSE alone the prediction is the conditional mean `E[x_1 | x_t]`, which is what the Euler flow assumes.
        time_embed_dim (`int`, *optional*, defaults to 256):
            Width of the sinusoidal embedding of `t` fed to the timestep MLP.
        backbone_config (`Qwen2Config` or `dict`, *optional*):
            Sizes of the Qwen2 attention and MLP blocks; `None` gives the seed's 896 / 4864 / 24 / 14 / 2. Its
            attention is used without a causal mask.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the initial linear weights (the adaLN modulations and the output layer start at 0).
    """

    model_type = "tokcom_denoiser"
    sub_configs = {"backbone_config": Qwen2Config}

    def __init__(
        self,
        latent_size=896,
        max_chunks=256,
        noise_std=0.05,
        ce_loss_weight=1.0,
        mse_loss_weight=0.0,
        time_embed_dim=256,
        backbone_config=None,
        initializer_range=0.02,
        **kwargs,
    ):
        if not _is_int(latent_size) or latent_size < 1:
            raise ValueError(f"latent_size={latent_size!r} is invalid: expected an int >= 1")
        if not _is_int(max_chunks) or max_chunks < 1:
            raise ValueError(f"max_chunks={max_chunks!r} is invalid: expected an int >= 1")
        if not _is_number(noise_std) or noise_std <= 0:
            raise ValueError(f"noise_std={noise_std!r} is invalid: expected a finite number > 0")
        for name, value in (("ce_loss_weight", ce_loss_weight), ("mse_loss_weight", mse_loss_weight)):
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a finite number >= 0")
        if ce_loss_weight == 0 and mse_loss_weight == 0:
            raise ValueError("ce_loss_weight and mse_loss_weight are both 0: nothing would train the denoiser")
        if not _is_int(time_embed_dim) or time_embed_dim < 2 or time_embed_dim % 2:
            raise ValueError(f"time_embed_dim={time_embed_dim!r} is invalid: expected an even int >= 2")
        if not _is_number(initializer_range) or initializer_range <= 0:
            raise ValueError(f"initializer_range={initializer_range!r} is invalid: expected a number > 0")
        # the denoiser has no token embedding: a vocabulary of 1 keeps Qwen2Config valid
        self.backbone_config = _backbone(backbone_config, vocab_size=1)
        if self.backbone_config.max_position_embeddings < max_chunks:
            raise ValueError(
                f"backbone_config.max_position_embeddings={self.backbone_config.max_position_embeddings} is shorter "
                f"than max_chunks={max_chunks}"
            )
        self.latent_size = latent_size
        self.max_chunks = max_chunks
        self.noise_std = float(noise_std)
        self.ce_loss_weight = float(ce_loss_weight)
        self.mse_loss_weight = float(mse_loss_weight)
        self.time_embed_dim = time_embed_dim
        self.initializer_range = float(initializer_range)
        kwargs.pop("hidden_size", None)
        super().__init__(**kwargs)

    @property
    def hidden_size(self) -> int:
        return self.backbone_config.hidden_size
