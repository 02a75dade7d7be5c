"""Fixed-length windows of token or byte ids, and per-row metrics averaged over batches of them (TokCom and the
Abstractinator)."""

from __future__ import annotations

import torch
from torch.utils.data import Dataset


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

