"""Image metrics on MNIST-like samples, measured with the shipped judge classifier.

Image input convention (every function here that takes `images`), as `torch.Tensor`, `np.ndarray`
or a list of PIL images:

- uint8 of shape `(N, 28, 28)`, `(N, 1, 28, 28)` or `(N, 28, 28, 1)`, pixels 0..255 (MNIST: 0 = background);
- bool of the same shapes (binarized images, True = ink);
- float of the same shapes with values in `value_range` (defaults to `(0, 1)`; pass `value_range=(-1, 1)`
  for model outputs in [-1, 1]). Values outside the range (beyond 1e-3) raise `ValueError`, so a
  [-1, 1] tensor is never silently read as [0, 1].

Anything else (other dtypes, other shapes) raises `ValueError`. The judge sees float pixels in [-1, 1].

```python
from hf_models.metrics.image_metrics import classifier_fid, class_accuracy
fid = classifier_fid(samples, test_images[:1000])     # uint8 (N, 28, 28) each
acc = class_accuracy(samples, requested_labels)
```
"""

from __future__ import annotations

import functools
import warnings
from typing import Optional, Sequence, Union

import numpy as np
import scipy.linalg
import torch

from hf_models.mnist_classifier import MNISTClassifierModel, load_judge

ImageBatch = Union[torch.Tensor, np.ndarray, Sequence]

__all__ = [
    "class_accuracy",
    "classifier_features",
    "classifier_fid",
    "frechet_distance",
    "images_to_pixel_values",
    "predicted_class_entropy",
    "psnr",
]


@functools.lru_cache(maxsize=1)
def _default_judge() -> MNISTClassifierModel:
    return load_judge("cpu")


def images_to_pixel_values(images: ImageBatch, value_range: tuple[float, float] = (0.0, 1.0)) -> torch.Tensor:
    """Images in the module's input convention -> float32 `(N, 1, 28, 28)` in [-1, 1] for the judge."""
    if isinstance(images, (list, tuple)) and images and hasattr(images[0], "convert"):  # PIL images
        images = np.stack([np.asarray(im.convert("L"), dtype=np.uint8) for im in images])
    x = torch.as_tensor(np.asarray(images)) if not isinstance(images, torch.Tensor) else images.detach().cpu()
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    elif x.dim() == 4 and x.shape[-1] == 1:
        x = x[..., 0]
    if x.dim() != 3 or tuple(x.shape[1:]) != (28, 28):
        raise ValueError(f"images must have shape (N, 28, 28), (N, 1, 28, 28) or (N, 28, 28, 1); got {tuple(x.shape)}")
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    elif x.dtype == torch.bool:
        x = x.float()
    elif x.is_floating_point():
        lo, hi = value_range
        if hi <= lo:
            raise ValueError(f"value_range={value_range} must satisfy low < high")
        x = x.float()
        if x.numel() and (x.min().item() < lo - 1e-3 or x.max().item() > hi + 1e-3):
            raise ValueError(
                f"float images must lie in value_range={value_range}, got [{x.min().item():.3f}, {x.max().item():.3f}]"
                " (pass value_range=(-1, 1) for images in [-1, 1], or uint8 0..255)"
            )
        x = ((x - lo) / (hi - lo)).clamp(0.0, 1.0)
    else:
        raise ValueError(f"images must be uint8, bool or float; got dtype {x.dtype}")
    return (x * 2.0 - 1.0).unsqueeze(1)  # (N, 1, 28, 28) in [-1, 1]


@torch.no_grad()
def classifier_features(
    images: ImageBatch,
    judge: Optional[MNISTClassifierModel] = None,
    batch_size: int = 500,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> tuple[np.ndarray, np.ndarray]:
    """Penultimate-layer features and logits of the judge.

    Returns:
        features (`np.ndarray` float64 of shape `(N, hidden_size)`), logits (`np.ndarray` float64 of shape `(N, 10)`).
    """
    judge = judge if judge is not None else _default_judge()
    pixel_values = images_to_pixel_values(images, value_range)
    device = next(judge.parameters()).device
    was_training = judge.training
    judge.eval()
    feats, logits = [], []
    for i in range(0, len(pixel_values), batch_size):
        out = judge(pixel_values[i : i + batch_size].to(device))
        feats.append(out.features.double().cpu())
        logits.append(out.logits.double().cpu())
    judge.train(was_training)
    if not feats:
        hidden, classes = judge.config.hidden_size, judge.config.num_labels
        return np.zeros((0, hidden)), np.zeros((0, classes))
    return torch.cat(feats).numpy(), torch.cat(logits).numpy()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (rows = samples), in float64.

    d = |mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2)); a singular product gets `eps` added to the
    diagonals (as in pytorch-fid), and the small imaginary part `sqrtm` can return is dropped.
    """
    a, b = np.asarray(feats_a, dtype=np.float64), np.asarray(feats_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be 2-D with the same width, got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"need at least 2 samples per set, got {len(a)} and {len(b)}")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.atleast_2d(np.cov(a, rowvar=False)), np.atleast_2d(np.cov(b, rowvar=False))
    with warnings.catch_warnings():
        # post-ReLU features have dead units, so the product is often singular; sqrtm still returns a finite
        # root then, and the offset below handles the cases where it does not
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(cov_a)) * eps
        covmean = scipy.linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    if np.iscomplexobj(covmean):
        imag = np.abs(np.diagonal(covmean).imag).max()
        scale = max(1.0, np.abs(np.diagonal(covmean).real).max())
        if imag > 1e-3 * scale:
            warnings.warn(f"sqrtm returned a large imaginary component ({imag:.3g}); FID may be inaccurate")
        covmean = covmean.real
    diff = mu_a - mu_b
    return float(diff @ diff + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(covmean))


def classifier_fid(
    generated: ImageBatch,
    reference: ImageBatch,
    judge: Optional[MNISTClassifierModel] = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    batch_size: int = 500,
) -> float:
    """FID between two image sets on the judge's penultimate features (both in the input convention above).

    Compare sets of the same size: the floor depends on N. With the shipped judge, real test vs real
    train images give 0.86 at 10k and 9.2 +- 1.5 at 1k (10 disjoint pairs); uniform noise vs test gives
    about 2,570 (the judge calls all of it "8", see `predicted_class_entropy`).
    """
    feats_g, _ = classifier_features(generated, judge, batch_size, value_range)
    feats_r, _ = classifier_features(reference, judge, batch_size, value_range)
    return frechet_distance(feats_g, feats_r)


def class_accuracy(
    images: ImageBatch,
    target_labels: Union[torch.Tensor, np.ndarray, Sequence[int]],
    judge: Optional[MNISTClassifierModel] = None,
    value_range: tuple[float, float] = (0.0, 1.0),
) -> float:
    """Share of samples generated for class c that the judge labels c."""
    targets = np.asarray(target_labels.cpu() if isinstance(target_labels, torch.Tensor) else target_labels).reshape(-1)
    _, logits = classifier_features(images, judge, value_range=value_range)
    if len(targets) != len(logits):
        raise ValueError(f"got {len(logits)} images but {len(targets)} target labels")
    return float((logits.argmax(-1) == targets).mean())


def predicted_class_entropy(
    images: ImageBatch,
    judge: Optional[MNISTClassifierModel] = None,
    value_range: tuple[float, float] = (0.0, 1.0),
    base: float = 2.0,
) -> float:
    """Entropy (bits by default) of the histogram of the judge's predicted classes.

    log2(10) = 3.32 bits when every class is predicted equally often (balanced real data gives about that);
    near 0 when the judge puts everything in one class (it labels noise "8" with confidence), so read
    it together with `class_accuracy` / FID for noise-like samples.
    """
    _, logits = classifier_features(images, judge, value_range=value_range)
    counts = np.bincount(logits.argmax(-1), minlength=logits.shape[1]).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(abs(-(p * np.log(p)).sum() / np.log(base)))  # abs: no -0.0 for a single class


def psnr(
    reconstruction: Union[torch.Tensor, np.ndarray],
    target: Union[torch.Tensor, np.ndarray],
    data_range: float,
) -> float:
    """Peak signal-to-noise ratio in dB, 10 log10(data_range^2 / MSE), with the MSE over all elements.

    `data_range` is the span of the pixel values (255 for uint8, 1 for [0, 1], 2 for [-1, 1]).
    Returns `inf` for identical inputs.
    """
    rec = torch.as_tensor(np.asarray(reconstruction) if not isinstance(reconstruction, torch.Tensor) else reconstruction)
    tgt = torch.as_tensor(np.asarray(target) if not isinstance(target, torch.Tensor) else target)
    if rec.shape != tgt.shape:
        raise ValueError(f"reconstruction {tuple(rec.shape)} and target {tuple(tgt.shape)} differ in shape")
    mse = torch.mean((rec.detach().double().cpu() - tgt.detach().double().cpu()) ** 2).item()
    if mse == 0:
        return float("inf")
    return float(10.0 * np.log10(data_range**2 / mse))
