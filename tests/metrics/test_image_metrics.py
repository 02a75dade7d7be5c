"""Judge classifier, classifier FID and the other image metrics (uses the MNIST cache; see tests/data/test_mnist.py)."""

from pathlib import Path

import numpy as np
import pytest
import torch

from hf_models.data.mnist import load_mnist, mnist_tensors
from hf_models.metrics.image_metrics import (
    class_accuracy,
    classifier_features,
    classifier_fid,
    frechet_distance,
    images_to_pixel_values,
    predicted_class_entropy,
    psnr,
)
from hf_models.mnist_classifier import (
    JUDGE_WEIGHTS_DIR,
    MNISTClassifierConfig,
    MNISTClassifierModel,
    load_judge,
)

EVALUATE_MODULE = Path(__file__).resolve().parents[2] / "hf_models" / "metrics" / "classifier_fid" / "classifier_fid.py"


@pytest.fixture(scope="module")
def mnist_test():
    return mnist_tensors(load_mnist("test"))


@pytest.fixture(scope="module")
def mnist_train():
    return mnist_tensors(load_mnist("train"))


@pytest.fixture(scope="module")
def judge():
    return load_judge()


# --- model -----------------------------------------------------------------------------------
def test_classifier_model_shapes_loss_and_save_load(tmp_path):
    from transformers import AutoConfig, AutoModel

    torch.manual_seed(0)
    config = MNISTClassifierConfig(conv_channels=(4, 8, 8), hidden_size=16)
    model = MNISTClassifierModel(config).eval()
    x, y = torch.rand(3, 1, 28, 28) * 2 - 1, torch.tensor([0, 3, 9])
    out = model(x, labels=y)
    assert out.logits.shape == (3, 10) and out.features.shape == (3, 16) and out.loss.ndim == 0
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    loss, logits, feats = model(x, labels=y, return_dict=False)
    assert torch.equal(logits, out.logits)

    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == "mnist_classifier"
    reloaded = AutoModel.from_pretrained(tmp_path).eval()
    assert isinstance(reloaded, MNISTClassifierModel)
    assert torch.equal(reloaded(x).logits, out.logits)
    assert reloaded.config.id2label[7] == "7"
    with pytest.raises(ValueError, match="pixel_values"):
        model(torch.zeros(2, 28, 28))


def test_shipped_weights_are_small_and_load_in_eval_mode(judge):
    files = sorted(p.name for p in JUDGE_WEIGHTS_DIR.iterdir())
    assert files == ["config.json", "model.safetensors"]
    assert sum(p.stat().st_size for p in JUDGE_WEIGHTS_DIR.iterdir()) < 2_000_000
    assert not judge.training and judge.config.hidden_size == 128


def test_judge_accuracy_on_2000_test_images(mnist_test, judge):
    images, labels = mnist_test
    assert class_accuracy(images[:2000], labels[:2000], judge) >= 0.98


def test_class_accuracy_true_vs_shuffled_labels(mnist_test, judge):
    images, labels = mnist_test[0][:1000], mnist_test[1][:1000]
    shuffled = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    assert class_accuracy(images, labels, judge) >= 0.98
    assert class_accuracy(images, shuffled, judge) < 0.2
    with pytest.raises(ValueError, match="target labels"):
        class_accuracy(images, labels[:10], judge)


# --- input convention ------------------------------------------------------------------------
def test_input_conventions_agree(mnist_test, judge):
    u8 = mnist_test[0][:64]
    feats, logits = classifier_features(u8, judge)
    assert feats.shape == (64, 128) and logits.shape == (64, 10) and feats.dtype == np.float64
    as01 = u8.float() / 255
    for variant, kwargs in [
        (u8.unsqueeze(1), {}),
        (u8.numpy(), {}),
        (u8.numpy()[..., None], {}),
        (as01, {}),
        (as01.unsqueeze(1).numpy(), {}),
        (as01 * 2 - 1, {"value_range": (-1, 1)}),
    ]:
        np.testing.assert_allclose(classifier_features(variant, judge, **kwargs)[0], feats, atol=1e-5)
    from PIL import Image

    pil = [Image.fromarray(a) for a in u8.numpy()[:4]]
    np.testing.assert_allclose(classifier_features(pil, judge)[0], feats[:4], atol=1e-5)
    assert torch.equal(images_to_pixel_values(u8 > 127), images_to_pixel_values((u8 > 127).to(torch.uint8) * 255))


@pytest.mark.parametrize(
    "bad, match",
    [
        (torch.zeros(2, 28, 28, dtype=torch.int64), "dtype"),
        (torch.zeros(2, 32, 32, dtype=torch.uint8), "shape"),
        (torch.zeros(2, 3, 28, 28), "shape"),
        (torch.full((2, 28, 28), -1.0), "value_range"),
        (torch.full((2, 28, 28), 255.0), "value_range"),
    ],
)
def test_bad_inputs_raise(bad, match):
    with pytest.raises(ValueError, match=match):
        images_to_pixel_values(bad)


# --- Fréchet distance ------------------------------------------------------------------------
def test_frechet_distance_identical_sets_is_zero():
    a = np.random.default_rng(0).normal(size=(2000, 8))
    assert abs(frechet_distance(a, a)) < 1e-6


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(5000, 6)) @ rng.normal(size=(6, 6))  # correlated features
    shift = np.array([1.0, -2.0, 0.5, 0.0, 3.0, 1.5])
    # equal covariances: the distance is the squared mean shift
    assert frechet_distance(a, a + shift) == pytest.approx(shift @ shift, rel=1e-6)
    # b = 2a + shift: S_b = 4 S_a, (S_a S_b)^(1/2) = 2 S_a, so d = |mu_b - mu_a|^2 + tr(S_a)
    mean_shift = (2 * a + shift).mean(0) - a.mean(0)
    expected = mean_shift @ mean_shift + np.trace(np.cov(a, rowvar=False))
    assert frechet_distance(a, 2 * a + shift) == pytest.approx(expected, rel=1e-6)
    # independent samples of two Gaussians: close to the population value
    b = rng.normal(size=(20000, 3)) + np.array([1.0, 0.0, 0.0])
    c = rng.normal(size=(20000, 3)) * 2.0
    assert frechet_distance(b, c) == pytest.approx(1.0 + 3 * (1.0 - 2.0) ** 2, abs=0.1)
    with pytest.raises(ValueError, match="same width"):
        frechet_distance(a, a[:, :3])


def test_fid_floor_and_noise(mnist_test, mnist_train, judge):
    test_images, train_images = mnist_test[0], mnist_train[0]
    floor = classifier_fid(test_images[:1000], train_images[:1000], judge)
    noise = torch.randint(0, 256, (1000, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    noise_fid = classifier_fid(noise, test_images[:1000], judge)
    assert 0 < floor < 15 and noise_fid > 20 * floor


def test_predicted_class_entropy(mnist_test, judge):
    images = mnist_test[0][:1000]
    assert predicted_class_entropy(images, judge) > 3.2  # log2(10) = 3.32 for balanced classes
    assert predicted_class_entropy(torch.zeros(50, 28, 28, dtype=torch.uint8), judge) == pytest.approx(0.0)


def test_psnr():
    target = torch.zeros(4, 28, 28)
    assert psnr(target + 0.1, target, data_range=1.0) == pytest.approx(20.0)
    assert psnr(np.full((2, 3), 25.5), np.zeros((2, 3)), data_range=255) == pytest.approx(20.0)
    assert psnr(target, target, data_range=1.0) == float("inf")
    with pytest.raises(ValueError, match="shape"):
        psnr(target, target[:2], data_range=1.0)


# --- evaluate module -------------------------------------------------------------------------
def test_evaluate_module_loads_by_path_and_matches(mnist_test, mnist_train):
    import evaluate

    generated, reference = mnist_test[0][:300], mnist_train[0][:300]
    expected = classifier_fid(generated, reference)
    for path in (str(EVALUATE_MODULE), str(EVALUATE_MODULE.parent)):
        metric = evaluate.load(path)
        result = metric.compute(predictions=generated.numpy(), references=reference.numpy())
        assert set(result) == {"fid"} and result["fid"] == pytest.approx(expected, rel=1e-6)
    as_float = evaluate.load(str(EVALUATE_MODULE), "float")
    result = as_float.compute(predictions=(generated.float() / 255).numpy(), references=(reference.float() / 255).numpy())
    assert result["fid"] == pytest.approx(expected, rel=1e-4)
