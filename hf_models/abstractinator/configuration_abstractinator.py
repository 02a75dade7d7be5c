"""Configuration of the Abstractinator: a hierarchical autoencoder over UTF-8 bytes with discrete codes per level and an
optional language model over the top level's codes.

Seed sizes (the original `config.py`): one level, byte vocabulary 259 (256 bytes + BOS / EOS / PAD), hidden size 768,
12 heads, sliding window 512, 6 language-model and 6 compression layers, MLP 4 x 768, one learned query per segment,
49,404 codes, commitment weight 1.0, entropy increase 0.2 for a new segment; expander 2 encoder + 4 decoder layers at
the level's width; code language model 768 wide, 16 layers, 12 heads, 2,048 positions; auxiliary byte-LM loss weight
1.0, code-LM loss weight 0.2; sequences of 1,024 bytes.
"""

import copy
import math

from transformers import LlamaConfig, PretrainedConfig

# one compression level of the seed
SEED_LEVEL = {
    "hidden_size": 768,
    "num_attention_heads": 12,
    "sliding_window": 512,
    "num_shared_layers": 0,
    "num_lm_layers": 6,
    "num_compression_layers": 6,
    "intermediate_size": 3072,
    "num_queries": 1,
    "codebook_size": 49404,
    "commitment_beta": 1.0,
    "ema_decay": 0.99,
    "dead_code_threshold": 1.0,
    "entropy_delta": 0.2,
    "entropy_abs_threshold": None,
    "max_segment_length": None,
    "expander_num_encoder_layers": 2,
    "expander_num_decoder_layers": 4,
}

# the seed's CodeSequenceTransformer over the top codes
SEED_CODE_LM = {
    "hidden_size": 768,
    "num_hidden_layers": 16,
    "num_attention_heads": 12,
    "num_key_value_heads": 12,
    "intermediate_size": 3072,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
}

_INT_FIELDS = ("hidden_size", "num_attention_heads", "sliding_window", "intermediate_size", "num_queries",
               "codebook_size", "num_lm_layers", "num_compression_layers", "expander_num_decoder_layers")
_COUNT_FIELDS = ("num_shared_layers", "expander_num_encoder_layers")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _level(index: int, level) -> dict:
    """One level's settings: the seed's, overridden by `level` (a dict), validated."""
    if not isinstance(level, dict):
        raise ValueError(f"compressor_level_configs[{index}]={level!r} is invalid: expected a dict of level settings")
    unknown = sorted(set(level) - set(SEED_LEVEL))
    if unknown:
        raise ValueError(f"compressor_level_configs[{index}] has unknown keys {unknown}; allowed: {sorted(SEED_LEVEL)}")
    values = {**SEED_LEVEL, **level}
    where = f"compressor_level_configs[{index}]"
    for name in _INT_FIELDS:
        if not _is_int(values[name]) or values[name] < 1:
            raise ValueError(f"{where}.{name}={values[name]!r} is invalid: expected an int >= 1")
    for name in _COUNT_FIELDS:
        if not _is_int(values[name]) or values[name] < 0:
            raise ValueError(f"{where}.{name}={values[name]!r} is invalid: expected an int >= 0")
    if values["hidden_size"] % values["num_attention_heads"]:
        raise ValueError(f"{where}.hidden_size={values['hidden_size']} is not divisible by "
                         f"num_attention_heads={values['num_attention_heads']}")
    if not _is_number(values["commitment_beta"]) or values["commitment_beta"] < 0:
        raise ValueError(f"{where}.commitment_beta={values['commitment_beta']!r} is invalid: expected a number >= 0")
    if not _is_number(values["ema_decay"]) or not 0 < values["ema_decay"] < 1:
        raise ValueError(f"{where}.ema_decay={values['ema_decay']!r} is invalid: expected a number in (0, 1)")
    if not _is_number(values["dead_code_threshold"]) or values["dead_code_threshold"] < 0:
        raise ValueError(f"{where}.dead_code_threshold={values['dead_code_threshold']!r} is invalid: expected a "
                         "number >= 0 (0: never reset unused codes)")
    if not _is_number(values["entropy_delta"]) or values["entropy_delta"] < 0:
        raise ValueError(f"{where}.entropy_delta={values['entropy_delta']!r} is invalid: expected a number >= 0")
    threshold = values["entropy_abs_threshold"]
    if threshold is not None and (not _is_number(threshold) or threshold < 0):
        raise ValueError(f"{where}.entropy_abs_threshold={threshold!r} is invalid: expected a number >= 0 or null")
    longest = values["max_segment_length"]
    if longest is not None and (not _is_int(longest) or longest < 1):
        raise ValueError(f"{where}.max_segment_length={longest!r} is invalid: expected an int >= 1 or null (no limit)")
    return values


class AbstractinatorConfig(PretrainedConfig):
    r"""
    Configuration for [`AbstractinatorModel`].

    Level `l` reads a sequence over a vocabulary (bytes at level 0, the codes of level `l - 1` above it), and its
    `ByteSegmentCompressor` runs a sliding-window causal transformer with two branches: a language-model branch whose
    next-symbol entropy cuts the sequence into segments (a new segment where the entropy rises by more than
    `entropy_delta` over the previous position's, or exceeds `entropy_abs_threshold`), and a compression branch whose
    states are pooled per segment by `num_queries` learned queries and vector-quantized (EMA codebook of
    `codebook_size`). Its `CodeExpander` (a bidirectional encoder over the level's code vectors and a causal decoder
    with segment-causal cross-attention) rebuilds the level's input sequence, one segment after another, each ended by
    an end-of-segment symbol. A `CodeSequenceTransformer` (transformers' `LlamaForCausalLM`) models the top codes.

    Args:
        vocab_size (`int`, *optional*, defaults to 259):
            Level-0 vocabulary: 256 byte values and BOS / EOS / PAD.
        bos_token_id, eos_token_id, pad_token_id (`int`, *optional*, defaults to 256, 257, 258):
            The byte level's special ids.
        compressor_level_configs (`list[dict]`, *optional*):
            One dict per level (keys of `SEED_LEVEL`, unset keys take the seed's values); `None`: the seed's one level.
        expander_max_length (`int`, *optional*, defaults to 2048):
            The most symbols an expander writes for one sequence (end-of-segment symbols included) in generation.
        code_lm_config (`LlamaConfig` or `dict`, *optional*):
            The `CodeSequenceTransformer` over the top codes (its vocabulary is set to the top codebook + BOS + EOS);
            `None` gives the seed's 768 / 16 layers / 12 heads. Set `use_code_lm=False` for none.
        use_code_lm (`bool`, *optional*, defaults to `True`):
            Whether the model has a code language model (needed by `generate_bytes` and causal bits per byte).
        aux_lm_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of every level's next-symbol loss (the entropy model).
        code_lm_loss_weight (`float`, *optional*, defaults to 0.2):
            Weight of the code language model's loss on the (detached) top codes.
        max_position_embeddings (`int`, *optional*, defaults to 4096):
            Longest sequence the rotary embeddings of the compressors and expanders are built for.
        rope_theta (`float`, *optional*, defaults to 10000.0), rms_norm_eps (`float`, *optional*, defaults to 1e-6),
        initializer_range (`float`, *optional*, defaults to 0.02):
            Rotary base, RMSNorm epsilon and the initial weights' standard deviation.
    """

    model_type = "abstractinator"
    sub_configs = {"code_lm_config": LlamaConfig}

    def __init__(
        self,
        vocab_size=259,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
        compressor_level_configs=None,
        expander_max_length=2048,
        code_lm_config=None,
        use_code_lm=True,
        aux_lm_loss_weight=1.0,
        code_lm_loss_weight=0.2,
        max_position_embeddings=4096,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        initializer_range=0.02,
        **kwargs,
    ):
        if not _is_int(vocab_size) or vocab_size < 2:
            raise ValueError(f"vocab_size={vocab_size!r} is invalid: expected an int >= 2")
        specials = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        for name, value in specials.items():
            if not _is_int(value) or not 0 <= value < vocab_size:
                raise ValueError(f"{name}={value!r} is invalid: expected an int in [0, vocab_size={vocab_size})")
        if len(set(specials.values())) != 3:
            raise ValueError(f"bos/eos/pad token ids must differ; got {specials}")
        if compressor_level_configs is None:
            compressor_level_configs = [{}]
        if not isinstance(compressor_level_configs, (list, tuple)) or not compressor_level_configs:
            raise ValueError(f"compressor_level_configs={compressor_level_configs!r} is invalid: expected a non-empty "
                             "list of level dicts")
        self.compressor_level_configs = [_level(i, level) for i, level in enumerate(compressor_level_configs)]
        if not _is_int(expander_max_length) or expander_max_length < 1:
            raise ValueError(f"expander_max_length={expander_max_length!r} is invalid: expected an int >= 1")
        if not isinstance(use_code_lm, bool):
            raise ValueError(f"use_code_lm={use_code_lm!r} is invalid: expected true or false")
        for name, value in (("aux_lm_loss_weight", aux_lm_loss_weight), ("code_lm_loss_weight", code_lm_loss_weight)):
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a number >= 0")
        if not _is_int(max_position_embeddings) or max_position_embeddings < 2:
            raise ValueError(f"max_position_embeddings={max_position_embeddings!r} is invalid: expected an int >= 2")
        for name, value in (("rope_theta", rope_theta), ("rms_norm_eps", rms_norm_eps),
                            ("initializer_range", initializer_range)):
            if not _is_number(value) or value <= 0:
                raise ValueError(f"{name}={value!r} is invalid: expected a number > 0")
        self.vocab_size = vocab_size
        self.expander_max_length = expander_max_length
        self.use_code_lm = use_code_lm
        self.aux_lm_loss_weight = float(aux_lm_loss_weight)
        self.code_lm_loss_weight = float(code_lm_loss_weight)
        self.max_position_embeddings = max_position_embeddings
        self.rope_theta = float(rope_theta)
        self.rms_norm_eps = float(rms_norm_eps)
        self.initializer_range = float(initializer_range)
        self.code_lm_config = self._code_lm(code_lm_config)
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id, **kwargs)

    @property
    def num_levels(self) -> int:
        return len(self.compressor_level_configs)

    def level_vocab_size(self, level: int) -> int:
        """Input vocabulary of level `level`: bytes + specials at 0, the previous level's codebook above."""
        return self.vocab_size if level == 0 else self.compressor_level_configs[level - 1]["codebook_size"]

    def _code_lm(self, code_lm_config) -> LlamaConfig:
        if isinstance(code_lm_config, LlamaConfig):
            code_lm_config = copy.deepcopy(code_lm_config)  # one object may serve several configs
        if code_lm_config is None:
            code_lm_config = dict(SEED_CODE_LM)
        if isinstance(code_lm_config, dict):
            values = {**SEED_CODE_LM, **{k: v for k, v in code_lm_config.items() if k != "model_type"}}
            try:
                code_lm_config = LlamaConfig(**values)
            except Exception as err:  # transformers' own validators raise their own error types
                raise ValueError(f"code_lm_config={code_lm_config!r} is invalid: {err}") from None
        if not isinstance(code_lm_config, LlamaConfig):
            raise ValueError(f"code_lm_config={type(code_lm_config).__name__} is invalid: expected a LlamaConfig, a "
                             "dict of its fields, or None (the seed sizes)")
        hidden, heads = code_lm_config.hidden_size, code_lm_config.num_attention_heads
        if hidden % heads:
            raise ValueError(f"code_lm_config.hidden_size={hidden} is not divisible by num_attention_heads={heads}")
        top = self.compressor_level_configs[-1]["codebook_size"]
        # the top codes, then BOS and EOS of a code sequence (EOS doubles as padding)
        code_lm_config.vocab_size = top + 2
        code_lm_config.bos_token_id = top
        code_lm_config.eos_token_id = top + 1
        code_lm_config.pad_token_id = top + 1
        code_lm_config.tie_word_embeddings = False
        return code_lm_config


__all__ = ["AbstractinatorConfig", "SEED_CODE_LM", "SEED_LEVEL"]
