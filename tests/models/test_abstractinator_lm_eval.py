"""The `hier_ae` lm-eval adapter: scores are differences of `causal_bits` (codes paid for), batching does not change
them, rolling windows, generation (the new part only, stop strings, greedy determinism), a local-task
`simple_evaluate` run with no network, argument checks."""

import json
import math
import socket

import pytest
import torch

import lm_eval  # the `lm_eval` extra, installed by `make install`
from lm_eval.api.instance import Instance
from lm_eval.api.registry import get_model

from hf_models.abstractinator import AbstractinatorConfig, AbstractinatorModel
from hf_models.abstractinator.lm_eval_adapter import HierarchicalAELM


torch.set_num_threads(1)

LN2 = math.log(2.0)
TEXT = b"the cat sat on the mat. the dog sat on the log. " * 8


def tiny_config(**overrides):
    level = {"hidden_size": 32, "num_attention_heads": 2, "sliding_window": 16, "num_lm_layers": 1,
             "num_compression_layers": 1, "intermediate_size": 64, "codebook_size": 64,
             "expander_num_encoder_layers": 1, "expander_num_decoder_layers": 1, "max_segment_length": 3}
    kwargs = dict(
        compressor_level_configs=[level],
        code_lm_config={"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "num_key_value_heads": 2, "intermediate_size": 64},
        max_position_embeddings=256,
        expander_max_length=96,
    )
    kwargs.update(overrides)
    return AbstractinatorConfig(**kwargs)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A latentheat-style run folder (`<run>/abstractinator/`) with a tiny model trained for a few seconds on a
    repetitive text, so its expanders end segments and generation writes new bytes."""
    torch.manual_seed(0)
    model = AbstractinatorModel(tiny_config())
    optimizer = torch.optim.Adam(model.parameters(), lr=5e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(200):
        starts = torch.randint(0, 48, (8,), generator=generator).tolist()
        ids = torch.tensor([list(TEXT[s:s + 32]) for s in starts])
        loss = model(ids, return_loss=True).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    root = tmp_path_factory.mktemp("run")
    model.eval().save_pretrained(root / "abstractinator")
    return root


@pytest.fixture(scope="module")
def model(run_dir):
    return AbstractinatorModel.from_pretrained(run_dir / "abstractinator").eval()


def requests(kind, arguments):
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(arguments)]


def direct_bits(model, data: bytes) -> float:
    if not data:
        return 0.0
    return float(model.causal_bits(torch.tensor([list(data)]))["bits"][0])


def test_registered():
    assert get_model("hier_ae") is HierarchicalAELM


def test_loglikelihood_is_a_difference_of_causal_bits_and_batching_does_not_change_it(model):
    pairs = [("the cat", " sat on the mat."), ("", "the dog"), ("the dog sat on the", " log"),
             ("the cat", " sat on the log."), ("a", "b"), ("the mat.", "")]
    expected = [-(direct_bits(model, (c + x).encode()) - direct_bits(model, c.encode())) * LN2 for c, x in pairs]
    one = HierarchicalAELM(model=model, batch_size=1).loglikelihood(requests("loglikelihood", pairs))
    three = HierarchicalAELM(model=model, batch_size=3).loglikelihood(requests("loglikelihood", pairs))
    assert len(one) == len(three) == len(pairs)
    for (lp1, greedy1), (lp3, greedy3), want in zip(one, three, expected):
        assert isinstance(lp1, float) and greedy1 is False and greedy3 is False  # is_greedy not computed
        assert lp1 == pytest.approx(want, abs=1e-4)
        assert lp3 == pytest.approx(lp1, abs=1e-4)
    assert one[-1][0] == 0.0  # an empty continuation costs nothing
    # the codes are paid for: the continuation's score includes code bits, not the expander bits alone
    ids = torch.tensor([list(b"the dog")])
    out = model.causal_bits(ids)
    assert float(out["code_bits"][0]) > 0
    assert one[1][0] == pytest.approx(-(float(out["code_bits"][0]) + float(out["expander_bits"][0])) * LN2, abs=1e-4)


def test_is_greedy_when_asked(model):
    lm = HierarchicalAELM(model=model, compute_is_greedy=True)
    length = 4  # continuation bytes; the adapter generates this many new codes for it
    new = lm.generate_new_bytes("the cat sat", length, do_sample=False)
    assert len(new) >= length and new[:length].isascii()
    greedy = new[:length].decode()
    other = ("#" if greedy[0] != "#" else "%") + greedy[1:]
    (_, yes), (_, no) = lm.loglikelihood(requests("loglikelihood", [("the cat sat", greedy), ("the cat sat", other)]))
    assert yes is True and no is False


def test_loglikelihood_rolling_sums_windows(model):
    string = TEXT[:53].decode()
    lm = HierarchicalAELM(model=model, max_length=16, batch_size=3)
    windows = [string.encode()[i:i + 16] for i in range(0, 53, 16)]
    assert [len(w) for w in windows] == [16, 16, 16, 5]
    expected = -sum(direct_bits(model, w) for w in windows) * LN2
    whole = -direct_bits(model, string.encode()) * LN2
    got, empty, short = lm.loglikelihood_rolling(requests("loglikelihood_rolling", [(string,), ("",), ("the",)]))
    assert got == pytest.approx(expected, abs=1e-4)
    assert abs(got - whole) > 1e-3  # the windows were really scored apart
    assert empty == 0.0
    assert short == pytest.approx(-direct_bits(model, b"the") * LN2, abs=1e-4)
    # a long continuation in loglikelihood is scored in the same windows, its context dropped
    (long_lp, _), = lm.loglikelihood(requests("loglikelihood", [("the cat", string)]))
    assert long_lp == pytest.approx(expected, abs=1e-4)


def test_generation_new_part_matches_generate_bytes(model):
    lm = HierarchicalAELM(model=model)
    new_bytes = []
    for context in ("the cat", "the dog sat on"):
        data, prompt = lm.generate_with_prompt_length(context, 6, do_sample=False)
        max_length = model.config.expander_max_length + 2 * len(context.encode())
        assert data == model.generate_bytes(context, max_new_codes=6, do_sample=False, max_length=max_length)
        assert 0 < prompt <= len(data)  # the prompt's reconstruction, then the new bytes
        assert lm.generate_new_bytes(context, 6, do_sample=False) == data[prompt:]
        new_bytes.append(len(data) - prompt)
    # the small model trained in the fixture may end a context's continuation at once (greedy decoding: which one
    # depends on the machine's rounding), but not every context's
    assert max(new_bytes) > 0, new_bytes
    # one new code is one more segment: only its bytes are new (the trained expander ends segments within 3 bytes)
    data, prompt = lm.generate_with_prompt_length("the cat", 1, do_sample=False)
    assert len(data) - prompt <= 3  # one segment of at most max_segment_length bytes


def test_generate_until(model):
    lm = HierarchicalAELM(model=model)
    contexts = ["the cat", "the dog sat on", ""]
    free = {"until": [], "max_gen_toks": 8, "do_sample": False}
    first = lm.generate_until(requests("generate_until", [(c, free) for c in contexts]))
    again = lm.generate_until(requests("generate_until", [(c, free) for c in contexts]))
    assert all(isinstance(text, str) for text in first)
    assert first == again  # greedy is deterministic
    text = first[0]
    assert len(text) >= 4
    stop = text[2:4]
    cut = lm.generate_until(requests("generate_until", [(contexts[0], {**free, "until": ["\x00", stop]})]))[0]
    assert cut == text[:text.index(stop)] and stop not in cut
    # max_gen_toks counts new codes: fewer codes, fewer bytes
    short = lm.generate_until(requests("generate_until", [(contexts[0], {**free, "max_gen_toks": 1})]))[0]
    assert len(short) < len(text)
    # sampling is seeded by torch
    sampled = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    torch.manual_seed(3)
    a = lm.generate_until(requests("generate_until", [(contexts[0], sampled)]))
    torch.manual_seed(3)
    b = lm.generate_until(requests("generate_until", [(contexts[0], sampled)]))
    assert a == b


def test_loading_and_bad_arguments(run_dir, model):
    nested = HierarchicalAELM(pretrained=str(run_dir))  # finds abstractinator/
    flat = HierarchicalAELM(pretrained=str(run_dir / "abstractinator"))
    built = HierarchicalAELM(model=model)
    assert nested.max_length == model.config.max_position_embeddings and nested.batch_size == 8
    pair = requests("loglikelihood", [("the cat", " sat")])
    assert nested.loglikelihood(pair) == flat.loglikelihood(pair) == built.loglikelihood(pair)
    bad = [
        dict(),
        dict(pretrained=str(run_dir), model=model),
        dict(pretrained=str(run_dir / "missing")),
        dict(pretrained=str(run_dir), subfolder="elsewhere"),
        dict(model=model, batch_size=0),
        dict(model=model, batch_size="many"),
        dict(model=model, max_length=model.config.max_position_embeddings + 1),
        dict(model=model, max_length=0),
        dict(model=model, max_new_codes=0),
        dict(model=model, temperature=0),
        dict(model=model, top_p=1.5),
        dict(model=model, do_sample="yes"),
        dict(model=model, device="nowhere"),
        dict(model=model, dtype="int8"),
        dict(model=model, flavour="x"),
        dict(model=torch.nn.Linear(2, 2)),
    ]
    for kwargs in bad:
        with pytest.raises(ValueError):
            HierarchicalAELM(**kwargs)
    no_lm = AbstractinatorModel(tiny_config(use_code_lm=False))
    with pytest.raises(ValueError, match="code language model"):
        HierarchicalAELM(model=no_lm)


def test_simple_evaluate_on_a_local_task(run_dir, tmp_path, monkeypatch):
    import datasets
    import huggingface_hub.constants

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True, raising=False)
    outside = []

    def no_network(sock, address, *args, **kwargs):
        outside.append(address)
        raise OSError(f"network access in a test: {address!r}")

    monkeypatch.setattr(socket.socket, "connect", no_network)

    docs = [
        {"question": "the cat sat on the", "choices": [" mat.", " sky!"], "answer": 0},
        {"question": "the dog sat on the", "choices": [" zzz", " log."], "answer": 1},
        {"question": "the cat", "choices": [" sat", " qqq"], "answer": 0},
        {"question": "on the", "choices": [" xyz", " mat"], "answer": 1},
        {"question": "the dog", "choices": [" sat", " ###"], "answer": 0},
    ]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(doc) + "\n" for doc in docs))
    common = (f"dataset_path: json\n"
              f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
              f"  cache_dir: {json.dumps(str(tmp_path / 'datasets_cache'))}\n"
              f"test_split: test\nmetadata:\n  version: 1.0\n")
    (tmp_path / "hier_ae_toy_mc.yaml").write_text(
        "task: hier_ae_toy_mc\noutput_type: multiple_choice\n" + common
        + 'doc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\ndoc_to_choice: "{{choices}}"\n'
        + "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    (tmp_path / "hier_ae_toy_gen.yaml").write_text(
        "task: hier_ae_toy_gen\noutput_type: generate_until\n" + common
        + 'doc_to_text: "{{question}}"\ndoc_to_target: "{{choices[answer]}}"\n'
        + "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 4\n  do_sample: false\n"
        + "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    from lm_eval.tasks import TaskManager

    task_manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="hier_ae",
        model_args=f"pretrained={run_dir},batch_size=2",
        tasks=["hier_ae_toy_mc", "hier_ae_toy_gen"],
        task_manager=task_manager,
        limit=4,
        bootstrap_iters=0,
    )
    assert not outside
    acc = out["results"]["hier_ae_toy_mc"]["acc,none"]
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    exact = out["results"]["hier_ae_toy_gen"]["exact_match,none"]
    assert isinstance(exact, float) and 0.0 <= exact <= 1.0
    assert out["n-samples"]["hier_ae_toy_mc"]["effective"] == 4
