"""AbstractinatorModel: segmentation rule, expander targets, losses and gradients, EMA codebook, causal bits (padding,
the two parts), overfitting one text to an exact greedy reconstruction, two levels and several queries per segment,
generate_bytes, save/load and remote code, config validation, the seed sizes on the meta device."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from hf_models.abstractinator import AbstractinatorConfig, AbstractinatorModel, AbstractinatorOutput
from hf_models.abstractinator.modeling_abstractinator import entropy_segments, expander_targets
from tests.helpers import BLOCK_LATENTHEAT, run_without_latentheat

torch.set_num_threads(1)

LEVEL = {"hidden_size": 32, "num_attention_heads": 2, "sliding_window": 16, "num_lm_layers": 1,
         "num_compression_layers": 1, "intermediate_size": 64, "codebook_size": 64, "max_segment_length": 6,
         "expander_num_encoder_layers": 1, "expander_num_decoder_layers": 1}
CODE_LM = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 2,
           "intermediate_size": 64, "max_position_embeddings": 128}
TEXT = b"To be, or not to be, that is the question"


def make_config(levels=None, **overrides):
    kwargs = dict(compressor_level_configs=levels or [dict(LEVEL)], code_lm_config=dict(CODE_LM),
                  max_position_embeddings=256, expander_max_length=256)
    kwargs.update(overrides)
    return AbstractinatorConfig(**kwargs)


def get_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return AbstractinatorModel(make_config(**overrides))


def batch(*texts):
    width = max(len(t) for t in texts)
    ids = torch.full((len(texts), width), 258, dtype=torch.long)
    mask = torch.zeros(len(texts), width, dtype=torch.long)
    for i, t in enumerate(texts):
        ids[i, : len(t)] = torch.tensor(list(t))
        mask[i, : len(t)] = 1
    return ids, mask


# ---------------------------------------------------------------------------------------------------------------------
# segmentation and targets
# ---------------------------------------------------------------------------------------------------------------------


def test_entropy_segments_rule():
    entropy = torch.tensor([[1.0, 1.1, 1.5, 1.4, 3.0, 0.5, 0.6]])
    valid = torch.ones_like(entropy, dtype=torch.bool)
    # a rise of more than 0.2 over the previous position starts a segment: positions 2 (1.1 -> 1.5) and 4
    assert entropy_segments(entropy, valid, 0.2, None, None).tolist() == [[0, 0, 1, 1, 2, 2, 2]]
    # an absolute threshold adds starts wherever the entropy exceeds it (here also 3: 1.4 > 1.2)
    assert entropy_segments(entropy, valid, 0.2, 1.2, None).tolist() == [[0, 0, 1, 2, 3, 3, 3]]
    # max_length 2 cuts runs: [0, 0], [1, 1], [2, 2], [3]
    assert entropy_segments(entropy, valid, 10.0, None, 2).tolist() == [[0, 0, 1, 1, 2, 2, 3]]
    # padding gets -1 and starts nothing
    valid[0, 5:] = False
    assert entropy_segments(entropy, valid, 0.2, None, None).tolist() == [[0, 0, 1, 1, 2, -1, -1]]


def test_expander_targets_end_every_segment():
    ids = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 0, 0]])
    segments = torch.tensor([[0, 0, 1, 2, 2], [0, 1, 1, -1, -1]])
    labels, target_segments = expander_targets(ids, segments, end_of_segment=99)
    assert labels.tolist() == [[10, 11, 99, 12, 99, 13, 14, 99], [20, 99, 21, 22, 99, -100, -100, -100]]
    assert target_segments[0].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]
    assert target_segments[1, :5].tolist() == [0, 0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------------------------------
# forward, losses, codebook
# ---------------------------------------------------------------------------------------------------------------------


def test_forward_losses_and_gradients():
    model = get_model()
    ids, mask = batch(TEXT, TEXT[:30])
    out = model(ids, attention_mask=mask, return_loss=True)
    assert isinstance(out, AbstractinatorOutput)
    parts = (out.reconstruction_loss + out.commitment_loss + model.config.aux_lm_loss_weight * out.aux_lm_loss
             + model.config.code_lm_loss_weight * out.code_lm_loss)
    assert torch.allclose(out.loss, parts)
    assert all(torch.isfinite(v) for v in (out.loss, out.reconstruction_loss, out.aux_lm_loss, out.code_lm_loss))
    # without labels or return_loss there is no total loss
    assert model(ids, attention_mask=mask).loss is None
    out.loss.backward()
    # the reconstruction reaches the compression branch through the straight-through quantizer, and the entropy
    # model's loss reaches the language-model branch
    comp = model.compressors[0]
    assert comp.compression_layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert comp.pooler.queries.grad.abs().sum() > 0
    assert comp.lm_head.weight.grad.abs().sum() > 0
    assert model.code_lm.model.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0


def test_codes_follow_segments_and_limits():
    model = get_model().eval()
    ids, mask = batch(TEXT, TEXT[:13])
    with torch.no_grad():
        compressed, _ = model.compress(ids, mask)
    seg = compressed[0].segment_ids
    # max_segment_length 6: no segment is longer, and every row has as many codes as segments
    for row, m in zip(seg, mask.bool()):
        counts = torch.bincount(row[m])
        assert int(counts.max()) <= 6 and bool((counts > 0).all())
    assert compressed[0].code_mask.sum(1).tolist() == compressed[0].num_segments.tolist()
    codes = compressed[0].codes
    assert bool((codes[compressed[0].code_mask] >= 0).all()) and bool((codes[~compressed[0].code_mask] == -1).all())
    assert int(codes.max()) < 64


def test_ema_codebook_moves_in_training_only():
    model = get_model()
    ids, mask = batch(TEXT)
    quantizer = model.compressors[0].quantizer
    before = quantizer.codebook.clone()
    model.eval()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert torch.equal(quantizer.codebook, before)
    model.train()
    with torch.no_grad():
        model(ids, attention_mask=mask)
    assert not torch.equal(quantizer.codebook, before)
    # every code counted less than the threshold was restarted on an encoder output: none stays below it
    assert bool((quantizer.ema_cluster_size >= quantizer.dead_code_threshold - 1e-6).all())


def test_code_lm_only_trains_the_code_lm_on_frozen_codes():
    model = get_model().train()
    ids, mask = batch(TEXT, TEXT[:20])
    codebook = model.compressors[0].quantizer.codebook.clone()
    out = model(ids, attention_mask=mask, code_lm_only=True)
    assert out.loss is out.code_lm_loss and out.reconstruction_loss is None
    out.loss.backward()
    # the codebook did not move although the model is in training mode, and only the code LM got gradients
    assert torch.equal(model.compressors[0].quantizer.codebook, codebook)
    assert model.compressors[0].training  # the mode is given back
    grads = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads and all(n.startswith("code_lm.") for n in grads)
    # its loss is the joint forward's code LM loss on the same codes
    model.eval()
    assert torch.allclose(model(ids, attention_mask=mask, code_lm_only=True).loss,
                          model(ids, attention_mask=mask).code_lm_loss)


# ---------------------------------------------------------------------------------------------------------------------
# causal bits
# ---------------------------------------------------------------------------------------------------------------------


def test_causal_bits_parts_and_padding():
    model = get_model().eval()
    ids, mask = batch(TEXT, TEXT[:17], TEXT[5:30])
    bits = model.causal_bits(ids, mask)
    assert torch.allclose(bits["bits"], bits["code_bits"] + bits["expander_bits"])
    assert bits["num_bytes"].tolist() == [len(TEXT), 17, 25]
    # each row's bits do not depend on the other rows or on padding
    for i, text in enumerate((TEXT, TEXT[:17], TEXT[5:30])):
        alone = model.causal_bits(*batch(text))
        assert torch.allclose(alone["bits"][0], bits["bits"][i], atol=1e-3), (i, alone["bits"], bits["bits"])
    # the code part is the code LM's negative log-likelihood of [BOS] + codes + [EOS], in bits
    codes = model.encode(*batch(TEXT))[0]
    cfg = model.config.code_lm_config
    seq = torch.cat([torch.tensor([cfg.bos_token_id]), codes, torch.tensor([cfg.eos_token_id])])[None]
    with torch.no_grad():
        logits = model.code_lm(input_ids=seq).logits[0, :-1]
    nll = F.cross_entropy(logits, seq[0, 1:], reduction="sum").item() / math.log(2)
    assert abs(nll - bits["code_bits"][0].item()) < 1e-3


def test_causal_bits_returns_the_forward_pass_it_came_from():
    model = get_model().eval()
    ids, mask = batch(TEXT, TEXT[:17])
    plain = model.causal_bits(ids, mask)
    bits = model.causal_bits(ids, mask, return_outputs=True)
    assert "outputs" not in plain and torch.equal(plain["bits"], bits["bits"])
    out = bits["outputs"]
    assert isinstance(out, AbstractinatorOutput)
    with torch.no_grad():
        entropy = model.compressors[0](ids, mask.bool()).logits
    real = mask.bool()
    assert torch.allclose(out.entropy_logits[0][real], entropy[real], atol=1e-5)
    for got, codes in zip(out.codes[-1], model.encode(ids, mask)):
        assert torch.equal(got[got >= 0], codes)
    # its code LM logits are those of [BOS] + codes + [EOS]
    lm_ids, lm_mask, _ = model.code_lm_inputs(out.codes[-1], out.code_masks[-1])
    with torch.no_grad():
        logits = model.code_lm(input_ids=lm_ids, attention_mask=lm_mask).logits
    assert torch.allclose(out.code_lm_logits[lm_mask.bool()], logits[lm_mask.bool()], atol=1e-5)


def test_causal_bits_needs_the_code_lm():
    model = get_model(use_code_lm=False)
    assert model.code_lm is None
    with pytest.raises(ValueError, match="use_code_lm=False"):
        model.causal_bits(*batch(TEXT))
    with pytest.raises(ValueError, match="use_code_lm=False"):
        model.generate_bytes("To be")


def test_overfit_one_text_reconstructs_exactly():
    """A few hundred steps on one text: the expander gives the text back from its own codes, greedily, and the text's
    causal bits fall far below 8 per byte. Fails if the targets, the segment-causal cross-attention or the
    generation loop disagree about where segments are."""
    model = get_model(seed=1)
    ids, mask = batch(TEXT)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(300):
        loss = model(ids, attention_mask=mask, return_loss=True).loss
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    codes = model.encode(ids)[0]
    rebuilt = model.decode_codes(codes)
    assert bytes(rebuilt.tolist()) == TEXT
    bits = model.causal_bits(ids)
    assert bits["bits"].item() / len(TEXT) < 2.0 and loss.item() < first / 4


# ---------------------------------------------------------------------------------------------------------------------
# two levels, several queries per segment, generation
# ---------------------------------------------------------------------------------------------------------------------


def test_two_levels_and_two_queries():
    upper = dict(LEVEL, codebook_size=16, max_segment_length=3)
    model = get_model(levels=[dict(LEVEL, num_queries=2), upper])
    assert model.config.num_levels == 2 and model.config.level_vocab_size(1) == 64
    assert model.config.code_lm_config.vocab_size == 18  # the top codebook + BOS + EOS
    ids, mask = batch(TEXT, TEXT[:20])
    out = model(ids, attention_mask=mask, return_loss=True)
    assert len(out.codes) == 2 and torch.isfinite(out.loss)
    # level 0 gives two codes per segment; level 1 reads them
    assert out.code_masks[0].sum(1).remainder(2).eq(0).all()
    assert int(out.codes[1][out.code_masks[1]].max()) < 16
    out.loss.backward()
    model.eval()
    bits = model.causal_bits(ids, mask)
    assert bool(torch.isfinite(bits["bits"]).all())
    symbols = model.decode_codes(model.encode(*batch(TEXT))[0], max_length=64)
    assert symbols.dtype == torch.long and bool(((symbols >= 0) & (symbols < 256)).all())


def test_expander_kv_cache_writes_what_the_full_recompute_writes():
    """The expander's cached decoding (DynamicCache + code keys computed once) gives the symbols of re-running the
    decoder over the whole prefix at every step: greedy and sampled, rows of different lengths, several levels."""
    two_layers = {**LEVEL, "expander_num_decoder_layers": 2}
    model = get_model(levels=[two_layers, {**two_layers, "num_queries": 2, "max_segment_length": 3}]).eval()
    ids, mask = batch(TEXT, TEXT[:20])
    with torch.no_grad():
        out = model(ids, mask, return_dict=True)
    for level, (codes, code_mask) in enumerate(zip(out.codes, out.code_masks)):
        expander = model.expanders[level]
        vectors = model.compressors[level].quantizer.lookup(codes.clamp(min=0))
        cached = expander.generate(vectors, code_mask, 120, use_cache=True)
        full = expander.generate(vectors, code_mask, 120, use_cache=False)
        assert [r.tolist() for r in cached[0]] == [r.tolist() for r in full[0]] and cached[1] == full[1]
        draws = [expander.generate(vectors, code_mask, 120, do_sample=True, temperature=1.5,
                                   generator=torch.Generator().manual_seed(7), use_cache=use_cache)
                 for use_cache in (True, False)]
        assert [r.tolist() for r in draws[0][0]] == [r.tolist() for r in draws[1][0]]
        assert any(len(r) for r in draws[0][0])


def test_generate_bytes_repeats_with_a_seed_and_checks_input():
    model = get_model().eval()
    torch.manual_seed(3)
    a = model.generate_bytes("To be", max_new_codes=3, max_length=40)
    torch.manual_seed(3)
    b = model.generate_bytes(b"To be", max_new_codes=3, max_length=40)
    assert isinstance(a, bytes) and a == b
    # greedy needs no seed
    assert model.generate_bytes("To be", max_new_codes=3, do_sample=False, max_length=40) == \
        model.generate_bytes("To be", max_new_codes=3, do_sample=False, max_length=40)
    with pytest.raises(ValueError, match="non-empty str or bytes"):
        model.generate_bytes("")
    with pytest.raises(ValueError, match="max_new_codes=0"):
        model.generate_bytes("To be", max_new_codes=0)
    with pytest.raises(ValueError, match="codes outside"):
        model.decode_codes(torch.tensor([3, 64]))


@pytest.mark.parametrize(
    "ids, mask, message",
    [
        (torch.tensor([[1, 2, 300]]), None, "outside \\[0, vocab_size=259\\)"),
        (torch.tensor([1, 2, 3]), None, "must be a \\(batch, seq_len\\) tensor"),
        (torch.tensor([[1.0, 2.0]]), None, "integer symbol ids"),
        (torch.tensor([[1, 2, 3]]), torch.tensor([[0, 1, 1]]), "first position of every row"),
        (torch.tensor([[1, 2, 3]]), torch.tensor([[1, 1]]), "attention_mask shape"),
        (torch.zeros(1, 300, dtype=torch.long), None, "exceeds max_position_embeddings=256"),
    ],
)
def test_bad_inputs(ids, mask, message):
    with pytest.raises(ValueError, match=message):
        get_model()(ids, attention_mask=mask)


# ---------------------------------------------------------------------------------------------------------------------
# save / load, remote code
# ---------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip(tmp_path):
    from transformers import AutoModel

    model = get_model().eval()
    model.save_pretrained(tmp_path)
    ids, mask = batch(TEXT, TEXT[:20])
    for loaded in (AbstractinatorModel.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)):
        assert type(loaded) is AbstractinatorModel
        loaded.eval()
        assert torch.equal(loaded.compressors[0].quantizer.codebook, model.compressors[0].quantizer.codebook)
        assert torch.allclose(loaded.causal_bits(ids, mask)["bits"], model.causal_bits(ids, mask)["bits"], atol=1e-4)
    assert loaded.config.compressor_level_configs == model.config.compressor_level_configs


REMOTE_SCRIPT = BLOCK_LATENTHEAT + (
    """
import sys
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel

model = AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
assert type(model).__name__ == "AbstractinatorModel" and "hf_models" not in type(model).__module__, type(model)
inputs = load_file(sys.argv[2])
bits = model.causal_bits(inputs["ids"], inputs["mask"])
save_file({"bits": bits["bits"].contiguous()}, sys.argv[3])
"""
)


def test_remote_code_loads_without_latentheat(tmp_path):
    model = get_model().eval()
    model.register_for_auto_class("AutoModel")
    model.save_pretrained(tmp_path / "repo")
    auto_map = json.loads((tmp_path / "repo" / "config.json").read_text())["auto_map"]
    assert auto_map == {"AutoConfig": "configuration_abstractinator.AbstractinatorConfig",
                        "AutoModel": "modeling_abstractinator.AbstractinatorModel"}
    ids, mask = batch(TEXT, TEXT[:20])
    out = run_without_latentheat(tmp_path, REMOTE_SCRIPT, {"ids": ids, "mask": mask})
    assert torch.allclose(out["bits"], model.causal_bits(ids, mask)["bits"], atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------------------------------


def test_seed_config_on_meta_device():
    """The original's sizes: one level 768 wide, 6 + 6 layers, 49,404 codes, window 512; a 16-layer code LM."""
    cfg = AbstractinatorConfig()
    level = cfg.compressor_level_configs[0]
    assert (level["hidden_size"], level["num_attention_heads"], level["sliding_window"], level["num_lm_layers"],
            level["num_compression_layers"], level["codebook_size"], level["num_queries"]) == (768, 12, 512, 6, 6, 49404, 1)
    assert (level["expander_num_encoder_layers"], level["expander_num_decoder_layers"]) == (2, 4)
    assert cfg.vocab_size == 259 and (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (256, 257, 258)
    assert cfg.aux_lm_loss_weight == 1.0 and cfg.code_lm_loss_weight == 0.2
    lm = cfg.code_lm_config
    assert (lm.hidden_size, lm.num_hidden_layers, lm.num_attention_heads, lm.vocab_size) == (768, 16, 12, 49406)
    with torch.device("meta"):
        model = AbstractinatorModel(cfg)
    d, ff = 768, 3072
    block = 4 * (d * d + d) - d + 3 * d * ff + 2 * d  # Qwen2: q, k, v with bias, o without; MLP; two norms
    compressor = 259 * d + 12 * block + d + d * 259 + d + (d + 4 * d * d)
    expander = d * d + 2 * block + d + 261 * d + 4 * (block + d + 4 * d * d + d + 3 * d * ff) + d + d * 260
    llama_block = 4 * d * d + 3 * d * ff + 2 * d
    code_lm = 2 * 49406 * d + 16 * llama_block + d
    assert sum(p.numel() for p in model.parameters()) == compressor + expander + code_lm
    assert model.compressors[0].quantizer.codebook.shape == (49404, 768)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"compressor_level_configs": []}, "non-empty list"),
        ({"compressor_level_configs": [{"hidden_sise": 32}]}, "unknown keys \\['hidden_sise'\\]"),
        ({"compressor_level_configs": [{"hidden_size": 30, "num_attention_heads": 4}]}, "not divisible"),
        ({"compressor_level_configs": [{"codebook_size": 0}]}, "codebook_size=0 is invalid"),
        ({"compressor_level_configs": [{"ema_decay": 1.0}]}, "ema_decay=1.0 is invalid"),
        ({"compressor_level_configs": [{"entropy_delta": -0.1}]}, "entropy_delta=-0.1 is invalid"),
        ({"compressor_level_configs": [{"max_segment_length": 0}]}, "max_segment_length=0 is invalid"),
        ({"compressor_level_configs": [{"num_shared_layers": -1}]}, "num_shared_layers=-1 is invalid"),
        ({"bos_token_id": 257}, "must differ"),
        ({"pad_token_id": 259}, "pad_token_id=259 is invalid"),
        ({"code_lm_loss_weight": -1}, "code_lm_loss_weight=-1 is invalid"),
        ({"use_code_lm": "yes"}, "use_code_lm='yes' is invalid"),
        ({"code_lm_config": "llama"}, "expected a LlamaConfig"),
        ({"code_lm_config": {"hidden_size": 30, "num_attention_heads": 4}}, "(?s)code_lm_config=.* is invalid: .*multiple of the number of attention heads"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AbstractinatorConfig(**kwargs)
