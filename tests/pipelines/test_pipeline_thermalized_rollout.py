"""ThermalizedRolloutPipeline with tiny random components: output layout, the emulator-only arm reproduced step by
step, the classifier-gated firing / stopping with the real scheduler, the noise-only control, input checks, frame
scaling and the save/load round trip."""

import json

import numpy as np
import pytest
import torch

from hf_models.code_gpt import CodeGPTConfig, CodeGPTForCausalLM
from hf_models.pipelines import ThermalizedRolloutOutput, ThermalizedRolloutPipeline
from hf_models.schedulers import ThermalizerScheduler
from hf_models.thermalizer import ThermalizerConfig, ThermalizerModel
from hf_models.vq_tokenizer import VQTokenizerConfig, VQTokenizerModel

torch.set_num_threads(1)

S_INIT, S_STOP, S_MAX, T = 3, 1, 15, 20


def vq_model(**overrides):
    config = dict(image_size=16, num_channels=1, hidden_channels=[8, 16], num_res_blocks=1, codebook_size=32,
                  embedding_dim=8)
    return VQTokenizerModel(VQTokenizerConfig(**{**config, **overrides})).eval()


def emulator_model(**overrides):
    config = dict(codebook_size=32, num_classes=0, num_codes=16, class_dropout_prob=0.0, hidden_size=32,
                  intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=34)
    return CodeGPTForCausalLM(CodeGPTConfig(**{**config, **overrides})).eval()


def thermalizer_model(**overrides):
    config = dict(in_channels=8, sample_size=4, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8,
                  num_train_timesteps=T)
    model = ThermalizerModel(ThermalizerConfig(**{**config, **overrides})).eval()
    with torch.no_grad():  # the output conv starts at 0; give the noise predictor a non-trivial output
        model.conv_out.weight.normal_(0, 0.1)
    return model


def small_pipe(frame_scale=1.0, frame_decoding="parallel", **thermalizer_overrides):
    torch.manual_seed(0)
    vq = vq_model()
    std = float(vq.quantizer.codebook.std())  # normalized embeddings of about unit scale, as in training
    therm = thermalizer_model(**{"data_mean": [0.0] * 8, "data_std": [std] * 8, **thermalizer_overrides})
    pipe = ThermalizedRolloutPipeline(
        vq_tokenizer=vq,
        emulator=emulator_model(frame_decoding=frame_decoding),
        thermalizer=therm,
        scheduler=ThermalizerScheduler(num_train_timesteps=T, s_init=S_INIT, s_stop=S_STOP, s_max=S_MAX),
        frame_scale=frame_scale,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def force_level(pipe, level):
    """Make the level classifier's argmax `level` for every input (its final Linear: zero weights, one-hot bias)."""
    proj = pipe.thermalizer.level_head.proj
    assert isinstance(proj, torch.nn.Linear) and proj.out_features == T
    with torch.no_grad():
        proj.weight.zero_()
        proj.bias.fill_(-10.0)
        proj.bias[level] = 10.0


def frames(batch=3, seed=0, scale=1.0):
    return scale * torch.randn(batch, 16, 16, generator=torch.Generator().manual_seed(seed))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def streams(seed=0):
    """The pipeline's two random streams for `generator=gen(seed)`: the emulator draws from the generator after one
    draw that seeds the thermalization noise generator (common random numbers across arms)."""
    g = gen(seed)
    noise = torch.Generator().manual_seed(int(torch.randint(0, 2**62, (1,), generator=g)))
    return g, noise


def thermalized_reference(pipe, x, level, seed, num_steps, rounds=1):
    """The rollout written out: emulator draw -> (normalized embedding -> scheduler.thermalize at `level` ->
    denormalize -> nearest code) `rounds` times, the noise from the pipeline's noise stream; `[(drawn, codes)]` per
    step."""
    g, noise = streams(seed)
    vq, therm = pipe.vq_tokenizer, pipe.thermalizer
    scheduler = ThermalizerScheduler(num_train_timesteps=T, s_init=S_INIT, s_stop=S_STOP, s_max=S_MAX)
    steps = []
    with torch.no_grad():
        current = vq.encode(x[:, None]).flatten(1)
        for _ in range(num_steps):
            drawn = current = pipe.emulator.sample_next_frame(current, generator=g)
            for _ in range(rounds):
                sample = therm.normalize(vq.embed(current.view(len(x), 4, 4)))
                step = scheduler.thermalize(therm, sample, generator=noise, levels=torch.full((len(x),), level))
                assert bool(step.fired.all())
                current = vq.quantize(therm.denormalize(step.sample)).flatten(1)
            steps.append((drawn, current))
    return steps


# ------------------------------------------------------------------------------------------------ output layout
def test_output_shapes_dtypes_and_frame_zero_is_the_tokenized_initial_condition():
    pipe = small_pipe(frame_scale=2.0)
    force_level(pipe, S_INIT + 2)  # fires, never stops (a random classifier could stop a trajectory)
    x = frames(3, scale=2.0)
    out = pipe(x, num_steps=4, generator=gen())
    assert isinstance(out, ThermalizedRolloutOutput)
    assert out.frames.shape == (3, 5, 16, 16) and out.frames.dtype == torch.float32
    assert out.codes.shape == (3, 5, 4, 4) and out.codes.dtype == torch.long
    for name in ("levels", "requantized_changes"):
        assert getattr(out, name).shape == (3, 4) and getattr(out, name).dtype == torch.long, name
    assert out.fired.shape == (3, 4) and out.fired.dtype == torch.bool
    assert out.stopped_at.shape == (3,) and out.stopped_at.dtype == torch.long
    assert bool(torch.isfinite(out.frames).all()) and int(out.codes.min()) >= 0 and int(out.codes.max()) < 32
    with torch.no_grad():
        codes0 = pipe.vq_tokenizer.encode(x[:, None] / 2.0)
        frame0 = pipe.vq_tokenizer.decode(codes0)[:, 0] * 2.0
        # every frame is the decoding of its code grid
        decoded = pipe.vq_tokenizer.decode(out.codes.flatten(0, 1))[:, 0].view(3, 5, 16, 16) * 2.0
    assert torch.equal(out.codes[:, 0], codes0)
    torch.testing.assert_close(out.frames[:, 0], frame0)
    torch.testing.assert_close(out.frames, decoded)
    # the (B, 1, H, W) layout is accepted too and gives the same rollout
    again = pipe(x[:, None], num_steps=4, generator=gen())
    assert torch.equal(again.codes, out.codes)


def test_output_type_np_and_tuple_return():
    pipe = small_pipe()
    x = frames(2)
    pt = pipe(x, num_steps=2, generator=gen(1))
    arr = pipe(x, num_steps=2, generator=gen(1), output_type="np")
    assert isinstance(arr.frames, np.ndarray) and arr.frames.shape == (2, 3, 16, 16)
    np.testing.assert_array_equal(arr.frames, pt.frames.numpy())
    assert torch.equal(arr.codes, pt.codes)
    tup = pipe(x, num_steps=2, generator=gen(1), return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 8
    for value, name in zip(tup, ("frames", "codes", "levels", "fired", "requantized_changes", "stopped_at", "ended_at",
                                 "rounds")):
        assert torch.equal(value, getattr(pt, name)), name


def test_same_seed_same_rollout_different_seed_differs():
    pipe = small_pipe()
    force_level(pipe, S_INIT + 2)  # fires, never stops
    x = frames(3)
    a = pipe(x, num_steps=3, generator=gen(0))
    b = pipe(x, num_steps=3, generator=gen(0))
    c = pipe(x, num_steps=3, generator=gen(1))
    for name in ("frames", "codes", "levels", "fired", "requantized_changes", "stopped_at"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(a.codes[:, 0], c.codes[:, 0])  # same initial condition
    assert not torch.equal(a.codes[:, 1:], c.codes[:, 1:])


# ------------------------------------------------------------------------------------------- the emulator alone
@pytest.mark.parametrize("frame_decoding", ["parallel", "autoregressive"])
def test_emulator_only_arm_is_sample_next_frame_step_by_step_and_tracks_the_classifier(frame_decoding):
    pipe = small_pipe(frame_decoding=frame_decoding)
    x = frames(3, seed=4)
    out = pipe(x, num_steps=4, thermalize=False, temperature=0.7, generator=gen(3))
    g, _ = streams(3)
    with torch.no_grad():
        current = pipe.vq_tokenizer.encode(x[:, None]).flatten(1)
        for k in range(4):
            current = pipe.emulator.sample_next_frame(current, temperature=0.7, generator=g)
            assert torch.equal(out.codes[:, k + 1].flatten(1), current), k
            # the level recorded at step k is the classifier's on the normalized embedding of that step's codes
            embedded = pipe.thermalizer.normalize(pipe.vq_tokenizer.embed(current.view(3, 4, 4)))
            assert torch.equal(out.levels[:, k], pipe.thermalizer(embedded).level_logits.argmax(-1)), k
    assert not bool(out.fired.any()) and int(out.requantized_changes.abs().sum()) == 0
    assert out.stopped_at.tolist() == [-1, -1, -1]
    untracked = pipe(x, num_steps=4, thermalize=False, temperature=0.7, generator=gen(3), track_levels=False)
    assert bool((untracked.levels == -1).all()) and torch.equal(untracked.codes, out.codes)


@pytest.mark.parametrize("frame_decoding", ["parallel", "autoregressive"])
def test_temperature_zero_is_the_argmax(frame_decoding):
    pipe = small_pipe(frame_decoding=frame_decoding)
    x = frames(2)
    out = pipe(x, num_steps=2, thermalize=False, temperature=0.0, generator=gen(0))
    other = pipe(x, num_steps=2, thermalize=False, temperature=0.0, generator=gen(9))
    assert torch.equal(out.codes, other.codes)  # no randomness left
    with torch.no_grad():
        teacher = out.codes[:, 1].flatten(1) if frame_decoding == "autoregressive" else None
        first = pipe.emulator.next_frame_logits(out.codes[:, 0].flatten(1), teacher).argmax(-1)
    assert torch.equal(out.codes[:, 1].flatten(1), first)


# ------------------------------------------------------------------------------------- firing with the scheduler
@pytest.mark.parametrize("level", [0, S_INIT])
def test_level_at_or_below_s_init_never_fires(level):
    pipe = small_pipe()
    force_level(pipe, level)
    x = frames(3)
    out = pipe(x, num_steps=3, generator=gen(5))
    alone = pipe(x, num_steps=3, thermalize=False, generator=gen(5))
    assert not bool(out.fired.any())
    assert bool((out.levels == level).all()) and bool((alone.levels == level).all())
    # re-quantizing the (untouched) embeddings gives back the same codes
    assert int(out.requantized_changes.sum()) == 0
    assert torch.equal(out.codes, alone.codes) and torch.equal(out.frames, alone.frames)
    assert out.stopped_at.tolist() == [-1, -1, -1]


def test_level_between_s_init_and_s_max_fires_and_is_the_scheduler_step_requantized():
    level = 10
    pipe = small_pipe()
    force_level(pipe, level)
    x = frames(3, seed=2)
    out = pipe(x, num_steps=3, generator=gen(6))
    assert bool(out.fired.all()) and bool((out.levels == level).all())
    assert out.stopped_at.tolist() == [-1, -1, -1]
    assert int(out.requantized_changes.sum()) > 0
    # reproduce: emulator draw -> normalized embedding -> scheduler.thermalize -> denormalize -> nearest code
    for k, (drawn, current) in enumerate(thermalized_reference(pipe, x, level, seed=6, num_steps=3)):
        assert torch.equal(out.codes[:, k + 1].flatten(1), current), k
        assert torch.equal(out.requantized_changes[:, k], (current != drawn).sum(1)), k
    # the thermalized arm departs from the emulator alone
    alone = pipe(x, num_steps=3, thermalize=False, generator=gen(6))
    assert not torch.equal(out.codes[:, 1:], alone.codes[:, 1:])


def test_level_above_s_max_stops_every_trajectory_at_step_one():
    pipe = small_pipe()
    force_level(pipe, S_MAX + 2)
    out = pipe(frames(3), num_steps=4, generator=gen(0))
    assert out.stopped_at.tolist() == [1, 1, 1]
    assert not bool(out.fired.any())
    assert bool(torch.isfinite(out.frames[:, 0]).all()) and bool(torch.isnan(out.frames[:, 1:]).all())
    assert bool((out.codes[:, 0] >= 0).all()) and bool((out.codes[:, 1:] == -1).all())
    assert out.levels[:, 0].tolist() == [S_MAX + 2] * 3 and bool((out.levels[:, 1:] == -1).all())
    # the emulator alone is never stopped, whatever the classifier says
    alone = pipe(frames(3), num_steps=4, thermalize=False, generator=gen(0))
    assert alone.stopped_at.tolist() == [-1, -1, -1] and bool(torch.isfinite(alone.frames).all())
    assert bool((alone.levels == S_MAX + 2).all())


def test_stops_of_single_trajectories_keep_the_others_running(monkeypatch):
    """Per-row levels from a scripted classifier: rows stop at different steps; the bookkeeping follows the rows."""
    pipe = small_pipe()
    script = iter([[0, 10, 0], [S_MAX + 1, 0, 10], [0, S_MAX + 4], [10]])  # one list per step, for the live rows
    seen = []

    def scripted(sample):
        levels = torch.tensor(next(script))
        seen.append(sample.shape[0])
        assert len(levels) == sample.shape[0]
        return levels

    monkeypatch.setattr(pipe.thermalizer, "predict_level", scripted)
    out = pipe(frames(3), num_steps=4, generator=gen(2))
    assert seen == [3, 3, 2, 1]  # only the live rows are classified
    assert out.stopped_at.tolist() == [2, -1, 3]
    assert out.levels.tolist() == [[0, S_MAX + 1, -1, -1], [10, 0, 0, 10], [0, 10, S_MAX + 4, -1]]
    assert out.fired.tolist() == [[False] * 4, [True, False, False, True], [False, True, False, False]]
    assert int(out.requantized_changes[~out.fired].abs().sum()) == 0
    dead = torch.tensor([[False, False, True, True, True], [False] * 5, [False, False, False, True, True]])
    assert torch.equal((out.codes == -1).all(-1).all(-1), dead)
    assert bool((out.codes[~dead] >= 0).all())
    assert torch.equal(torch.isnan(out.frames).all(-1).all(-1), dead)
    assert bool(torch.isfinite(out.frames[~dead]).all())


def test_callback_ends_chosen_trajectories_and_the_rest_run_on():
    pipe = small_pipe()
    x = frames(3)
    seen = []

    def end_row_one_after_step_two(p, i, t, kwargs):
        assert p is pipe and t == i + 1
        seen.append((t, kwargs["rows"].tolist(), tuple(kwargs["codes"].shape)))
        return {"end": kwargs["rows"] == 1} if t == 2 else {}

    out = pipe(x, num_steps=4, generator=gen(0), thermalize=False, callback_on_step_end=end_row_one_after_step_two)
    assert [s[:2] for s in seen] == [(1, [0, 1, 2]), (2, [0, 1, 2]), (3, [0, 2]), (4, [0, 2])]
    assert seen[0][2] == (3, 4, 4)
    assert out.ended_at.tolist() == [-1, 2, -1]
    assert (out.codes[1, :3] >= 0).all() and (out.codes[1, 3:] == -1).all()
    assert torch.isnan(out.frames[1, 3:]).all() and torch.isfinite(out.frames[1, :3]).all()
    assert (out.codes[[0, 2]] >= 0).all() and torch.isfinite(out.frames[[0, 2]]).all()
    plain = pipe(x, num_steps=4, generator=gen(0), thermalize=False)
    # up to the end of a trajectory the rollout is the one without a callback
    assert torch.equal(out.codes[:, :3], plain.codes[:, :3]) and (plain.ended_at == -1).all()


@pytest.mark.parametrize("frame_decoding", ["parallel", "autoregressive"])
@pytest.mark.parametrize("num_candidates", [1, 2])
def test_one_generator_per_trajectory_makes_each_trajectory_its_own_rollout(frame_decoding, num_candidates):
    """With a list of generators (diffusers' convention) a trajectory's rollout (emulator draws and thermalization
    noise) is the one it has alone with its generator, whatever else is in the batch or stops beside it."""
    pipe = small_pipe(frame_decoding=frame_decoding)
    force_level(pipe, S_INIT + 2)  # every step fires: the DDPM noise is drawn every step
    x = frames(3)
    together = pipe(x, num_steps=3, generator=[gen(10), gen(11), gen(12)], num_candidates=num_candidates)
    assert together.fired.all()
    for i in range(3):
        alone = pipe(x[i: i + 1], num_steps=3, generator=[gen(10 + i)], num_candidates=num_candidates)
        assert torch.equal(alone.codes[0], together.codes[i]), i
    # the same seeds in another order follow their trajectories
    swapped = pipe(x[[2, 0, 1]], num_steps=3, generator=[gen(12), gen(10), gen(11)], num_candidates=num_candidates)
    assert torch.equal(swapped.codes, together.codes[[2, 0, 1]])
    # a trajectory ended by a callback leaves the others' draws unchanged
    ended = pipe(x, num_steps=3, generator=[gen(10), gen(11), gen(12)], num_candidates=num_candidates,
                 callback_on_step_end=lambda p, i, t, kwargs: {"end": kwargs["rows"] == 0})
    assert ended.ended_at.tolist() == [1, -1, -1] and torch.equal(ended.codes[1:], together.codes[1:])
    with pytest.raises(ValueError, match="one per trajectory"):
        pipe(x, num_steps=1, generator=[gen(0), gen(1)])


def test_callback_interrupt_ends_every_running_trajectory():
    pipe = small_pipe()
    calls = []

    def interrupt_at_two(p, i, t, kwargs):
        calls.append(t)
        if t == 2:
            p._interrupt = True

    out = pipe(frames(2), num_steps=5, generator=gen(0), thermalize=False, callback_on_step_end=interrupt_at_two)
    assert calls == [1, 2]
    assert out.ended_at.tolist() == [2, 2] and (out.codes[:, 3:] == -1).all() and (out.codes[:, :3] >= 0).all()
    again = pipe(frames(2), num_steps=2, generator=gen(0), thermalize=False)  # a new call starts uninterrupted
    assert (again.codes >= 0).all()


def test_callback_end_of_the_wrong_shape_is_refused():
    pipe = small_pipe()
    with pytest.raises(ValueError, match="one flag per running trajectory"):
        pipe(frames(2), num_steps=2, generator=gen(0), thermalize=False,
             callback_on_step_end=lambda p, i, t, kwargs: {"end": torch.zeros(5, dtype=torch.bool)})


def test_noise_control_same_firing_different_codes():
    pipe = small_pipe()
    force_level(pipe, 10)
    x = frames(3)
    learned = pipe(x, num_steps=3, generator=gen(7))
    control = pipe(x, num_steps=3, noise_control=True, generator=gen(7))
    assert torch.equal(control.fired, learned.fired) and bool(control.fired.all())
    assert torch.equal(control.levels, learned.levels)
    assert torch.equal(control.codes[:, 0], learned.codes[:, 0])
    assert not torch.equal(control.codes[:, 1:], learned.codes[:, 1:])
    # the control's first step is reproducible: emulator draw, then thermalize(noise_control=True) on the noise stream
    g, noise = streams(7)
    vq, therm = pipe.vq_tokenizer, pipe.thermalizer
    with torch.no_grad():
        drawn = pipe.emulator.sample_next_frame(vq.encode(x[:, None]).flatten(1), generator=g)
        step = pipe.scheduler.thermalize(therm, therm.normalize(vq.embed(drawn.view(3, 4, 4))), generator=noise,
                                         levels=torch.full((3,), 10), noise_control=True)
        expected = vq.quantize(therm.denormalize(step.sample))
    assert torch.equal(control.codes[:, 1], expected)


def least_noisy(pipe, candidates):
    """Code grids `(b, k, 16)` -> per state the index of the candidate with the lowest expected level."""
    embedded = pipe.vq_tokenizer.embed(candidates.view(-1, 4, 4))
    logits = pipe.thermalizer(pipe.thermalizer.normalize(embedded)).level_logits
    return (logits.softmax(-1) * torch.arange(T)).sum(-1).view(candidates.shape[:2]).argmin(1)


def test_candidates_keep_the_requantized_draw_the_classifier_reads_as_least_noisy(monkeypatch):
    k = 4
    pipe = small_pipe()
    # every state fires at level 10; the classifier itself (random weights) ranks the candidates
    monkeypatch.setattr(pipe.thermalizer, "predict_level", lambda sample: torch.full((sample.shape[0],), 10))
    x = frames(3, seed=2)
    out = pipe(x, num_steps=3, generator=gen(6), num_candidates=k)
    assert bool(out.fired.all()) and out.stopped_at.tolist() == [-1, -1, -1]
    g, noise = streams(6)
    vq, therm = pipe.vq_tokenizer, pipe.thermalizer
    picks = []
    with torch.no_grad():
        current = vq.encode(x[:, None]).flatten(1)
        for step in range(3):
            drawn = pipe.emulator.sample_next_frame(current, generator=g)
            sample = therm.normalize(vq.embed(drawn.view(3, 4, 4)))
            # one batched chain over the k copies of each state, in a row
            res = pipe.scheduler.thermalize(therm, sample.repeat_interleave(k, 0), generator=noise,
                                            levels=torch.full((3 * k,), 10))
            candidates = vq.quantize(therm.denormalize(res.sample)).flatten(1).view(3, k, 16)
            pick = least_noisy(pipe, candidates)
            picks.append(pick)
            current = candidates[torch.arange(3), pick]
            assert torch.equal(out.codes[:, step + 1].flatten(1), current), step
            assert torch.equal(out.requantized_changes[:, step], (current != drawn).sum(1)), step
            assert len({tuple(c.tolist()) for c in candidates[0]}) > 1, "the candidates of a state should differ"
    assert bool((torch.stack(picks) != 0).any()), "the selection should not always keep the first candidate"
    # one candidate is the single draw
    single = pipe(x, num_steps=3, generator=gen(6))
    assert torch.equal(pipe(x, num_steps=3, generator=gen(6), num_candidates=1).codes, single.codes)
    # the noise control selects among its own candidates: its first step is the pick among k noise-only chains
    control = pipe(x, num_steps=1, generator=gen(6), num_candidates=k, noise_control=True)
    g, noise = streams(6)
    with torch.no_grad():
        drawn = pipe.emulator.sample_next_frame(vq.encode(x[:, None]).flatten(1), generator=g)
        sample = therm.normalize(vq.embed(drawn.view(3, 4, 4)))
        res = pipe.scheduler.thermalize(therm, sample.repeat_interleave(k, 0), generator=noise,
                                        levels=torch.full((3 * k,), 10), noise_control=True)
        candidates = vq.quantize(therm.denormalize(res.sample)).flatten(1).view(3, k, 16)
    assert torch.equal(control.codes[:, 1].flatten(1), candidates[torch.arange(3), least_noisy(pipe, candidates)])


def test_candidates_are_ranked_only_for_states_that_fire(monkeypatch):
    k = 3
    pipe = small_pipe()
    # state 1 stays below s_init, states 0 and 2 fire
    monkeypatch.setattr(pipe.thermalizer, "predict_level", lambda sample: torch.tensor([10, 0, 10])[: sample.shape[0]])
    ranked = []
    select = pipe._select_candidate
    monkeypatch.setattr(pipe, "_select_candidate", lambda c, *a: ranked.append(c.shape[0]) or select(c, *a))
    x = frames(3, seed=4)
    out = pipe(x, num_steps=1, generator=gen(8), num_candidates=k)
    assert out.fired[:, 0].tolist() == [True, False, True] and ranked == [2 * k]
    g, noise = streams(8)
    vq, therm = pipe.vq_tokenizer, pipe.thermalizer
    with torch.no_grad():
        drawn = pipe.emulator.sample_next_frame(vq.encode(x[:, None]).flatten(1), generator=g)
        sample = therm.normalize(vq.embed(drawn.view(3, 4, 4)))
        res = pipe.scheduler.thermalize(therm, sample.repeat_interleave(k, 0), generator=noise,
                                        levels=torch.tensor([10, 0, 10]).repeat_interleave(k))
        candidates = vq.quantize(therm.denormalize(res.sample)).flatten(1).view(3, k, 16)
    assert torch.equal(out.codes[1, 1].flatten(), drawn[1]) and out.requantized_changes[1, 0] == 0
    fired = candidates[[0, 2]]
    assert torch.equal(out.codes[[0, 2], 1].flatten(1), fired[torch.arange(2), least_noisy(pipe, fired)])


def test_rounds_thermalize_a_fired_state_again_while_the_classifier_reads_it_above_s_init():
    level = 10
    pipe = small_pipe()
    force_level(pipe, level)  # every reading, re-readings included, is above s_init: every round runs
    x = frames(3, seed=2)
    out = pipe(x, num_steps=2, generator=gen(6), thermalize_rounds=3)
    assert out.rounds.tolist() == [[3, 3]] * 3 and bool(out.fired.all())
    # reproduce: draw -> (thermalize -> re-quantize -> embed) three times, the noise from the one noise stream
    for k, (drawn, current) in enumerate(thermalized_reference(pipe, x, level, seed=6, num_steps=2, rounds=3)):
        assert torch.equal(out.codes[:, k + 1].flatten(1), current), k
        assert torch.equal(out.requantized_changes[:, k], (current != drawn).sum(1)), k
    one = pipe(x, num_steps=2, generator=gen(6))
    assert one.rounds.tolist() == [[1, 1]] * 3 and not torch.equal(one.codes, out.codes)


def test_rounds_stop_where_the_classifier_reads_the_grid_clean(monkeypatch):
    """A state whose thermalized grid reads at or below s_init gets no further round: with one generator per
    trajectory its rollout is the single-round one, while the others get all their rounds."""
    pipe = small_pipe()
    # per step: the emulator's draws read 10 (all fire); the first re-reading [10, clean, 10]; the second [10, 10]
    readings = [[10, 10, 10], [10, S_INIT, 10], [10, 10]]
    calls = []

    def predict_level(sample):
        value = readings[len(calls) % len(readings)]
        calls.append(len(sample))
        assert len(sample) == len(value)
        return torch.tensor(value)

    monkeypatch.setattr(pipe.thermalizer, "predict_level", predict_level)
    x = frames(3)
    out = pipe(x, num_steps=2, generator=[gen(10), gen(11), gen(12)], thermalize_rounds=3)
    assert out.rounds.tolist() == [[3, 3], [1, 1], [3, 3]] and calls == [3, 3, 2] * 2
    readings[:] = [[10, 10, 10]]
    calls.clear()
    single = pipe(x, num_steps=2, generator=[gen(10), gen(11), gen(12)])
    assert single.rounds.tolist() == [[1, 1]] * 3 and calls == [3, 3]
    assert torch.equal(out.codes[1], single.codes[1])
    assert not torch.equal(out.codes[0], single.codes[0]) and not torch.equal(out.codes[2], single.codes[2])


def test_thermalize_codes_is_one_corrected_step_of_the_rollout():
    """`thermalize_codes` is the correction a rollout step applies: the scheduler's step from the classifier's level
    (or a given one), re-quantized, with unfired and stopped grids returned as they were."""
    level = 10
    pipe = small_pipe()
    force_level(pipe, level)
    vq, therm = pipe.vq_tokenizer, pipe.thermalizer
    codes = vq.encode(frames(3, seed=4)[:, None])
    out = pipe.thermalize_codes(codes, generator=gen(3))
    assert out.levels.tolist() == [level] * 3 and out.fired.all() and not out.stopped.any()
    with torch.no_grad():
        step = pipe.scheduler.thermalize(therm, therm.normalize(vq.embed(codes)), generator=gen(3),
                                         levels=torch.full((3,), level))
        expected = vq.quantize(therm.denormalize(step.sample))
    assert torch.equal(out.codes, expected) and not torch.equal(out.codes, codes)
    # a given level overrides the classifier: at s_init nothing fires, above s_max every grid would stop
    for given, fired, stopped in ((S_INIT, False, False), (S_MAX + 1, False, True)):
        kept = pipe.thermalize_codes(codes, levels=given, generator=gen(3))
        assert kept.levels.tolist() == [given] * 3 and torch.equal(kept.codes, codes)
        assert kept.fired.tolist() == [fired] * 3 and kept.stopped.tolist() == [stopped] * 3
    # one generator per grid: a grid's correction does not depend on the others in the batch
    each = pipe.thermalize_codes(codes, generator=[gen(20), gen(21), gen(22)])
    alone = pipe.thermalize_codes(codes[1:2], generator=[gen(21)])
    assert torch.equal(each.codes[1:2], alone.codes)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(codes=torch.zeros(2, 3, 3, dtype=torch.long)), r"shape \(batch, 4, 4\)"),
        (dict(codes=torch.zeros(2, 4, 4)), "LongTensor"),
        (dict(codes=torch.full((2, 4, 4), 32)), r"\[0, 31\]"),
        (dict(codes=torch.zeros(2, 4, 4, dtype=torch.long), levels=T), r"levels must lie in \[0, 19\]"),
        (dict(codes=torch.zeros(2, 4, 4, dtype=torch.long), generator=[None]), "one per grid"),
        (dict(codes=torch.zeros(2, 4, 4, dtype=torch.long), num_candidates=0), "num_candidates=0"),
    ],
)
def test_thermalize_codes_refuses_bad_input(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_pipe().thermalize_codes(**kwargs)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_thermalize_rounds(bad):
    with pytest.raises(ValueError, match="thermalize_rounds"):
        small_pipe()(frames(1), num_steps=1, thermalize_rounds=bad)


@pytest.mark.parametrize("bad", [0, -1, 2.0, True])
def test_bad_num_candidates(bad):
    with pytest.raises(ValueError, match="num_candidates"):
        small_pipe()(frames(1), num_steps=1, num_candidates=bad)


# --------------------------------------------------------------------------------------------------- input checks
@pytest.mark.parametrize("bad", [0, -2, 2.5, True, "3"])
def test_bad_num_steps(bad):
    with pytest.raises(ValueError, match="num_steps"):
        small_pipe()(frames(1), num_steps=bad)


def test_bad_output_type_and_noise_control_without_thermalize():
    pipe = small_pipe()
    with pytest.raises(ValueError, match="output_type"):
        pipe(frames(1), num_steps=1, output_type="pil")
    with pytest.raises(ValueError, match="noise_control=True .* needs thermalize=True"):
        pipe(frames(1), num_steps=1, thermalize=False, noise_control=True)


@pytest.mark.parametrize(
    "initial, match",
    [
        (torch.zeros(2, 8, 8), r"frames must have shape \(batch, 16, 16\)"),
        (torch.zeros(2, 2, 16, 16), r"frames must have shape"),
        (torch.zeros(16, 16), r"frames must have shape"),
        (torch.zeros(2, 16, 16, dtype=torch.long), "finite float"),
        (torch.full((2, 16, 16), float("nan")), "finite float"),
    ],
)
def test_bad_initial_frames(initial, match):
    with pytest.raises(ValueError, match=match):
        small_pipe()(initial, num_steps=1)


def test_mismatched_components_and_frame_scale_raise():
    pipe = small_pipe()
    parts = dict(vq_tokenizer=pipe.vq_tokenizer, emulator=pipe.emulator, thermalizer=pipe.thermalizer,
                 scheduler=pipe.scheduler)
    cases = [
        (dict(thermalizer=thermalizer_model(in_channels=4)), "in_channels=4 differs from the tokenizer's embedding_dim=8"),
        (dict(emulator=emulator_model(codebook_size=16)), "does not match the tokenizer"),
        (dict(emulator=emulator_model(num_codes=9, max_position_embeddings=20)), "does not match the tokenizer"),
        (dict(scheduler=ThermalizerScheduler(num_train_timesteps=30, s_init=3, s_stop=1, s_max=15)),
         "num_train_timesteps=30 differs"),
    ]
    for change, match in cases:
        other = ThermalizedRolloutPipeline(**{**parts, **change})
        other.set_progress_bar_config(disable=True)
        with pytest.raises(ValueError, match=match):
            other(frames(1), num_steps=1)
    for scale in (0.0, -1.0):
        with pytest.raises(ValueError, match="frame_scale"):
            ThermalizedRolloutPipeline(**parts, frame_scale=scale)


# ------------------------------------------------------------------------------------------- frame_scale, saving
def test_frame_scale_divides_the_input_and_multiplies_the_output():
    one, two = small_pipe(frame_scale=1.0), small_pipe(frame_scale=2.0)
    force_level(one, S_INIT + 2)  # fires, never stops (NaN frames would not compare)
    force_level(two, S_INIT + 2)
    assert all(torch.equal(p, q) for p, q in zip(one.vq_tokenizer.parameters(), two.vq_tokenizer.parameters()))
    x = frames(3, seed=8)
    a = one(x, num_steps=2, generator=gen(4))
    b = two(2 * x, num_steps=2, generator=gen(4))
    assert torch.equal(a.codes, b.codes)
    torch.testing.assert_close(b.frames, 2 * a.frames)
    # the scale matters: the unscaled input through the scaled pipeline tokenizes differently
    assert not torch.equal(two.encode_frames(x), a.codes[:, 0])


def test_save_and_load_round_trip(tmp_path):
    pipe = small_pipe(frame_scale=2.5)
    force_level(pipe, 10)  # a firing rollout exercises all four components
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["frame_scale"] == 2.5
    assert {"vq_tokenizer", "emulator", "thermalizer", "scheduler"} <= set(index)
    loaded = ThermalizedRolloutPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.config.frame_scale == 2.5
    assert type(loaded.thermalizer) is ThermalizerModel and type(loaded.scheduler) is ThermalizerScheduler
    sc = loaded.scheduler.config
    assert (sc.s_init, sc.s_stop, sc.s_max, sc.num_train_timesteps) == (S_INIT, S_STOP, S_MAX, T)
    assert loaded.thermalizer.config.data_std == pipe.thermalizer.config.data_std
    x = frames(2, scale=2.5)
    a = pipe(x, num_steps=3, generator=gen(5))
    b = loaded(x, num_steps=3, generator=gen(5))
    assert bool(a.fired.all()) and torch.equal(a.fired, b.fired)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.frames, b.frames)


@pytest.mark.parametrize("frame_decoding", ["parallel", "autoregressive"])
def test_expected_embedding_input(frame_decoding):
    """thermalizer_input="expected": the classifier sees sum_k p_k e_k. At temperature 0 (one-hot probabilities) that is
    the sampled code's vector, so everything equals the default; at temperature 1 the levels are the classifier's on
    the hand-computed expected embedding, and the sampled codes (unfired steps) are the same draws as by default.
    With autoregressive decoding the distributions are those of the drawn codes, each given the codes before it."""
    pipe = small_pipe(frame_decoding=frame_decoding)
    x = frames(3, seed=11)
    a = pipe(x, num_steps=3, temperature=0.0, generator=gen(2))
    b = pipe(x, num_steps=3, temperature=0.0, generator=gen(2), thermalizer_input="expected")
    for name in ("codes", "levels", "fired", "requantized_changes", "stopped_at"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    out = pipe(x, num_steps=1, thermalize=False, generator=gen(2), thermalizer_input="expected")
    default = pipe(x, num_steps=1, thermalize=False, generator=gen(2))
    assert torch.equal(out.codes, default.codes)
    vq, therm = pipe.vq_tokenizer, pipe.thermalizer
    with torch.no_grad():
        teacher = out.codes[:, 1].flatten(1) if frame_decoding == "autoregressive" else None
        probs = torch.softmax(pipe.emulator.next_frame_logits(vq.encode(x[:, None]).flatten(1), teacher).float(), -1)  # (3, 16, K)
        codebook = vq.quantizer.lookup(torch.arange(probs.shape[-1]))  # (K, D)
        expected = (probs @ codebook).transpose(1, 2).reshape(3, -1, 4, 4)
        levels = therm.predict_level(therm.normalize(expected))
    assert torch.equal(out.levels[:, 0], levels)
    with pytest.raises(ValueError, match="thermalizer_input"):
        pipe(x, num_steps=1, thermalizer_input="soft")
