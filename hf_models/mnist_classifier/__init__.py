"""MNIST judge classifier (PreTrainedModel) and the shipped weights used for classifier-feature FID."""

from pathlib import Path

from transformers import AutoConfig, AutoModel

from .configuration_mnist_classifier import MNISTClassifierConfig
from .modeling_mnist_classifier import MNISTClassifierModel, MNISTClassifierOutput, MNISTClassifierPreTrainedModel

AutoConfig.register("mnist_classifier", MNISTClassifierConfig, exist_ok=True)
AutoModel.register(MNISTClassifierConfig, MNISTClassifierModel, exist_ok=True)

JUDGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"


def load_judge(device="cpu") -> MNISTClassifierModel:
    """The shipped judge (`hf_models/mnist_classifier/weights`) in eval mode on `device`."""
    if not (JUDGE_WEIGHTS_DIR / "config.json").exists():
        raise FileNotFoundError(
            f"no judge weights in {JUDGE_WEIGHTS_DIR}; train them with "
            f"`python -m hf_models.metrics.train_classifier --output_dir {JUDGE_WEIGHTS_DIR}`"
        )
    return MNISTClassifierModel.from_pretrained(JUDGE_WEIGHTS_DIR).to(device).eval()


__all__ = [
    "JUDGE_WEIGHTS_DIR",
    "MNISTClassifierConfig",
    "MNISTClassifierModel",
    "MNISTClassifierOutput",
    "MNISTClassifierPreTrainedModel",
    "load_judge",
]
