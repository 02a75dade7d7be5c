"""Shared loading behaviour for latentheat pipelines."""

from __future__ import annotations

import importlib
import json
import os

from diffusers import DiffusionPipeline


class LatentheatPipelineMixin:
    """``from_pretrained`` that also takes a Hub repo id.

    diffusers resolves a repo id by looking for the pipeline's module file inside the repo, which
    fails for a pipeline class that lives in an installed package (this one). We download the
    snapshot first and load from the folder; local folders go straight through.
    """

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        path = str(pretrained_model_name_or_path)
        if not os.path.isdir(path):
            from huggingface_hub import snapshot_download

            download_keys = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")
            download_kwargs = {k: kwargs.pop(k) for k in download_keys if k in kwargs}
            path = snapshot_download(path, ignore_patterns=["checkpoints/*", "logs/*"], **download_kwargs)
        _import_own_components(path)
        return super().from_pretrained(path, **kwargs)


def _import_own_components(path: str):
    """diffusers only loads a component class from a module that is already imported (it will not import a module
    because a repository names it); import the latentheat modules that `model_index.json` names, and only those."""
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        return
    with open(index_file) as f:
        index = json.load(f)
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or not isinstance(spec[0], str):
            continue
        if spec[0] == "hf_models" or spec[0].startswith("hf_models."):
            importlib.import_module(spec[0])


def check_output_type(output_type: str, allowed=("pil", "np", "pt", "latent")):
    if output_type not in allowed:
        raise ValueError(f"output_type={output_type!r} is not supported; allowed: {', '.join(allowed)}")


__all__ = ["DiffusionPipeline", "LatentheatPipelineMixin", "check_output_type"]
