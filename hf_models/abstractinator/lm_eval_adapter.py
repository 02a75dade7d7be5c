"""lm-evaluation-harness adapter for the Abstractinator: the `hier_ae` model of lm-eval.

Importing this module registers `HierarchicalAELM` with lm-eval's model registry under `hier_ae` (lm-eval only sees a
model class whose module was imported before `simple_evaluate`):

```python
import lm_eval
import hf_models.abstractinator.lm_eval_adapter  # registers "hier_ae"

results = lm_eval.simple_evaluate(model="hier_ae", model_args="pretrained=outputs/run", tasks=["lambada_openai"])
```

From the shell, `python -m hf_models.abstractinator.lm_eval_adapter` is lm-eval's own command line (`lm_eval ...`)
with the module imported first, e.g.
`python -m hf_models.abstractinator.lm_eval_adapter --model hier_ae --model_args pretrained=outputs/run --tasks ...`.

Scoring pays for the codes (DESIGN.md: the adapter never scores bytes given codes computed from those bytes without
paying for the codes). Every score is a difference of `AbstractinatorModel.causal_bits`, the length of a two-part code
of a whole string: bits of its top codes under the code LM + bits of its bytes under the expanders given the codes.

* `loglikelihood(context, continuation)` = -(bits(context + continuation) - bits(context)) * ln 2 nats, bits("") = 0.
  The codes of the context's last segment may change when the continuation is appended (segmentation and pooling see
  the whole string), so this is a difference of code lengths, not a product of per-byte conditionals: it is not
  guaranteed to be <= 0.
* `loglikelihood_rolling(string)` = -bits(string) * ln 2, the string cut into consecutive non-overlapping windows of
  `max_length` bytes scored separately (context does not cross windows) and their bits summed.
* `generate_until` continues the context's top codes with the code LM and expands all codes to bytes with the
  expanders (greedily, as `generate_bytes` does); the answer is the bytes written for the new codes only.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Optional

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from .modeling_abstractinator import AbstractinatorModel


logger = logging.getLogger(__name__)

LN2 = math.log(2.0)
DEFAULT_SUBFOLDER = "abstractinator"  # where a latentheat run's output folder keeps the model
_DTYPES = {"float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
           "float16": torch.float16, "half": torch.float16}
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _to_bytes(text) -> bytes:
    if isinstance(text, (bytes, bytearray)):
        return bytes(text)
    if isinstance(text, str):
        return text.encode("utf-8")
    raise ValueError(f"expected a str or bytes, got {type(text).__name__}")


def _looks_like_path(name: str) -> bool:
    return name.startswith((os.sep, ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def _cut_at_stop(text: str, until: list) -> str:
    """`text` up to the earliest occurrence of any non-empty stop string."""
    cut = len(text)
    for stop in until:
        if stop:
            index = text.find(stop)
            if index != -1:
                cut = min(cut, index)
    return text[:cut]


@torch.no_grad()
def _expand_counting(expander, code_vectors, max_length: int, allowed: torch.Tensor, prompt_segments: int):
    """`AbstractinatorCodeExpander.generate` for one row, greedy, that also counts the symbols written in the first
    `prompt_segments` segments (before the `prompt_segments`-th end-of-segment mark). Returns (symbols, count)."""
    code_mask = torch.ones(code_vectors.shape[:2], dtype=torch.bool, device=code_vectors.device)
    memory = expander.encode(code_vectors, code_mask)
    wanted = code_mask.sum(1) // expander.num_queries
    inputs = torch.full((1, 1), expander.start, dtype=torch.long, device=memory.device)
    ended, written, in_prompt = 0, [], 0
    for _ in range(max_length):
        if ended >= int(wanted[0]):
            break
        segments = (inputs[:, 1:] == expander.end_of_segment).long().cumsum(1)
        segments = torch.cat([torch.zeros_like(inputs[:, :1]), segments], dim=1)
        segments = torch.minimum(segments, (wanted - 1).clamp(min=0)[:, None])
        logits = expander.decode(memory, code_mask, inputs, segments)[:, -1].float()
        logits = logits.masked_fill(~allowed, float("-inf"))
        nxt = int(logits.argmax(-1)[0])
        if nxt == expander.end_of_segment:
            ended += 1
        else:
            written.append(nxt)
            if ended < prompt_segments:
                in_prompt += 1
        inputs = torch.cat([inputs, torch.tensor([[nxt]], dtype=torch.long, device=inputs.device)], dim=1)
    return written, in_prompt


@register_model("hier_ae")
class HierarchicalAELM(LM):
    """lm-eval model `hier_ae`: an [`AbstractinatorModel`] scored by two-part code lengths (see the module docstring).

    Args:
        pretrained: a local folder or Hub id of a saved `AbstractinatorModel` (or the model object itself).
        model: an already built `AbstractinatorModel` (instead of `pretrained`).
        subfolder: the folder inside `pretrained` that holds the model; default: `abstractinator/` when the path has
            one (a latentheat run's output folder), else the root.
        revision: Hub revision of `pretrained`.
        device: torch device ("cpu" default; a CUDA device on a machine without CUDA falls back to the CPU with a
            warning, as lm-eval's `hf` model does, since lm-eval's command line asks for cuda:0 by default).
        dtype: "float32" (default), "bfloat16" or "float16".
        batch_size: strings per `causal_bits` call (int, default 8); "auto" is accepted and means the default.
        max_batch_size: accepted for lm-eval's interface, unused.
        max_length: bytes per scored string (default: the config's `max_position_embeddings`). Longer rolling
            strings are scored in windows; a longer loglikelihood request loses the left end of its context; a
            generation context keeps its last `max_length` bytes.
        max_new_codes: new top codes generated by `generate_until` when the request gives no `max_gen_toks`.
        do_sample, temperature, top_k, top_p: the code LM's decoding in `generate_until` when the request does not
            set them (default greedy). The expanders always decode greedily, as in `generate_bytes`.
        seed: seeds torch once when the model is built (sampled generation uses torch's global generator).
        compute_is_greedy: `loglikelihood`'s second value. False (default): always False, nothing computed. True:
            greedy generation from the context (`max(1, len(continuation bytes) * codes per segment of every level)`
            new codes) and True when the bytes written for the new codes start with the continuation's bytes.
            Costs one generation per distinct context.
    """

    def __init__(
        self,
        pretrained=None,
        model=None,
        subfolder: Optional[str] = None,
        revision: Optional[str] = None,
        device="cpu",
        dtype=None,
        batch_size=8,
        max_batch_size=None,
        max_length: Optional[int] = None,
        max_new_codes: int = 64,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        seed: Optional[int] = None,
        compute_is_greedy: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        if kwargs:
            raise ValueError(f"hier_ae got unknown arguments {sorted(kwargs)}; it takes pretrained, model, subfolder, "
                             "revision, device, dtype, batch_size, max_length, max_new_codes, do_sample, temperature, "
                             "top_k, top_p, seed, compute_is_greedy")
        if (pretrained is None) == (model is None):
            raise ValueError("hier_ae needs exactly one of pretrained= (a folder or Hub id) and model= (a built "
                             f"AbstractinatorModel); got pretrained={pretrained!r}, model={type(model).__name__}")
        self.batch_size = self._check_batch_size(batch_size)
        for name, value in (("max_new_codes", max_new_codes),):
            if not _is_int(value) or value < 1:
                raise ValueError(f"{name}={value!r} is invalid: expected an int >= 1")
        for name, value in (("do_sample", do_sample), ("compute_is_greedy", compute_is_greedy)):
            if not isinstance(value, bool):
                raise ValueError(f"{name}={value!r} is invalid: expected true or false")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ValueError(f"temperature={temperature!r} is invalid: expected a number > 0")
        if top_k is not None and (not _is_int(top_k) or top_k < 1):
            raise ValueError(f"top_k={top_k!r} is invalid: expected an int >= 1 or None")
        if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float))
                                  or not 0 < top_p <= 1):
            raise ValueError(f"top_p={top_p!r} is invalid: expected a number in (0, 1] or None")
        if seed is not None and not _is_int(seed):
            raise ValueError(f"seed={seed!r} is invalid: expected an int or None")
        try:
            self._device = torch.device("cpu" if device is None else device)
        except (RuntimeError, TypeError) as error:
            raise ValueError(f"device={device!r} is invalid: {error}") from None
        if self._device.type == "cuda" and not torch.cuda.is_available():
            # lm-eval's command line asks for cuda:0 by default; like its `hf` model, fall back to the CPU
            logger.warning("hier_ae: device=%r but CUDA is not available; using the CPU", device)
            self._device = torch.device("cpu")
        if dtype is not None and not isinstance(dtype, torch.dtype):
            if dtype not in _DTYPES:
                raise ValueError(f"dtype={dtype!r} is invalid: expected one of {sorted(_DTYPES)}")
            dtype = _DTYPES[dtype]
        if seed is not None:
            torch.manual_seed(seed)

        if model is None and not isinstance(pretrained, str):
            model, pretrained = pretrained, None  # lm-eval's convention: pretrained= may be a built model
        if model is None:
            model = self._load(pretrained, subfolder, revision)
        elif subfolder is not None or revision is not None:
            raise ValueError("subfolder= and revision= apply to pretrained=, not to a built model=")
        for needed in ("causal_bits", "encode", "compressors", "expanders", "config"):
            if not hasattr(model, needed):
                raise ValueError(f"model={type(model).__name__} is not an AbstractinatorModel (it has no {needed!r})")
        if getattr(model, "code_lm", None) is None:
            raise ValueError("hier_ae needs the code language model (use_code_lm=True): scores pay for the codes")
        if dtype is not None:
            model = model.to(dtype)
        self.model = model.to(self._device).eval()
        self.config = model.config

        limit = self.config.max_position_embeddings
        if max_length is None:
            max_length = limit
        if not _is_int(max_length) or not 1 <= max_length <= limit:
            raise ValueError(f"max_length={max_length!r} is invalid: expected an int in [1, max_position_embeddings="
                             f"{limit}]")
        self.max_length = max_length
        self.max_new_codes = max_new_codes
        self.do_sample, self.temperature, self.top_k, self.top_p = do_sample, float(temperature), top_k, top_p
        self.seed = seed
        self.compute_is_greedy = compute_is_greedy
        # codes per segment of every level: an upper bound of top codes per byte for a model whose segments are
        # never empty
        self._codes_per_byte = math.prod(level["num_queries"] for level in self.config.compressor_level_configs)

    # ---- construction -------------------------------------------------------------------------------------------
    @staticmethod
    def _check_batch_size(batch_size) -> int:
        if isinstance(batch_size, str):
            if batch_size.startswith("auto"):
                logger.warning("hier_ae: batch_size=%r is not supported; using 8", batch_size)
                return 8
            if batch_size.strip().isdigit():
                batch_size = int(batch_size)
        if not _is_int(batch_size) or batch_size < 1:
            raise ValueError(f"batch_size={batch_size!r} is invalid: expected an int >= 1")
        return batch_size

    @staticmethod
    def _load(pretrained: str, subfolder: Optional[str], revision: Optional[str]):
        if not pretrained:
            raise ValueError("pretrained= is empty: expected a folder or a Hub id of a saved AbstractinatorModel")
        if os.path.isdir(pretrained):
            if subfolder is None:
                nested = os.path.isfile(os.path.join(pretrained, DEFAULT_SUBFOLDER, "config.json"))
                subfolder = DEFAULT_SUBFOLDER if nested else ""
            if not os.path.isfile(os.path.join(pretrained, subfolder, "config.json")):
                raise ValueError(f"pretrained={pretrained!r}: no config.json in "
                                 f"{os.path.join(pretrained, subfolder)!r} (pass subfolder= for another folder)")
            return AbstractinatorModel.from_pretrained(pretrained, subfolder=subfolder)
        if _looks_like_path(pretrained):
            raise ValueError(f"pretrained={pretrained!r} is not an existing folder")
        tries = [subfolder] if subfolder is not None else [DEFAULT_SUBFOLDER, ""]
        errors = []
        for folder in tries:
            try:
                return AbstractinatorModel.from_pretrained(pretrained, subfolder=folder, revision=revision)
            except OSError as error:  # no config there (or offline): try the next folder
                errors.append(f"subfolder={folder!r}: {error}")
        raise ValueError(f"could not load an AbstractinatorModel from {pretrained!r}: " + " | ".join(errors))

    # ---- scoring ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def string_bits(self, strings, disable_tqdm: bool = True) -> list:
        """Two-part code length in bits (`causal_bits`' `bits`) of each string (str or bytes, at most `max_length`
        bytes; "" -> 0.0), in `batch_size` right-padded rows per call, longest first."""
        data = [_to_bytes(s) for s in strings]
        for item in data:
            if len(item) > self.max_length:
                raise ValueError(f"a string of {len(item)} bytes exceeds max_length={self.max_length}")
        unique = sorted({item for item in data if item}, key=len, reverse=True)
        bits = {b"": 0.0}
        pad = self.config.pad_token_id
        batches = range(0, len(unique), self.batch_size)
        for start in tqdm(batches, disable=disable_tqdm, desc="hier_ae causal bits"):
            rows = unique[start:start + self.batch_size]
            width = len(rows[0])
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(list(row), dtype=torch.long)
                mask[i, :len(row)] = 1
            out = self.model.causal_bits(ids.to(self._device), mask.to(self._device))
            for row, value in zip(rows, out["bits"].tolist()):
                bits[row] = float(value)
        return [bits[item] for item in data]

    def _windows(self, data: bytes) -> list:
        return [data[i:i + self.max_length] for i in range(0, len(data), self.max_length)]

    def _fit(self, context: bytes, continuation: bytes):
        """(context, continuation windows): the context loses its left end so that it and the continuation fit in
        `max_length` bytes; a continuation of `max_length` bytes or more is scored alone, in windows."""
        if len(continuation) >= self.max_length:
            return b"", self._windows(continuation)
        keep = self.max_length - len(continuation)
        return context[len(context) - keep:] if len(context) > keep else context, [continuation]

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list:
        """(log-probability in nats, is_greedy) per `(context, continuation)`: -(bits(context + continuation) -
        bits(context)) * ln 2, both bits from `causal_bits` (codes paid for), bits("") = 0. is_greedy: see
        `compute_is_greedy` (False unless it is set)."""
        pairs = []
        for request in requests:
            context, continuation = request.args
            pairs.append(self._fit(_to_bytes(context), _to_bytes(continuation)))
        needed = []
        for context, windows in pairs:
            if len(windows) == 1:
                needed += [context, context + windows[0]]
            else:
                needed += windows
        bits = dict(zip(needed, self.string_bits(needed, disable_tqdm=disable_tqdm)))
        greedy = self._greedy_prefixes(pairs, disable_tqdm) if self.compute_is_greedy else None
        results = []
        for request, (context, windows) in zip(requests, pairs):
            if len(windows) == 1:
                cost = bits[context + windows[0]] - bits[context]
            else:
                cost = sum(bits[w] for w in windows)
            continuation = b"".join(windows)
            is_greedy = bool(greedy is not None and greedy[context].startswith(continuation))
            result = (-cost * LN2, is_greedy)
            results.append(result)
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def _greedy_prefixes(self, pairs, disable_tqdm: bool) -> dict:
        """Greedy new bytes per distinct context, with enough new codes for its longest continuation."""
        budget = {}
        for context, windows in pairs:
            codes = max(1, len(b"".join(windows)) * self._codes_per_byte)
            budget[context] = max(budget.get(context, 0), codes)
        return {context: self.generate_new_bytes(context, codes, do_sample=False)
                for context, codes in tqdm(budget.items(), disable=disable_tqdm, desc="hier_ae is_greedy")}

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list:
        """Log-probability in nats of each whole string: -bits * ln 2, the string scored in consecutive,
        non-overlapping windows of `max_length` bytes (no context crosses a window) and their bits summed."""
        windows = [self._windows(_to_bytes(request.args[0])) for request in requests]
        flat = [w for row in windows for w in row]
        bits = dict(zip(flat, self.string_bits(flat, disable_tqdm=disable_tqdm)))
        results = []
        for request, row in zip(requests, windows):
            value = -sum(bits[w] for w in row) * LN2
            results.append(value)
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, value)
        return results

    # ---- generation ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate_with_prompt_length(self, context, max_new_codes: int, do_sample: bool = False,
                                    temperature: float = 1.0, top_k: Optional[int] = None,
                                    top_p: Optional[float] = None, max_length: Optional[int] = None):
        """(all bytes, prompt bytes): `generate_bytes` (encode -> code LM `generate()` -> expanders, greedily) that
        also says how many of the returned bytes the expanders wrote for the prompt's codes (the segments of the
        prompt's codes at every level), so the continuation is exactly `all[prompt:]`. An empty prompt starts the
        code LM from BOS alone. `max_length` caps the symbols each expander writes (default: the config's
        `expander_max_length` plus twice the prompt's bytes, so a long prompt leaves room for the new bytes)."""
        model, cfg = self.model, self.config.code_lm_config
        prompt = _to_bytes(context)
        if max_length is None:
            max_length = self.config.expander_max_length + 2 * len(prompt)
        device = self._device
        if prompt:
            codes = model.encode(torch.tensor([list(prompt)], dtype=torch.long, device=device))[0]
        else:
            codes = torch.zeros(0, dtype=torch.long, device=device)
        lm_input = torch.cat([torch.tensor([cfg.bos_token_id], device=device), codes])[None]
        sequences = model.code_lm.generate(
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
        symbols, prompt_symbols = sequences, codes.numel()
        for level in reversed(range(self.config.num_levels)):
            if symbols.numel() == 0:
                return b"", 0
            compressor, expander = model.compressors[level], model.expanders[level]
            size = compressor.quantizer.codebook_size
            if int(symbols.min()) < 0 or int(symbols.max()) >= size:
                raise ValueError(f"level {level} codes outside [0, codebook_size={size})")
            vectors = compressor.quantizer.lookup(symbols)[None].to(model.dtype)
            allowed = torch.ones(self.config.level_vocab_size(level) + 1, dtype=torch.bool, device=device)
            if level == 0:  # bytes and end-of-segment only
                allowed[[self.config.bos_token_id, self.config.eos_token_id, self.config.pad_token_id]] = False
            # a segment holding any of the prompt's codes belongs to the prompt
            prompt_segments = -(-prompt_symbols // expander.num_queries)
            written, prompt_symbols = _expand_counting(expander, vectors, max_length, allowed, prompt_segments)
            symbols = torch.tensor(written, dtype=torch.long, device=device)
        return bytes(symbols.tolist()), prompt_symbols

    def generate_new_bytes(self, context, max_new_codes: int, **kwargs) -> bytes:
        """The bytes written for the new codes only (see `generate_with_prompt_length`)."""
        data, prompt = self.generate_with_prompt_length(context, max_new_codes, **kwargs)
        return data[prompt:]

    def _generation_settings(self, gen_kwargs: dict) -> dict:
        if not isinstance(gen_kwargs, dict):
            raise ValueError(f"generate_until expects a dict of generation kwargs, got {type(gen_kwargs).__name__}")
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None)
        if until is None:
            until = []
        elif isinstance(until, str):
            until = [until]
        elif not isinstance(until, (list, tuple)) or not all(isinstance(u, str) for u in until):
            raise ValueError(f"until={until!r} is invalid: expected a str or a list of str")
        given = [kwargs.pop(key) for key in _MAX_TOKEN_KEYS if kwargs.get(key) is not None]  # lm-eval's priority
        for key in _MAX_TOKEN_KEYS:
            kwargs.pop(key, None)
        max_new_codes = int(given[0]) if given else self.max_new_codes
        if max_new_codes < 1:
            raise ValueError(f"max_gen_toks={max_new_codes} must be >= 1 (it counts new top codes)")
        do_sample, temperature = kwargs.pop("do_sample", None), kwargs.pop("temperature", None)
        if do_sample is None:
            do_sample = self.do_sample if temperature is None else float(temperature) > 0
        temperature = self.temperature if temperature is None else float(temperature)
        if do_sample and temperature <= 0:
            do_sample = False  # temperature 0: greedy
        top_k, top_p = kwargs.pop("top_k", self.top_k), kwargs.pop("top_p", self.top_p)
        if kwargs:
            logger.warning("hier_ae: generation kwargs %s are ignored", sorted(kwargs))
        return {"until": list(until), "max_new_codes": max_new_codes, "do_sample": bool(do_sample),
                "temperature": temperature, "top_k": top_k, "top_p": top_p}

    def generate_until(self, requests, disable_tqdm: bool = False) -> list:
        """The text each context continues with: the bytes written for the new top codes (at most `max_gen_toks` of
        them, default `max_new_codes`), decoded as UTF-8 (errors replaced) and cut before the first `until` string.
        The context keeps its last `max_length` bytes. Greedy unless the request (or the constructor) asks for
        sampling; `temperature`, `top_k` and `top_p` act on the code LM."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="hier_ae generate_until"):
            context, gen_kwargs = request.args
            settings = self._generation_settings(gen_kwargs)
            prompt = _to_bytes(context)[-self.max_length:]
            new = self.generate_new_bytes(prompt, settings["max_new_codes"], do_sample=settings["do_sample"],
                                          temperature=settings["temperature"], top_k=settings["top_k"],
                                          top_p=settings["top_p"])
            text = _cut_at_stop(new.decode("utf-8", errors="replace"), settings["until"])
            results.append(text)
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results


__all__ = ["HierarchicalAELM"]


if __name__ == "__main__":  # lm-eval's command line with `hier_ae` registered
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
