"""Start ``eft-local serve``'s app on a loopback port inside the test process."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from eft_local.presets import load_config
from eft_local.server.app import ServerOptions, create_app
from eft_local.server.net import HttpLimits, make_server
from eft_local.server.worker import Worker
from eft_local.session import LoadOptions, load_session


@dataclass
class Served:
    """A running server: its base URL, its runner and its log lines."""

    url: str
    runner: Worker
    logs: list[str] = field(default_factory=list)

    @property
    def v1(self) -> str:
        return self.url + "/v1"


@contextmanager
def serving(preset: str = "tiny-up", *, pinned: bool = False,
            options: ServerOptions | None = None, max_queue: int = 16,
            limits: HttpLimits | None = None, download: bool = False,
            models: Sequence[str] = (), n_ctx: int | None = None, slots: int = 1
            ) -> Iterator[Served]:
    """The bundled family's ``preset`` (or the ``ROLE=PATH`` ``models``, pinned) served on
    127.0.0.1 (an ephemeral port), as ``eft-local serve`` serves it."""
    logs: list[str] = []
    load = LoadOptions(n_threads=1, n_ctx=n_ctx, download=download, n_seq=slots)
    session = load_session(None if models else preset, models=list(models), options=load)
    runner = Worker(None if models else load_config(), session.preset,
                    pinned=pinned or bool(models), params=session.params,
                    sampling=session.sampling, options=session.options, max_queue=max_queue,
                    log=logs.append)
    runner.adopt(session)
    runner.start()
    app = create_app(runner, options or ServerOptions(), log=logs.append)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, runner, log=logs.append,
                         limits=limits or HttpLimits(graceful_seconds=1))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the test server did not start")
        time.sleep(0.01)
    try:
        yield Served(url=f"http://127.0.0.1:{port}", runner=runner, logs=logs)
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        runner.stop()
        sock.close()


def slow_steps(session: Any, seconds: float, *, gate: threading.Event | None = None,
               after: int = 0, endless: bool = False) -> None:
    """Each engine step of ``session`` (one token of every running generation) takes
    ``seconds`` more; from step ``after`` on it first waits for ``gate`` when given;
    ``endless``: no token ends a generation (it runs to its token limit)."""
    original = session.step
    count = [0]
    if endless:
        for model in session.models.values():
            model.is_eog = lambda _token: False

    def slow() -> Any:
        count[0] += 1
        if gate is not None and count[0] > after:
            gate.wait(60)
        time.sleep(seconds)
        return original()

    session.step = slow


@contextmanager
def serving_bundled(tmp_path_factory: pytest.TempPathFactory, preset: str = "tiny-up",
                    **kwargs: Any) -> Iterator[Served]:
    """:func:`serving` with an empty user models.toml (only the bundled presets), for
    module-scoped fixtures, which cannot use the autouse function-scoped config."""
    mp = pytest.MonkeyPatch()
    user = tmp_path_factory.mktemp("conf") / "models.toml"
    user.write_text("")
    mp.setenv("EFT_LOCAL_CONFIG", str(user))
    try:
        with serving(preset, **kwargs) as s:
            yield s
    finally:
        mp.undo()
