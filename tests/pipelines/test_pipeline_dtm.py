"""DTMPipeline: determinism, output types, callbacks, input checks, save/load round trip."""

import numpy as np
import pytest
import torch

from hf_models.dtm import DTMConfig, DTMModel
from hf_models.pipelines import DTMPipeline
from hf_models.schedulers import DTMScheduler


def small_pipe(**overrides):
    torch.manual_seed(0)
    config = DTMConfig(**{**dict(image_size=8, num_channels=1, block_size=4, window=1, skip_connections=2, num_train_timesteps=4,
                                 sweeps_per_step=3, num_fantasy_chains=4, pcd_k=1, initializer_range=0.3), **overrides})
    model = DTMModel(config).eval()
    with torch.no_grad():  # non-trivial biases so samples depend on the model
        model.biases.normal_(0, 0.5)
    pipe = DTMPipeline(dtm=model, scheduler=DTMScheduler.from_model_config(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_same_seed_same_images_and_output_types():
    pipe = small_pipe()
    a = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    b = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="pt").images
    c = pipe(batch_size=3, generator=torch.Generator().manual_seed(1), output_type="pt").images
    assert a.shape == (3, 1, 8, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert set(a.unique().tolist()) <= {0.0, 1.0}
    spins = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert torch.equal((spins + 1) / 2, a)
    arr = pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert isinstance(arr, np.ndarray) and arr.shape == (3, 8, 8, 1) and np.array_equal(arr, a.permute(0, 2, 3, 1).numpy())
    pil = pipe(batch_size=2, generator=torch.Generator().manual_seed(0)).images
    assert len(pil) == 2 and pil[0].size == (8, 8)
    (tup,) = pipe(batch_size=1, return_dict=False, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert tup.shape == (1, 1, 8, 8)


def test_sampling_follows_the_model_fields():
    """With a huge positive bias every spin ends +1 (the sampler reads the model; nothing is hard-wired)."""
    pipe = small_pipe()
    with torch.no_grad():
        pipe.dtm.biases.fill_(20.0)
    images = pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert bool((images == 1).all())
    with torch.no_grad():
        pipe.dtm.biases.fill_(-20.0)
    assert bool((pipe(batch_size=4, generator=torch.Generator().manual_seed(0), output_type="pt").images == 0).all())


def test_callback_sees_every_reverse_step_and_can_replace_the_state():
    pipe = small_pipe()
    seen = []

    def record(p, i, t, tensors):
        seen.append((i, int(t), tensors["latents"].clone()))
        return {"latents": torch.ones_like(tensors["latents"])} if i == 3 else {}

    out = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="latent", callback_on_step_end=record).images
    assert [(i, t) for i, t, _ in seen] == [(0, 3), (1, 2), (2, 1), (3, 0)]
    assert torch.equal(out, torch.ones(2, 1, 8, 8))
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(batch_size=1, callback_on_step_end=record, callback_on_step_end_tensor_inputs=["noise_pred"])


def test_given_latents_are_the_start():
    pipe = small_pipe()
    start = torch.ones(2, 1, 8, 8)
    a = pipe(batch_size=2, latents=start, generator=torch.Generator().manual_seed(0), output_type="latent").images
    b = pipe(batch_size=2, latents=-start, generator=torch.Generator().manual_seed(0), output_type="latent").images
    assert not torch.equal(a, b)
    with pytest.raises(ValueError, match="latents has shape"):
        pipe(batch_size=3, latents=start)
    with pytest.raises(ValueError, match=r"\{-1, \+1\}"):
        pipe(batch_size=2, latents=torch.zeros(2, 1, 8, 8))


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size"):
        small_pipe()(batch_size=bad)


def test_bad_output_type_and_mismatched_scheduler():
    pipe = small_pipe()
    with pytest.raises(ValueError, match="output_type"):
        pipe(batch_size=1, output_type="jpeg")
    other = DTMPipeline(dtm=pipe.dtm, scheduler=DTMScheduler(num_train_timesteps=5))
    with pytest.raises(ValueError, match="num_train_timesteps"):
        other(batch_size=1)
    other = DTMPipeline(dtm=pipe.dtm, scheduler=DTMScheduler.from_model_config(pipe.dtm.config, bitflip_rate=3.0))
    with pytest.raises(ValueError, match="bitflip_rate"):
        other(batch_size=1)


def test_save_and_load_round_trip(tmp_path):
    pipe = small_pipe(num_latent_spins=2)
    pipe.save_pretrained(tmp_path)
    loaded = DTMPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.sweeps_per_step == 3
    for name in ("couplings", "biases", "xt_couplings", "fantasy_chains"):
        assert torch.equal(getattr(loaded.dtm, name), getattr(pipe.dtm, name)), name
    a = pipe(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt").images
    b = loaded(batch_size=2, generator=torch.Generator().manual_seed(5), output_type="pt").images
    assert torch.equal(a, b)


def test_progress_bar_counts_reverse_steps(capsys):
    pipe = small_pipe()
    pipe.set_progress_bar_config(disable=False)
    pipe(batch_size=1, generator=torch.Generator().manual_seed(0))
    assert "4/4" in capsys.readouterr().err
