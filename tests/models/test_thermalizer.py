"""ThermalizerModel: shapes and losses, input checks, periodic equivariance, training signal, normalization, save/load,
remote code, config validation, seed size on the meta device."""

import copy
import json
import os
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_models.thermalizer import ThermalizerConfig, ThermalizerModel, ThermalizerOutput
from hf_models.thermalizer.modeling_thermalizer import ThermalizerResBlock
from tests.helpers import BLOCK_LATENTHEAT, run_without_latentheat


torch.set_num_threads(1)

# ThermalizerConfig() (in_channels=64, sample_size=16, block_out_channels=(128, 256, 256), layers_per_block=2,
# num_train_timesteps=1000): 16.84M parameters; test_seed_config_on_meta_device checks it against the formula.
SEED_NUM_PARAMETERS = 16_843_688


class ThermalizerModelTester:
    batch_size = 4

    def get_config(self, **overrides):
        kwargs = dict(
            in_channels=4,
            sample_size=8,
            block_out_channels=(8, 16),
            layers_per_block=1,
            norm_num_groups=4,
            num_train_timesteps=10,
        )
        kwargs.update(overrides)
        return ThermalizerConfig(**kwargs)

    def get_model(self, seed=0, randomize=False, **overrides):
        """`randomize` perturbs every parameter, so the zero-initialised output conv predicts something."""
        torch.manual_seed(seed)
        model = ThermalizerModel(self.get_config(**overrides))
        if randomize:
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(0.2 * torch.randn_like(p))
        return model

    def get_sample(self, seed=0, batch_size=None, channels=4, size=8):
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch_size or self.batch_size, channels, size, size, generator=generator)


tester = ThermalizerModelTester()


def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def res_params(c_in, c_out):
    skip = conv_params(c_in, c_out, 1) if c_in != c_out else 0
    return 2 * c_in + conv_params(c_in, c_out, 3) + 2 * c_out + conv_params(c_out, c_out, 3) + skip


def expected_num_parameters(config):
    """Parameter count by formula: stem, down levels (+ stride-2 convs), mid, level head, up levels with skip
    concatenations (+ upsample convs), output norm and conv."""
    ch, n, layers = list(config.block_out_channels), len(config.block_out_channels), config.layers_per_block
    total = conv_params(config.in_channels, ch[0], 3)
    prev = ch[0]
    for i, c in enumerate(ch):
        total += res_params(prev, c) + (layers - 1) * res_params(c, c)
        total += conv_params(c, c, 3) if i < n - 1 else 0
        prev = c
    total += 2 * res_params(ch[-1], ch[-1])
    total += 2 * ch[-1] + ch[-1] * config.num_train_timesteps + config.num_train_timesteps  # level head
    for i in reversed(range(n)):
        total += res_params(prev + ch[i], ch[i]) + (layers - 1) * res_params(ch[i], ch[i])
        total += conv_params(ch[i], ch[i], 3) if i > 0 else 0
        prev = ch[i]
    return total + 2 * ch[0] + conv_params(ch[0], config.in_channels, 3)


# ---------------------------------------------------------------------------------------------------------------------
# forward, losses, input checks
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_shapes_and_output_type():
    model = tester.get_model()
    x = tester.get_sample()
    out = model(x, noise=torch.randn_like(x), timesteps=torch.tensor([0, 3, 9, 5]))
    assert isinstance(out, ThermalizerOutput)
    assert list(out.keys()) == ["loss", "noise_loss", "level_loss", "noise_pred", "level_logits"]
    assert out.noise_pred.shape == x.shape
    assert out.level_logits.shape == (4, 10)
    assert out.loss.shape == out.noise_loss.shape == out.level_loss.shape == ()
    # the output conv starts at zero: the untrained model predicts no noise
    assert torch.equal(out.noise_pred, torch.zeros_like(x))
    # any H, W divisible by the down-sampling factor, not only sample_size
    assert model(tester.get_sample(size=6, batch_size=2)).noise_pred.shape == (2, 4, 6, 6)
    levels = model.predict_level(x)
    assert levels.shape == (4,) and levels.dtype == torch.long
    assert torch.equal(levels, model(x).level_logits.argmax(-1))


@pytest.mark.parametrize("weight", [0.0, 0.3, 2.0])
def test_loss_is_noise_loss_plus_weighted_level_loss(weight):
    model = tester.get_model(randomize=True, level_loss_weight=weight)
    x = tester.get_sample()
    noise, timesteps = torch.randn_like(x), torch.tensor([1, 2, 3, 9])
    out = model(x, noise=noise, timesteps=timesteps)
    assert torch.equal(out.noise_loss, torch.nn.functional.mse_loss(out.noise_pred, noise))
    assert torch.equal(out.level_loss, torch.nn.functional.cross_entropy(out.level_logits, timesteps))
    assert torch.equal(out.loss, out.noise_loss + weight * out.level_loss)
    assert out.noise_loss > 0 and out.level_loss > 0
    # a scalar timestep is broadcast over the batch
    scalar = model(x, noise=noise, timesteps=3)
    assert torch.allclose(scalar.level_loss, torch.nn.functional.cross_entropy(out.level_logits, torch.full((4,), 3)))


def test_no_loss_without_targets():
    model = tester.get_model(randomize=True)
    x = tester.get_sample()
    out = model(x)
    assert out.loss is None and out.noise_loss is None and out.level_loss is None
    assert list(out.keys()) == ["noise_pred", "level_logits"]
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 2
    assert torch.equal(as_tuple[0], out.noise_pred) and torch.equal(as_tuple[1], out.level_logits)
    with_loss = model(x, noise=torch.randn_like(x), timesteps=torch.zeros(4, dtype=torch.long), return_dict=False)
    assert len(with_loss) == 5 and torch.equal(with_loss[3], out.noise_pred)


X = torch.zeros(2, 4, 8, 8)
T = torch.tensor([0, 1])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(sample=torch.zeros(4, 8, 8)), r"\(batch, in_channels, height, width\), got \(4, 8, 8\)"),
        (dict(sample=torch.zeros(2, 3, 8, 8)), r"\(2, 3, 8, 8\): 3 channels, config.in_channels=4"),
        (dict(sample=torch.zeros(2, 4, 8, 7)), r"width=7 must be divisible by .*=2"),
        (dict(sample=torch.zeros(2, 4, 5, 8)), r"height=5 .* divisible"),
        (dict(sample=torch.zeros(2, 4, 8, 8, dtype=torch.long)), "float"),
        (dict(sample=X, noise=X), "noise was given without timesteps"),
        (dict(sample=X, timesteps=T), "timesteps was given without noise"),
        (dict(sample=X, noise=torch.zeros(2, 4, 4, 4), timesteps=T), r"shape of sample \(2, 4, 8, 8\)"),
        (dict(sample=X, noise=X, timesteps=torch.tensor([0, 10])), r"\[0, num_train_timesteps=10\), got .*\[0, 10\]"),
        (dict(sample=X, noise=X, timesteps=torch.tensor([-1, 0])), r"\[0, num_train_timesteps=10\)"),
        (dict(sample=X, noise=X, timesteps=torch.tensor([0.0, 1.0])), "integer"),
        (dict(sample=X, noise=X, timesteps=torch.tensor([0, 1, 2])), r"shape \(batch,\)=\(2,\)"),
    ],
)
def test_input_validation(kwargs, match):
    model = tester.get_model()
    with pytest.raises(ValueError, match=match):
        model(**kwargs)


def test_normalize_checks_its_input():
    model = tester.get_model()
    with pytest.raises(ValueError, match="embeddings has shape"):
        model.normalize(torch.zeros(1, 5, 8, 8))
    with pytest.raises(ValueError, match="sample has shape"):
        model.denormalize(torch.zeros(1, 5, 8, 8))


# ---------------------------------------------------------------------------------------------------------------------
# periodic domain
# ---------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("padding_mode", ["circular", "zeros"])
def test_circular_padding_is_shift_equivariant(padding_mode):
    """A periodic roll of the input by a multiple of the down-sampling factor rolls the noise prediction the same way
    and leaves the level logits unchanged, with circular padding; zero padding breaks it at the borders."""
    model = tester.get_model(randomize=True, padding_mode=padding_mode, block_out_channels=(8, 16, 16)).double().eval()
    assert model.config.downsample_factor == 4
    x = tester.get_sample().double()
    with torch.no_grad():
        out = model(x)
        errors = []
        for shifts in [(4, 0), (0, 4), (4, 8)]:
            rolled = model(torch.roll(x, shifts=shifts, dims=(2, 3)))
            errors.append(
                (rolled.noise_pred - torch.roll(out.noise_pred, shifts=shifts, dims=(2, 3))).abs().max().item()
            )
            errors.append((rolled.level_logits - out.level_logits).abs().max().item())
    scale = out.noise_pred.abs().mean().item()
    assert scale > 1e-2  # a real prediction, not the zero-initialised output
    if padding_mode == "circular":
        assert max(errors) < 1e-10, errors
    else:
        assert min(errors[::2]) > 1e-3 * scale, errors


# ---------------------------------------------------------------------------------------------------------------------
# training signal
# ---------------------------------------------------------------------------------------------------------------------


def toy_embeddings(num, generator, codebook):
    """Grids `(num, D, 8, 8)` of codebook vectors: each row of the grid repeats one code (a periodic structure the
    UNet can learn), codes drawn at random."""
    codes = torch.randint(0, codebook.shape[0], (num, 8, 1), generator=generator).expand(num, 8, 8)
    return codebook[codes].permute(0, 3, 1, 2).contiguous()  # (num, D, 8, 8)


def test_training_lowers_both_losses_and_level_head_tracks_the_noise_level():
    """200 Adam steps on grids of fixed random codebook vectors, noised by a DDPM cosine schedule: both losses fall
    on held-out data, and the predicted level of held-out grids correlates with the true level (Spearman > 0.8)."""
    from diffusers import DDPMScheduler
    from scipy.stats import spearmanr

    num_timesteps = 100
    generator = torch.Generator().manual_seed(0)
    codebook = torch.randn(6, 4, generator=generator) * 2.0 + 1.0  # (K, D), far from N(0, 1)
    sample = toy_embeddings(512, generator, codebook)
    mean = sample.mean(dim=(0, 2, 3)).tolist()
    std = sample.std(dim=(0, 2, 3)).tolist()
    model = tester.get_model(
        block_out_channels=(16, 32), num_train_timesteps=num_timesteps, data_mean=mean, data_std=std
    ).train()
    scheduler = DDPMScheduler(num_train_timesteps=num_timesteps, beta_schedule="squaredcos_cap_v2")

    def noised_batch(num, timesteps=None):
        clean = model.normalize(toy_embeddings(num, generator, codebook))
        noise = torch.randn(clean.shape, generator=generator)
        if timesteps is None:
            timesteps = torch.randint(0, num_timesteps, (num,), generator=generator)
        return scheduler.add_noise(clean, noise, timesteps), noise, timesteps

    held_out = noised_batch(256)

    def held_out_losses():
        model.eval()
        with torch.no_grad():
            out = model(held_out[0], noise=held_out[1], timesteps=held_out[2])
        model.train()
        return out.noise_loss.item(), out.level_loss.item()

    before = held_out_losses()
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    for _ in range(200):
        x, noise, timesteps = noised_batch(32)
        loss = model(x, noise=noise, timesteps=timesteps).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = held_out_losses()
    assert after[0] < 0.5 * before[0], (before, after)  # 1.0 (zero prediction) -> ~0.15
    assert after[1] < before[1] - 0.5, (before, after)  # ln(100) = 4.61 -> ~3.6; neighbouring levels stay ambiguous

    levels = torch.tensor([5, 20, 35, 50, 65, 80, 95]).repeat_interleave(12)
    x, _, _ = noised_batch(len(levels), levels)
    model.eval()
    predicted = model.predict_level(x)
    correlation = spearmanr(levels.numpy(), predicted.numpy()).statistic
    assert correlation > 0.8, (correlation, predicted.view(7, 12).float().mean(1))


def test_gradient_checkpointing_matches():
    model = tester.get_model(randomize=True).train()
    reference = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    resnets = [m for m in model.modules() if isinstance(m, ThermalizerResBlock)]
    assert len(resnets) == 6 and all(m.gradient_checkpointing for m in resnets)
    x = tester.get_sample()
    noise, timesteps = torch.randn_like(x), torch.tensor([0, 1, 2, 3])
    model(x, noise=noise, timesteps=timesteps).loss.backward()
    reference(x, noise=noise, timesteps=timesteps).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


# ---------------------------------------------------------------------------------------------------------------------
# normalization, save/load, remote code
# ---------------------------------------------------------------------------------------------------------------------

MEAN = [0.5, -1.0, 2.0, 0.0]
STD = [2.0, 0.5, 1.0, 3.0]


def test_normalize_round_trip():
    model = tester.get_model(data_mean=MEAN, data_std=STD)
    x = tester.get_sample() * 3 + 1
    normalized = model.normalize(x)
    expected = (x - torch.tensor(MEAN).view(1, 4, 1, 1)) / torch.tensor(STD).view(1, 4, 1, 1)
    assert torch.allclose(normalized, expected)
    assert torch.allclose(model.denormalize(normalized), x, atol=1e-6)
    # bf16 inputs stay bf16
    assert model.normalize(x.bfloat16()).dtype == torch.bfloat16
    identity = tester.get_model()
    assert torch.equal(identity.normalize(x), x) and torch.equal(identity.denormalize(x), x)
    only_mean = tester.get_model(data_mean=MEAN)
    assert torch.allclose(only_mean.normalize(x), x - torch.tensor(MEAN).view(1, 4, 1, 1))


def test_save_and_load_pretrained(tmp_path):
    model = tester.get_model(randomize=True, data_mean=MEAN, data_std=STD).eval()
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert "conv_out.weight" in load_file(tmp_path / "model.safetensors")
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["data_mean"] == MEAN and saved["data_std"] == STD and saved["model_type"] == "thermalizer"
    loaded = ThermalizerModel.from_pretrained(tmp_path).eval()
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config.to_dict()) == strip(model.config.to_dict())
    x = tester.get_sample()
    with torch.no_grad():
        a, b = model(model.normalize(x)), loaded(loaded.normalize(x))
    assert torch.equal(a.noise_pred, b.noise_pred) and torch.equal(a.level_logits, b.level_logits)
    assert torch.equal(model.denormalize(a.noise_pred), loaded.denormalize(b.noise_pred))


REMOTE_SCRIPT = BLOCK_LATENTHEAT + textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__name__ == "ThermalizerModel", type(model)
    assert "hf_models" not in type(model).__module__, type(model).__module__
    x = load_file(sys.argv[2])["x"]
    with torch.no_grad():
        out = model(model.normalize(x))
    save_file({"noise_pred": out.noise_pred.contiguous(), "level_logits": out.level_logits.contiguous(),
               "level": model.predict_level(model.normalize(x))}, sys.argv[3])
    """
)


def test_remote_code_loads_without_latentheat(tmp_path):
    model = tester.get_model(randomize=True, data_mean=MEAN, data_std=STD).eval()
    model.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path / "repo")
    files = os.listdir(tmp_path / "repo")
    assert {"configuration_thermalizer.py", "modeling_thermalizer.py"} <= set(files)
    auto_map = json.loads((tmp_path / "repo" / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_thermalizer.ThermalizerConfig",
        "AutoModel": "modeling_thermalizer.ThermalizerModel",
    }
    x = tester.get_sample()
    out = run_without_latentheat(tmp_path, REMOTE_SCRIPT, {"x": x})
    with torch.no_grad():
        expected = model(model.normalize(x))
    assert torch.allclose(out["noise_pred"], expected.noise_pred, atol=1e-6)
    assert torch.allclose(out["level_logits"], expected.level_logits, atol=1e-6)
    assert torch.equal(out["level"], expected.level_logits.argmax(-1))


# ---------------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------------


def test_seed_config_on_meta_device():
    """Seed size (64-d embeddings on a 16x16 grid, levels 128/256/256, 1000 noise levels): 16,843,688 parameters."""
    config = ThermalizerConfig()
    assert config.block_out_channels == [128, 256, 256] and config.hidden_size == 256
    assert config.downsample_factor == 4 and config.padding_mode == "circular"
    with torch.device("meta"):
        model = ThermalizerModel(config)
    assert model.num_parameters() == expected_num_parameters(config) == SEED_NUM_PARAMETERS
    assert model.level_head.proj.weight.shape == (1000, 256)
    tiny = tester.get_model(block_out_channels=(8, 16, 16), layers_per_block=2)
    assert tiny.num_parameters() == expected_num_parameters(tiny.config)


def test_config_round_trip_and_auto(tmp_path):
    from transformers import AutoConfig, AutoModel

    config = tester.get_config(block_out_channels=(8, 16, 16), data_mean=MEAN, data_std=STD, padding_mode="zeros")
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, ThermalizerConfig)
    assert loaded.block_out_channels == [8, 16, 16] and loaded.data_mean == MEAN and loaded.data_std == STD
    assert loaded.padding_mode == "zeros"
    assert isinstance(AutoModel.from_config(loaded), ThermalizerModel)


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("in_channels", 0, "expected an int >= 1"),
        ("sample_size", 6, r"not divisible by 2\*\*\(len\(block_out_channels\) - 1\)=4"),
        ("block_out_channels", (), "non-empty list"),
        ("block_out_channels", (128, -256), "non-empty list"),
        ("block_out_channels", (128, 200), r"\[200\] not divisible by norm_num_groups=32"),
        ("norm_num_groups", 48, "not divisible by norm_num_groups=48"),
        ("layers_per_block", 0, "expected an int >= 1"),
        ("num_train_timesteps", 1, "expected an int >= 2"),
        ("num_train_timesteps", 10.5, "expected an int >= 2"),
        ("level_loss_weight", -1.0, "expected a finite float >= 0"),
        ("dropout", 1.0, "0 <= dropout < 1"),
        ("padding_mode", "reflect", "'circular' or 'zeros'"),
        ("data_mean", [0.0] * 3, "length 3, expected in_channels=64"),
        ("data_mean", "zero", "list of 64 finite floats"),
        ("data_std", [1.0] * 63 + [0.0], "every entry must be > 0"),
        ("data_std", [1.0] * 63 + [float("nan")], "finite floats"),
        ("initializer_range", 0.0, "expected a finite float > 0"),
    ],
)
def test_config_validation(field, value, match):
    with pytest.raises(ValueError, match=field) as error:
        ThermalizerConfig(**{field: value})
    assert error.match(match)
