"""Code-sequence data: sequence layout, invalid-code policy, .npy round trip, padding collator."""

import numpy as np
import pytest
import torch

from hf_models.code_gpt import CodeGPTConfig, CodeGPTForCausalLM
from hf_models.data.codes import CodeSequenceCollator, build_code_sequences, load_codes, save_codes


torch.set_num_threads(1)


def small_config(**overrides):
    kwargs = dict(codebook_size=8, num_classes=3, num_codes=4, hidden_size=16, intermediate_size=32,
                  num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=16)
    kwargs.update(overrides)
    return CodeGPTConfig(**kwargs)


def test_build_sequences_layout():
    config = small_config()
    codes = np.array([[0, 1, 2, 3], [7, 6, 5, 4]])
    labels = np.array([2, 0])
    ds = build_code_sequences(codes, labels, config)
    assert set(ds.column_names) == {"input_ids", "labels"} and len(ds) == 2
    k = config.codebook_size
    assert ds[0]["input_ids"] == [k + 3 + 2, k, 0, 1, 2, 3, k + 1]
    assert ds[1]["input_ids"] == [config.class_token_id(0), config.bos_token_id, 7, 6, 5, 4, config.eos_token_id]
    assert all(row["labels"] == row["input_ids"] for row in ds)
    assert len(ds[0]["input_ids"]) == config.sequence_length


def test_unconditional_layout():
    config = small_config(num_classes=0)
    ds = build_code_sequences(np.array([[1, 2, 3, 4]]), None, config)
    assert ds[0]["input_ids"] == [8, 1, 2, 3, 4, 9]
    with pytest.raises(ValueError, match="labels"):
        build_code_sequences(np.array([[1, 2, 3, 4]]), np.array([0]), config)


def test_invalid_codes_error_policy():
    config = small_config(invalid_code_policy="error")
    codes = np.array([[0, 9, 2, 3], [-1, 1, 8, 2]])
    with pytest.raises(ValueError, match=r"3 codes .*first bad value 9"):
        build_code_sequences(codes, np.array([0, 1]), config)


def test_invalid_codes_map_policy():
    config = small_config(invalid_code_policy="map")
    codes = np.array([[0, 9, 2, 3], [-1, 1, 8, 2]])
    ds = build_code_sequences(codes, np.array([0, 1]), config)
    bad = config.invalid_code_token_id
    assert ds[0]["input_ids"][2:6] == [0, bad, 2, 3]
    assert ds[1]["input_ids"][2:6] == [bad, 1, bad, 2]


@pytest.mark.parametrize(
    "codes, labels, match",
    [
        (np.zeros((2, 4, 1), dtype=np.int64), np.array([0, 1]), "shape"),
        (np.zeros((2, 4)), np.array([0, 1]), "integer"),
        (np.zeros((2, 4), dtype=np.int64), None, "labels are required"),
        (np.zeros((2, 4), dtype=np.int64), np.array([0, 3]), "num_classes"),
        (np.zeros((2, 4), dtype=np.int64), np.array([0]), "shape"),
    ],
)
def test_build_validation(codes, labels, match):
    with pytest.raises(ValueError, match=match):
        build_code_sequences(codes, labels, small_config())


def test_save_and_load_codes(tmp_path):
    codes = np.arange(12).reshape(3, 4)
    labels = np.array([1, 0, 2])
    save_codes(tmp_path / "codes", codes, labels)
    loaded_codes, loaded_labels = load_codes(tmp_path / "codes")
    assert np.array_equal(loaded_codes, codes) and np.array_equal(loaded_labels, labels)
    save_codes(tmp_path / "unlabelled", codes)
    assert load_codes(tmp_path / "unlabelled")[1] is None


def test_collator_pads_with_pad_and_minus_100():
    collate = CodeSequenceCollator(pad_token_id=10)
    batch = collate([{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}])
    assert torch.equal(batch["input_ids"], torch.tensor([[1, 2, 3], [4, 10, 10]]))
    assert torch.equal(batch["labels"], torch.tensor([[1, 2, 3], [4, -100, -100]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0]]))
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_class_dropout_is_seeded():
    config = small_config()
    ds = build_code_sequences(np.zeros((64, 4), dtype=np.int64), np.arange(64) % 3, config)
    rows = [ds[i] for i in range(len(ds))]
    make = lambda seed: CodeSequenceCollator(  # noqa: E731
        config.pad_token_id, 0.5, config.null_class_token_id, generator=torch.Generator().manual_seed(seed)
    )
    a, b = make(0)(rows), make(0)(rows)
    assert torch.equal(a["input_ids"], b["input_ids"])
    dropped = a["input_ids"][:, 0] == config.null_class_token_id
    assert 10 < int(dropped.sum()) < 54
    assert torch.equal(a["labels"][:, 0], a["input_ids"][:, 0])
    assert torch.equal(a["input_ids"][:, 1:], torch.tensor([r["input_ids"][1:] for r in rows]))  # only position 0
    untouched = CodeSequenceCollator(config.pad_token_id)(rows)
    assert not (untouched["input_ids"][:, 0] == config.null_class_token_id).any()
    with pytest.raises(ValueError, match="null_class_token_id"):
        CodeSequenceCollator(config.pad_token_id, 0.1)


def test_collated_batch_trains_code_gpt():
    config = small_config()
    ds = build_code_sequences(np.random.default_rng(0).integers(0, 8, (6, 4)), np.array([0, 1, 2, 0, 1, 2]), config)
    batch = CodeSequenceCollator(config.pad_token_id)([ds[i] for i in range(6)])
    torch.manual_seed(0)
    out = CodeGPTForCausalLM(config)(**batch)
    assert torch.isfinite(out.loss) and out.logits.shape == (6, 7, config.vocab_size)
