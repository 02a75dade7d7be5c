"""Importing hf_models registers every family with the transformers Auto classes."""

import pytest
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import hf_models


@pytest.mark.parametrize(
    "model_type, auto, model_cls",
    [
        ("vq_tokenizer", AutoModel, "VQTokenizerModel"),
        ("code_gpt", AutoModelForCausalLM, "CodeGPTForCausalLM"),
        ("dtm", AutoModel, "DTMModel"),
        ("mnist_classifier", AutoModel, "MNISTClassifierModel"),
        ("thermalizer", AutoModel, "ThermalizerModel"),
        ("tokcom_vae", AutoModel, "TokComVAEModel"),
        ("tokcom_denoiser", AutoModel, "TokComDenoiserModel"),
        ("abstractinator", AutoModel, "AbstractinatorModel"),
    ],
)
def test_auto_classes_resolve_every_family(model_type, auto, model_cls):
    config = AutoConfig.for_model(model_type)
    assert config.model_type == model_type
    assert auto._model_mapping[type(config)] is getattr(hf_models, model_cls)
