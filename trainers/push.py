"""Push an output folder (model or pipeline, model card, metrics, samples, config) to the Hugging Face Hub.

    python -m trainers.push OUTPUT_DIR REPO_ID [--private] [--token T] [--commit-message M] [--revision R]
    latentheat-push outputs/dtm_mnist my-user/dtm-mnist

A LoRA run's adapter pushes on its own the same way (it carries its card):
`python -m trainers.push OUTPUT_DIR/<stage>/adapter my-user/code-gpt-lora`; load it with
`PeftModel.from_pretrained(base_model, "my-user/code-gpt-lora")`.

`checkpoint-*/`, `checkpoints/`, `logs/` and `*.tmp` are not uploaded. The endpoint comes from `HF_ENDPOINT`, the
token from `--token`, `HF_TOKEN` or `hf auth login`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="latentheat-push", description="Push a latentheat output folder to the Hugging Face Hub."
    )
    parser.add_argument("output_dir", help="folder written by trainers.train (model/pipeline, README.md, ...)")
    parser.add_argument("repo_id", help="Hub repo id, e.g. my-user/dtm-mnist")
    parser.add_argument("--private", action="store_true", help="create the repo as private")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--commit-message", default=None, help="commit message")
    parser.add_argument("--revision", default=None, help="branch to push to (created if missing; default main)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    output_dir = Path(args.output_dir)
    if not output_dir.is_dir():
        print(f"error: output folder {output_dir} does not exist (or is not a folder)", file=sys.stderr)
        return 2

    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(args.repo_id)
    except HFValidationError as err:
        print(f"error: invalid repo id {args.repo_id!r}: {err}", file=sys.stderr)
        return 2

    from huggingface_hub.errors import HfHubHTTPError

    from .hub import push_to_hub

    try:
        info = push_to_hub(
            output_dir,
            args.repo_id,
            private=args.private,
            token=args.token,
            commit_message=args.commit_message,
            revision=args.revision,
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except HfHubHTTPError as err:
        print(f"error: the Hub refused the push: {err}", file=sys.stderr)
        return 1
    print(f"pushed {output_dir} to {info.repo_url.repo_id}: {info} (commit {info.oid})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
