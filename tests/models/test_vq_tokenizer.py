"""VQTokenizerModel: shapes, training signal, EMA codebook, save/load, remote code, seed size."""

import copy
import json
import os
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from hf_models.vq_tokenizer import VQTokenizerConfig, VQTokenizerModel, VQTokenizerOutput
from tests.helpers import BLOCK_LATENTHEAT, run_without_latentheat


torch.set_num_threads(1)


class VQTokenizerModelTester:
    batch_size = 4

    def get_config(self, **overrides):
        kwargs = dict(
            image_size=8,
            num_channels=1,
            hidden_channels=(8, 16),
            num_res_blocks=1,
            codebook_size=16,
            embedding_dim=4,
        )
        kwargs.update(overrides)
        return VQTokenizerConfig(**kwargs)

    def get_model(self, seed=0, **overrides):
        torch.manual_seed(seed)
        return VQTokenizerModel(self.get_config(**overrides))

    def get_pixel_values(self, seed=0, batch_size=None, channels=1, size=8):
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(batch_size or self.batch_size, channels, size, size, generator=generator) * 2 - 1


tester = VQTokenizerModelTester()


def conv_params(c_in, c_out, k):
    return c_in * c_out * k * k + c_out


def expected_num_parameters(config):
    """Parameter count by formula: conv stem, strided stages with residual blocks, 1x1 pre/post-quant convs."""
    ch = list(config.hidden_channels)
    res = lambda c: conv_params(c, c, 3) + conv_params(c, c, 1)  # noqa: E731
    total = conv_params(config.num_channels, ch[0], 3)  # encoder stem
    prev = ch[0]
    for c in ch:
        total += conv_params(prev, c, 4) + config.num_res_blocks * res(c)
        prev = c
    total += conv_params(ch[-1], config.embedding_dim, 1)  # pre-quant
    total += conv_params(config.embedding_dim, ch[-1], 1)  # post-quant
    rev = list(reversed(ch))
    for i, c in enumerate(rev):
        out = rev[i + 1] if i + 1 < len(rev) else rev[-1]
        total += config.num_res_blocks * res(c) + conv_params(c, out, 4)
    total += conv_params(ch[0], config.num_channels, 3)  # decoder head
    return total  # the codebook is EMA buffers, not parameters


def test_forward_shapes_and_output_type():
    model = tester.get_model()
    x = tester.get_pixel_values()
    out = model(x)
    assert isinstance(out, VQTokenizerOutput)
    assert list(out.keys())[0] == "loss"
    assert out.reconstruction.shape == x.shape
    assert out.codes.shape == (4, 2, 2) and out.codes.dtype == torch.long
    assert 0 <= int(out.codes.min()) and int(out.codes.max()) < 16
    assert torch.allclose(out.loss, out.recon_loss + out.commit_loss)
    assert 1.0 <= float(out.perplexity) <= 16.0
    as_tuple = model(x, return_dict=False)
    assert isinstance(as_tuple, tuple) and torch.allclose(as_tuple[0], model(x).loss, atol=1e-1)


def test_encode_decode_embed_quantize():
    model = tester.get_model().eval()
    x = tester.get_pixel_values()
    codes = model.encode(x)
    assert codes.shape == (4, 2, 2) and codes.dtype == torch.long
    assert model.embed(codes).shape == (4, 4, 2, 2)
    assert model.decode(codes).shape == x.shape
    all_codes = torch.arange(16).view(1, 4, 4)
    assert torch.equal(model.quantize(model.embed(all_codes)), all_codes)
    # encode == the codes of the eval forward
    assert torch.equal(model(x).codes, codes)


@pytest.mark.parametrize(
    "method, bad, match",
    [
        ("encode", torch.zeros(1, 8, 8), "shape"),
        ("encode", torch.zeros(1, 3, 8, 8), "channels"),
        ("encode", torch.zeros(1, 1, 6, 6), "divisible"),
        ("encode", torch.zeros(1, 1, 8, 8, dtype=torch.long), "float"),
        ("decode", torch.full((1, 2, 2), 16), "codebook_size"),
        ("decode", torch.full((1, 2, 2), -1), "codebook_size"),
        ("decode", torch.zeros(1, 4), "shape"),
        ("embed", torch.zeros(1, 2, 2), "integer"),
        ("quantize", torch.zeros(1, 5, 2, 2), "embedding_dim"),
        ("quantize", torch.zeros(5, 2, 2), "shape"),
    ],
)
def test_input_validation(method, bad, match):
    model = tester.get_model()
    with pytest.raises(ValueError, match=match):
        getattr(model, method)(bad)


def test_loss_falls_on_fixed_batch():
    model = tester.get_model().train()
    x = tester.get_pixel_values(batch_size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = model(x).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.75 * losses[0], losses


def test_ema_updates_only_in_train_mode():
    model = tester.get_model()
    x = tester.get_pixel_values()
    names = ("codebook", "ema_cluster_size", "ema_embed_sum")
    before = {n: getattr(model.quantizer, n).clone() for n in names}
    model.eval()
    with torch.no_grad():
        model(x)
        model.encode(x)
    for n in names:
        assert torch.equal(getattr(model.quantizer, n), before[n]), n
    model.train()
    with torch.no_grad():
        model(x)
    for n in names:
        assert not torch.equal(getattr(model.quantizer, n), before[n]), n


def test_dead_codes_are_restarted_from_encoder_outputs():
    model = tester.get_model(dead_code_threshold=1.0).train()
    x = tester.get_pixel_values()
    quantizer = model.quantizer
    with torch.no_grad():
        quantizer.codebook[8:] = 100.0  # far from every latent: never picked
        quantizer.ema_embed_sum[8:] = 100.0
        quantizer.ema_cluster_size[8:] = 0.0  # dead
        latents = model.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, 4)  # (16, D)
        model(x)
    restarted = quantizer.codebook[8:]
    assert (restarted.abs() < 100).all()
    # every restarted code is one of the batch's encoder outputs
    distance = torch.cdist(restarted, latents).min(dim=1).values
    assert torch.allclose(distance, torch.zeros_like(distance), atol=1e-5)
    assert torch.all(quantizer.ema_cluster_size >= 1.0 - 1e-6)


def test_no_restart_when_disabled():
    model = tester.get_model(dead_code_threshold=0.0).train()
    with torch.no_grad():
        model.quantizer.codebook[8:] = 100.0
        model.quantizer.ema_embed_sum[8:] = 100.0
        model(tester.get_pixel_values())
    assert torch.allclose(model.quantizer.codebook[8:], torch.full((8, 4), 100.0), rtol=1e-3)


def test_gradient_checkpointing_matches():
    model = tester.get_model().train()
    reference = copy.deepcopy(model)
    model.activation_checkpointing_enable()
    assert model.is_activation_checkpointing
    x = tester.get_pixel_values()
    model(x).loss.backward()
    reference(x).loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), reference.named_parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert torch.allclose(p.grad, q.grad, atol=1e-6), name


def test_save_and_load_pretrained(tmp_path):
    model = tester.get_model().train()
    x = tester.get_pixel_values()
    with torch.no_grad():
        model(x)  # move the EMA buffers away from their init: they must be saved
    model.eval()
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    assert "quantizer.codebook" in load_file(tmp_path / "model.safetensors")
    loaded = VQTokenizerModel.from_pretrained(tmp_path).eval()
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.config.to_dict()) == strip(model.config.to_dict())
    with torch.no_grad():
        a, b = model(x), loaded(x)
    assert torch.equal(a.codes, b.codes)
    assert torch.allclose(a.reconstruction, b.reconstruction)
    assert torch.equal(model.quantizer.ema_cluster_size, loaded.quantizer.ema_cluster_size)


REMOTE_SCRIPT = BLOCK_LATENTHEAT + textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__name__ == "VQTokenizerModel", type(model)
    assert "hf_models" not in type(model).__module__, type(model).__module__
    x = load_file(sys.argv[2])["x"]
    with torch.no_grad():
        out = model(x)
    save_file({"reconstruction": out.reconstruction.contiguous(), "codes": out.codes}, sys.argv[3])
    """
)


def test_remote_code_loads_without_latentheat(tmp_path):
    model = tester.get_model().eval()
    model.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path / "repo")
    files = os.listdir(tmp_path / "repo")
    assert {"configuration_vq_tokenizer.py", "modeling_vq_tokenizer.py"} <= set(files)
    auto_map = json.loads((tmp_path / "repo" / "config.json").read_text())["auto_map"]
    assert auto_map == {
        "AutoConfig": "configuration_vq_tokenizer.VQTokenizerConfig",
        "AutoModel": "modeling_vq_tokenizer.VQTokenizerModel",
    }
    x = tester.get_pixel_values()
    out = run_without_latentheat(tmp_path, REMOTE_SCRIPT, {"x": x})
    with torch.no_grad():
        expected = model(x)
    assert torch.equal(out["codes"], expected.codes)
    assert torch.allclose(out["reconstruction"], expected.reconstruction)


def test_seed_config_on_meta_device():
    config = VQTokenizerConfig()
    assert config.latent_size == 7 and config.num_codes == 49 and config.hidden_size == 128
    with torch.device("meta"):
        model = VQTokenizerModel(config)
    assert model.num_parameters() == expected_num_parameters(config)
    assert model.quantizer.codebook.shape == (256, 32)
    # and a tiny config matches the formula with real tensors
    tiny = tester.get_model()
    assert tiny.num_parameters() == expected_num_parameters(tiny.config)


def test_config_round_trip_and_auto(tmp_path):
    from transformers import AutoConfig, AutoModel

    config = tester.get_config(hidden_channels=(8, 16, 32), image_size=16)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, VQTokenizerConfig)
    assert loaded.hidden_channels == [8, 16, 32] and loaded.latent_size == 2
    assert isinstance(AutoModel.from_config(loaded), VQTokenizerModel)


@pytest.mark.parametrize(
    "field, value",
    [
        ("image_size", 30),
        ("hidden_channels", ()),
        ("hidden_channels", (8, -1)),
        ("codebook_size", 1),
        ("ema_decay", 1.0),
        ("ema_decay", 0.0),
        ("ema_epsilon", 0.0),
        ("commitment_cost", -0.1),
        ("dead_code_threshold", -1.0),
        ("num_res_blocks", -1),
        ("embedding_dim", 0),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        VQTokenizerConfig(**{field: value})


def test_autocast_bf16_forward_keeps_fp32_codes():
    model = tester.get_model().eval()
    x = tester.get_pixel_values()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        latents = model.encode_latents(x)
        codes = model.quantize(latents)
        out = model(x)
    assert torch.equal(codes, model.quantize(latents.float()))
    assert torch.isfinite(out.loss)


def _ddp_worker(rank, world_size, init_file, result_file):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(tester.get_model(seed=0).train())
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        for step in range(3):
            x = tester.get_pixel_values(seed=10 * step + rank)  # different data per rank
            loss = model(x).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        quantizer = model.module.quantizer
        state = torch.cat([quantizer.codebook.flatten(), quantizer.ema_cluster_size, quantizer.ema_embed_sum.flatten()])
        gathered = [torch.zeros_like(state) for _ in range(world_size)]
        dist.all_gather(gathered, state)
        if rank == 0:
            torch.save(torch.stack(gathered), result_file)
    finally:
        dist.destroy_process_group()
    # leave at once: a worker once hung at interpreter exit on a lingering native thread, and
    # mp.spawn(join=True) would then wait forever
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.distributed
def test_ddp_two_processes_keep_identical_codebooks(tmp_path):
    """EMA statistics are all-reduced and restarts broadcast, so ranks agree even without DDP's buffer broadcast."""
    import torch.multiprocessing as mp

    result = tmp_path / "state.pt"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), str(result)), nprocs=2, join=True)
    states = torch.load(result, weights_only=True)
    assert torch.equal(states[0], states[1])
