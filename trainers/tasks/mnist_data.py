"""The ``data`` section shared by the tasks that train on MNIST (code_image, dtm)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Optional

from ..arguments import ConfigError


@dataclass
class MNISTDataArguments:
    dataset: str = "mnist"
    name_or_path: Optional[str] = None  # a Hub data set id or a local parquet file/folder with image + label
    cache_dir: Optional[str] = None
    max_train_samples: Optional[int] = None
    max_eval_samples: Optional[int] = 2000

    task_name: ClassVar[str] = "this task"

    def __post_init__(self):
        if self.dataset != "mnist":
            raise ConfigError(f"data.dataset={self.dataset!r} is not supported by {self.task_name}; allowed: mnist (or set data.name_or_path to a data set with the same schema)")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"data.{name}={value} must be >= 1 or null")

    def load(self, split: str):
        """uint8 images ``(N, 28, 28)`` and int64 labels of ``split``, cut to ``max_train_samples`` /
        ``max_eval_samples``."""
        from hf_models.data.mnist import load_mnist, mnist_tensors

        images, labels = mnist_tensors(load_mnist(split, cache_dir=self.cache_dir, name_or_path=self.name_or_path))
        limit = self.max_train_samples if split == "train" else self.max_eval_samples
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        return images, labels
