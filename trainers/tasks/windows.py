"""Fixed-length windows of token or byte ids, and per-row metrics averaged over batches of them (TokCom and the
Abstractinator)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch.utils.data import Dataset

from ..arguments import ConfigError


@dataclass
class TextSourceArguments:
    """The `data` section's text source: "shakespeare" (offline, DATA.md section 2), a Hub data set id with a "text"
    column (online; `dataset_config` names its configuration, e.g. wikitext / wikitext-2-raw-v1) or a local .txt file
    (the same file for every split); windows capped per split."""

    dataset: str = "shakespeare"
    dataset_config: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = None

    def __post_init__(self):
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ConfigError(f"data.{name}={value!r} is invalid: expected an int >= 1 or null")

    @property
    def name_or_path(self) -> Optional[str]:
        return None if self.dataset == "shakespeare" else self.dataset


class TokenWindows(Dataset):
    """Fixed-length windows of ids (tokens or bytes) held as one LongTensor."""

    def __init__(self, input_ids: torch.Tensor):
        self.input_ids = input_ids

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, i):
        return {"input_ids": self.input_ids[i], "index": i}


def batches(x: torch.Tensor, device, size: int = 64):
    """Consecutive slices of `size` rows of `x`, moved to `device`."""
    for start in range(0, len(x), size):
        yield x[start: start + size].to(device)


def batch_means(batches, measure, gather=None) -> dict:
    """Means over batches of token ids: `measure(input_ids)` gives, per name, a tensor of per-row sums and the units
    each row holds (tokens, latent entries); the result is sum / units per name. `gather` (an evaluation loader's
    `accelerator.gather_for_metrics`) first collects the rows of every process."""
    sums, units = {}, {}
    for ids in batches:
        rows = measure(ids)
        values = {name: value for name, (value, _) in rows.items()}
        if gather is not None:
            values = gather(values)
        for name, value in values.items():
            sums[name] = sums.get(name, 0.0) + value.double().sum().item()
            units[name] = units.get(name, 0) + value.numel() * rows[name][1]
    return {name: sums[name] / units[name] for name in sums}

