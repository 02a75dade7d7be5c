"""CodeGPT: `LlamaForCausalLM` over VQ code sequences, with seeded class-conditional sampling.

Self-contained (torch + transformers + this folder) so `register_for_auto_class` can ship it as remote code.
"""

from typing import Callable, Optional

import torch
# PreTrainedModel is imported so diffusers finds its loading method when this module is a pipeline component
from transformers import LogitsProcessor, LogitsProcessorList, PreTrainedModel  # noqa: F401
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaPreTrainedModel

from .configuration_code_gpt import CodeGPTConfig


class CodeGPTCodeOnlyLogitsProcessor(LogitsProcessor):
    """Sets every logit outside the code vocabulary `[0, codebook_size)` to -inf, so only codes are produced."""

    def __init__(self, codebook_size: int):
        self.codebook_size = codebook_size

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.codebook_size :] = -float("inf")
        return scores


class _ProgressLogitsProcessor(LogitsProcessor):
    """Calls `callback(codes drawn so far)` once per generated position; leaves the scores alone."""

    def __init__(self, callback: Callable[[int], None], done: int = 0):
        self.callback, self.count = callback, done

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.count += 1
        self.callback(self.count)
        return scores


def multinomial_draw(probs: torch.Tensor, generator=None) -> torch.LongTensor:
    """One draw per row `(B, 1)` from `probs` `(B, V)`. `generator` is one `torch.Generator` for the batch or, as in
    diffusers pipelines, a list with one per row: then each row draws from its own, so a row's draws do not depend
    on which other rows are in the batch."""
    if isinstance(generator, (list, tuple)):
        if len(generator) != len(probs):
            raise ValueError(f"got a list of {len(generator)} generators for a batch of {len(probs)}: expected one per row")
        return torch.cat([torch.multinomial(probs[i: i + 1].to(g.device), 1, generator=g).to(probs.device)
                          for i, g in enumerate(generator)])
    device = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(device), 1, generator=generator).to(probs.device)


class CodeGPTMultinomialLogitsProcessor(LogitsProcessor):
    """Draws one token per row from `softmax(scores)` with the caller's `generator` and returns scores that are
    -inf everywhere except the drawn token, so greedy decoding (`do_sample=False`) emits exactly that token. All the
    randomness of `generate_codes` therefore comes from `generator`, while `generate()` keeps the KV cache."""

    def __init__(self, generator=None):
        self.generator = generator

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float(), dim=-1)  # (B, V)
        drawn = multinomial_draw(probs, self.generator).to(scores.device)  # (B, 1)
        out = torch.full_like(scores, -float("inf"))
        return out.scatter_(1, drawn, 0.0)


class CodeGPTPreTrainedModel(LlamaPreTrainedModel):
    config_class = CodeGPTConfig


class CodeGPTForCausalLM(LlamaForCausalLM):
    r"""
    [`LlamaForCausalLM`] with a [`CodeGPTConfig`]; `forward(input_ids, labels=...)` is Llama's (shifted CE loss,
    labels `-100` ignored), `generate()`, the KV cache and gradient checkpointing are transformers'.

    Example:

    ```python
    >>> model = CodeGPTForCausalLM(CodeGPTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    ...                                          num_attention_heads=4))
    >>> codes = model.generate_codes(torch.tensor([3, 7]), temperature=0.8, top_k=32,
    ...                              generator=torch.Generator().manual_seed(0))  # (2, 49) in [0, 256)
    ```
    """

    config_class = CodeGPTConfig

    @classmethod
    def register_for_auto_class(cls, auto_class="AutoModelForCausalLM"):
        """Also registers the config class, so the saved `auto_map` names both and
        `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` works without latentheat installed."""
        cls.config_class.register_for_auto_class("AutoConfig")
        super().register_for_auto_class(auto_class)

    def build_prompt(self, class_labels: Optional[torch.LongTensor], batch_size: Optional[int] = None):
        """`[class][BOS]` rows `(B, 2)` (or `[BOS]` `(B, 1)` for an unconditional model) on the model's device."""
        config = self.config
        if config.num_classes > 0:
            if class_labels is None:
                raise ValueError(f"class_labels are required: the model has num_classes={config.num_classes}")
            class_labels = torch.as_tensor(class_labels, device=self.device)
            if class_labels.dim() != 1 or class_labels.is_floating_point():
                raise ValueError(f"class_labels must be a 1-D integer tensor, got shape {tuple(class_labels.shape)}")
            if class_labels.numel() == 0:
                raise ValueError("class_labels is empty")
            low, high = int(class_labels.min()), int(class_labels.max())
            if low < 0 or high >= config.num_classes:
                raise ValueError(
                    f"class_labels must lie in [0, num_classes={config.num_classes}), got values in [{low}, {high}]"
                )
            classes = class_labels.long() + config.class_token_offset
            bos = torch.full_like(classes, config.bos_token_id)
            return torch.stack([classes, bos], dim=1)  # (B, 2)
        if class_labels is not None:
            raise ValueError("class_labels must be None for an unconditional model (num_classes=0)")
        if batch_size is None or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid for an unconditional model: expected an int >= 1")
        return torch.full((batch_size, 1), config.bos_token_id, dtype=torch.long, device=self.device)

    @torch.no_grad()
    def generate_codes(
        self,
        class_labels: Optional[torch.LongTensor] = None,
        num_codes: Optional[int] = None,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        guidance_scale: Optional[float] = None,
        generator: Optional[torch.Generator] = None,
        max_context: Optional[int] = None,
        use_cache: bool = True,
        batch_size: Optional[int] = None,
        callback: Optional[Callable[[int], None]] = None,
    ) -> torch.LongTensor:
        r"""
        Sample code sequences `(B, num_codes)` in `[0, codebook_size)`.

        Args:
            class_labels (`torch.LongTensor` of shape `(B,)`): classes in `[0, num_classes)`; `None` (with
                `batch_size`) for an unconditional model.
            num_codes (`int`, *optional*, defaults to `config.num_codes`).
            temperature (`float`, > 0), top_k (`int`, >= 1), top_p (`float`, in (0, 1]): transformers'
                `TemperatureLogitsWarper` / `TopKLogitsWarper` / `TopPLogitsWarper`, applied over the codes only.
            guidance_scale (`float`, *optional*): classifier-free guidance
                `log p_uncond + s (log p_cond - log p_uncond)` with the null class prompt as the unconditional one
                (transformers' `UnbatchedClassifierFreeGuidanceLogitsProcessor`); `None` or 1 disables it.
            generator (`torch.Generator`, *optional*): the only source of randomness; same seed, same codes.
            max_context (`int`, *optional*, defaults to `config.max_context`): sliding window. When the sequence
                would exceed it, generation continues in chunks from the last tokens only; each token is then
                predicted from between `max_context // 2` and `max_context` tokens of context.
            use_cache (`bool`): KV cache on or off; gives the same tokens for the same generator seed.
            batch_size (`int`, *optional*): rows to draw for an unconditional model.
            callback (`Callable[[int], None]`, *optional*): called with the number of codes drawn so far after
                each generated position (pipelines drive their progress bar with it).
        """
        config = self.config
        num_codes = config.num_codes if num_codes is None else num_codes
        max_context = config.max_context if max_context is None else max_context
        if not isinstance(num_codes, int) or num_codes < 1:
            raise ValueError(f"num_codes={num_codes!r} is invalid: expected an int >= 1")
        if not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected temperature > 0")
        if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} is invalid: expected an int >= 1 or None")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p!r} is invalid: expected 0 < top_p <= 1 or None")
        use_guidance = guidance_scale is not None and guidance_scale != 1
        if use_guidance and config.num_classes == 0:
            raise ValueError(f"guidance_scale={guidance_scale!r} needs a class-conditional model (num_classes > 0)")
        prompt = self.build_prompt(class_labels, batch_size)  # (B, P)
        if not isinstance(max_context, int) or max_context < prompt.shape[1]:
            raise ValueError(f"max_context={max_context!r} is invalid: expected an int >= {prompt.shape[1]}")

        sequence = prompt
        remaining = num_codes
        first = True
        while remaining > 0:
            if first and prompt.shape[1] + remaining - 1 <= max_context:
                new = remaining  # fits in one window: plain generate() over the whole sequence
            elif first:
                new = max_context - prompt.shape[1] + 1  # fill the first window
            else:
                new = min(remaining, max(1, max_context // 2))
            first = False
            # the last forward pass sees context + new - 1 tokens <= max_context
            context = sequence[:, -(max_context - new + 1) :]
            sequence = torch.cat(
                [sequence, self._generate_chunk(context, new, temperature, top_k, top_p,
                                                guidance_scale if use_guidance else None, generator, use_cache,
                                                callback, num_codes - remaining)],
                dim=1,
            )
            remaining -= new
        return sequence[:, prompt.shape[1] :].contiguous()

    # ---------------------------------------------------------------- next-frame emulation
    def _check_frame_codes(self, codes, name: str = "codes") -> torch.LongTensor:
        config = self.config
        if not isinstance(codes, torch.Tensor) or codes.dim() != 2 or codes.is_floating_point():
            shape = tuple(codes.shape) if isinstance(codes, torch.Tensor) else type(codes)
            raise ValueError(f"{name} must be an integer tensor of shape (batch, num_codes={config.num_codes}), got {shape}")
        if codes.shape[1] != config.num_codes:
            raise ValueError(f"{name} has {codes.shape[1]} codes per frame, config.num_codes={config.num_codes}")
        low, high = int(codes.min()), int(codes.max())
        if low < 0 or high >= config.codebook_size:
            raise ValueError(f"{name} must lie in [0, codebook_size={config.codebook_size}), got values in [{low}, {high}]")
        return codes.long().to(self.device)

    def frame_prompt_ids(self, codes: torch.LongTensor) -> torch.LongTensor:
        """`[BOS] c_t [EOS]` `(B, n + 2)` from the current frame's codes `c_t` `(B, n)` (checked): the part of the
        emulator input before the queries (parallel) or the next frame's codes (autoregressive: the prompt that
        `generate()` continues in `sample_next_frame`)."""
        config = self.config
        if config.num_classes != 0:
            raise ValueError(f"next-frame emulation needs an unconditional model (num_classes=0), got num_classes={config.num_classes}")
        if 2 * config.num_codes + 2 > config.max_position_embeddings:
            raise ValueError(f"next-frame emulation needs max_position_embeddings >= 2 * num_codes + 2 = {2 * config.num_codes + 2}, got {config.max_position_embeddings}")
        codes = self._check_frame_codes(codes)
        bos = torch.full_like(codes[:, :1], config.bos_token_id)
        sep = torch.full_like(codes[:, :1], config.eos_token_id)
        return torch.cat([bos, codes, sep], dim=1)

    def teacher_codes(self, next_codes: torch.LongTensor) -> Optional[torch.LongTensor]:
        """What `next_frame_logits` takes as `next_codes` to score the true next frame `next_codes`: the codes
        themselves with autoregressive decoding (teacher forcing), `None` with parallel decoding (the logits depend on
        the current frame alone)."""
        return next_codes if self.config.frame_decoding == "autoregressive" else None

    def frame_pair_input_ids(self, codes: torch.LongTensor, next_codes: Optional[torch.LongTensor] = None) -> torch.LongTensor:
        """Emulator input from the current frame's codes `c_t` `(B, n)`; the logits at its last `n` positions predict
        the next frame's codes.

        - `config.frame_decoding="parallel"`: `[BOS] c_t [EOS] c_t` `(B, 2 n + 2)`. The second copy of `c_t` holds
          the queries: the logits at its position `j` predict code `j` of the next frame. Causal attention lets every
          query see the whole current frame (the first copy) and its own current code, so a frame's `n` codes are
          predicted in parallel in one forward pass. `next_codes` is not part of this input and must be `None`.
        - `"autoregressive"`: `[BOS] c_t [EOS] c_{t+1}[:-1]` `(B, 2 n + 1)` with the next frame's codes `next_codes`
          (teacher forcing; required): code `j` of the next frame is predicted from the current frame and the next
          frame's codes before `j`, as `generate()` draws them in `sample_next_frame`.
        """
        prompt = self.frame_prompt_ids(codes)
        if self.config.frame_decoding == "parallel":
            if next_codes is not None:
                raise ValueError("next_codes must be None with frame_decoding='parallel': the next frame's codes are "
                                 "predicted from the current frame alone")
            return torch.cat([prompt, prompt[:, 1:-1]], dim=1)
        if next_codes is None:
            raise ValueError("next_codes (the next frame's codes, teacher forcing) are required with "
                             "frame_decoding='autoregressive'; sample_next_frame draws them")
        next_codes = self._check_frame_codes(next_codes, "next_codes")
        if next_codes.shape[0] != prompt.shape[0]:
            raise ValueError(f"next_codes has {next_codes.shape[0]} rows, codes has {prompt.shape[0]}")
        return torch.cat([prompt, next_codes[:, :-1]], dim=1)

    def next_frame_logits(self, codes: torch.LongTensor, next_codes: Optional[torch.LongTensor] = None) -> torch.FloatTensor:
        """Logits `(B, n, codebook_size)` of the next frame's codes given the current frame's codes `(B, n)` in one
        forward pass (see `frame_pair_input_ids`; `next_codes` only with `frame_decoding="autoregressive"`, where
        code `j`'s logits are conditioned on `next_codes[:, :j]`). Train with cross-entropy against the next frame's
        codes."""
        logits = self(input_ids=self.frame_pair_input_ids(codes, next_codes), logits_to_keep=self.config.num_codes).logits
        return logits[..., : self.config.codebook_size]

    @torch.no_grad()
    def sample_next_frame(self, codes: torch.LongTensor, temperature: float = 1.0,
                          generator: Optional[torch.Generator] = None, return_logits: bool = False,
                          cache_implementation: Optional[str] = None):
        """Draw the next frame's codes `(B, n)` at `temperature` (`temperature=0` takes the argmax); randomness only
        from `generator`. With `frame_decoding="parallel"` every code is drawn independently from its softmax (one
        forward pass); with `"autoregressive"` the codes are drawn one after the other by `generate()` (KV cache,
        transformers' logits processors), each conditioned on the ones before it.

        With `return_logits`, returns `(codes, logits)`: the logits `(B, n, codebook_size)` the codes were drawn from
        (autoregressive: each code's given the codes drawn before it, recomputed in one teacher-forced pass, which
        draws no random numbers).

        `cache_implementation` is passed to `generate()` (autoregressive only): `None`, transformers' dynamic KV cache,
        or `"static"`, which preallocates the cache for the `2 n + 1` tokens of a frame pair and draws a frame about
        18 % faster on CPU for 256 codes (`benchmarks/rollout.py`). The two draw from the same distribution but not
        bit for bit the same codes: rounding differs in the attention over the preallocated cache, which flips a rare
        draw, and a chained rollout then diverges; the dynamic cache stays the default so that runs reproduce.
        """
        if self.config.frame_decoding == "parallel":
            logits = self.next_frame_logits(codes)
            drawn = self.sample_from_frame_logits(logits, temperature, generator)
            return (drawn, logits) if return_logits else drawn
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a number >= 0 (0 = argmax)")
        drawn = self._generate_chunk(self.frame_prompt_ids(codes), self.config.num_codes,
                                     temperature if temperature > 0 else None, None, None, None, generator, True,
                                     cache_implementation=cache_implementation)
        return (drawn, self.next_frame_logits(codes, drawn)) if return_logits else drawn

    @staticmethod
    def frame_probabilities(logits: torch.Tensor, temperature: float = 1.0) -> torch.FloatTensor:
        """Softmax of next-frame logits `(B, n, K)` at `temperature` (`0`: one-hot on the argmax)."""
        if not temperature >= 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a number >= 0 (0 = argmax)")
        logits = logits.float()
        if temperature == 0:
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        return torch.softmax(logits / temperature, dim=-1)

    @staticmethod
    def sample_from_frame_logits(logits: torch.Tensor, temperature: float = 1.0,
                                 generator: Optional[torch.Generator] = None) -> torch.LongTensor:
        """Codes `(B, n)` drawn independently from next-frame logits `(B, n, K)` (the parallel decoding of
        `sample_next_frame`)."""
        probs = CodeGPTForCausalLM.frame_probabilities(logits, temperature)
        if temperature == 0:
            return probs.argmax(-1)
        if isinstance(generator, (list, tuple)):  # one generator per frame: its codes draw from it
            if len(generator) != len(probs):
                raise ValueError(f"got a list of {len(generator)} generators for {len(probs)} frames: expected one per frame")
            generator = [g for g in generator for _ in range(probs.shape[1])]
        draws = multinomial_draw(probs.flatten(0, 1).cpu(), generator).view(logits.shape[:2])
        return draws.to(logits.device)

    def _generate_chunk(self, context, new, temperature, top_k, top_p, guidance_scale, generator, use_cache,
                        callback=None, done=0, cache_implementation=None):
        config = self.config
        processors = LogitsProcessorList()
        if guidance_scale is not None:
            # the unconditional prompt is the same context with the class token (if still in the window) nulled
            unconditional = context.clone()
            is_class = (unconditional >= config.class_token_offset) & (unconditional < config.null_class_token_id)
            unconditional[is_class] = config.null_class_token_id
            processors.append(
                UnbatchedClassifierFreeGuidanceLogitsProcessor(
                    guidance_scale,
                    self,
                    unconditional_ids=unconditional,
                    unconditional_attention_mask=torch.ones_like(unconditional),
                    use_cache=use_cache,
                )
            )
        processors.append(CodeGPTCodeOnlyLogitsProcessor(config.codebook_size))
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(temperature)))
        if top_k is not None:
            processors.append(TopKLogitsWarper(top_k=min(top_k, config.codebook_size)))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(top_p)))
        if temperature is not None:  # None: greedy (argmax over the codes)
            processors.append(CodeGPTMultinomialLogitsProcessor(generator))  # last: draws the token
        if callback is not None:
            processors.append(_ProgressLogitsProcessor(callback, done))

        output = self.generate(
            input_ids=context,
            attention_mask=torch.ones_like(context),
            logits_processor=processors,
            do_sample=False,
            num_beams=1,
            max_new_tokens=new,
            min_new_tokens=new,
            use_cache=use_cache,
            cache_implementation=cache_implementation,
            bos_token_id=config.bos_token_id,
            eos_token_id=config.eos_token_id,
            pad_token_id=config.pad_token_id,
        )
        return output[:, context.shape[1] :]  # (B, new)


__all__ = [
    "CodeGPTCodeOnlyLogitsProcessor",
    "CodeGPTMultinomialLogitsProcessor",
    "CodeGPTPreTrainedModel",
    "CodeGPTForCausalLM",
]
