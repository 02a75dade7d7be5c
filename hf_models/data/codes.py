"""Code-sequence data for CodeGPT: VQ codes `(N, h*w)` (+ class labels) -> `[class][BOS] codes [EOS]` sequences.

```python
codes = vq.encode(images).flatten(1).numpy()                       # (N, 49)
dataset = build_code_sequences(codes, labels, gpt_config)          # datasets.Dataset: input_ids, labels
collate = CodeSequenceCollator(gpt_config.pad_token_id, gpt_config.class_dropout_prob,
                               gpt_config.null_class_token_id, generator=torch.Generator().manual_seed(0))
loader = DataLoader(dataset.with_format("python"), batch_size=32, collate_fn=collate)
```
"""

import os
from dataclasses import dataclass
from typing import Optional

import datasets
import numpy as np
import torch


def _to_code_array(codes) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.ndim != 2:
        raise ValueError(f"codes must have shape (num_images, codes_per_image), got {codes.shape}")
    if not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array, got dtype {codes.dtype}")
    return codes.astype(np.int64, copy=False)


def build_code_sequences(codes: np.ndarray, labels: Optional[np.ndarray], config) -> datasets.Dataset:
    """Turn VQ codes into CodeGPT training sequences.

    Args:
        codes (`np.ndarray` of shape `(N, h*w)`, integer): codes per image.
        labels (`np.ndarray` of shape `(N,)`, *optional*): class labels in `[0, config.num_classes)`; required iff
            `config.num_classes > 0`.
        config ([`CodeGPTConfig`]): token layout and `invalid_code_policy`.

    Returns:
        `datasets.Dataset` with `input_ids` = `[class][BOS] codes [EOS]` (or `[BOS] codes [EOS]` when unconditional)
        and `labels` = a copy of `input_ids` (the model shifts them).
    """
    codes = _to_code_array(codes)
    num_images = codes.shape[0]
    bad = (codes < 0) | (codes >= config.codebook_size)
    num_bad = int(bad.sum())
    if num_bad:
        if config.invalid_code_policy == "error":
            first = int(codes[bad][0])
            raise ValueError(
                f"{num_bad} codes lie outside [0, codebook_size={config.codebook_size}) (first bad value {first}); "
                "set invalid_code_policy='map' to replace them by invalid_code_token_id"
            )
        codes = np.where(bad, config.invalid_code_token_id, codes)

    columns = [codes]
    if config.num_classes > 0:
        if labels is None:
            raise ValueError(f"labels are required: config.num_classes={config.num_classes}")
        labels = np.asarray(labels)
        if labels.shape != (num_images,) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"labels must be an integer array of shape ({num_images},), got shape {labels.shape} "
                f"and dtype {labels.dtype}"
            )
        if num_images and (labels.min() < 0 or labels.max() >= config.num_classes):
            raise ValueError(
                f"labels must lie in [0, num_classes={config.num_classes}), got values in "
                f"[{labels.min()}, {labels.max()}]"
            )
        prefix = np.stack([labels.astype(np.int64) + config.class_token_offset,
                           np.full(num_images, config.bos_token_id, dtype=np.int64)], axis=1)
    else:
        if labels is not None:
            raise ValueError("labels must be None for an unconditional config (num_classes=0)")
        prefix = np.full((num_images, 1), config.bos_token_id, dtype=np.int64)
    eos = np.full((num_images, 1), config.eos_token_id, dtype=np.int64)
    sequences = np.concatenate([prefix, *columns, eos], axis=1)  # (N, prompt + h*w + 1)
    rows = sequences.tolist()
    return datasets.Dataset.from_dict({"input_ids": rows, "labels": [list(r) for r in rows]})


def save_codes(path_prefix, codes: np.ndarray, labels: Optional[np.ndarray] = None) -> None:
    """Write `codes.npy` `(N, h*w)` and, when given, `labels.npy` `(N,)` into the folder `path_prefix`."""
    codes = _to_code_array(codes)
    os.makedirs(path_prefix, exist_ok=True)
    np.save(os.path.join(path_prefix, "codes.npy"), codes, allow_pickle=False)
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (codes.shape[0],):
            raise ValueError(f"labels must have shape ({codes.shape[0]},), got {labels.shape}")
        np.save(os.path.join(path_prefix, "labels.npy"), labels.astype(np.int64), allow_pickle=False)


def load_codes(directory):
    """Read `(codes, labels)` written by [`save_codes`]; `labels` is `None` when `labels.npy` is absent."""
    codes = np.load(os.path.join(directory, "codes.npy"), allow_pickle=False)
    labels_path = os.path.join(directory, "labels.npy")
    labels = np.load(labels_path, allow_pickle=False) if os.path.exists(labels_path) else None
    return codes, labels


@dataclass
class CodeSequenceCollator:
    """Pads a list of `{"input_ids", "labels"}` examples into tensors.

    `input_ids` are padded with `pad_token_id`, `labels` with -100 (ignored by the loss), `attention_mask` is 1 on
    real tokens. With probability `class_dropout_prob` per example the class token (position 0) is replaced by
    `null_class_token_id` in `input_ids` and `labels` (classifier-free guidance training). The class token is only
    ever an input: the shifted loss predicts token `i` from tokens `< i`, so position 0 is never a target.
    Randomness comes from `generator` (a `torch.Generator`), or torch's global RNG when it is `None`.
    """

    pad_token_id: int
    class_dropout_prob: float = 0.0
    null_class_token_id: Optional[int] = None
    generator: Optional[torch.Generator] = None

    def __post_init__(self):
        if not 0.0 <= self.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob={self.class_dropout_prob!r} is invalid: expected 0 <= p < 1")
        if self.class_dropout_prob > 0 and self.null_class_token_id is None:
            raise ValueError("null_class_token_id is required when class_dropout_prob > 0")

    def __call__(self, examples):
        if not examples:
            raise ValueError("cannot collate an empty batch")
        lengths = [len(e["input_ids"]) for e in examples]
        batch, width = len(examples), max(lengths)
        input_ids = torch.full((batch, width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        attention_mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (example, length) in enumerate(zip(examples, lengths)):
            input_ids[i, :length] = torch.as_tensor(example["input_ids"], dtype=torch.long)
            labels[i, :length] = torch.as_tensor(example.get("labels", example["input_ids"]), dtype=torch.long)
            attention_mask[i, :length] = 1
        if self.class_dropout_prob > 0:
            drop = torch.rand(batch, generator=self.generator) < self.class_dropout_prob  # (B,)
            input_ids[drop, 0] = self.null_class_token_id
            labels[drop, 0] = self.null_class_token_id
        return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


__all__ = ["build_code_sequences", "save_codes", "load_codes", "CodeSequenceCollator"]
