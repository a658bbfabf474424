"""Downloads, offline: a loopback server that answers like the hub's file endpoints.

huggingface-hub reads HF_ENDPOINT when it is imported, so each download runs in a child
process pointed at the server, with HF_HOME in a temporary folder. Never the internet.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests import ggufs

REPO, FILE, COMMIT = "acme/tiny-GGUF", "tiny.gguf", "a" * 40


class FakeHub(BaseHTTPRequestHandler):
    """Serves one file at /{REPO}/resolve/{revision}/{FILE}; 404s for everything else."""

    payload = b""
    requests: list[str] = []

    def _answer(self, body: bool) -> None:
        type(self).requests.append(f"{self.command} {self.path}")
        if not self.path.startswith(f"/{REPO}/"):
            self.send_response(404)
            self.send_header("X-Error-Code", "RepoNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if self.path not in (f"/{REPO}/resolve/main/{FILE}", f"/{REPO}/resolve/{COMMIT}/{FILE}"):
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("X-Repo-Commit", COMMIT)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        etag = hashlib.sha256(self.payload).hexdigest()
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(len(self.payload)))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if body:
            self.wfile.write(self.payload)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(body=False)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(body=True)

    def log_message(self, *_args: object) -> None:
        pass


@pytest.fixture()
def hub(tmp_path: Path):
    FakeHub.payload = ggufs.write_model(tmp_path / "src.gguf").read_bytes()
    FakeHub.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def run_child(code: str, endpoint: str, home: Path, offline: bool = False
              ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1",
               HF_HUB_DISABLE_XET="1", NO_PROXY="127.0.0.1", no_proxy="127.0.0.1",
               PYTHONPATH=str(Path(__file__).resolve().parent.parent))
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=120)


RESOLVE = """
import json, sys
from eft_local.presets import ModelSpec
from eft_local import hub
from eft_local.errors import EftError
spec = ModelSpec(role="small_ft", hf_repo=sys.argv[1] if len(sys.argv) > 1 else {repo!r},
                 hf_file={file!r})
try:
    before = hub.cached_path(spec)
    path = hub.resolve(spec)
    print(json.dumps({{"before": str(before), "path": str(path)}}))
except EftError as exc:
    print(json.dumps({{"error": str(exc)}}))
"""


def resolve_code(repo: str = REPO, file: str = FILE) -> str:
    return RESOLVE.format(repo=repo, file=file)


def test_download_into_the_hub_cache_then_offline(hub: str, tmp_path: Path) -> None:
    home = tmp_path / "hf"
    first = run_child(resolve_code(), hub, home)
    assert first.returncode == 0, first.stderr
    out = json.loads(first.stdout)
    assert out["before"] == "None"
    path = Path(out["path"])
    assert path.read_bytes() == FakeHub.payload
    assert str(home) in str(path) and COMMIT in str(path)  # the normal snapshot layout
    assert any(r.startswith("GET") for r in FakeHub.requests)

    FakeHub.requests = []
    again = json.loads(run_child(resolve_code(), hub, home, offline=True).stdout)
    assert again["before"] == again["path"] == str(path)
    assert FakeHub.requests == []  # served from the cache, no network


def test_missing_file_offline_says_how_to_fetch(hub: str, tmp_path: Path) -> None:
    out = json.loads(run_child(resolve_code(), hub, tmp_path / "hf", offline=True).stdout)
    assert "not downloaded yet and HF_HUB_OFFLINE is set" in out["error"]
    assert "unset it" in out["error"]
    assert "eft-local pull" not in out["error"]  # `pull` itself can say this


@pytest.mark.parametrize("repo,file,message", [
    ("acme/other", FILE, "repository 'acme/other' not found"),
    (REPO, "nope.gguf", "file 'nope.gguf' not found"),
])
def test_hub_errors_are_one_line(hub: str, tmp_path: Path, repo: str, file: str,
                                 message: str) -> None:
    out = json.loads(run_child(resolve_code(repo, file), hub, tmp_path / "hf").stdout)
    assert message in out["error"]
    assert "\n" not in out["error"]


def test_unreachable_hub_is_a_clear_error(tmp_path: Path) -> None:
    out = json.loads(run_child(resolve_code(), "http://127.0.0.1:9", tmp_path / "hf").stdout)
    assert out["error"].startswith("small_ft: download of hf:acme/tiny-GGUF/tiny.gguf failed")
