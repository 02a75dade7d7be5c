"""Shared loading behaviour for latentheat pipelines."""

from __future__ import annotations

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
        return super().from_pretrained(path, **kwargs)


def check_output_type(output_type: str, allowed=("pil", "np", "pt", "latent")):
    if output_type not in allowed:
        raise ValueError(f"output_type={output_type!r} is not supported; allowed: {', '.join(allowed)}")


__all__ = ["DiffusionPipeline", "LatentheatPipelineMixin", "check_output_type"]
