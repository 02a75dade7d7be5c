"""Shared pytest fixtures.

Hub tests: the `hub_server` fixture runs one loopback Hub-compatible server (tests/hub_server.py) on 127.0.0.1 for
the whole session. `huggingface_hub` reads `HF_ENDPOINT` when it is imported, so code that talks to that server runs
in a subprocess started with `hub_env(hub_server, tmp_path)`:

```python
def test_push_and_load(hub_server, tmp_path):
    env = hub_env(hub_server, tmp_path)
    subprocess.run([sys.executable, "-m", "trainers.push", str(out), "user/repo"], env=env, check=True)
```
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest


REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))


def pytest_configure(config):
    """Nothing global is set here: each test that needs Hub settings passes them to its own subprocess."""


@pytest.fixture(scope="session")
def hub_server():
    """A running `tests.hub_server.HubServer` (attributes `url`, `root`, `request_log`), shared by the session."""
    from tests.hub_server import HubServer

    with tempfile.TemporaryDirectory(prefix="latentheat-hub-") as root:
        server = HubServer(root).start()
        try:
            yield server
        finally:
            server.stop()


def hub_env(hub_server, tmp_path, **extra: str) -> dict[str, str]:
    """Environment for a subprocess that talks to `hub_server` with a fresh, empty Hugging Face cache.

    `hub_server` is the fixture's server (or its URL); `tmp_path` gets a new `hf_home_*` folder on each call, so two
    calls in one test give two independent caches. Sets HF_ENDPOINT, HF_HUB_DISABLE_XET=1, HF_HOME, HF_TOKEN (a
    dummy: the test server accepts any token), HF_HUB_OFFLINE=0, and PYTHONPATH with the repo root first.
    """
    url = hub_server if isinstance(hub_server, str) else hub_server.url
    hf_home = Path(tempfile.mkdtemp(prefix="hf_home_", dir=tmp_path))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    pythonpath = os.pathsep.join(p for p in (str(REPO_ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update(
        HF_ENDPOINT=url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(hf_home),
        HF_TOKEN="hf_dummy_test_token",
        HF_HUB_OFFLINE="0",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        PYTHONPATH=pythonpath,
        **extra,
    )
    return env
