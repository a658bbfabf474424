"""Helpers for tests/test_hostile.py: a CLI child process to send real signals to, a slow
llama.cpp log for it, and raw HTTP to a test server."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PATIENCE = 120.0
"""Seconds a test waits for a state before it gives up (generous: the machine is shared)."""


def slow_log(prefix: bytes, seconds: float) -> str:
    """Child prelude: llama.cpp's log lines that start with ``prefix`` take ``seconds`` in
    the log callback, as a slow machine would spend inside the llama.cpp call that logs
    them (a callback from C, exactly where a Ctrl-C used to be lost)."""
    return (
        "import time, llama_cpp as L\n"
        "_set, _keep = L.llama_log_set, []\n"
        "def _slow_set(callback, user):\n"
        "    @L.llama_log_callback\n"
        "    def slow(level, text, data):\n"
        f"        if text.startswith({prefix!r}):\n"
        f"            time.sleep({seconds!r})\n"
        "        callback(level, text, data)\n"
        "    _keep.append(slow)\n"
        "    _set(slow, user)\n"
        "L.llama_log_set = _slow_set\n")


def slow_decode(seconds: float, *, endless: bool = False) -> str:
    """Child prelude: every decode of single tokens (a decoding step) takes ``seconds``
    more; ``endless``: no token ends a generation (it runs to its token limit)."""
    return (
        "import time\nfrom eft_local import backend as _b\n"
        "_decode = _b.LlamaModel.decode\n"
        "def _slow(self, parts, out=None):\n"
        "    if all(len(p.tokens) == 1 for p in parts):\n"
        f"        time.sleep({seconds!r})\n"
        "    return _decode(self, parts, out)\n"
        "_b.LlamaModel.decode = _slow\n"
        + ("_b.LlamaModel.is_eog = lambda self, token: False\n" if endless else ""))


class Child:
    """``eft-local ARGS`` in a child process (after Python code ``prelude``), its stdout and
    stderr collected as they come."""

    def __init__(self, args: list[str], *, prelude: str = "", stdin: str | None = None,
                 env: dict[str, str] | None = None) -> None:
        code = (f"import sys\n{prelude}\nfrom eft_local.cli.main import main\n"
                "main(sys.argv[1:])")
        full = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        full.pop("EFT_LOCAL_DEBUG", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=full)
        self.out: list[bytes] = []
        self.err: list[bytes] = []
        self._readers = [threading.Thread(target=self._read, args=(s, into), daemon=True)
                         for s, into in ((self.proc.stdout, self.out),
                                         (self.proc.stderr, self.err))]
        for reader in self._readers:
            reader.start()
        if stdin is not None:
            self.write(stdin)

    @staticmethod
    def _read(stream: Any, into: list[bytes]) -> None:
        for chunk in iter(lambda: stream.read1(65536), b""):
            into.append(chunk)

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def stdout(self) -> str:
        return b"".join(self.out).decode("utf-8", "replace")

    @property
    def stderr(self) -> str:
        return b"".join(self.err).decode("utf-8", "replace")

    def write(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def wait_for(self, ready: Callable[[], bool], what: str) -> None:
        """Poll until ``ready()``; fails if the child ends first or it takes too long."""
        deadline = time.monotonic() + PATIENCE
        while not ready():
            if self.proc.poll() is not None:
                raise AssertionError(f"the child ended (status {self.proc.returncode}) "
                                     f"before {what}: {self.stderr[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"gave up waiting for {what}: {self.stderr[-2000:]}")
            time.sleep(0.02)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def finish(self, timeout: float = PATIENCE) -> int:
        """Wait for the exit status (after closing stdin) and the last output."""
        try:
            if self.proc.stdin is not None and not self.proc.stdin.closed:
                self.proc.stdin.close()
        except BrokenPipeError:
            pass
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"the child did not end: {self.stderr[-2000:]}") from None
        for reader in self._readers:
            reader.join(10)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# -- raw HTTP ------------------------------------------------------------------------------
def connect(url: str) -> socket.socket:
    """A TCP connection to the server at ``url`` (http://HOST:PORT)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    sock = socket.create_connection((host.strip("[]"), int(port)), timeout=PATIENCE)
    return sock


def post_bytes(path: str, body: bytes, *, headers: dict[str, str] | None = None,
               host: str = "127.0.0.1") -> bytes:
    """The bytes of an HTTP/1.1 POST with a JSON body."""
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json",
             f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def send_json(url: str, path: str, body: Any) -> socket.socket:
    """POST ``body`` as JSON on a new connection; the open socket (read or close it)."""
    sock = connect(url)
    sock.sendall(post_bytes(path, json.dumps(body).encode()))
    return sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one response (until the server closes or the body
    ends, chunked or with Content-Length)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the connection closed before a response: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    if "content-length" in headers:
        need = int(headers["content-length"])
        while len(rest) < need:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body = rest[:need]
    elif headers.get("transfer-encoding") == "chunked":
        while not rest.endswith(b"0\r\n\r\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        body, pos = b"", 0
        while True:
            size_end = rest.index(b"\r\n", pos)
            size = int(rest[pos:size_end], 16)
            if size == 0:
                break
            body += rest[size_end + 2:size_end + 2 + size]
            pos = size_end + 2 + size + 2
    else:
        while chunk := sock.recv(65536):
            rest += chunk
        body = rest
    return int(status_line.split()[1]), headers, body


def closed_by_peer(sock: socket.socket, within: float = PATIENCE) -> bool:
    """True when the server closes ``sock`` within ``within`` seconds (what it sent
    before is read and dropped)."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except OSError:
        return True
    return True
