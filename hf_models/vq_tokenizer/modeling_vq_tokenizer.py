"""VQ image tokenizer: conv encoder -> EMA vector quantizer (dead-code restarts) -> conv decoder.

Self-contained (torch + transformers + this folder) so `register_for_auto_class` can ship it as remote code.
"""

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.utils import ModelOutput

from .configuration_vq_tokenizer import VQTokenizerConfig


@dataclass
class VQTokenizerOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        `recon_loss + commit_loss`.
    recon_loss (`torch.FloatTensor` of shape `()`):
        Mean squared error between `reconstruction` and `pixel_values`.
    commit_loss (`torch.FloatTensor` of shape `()`):
        `commitment_cost * mse(z, sg(q))`; the codebook itself is learned by EMA, not by gradients.
    reconstruction (`torch.FloatTensor` of shape `(batch, num_channels, height, width)`):
        Decoded images (same range as the inputs, [-1, 1]; not clamped).
    codes (`torch.LongTensor` of shape `(batch, h, w)`):
        Index of the nearest codebook vector at each latent position.
    perplexity (`torch.FloatTensor` of shape `()`):
        `exp(entropy)` of the batch's code histogram (1 = one code used, `codebook_size` = uniform use).
    """

    loss: Optional[torch.FloatTensor] = None
    recon_loss: Optional[torch.FloatTensor] = None
    commit_loss: Optional[torch.FloatTensor] = None
    reconstruction: Optional[torch.FloatTensor] = None
    codes: Optional[torch.LongTensor] = None
    perplexity: Optional[torch.FloatTensor] = None


@dataclass
class VQTokenizerQuantizerOutput(ModelOutput):
    r"""
    quantized (`torch.FloatTensor` of shape `(batch, embedding_dim, h, w)`):
        Straight-through quantized latents `z + sg(q - z)`.
    codes (`torch.LongTensor` of shape `(batch, h, w)`).
    commit_loss (`torch.FloatTensor` of shape `()`).
    perplexity (`torch.FloatTensor` of shape `()`).
    """

    quantized: Optional[torch.FloatTensor] = None
    codes: Optional[torch.LongTensor] = None
    commit_loss: Optional[torch.FloatTensor] = None
    perplexity: Optional[torch.FloatTensor] = None


def _distributed_world_size(enabled: bool) -> int:
    if enabled and dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


class VQTokenizerQuantizer(nn.Module):
    """Vector quantizer whose codebook is learned by exponential moving averages (VQ-VAE-2, arXiv:1906.00446,
    appendix; Laplace-smoothed cluster sizes) with dead-code restarts (arXiv:1711.00937 follow-ups, e.g. Jukebox).

    Buffers (saved with the weights):
        codebook (`(K, D)`): current code vectors, `embed_sum / smoothed(cluster_size)`.
        ema_cluster_size (`(K,)`): EMA of how many latents picked each code per training step.
        ema_embed_sum (`(K, D)`): EMA of the sum of latents assigned to each code.

    The EMA update and restarts run only in training mode. With `torch.distributed` initialised and
    `config.ema_sync_distributed`, the per-step statistics are all-reduced and restart vectors are broadcast from
    rank 0, so all ranks hold identical buffers (otherwise, under DDP, rank 0's buffers are broadcast at the next
    forward and the other ranks' updates are dropped). Restart randomness uses torch's global RNG of rank 0.
    """

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.embedding_dim = config.embedding_dim
        self.commitment_cost = config.commitment_cost
        self.decay = config.ema_decay
        self.epsilon = config.ema_epsilon
        self.dead_code_threshold = config.dead_code_threshold
        self.sync_distributed = config.ema_sync_distributed
        self.register_buffer("codebook", torch.empty(config.codebook_size, config.embedding_dim))
        self.register_buffer("ema_cluster_size", torch.empty(config.codebook_size))
        self.register_buffer("ema_embed_sum", torch.empty(config.codebook_size, config.embedding_dim))

    def nearest_codes(self, flat: torch.Tensor) -> torch.LongTensor:
        """flat `(N, D)` -> index of the nearest codebook vector `(N,)` in squared Euclidean distance."""
        # fp32 even under autocast: bf16 distances pick the wrong code
        with torch.autocast(device_type=flat.device.type, enabled=False):
            codebook = self.codebook.float()
            flat = flat.float()
            # ||z||^2 - 2 z.e + ||e||^2, (N, K)
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
            return distances.argmin(dim=1)

    def lookup(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """codes `(...)` -> code vectors `(..., D)`."""
        return F.embedding(codes, self.codebook)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.LongTensor) -> None:
        with torch.autocast(device_type=flat.device.type, enabled=False):
            self._ema_update_fp32(flat.float(), codes)

    def _ema_update_fp32(self, flat: torch.Tensor, codes: torch.LongTensor) -> None:
        one_hot = F.one_hot(codes, self.codebook_size).float()  # (N, K)
        counts = one_hot.sum(0)  # (K,)
        embed_sum = one_hot.t() @ flat  # (K, D)
        world_size = _distributed_world_size(self.sync_distributed)
        if world_size > 1:
            dist.all_reduce(counts)
            dist.all_reduce(embed_sum)
            # statistics per step are per-process averages, so the restart threshold means the same at any scale
            counts /= world_size
            embed_sum /= world_size

        self.ema_cluster_size.mul_(self.decay).add_(counts.to(self.ema_cluster_size.dtype), alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(embed_sum.to(self.ema_embed_sum.dtype), alpha=1 - self.decay)
        # Laplace smoothing keeps unused codes from dividing by zero: (n_k + eps) / (n + K eps) * n
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])

        if self.dead_code_threshold > 0:
            dead = self.ema_cluster_size < self.dead_code_threshold  # identical on every rank
            num_dead = int(dead.sum())
            if num_dead:
                picks = torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)
                restart = flat[picks]  # (num_dead, D), random encoder outputs of this batch
                if world_size > 1:
                    dist.broadcast(restart, src=0)
                restart = restart.to(self.codebook.dtype)
                self.codebook[dead] = restart
                self.ema_cluster_size[dead] = self.dead_code_threshold
                self.ema_embed_sum[dead] = restart * self.dead_code_threshold

    def forward(self, z: torch.Tensor) -> VQTokenizerQuantizerOutput:
        batch, dim, height, width = z.shape
        flat = z.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
        codes = self.nearest_codes(flat)  # (B*h*w,)
        quantized = self.lookup(codes).to(z.dtype).view(batch, height, width, dim).permute(0, 3, 1, 2)  # (B, D, h, w)

        commit_loss = self.commitment_cost * F.mse_loss(z, quantized.detach())
        probs = torch.bincount(codes, minlength=self.codebook_size).float() / codes.numel()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())

        if self.training:
            self._ema_update(flat.detach(), codes)

        quantized = z + (quantized - z).detach()  # straight-through estimator
        return VQTokenizerQuantizerOutput(
            quantized=quantized,
            codes=codes.view(batch, height, width),
            commit_loss=commit_loss,
            perplexity=perplexity,
        )


class VQTokenizerResBlock(GradientCheckpointingLayer):
    """`x + conv1x1(act(conv3x3(act(x))))`, the VQ-VAE residual block (arXiv:1711.00937)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, kernel_size=1)
        self.act = nn.SiLU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states + self.conv2(self.act(self.conv1(self.act(hidden_states))))


class VQTokenizerEncoder(nn.Module):
    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        channels = config.hidden_channels
        self.conv_in = nn.Conv2d(config.num_channels, channels[0], kernel_size=3, padding=1)
        self.down = nn.ModuleList()
        self.blocks = nn.ModuleList()
        in_ch = channels[0]
        for out_ch in channels:
            self.down.append(nn.Conv2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1))  # halves H and W
            self.blocks.append(nn.ModuleList(VQTokenizerResBlock(out_ch) for _ in range(config.num_res_blocks)))
            in_ch = out_ch
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], config.embedding_dim, kernel_size=1)  # pre-quantization

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(pixel_values)  # (B, c0, H, W)
        for down, blocks in zip(self.down, self.blocks):
            hidden = down(hidden)  # (B, c_i, H / 2**(i+1), W / 2**(i+1))
            for block in blocks:
                hidden = block(hidden)
        return self.conv_out(self.act(hidden))  # (B, D, h, w)


class VQTokenizerDecoder(nn.Module):
    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        channels = list(reversed(config.hidden_channels))
        self.conv_in = nn.Conv2d(config.embedding_dim, channels[0], kernel_size=1)  # post-quantization
        self.blocks = nn.ModuleList()
        self.up = nn.ModuleList()
        for i, in_ch in enumerate(channels):
            out_ch = channels[i + 1] if i + 1 < len(channels) else channels[-1]
            self.blocks.append(nn.ModuleList(VQTokenizerResBlock(in_ch) for _ in range(config.num_res_blocks)))
            self.up.append(nn.ConvTranspose2d(in_ch, out_ch, kernel_size=4, stride=2, padding=1))  # doubles H, W
        self.act = nn.SiLU()
        self.conv_out = nn.Conv2d(channels[-1], config.num_channels, kernel_size=3, padding=1)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        hidden = self.conv_in(latents)  # (B, c_last, h, w)
        for blocks, up in zip(self.blocks, self.up):
            for block in blocks:
                hidden = block(hidden)
            hidden = up(hidden)
        return self.conv_out(self.act(hidden))  # (B, C, H, W)


class VQTokenizerPreTrainedModel(PreTrainedModel):
    config_class = VQTokenizerConfig
    base_model_prefix = "vq"
    main_input_name = "pixel_values"
    supports_gradient_checkpointing = True
    _no_split_modules = ["VQTokenizerResBlock", "VQTokenizerQuantizer"]

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Also registers the config class, so the saved `auto_map` names both and
        `AutoModel.from_pretrained(path, trust_remote_code=True)` works without latentheat installed."""
        cls.config_class.register_for_auto_class("AutoConfig")
        super().register_for_auto_class(auto_class)

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
            # torch's default conv init (kaiming-uniform, a=sqrt(5)); N(0, 0.02) starves deep conv stacks
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, VQTokenizerQuantizer):
            init.normal_(module.codebook, mean=0.0, std=self.config.initializer_range)
            # every code starts as "used once": unused codes keep their vector (no divide-by-zero drift) and are
            # restarted from data as soon as their count decays below dead_code_threshold
            init.ones_(module.ema_cluster_size)
            init.copy_(module.ema_embed_sum, module.codebook)


class VQTokenizerModel(VQTokenizerPreTrainedModel):
    r"""
    Example:

    ```python
    >>> model = VQTokenizerModel(VQTokenizerConfig())
    >>> images = torch.rand(4, 1, 28, 28) * 2 - 1
    >>> codes = model.encode(images)  # (4, 7, 7) in [0, 256)
    >>> recon = model.decode(codes)  # (4, 1, 28, 28)
    ```
    """

    def __init__(self, config: VQTokenizerConfig):
        super().__init__(config)
        self.encoder = VQTokenizerEncoder(config)
        self.quantizer = VQTokenizerQuantizer(config)
        self.decoder = VQTokenizerDecoder(config)
        self.post_init()

    # ---------------------------------------------------------------- validation
    def _check_pixel_values(self, pixel_values: torch.Tensor) -> None:
        if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
            shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
            raise ValueError(f"pixel_values must have shape (batch, channels, height, width), got {shape}")
        if not pixel_values.is_floating_point():
            raise ValueError(f"pixel_values must be a float tensor in [-1, 1], got dtype {pixel_values.dtype}")
        _, channels, height, width = pixel_values.shape
        if channels != self.config.num_channels:
            raise ValueError(f"pixel_values has {channels} channels, config.num_channels={self.config.num_channels}")
        factor = 2**self.config.num_stages
        if height % factor or width % factor:
            raise ValueError(
                f"pixel_values height={height} and width={width} must be divisible by 2**len(hidden_channels)={factor}"
            )

    def _check_codes(self, codes: torch.Tensor) -> None:
        if not isinstance(codes, torch.Tensor) or codes.dim() != 3:
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes)
            raise ValueError(f"codes must have shape (batch, h, w), got {shape}")
        if codes.is_floating_point() or codes.is_complex() or codes.dtype == torch.bool:
            raise ValueError(f"codes must be an integer tensor, got dtype {codes.dtype}")
        if codes.numel():
            low, high = int(codes.min()), int(codes.max())
            if low < 0 or high >= self.config.codebook_size:
                raise ValueError(
                    f"codes must lie in [0, codebook_size={self.config.codebook_size}), got values in [{low}, {high}]"
                )

    # ---------------------------------------------------------------- API
    def encode_latents(self, pixel_values: torch.Tensor) -> torch.FloatTensor:
        """pixel_values `(B, C, H, W)` -> continuous pre-quantization latents `(B, D, h, w)`."""
        self._check_pixel_values(pixel_values)
        return self.encoder(pixel_values)

    @torch.no_grad()
    def quantize(self, embeddings: torch.Tensor) -> torch.LongTensor:
        """embeddings `(B, D, h, w)` -> index of the nearest codebook vector `(B, h, w)`. Never updates the EMA."""
        if not isinstance(embeddings, torch.Tensor) or embeddings.dim() != 4:
            shape = tuple(embeddings.shape) if isinstance(embeddings, torch.Tensor) else type(embeddings)
            raise ValueError(f"embeddings must have shape (batch, embedding_dim, h, w), got {shape}")
        if embeddings.shape[1] != self.config.embedding_dim:
            raise ValueError(
                f"embeddings has {embeddings.shape[1]} channels, config.embedding_dim={self.config.embedding_dim}"
            )
        batch, dim, height, width = embeddings.shape
        flat = embeddings.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*h*w, D)
        return self.quantizer.nearest_codes(flat).view(batch, height, width)

    def embed(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """codes `(B, h, w)` -> codebook vectors `(B, D, h, w)`."""
        self._check_codes(codes)
        return self.quantizer.lookup(codes.long()).permute(0, 3, 1, 2)

    @torch.no_grad()
    def encode(self, pixel_values: torch.Tensor) -> torch.LongTensor:
        """pixel_values `(B, C, H, W)` in [-1, 1] -> codes `(B, h, w)`. Never updates the EMA."""
        return self.quantize(self.encode_latents(pixel_values))

    def decode_embeddings(self, embeddings: torch.Tensor) -> torch.FloatTensor:
        """(quantized) embeddings `(B, D, h, w)` -> images `(B, C, H, W)`."""
        return self.decoder(embeddings)

    def decode(self, codes: torch.LongTensor) -> torch.FloatTensor:
        """codes `(B, h, w)` -> images `(B, C, H, W)` (range of the training images, not clamped)."""
        return self.decoder(self.embed(codes))

    def forward(self, pixel_values: torch.Tensor, return_dict: Optional[bool] = None, **kwargs):
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch, num_channels, height, width)`):
            Images in [-1, 1].

        In training mode the codebook's EMA statistics are updated and dead codes restarted.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        latents = self.encode_latents(pixel_values)  # (B, D, h, w)
        quant = self.quantizer(latents)
        reconstruction = self.decoder(quant.quantized)  # (B, C, H, W)
        recon_loss = F.mse_loss(reconstruction.float(), pixel_values.float())
        loss = recon_loss + quant.commit_loss
        output = VQTokenizerOutput(
            loss=loss,
            recon_loss=recon_loss,
            commit_loss=quant.commit_loss,
            reconstruction=reconstruction,
            codes=quant.codes,
            perplexity=quant.perplexity,
        )
        return output if return_dict else output.to_tuple()


__all__ = ["VQTokenizerOutput", "VQTokenizerQuantizer", "VQTokenizerPreTrainedModel", "VQTokenizerModel"]
