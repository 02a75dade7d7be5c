"""TokComVAEModel and TokComDenoiserModel: shapes and losses, chunk independence, encoder causality, attention
implementations, training signal, save/load, remote code, config validation, seed sizes on the meta device."""

import json
import os
import textwrap

import pytest
import torch

from hf_models.tokcom import (
    TokComDenoiserConfig,
    TokComDenoiserModel,
    TokComDenoiserOutput,
    TokComVAEConfig,
    TokComVAEModel,
    TokComVAEOutput,
)
from tests.helpers import BLOCK_LATENTHEAT, run_without_latentheat

torch.set_num_threads(1)

BACKBONE = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 64,
}
VOCAB = 50


def vae_config(**overrides):
    kwargs = dict(vocab_size=VOCAB, chunk_size=4, latent_size=16, backbone_config=dict(BACKBONE))
    kwargs.update(overrides)
    return TokComVAEConfig(**kwargs)


def denoiser_config(**overrides):
    kwargs = dict(latent_size=16, max_chunks=8, backbone_config=dict(BACKBONE))
    kwargs.update(overrides)
    return TokComDenoiserConfig(**kwargs)


def get_vae(seed=0, **overrides):
    torch.manual_seed(seed)
    return TokComVAEModel(vae_config(**overrides))


def get_denoiser(seed=0, randomize=True, **overrides):
    torch.manual_seed(seed)
    model = TokComDenoiserModel(denoiser_config(**overrides))
    if randomize:  # adaLN-Zero starts every block (and the output) at 0: give them weights to test the wiring
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "adaLN" in name or "proj_out" in name:
                    p.normal_(0, 0.1)
    return model


def ids(batch=2, length=8, seed=0):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------------------------------
# VAE
# ---------------------------------------------------------------------------------------------------------------------


def test_vae_shapes_and_loss():
    vae = get_vae().train()
    x = ids()
    out = vae(x, labels=x, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, TokComVAEOutput)
    assert out.logits.shape == (2, 8, VOCAB) and out.latents.shape == (2, 2, 16) and out.mean.shape == (2, 2, 16)
    assert torch.isfinite(out.loss) and out.kl_loss >= 0
    # kl_weight 0 (the seed): the loss is the cross-entropy alone
    assert torch.equal(out.loss, out.ce_loss)
    weighted = get_vae(kl_weight=0.5).train()(x, labels=x, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(weighted.loss, weighted.ce_loss + 0.5 * weighted.kl_loss)
    # in training the decoded latents are a posterior sample; in eval the means
    assert not torch.equal(out.latents, out.mean)
    vae.eval()
    assert torch.equal(vae(x).latents, vae(x).mean)
    no_sample = get_vae(sample_posterior=False).train()(x, labels=x)
    assert torch.equal(no_sample.latents, no_sample.mean)
    as_tuple = vae(x, return_dict=False)  # no labels: no loss terms; the tuple starts with the logits
    assert isinstance(as_tuple, tuple) and torch.equal(as_tuple[0], vae(x).logits)


def test_chunks_are_encoded_and_decoded_independently():
    vae = get_vae().eval()
    x = ids(batch=1, length=12)
    y = x.clone()
    y[0, 5] = (x[0, 5] + 1) % VOCAB  # a token of the second chunk
    with torch.no_grad():
        a, b = vae.encode(x), vae.encode(y)
        assert torch.equal(a[:, 0], b[:, 0]) and torch.equal(a[:, 2], b[:, 2]) and not torch.equal(a[:, 1], b[:, 1])
        la, lb = vae.decode(a), vae.decode(b)
    assert torch.equal(la[:, :4], lb[:, :4]) and torch.equal(la[:, 8:], lb[:, 8:]) and not torch.equal(la[:, 4:8], lb[:, 4:8])


def test_encoder_reads_the_whole_chunk_through_its_last_position():
    """The latent comes from the last position of a causal stack: every token of the chunk moves it."""
    vae = get_vae().eval()
    x = ids(batch=1, length=4)
    with torch.no_grad():
        base = vae.encode(x)
        for pos in range(4):
            y = x.clone()
            y[0, pos] = (x[0, pos] + 1) % VOCAB
            assert not torch.allclose(vae.encode(y), base), pos


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_attention_implementations_agree(impl):
    torch.manual_seed(0)
    reference = TokComVAEModel._from_config(vae_config(), attn_implementation="eager").eval()
    torch.manual_seed(0)
    other = TokComVAEModel._from_config(vae_config(), attn_implementation=impl).eval()
    assert other.config.backbone_config._attn_implementation == impl
    x = ids()
    with torch.no_grad():
        assert torch.allclose(reference(x).logits, other(x).logits, atol=1e-5)
    torch.manual_seed(0)
    d_ref = TokComDenoiserModel._from_config(denoiser_config(), attn_implementation="eager")
    torch.manual_seed(0)
    d_other = TokComDenoiserModel._from_config(denoiser_config(), attn_implementation=impl)
    with torch.no_grad():
        for m in (d_ref, d_other):
            for name, p in m.named_parameters():
                if "adaLN" in name or "proj_out" in name:
                    p.copy_(torch.linspace(-0.1, 0.1, p.numel()).view_as(p))
        z, t = torch.randn(2, 8, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.2, 0.7])
        assert torch.allclose(d_ref(z, t).sample, d_other(z, t).sample, atol=1e-5)


def test_vae_input_errors():
    vae = get_vae()
    with pytest.raises(ValueError, match="seq_len=6 is not a positive multiple of chunk_size=4"):
        vae(ids(length=6))
    with pytest.raises(ValueError, match=r"outside \[0, vocab_size=50\)"):
        vae(torch.full((1, 4), VOCAB))
    with pytest.raises(ValueError, match=r"input_ids must be \(batch, seq_len\)"):
        vae(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="latent_size=16"):
        vae.decode(torch.zeros(1, 2, 8))


def test_vae_learns_to_reconstruct():
    """A few hundred steps on a fixed set of chunks: the reconstruction accuracy rises far above chance."""
    vae = get_vae(seed=1)
    x = ids(batch=16, length=8, seed=3)
    opt = torch.optim.AdamW(vae.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    vae.train()
    first = None
    for _ in range(300):
        out = vae(x, labels=x, generator=gen)
        first = out.loss.item() if first is None else first
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        accuracy = (vae(x).logits.argmax(-1) == x).float().mean().item()
    assert out.loss.item() < 0.25 * first and accuracy > 0.75, (first, out.loss.item(), accuracy)  # chance: 0.02


# ---------------------------------------------------------------------------------------------------------------------
# denoiser
# ---------------------------------------------------------------------------------------------------------------------


def test_denoiser_shapes_zero_init_and_loss():
    fresh = get_denoiser(randomize=False)
    z = torch.randn(3, 5, 16)
    out = fresh(z, torch.rand(3), target=z)
    assert isinstance(out, TokComDenoiserOutput) and out.sample.shape == (3, 5, 16)
    assert torch.count_nonzero(out.sample) == 0  # adaLN-Zero and a zero output layer: the untrained model predicts 0
    assert torch.allclose(out.loss, z.pow(2).mean())
    model = get_denoiser()
    a = model(z, 0.3).sample
    assert torch.equal(a, model(z, torch.full((3,), 0.3)).sample)  # a number is every row's time
    assert not torch.allclose(a, model(z, 0.8).sample)  # the time conditions the prediction


def test_denoiser_is_bidirectional_and_input_errors():
    model = get_denoiser().eval()
    z = torch.randn(1, 6, 16)
    y = z.clone()
    y[0, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(z, 0.5).sample[0, 0], model(y, 0.5).sample[0, 0])  # the first reads the last
    with pytest.raises(ValueError, match="at most max_chunks=8"):
        model(torch.zeros(1, 9, 16), 0.5)
    with pytest.raises(ValueError, match=r"latent_size=16"):
        model(torch.zeros(1, 4, 8), 0.5)
    with pytest.raises(ValueError, match=r"timesteps must be a number or \(batch=2,\)"):
        model(torch.zeros(2, 4, 16), torch.zeros(3))


# ---------------------------------------------------------------------------------------------------------------------
# save / load / remote code
# ---------------------------------------------------------------------------------------------------------------------


def test_save_and_load_pretrained(tmp_path):
    vae, den = get_vae().eval(), get_denoiser().eval()
    vae.save_pretrained(tmp_path / "vae")
    den.save_pretrained(tmp_path / "den")
    for sub in ("vae", "den"):
        files = os.listdir(tmp_path / sub)
        assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["model_type"] == "tokcom_vae" and saved["backbone_config"]["hidden_size"] == 32
    vae2 = TokComVAEModel.from_pretrained(tmp_path / "vae").eval()
    den2 = TokComDenoiserModel.from_pretrained(tmp_path / "den").eval()
    assert vae2.config.backbone_config.num_key_value_heads == 2 and den2.config.backbone_config.vocab_size == 1
    x, z = ids(), torch.randn(2, 4, 16)
    with torch.no_grad():
        assert torch.equal(vae(x).logits, vae2(x).logits)
        assert torch.equal(den(z, 0.4).sample, den2(z, 0.4).sample)


REMOTE_SCRIPT = BLOCK_LATENTHEAT + textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModel
    vae = AutoModel.from_pretrained(sys.argv[1] + "/vae", trust_remote_code=True).eval()
    den = AutoModel.from_pretrained(sys.argv[1] + "/den", trust_remote_code=True).eval()
    assert type(vae).__name__ == "TokComVAEModel" and "hf_models" not in type(vae).__module__, type(vae)
    assert type(den).__name__ == "TokComDenoiserModel" and "hf_models" not in type(den).__module__, type(den)
    inputs = load_file(sys.argv[2])
    with torch.no_grad():
        save_file({"logits": vae(inputs["ids"]).logits.contiguous(),
                   "sample": den(inputs["z"], 0.4).sample.contiguous()}, sys.argv[3])
    """
)


def test_remote_code_loads_without_latentheat(tmp_path):
    vae, den = get_vae().eval(), get_denoiser().eval()
    vae.register_for_auto_class("AutoModel")
    den.register_for_auto_class("AutoModel")
    vae.save_pretrained(tmp_path / "repo" / "vae")
    den.save_pretrained(tmp_path / "repo" / "den")
    auto_map = json.loads((tmp_path / "repo" / "vae" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_tokcom.TokComVAEConfig", "AutoModel": "modeling_tokcom.TokComVAEModel"}
    x, z = ids(), torch.randn(2, 4, 16)
    out = run_without_latentheat(tmp_path, REMOTE_SCRIPT, {"ids": x, "z": z})
    with torch.no_grad():
        assert torch.allclose(out["logits"], vae(x).logits, atol=1e-6)
        assert torch.allclose(out["sample"], den(z, 0.4).sample, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------------


def test_seed_configs_on_meta_device():
    """The seed sizes: hidden 896, 24 layers, 14/2 heads, MLP 4864, CodeLlama vocabulary, chunks of 4, 256 latents."""
    vae_cfg, den_cfg = TokComVAEConfig(), TokComDenoiserConfig()
    bb = vae_cfg.backbone_config
    assert (bb.hidden_size, bb.num_hidden_layers, bb.num_attention_heads, bb.num_key_value_heads, bb.intermediate_size) == (
        896, 24, 14, 2, 4864)
    assert vae_cfg.vocab_size == 32016 and vae_cfg.chunk_size == 4 and vae_cfg.latent_size == 896 and vae_cfg.hidden_size == 896
    assert den_cfg.max_chunks == 256 and den_cfg.noise_std == 0.05 and den_cfg.latent_size == 896
    with torch.device("meta"):
        vae, den = TokComVAEModel(vae_cfg), TokComDenoiserModel(den_cfg)
    # one Qwen2 block: attention (q, o: 896^2 (+q bias); k, v: 896*128 (+bias)) + MLP 3 * 896 * 4864 + 2 RMSNorms
    attn = 896 * 896 + 896 + 2 * (896 * 128 + 128) + 896 * 896
    block = attn + 3 * 896 * 4864 + 2 * 896
    vae_expected = 32016 * 896 * 2 + 2 * 24 * block + 2 * 896 + (896 * 1792 + 1792) + (896 * 896 + 896) + 896
    assert sum(p.numel() for p in vae.parameters()) == vae_expected
    dit_block = attn + 3 * 896 * 4864 + (896 * 6 * 896 + 6 * 896)
    den_expected = (896 * 896 + 896) + (256 * 896 + 896 + 896 * 896 + 896) + 24 * dit_block + (896 * 1792 + 1792) + (896 * 896 + 896)
    assert sum(p.numel() for p in den.parameters()) == den_expected


def test_a_shared_backbone_config_is_not_changed():
    """The VAE forces its vocabulary onto the backbone, the denoiser a vocabulary of 1: one Qwen2Config given to both
    stays the caller's, and each model keeps its own."""
    from transformers import Qwen2Config

    shared = Qwen2Config(**BACKBONE)
    vae_cfg = TokComVAEConfig(vocab_size=VOCAB, latent_size=16, backbone_config=shared)
    den_cfg = TokComDenoiserConfig(latent_size=16, max_chunks=8, backbone_config=shared)
    assert vae_cfg.backbone_config.vocab_size == VOCAB and den_cfg.backbone_config.vocab_size == 1
    assert shared.vocab_size == Qwen2Config().vocab_size and shared.hidden_size == 32


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (TokComVAEConfig, {"chunk_size": 0}, "chunk_size=0 is invalid"),
        (TokComVAEConfig, {"vocab_size": 1}, "vocab_size=1 is invalid"),
        (TokComVAEConfig, {"kl_weight": -1.0}, "kl_weight=-1.0 is invalid"),
        (TokComVAEConfig, {"sample_posterior": 1}, "sample_posterior=1 is invalid"),
        (TokComVAEConfig, {"backbone_config": {"hidden_size": 30, "num_attention_heads": 4}}, "not divisible by num_attention_heads=4"),
        (TokComVAEConfig, {"backbone_config": {"num_attention_heads": 14, "num_key_value_heads": 3}}, "not divisible by num_key_value_heads=3"),
        (TokComVAEConfig, {"backbone_config": "qwen"}, "expected a Qwen2Config"),
        (TokComVAEConfig, {"chunk_size": 8, "backbone_config": {"max_position_embeddings": 8}}, "shorter than a decoder input"),
        (TokComDenoiserConfig, {"noise_std": 0.0}, "noise_std=0.0 is invalid"),
        (TokComDenoiserConfig, {"max_chunks": 300, "backbone_config": {"max_position_embeddings": 256}}, "shorter than max_chunks=300"),
        (TokComDenoiserConfig, {"time_embed_dim": 3}, "time_embed_dim=3 is invalid"),
        (TokComDenoiserConfig, {"mse_loss_weight": -1}, "mse_loss_weight=-1 is invalid"),
        (TokComDenoiserConfig, {"ce_loss_weight": 0.0}, "both 0: nothing would train"),
    ],
)
def test_config_validation(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)
