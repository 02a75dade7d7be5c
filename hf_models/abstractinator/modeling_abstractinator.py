"""The Abstractinator: a hierarchical autoencoder over UTF-8 bytes.

Per level, a [`AbstractinatorByteSegmentCompressor`] turns a sequence of symbols (bytes, or the codes of the level
below) into a shorter sequence of discrete codes: a sliding-window causal transformer (transformers' Qwen2 blocks) with
a language-model branch, whose next-symbol entropy cuts the sequence into variable-length segments, and a compression
branch, pooled per segment by learned queries and vector-quantized with an EMA codebook. A [`AbstractinatorCodeExpander`]
rebuilds the level's symbols from its codes: a bidirectional encoder over the code vectors and a causal decoder whose
cross-attention reads the codes of the segments up to the one it writes (rotary positions over segment indices), each
segment ended by an end-of-segment symbol. A `CodeSequenceTransformer` (transformers' `LlamaForCausalLM`, so
`generate()` and its logits processors) models the top codes.

Causal bits of a text = bits of its top codes (with BOS / EOS) under the code LM + bits of every level's symbols and
end-of-segment marks under its expander given the codes: a two-part code that pays for the codes, so
`bits / 8 / num_bytes` is an honest compressed size.

Self-contained (torch + transformers + this folder) so `register_for_auto_class` can ship it as remote code.
"""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, LlamaForCausalLM, PreTrainedModel, Qwen2Config
from transformers import initialization as init
from transformers.models.qwen2.modeling_qwen2 import (
    Qwen2DecoderLayer,
    Qwen2MLP,
    Qwen2RMSNorm,
    Qwen2RotaryEmbedding,
    rotate_half,
)
from transformers.utils import ModelOutput

from .configuration_abstractinator import AbstractinatorConfig


@dataclass
class AbstractinatorCompressorOutput(ModelOutput):
    r"""
    logits (`(batch, seq_len, vocab)`): the language-model branch's next-symbol logits (the entropy model).
    segment_ids (`(batch, seq_len)`): segment of every position (padding positions: -1).
    num_segments (`(batch,)`): segments per row.
    pre_quantized (`(batch, num_segments_max * num_queries, hidden)`): pooled segment vectors before quantization.
    quantized (`(batch, num_segments_max * num_queries, hidden)`): their code vectors (straight-through in training).
    codes (`(batch, num_segments_max * num_queries)`): code indices (-1 where there is no segment).
    code_mask (`(batch, num_segments_max * num_queries)`): which code slots hold a segment's code.
    commitment_loss (`()`): `beta * ||z - sg(e)||^2` over the real code slots.
    """

    logits: Optional[torch.FloatTensor] = None
    segment_ids: Optional[torch.LongTensor] = None
    num_segments: Optional[torch.LongTensor] = None
    pre_quantized: Optional[torch.FloatTensor] = None
    quantized: Optional[torch.FloatTensor] = None
    codes: Optional[torch.LongTensor] = None
    code_mask: Optional[torch.BoolTensor] = None
    commitment_loss: Optional[torch.FloatTensor] = None


@dataclass
class AbstractinatorOutput(ModelOutput):
    r"""
    loss (`()`, *optional*): `reconstruction_loss + commitment_loss + aux_lm_loss_weight * aux_lm_loss +
        code_lm_loss_weight * code_lm_loss`; when `labels` or `return_loss`.
    reconstruction_loss (`()`): mean over levels of the expanders' cross-entropy (symbols and end-of-segment marks).
    aux_lm_loss (`()`): mean over levels of the entropy models' next-symbol cross-entropy.
    commitment_loss (`()`): sum over levels of the quantizers' commitment losses.
    code_lm_loss (`()`, *optional*): the code LM's cross-entropy on the top codes (with BOS / EOS).
    codes (`tuple` of `(batch, num_codes)`): every level's codes (-1 where there is no segment).
    code_masks (`tuple` of `(batch, num_codes)`): which of them are real.
    expander_logits (`tuple` of `(batch, target_len, vocab + 1)`): every level's expander logits.
    expander_labels (`tuple` of `(batch, target_len)`): their targets (-100 where there is none).
    bytes_per_code (`()`): real level-0 symbols per top code over the batch.
    entropy_logits (`tuple` of `(batch, seq_len, vocab)`): every level's entropy-model (language-model branch)
        next-symbol logits over that level's input.
    code_lm_logits (`(batch, num_codes + 2, code_vocab)`, *optional*): the code LM's logits over [BOS] + top codes +
        [EOS] (when the model has a code LM).
    """

    loss: Optional[torch.FloatTensor] = None
    reconstruction_loss: Optional[torch.FloatTensor] = None
    aux_lm_loss: Optional[torch.FloatTensor] = None
    commitment_loss: Optional[torch.FloatTensor] = None
    code_lm_loss: Optional[torch.FloatTensor] = None
    codes: Optional[tuple] = None
    code_masks: Optional[tuple] = None
    expander_logits: Optional[tuple] = None
    expander_labels: Optional[tuple] = None
    bytes_per_code: Optional[torch.FloatTensor] = None
    entropy_logits: Optional[tuple] = None
    code_lm_logits: Optional[torch.FloatTensor] = None


def _additive(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean `(batch, q, k)` -> additive `(batch, 1, q, k)` mask (0 where allowed), read by eager and sdpa alike.
    A row with nothing allowed attends uniformly (finite, never NaN); its output is ignored by the caller."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)[:, None]


def _sliding_causal(valid: torch.Tensor, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Causal attention within `window` positions, over real keys only."""
    length = valid.shape[1]
    pos = torch.arange(length, device=valid.device)
    distance = pos[:, None] - pos[None, :]
    allowed = (distance >= 0) & (distance < window)
    return _additive(allowed[None] & valid[:, None, :], dtype)


def _level_backbone(config: AbstractinatorConfig, level: dict) -> Qwen2Config:
    backbone = Qwen2Config(
        hidden_size=level["hidden_size"],
        intermediate_size=level["intermediate_size"],
        # layer indices of every stack of the level are distinct (they only name KV-cache slots)
        num_hidden_layers=sum(level[k] for k in ("num_shared_layers", "num_lm_layers", "num_compression_layers",
                                                 "expander_num_encoder_layers", "expander_num_decoder_layers")),
        num_attention_heads=level["num_attention_heads"],
        num_key_value_heads=level["num_attention_heads"],
        max_position_embeddings=config.max_position_embeddings,
        rope_theta=config.rope_theta,
        rms_norm_eps=config.rms_norm_eps,
    )
    backbone._attn_implementation = config._attn_implementation
    return backbone


def entropy_segments(entropy: torch.Tensor, valid: torch.Tensor, delta: float, threshold: Optional[float],
                     max_length: Optional[int]) -> torch.Tensor:
    """Segment ids `(batch, seq_len)` from next-symbol entropies (the original Abstractinator's rule): position `i > 0`
    starts a segment when `entropy[i] > entropy[i - 1] + delta` or `entropy[i] > threshold`; position 0 always does;
    with `max_length`, a segment that reached it is cut. Padding positions get -1."""
    starts = torch.zeros_like(valid)
    starts[:, 0] = True
    if entropy.shape[1] > 1:
        rise = entropy[:, 1:] > entropy[:, :-1] + delta
        if threshold is not None:
            rise |= entropy[:, 1:] > threshold
        starts[:, 1:] = rise
    starts &= valid
    if max_length is not None:
        run = torch.zeros(starts.shape[0], dtype=torch.long, device=starts.device)
        columns = []
        for i in range(starts.shape[1]):  # a sequential rule: the cut depends on the previous cuts
            cut = starts[:, i] | (run >= max_length)
            run = torch.where(cut, torch.ones_like(run), run + 1)
            columns.append(cut)
        starts = torch.stack(columns, dim=1) & valid
    segment_ids = starts.long().cumsum(1) - 1
    return segment_ids.masked_fill(~valid, -1)


class AbstractinatorVectorQuantizer(nn.Module):
    """Vector quantizer over `(N, D)` vectors whose codebook is learned by exponential moving averages (VQ-VAE-2,
    Laplace-smoothed cluster sizes) with dead-code restarts; the same rule as latentheat's `VQTokenizerQuantizer`,
    written for flat vectors so that this file stays self-contained. Under `torch.distributed` the per-step statistics
    are all-reduced and restarts broadcast from rank 0, so every rank holds the same codebook."""

    def __init__(self, codebook_size: int, dim: int, beta: float, decay: float, dead_code_threshold: float,
                 epsilon: float = 1e-5):
        super().__init__()
        self.codebook_size, self.beta, self.decay = codebook_size, beta, decay
        self.dead_code_threshold, self.epsilon = dead_code_threshold, epsilon
        self.register_buffer("codebook", torch.empty(codebook_size, dim))
        self.register_buffer("ema_cluster_size", torch.empty(codebook_size))
        self.register_buffer("ema_embed_sum", torch.empty(codebook_size, dim))

    def nearest_codes(self, flat: torch.Tensor) -> torch.LongTensor:
        with torch.autocast(device_type=flat.device.type, enabled=False):  # bf16 distances pick the wrong code
            codebook, flat = self.codebook.float(), flat.float()
            distances = flat.pow(2).sum(1, keepdim=True) - 2 * flat @ codebook.t() + codebook.pow(2).sum(1)[None, :]
            return distances.argmin(dim=1)

    def lookup(self, codes: torch.LongTensor) -> torch.FloatTensor:
        return F.embedding(codes, self.codebook)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, codes: torch.LongTensor) -> None:
        flat = flat.float()
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        embed_sum = torch.zeros(self.codebook_size, flat.shape[1], device=flat.device).index_add_(0, codes, flat)
        world_size = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world_size > 1:
            dist.all_reduce(counts)
            dist.all_reduce(embed_sum)
            counts /= world_size
            embed_sum /= world_size
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(embed_sum, alpha=1 - self.decay)
        total = self.ema_cluster_size.sum()
        smoothed = (self.ema_cluster_size + self.epsilon) / (total + self.codebook_size * self.epsilon) * total
        self.codebook.copy_(self.ema_embed_sum / smoothed[:, None])
        if self.dead_code_threshold > 0:
            dead = self.ema_cluster_size < self.dead_code_threshold
            num_dead = int(dead.sum())
            if num_dead:
                restart = flat[torch.randint(0, flat.shape[0], (num_dead,), device=flat.device)]
                if world_size > 1:
                    dist.broadcast(restart, src=0)
                self.codebook[dead] = restart
                self.ema_cluster_size[dead] = self.dead_code_threshold
                self.ema_embed_sum[dead] = restart * self.dead_code_threshold

    def forward(self, z: torch.Tensor, mask: torch.Tensor):
        """z `(batch, n, D)`, mask `(batch, n)` -> quantized `(batch, n, D)` (straight-through), codes `(batch, n)`
        (-1 outside the mask), commitment loss over the masked vectors."""
        flat = z[mask]
        codes = self.nearest_codes(flat) if flat.numel() else torch.zeros(0, dtype=torch.long, device=z.device)
        vectors = self.lookup(codes).to(z.dtype)
        commitment = self.beta * F.mse_loss(flat, vectors.detach()) if flat.numel() else z.sum() * 0.0
        if self.training and flat.numel():
            self._ema_update(flat.detach(), codes)
        quantized = torch.zeros_like(z)
        quantized[mask] = flat + (vectors - flat).detach()  # straight-through estimator
        all_codes = torch.full(mask.shape, -1, dtype=torch.long, device=z.device)
        all_codes[mask] = codes
        return quantized, all_codes, commitment


class AbstractinatorLearnedQueryPooling(nn.Module):
    """Multi-head attention from `num_queries` learned queries per segment to the positions of that segment."""

    def __init__(self, hidden: int, heads: int, num_queries: int):
        super().__init__()
        self.heads, self.num_queries = heads, num_queries
        self.queries = nn.Parameter(torch.empty(num_queries, hidden))
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def forward(self, hidden_states: torch.Tensor, segment_ids: torch.Tensor, num_slots: int):
        batch, length, dim = hidden_states.shape
        slots = num_slots * self.num_queries
        slot_segment = torch.arange(slots, device=hidden_states.device) // self.num_queries
        allowed = slot_segment[None, :, None] == segment_ids[:, None, :]  # (batch, slots, length)
        allowed[:, :, 0] |= ~allowed.any(-1)  # an empty slot reads position 0; its output is dropped
        q = self.q_proj(self.queries).repeat(num_slots, 1).expand(batch, -1, -1)
        head_dim = dim // self.heads
        q = q.reshape(batch, slots, self.heads, head_dim).transpose(1, 2)
        k = self.k_proj(hidden_states).reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(hidden_states).reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.o_proj(out.transpose(1, 2).reshape(batch, slots, dim))


class AbstractinatorByteSegmentCompressor(nn.Module):
    """One level's compressor: embedding -> shared sliding-window layers -> (a) language-model layers and a head
    whose entropies segment the sequence, (b) compression layers pooled per segment and vector-quantized."""

    def __init__(self, config: AbstractinatorConfig, level: int):
        super().__init__()
        settings = config.compressor_level_configs[level]
        self.settings = settings
        backbone = _level_backbone(config, settings)
        hidden, vocab = settings["hidden_size"], config.level_vocab_size(level)
        self.embed_tokens = nn.Embedding(vocab, hidden)
        count = 0

        def stack(n):
            nonlocal count
            layers = nn.ModuleList([Qwen2DecoderLayer(backbone, count + i) for i in range(n)])
            count += n
            return layers

        self.shared_layers = stack(settings["num_shared_layers"])
        self.lm_layers = stack(settings["num_lm_layers"])
        self.lm_norm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, vocab, bias=False)
        self.compression_layers = stack(settings["num_compression_layers"])
        self.compression_norm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.pooler = AbstractinatorLearnedQueryPooling(hidden, settings["num_attention_heads"], settings["num_queries"])
        self.quantizer = AbstractinatorVectorQuantizer(settings["codebook_size"], hidden, settings["commitment_beta"],
                                                       settings["ema_decay"], settings["dead_code_threshold"])
        self.rotary_emb = Qwen2RotaryEmbedding(config=backbone)

    def forward(self, input_ids: torch.LongTensor, valid: torch.BoolTensor) -> AbstractinatorCompressorOutput:
        h = self.embed_tokens(input_ids)
        mask = _sliding_causal(valid, self.settings["sliding_window"], h.dtype)
        pe = self.rotary_emb(h, torch.arange(h.shape[1], device=h.device)[None])
        for layer in self.shared_layers:
            h = layer(h, attention_mask=mask, position_embeddings=pe)
        lm = h
        for layer in self.lm_layers:
            lm = layer(lm, attention_mask=mask, position_embeddings=pe)
        logits = self.lm_head(self.lm_norm(lm))
        compressed = h
        for layer in self.compression_layers:
            compressed = layer(compressed, attention_mask=mask, position_embeddings=pe)
        compressed = self.compression_norm(compressed)
        with torch.no_grad():  # segmentation is a rule on the entropy model, not learned through
            logp = F.log_softmax(logits.float(), dim=-1)
            entropy = -(logp.exp() * logp).sum(-1)
            segment_ids = entropy_segments(entropy, valid, self.settings["entropy_delta"],
                                           self.settings["entropy_abs_threshold"], self.settings["max_segment_length"])
        num_segments = segment_ids.max(dim=1).values + 1
        num_slots = max(int(num_segments.max()), 1)
        pooled = self.pooler(compressed, segment_ids, num_slots)
        slot_segment = torch.arange(pooled.shape[1], device=pooled.device) // self.settings["num_queries"]
        code_mask = slot_segment[None] < num_segments[:, None]
        quantized, codes, commitment = self.quantizer(pooled, code_mask)
        return AbstractinatorCompressorOutput(logits=logits, segment_ids=segment_ids, num_segments=num_segments,
                                              pre_quantized=pooled, quantized=quantized, codes=codes,
                                              code_mask=code_mask, commitment_loss=commitment)


class AbstractinatorCrossAttention(nn.Module):
    """Cross-attention from the expander's decoder to the encoded codes, with rotary positions over segment indices
    (query: the segment it writes; key: the code's segment), so relative position 0 is the segment's own code."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(hidden, hidden, bias=False)
        self.k_proj = nn.Linear(hidden, hidden, bias=False)
        self.v_proj = nn.Linear(hidden, hidden, bias=False)
        self.o_proj = nn.Linear(hidden, hidden, bias=False)

    def memory_kv(self, memory, key_rotary):
        """Keys (rotated to their segments) and values of the codes `(batch, heads, num_codes, head_dim)`: the same at
        every decoding step, so generation computes them once."""
        batch, length, dim = memory.shape
        head_dim = dim // self.heads
        k = self.k_proj(memory).reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        v = self.v_proj(memory).reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        kc, ks = key_rotary
        return k * kc[:, None] + rotate_half(k) * ks[:, None], v

    def forward(self, hidden_states, memory, query_rotary, key_rotary, attention_mask, memory_kv=None):
        batch, length, dim = hidden_states.shape
        head_dim = dim // self.heads
        q = self.q_proj(hidden_states).reshape(batch, length, self.heads, head_dim).transpose(1, 2)
        k, v = memory_kv if memory_kv is not None else self.memory_kv(memory, key_rotary)
        qc, qs = query_rotary
        q = q * qc[:, None] + rotate_half(q) * qs[:, None]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask)
        return self.o_proj(out.transpose(1, 2).reshape(batch, length, dim))


class AbstractinatorDecoderLayer(nn.Module):
    """Qwen2 self-attention block (causal) + cross-attention to the codes + Qwen2 MLP, pre-norm residuals."""

    def __init__(self, backbone: Qwen2Config, layer_idx: int):
        super().__init__()
        self.self_block = Qwen2DecoderLayer(backbone, layer_idx)  # attention + MLP, the first half of the layer
        self.cross_norm = Qwen2RMSNorm(backbone.hidden_size, eps=backbone.rms_norm_eps)
        self.cross_attn = AbstractinatorCrossAttention(backbone.hidden_size, backbone.num_attention_heads)
        self.mlp_norm = Qwen2RMSNorm(backbone.hidden_size, eps=backbone.rms_norm_eps)
        self.mlp = Qwen2MLP(backbone)

    def forward(self, hidden_states, self_mask, position_embeddings, memory, query_rotary, key_rotary, cross_mask,
                past_key_values=None, memory_kv=None):
        """`past_key_values` (a transformers `Cache`) holds the self-attention keys and values of earlier positions
        (incremental decoding); `memory_kv` the cross-attention's precomputed code keys and values."""
        hidden_states = self.self_block(hidden_states, attention_mask=self_mask, position_embeddings=position_embeddings,
                                        past_key_values=past_key_values)
        hidden_states = hidden_states + self.cross_attn(self.cross_norm(hidden_states), memory, query_rotary,
                                                        key_rotary, cross_mask, memory_kv=memory_kv)
        return hidden_states + self.mlp(self.mlp_norm(hidden_states))


def expander_targets(input_ids: torch.LongTensor, segment_ids: torch.LongTensor, end_of_segment: int):
    """The expander's targets: every segment's symbols followed by `end_of_segment`, rows padded with -100, and the
    segment each target belongs to (padding: the row's last segment)."""
    batch, length = input_ids.shape
    valid = segment_ids >= 0
    num_segments = segment_ids.max(dim=1).values + 1
    total = length + int(num_segments.max())
    labels = torch.full((batch, total), -100, dtype=torch.long, device=input_ids.device)
    target_segments = torch.zeros((batch, total), dtype=torch.long, device=input_ids.device)
    pos = torch.arange(length, device=input_ids.device)[None] + segment_ids.clamp(min=0)  # earlier end marks shift
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, length)
    labels[rows[valid], pos[valid]] = input_ids[valid]
    target_segments[rows[valid], pos[valid]] = segment_ids[valid]
    last = valid & torch.cat([segment_ids[:, 1:] != segment_ids[:, :-1], torch.ones_like(valid[:, :1])], dim=1)
    labels[rows[last], pos[last] + 1] = end_of_segment
    target_segments[rows[last], pos[last] + 1] = segment_ids[last]
    filled = labels != -100
    # padding reads the row's last segment (anything in range; its loss is ignored)
    target_segments = torch.where(filled, target_segments, (num_segments - 1).clamp(min=0)[:, None])
    return labels, target_segments


class AbstractinatorCodeExpander(nn.Module):
    """One level's expander: code vectors -> the level's input symbols, segment by segment (seq2seq)."""

    def __init__(self, config: AbstractinatorConfig, level: int):
        super().__init__()
        settings = config.compressor_level_configs[level]
        backbone = _level_backbone(config, settings)
        hidden, vocab = settings["hidden_size"], config.level_vocab_size(level)
        self.num_queries = settings["num_queries"]
        self.end_of_segment, self.start = vocab, vocab + 1
        self.output_size = vocab + 1
        self.code_proj = nn.Linear(hidden, hidden, bias=False)
        self.encoder_layers = nn.ModuleList([Qwen2DecoderLayer(backbone, i)
                                             for i in range(settings["expander_num_encoder_layers"])])
        for layer in self.encoder_layers:
            layer.self_attn.is_causal = False
        self.encoder_norm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.embed_tokens = nn.Embedding(vocab + 2, hidden)  # symbols, end of segment, start
        self.decoder_layers = nn.ModuleList([AbstractinatorDecoderLayer(backbone, i)
                                             for i in range(settings["expander_num_decoder_layers"])])
        self.decoder_norm = Qwen2RMSNorm(hidden, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(hidden, vocab + 1, bias=False)
        self.rotary_emb = Qwen2RotaryEmbedding(config=backbone)

    def encode(self, code_vectors: torch.Tensor, code_mask: torch.BoolTensor):
        memory = self.code_proj(code_vectors)
        allowed = code_mask[:, None, :].expand(-1, code_mask.shape[1], -1)
        mask = _additive(allowed, memory.dtype)
        pe = self.rotary_emb(memory, torch.arange(memory.shape[1], device=memory.device)[None])
        for layer in self.encoder_layers:
            memory = layer(memory, attention_mask=mask, position_embeddings=pe)
        return self.encoder_norm(memory)

    def decode(self, memory, code_mask, decoder_input_ids, target_segments):
        """Logits `(batch, length, vocab + 1)` of the next symbol at every decoder position."""
        h = self.embed_tokens(decoder_input_ids)
        length = h.shape[1]
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()[None]
        self_mask = _additive(causal, h.dtype)
        pe = self.rotary_emb(h, torch.arange(length, device=h.device)[None])
        allowed = self.cross_allowed(code_mask, target_segments)
        query_rotary = self.rotary_emb(h, target_segments)
        key_rotary = self.code_key_rotary(memory)
        for layer in self.decoder_layers:
            h = layer(h, self_mask, pe, memory, query_rotary, key_rotary, allowed[:, None])
        return self.lm_head(self.decoder_norm(h))

    def code_segments(self, num_codes: int, device) -> torch.LongTensor:
        """The segment of every code slot `(num_codes,)`: `num_queries` slots per segment."""
        return torch.arange(num_codes, device=device) // self.num_queries

    def code_key_rotary(self, memory):
        """Rotary cos / sin of the code keys, at their segment indices."""
        segments = self.code_segments(memory.shape[1], memory.device)[None]
        return self.rotary_emb(memory, segments.expand(memory.shape[0], -1))

    def cross_allowed(self, code_mask, segments):
        """Segment-causal cross-attention mask `(batch, length, num_codes)` for decoder positions writing `segments`
        `(batch, length)`: a position reads the codes of its own segment and the ones before (at least slot 0)."""
        code_segments = self.code_segments(code_mask.shape[1], code_mask.device)
        allowed = (code_segments[None, None, :] <= segments[:, :, None]) & code_mask[:, None, :]
        allowed[:, :, 0] |= ~allowed.any(-1)
        return allowed

    def decode_step(self, memory_kv, code_mask, tokens, position: int, segments, cache):
        """Logits `(batch, vocab + 1)` of the symbol after `tokens` `(batch,)`, the decoder input at `position`, which
        writes segment `segments` `(batch,)`: `decode`'s last position, with the earlier positions' self-attention
        keys and values in `cache` (a `DynamicCache` this call extends) and the codes' in `memory_kv` (per layer)."""
        h = self.embed_tokens(tokens[:, None])
        pe = self.rotary_emb(h, torch.full((1, 1), position, dtype=torch.long, device=h.device))
        allowed = self.cross_allowed(code_mask, segments[:, None])
        query_rotary = self.rotary_emb(h, segments[:, None])
        for layer, kv in zip(self.decoder_layers, memory_kv):
            h = layer(h, None, pe, None, query_rotary, None, allowed[:, None], past_key_values=cache, memory_kv=kv)
        return self.lm_head(self.decoder_norm(h))[:, -1]

    def forward(self, code_vectors, code_mask, labels, target_segments):
        memory = self.encode(code_vectors, code_mask)
        decoder_input = torch.cat([torch.full_like(labels[:, :1], self.start), labels[:, :-1]], dim=1)
        decoder_input = decoder_input.masked_fill(decoder_input < 0, self.end_of_segment)
        return self.decode(memory, code_mask, decoder_input, target_segments)

    @torch.no_grad()
    def generate(self, code_vectors, code_mask, max_length: int, allowed_symbols: Optional[torch.Tensor] = None,
                 do_sample: bool = False, temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                 count_segments: int = 0, use_cache: bool = True):
        """Symbols of every row, segment by segment, until a row has ended as many segments as it has, or
        `max_length`. Returns a list of 1-D tensors (end-of-segment marks removed) and, per row, how many of those
        symbols belong to the first `count_segments` segments. With `use_cache` (the default) each step runs the
        decoder on the new symbol alone, with a transformers `DynamicCache` for the self-attention and the codes'
        cross-attention keys computed once; without it, every step re-runs `decode` over the whole prefix (the same
        logits up to rounding)."""
        batch = code_vectors.shape[0]
        memory = self.encode(code_vectors, code_mask)
        wanted = code_mask.sum(1) // self.num_queries
        cache = memory_kv = None
        if use_cache:
            cache = DynamicCache()
            key_rotary = self.code_key_rotary(memory)
            memory_kv = [layer.cross_attn.memory_kv(memory, key_rotary) for layer in self.decoder_layers]
        inputs = torch.full((batch, 1), self.start, dtype=torch.long, device=memory.device)
        ended = torch.zeros(batch, dtype=torch.long, device=memory.device)
        written = [[] for _ in range(batch)]
        counted = [0] * batch
        for _ in range(max_length):
            done = ended >= wanted
            if bool(done.all()):
                break
            if use_cache:
                segment = torch.minimum((inputs[:, 1:] == self.end_of_segment).sum(1), (wanted - 1).clamp(min=0))
                logits = self.decode_step(memory_kv, code_mask, inputs[:, -1], inputs.shape[1] - 1, segment, cache).float()
            else:
                segments = (inputs[:, 1:] == self.end_of_segment).long().cumsum(1)
                segments = torch.cat([torch.zeros_like(inputs[:, :1]), segments], dim=1)
                segments = torch.minimum(segments, (wanted - 1).clamp(min=0)[:, None])
                logits = self.decode(memory, code_mask, inputs, segments)[:, -1].float()
            if allowed_symbols is not None:
                logits = logits.masked_fill(~allowed_symbols, float("-inf"))
            if do_sample:
                probs = F.softmax(logits / temperature, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
            else:
                nxt = logits.argmax(-1)
            for b in range(batch):
                if not bool(done[b]) and int(nxt[b]) != self.end_of_segment:
                    written[b].append(int(nxt[b]))
                    counted[b] += int(ended[b]) < count_segments
            ended = ended + ((nxt == self.end_of_segment) & ~done).long()
            inputs = torch.cat([inputs, nxt[:, None]], dim=1)
        return [torch.tensor(w, dtype=torch.long, device=memory.device) for w in written], counted


class AbstractinatorPreTrainedModel(PreTrainedModel):
    config_class = AbstractinatorConfig
    base_model_prefix = "abstractinator"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["Qwen2DecoderLayer", "AbstractinatorDecoderLayer", "LlamaDecoderLayer"]
    _supports_sdpa = True

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModel"):
        """Also registers the config class, so `AutoModel.from_pretrained(path, trust_remote_code=True)` works
        without latentheat installed."""
        cls.config_class.register_for_auto_class("AutoConfig")
        super().register_for_auto_class(auto_class)

    def _init_weights(self, module):
        std = self.config.initializer_range
        if isinstance(module, (nn.Linear, nn.Embedding)):
            init.normal_(module.weight, mean=0.0, std=std)
            if isinstance(module, nn.Linear) and module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, Qwen2RMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, AbstractinatorLearnedQueryPooling):
            init.normal_(module.queries, mean=0.0, std=std)
        elif isinstance(module, AbstractinatorVectorQuantizer):
            init.normal_(module.codebook, mean=0.0, std=1.0)
            init.ones_(module.ema_cluster_size)
            init.copy_(module.ema_embed_sum, module.codebook)
        elif isinstance(module, Qwen2RotaryEmbedding):
            inv_freq, _ = module.compute_default_rope_parameters(module.config)
            init.copy_(module.inv_freq, inv_freq)
            init.copy_(module.original_inv_freq, inv_freq)


class AbstractinatorModel(AbstractinatorPreTrainedModel):
    r"""
    Example:

    ```python
    >>> config = AbstractinatorConfig(
    ...     compressor_level_configs=[{"hidden_size": 32, "num_attention_heads": 2, "sliding_window": 16,
    ...         "num_lm_layers": 1, "num_compression_layers": 1, "intermediate_size": 64, "codebook_size": 64,
    ...         "expander_num_encoder_layers": 1, "expander_num_decoder_layers": 1}],
    ...     code_lm_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
    ...         "num_key_value_heads": 2, "intermediate_size": 64})
    >>> model = AbstractinatorModel(config)
    >>> ids = torch.tensor([list(b"To be, or not to be")])
    >>> out = model(ids, return_loss=True)
    >>> out.codes[-1].shape[0], out.loss.ndim
    (1, 0)
    ```
    """

    def __init__(self, config: AbstractinatorConfig):
        super().__init__(config)
        self.compressors = nn.ModuleList([AbstractinatorByteSegmentCompressor(config, level)
                                          for level in range(config.num_levels)])
        self.expanders = nn.ModuleList([AbstractinatorCodeExpander(config, level)
                                        for level in range(config.num_levels)])
        if config.use_code_lm:
            config.code_lm_config._attn_implementation = config._attn_implementation
            self.code_lm = LlamaForCausalLM(config.code_lm_config)
        else:
            self.code_lm = None
        self.post_init()

    # ---- input checks -------------------------------------------------------------------------------------------
    def _check_input(self, input_ids, attention_mask):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (batch, seq_len) tensor with seq_len >= 1; got {shape}")
        if input_ids.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"input_ids must hold integer symbol ids, got dtype {input_ids.dtype}")
        if attention_mask is None:
            valid = torch.ones_like(input_ids, dtype=torch.bool)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                                 f"{tuple(input_ids.shape)}")
            valid = attention_mask.bool()
            if not bool(valid[:, 0].all()):
                raise ValueError("attention_mask must mark the first position of every row as real (right padding)")
        real = input_ids[valid]
        low, high = int(real.min()), int(real.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"input_ids hold ids outside [0, vocab_size={self.config.vocab_size}): min {low}, "
                             f"max {high}")
        return input_ids.masked_fill(~valid, self.config.pad_token_id), valid

    def _max_length(self, length: int):
        if length > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {length} exceeds max_position_embeddings="
                             f"{self.config.max_position_embeddings}")

    # ---- the hierarchy ------------------------------------------------------------------------------------------
    def compress(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None):
        """Every level's [`AbstractinatorCompressorOutput`], bottom first, and the level inputs (ids, valid)."""
        ids, valid = self._check_input(input_ids, attention_mask)
        self._max_length(ids.shape[1])
        outputs, inputs = [], []
        for compressor in self.compressors:
            inputs.append((ids, valid))
            out = compressor(ids, valid)
            outputs.append(out)
            ids, valid = out.codes.clamp(min=0), out.code_mask
        return outputs, inputs

    def encode(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None):
        """Top-level codes: a list with one 1-D tensor per row."""
        outputs, _ = self.compress(input_ids, attention_mask)
        top = outputs[-1]
        return [row[mask] for row, mask in zip(top.codes, top.code_mask)]

    def code_lm_inputs(self, codes: torch.LongTensor, code_mask: torch.BoolTensor):
        """`[BOS] + codes + [EOS]` per row, padded with EOS; returns (input_ids, attention_mask, labels)."""
        cfg = self.config.code_lm_config
        batch = codes.shape[0]
        lengths = code_mask.sum(1)
        width = int(lengths.max()) + 2
        ids = torch.full((batch, width), cfg.eos_token_id, dtype=torch.long, device=codes.device)
        ids[:, 0] = cfg.bos_token_id
        pos = code_mask.long().cumsum(1)  # 1-based position of each real code among the row's codes
        rows = torch.arange(batch, device=codes.device)[:, None].expand_as(codes)
        ids[rows[code_mask], pos[code_mask]] = codes[code_mask]
        mask = torch.arange(width, device=codes.device)[None] < (lengths + 2)[:, None]
        labels = ids.masked_fill(~mask, -100)
        labels[:, 0] = -100
        return ids, mask.long(), labels

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: Optional[torch.Tensor] = None,
        labels: Optional[torch.LongTensor] = None,
        return_loss: Optional[bool] = None,
        return_dict: Optional[bool] = None,
        code_lm_only: bool = False,
        **kwargs,
    ):
        r"""
        input_ids (`torch.LongTensor` of shape `(batch, seq_len)`): bytes (0-255) and specials, right-padded.
        attention_mask (`torch.Tensor` of shape `(batch, seq_len)`, *optional*): 1 for real positions.
        labels (`torch.LongTensor`, *optional*): accepted for the trainers' convention (the targets are the input
            itself); giving them, or `return_loss=True`, computes the loss.
        code_lm_only (`bool`, *optional*, defaults to `False`):
            Train the code LM alone on the frozen autoencoder's codes (the original's separate top-LM stage): the
            compressors run without gradients and in eval mode (their codebooks do not move), the expanders do not
            run, and `loss` is the code LM's loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if code_lm_only:
            output = self._code_lm_forward(input_ids, attention_mask)
            return output if return_dict else output.to_tuple()
        compressed, inputs = self.compress(input_ids, attention_mask)
        recon, aux, expander_logits, expander_labels = [], [], [], []
        for level, (out, (ids, valid)) in enumerate(zip(compressed, inputs)):
            vocab = self.config.level_vocab_size(level)
            aux_labels = ids[:, 1:].masked_fill(~valid[:, 1:], -100)
            if bool((aux_labels != -100).any()):
                aux.append(F.cross_entropy(out.logits[:, :-1].float().reshape(-1, vocab), aux_labels.reshape(-1),
                                           ignore_index=-100))
            expander = self.expanders[level]
            targets, target_segments = expander_targets(ids, out.segment_ids, expander.end_of_segment)
            logits = expander(out.quantized, out.code_mask, targets, target_segments)
            recon.append(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1),
                                         ignore_index=-100))
            expander_logits.append(logits)
            expander_labels.append(targets)
        top = compressed[-1]
        code_lm_loss = code_lm_logits = None
        if self.code_lm is not None:
            lm_ids, lm_mask, lm_labels = self.code_lm_inputs(top.codes.detach(), top.code_mask)
            code_lm_out = self.code_lm(input_ids=lm_ids, attention_mask=lm_mask, labels=lm_labels)
            code_lm_loss, code_lm_logits = code_lm_out.loss, code_lm_out.logits
        reconstruction_loss = torch.stack(recon).mean()
        aux_lm_loss = torch.stack(aux).mean() if aux else reconstruction_loss.new_zeros(())
        commitment_loss = torch.stack([out.commitment_loss for out in compressed]).sum()
        loss = None
        if labels is not None or return_loss:
            loss = reconstruction_loss + commitment_loss + self.config.aux_lm_loss_weight * aux_lm_loss
            if code_lm_loss is not None:
                loss = loss + self.config.code_lm_loss_weight * code_lm_loss
        bytes_per_code = inputs[0][1].sum().float() / top.code_mask.sum().clamp(min=1)
        output = AbstractinatorOutput(
            loss=loss,
            reconstruction_loss=reconstruction_loss,
            aux_lm_loss=aux_lm_loss,
            commitment_loss=commitment_loss,
            code_lm_loss=code_lm_loss,
            codes=tuple(out.codes for out in compressed),
            code_masks=tuple(out.code_mask for out in compressed),
            expander_logits=tuple(expander_logits),
            expander_labels=tuple(expander_labels),
            bytes_per_code=bytes_per_code,
            entropy_logits=tuple(out.logits for out in compressed),
            code_lm_logits=code_lm_logits,
        )
        return output if return_dict else output.to_tuple()

    def _code_lm_forward(self, input_ids, attention_mask) -> AbstractinatorOutput:
        if self.code_lm is None:
            raise ValueError("code_lm_only needs the code language model: this model has use_code_lm=False")
        modes = [c.training for c in self.compressors]
        self.compressors.eval()
        try:
            with torch.no_grad():
                compressed, _ = self.compress(input_ids, attention_mask)
        finally:
            for compressor, mode in zip(self.compressors, modes):
                compressor.train(mode)
        top = compressed[-1]
        lm_ids, lm_mask, lm_labels = self.code_lm_inputs(top.codes, top.code_mask)
        loss = self.code_lm(input_ids=lm_ids, attention_mask=lm_mask, labels=lm_labels).loss
        num_bytes = (input_ids.numel() if attention_mask is None else attention_mask.sum()).__float__()
        return AbstractinatorOutput(
            loss=loss,
            code_lm_loss=loss,
            codes=tuple(out.codes for out in compressed),
            code_masks=tuple(out.code_mask for out in compressed),
            bytes_per_code=torch.tensor(num_bytes / max(int(top.code_mask.sum()), 1)),
        )

    @torch.no_grad()
    def causal_bits(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                    return_outputs: bool = False) -> dict:
        """Per row: `code_bits` (the top codes with BOS / EOS under the code LM), `expander_bits` (every level's symbols
        and end-of-segment marks under its expander given the codes), `bits` (their sum) and `num_bytes`. The sum is
        the length of a two-part code of the row that pays for its codes: never the bytes given codes for free.
        With `return_outputs`, also `outputs`: the one forward pass it came from ([`AbstractinatorOutput`]: codes,
        expander and entropy-model logits), so an evaluation needs no second pass."""
        if self.code_lm is None:
            raise ValueError("causal bits need the code language model: this model has use_code_lm=False")
        out = self.forward(input_ids, attention_mask=attention_mask, return_dict=True)
        ln2 = torch.log(torch.tensor(2.0))
        expander_bits = 0.0
        for logits, labels in zip(out.expander_logits, out.expander_labels):
            nll = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
            expander_bits = expander_bits + nll.sum(1) / ln2
        _, _, lm_labels = self.code_lm_inputs(out.codes[-1], out.code_masks[-1])
        lm_logits = out.code_lm_logits[:, :-1].float()
        code_nll = F.cross_entropy(lm_logits.transpose(1, 2), lm_labels[:, 1:], ignore_index=-100, reduction="none")
        code_bits = code_nll.sum(1) / ln2
        num_bytes = (attention_mask.bool() if attention_mask is not None else torch.ones_like(input_ids, dtype=torch.bool)).sum(1)
        bits = {"code_bits": code_bits, "expander_bits": expander_bits, "bits": code_bits + expander_bits,
                "num_bytes": num_bytes, "num_codes": out.code_masks[-1].sum(1)}
        return {**bits, "outputs": out} if return_outputs else bits

    @torch.no_grad()
    def decode_codes(self, codes: torch.LongTensor, max_length: Optional[int] = None, do_sample: bool = False,
                     temperature: float = 1.0, generator: Optional[torch.Generator] = None,
                     prompt_codes: Optional[int] = None):
        """Top codes `(num_codes,)` of one sequence -> its level-0 symbols (1-D tensor), expanding level by level.
        With `prompt_codes`, also returns how many of the symbols the expanders wrote for the first `prompt_codes`
        codes (a segment holding any of them counts whole), so `symbols[count:]` is what the later codes became."""
        if codes.dim() != 1:
            raise ValueError(f"codes must be 1-D (one sequence); got shape {tuple(codes.shape)}")
        max_length = max_length or self.config.expander_max_length
        counted = prompt_codes or 0
        for level in reversed(range(self.config.num_levels)):
            compressor, expander = self.compressors[level], self.expanders[level]
            size = compressor.quantizer.codebook_size
            if codes.numel() == 0:
                counted = 0
                break
            if int(codes.min()) < 0 or int(codes.max()) >= size:
                raise ValueError(f"level {level} codes outside [0, codebook_size={size}): min {int(codes.min())}, "
                                 f"max {int(codes.max())}")
            vectors = compressor.quantizer.lookup(codes)[None].to(self.dtype)
            mask = torch.ones(1, codes.numel(), dtype=torch.bool, device=codes.device)
            vocab = self.config.level_vocab_size(level)
            allowed = torch.ones(vocab + 1, dtype=torch.bool, device=codes.device)
            if level == 0:  # bytes and end-of-segment only
                allowed[[self.config.bos_token_id, self.config.eos_token_id, self.config.pad_token_id]] = False
            segments = -(-counted // expander.num_queries)
            rows, counts = expander.generate(vectors, mask, max_length, allowed, do_sample, temperature, generator,
                                             count_segments=segments)
            codes, counted = rows[0], counts[0]
        return codes if prompt_codes is None else (codes, counted)

    @torch.no_grad()
    def continue_codes(self, prompt: bytes, max_new_codes: int, do_sample: bool = True, temperature: float = 1.0,
                       top_k: Optional[int] = None, top_p: Optional[float] = None):
        """The prompt's top codes and the code LM's continuation with `generate()` (its sampling processors) until
        EOS or `max_new_codes`: returns (prompt codes, all codes), 1-D. An empty prompt starts from BOS alone."""
        if self.code_lm is None:
            raise ValueError("generation needs the code language model: this model has use_code_lm=False")
        if max_new_codes < 1:
            raise ValueError(f"max_new_codes={max_new_codes} must be >= 1")
        if prompt:
            codes = self.encode(torch.tensor([list(prompt)], dtype=torch.long, device=self.device))[0]
        else:
            codes = torch.zeros(0, dtype=torch.long, device=self.device)
        cfg = self.config.code_lm_config
        lm_input = torch.cat([torch.tensor([cfg.bos_token_id], device=self.device), codes])[None]
        sequences = self.code_lm.generate(
            input_ids=lm_input,
            attention_mask=torch.ones_like(lm_input),
            max_new_tokens=max_new_codes,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_k=top_k if do_sample else None,
            top_p=top_p if do_sample else None,
            eos_token_id=cfg.eos_token_id,
            pad_token_id=cfg.pad_token_id,
            suppress_tokens=[cfg.bos_token_id],
        )[0, 1:]
        end = (sequences == cfg.eos_token_id).nonzero()
        if len(end):
            sequences = sequences[: int(end[0])]
        return codes, sequences

    @torch.no_grad()
    def generate_bytes(
        self,
        prompt,
        max_new_codes: int = 64,
        do_sample: bool = True,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        max_length: Optional[int] = None,
        return_prompt_length: bool = False,
    ):
        """End-to-end generation (the original's `generate_bytes`): the prompt is compressed to top codes, the code LM
        continues them with `generate()` (its sampling processors) until EOS or `max_new_codes`, and the expanders
        decode the whole code sequence back into bytes, greedily. Returns the bytes: the prompt as the expanders
        rebuild it, then the continuation; with `return_prompt_length`, also how many of them belong to the prompt's
        codes (`out[n:]` is the continuation alone). Seed torch for repeatable samples."""
        if self.code_lm is None:
            raise ValueError("generate_bytes needs the code language model: this model has use_code_lm=False")
        if isinstance(prompt, str):
            prompt = prompt.encode("utf-8")
        if not isinstance(prompt, (bytes, bytearray)) or not prompt:
            raise ValueError(f"prompt must be a non-empty str or bytes; got {prompt!r}")
        prompt_codes, codes = self.continue_codes(bytes(prompt), max_new_codes, do_sample, temperature, top_k, top_p)
        symbols, counted = self.decode_codes(codes, max_length=max_length, generator=generator,
                                             prompt_codes=len(prompt_codes))
        data = bytes(symbols.tolist())
        return (data, counted) if return_prompt_length else data


__all__ = [
    "AbstractinatorByteSegmentCompressor",
    "AbstractinatorCodeExpander",
    "AbstractinatorCompressorOutput",
    "AbstractinatorModel",
    "AbstractinatorOutput",
    "AbstractinatorPreTrainedModel",
    "entropy_segments",
    "expander_targets",
]
