"""Issue 22 (third round), the server: web pages cannot drive it (Content-Type, Host),
keys stay out of ps and messages, a refused connection gets its answer; issues 24/26: it
runs on Python 3.10 and says clearly when uvicorn's private protocol class changes."""

from __future__ import annotations

import inspect
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import h11
import httpx
import pytest

from eft_local.cli.serve import looks_like_key, server_key
from eft_local.errors import EftError
from eft_local.server.app import ServerOptions
from eft_local.server.guard import HostPolicy, host_name
from eft_local.server.net import HttpLimits
from tests.clihelp import THREADS, assert_one_line_error, run
from tests.hostilehelp import PATIENCE, Child, connect, read_response
from tests.servehelp import Served, serving, serving_bundled

ROOT = Path(__file__).resolve().parent.parent
KEY = "sk-test-4f9c2e7a1b3d5e6f"


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory) as s:
        yield s


def raw(url: str, head: str, body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send ``head`` (request line and headers, without the blank line) and ``body``; the
    response."""
    sock = connect(url)
    with sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        return read_response(sock)


def post(url: str, path: str, body: bytes, *, host: str | None = None,
         content_type: str | None = "application/json") -> tuple[int, dict[str, str], bytes]:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host or url.removeprefix('http://')}",
             f"Content-Length: {len(body)}", "Connection: close"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return raw(url, "\r\n".join(lines), body)


def error_of(response: tuple[int, dict[str, str], bytes], status: int) -> dict:
    assert response[0] == status, response
    assert response[1]["content-type"] == "application/json"
    return json.loads(response[2])["error"]


# -- 6. a page's blind POST: only application/json bodies are read ------------------------------
CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}).encode()


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8",
                                          "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_6_a_body_that_is_not_sent_as_json_is_a_415(served: Served, content_type) -> None:
    before = len(served.runner.history)
    err = error_of(post(served.url, "/v1/chat/completions", CHAT, content_type=content_type),
                   415)
    assert err["code"] == "unsupported_media_type" and err["param"] == "Content-Type"
    assert "Content-Type: application/json" in err["message"]
    assert len(served.runner.history) == before  # nothing was queued


@pytest.mark.parametrize("content_type", ["application/json",
                                          "Application/JSON; charset=utf-8"])
def test_6_json_with_or_without_parameters_is_read(served: Served, content_type) -> None:
    status, _headers, body = post(served.url, "/tokenize", b'{"prompt": "hi"}',
                                  content_type=content_type)
    assert status == 200 and json.loads(body)["tokens"]


# -- 6. DNS rebinding: the Host header must name this server ------------------------------------
def test_6_a_foreign_host_is_refused_before_any_route(served: Served) -> None:
    for path in ("/v1/models", "/health", "/"):
        err = error_of(raw(served.url, f"GET {path} HTTP/1.1\r\nHost: evil.example.com:8080"
                                       "\r\nConnection: close"), 403)
        assert err["code"] == "host_not_allowed"
        assert "--allowed-host evil.example.com" in err["message"]
    err = error_of(post(served.url, "/tokenize", b'{"prompt": "hi"}', host="attacker.test"),
                   403)
    assert err["code"] == "host_not_allowed"
    assert any("403 the Host header names \"attacker.test\"" in line for line in served.logs)


def test_6_what_clients_send_is_answered(served: Served) -> None:
    port = served.url.rsplit(":", 1)[1]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST",
                 "localhost.", "app.localhost", "127.0.0.1"):
        status, _h, _b = raw(served.url, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n"
                                         "Connection: close")
        assert status == 200, host
    # the clients themselves: httpx (under openai, langchain, llm) names 127.0.0.1:PORT
    assert httpx.get(served.v1 + "/models", timeout=PATIENCE).status_code == 200


@pytest.mark.parametrize("host", [":8080", "", "evil.example.com:x", "[::1", "localhost.evil"])
def test_6_a_malformed_or_empty_host_is_refused(served: Served, host: str) -> None:
    err = error_of(raw(served.url, f"GET /v1/models HTTP/1.1\r\nHost: {host}\r\n"
                                   "Connection: close"), 403)
    assert err["code"] == "host_not_allowed"


def test_6_host_names() -> None:
    assert host_name("127.0.0.1:8080") == "127.0.0.1"
    assert host_name("[::1]:8080") == "::1" and host_name("[::1]") == "::1"
    assert host_name("::1") == "::1"
    assert host_name("Example.COM.:80") == "example.com"
    for bad in (":8080", "", "[::1", "[::1]x", "a:b", "a:"):
        assert host_name(bad) is None, bad


def test_6_the_policy_of_each_address() -> None:
    loopback = HostPolicy.for_server("127.0.0.1")
    assert not loopback.network
    for name in ("127.0.0.1", "::1", "10.0.0.7", "localhost", "a.localhost"):
        assert loopback.allows(name), name
    for name in ("evil.example.com", "host.docker.internal", "box.local", "localhost.evil"):
        assert not loopback.allows(name), name
    # beyond loopback (Docker, Open WebUI): this machine's name, .local, .internal too
    anywhere = HostPolicy.for_server("0.0.0.0")
    assert anywhere.network
    for name in ("host.docker.internal", "box.local", anywhere.hostname, "192.168.1.4"):
        assert anywhere.allows(name), name
    assert not anywhere.allows("eft") and not anywhere.allows("evil.example.com")
    assert HostPolicy.for_server("0.0.0.0", ["eft", "Models.Example.org"]).allows(
        "models.example.org")
    assert HostPolicy.for_server("0.0.0.0", ["*"]).allows("anything.example.com")
    assert HostPolicy.for_server("gpu-box.lan").allows("gpu-box.lan")  # the --host name


def test_6_allowed_host_names_are_answered() -> None:
    options = ServerOptions(hosts=HostPolicy.for_server("127.0.0.1", ["models.example.org"]))
    with serving(options=options) as s:
        status, _h, _b = raw(s.url, "GET /v1/models HTTP/1.1\r\nHost: models.example.org\r\n"
                                    "Connection: close")
        assert status == 200
        error_of(raw(s.url, "GET /v1/models HTTP/1.1\r\nHost: other.example.org\r\n"
                            "Connection: close"), 403)


# -- 6. a request from another site's page: blind, but it could switch presets ------------------
def test_6_a_request_from_another_sites_page_is_refused(served: Served) -> None:
    host = served.url.removeprefix("http://")
    before = len(served.runner.history)
    for extra in ("Sec-Fetch-Site: cross-site", "Sec-Fetch-Site: same-site",
                  "Origin: http://evil.example.com", "Origin: null",
                  "Origin: http://evil.example.com\r\nSec-Fetch-Site: same-origin"):
        err = error_of(raw(served.url, f"GET /tokenizer_info?model=tiny-down HTTP/1.1\r\n"
                                       f"Host: {host}\r\n{extra}\r\nConnection: close"), 403)
        assert err["code"] == "cross_site_request", extra
    err = error_of(raw(served.url, "\r\n".join([
        "POST /tokenize HTTP/1.1", f"Host: {host}", "Origin: http://evil.test",
        "Content-Type: application/json", "Content-Length: 16", "Connection: close"]),
        b'{"prompt": "hi"}'), 403)
    assert err["code"] == "cross_site_request" and "evil.test" in err["message"]
    assert len(served.runner.history) == before  # no preset switched, nothing queued


def test_6_the_playground_and_its_own_requests_are_answered(served: Served) -> None:
    host = served.url.removeprefix("http://")
    page = raw(served.url, f"GET / HTTP/1.1\r\nHost: {host}\r\nSec-Fetch-Site: cross-site"
                           "\r\nSec-Fetch-Mode: navigate\r\nConnection: close")
    assert page[0] == 200 and page[1]["content-type"].startswith("text/html")  # a link to it
    status, _h, _b = raw(served.url, "\r\n".join([
        "POST /tokenize HTTP/1.1", f"Host: {host}", f"Origin: http://{host}",
        "Sec-Fetch-Site: same-origin", "Content-Type: application/json",
        "Content-Length: 16", "Connection: close"]), b'{"prompt": "hi"}')
    assert status == 200


# -- 8. no redirect built from a client's Host header -------------------------------------------
@pytest.mark.parametrize("allowed", [(), ("*",)])
def test_8_a_trailing_slash_never_redirects_to_the_host_header(allowed) -> None:
    options = ServerOptions(hosts=HostPolicy.for_server("127.0.0.1", allowed))
    with serving(options=options) as s:
        status, headers, body = raw(s.url, "GET /health/ HTTP/1.1\r\nHost: evil.example.com"
                                           "\r\nConnection: close")
    assert "location" not in headers and status == (404 if allowed else 403), (status, headers)
    assert b"evil.example.com" not in body or status == 403


# -- 9. keys: out of ps, never echoed ----------------------------------------------------------
def _serve(args: list[str], env: dict[str, str] | None = None) -> tuple[Child, str]:
    child = Child(["serve", "tiny-up", "--port", "0", *THREADS, *args], env=env)
    child.wait_for(lambda: " on http://" in child.stderr, "the server listens")
    return child, re.search(r" on (http://\S+)/v1 ", child.stderr).group(1)


def _needs_key(url: str) -> None:
    assert httpx.get(url + "/v1/models", timeout=PATIENCE).status_code == 401
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"},
                      timeout=PATIENCE)
    assert wrong.status_code == 401
    ok = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"},
                   timeout=PATIENCE)
    assert ok.status_code == 200


@pytest.mark.parametrize("how", ["file", "environment"])
def test_9_a_key_from_a_file_or_the_environment(tmp_path: Path, how: str) -> None:
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    args, env = (["--api-key-file", str(key_file)], None) if how == "file" else (
        [], {"EFT_LOCAL_API_KEY": KEY})
    child, url = _serve(args, env)
    try:
        _needs_key(url)
    finally:
        child.signal(2)
        child.finish()
    assert KEY not in child.stderr and "warning" not in child.stderr


def test_9_a_key_on_the_command_line_warns_about_ps() -> None:
    child, url = _serve(["--api-key", KEY])
    try:
        _needs_key(url)
    finally:
        child.signal(2)
        child.finish()
    assert "warning: --api-key on the command line can be read by every user" in child.stderr
    assert KEY not in child.stderr


@pytest.mark.parametrize("args", [["serve", KEY], ["serve", "--api-key-file", KEY],
                                  ["serve", "--api-key-file", "k", "--api-key", KEY]])
def test_9_a_value_that_looks_like_a_key_is_never_echoed(args: list[str]) -> None:
    result = run(args)
    assert_one_line_error(result)
    assert KEY not in result.output


def test_9_bad_key_files(tmp_path: Path) -> None:
    assert looks_like_key(KEY) and looks_like_key("a1" * 10)
    for name in ("keys/server.key", "tiny-up", "llama-3.1-70b-instruct-q4_k_m",
                 "/home/me/secrets/eft-local-server-2026.key"):
        assert not looks_like_key(name), name
    two = tmp_path / "two"
    two.write_text("first-key-line\nsecond\n")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    for path, words in ((two, "one line"), (empty, "one line"), (tmp_path, "is a directory"),
                        (tmp_path / "none", "key file not found")):
        with pytest.raises(EftError, match=words) as caught:
            server_key(None, path)
        assert "first-key-line" not in str(caught.value)
    with pytest.raises(EftError, match="is empty"):
        server_key("  ", None)
    with pytest.raises(EftError, match="printable ASCII") as caught:
        server_key("with space", None)
    assert "with space" not in str(caught.value)
    assert server_key(f" {KEY}\n", None) == KEY


# -- smaller: too many connections get a whole 503 with Retry-After, never a reset --------------
def test_503_for_too_many_connections_is_read_whole_with_retry_after() -> None:
    limits = HttpLimits(max_connections=2, head_seconds=300, graceful_seconds=1)
    with serving(limits=limits) as s:
        held = [connect(s.url) for _ in range(2)]
        try:
            for _ in range(10):  # a client sends its request at once, then reads
                status, headers, body = post(s.url, "/tokenize", b'{"prompt": "hi"}')
                assert status == 503 and headers.get("retry-after") == "1", headers
                assert json.loads(body)["error"]["code"] == "too_many_connections"
        finally:
            for sock in held:
                sock.close()


# -- issue 24/26: Python 3.10, and uvicorn's private class ------------------------------------
def test_the_package_runs_on_python_3_10() -> None:
    pytest.importorskip("vermin")
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())",
         "-t=3.10-", "--no-tips", "--violations", "--eval-annotations",
         str(ROOT / "eft_local")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]


def test_uvicorns_private_protocol_still_has_what_net_py_uses() -> None:
    """eft_local/server/net.py subclasses uvicorn's H11Protocol (pyproject pins the uvicorn
    versions this was checked with): if this fails, uvicorn changed the class, and the
    connection limits of ``serve`` must be looked at again before the pin moves."""
    import uvicorn
    from uvicorn.protocols.http.h11_impl import H11Protocol

    from eft_local.server.net import Protocol

    for name in ("connection_made", "data_received", "connection_lost", "eof_received",
                 "send_400_response", "handle_events", "on_response_complete", "shutdown"):
        assert callable(getattr(H11Protocol, name, None)), f"uvicorn {uvicorn.__version__}: " \
            f"H11Protocol.{name} is gone"
    params = list(inspect.signature(H11Protocol.__init__).parameters)
    assert params[:4] == ["self", "config", "server_state", "app_state"], params
    assert list(inspect.signature(H11Protocol.send_400_response).parameters) == ["self", "msg"]
    source = inspect.getsource(H11Protocol)
    for used in ("self.conn = h11.Connection(", "self.connections = server_state.connections",
                 "self.cycle", "self.transport", "self.client", "self.loop",
                 "self.conn.next_event()", "self.send_400_response(", ".response_complete"):
        assert used in source, f"uvicorn {uvicorn.__version__}: H11Protocol no longer has " \
            f"{used!r}"
    assert issubclass(Protocol, H11Protocol)
    assert h11.Connection.next_event  # what _StrictConnection overrides
