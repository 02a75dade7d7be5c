"""Hub round trip against the loopback server: push an output folder, load it back into a fresh cache.

`huggingface_hub` reads `HF_ENDPOINT` at import, so everything that talks to the server runs in a subprocess with
`hub_env(...)`; the in-process tests only use the server through plain HTTP or never reach the network.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import REPO_ROOT, hub_env
from tests.hub_server import HubServer


REPO_ID = "latentheat-test/tiny-llama"
SUBPROCESS_TIMEOUT = 240


def run_python(args: list[str], env: dict, cwd: Path = REPO_ROOT) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT
    )


def run_script(code: str, env: dict) -> dict:
    """Run `code` in a subprocess; it prints one JSON object on its last stdout line."""
    proc = run_python(["-c", textwrap.dedent(code)], env)
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def make_output_dir(path: Path) -> Path:
    """An output folder as a run writes it, with a tiny real transformers model instead of a pipeline."""
    import torch
    from PIL import Image
    from transformers import LlamaConfig, LlamaForCausalLM

    from trainers.hub import write_model_card

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37)
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    (path / "eval_results.json").write_text(json.dumps(
        {"fid": 12.5, "fid_floor": 1.25, "class_accuracy": 0.875, "bits_per_code": 3.5, "recon_psnr": 21.0, "step": 40}
    ))
    (path / "config.yaml").write_text("task: code_image\ntraining:\n  max_steps: 40\nhub:\n  push: false\n")
    Image.new("L", (56, 28), color=128).save(path / "samples.png")
    (path / "checkpoints" / "checkpoint-20").mkdir(parents=True)
    (path / "checkpoints" / "checkpoint-20" / "optimizer.pt").write_bytes(b"\0" * 64)
    (path / "checkpoint-40").mkdir()
    (path / "checkpoint-40" / "rng_state.pt").write_bytes(b"\0" * 64)
    (path / "scratch.tmp").write_text("partial")
    write_model_card(path, "code_image", repo_id=REPO_ID)
    return path


def expected_files(folder: Path) -> dict[str, bytes]:
    skipped = ("checkpoints/", "checkpoint-", "logs/")
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.relative_to(folder).as_posix().startswith(skipped) and not p.name.endswith(".tmp")
    }


@pytest.fixture(scope="module")
def output_dir(tmp_path_factory) -> Path:
    return make_output_dir(tmp_path_factory.mktemp("run") / "tiny_llama")


@pytest.fixture(scope="module")
def pushed(hub_server, output_dir, tmp_path_factory):
    """Push `output_dir` with `python -m trainers.push` in a subprocess; returns (stdout, log slice)."""
    env = hub_env(hub_server, tmp_path_factory.mktemp("push"))
    start = len(hub_server.request_log)
    proc = run_python(["-m", "trainers.push", str(output_dir), REPO_ID, "--commit-message", "first push"], env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc.stdout, list(hub_server.request_log[start:])


LOAD_SCRIPT = """
import json, os, sys, hashlib
import torch
from huggingface_hub import HfApi, ModelCard, hf_hub_download, snapshot_download
from transformers import AutoModelForCausalLM

repo_id, local_dir = sys.argv[1], sys.argv[2]
api = HfApi()
info = api.model_info(repo_id, files_metadata=True)
snapshot = snapshot_download(repo_id)
files = {}
for root, _, names in os.walk(snapshot):
    for name in names:
        path = os.path.join(root, name)
        files[os.path.relpath(path, snapshot).replace(os.sep, "/")] = hashlib.sha256(open(path, "rb").read()).hexdigest()
config_path = hf_hub_download(repo_id, "config.json")
ids = torch.tensor([[1, 5, 7, 42, 98, 3]])
remote = AutoModelForCausalLM.from_pretrained(repo_id).eval()
local = AutoModelForCausalLM.from_pretrained(local_dir).eval()
with torch.no_grad():
    diff = (remote(ids).logits - local(ids).logits).abs().max().item()
card = ModelCard.load(repo_id)
print(json.dumps({
    "sha": info.sha,
    "siblings": sorted(s.rfilename for s in info.siblings),
    "lfs": sorted(s.rfilename for s in info.siblings if s.lfs is not None),
    "repo_files": sorted(api.list_repo_files(repo_id)),
    "files": files,
    "config_json": open(config_path).read(),
    "in_hf_home": config_path.startswith(os.environ["HF_HOME"]),
    "logits_max_abs_diff": diff,
    "library_name": card.data.library_name,
    "pipeline_tag": card.data.pipeline_tag,
    "tags": card.data.tags,
    "datasets": card.data.datasets,
    "license": card.data.license,
    "model_index": card.data.to_dict().get("model-index"),
    "card_text": card.text,
    "card_data_on_hub": info.card_data.to_dict() if info.card_data else None,
}))
"""


@pytest.fixture(scope="module")
def loaded(hub_server, pushed, output_dir, tmp_path_factory):
    """Everything the loading side sees, from a subprocess with a fresh, empty cache."""
    env = hub_env(hub_server, tmp_path_factory.mktemp("load"))
    return run_script(LOAD_SCRIPT.replace("sys.argv[1], sys.argv[2]", f"{REPO_ID!r}, {str(output_dir)!r}"), env)


def test_push_uploads_through_preupload_lfs_and_commit(pushed):
    stdout, log = pushed
    assert "pushed" in stdout and REPO_ID in stdout
    routes = [(m, p.split("?")[0]) for m, p, status in log if status < 400]
    assert ("POST", "/api/repos/create") in routes
    assert ("POST", f"/api/models/{REPO_ID}/preupload/main") in routes
    assert ("POST", f"/{REPO_ID}.git/info/lfs/objects/batch") in routes
    assert ("POST", f"/api/models/{REPO_ID}/commit/main") in routes
    assert sum(1 for m, p in routes if m == "PUT" and p.startswith("/_lfs/upload/")) == 2  # safetensors + png
    assert not [entry for entry in log if entry[2] >= 500]


def test_snapshot_has_the_same_files_without_checkpoints(loaded, output_dir):
    expected = expected_files(output_dir)
    import hashlib

    got = {k: v for k, v in loaded["files"].items() if k != ".gitattributes"}
    assert got == {k: hashlib.sha256(v).hexdigest() for k, v in expected.items()}
    assert not any(k.startswith(("checkpoints/", "checkpoint-")) or k.endswith(".tmp") for k in loaded["repo_files"])
    assert sorted(loaded["repo_files"]) == sorted(loaded["siblings"])
    assert {"model.safetensors", "samples.png"} <= set(loaded["lfs"])
    assert "config.json" not in loaded["lfs"]


def test_from_pretrained_repo_id_gives_identical_logits(loaded, output_dir):
    assert loaded["logits_max_abs_diff"] == 0.0
    assert loaded["config_json"] == (output_dir / "config.json").read_text()
    assert loaded["in_hf_home"]


def test_card_metadata_and_metrics(loaded):
    assert loaded["library_name"] == "latentheat"
    assert loaded["pipeline_tag"] == "unconditional-image-generation"
    assert {"latentheat", "code_image", "diffusers", "transformers"} <= set(loaded["tags"])
    assert loaded["datasets"] == ["ylecun/mnist"]
    assert loaded["license"] == "apache-2.0"
    (entry,) = loaded["model_index"]
    assert entry["name"] == REPO_ID.split("/")[-1]
    (result,) = entry["results"]
    assert result["dataset"]["type"] == "ylecun/mnist"
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics == {"fid": 12.5, "fid_floor": 1.25, "class_accuracy": 0.875, "bits_per_code": 3.5, "recon_psnr": 21.0}
    text = loaded["card_text"]
    assert "![Samples, one row per class](samples.png)" in text
    assert "| `fid` | 12.5 |" in text and "| `class_accuracy` | 0.875 |" in text
    assert f'CodeImagePipeline.from_pretrained("{REPO_ID}")' in text
    assert "trust_remote_code=True" in text and "max_steps: 40" in text
    assert loaded["card_data_on_hub"]["library_name"] == "latentheat"  # the server parsed the front matter


def test_second_push_makes_a_new_commit_with_the_new_content(hub_server, pushed, loaded, output_dir, tmp_path):
    changed = tmp_path / "tiny_llama"
    shutil.copytree(output_dir, changed)
    (changed / "eval_results.json").write_text(json.dumps({"fid": 9.75}))
    start = len(hub_server.request_log)
    proc = run_python(["-m", "trainers.push", str(changed), REPO_ID], hub_env(hub_server, tmp_path))
    assert proc.returncode == 0, proc.stderr[-5000:]
    log = hub_server.request_log[start:]
    assert not [p for m, p, _ in log if m == "PUT"], "unchanged LFS files must not be uploaded again"

    old_sha = loaded["sha"]
    result = run_script(f"""
        import json
        from huggingface_hub import HfApi, hf_hub_download
        api = HfApi()
        print(json.dumps({{
            "sha": api.repo_info({REPO_ID!r}).sha,
            "new": open(hf_hub_download({REPO_ID!r}, "eval_results.json")).read(),
            "old": open(hf_hub_download({REPO_ID!r}, "eval_results.json", revision={old_sha!r})).read(),
            "titles": [c.title for c in api.list_repo_commits({REPO_ID!r})],
        }}))
    """, hub_env(hub_server, tmp_path))
    assert result["sha"] != old_sha
    assert json.loads(result["new"]) == {"fid": 9.75}
    assert json.loads(result["old"])["fid"] == 12.5
    assert result["titles"][1:] == ["first push", "initial commit"]


def test_push_cli_errors(tmp_path, output_dir):
    from trainers.push import main

    assert main([str(tmp_path / "missing"), REPO_ID]) == 2
    assert main([str(output_dir), "not a/valid//id"]) == 2
    assert main([str(output_dir), "a/b/c"]) == 2


def test_push_to_hub_errors_before_any_network(tmp_path, output_dir, capsys):
    from trainers.hub import push_to_hub

    with pytest.raises(FileNotFoundError, match="does not exist"):
        push_to_hub(tmp_path / "missing", REPO_ID)
    with pytest.raises(ValueError, match="Invalid repo id"):
        push_to_hub(output_dir, "bad--id")
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(FileNotFoundError, match="README.md"):
        push_to_hub(bare, REPO_ID)


def test_push_cli_error_messages_in_subprocess(hub_server, tmp_path):
    env = hub_env(hub_server, tmp_path)
    proc = run_python(["-m", "trainers.push", str(tmp_path / "nope"), REPO_ID], env)
    assert proc.returncode == 2 and "does not exist" in proc.stderr
    proc = run_python(["-m", "trainers.push", str(tmp_path), "x/y/z"], env)
    assert proc.returncode == 2 and "invalid repo id" in proc.stderr


def test_push_renders_missing_card_from_config_task(hub_server, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("task: code_image\n")
    (out / "eval_results.json").write_text(json.dumps({"fid": 3.0}))
    proc = run_python(["-m", "trainers.push", str(out), "latentheat-test/card-only", "--private"],
                      hub_env(hub_server, tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "library_name: latentheat" in (out / "README.md").read_text()


def test_render_model_card_unknown_family_names_available_ones(tmp_path):
    from trainers.hub import render_model_card

    with pytest.raises(FileNotFoundError, match=r"no_such_family.*Available families: .*code_image"):
        render_model_card(tmp_path, "no_such_family")


def test_render_model_card_reads_eval_results_and_config(output_dir):
    from trainers.hub import render_model_card

    repo_id = "u/m"  # only rendered into the card text, never fetched
    card = render_model_card(output_dir, "code_image", repo_id=repo_id, extra={"tags": ["mnist"]})
    assert card.data.model_name == "m" and "mnist" in card.data.tags
    assert {r.metric_type for r in card.data.eval_results} == {"fid", "fid_floor", "class_accuracy", "bits_per_code",
                                                               "recon_psnr"}  # "step" is not a metric
    assert f'from_pretrained("{repo_id}")' in card.text


@pytest.mark.parametrize("decoding, words", [(None, "in parallel in one forward pass"),
                                              ("parallel", "in parallel in one forward pass"),
                                              ("autoregressive", "code by code")])
def test_thermalizer_card_says_how_the_emulator_draws_a_frame(tmp_path, decoding, words):
    from trainers.hub import render_model_card

    emulator = {} if decoding is None else {"frame_decoding": decoding}
    card = render_model_card(tmp_path, "thermalizer", eval_results={}, config={"task": "thermalizer", "model": {"emulator": emulator}})
    assert words in card.text
    other = "code by code" if words != "code by code" else "in parallel in one"
    assert other not in card.text


# -- the server on its own, over plain HTTP ------------------------------------------------------------------------
def _request(url, method="GET", data=None, headers=None):
    req = urllib.request.Request(url, method=method, data=data, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), resp.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_server_resolve_headers_ranges_and_errors(hub_server, pushed):
    base = f"{hub_server.url}/{REPO_ID}/resolve/main"
    status, headers, body = _request(f"{base}/config.json", method="HEAD")
    assert status == 200 and body == b""
    assert len(headers["X-Repo-Commit"]) == 40 and headers["ETag"].startswith('"')
    size = int(headers["Content-Length"])
    status, headers, body = _request(f"{base}/config.json", headers={"Range": "bytes=2-"})
    assert status == 206 and len(body) == size - 2 and headers["Content-Range"] == f"bytes 2-{size - 1}/{size}"
    status, headers, _ = _request(f"{base}/model.safetensors", method="HEAD")
    assert len(headers["X-Linked-Etag"].strip('"')) == 64  # LFS files: sha256 etag
    status, headers, _ = _request(f"{base}/missing.json", method="HEAD")
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound" and "X-Repo-Commit" in headers
    status, headers, _ = _request(f"{hub_server.url}/nobody/nothing/resolve/main/x")
    assert status == 404 and headers["X-Error-Code"] == "RepoNotFound"
    status, headers, _ = _request(f"{hub_server.url}/{REPO_ID}/resolve/nobranch/config.json")
    assert status == 404 and headers["X-Error-Code"] == "RevisionNotFound"
    assert _request(f"{hub_server.url}/api/whoami-v2")[0] == 401
    status, _, body = _request(f"{hub_server.url}/api/whoami-v2", headers={"Authorization": "Bearer x"})
    assert status == 200 and json.loads(body)["name"] == "latentheat-test"


def test_server_tree_pagination(tmp_path):
    with HubServer(tmp_path / "hub", tree_page_size=2) as server:
        server.httpd.store.create_repo("model", "u/many", private=False)
        files = {f"d/f{i}.txt": {"key": "file", "value": {"path": f"d/f{i}.txt", "content": "eA==", "encoding": "base64"}}
                 for i in range(5)}
        server.httpd.store.apply_commit("model", "u/many", "main", {"summary": "add"}, [(v["key"], v["value"]) for v in files.values()])
        url, paths = f"{server.url}/api/models/u/many/tree/main?recursive=true", []
        for _ in range(20):
            status, headers, body = _request(url)
            assert status == 200
            paths += [e["path"] for e in json.loads(body)]
            link = headers.get("Link")
            if not link:
                break
            url = link.split(";")[0].strip("<>")
        assert sorted(paths) == sorted([".gitattributes", "d", *files])
        status, _, body = _request(f"{server.url}/api/models/u/many/tree/main/d")
        assert status == 200 and len(json.loads(body)) == 2  # first page of the folder's 5 files
