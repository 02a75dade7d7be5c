"""``checkpoint-{step}`` folders: manifest, validation, pruning and the choice of where to resume.

Each checkpoint is written to a hidden temporary folder and renamed into place once complete,
and carries ``trainer_state.json`` with the step, the resolved config and the sha256 of every
file. A folder whose files do not match its manifest is reported, never loaded.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path
from typing import Optional

STATE_FILE = "trainer_state.json"
COMPLETE_FILE = "stage_complete.json"
_CKPT = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or corrupt."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_checkpoint_manifest(folder: Path, state: dict):
    files = {}
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != STATE_FILE):
        files[str(path.relative_to(folder))] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    state = dict(state, files=files)
    tmp = Path(folder) / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2, sort_keys=True))
    tmp.replace(Path(folder) / STATE_FILE)


def verify_checkpoint(folder: Path) -> dict:
    """Return the trainer state of a complete checkpoint; raise ``CheckpointError`` naming what is wrong."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"checkpoint {folder} does not exist")
    state_path = folder / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {folder} is incomplete: {STATE_FILE} is missing (the run stopped while writing it?)")
    try:
        state = json.loads(state_path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {STATE_FILE} is not valid JSON ({err})") from err
    for rel, meta in state.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder} is incomplete: {rel} is missing")
        if path.stat().st_size != meta["bytes"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: {rel} has {path.stat().st_size} bytes, the manifest says {meta['bytes']}")
        if _sha256(path) != meta["sha256"]:
            raise CheckpointError(f"checkpoint {folder} is corrupt: the sha256 of {rel} does not match its manifest")
    if "global_step" not in state:
        raise CheckpointError(f"checkpoint {folder} is corrupt: {STATE_FILE} has no global_step")
    return state


def read_trainer_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint folders under ``root``, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := _CKPT.match(p.name))]
    return [p for _, p in sorted(found)]


def prune_checkpoints(root: Path, keep: int):
    """Delete the oldest checkpoints so that at most ``keep`` remain (called before saving a new one)."""
    ckpts = list_checkpoints(root)
    for path in ckpts[: max(0, len(ckpts) - keep)]:
        shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(root: Path, resume: str, *, skip_corrupt: bool = False, stage: str = "", must_exist: bool = False) -> Optional[Path]:
    """Resolve ``resume_from_checkpoint`` ("latest" or a path) to a verified checkpoint folder.

    "latest" with no checkpoint yet returns ``None`` (start from scratch). A corrupt latest
    checkpoint is an error unless ``skip_corrupt``, in which case older ones are tried.
    """
    if resume != "latest":
        path = Path(resume)
        verify_checkpoint(path)
        return path
    ckpts = list_checkpoints(root)
    if not ckpts and must_exist:
        raise CheckpointError(f"no checkpoint-* folder under {root} to resume stage {stage!r} from")
    for path in reversed(ckpts):
        try:
            verify_checkpoint(path)
            return path
        except CheckpointError as err:
            if not skip_corrupt:
                raise CheckpointError(f"{err}. Delete it, or set training.skip_corrupt_checkpoints=true to resume from an older checkpoint") from err
    return None


def mark_stage_complete(root: Path, global_step: int):
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / COMPLETE_FILE).write_text(json.dumps({"global_step": global_step}))


def stage_is_complete(root: Path, final_dir: Path) -> bool:
    return (Path(root) / COMPLETE_FILE).is_file() and (Path(final_dir) / "config.json").is_file()
