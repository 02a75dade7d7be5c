"""TokComPipeline: the flow integration, seeded generation, the four modes, save/load, input errors."""

import json

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from hf_models.pipelines import TokComPipeline, TokComPipelineOutput
from hf_models.tokcom import TokComDenoiserConfig, TokComDenoiserModel, TokComVAEConfig, TokComVAEModel

torch.set_num_threads(1)

TEXT = (
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of "
    "outrageous fortune, or to take arms against a sea of troubles and by opposing end them. "
) * 4
BACKBONE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
            "num_key_value_heads": 2, "max_position_embeddings": 32}


def make_tokenizer(vocab_size=300):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def pipe():
    tokenizer = make_tokenizer()
    torch.manual_seed(0)
    vae = TokComVAEModel(TokComVAEConfig(vocab_size=len(tokenizer), latent_size=8, backbone_config=BACKBONE)).eval()
    den = TokComDenoiserModel(TokComDenoiserConfig(latent_size=8, max_chunks=6, backbone_config=BACKBONE)).eval()
    with torch.no_grad():  # give the zero-initialised adaLN and output layers weights
        for name, p in den.named_parameters():
            if "adaLN" in name or "proj_out" in name:
                p.normal_(0, 0.2)
    pipeline = TokComPipeline(vae=vae, denoiser=den, scheduler=FlowMatchEulerDiscreteScheduler(), tokenizer=tokenizer)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def test_generation_shapes_and_seeds(pipe):
    out = pipe(batch_size=3, num_chunks=5, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, TokComPipelineOutput)
    assert out.latents.shape == (3, 5, 8) and out.token_ids.shape == (3, 20) and len(out.texts) == 3
    assert out.texts[0] == pipe.tokenizer.decode(out.token_ids[0].tolist())
    again = pipe(batch_size=3, num_chunks=5, num_inference_steps=4, generator=torch.Generator().manual_seed(0))
    other = pipe(batch_size=3, num_chunks=5, num_inference_steps=4, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out.latents, again.latents) and not torch.equal(out.latents, other.latents)
    default = pipe(num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert default.texts is None and default.token_ids.shape == (1, 6 * 4)  # max_chunks latents
    latent = pipe(num_chunks=2, num_inference_steps=2, output_type="latent", return_dict=False)
    assert latent[0] is None and latent[1] is None and latent[2].shape == (1, 2, 8)


def test_flow_ends_at_the_predicted_clean_latents(pipe, monkeypatch):
    """With a denoiser that always predicts x1 = c, Euler steps on the velocity (x - x1) / sigma follow the straight
    path to c and end on it exactly: the conversion from x1-prediction to diffusers' flow velocity is right."""
    target = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(5))
    seen = []

    class Constant(torch.nn.Module):
        def forward(self, sample, timesteps):
            seen.append(timesteps.clone())
            return type("Out", (), {"sample": target.clone()})()

    monkeypatch.setattr(pipe, "denoiser", type("D", (), {"config": pipe.denoiser.config, "dtype": torch.float32,
                                                          "__call__": lambda self, s, t: Constant()(s, t)})())
    out = pipe(batch_size=2, num_chunks=3, num_inference_steps=7, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert torch.allclose(out.latents, target, atol=1e-5)
    times = torch.stack([t[0] for t in seen])
    assert len(seen) == 7 and times[0] == 0.0 and bool((times[1:] > times[:-1]).all()) and times[-1] < 1.0


def test_noise_scale(pipe, monkeypatch):
    """The denoiser's first input, at t = 0, is the source noise x_0 with standard deviation noise_std (0.05)."""
    seen = []
    forward = pipe.denoiser.forward

    def spy(sample, timesteps):
        seen.append(sample.clone())
        return forward(sample, timesteps)

    monkeypatch.setattr(pipe.denoiser, "forward", spy)
    pipe(batch_size=64, num_chunks=6, num_inference_steps=1, output_type="latent", generator=torch.Generator().manual_seed(0))
    assert abs(seen[0].std().item() - 0.05) < 0.005


def test_encode_decode_reconstruct(pipe):
    texts = ["To be, or not to be", "the slings and arrows of outrageous fortune, or"]
    ids, lengths = pipe.tokenize(texts)
    assert ids.shape[1] % 4 == 0 and lengths == [len(pipe.tokenizer(t)["input_ids"]) for t in texts]
    assert ids[0, lengths[0]:].eq(pipe.pad_token_id).all()
    latents = pipe.encode(texts)
    assert latents.shape == (2, ids.shape[1] // 4, 8) and torch.equal(latents, pipe.encode(ids))
    decoded = pipe.decode(latents)
    assert torch.equal(decoded.token_ids, pipe.vae.decode(latents).argmax(-1))
    recon = pipe.reconstruct(texts)
    assert recon[1] == pipe.tokenizer.decode(decoded.token_ids[1, : lengths[1]].tolist())


def test_save_and_load(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]
    assert index["tokenizer"][0] == "transformers" and index["vae"][1] == "TokComVAEModel"
    loaded = TokComPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    kwargs = dict(batch_size=2, num_chunks=4, num_inference_steps=3, output_type="str")
    a = pipe(generator=torch.Generator().manual_seed(3), **kwargs)
    b = loaded(generator=torch.Generator().manual_seed(3), **kwargs)
    assert torch.equal(a.latents, b.latents) and a.texts == b.texts
    assert loaded.tokenizer("to be")["input_ids"] == pipe.tokenizer("to be")["input_ids"]


def test_input_errors(pipe):
    with pytest.raises(ValueError, match=r"num_chunks=7 must be an int in \[1, max_chunks=6\]"):
        pipe(num_chunks=7)
    with pytest.raises(ValueError, match="output_type='pil' is not supported; allowed: str, pt, latent"):
        pipe(output_type="pil")
    with pytest.raises(ValueError, match="num_inference_steps=0"):
        pipe(num_inference_steps=0)
    with pytest.raises(ValueError, match="batch_size=0"):
        pipe(batch_size=0)
    with pytest.raises(ValueError, match="an empty text"):
        pipe.encode([""])
    with pytest.raises(ValueError, match="latent_size=8"):
        pipe(latents=torch.zeros(1, 2, 3))
    with pytest.raises(ValueError, match="latent_size=8 differs"):
        TokComPipeline(vae=pipe.vae, denoiser=TokComDenoiserModel(TokComDenoiserConfig(latent_size=4, max_chunks=6, backbone_config=BACKBONE)),
                       scheduler=pipe.scheduler, tokenizer=pipe.tokenizer)
