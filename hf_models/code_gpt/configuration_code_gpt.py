"""Configuration of CodeGPT: a Llama decoder over VQ code sequences `[class][BOS] c_1..c_N [EOS]`."""

from transformers import LlamaConfig


INVALID_CODE_POLICIES = ("error", "map")
FRAME_DECODINGS = ("parallel", "autoregressive")


class CodeGPTConfig(LlamaConfig):
    r"""
    Configuration for [`CodeGPTForCausalLM`], a [`LlamaForCausalLM`] whose vocabulary is a VQ codebook followed by
    special and class tokens, assigned automatically after the code vocabulary:

    | ids | meaning |
    |---|---|
    | `0 .. K-1` | codes (`K = codebook_size`) |
    | `K` | `bos_token_id` |
    | `K+1` | `eos_token_id` |
    | `K+2` | `pad_token_id` |
    | `K+3 .. K+3+C-1` | class tokens, `class_token_id(c) = class_token_offset + c` (`C = num_classes`) |
    | `K+3+C` | `null_class_token_id` (classifier-free guidance's unconditional prompt) |
    | `K+3+C+1` | `invalid_code_token_id` (out-of-range codes under `invalid_code_policy="map"`) |

    so `vocab_size = K + C + 5`. A training sequence is `[class][BOS] c_1..c_N [EOS]` (length `N + 3`), or
    `[BOS] c_1..c_N [EOS]` when `num_classes == 0`.

    Args:
        codebook_size (`int`, *optional*, defaults to 256):
            Size `K` of the VQ codebook.
        num_classes (`int`, *optional*, defaults to 10):
            Number `C` of class labels; 0 for an unconditional model.
        num_codes (`int`, *optional*, defaults to 49):
            Codes per image (`h * w` of the VQ grid); the default length of `generate_codes`.
        invalid_code_policy (`str`, *optional*, defaults to `"error"`):
            What the data pipeline does with codes outside `[0, K)`: `"error"` raises, `"map"` replaces them by
            `invalid_code_token_id`.
        class_dropout_prob (`float`, *optional*, defaults to 0.1):
            Fraction of class tokens replaced by the null class token during training (classifier-free guidance).
            Applied by the data collator / trainer, not by the model.
        frame_decoding (`str`, *optional*, defaults to `"parallel"`):
            How next-frame emulation (`next_frame_logits`, `sample_next_frame`) draws a frame's codes from the current
            frame's: `"parallel"`, every code independently in one forward pass over `[BOS] c_t [EOS] c_t`;
            `"autoregressive"`, code by code over `[BOS] c_t [EOS] c_{t+1}` with `generate()` and its KV cache, so
            the codes of a frame are drawn jointly (each sees the codes already drawn). Unused by image generation.
        max_context (`int`, *optional*):
            Longest context `generate_codes` feeds the model (sliding window); defaults to
            `max_position_embeddings`.
        hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, max_position_embeddings:
            Llama sizes; defaults 512 / 2048 / 8 / 8 / 1024 (the seed size). Any other [`LlamaConfig`] argument is
            passed through.

    `vocab_size`, `bos_token_id`, `eos_token_id` and `pad_token_id` are derived; passing them is allowed only with the
    derived value (as `from_pretrained` does).
    """

    model_type = "code_gpt"

    def __init__(
        self,
        codebook_size=256,
        num_classes=10,
        num_codes=49,
        invalid_code_policy="error",
        class_dropout_prob=0.1,
        frame_decoding="parallel",
        max_context=None,
        hidden_size=512,
        intermediate_size=2048,
        num_hidden_layers=8,
        num_attention_heads=8,
        max_position_embeddings=1024,
        **kwargs,
    ):
        if not isinstance(codebook_size, int) or codebook_size < 1:
            raise ValueError(f"codebook_size={codebook_size!r} is invalid: expected an int >= 1")
        if not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes={num_classes!r} is invalid: expected an int >= 0 (0 = unconditional)")
        if not isinstance(num_codes, int) or num_codes < 1:
            raise ValueError(f"num_codes={num_codes!r} is invalid: expected an int >= 1")
        if invalid_code_policy not in INVALID_CODE_POLICIES:
            raise ValueError(
                f"invalid_code_policy={invalid_code_policy!r} is invalid: expected one of {INVALID_CODE_POLICIES}"
            )
        if frame_decoding not in FRAME_DECODINGS:
            raise ValueError(f"frame_decoding={frame_decoding!r} is invalid: expected one of {FRAME_DECODINGS}")
        if not 0.0 <= class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob={class_dropout_prob!r} is invalid: expected 0 <= p < 1")
        if not isinstance(max_position_embeddings, int) or max_position_embeddings < 2:
            raise ValueError(f"max_position_embeddings={max_position_embeddings!r} is invalid: expected an int >= 2")
        if max_context is None:
            max_context = max_position_embeddings
        if not isinstance(max_context, int) or not 2 <= max_context <= max_position_embeddings:
            raise ValueError(
                f"max_context={max_context!r} is invalid: expected an int in [2, max_position_embeddings="
                f"{max_position_embeddings}]"
            )
        if not isinstance(hidden_size, int) or not isinstance(num_attention_heads, int) or num_attention_heads < 1:
            raise ValueError(
                f"hidden_size={hidden_size!r} / num_attention_heads={num_attention_heads!r} are invalid: expected ints"
            )
        if hidden_size % num_attention_heads:
            raise ValueError(
                f"hidden_size={hidden_size} is not divisible by num_attention_heads={num_attention_heads}"
            )

        derived = {
            "vocab_size": codebook_size + num_classes + 5,
            "bos_token_id": codebook_size,
            "eos_token_id": codebook_size + 1,
            "pad_token_id": codebook_size + 2,
        }
        for name, value in derived.items():
            given = kwargs.pop(name, None)
            if given is not None and given != value:
                raise ValueError(
                    f"{name}={given!r} is inconsistent with codebook_size={codebook_size} and "
                    f"num_classes={num_classes}: it is derived as {value} (leave it unset)"
                )
        # derived read-only properties, present in serialised dicts of older saves; recomputed here
        for name in ("class_token_offset", "null_class_token_id", "invalid_code_token_id"):
            kwargs.pop(name, None)

        self.codebook_size = codebook_size
        self.num_classes = num_classes
        self.num_codes = num_codes
        self.invalid_code_policy = invalid_code_policy
        self.class_dropout_prob = float(class_dropout_prob)
        self.frame_decoding = frame_decoding
        self.max_context = max_context
        super().__init__(
            hidden_size=hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            max_position_embeddings=max_position_embeddings,
            **derived,
            **kwargs,
        )

    @property
    def class_token_offset(self) -> int:
        return self.codebook_size + 3

    @property
    def null_class_token_id(self) -> int:
        return self.codebook_size + 3 + self.num_classes

    @property
    def invalid_code_token_id(self) -> int:
        return self.codebook_size + 3 + self.num_classes + 1

    @property
    def prompt_length(self) -> int:
        """Tokens before the first code: 2 (`[class][BOS]`), or 1 (`[BOS]`) for an unconditional model."""
        return 2 if self.num_classes > 0 else 1

    @property
    def sequence_length(self) -> int:
        """Length of a full training sequence, `prompt_length + num_codes + 1`."""
        return self.prompt_length + self.num_codes + 1

    def class_token_id(self, class_label: int) -> int:
        """Token id of class `class_label` in `[0, num_classes)`."""
        if not 0 <= int(class_label) < self.num_classes:
            raise ValueError(f"class_label={class_label!r} is out of range: expected 0 <= c < num_classes={self.num_classes}")
        return self.class_token_offset + int(class_label)


__all__ = ["CodeGPTConfig"]
