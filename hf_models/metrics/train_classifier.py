"""Train the MNIST judge classifier used for classifier-feature FID and class accuracy.

```bash
python -m hf_models.metrics.train_classifier --output_dir hf_models/mnist_classifier/weights --epochs 3 --seed 0
```
Trains `MNISTClassifierModel` on the 60k MNIST training set with random shifts of up to +-2 pixels,
reports the accuracy on the 10k test set and saves the model with `save_pretrained`.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

from hf_models.data.mnist import load_mnist, mnist_tensors
from hf_models.mnist_classifier import MNISTClassifierConfig, MNISTClassifierModel


def to_pixel_values(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, 28, 28) -> float (N, 1, 28, 28) in [-1, 1]."""
    return images.unsqueeze(1).float().div(127.5).sub(1.0)


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Shift each uint8 image (N, H, W) by an independent integer offset in [-max_shift, max_shift], zero-filled."""
    if max_shift == 0:
        return images
    n, h, w = images.shape
    padded = torch.nn.functional.pad(images, (max_shift,) * 4)  # (N, H + 2s, W + 2s)
    oy = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    ox = torch.randint(0, 2 * max_shift + 1, (n,), generator=generator)
    rows = (oy[:, None] + torch.arange(h))[:, :, None]  # (N, H, 1)
    cols = (ox[:, None] + torch.arange(w))[:, None, :]  # (N, 1, W)
    return padded[torch.arange(n)[:, None, None], rows, cols]


@torch.no_grad()
def accuracy(model: MNISTClassifierModel, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> float:
    model.eval()
    correct = 0
    for i in range(0, len(images), batch_size):
        logits = model(to_pixel_values(images[i : i + batch_size])).logits
        correct += (logits.argmax(-1) == labels[i : i + batch_size]).sum().item()
    return correct / len(images)


def train(
    epochs: int = 3,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    max_shift: int = 2,
    max_train_samples: int | None = None,
    config: MNISTClassifierConfig | None = None,
    log_every: int = 100,
) -> tuple[MNISTClassifierModel, dict]:
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train_x, train_y = mnist_tensors(load_mnist("train"))
    test_x, test_y = mnist_tensors(load_mnist("test"))
    if max_train_samples is not None:
        train_x, train_y = train_x[:max_train_samples], train_y[:max_train_samples]

    model = MNISTClassifierModel(config or MNISTClassifierConfig())
    steps_per_epoch = math.ceil(len(train_x) / batch_size)
    total_steps = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=0.15)

    start, step = time.perf_counter(), 0
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            pixel_values = to_pixel_values(random_shift(train_x[idx], max_shift, generator))
            loss = model(pixel_values, labels=train_y[idx]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if log_every and step % log_every == 0:
                print(f"epoch {epoch} step {step}/{total_steps} loss {loss.item():.4f} "
                      f"({time.perf_counter() - start:.0f}s)", flush=True)
    train_time = time.perf_counter() - start
    test_acc = accuracy(model, test_x, test_y)
    metrics = {"test_accuracy": test_acc, "train_seconds": round(train_time, 1), "epochs": epochs, "seed": seed,
               "train_samples": len(train_x), "torch_threads": torch.get_num_threads()}
    return model.eval(), metrics


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--max_shift", type=int, default=2)
    parser.add_argument("--max_train_samples", type=int, default=None)
    parser.add_argument("--num_threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    model, metrics = train(epochs=args.epochs, seed=args.seed, batch_size=args.batch_size, lr=args.lr,
                           max_shift=args.max_shift, max_train_samples=args.max_train_samples)
    model.save_pretrained(args.output_dir)
    print(json.dumps(metrics))
    return metrics


if __name__ == "__main__":
    main()
