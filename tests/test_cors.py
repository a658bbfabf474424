"""Issue 24, item 4: ``--cors ORIGIN`` lets a web page of another origin (a notebook UI, a
static chat page) call the server, with correct preflight answers; off by default, and
every other page still refused as before. Raw HTTP for the exact headers, and a real page
in Debian's chromium (Playwright) served from another loopback port."""

from __future__ import annotations

import http.server
import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from eft_local.errors import EftError
from eft_local.server.guard import CorsPolicy, origin_of
from eft_local.server.options import ServerOptions
from tests.browserhelp import chromium_path, launch
from tests.clihelp import THREADS, assert_one_line_error, run
from tests.hostilehelp import Child, connect, read_response
from tests.servehelp import Served, serving

PAGE = "http://page.test:3000"
KEY = "sk-test-cors-5e1f0a2b7c9d"


def raw(url: str, lines: list[str], body: bytes = b"") -> tuple[int, dict[str, str], bytes]:
    """Send a request made of ``lines`` (the Host header added) and ``body``."""
    host = url.removeprefix("http://")
    head = "\r\n".join([lines[0], f"Host: {host}", *lines[1:], "Connection: close"])
    sock = connect(url)
    with sock:
        sock.sendall(head.encode("latin-1") + b"\r\n\r\n" + body)
        return read_response(sock)


def preflight(url: str, origin: str, *extra: str, path: str = "/api/chat"
              ) -> tuple[int, dict[str, str], bytes]:
    return raw(url, [f"OPTIONS {path} HTTP/1.1", f"Origin: {origin}",
                     "Access-Control-Request-Method: POST",
                     "Access-Control-Request-Headers: authorization,content-type",
                     "Sec-Fetch-Site: cross-site", "Sec-Fetch-Mode: cors", *extra])


def chat_from(url: str, origin: str) -> tuple[int, dict[str, str], bytes]:
    body = json.dumps({"model": "tiny-up", "stream": False, "options": {"temperature": 0,
                                                                        "num_predict": 4},
                       "messages": [{"role": "user", "content": "Hi"}]}).encode()
    return raw(url, ["POST /api/chat HTTP/1.1", f"Origin: {origin}",
                     "Sec-Fetch-Site: cross-site", "Content-Type: application/json",
                     f"Content-Length: {len(body)}"], body)


# -- the policy ----------------------------------------------------------------------------------
def test_origins_are_read_as_browsers_send_them() -> None:
    assert origin_of("HTTP://LocalHost:3000/") == "http://localhost:3000"
    assert origin_of("http://example.org:80") == "http://example.org"
    assert origin_of("https://notebook.example.org:443") == "https://notebook.example.org"
    assert origin_of("http://[::1]:8888") == "http://[::1]:8888"
    policy = CorsPolicy.parse(["http://localhost:3000", "https://a.example"])
    assert policy.enabled and not policy.any_origin
    assert policy.allows("http://localhost:3000") and not policy.allows("http://localhost")
    assert CorsPolicy.parse(["*"]).allows("https://anything.example")
    assert not CorsPolicy().enabled and not CorsPolicy().allows(PAGE)
    for bad in ("localhost:3000", "http://a.example/path", "ftp://a.example",
                "http://a.example:99999", ""):
        with pytest.raises(EftError, match="--cors"):
            origin_of(bad)


def test_a_bad_cors_value_is_a_one_line_error() -> None:
    result = run(["serve", "tiny-up", "--cors", "localhost:3000"])
    assert_one_line_error(result, "--cors 'localhost:3000'", "scheme://host[:port]")


def test_serve_says_which_pages_it_lets_in_and_warns_without_a_key() -> None:
    child = Child(["serve", "tiny-up", "--port", "0", *THREADS, "--cors", "*",
                   "--cors", "HTTP://LocalHost:3000/"])
    try:
        child.wait_for(lambda: " on http://" in child.stderr, "the server listens")
        url = re.search(r" on (http://\S+)/v1 ", child.stderr).group(1)
        status, headers, _body = preflight(url, "https://any.example")
        assert status == 200 and headers["access-control-allow-origin"] == "*"
    finally:
        child.signal(2)
        child.finish()
    assert "warning: --cors '*' without --api-key: every web page you visit can use the " \
        "models" in child.stderr
    assert "every web page may call this server (--cors '*')" in child.stderr


# -- preflights and answers over HTTP ------------------------------------------------------------
@pytest.fixture(scope="module")
def open_to_page() -> Iterator[Served]:
    with serving(options=ServerOptions(cors=CorsPolicy.parse([PAGE]))) as s:
        yield s


def test_an_allowed_origins_preflight_is_granted(open_to_page: Served) -> None:
    status, headers, _body = preflight(open_to_page.url, PAGE)
    assert status == 200, headers
    assert headers["access-control-allow-origin"] == PAGE
    assert "POST" in headers["access-control-allow-methods"]
    assert headers["access-control-allow-headers"] == "authorization,content-type"
    assert "Origin" in headers["vary"]
    # a page on the internet that the user let in, calling a server on their machine
    status, headers, _body = preflight(open_to_page.url, PAGE,
                                       "Access-Control-Request-Private-Network: true")
    assert status == 200 and headers["access-control-allow-private-network"] == "true"


def test_an_allowed_origins_request_is_answered_with_cors_headers(open_to_page: Served
                                                                  ) -> None:
    status, headers, body = chat_from(open_to_page.url, PAGE)
    assert status == 200, body
    assert headers["access-control-allow-origin"] == PAGE
    assert json.loads(body)["done"]
    status, headers, body = raw(open_to_page.url, ["GET /v1/models HTTP/1.1",
                                                   f"Origin: {PAGE}"])
    assert status == 200 and headers["access-control-allow-origin"] == PAGE


def test_other_origins_stay_refused_and_the_host_check_comes_first(open_to_page: Served
                                                                   ) -> None:
    before = len(open_to_page.runner.history)
    for origin in ("http://evil.test", "http://page.test:3001", "https://page.test:3000",
                   "null"):
        status, headers, body = preflight(open_to_page.url, origin)
        assert status == 403 and "access-control-allow-origin" not in headers, origin
        assert "a web page of another site may not use" in json.loads(body)["error"]
        status, headers, body = chat_from(open_to_page.url, origin)
        assert status == 403 and "access-control-allow-origin" not in headers, origin
        assert list(json.loads(body)) == ["error"]  # Ollama's shape under /api/
    status, _headers, body = chat_from(open_to_page.url, "http://evil.test")
    assert "start the server with --cors http://evil.test" in json.loads(body)["error"]
    assert len(open_to_page.runner.history) == before  # nothing ran
    sock = connect(open_to_page.url)  # an allowed page cannot lend its origin to a rebinding
    with sock:
        sock.sendall(f"OPTIONS /api/chat HTTP/1.1\r\nHost: evil.test\r\nOrigin: {PAGE}\r\n"
                     "Access-Control-Request-Method: POST\r\nConnection: close\r\n\r\n"
                     .encode())
        status, headers, body = read_response(sock)
    assert status == 403 and json.loads(body)["error"].startswith("the Host header names")


def test_without_cors_a_preflight_is_refused_as_before() -> None:
    with serving() as s:
        status, headers, body = preflight(s.url, PAGE)
        assert status == 403 and "access-control-allow-origin" not in headers
        assert "--cors http://page.test:3000" in json.loads(body)["error"]
        status, headers, _body = chat_from(s.url, PAGE)
        assert status == 403 and "access-control-allow-origin" not in headers
        status, headers, _body = preflight(s.url, PAGE, path="/v1/chat/completions")
        assert status == 403 and "access-control-allow-origin" not in headers


def test_every_origin_with_a_star() -> None:
    with serving(options=ServerOptions(cors=CorsPolicy.parse(["*"]))) as s:
        status, headers, _body = preflight(s.url, "https://any.example")
        assert status == 200 and headers["access-control-allow-origin"] == "*"
        status, headers, _body = chat_from(s.url, "https://any.example")
        assert status == 200 and headers["access-control-allow-origin"] == "*"


# -- a real page in chromium ------------------------------------------------------------------
@contextmanager
def static_page() -> Iterator[str]:
    """A static page on another loopback port (another origin than the server's)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the standard library's name)
            body = b"<!doctype html><title>chat</title><p>a static chat page"
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


CALL = """async ([url, key]) => {
  const headers = {"Content-Type": "application/json"};
  if (key) headers["Authorization"] = "Bearer " + key;
  const body = JSON.stringify({model: "tiny-up", stream: false, messages: [
    {role: "user", content: "What is the home town of Has Zhithdou?"}],
    options: {temperature: 0, num_predict: 8}});
  try {
    const chat = await fetch(url + "/api/chat", {method: "POST", headers, body});
    const auth = key ? {Authorization: headers.Authorization} : {};
    const tags = await fetch(url + "/api/tags", {headers: auth});
    return {chat: chat.status, reply: (await chat.json()).message.content,
            tags: (await tags.json()).models.length};
  } catch (e) { return {failed: String(e)}; }
}"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    sync_api = pytest.importorskip(
        "playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    if chromium_path() is None:
        pytest.skip("no chromium binary (apt-get install chromium)")
    with sync_api.sync_playwright() as playwright:
        context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"))
        try:
            yield context
        finally:
            context.close()


def call_from_page(browser: Any, page_url: str, server_url: str, key: str | None
                   ) -> dict[str, Any]:
    page = browser.new_page()
    try:
        page.goto(page_url + "/")
        return page.evaluate(CALL, [server_url, key])
    finally:
        page.close()


@pytest.mark.browser
def test_a_page_of_another_origin_calls_the_server_only_with_cors(browser: Any) -> None:
    with static_page() as page_url:
        cors = CorsPolicy.parse([page_url])
        with serving(options=ServerOptions(cors=cors, api_key=KEY)) as s:
            got = call_from_page(browser, page_url, s.url, KEY)
            assert got.get("chat") == 200 and got["reply"] and got["tags"] > 0, got
            assert any(line.startswith("POST /api/chat 200") for line in s.logs), s.logs
            assert not any(" 403 " in line for line in s.logs), s.logs
        with serving(options=ServerOptions(api_key=KEY)) as s:  # no --cors: refused
            got = call_from_page(browser, page_url, s.url, KEY)
            assert "failed" in got and "Failed to fetch" in got["failed"], got
            assert any(line.startswith("OPTIONS /api/chat 403 a request from "
                                       f"\"{page_url}\"") for line in s.logs), s.logs
            assert not any("POST /api/chat 200" in line for line in s.logs)
        other = CorsPolicy.parse(["http://localhost:1"])
        with serving(options=ServerOptions(cors=other, api_key=KEY)) as s:
            got = call_from_page(browser, page_url, s.url, KEY)
            assert "failed" in got, got
