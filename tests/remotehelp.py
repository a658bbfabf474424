"""Remote engines for the tests: real second processes on loopback ports, and an in-process
raw HTTP server (:class:`RawServer`) for engines that misbehave.

``eft-local serve`` (``python -m eft_local serve``), llama-cpp-python's own server and
llama.cpp's llama-server (where its binary is present: ``$EFT_LOCAL_LLAMA_SERVER`` or
``~/.cache/eft-local-llama-server/bin/llama-server``, built from the llama-cpp-python
source package as docs/remote.md says).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LLAMA_SERVER_ENV = "EFT_LOCAL_LLAMA_SERVER"
LLAMA_SERVER_DEFAULT = Path.home() / ".cache" / "eft-local-llama-server" / "bin" / "llama-server"


def free_port() -> int:
    """A loopback port nobody listens on now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def llama_server_binary() -> Path | None:
    """llama.cpp's llama-server, where it is present."""
    named = os.environ.get(LLAMA_SERVER_ENV)
    path = Path(named) if named else LLAMA_SERVER_DEFAULT
    return path if path.is_file() and os.access(path, os.X_OK) else None


def rpc_server_binary() -> Path | None:
    """llama.cpp's ggml-rpc-server, beside llama-server, where it is present."""
    server = llama_server_binary()
    path = server.with_name("ggml-rpc-server") if server else None
    return path if path and path.is_file() and os.access(path, os.X_OK) else None


@dataclass
class Remote:
    """A server in a child process."""

    argv: list[str]
    port: int
    env: dict[str, str]
    log: Path
    health: str = "/health"
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 90.0) -> Remote:
        """Start the process and wait until it answers its health check."""
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, env=self.env, stdout=out, stderr=out,
                                         stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv[0]} exited: {self.log.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(self.url + self.health, timeout=2) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.argv[0]} did not start: {self.log.read_text()[-2000:]}")

    def get(self, path: str) -> object:
        with urllib.request.urlopen(self.url + path, timeout=10) as resp:
            return json.loads(resp.read())

    def kill(self) -> None:
        """End it at once (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def pause(self) -> None:
        """Stop it answering (SIGSTOP): connections open, nothing comes back."""
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        """End it cleanly."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def child_env(cache: Path) -> dict[str, str]:
    """The environment of a child server: this checkout first, its own cache, offline."""
    env = dict(os.environ)
    home = cache / "home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "models.toml").write_text("")
    env.update(PYTHONPATH=str(ROOT), XDG_CACHE_HOME=str(cache), HF_HUB_OFFLINE="1",
               OMP_WAIT_POLICY="passive", HOME=str(home),
               EFT_LOCAL_CONFIG=str(home / "models.toml"))
    env.pop("EFT_LOCAL_API_KEY", None)
    return env


def eft_serve(args: list[str], cache: Path, port: int | None = None) -> Remote:
    """``python -m eft_local serve ARGS`` on a loopback port (one thread)."""
    port = port or free_port()
    argv = [sys.executable, "-m", "eft_local", "serve", *args, "--host", "127.0.0.1",
            "--port", str(port), "--threads", "1",
            *([] if "-np" in args else ["-np", "1"])]  # one slot: rows as a lone model's
    return Remote(argv=argv, port=port, env=child_env(cache), log=cache / f"serve-{port}.log")


def llama_cpp_python_server(model: Path, cache: Path) -> Remote:
    """llama-cpp-python's OpenAI server (log-probs need ``--logits_all``)."""
    port = free_port()
    argv = [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--port",
            str(port), "--host", "127.0.0.1", "--n_ctx", "256", "--n_threads", "1",
            "--logits_all", "true", "--verbose", "false"]
    return Remote(argv=argv, port=port, env=child_env(cache), health="/v1/models",
                  log=cache / f"lcp-{port}.log")


def llama_server(binary: Path, model: Path, cache: Path, *, rpc: str | None = None
                 ) -> Remote:
    """llama.cpp's llama-server with one slot and one thread (``rpc``: every layer on that
    ggml-rpc-server, as when it spans machines)."""
    port = free_port()
    argv = [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port),
            "-c", "256", "-t", "1", "-np", "1"]
    if rpc:
        argv += ["--rpc", rpc, "-ngl", "99", "-lv", "4"]  # -lv 4 logs where layers go
    return Remote(argv=argv, port=port, env=child_env(cache), log=cache / f"ls-{port}.log")


def rpc_server(binary: Path, cache: Path) -> tuple[subprocess.Popen, str]:
    """ggml-rpc-server on a loopback port: the process and its host:port."""
    port = free_port()
    env = child_env(cache)
    with (cache / "rpc.log").open("ab") as log:
        proc = subprocess.Popen([str(binary), "-H", "127.0.0.1", "-p", str(port)], stdout=log,
                                stderr=log, stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return proc, f"127.0.0.1:{port}"
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("ggml-rpc-server did not start")


# -- engines that misbehave (in-process, raw HTTP) ---------------------------------------------
Answer = Callable[[str, bytes, socket.socket], bool]
"""Writes the answer to a request (path, body) on the socket; True keeps the connection."""


class RawServer:
    """A loopback HTTP/1.1 server whose answers are raw bytes (see :data:`Answer`)."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer
        self.paths: list[str] = []
        self.connections = 0
        self.hung_up = threading.Event()
        """Set when a client closed a connection that the server was answering."""
        self.stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._socks: list[socket.socket] = []

    def __enter__(self) -> RawServer:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop.set()
        self._listener.close()
        for sock in self._socks:
            with suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self.stop.is_set():
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            self._socks.append(sock)
            self.connections += 1
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        try:
            while not self.stop.is_set():
                line = reader.readline()
                if not line:
                    return
                length = 0
                while (header := reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = header.decode("latin-1").partition(":")
                    if name.strip().lower() == "content-length":
                        length = int(value)
                body = reader.read(length) if length else b""
                path = line.split()[1].decode()
                self.paths.append(path)
                if not self.answer(path, body, sock):
                    return
        except OSError:
            self.hung_up.set()
        finally:
            with suppress(OSError):
                sock.close()

    def wait_hung_up(self, sock: socket.socket) -> None:
        """Hold the connection without answering until the client closes it."""
        while not self.stop.is_set():
            try:
                if not sock.recv(1):
                    self.hung_up.set()
                    return
            except OSError:
                self.hung_up.set()
                return


def respond(sock: socket.socket, status: int, body: object, headers: dict[str, str] | None = None
            ) -> bool:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    head = [f"HTTP/1.1 {status} X", f"Content-Length: {len(data)}",
            *(f"{k}: {v}" for k, v in (headers or {}).items())]
    sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode() + data)
    return True
