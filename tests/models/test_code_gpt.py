"""CodeGPTForCausalLM: token layout, training signal, save/load, remote code, seeded sampling."""

import os
import textwrap

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM
from transformers.generation.logits_process import UnbatchedClassifierFreeGuidanceLogitsProcessor

from hf_models.code_gpt import CodeGPTConfig, CodeGPTForCausalLM
from tests.helpers import BLOCK_LATENTHEAT, run_without_latentheat


torch.set_num_threads(1)


class CodeGPTModelTester:
    def get_config(self, **overrides):
        kwargs = dict(
            codebook_size=16,
            num_classes=3,
            num_codes=9,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=64,
        )
        kwargs.update(overrides)
        return CodeGPTConfig(**kwargs)

    def get_model(self, seed=0, **overrides):
        torch.manual_seed(seed)
        return CodeGPTForCausalLM(self.get_config(**overrides)).eval()

    def get_batch(self, config, batch_size=4, seed=0):
        generator = torch.Generator().manual_seed(seed)
        codes = torch.randint(0, config.codebook_size, (batch_size, config.num_codes), generator=generator)
        classes = torch.randint(0, config.num_classes, (batch_size, 1), generator=generator) + config.class_token_offset
        bos = torch.full((batch_size, 1), config.bos_token_id)
        eos = torch.full((batch_size, 1), config.eos_token_id)
        return torch.cat([classes, bos, codes, eos], dim=1)


tester = CodeGPTModelTester()


def expected_num_parameters(config):
    """Llama by formula: embeddings + per layer (q, k, v, o, gate/up/down, 2 RMSNorms) + final norm + LM head."""
    h, i, v = config.hidden_size, config.intermediate_size, config.vocab_size
    kv = config.num_key_value_heads * config.head_dim
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    lm_head = 0 if config.tie_word_embeddings else v * h
    return v * h + config.num_hidden_layers * per_layer + h + lm_head


def test_token_layout():
    config = CodeGPTConfig()
    k, c = 256, 10
    assert config.vocab_size == k + c + 5 == 271
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (k, k + 1, k + 2)
    assert config.class_token_offset == k + 3 and config.class_token_id(4) == k + 3 + 4
    assert config.null_class_token_id == k + 3 + c and config.invalid_code_token_id == k + 3 + c + 1
    assert config.sequence_length == 52 and config.max_context == 1024
    unconditional = CodeGPTConfig(num_classes=0)
    assert unconditional.vocab_size == k + 5 and unconditional.prompt_length == 1
    with pytest.raises(ValueError, match="class_label"):
        config.class_token_id(10)


def test_config_round_trip_and_auto(tmp_path):
    config = tester.get_config(num_key_value_heads=2, max_context=16)
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, CodeGPTConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(loaded.to_dict()) == strip(config.to_dict())
    assert loaded.num_key_value_heads == 2 and loaded.max_context == 16 and loaded.vocab_size == 24
    assert CodeGPTConfig(codebook_size=16, num_classes=3, vocab_size=24).vocab_size == 24  # consistent is accepted
    assert isinstance(AutoModelForCausalLM.from_config(loaded), CodeGPTForCausalLM)


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 100),
        ("bos_token_id", 0),
        ("pad_token_id", 3),
        ("codebook_size", 0),
        ("num_classes", -1),
        ("num_codes", 0),
        ("invalid_code_policy", "drop"),
        ("class_dropout_prob", 1.0),
        ("max_context", 1),
        ("max_context", 2048),
        ("num_attention_heads", 5),
        ("frame_decoding", "raster"),
    ],
)
def test_config_validation(field, value):
    with pytest.raises(ValueError, match=field):
        CodeGPTConfig(**{field: value})


def test_is_llama_and_forward_shapes():
    model = tester.get_model()
    assert isinstance(model, LlamaForCausalLM)
    input_ids = tester.get_batch(model.config)
    out = model(input_ids=input_ids, labels=input_ids)
    assert list(out.keys())[0] == "loss" and out.loss.dim() == 0
    assert out.logits.shape == (4, 12, model.config.vocab_size)


def test_loss_falls_on_fixed_batch():
    model = tester.get_model().train()
    input_ids = tester.get_batch(model.config, batch_size=8)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = model(input_ids=input_ids, labels=input_ids).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_checkpointing_runs():
    model = tester.get_model().train()
    model.activation_checkpointing_enable()
    input_ids = tester.get_batch(model.config)
    model(input_ids=input_ids, labels=input_ids).loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_save_and_load_pretrained(tmp_path):
    model = tester.get_model()
    model.save_pretrained(tmp_path)
    files = os.listdir(tmp_path)
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files)
    loaded = CodeGPTForCausalLM.from_pretrained(tmp_path).eval()
    input_ids = tester.get_batch(model.config)
    with torch.no_grad():
        assert torch.allclose(model(input_ids).logits, loaded(input_ids).logits)
    labels = torch.tensor([0, 2])
    a = model.generate_codes(labels, generator=torch.Generator().manual_seed(3))
    b = loaded.generate_codes(labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


REMOTE_SCRIPT = BLOCK_LATENTHEAT + textwrap.dedent(
    """
    import sys
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
    assert type(model).__name__ == "CodeGPTForCausalLM", type(model)
    assert "hf_models" not in type(model).__module__, type(model).__module__
    input_ids = load_file(sys.argv[2])["input_ids"]
    with torch.no_grad():
        logits = model(input_ids).logits
    codes = model.generate_codes(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(5))
    save_file({"logits": logits.contiguous(), "codes": codes}, sys.argv[3])
    """
)


def test_remote_code_loads_without_latentheat(tmp_path):
    model = tester.get_model()
    model.register_for_auto_class("AutoModelForCausalLM")
    model.save_pretrained(tmp_path / "repo")
    files = set(os.listdir(tmp_path / "repo"))
    assert {"configuration_code_gpt.py", "modeling_code_gpt.py", "model.safetensors"} <= files
    input_ids = tester.get_batch(model.config)
    out = run_without_latentheat(tmp_path, REMOTE_SCRIPT, {"input_ids": input_ids})
    with torch.no_grad():
        assert torch.allclose(out["logits"], model(input_ids).logits, atol=1e-5)
    expected = model.generate_codes(torch.tensor([1, 2]), generator=torch.Generator().manual_seed(5))
    assert torch.equal(out["codes"], expected)


def test_seed_config_on_meta_device():
    config = CodeGPTConfig()
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (512, 2048, 8)
    assert (config.num_attention_heads, config.max_position_embeddings) == (8, 1024)
    with torch.device("meta"):
        model = CodeGPTForCausalLM(config)
    assert model.num_parameters() == expected_num_parameters(config)
    assert tester.get_model().num_parameters() == expected_num_parameters(tester.get_config())


# ------------------------------------------------------------------------------------------------ sampling


def test_generate_codes_seeded_and_only_codes():
    model = tester.get_model()
    labels = torch.tensor([0, 1, 2, 1])
    a = model.generate_codes(labels, generator=torch.Generator().manual_seed(0))
    b = model.generate_codes(labels, generator=torch.Generator().manual_seed(0))
    c = model.generate_codes(labels, generator=torch.Generator().manual_seed(1))
    assert a.shape == (4, 9) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 16
    longer = model.generate_codes(labels, num_codes=20, generator=torch.Generator().manual_seed(0))
    assert longer.shape == (4, 20) and int(longer.max()) < 16


def test_only_codes_even_when_specials_dominate():
    model = tester.get_model()

    def favour_specials(module, args, logits):  # a model that prefers EOS/PAD/class tokens by a wide margin
        logits = logits.clone()
        logits[..., 16:] += 100.0
        return logits

    handle = model.lm_head.register_forward_hook(favour_specials)
    try:
        codes = model.generate_codes(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert codes.shape == (2, 9) and int(codes.max()) < 16 and int(codes.min()) >= 0


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"temperature": 0.7, "top_k": 5},
        {"top_p": 0.8},
        {"max_context": 5},
        {"guidance_scale": 2.0},
        {"guidance_scale": 1.5, "max_context": 6, "top_k": 8},
    ],
)
def test_use_cache_false_equals_true(kwargs):
    model = tester.get_model()
    labels = torch.tensor([0, 2, 1])
    cached = model.generate_codes(labels, generator=torch.Generator().manual_seed(7), use_cache=True, **kwargs)
    uncached = model.generate_codes(labels, generator=torch.Generator().manual_seed(7), use_cache=False, **kwargs)
    assert torch.equal(cached, uncached)


def test_sliding_window_limits_context():
    model = tester.get_model()
    seen = []
    handle = model.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(
            (kwargs.get("input_ids") if kwargs.get("input_ids") is not None else args[0]).shape[1]
        ),
        with_kwargs=True,
    )
    try:
        codes = model.generate_codes(
            torch.tensor([0, 1]), num_codes=30, max_context=6, use_cache=False,
            generator=torch.Generator().manual_seed(0),
        )
    finally:
        handle.remove()
    assert codes.shape == (2, 30) and int(codes.max()) < 16
    assert max(seen) <= 6 and len(seen) == 30  # one full forward per token, never longer than the window
    # a window that holds the whole sequence gives the plain (single generate call) result
    full = model.generate_codes(torch.tensor([0, 1]), generator=torch.Generator().manual_seed(0))
    wide = model.generate_codes(torch.tensor([0, 1]), max_context=11, generator=torch.Generator().manual_seed(0))
    assert torch.equal(full, wide)


def test_classifier_free_guidance_runs(monkeypatch):
    model = tester.get_model()
    calls = []
    original = UnbatchedClassifierFreeGuidanceLogitsProcessor.get_unconditional_logits

    def spy(self, input_ids):
        calls.append(self.unconditional_context["input_ids"].clone() if not calls else None)
        return original(self, input_ids)

    monkeypatch.setattr(UnbatchedClassifierFreeGuidanceLogitsProcessor, "get_unconditional_logits", spy)
    labels = torch.tensor([0, 2])
    guided = model.generate_codes(labels, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert guided.shape == (2, 9) and int(guided.max()) < 16
    assert len(calls) == 9  # one unconditional pass per generated token
    null = model.config.null_class_token_id
    assert torch.equal(calls[0], torch.tensor([[null, 16], [null, 16]]))  # [null][BOS] prompt
    again = model.generate_codes(labels, guidance_scale=3.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(guided, again)


def test_top_k_1_is_greedy():
    model = tester.get_model()
    labels = torch.tensor([0, 1, 2])
    sampled = model.generate_codes(labels, top_k=1, generator=torch.Generator().manual_seed(0))
    sequence = model.build_prompt(labels)
    with torch.no_grad():
        for _ in range(9):
            logits = model(sequence).logits[:, -1, :16]  # best code
            sequence = torch.cat([sequence, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(sampled, sequence[:, 2:])


def test_unconditional_model():
    model = tester.get_model(num_classes=0)
    codes = model.generate_codes(None, batch_size=3, generator=torch.Generator().manual_seed(0))
    assert codes.shape == (3, 9) and int(codes.max()) < 16
    with pytest.raises(ValueError, match="guidance"):
        model.generate_codes(None, batch_size=2, guidance_scale=2.0)
    with pytest.raises(ValueError, match="class_labels"):
        model.generate_codes(torch.tensor([0]))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"class_labels": torch.tensor([3])}, "class_labels"),
        ({"class_labels": torch.tensor([-1])}, "class_labels"),
        ({"class_labels": None}, "class_labels"),
        ({"temperature": 0.0}, "temperature"),
        ({"top_k": 0}, "top_k"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"num_codes": 0}, "num_codes"),
        ({"max_context": 1}, "max_context"),
    ],
)
def test_generate_codes_validation(kwargs, match):
    model = tester.get_model()
    kwargs = {"class_labels": torch.tensor([0]), **kwargs}
    with pytest.raises(ValueError, match=match):
        model.generate_codes(**kwargs)


def test_generate_codes_callback_counts_every_position_across_windows():
    config = CodeGPTConfig(codebook_size=16, num_classes=3, num_codes=12, hidden_size=32, intermediate_size=64,
                           num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    model = CodeGPTForCausalLM(config).eval()
    for max_context in (None, 6):
        seen = []
        codes = model.generate_codes(torch.tensor([0, 2]), max_context=max_context, callback=seen.append,
                                     generator=torch.Generator().manual_seed(0))
        assert codes.shape == (2, 12)
        assert seen == list(range(1, 13)), (max_context, seen)


# ------------------------------------------------------------------------------------------- next-frame emulation
def emulator(frame_decoding, seed=0):
    return tester.get_model(seed=seed, num_classes=0, class_dropout_prob=0.0, frame_decoding=frame_decoding)


def frame_codes(config, batch=3, seed=0):
    return torch.randint(0, config.codebook_size, (batch, config.num_codes), generator=torch.Generator().manual_seed(seed))


def test_autoregressive_frame_logits_are_causal_in_the_next_frame():
    """Code j's teacher-forced logits depend on the next frame's codes before j only, and on the current frame."""
    model = emulator("autoregressive")
    config = model.config
    current, target = frame_codes(config, seed=1), frame_codes(config, seed=2)
    ids = model.frame_pair_input_ids(current, target)
    assert ids.shape == (3, 2 * config.num_codes + 1)
    assert torch.equal(ids[:, 1 : config.num_codes + 1], current) and torch.equal(ids[:, config.num_codes + 2 :], target[:, :-1])
    with torch.no_grad():
        logits = model.next_frame_logits(current, target)
        assert logits.shape == (3, config.num_codes, config.codebook_size)
        j = 4
        changed = target.clone()
        changed[:, j:] = (changed[:, j:] + 1) % config.codebook_size
        other = model.next_frame_logits(current, changed)
        torch.testing.assert_close(other[:, : j + 1], logits[:, : j + 1])
        assert not torch.allclose(other[:, j + 1 :], logits[:, j + 1 :])
        moved = current.clone()
        moved[:, 0] = (moved[:, 0] + 1) % config.codebook_size
        assert not torch.allclose(model.next_frame_logits(moved, target)[:, 0], logits[:, 0])


def test_autoregressive_sampling_is_sequential_sampling_from_the_teacher_forced_logits():
    """generate() with the KV cache draws code j from softmax(logits_j / T) given the codes drawn before it, with the
    caller's generator as the only randomness; temperature 0 is greedy."""
    model = emulator("autoregressive")
    config = model.config
    current = frame_codes(config, seed=3)
    drawn = model.sample_next_frame(current, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert drawn.shape == (3, config.num_codes) and int(drawn.min()) >= 0 and int(drawn.max()) < config.codebook_size
    again = model.sample_next_frame(current, temperature=0.8, generator=torch.Generator().manual_seed(5))
    assert torch.equal(drawn, again)
    other = model.sample_next_frame(current, temperature=0.8, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(drawn, other)
    g = torch.Generator().manual_seed(5)
    manual = torch.zeros_like(current)
    with torch.no_grad():
        for j in range(config.num_codes):
            probs = torch.softmax(model.next_frame_logits(current, manual)[:, j].float() / 0.8, -1)
            # over the whole vocabulary, as generate() sees it (the special tokens at probability 0)
            probs = torch.nn.functional.pad(probs, (0, config.vocab_size - config.codebook_size))
            manual[:, j] = torch.multinomial(probs, 1, generator=g)[:, 0]
    assert torch.equal(manual, drawn)
    greedy = model.sample_next_frame(current, temperature=0)
    with torch.no_grad():
        assert torch.equal(model.next_frame_logits(current, greedy).argmax(-1), greedy)


def test_autoregressive_sampling_with_the_static_cache_matches_the_dynamic_one_on_a_small_model():
    """cache_implementation reaches generate(); on this small model one frame's draws agree bit for bit (in general
    rounding can flip a rare draw, see sample_next_frame)."""
    model = emulator("autoregressive")
    current = frame_codes(model.config, seed=7)
    static = model.sample_next_frame(current, generator=torch.Generator().manual_seed(3), cache_implementation="static")
    dynamic = model.sample_next_frame(current, generator=torch.Generator().manual_seed(3))
    assert torch.equal(static, dynamic)
    assert torch.equal(model.sample_next_frame(current, temperature=0, cache_implementation="static"),
                       model.sample_next_frame(current, temperature=0))


def test_parallel_frame_decoding_draws_each_code_from_its_own_softmax():
    model = emulator("parallel")
    current = frame_codes(model.config, seed=4)
    drawn = model.sample_next_frame(current, temperature=0.8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        probs = torch.softmax(model.next_frame_logits(current).float() / 0.8, -1)
    expected = torch.multinomial(probs.flatten(0, 1), 1, generator=torch.Generator().manual_seed(1)).view(drawn.shape)
    assert torch.equal(drawn, expected)


@pytest.mark.parametrize("frame_decoding", ["parallel", "autoregressive"])
def test_one_generator_per_frame_draws_each_frame_from_its_own(frame_decoding):
    model = emulator(frame_decoding)
    current = frame_codes(model.config, batch=2, seed=4)
    together = model.sample_next_frame(current, generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(6)])
    for i, seed in enumerate((5, 6)):
        alone = model.sample_next_frame(current[i: i + 1], generator=[torch.Generator().manual_seed(seed)])
        assert torch.equal(alone[0], together[i])
    with pytest.raises(ValueError, match="expected one per"):
        model.sample_next_frame(current, generator=[torch.Generator()])


def test_frame_decoding_input_errors():
    parallel, autoregressive = emulator("parallel"), emulator("autoregressive")
    current = frame_codes(parallel.config)
    with pytest.raises(ValueError, match="next_codes must be None"):
        parallel.frame_pair_input_ids(current, current)
    with pytest.raises(ValueError, match="next_codes .* required"):
        autoregressive.next_frame_logits(current)
    with pytest.raises(ValueError, match="next_codes has 5 codes"):
        autoregressive.frame_pair_input_ids(current, current[:, :5])
    with pytest.raises(ValueError, match="next_codes must lie in"):
        autoregressive.frame_pair_input_ids(current, current + autoregressive.config.codebook_size)
    with pytest.raises(ValueError, match="temperature"):
        autoregressive.sample_next_frame(current, temperature=-1.0)


def test_autoregressive_emulator_round_trips_its_decoding(tmp_path):
    model = emulator("autoregressive")
    model.save_pretrained(tmp_path)
    loaded = CodeGPTForCausalLM.from_pretrained(tmp_path).eval()
    assert loaded.config.frame_decoding == "autoregressive"
    current = frame_codes(model.config)
    assert torch.equal(loaded.sample_next_frame(current, generator=torch.Generator().manual_seed(0)),
                       model.sample_next_frame(current, generator=torch.Generator().manual_seed(0)))
