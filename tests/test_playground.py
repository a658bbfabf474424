"""The playground page (``GET /``) driven in a real browser: Debian's chromium through
Playwright for Python, against ``eft-local serve`` on a loopback port. One browser serves
every test of the module; each test opens its own tab. Every wait is for a state of the page
or of the server, never a fixed sleep."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from eft_local.server.app import ServerOptions
from tests.browserhelp import chromium_path, launch
from tests.ggufs import HOSTILE, write_echo_model
from tests.servehelp import Served, serving, serving_bundled, slow_steps

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)")
expect = sync_api.expect

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(chromium_path() is None,
                                 reason="no chromium binary (apt-get install chromium)")]

QUESTION = "What is the home town of Has Zhithdou?"
EDGES = (-3.0, -1.0, -0.25, 0.25, 1.0, 3.0)
BINS = ("sn3", "sn2", "sn1", "s0", "sp1", "sp2", "sp3")
"""The page's colour bins of log p_mix - log p_base (docs/serving.md#the-playground)."""
ROLES = {"large_base", "small_ft", "small_base"}


def colour(shift: float) -> str:
    """The bin the page must give ``shift`` (a bin includes its lower edge)."""
    return BINS[sum(shift >= edge for edge in EDGES)]


def wait_until(condition: Callable[[], Any], what: str, timeout: float = 30) -> Any:
    """Poll ``condition`` (server state) until it holds."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
    return value


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        context = launch(playwright, tmp_path_factory.mktemp("chromium-profile"),
                         viewport={"width": 1200, "height": 900})
        try:
            yield context
        finally:
            context.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    with serving_bundled(tmp_path_factory) as s:
        yield s


@dataclass
class Tab:
    """One browser tab on the playground, with the chat requests it sent and its errors."""

    page: Any
    requests: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def ask(self, text: str) -> Any:
        """Send ``text`` from the composer; the reply, once it is complete."""
        page = self.page
        replies = page.locator("#log .msg.assistant")
        before = replies.count()
        page.fill("#prompt", text)
        page.press("#prompt", "Enter")
        reply = replies.nth(before)
        expect(reply).to_have_attribute("data-state", "done", timeout=30_000)
        return reply


def open_tab(browser: Any, url: str, *, ready: bool = True) -> Tab:
    page = browser.new_page()
    tab = Tab(page)
    page.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    page.on("console", lambda m: tab.errors.append(m.text) if m.type == "error" else None)

    def sent(request: Any) -> None:
        if request.url.endswith("/v1/chat/completions"):
            tab.requests.append(json.loads(request.post_data))
            tab.headers.append(request.headers)

    page.on("request", sent)
    page.goto(url + "/")
    if ready:
        page.locator("body[data-ready=true]").wait_for()
    return tab


@pytest.fixture
def tab(browser: Any, served: Served) -> Iterator[Tab]:
    t = open_tab(browser, served.url)
    try:
        yield t
        assert not t.errors
    finally:
        t.page.close()


def api_reply(served: Served, body: dict[str, Any]) -> dict[str, Any]:
    """The same request through the API, whole (not streamed)."""
    r = httpx.post(served.v1 + "/chat/completions", json={**body, "stream": False}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()


def spans(reply: Any) -> list[dict[str, str]]:
    return reply.locator(".tok").evaluate_all(
        "els => els.map(e => ({text: e.textContent, cls: e.className, shift: e.dataset.shift}))")


def assert_coloured_as(reply: Any, api: dict[str, Any]) -> None:
    """The reply's tokens: the API's content, shift, colour bin and mark, one by one."""
    tokens = api["eft"]["tokens"]
    got = spans(reply)
    assert [g["text"] for g in got] == [t["content"] for t in tokens]
    assert reply.locator(".tokens").text_content() == api["choices"][0]["message"]["content"]
    for g, t in zip(got, tokens, strict=True):
        assert float(g["shift"]) == pytest.approx(t["shift"], abs=1e-3)
        classes = g["cls"].split()
        if all(abs(t["shift"] - edge) > 1e-3 for edge in EDGES):
            assert colour(t["shift"]) in classes, (g, t)
        assert ("differs" in classes) == t["differs"]


# -- chat ----------------------------------------------------------------------------------------
def test_a_streamed_answer_is_coloured_as_the_api_diagnostics_say(tab: Tab, served: Served
                                                                    ) -> None:
    page = tab.page
    page.fill("#beta", "3")
    page.fill("#temperature", "0")
    page.fill("#seed", "7")
    reply = tab.ask(QUESTION)
    body = tab.requests[-1]
    assert body["stream"] is True and body["seed"] == 7 and body["temperature"] == 0
    assert body["eft"]["diagnostics"] is True and body["eft"]["beta"] == 3
    api = api_reply(served, body)
    assert_coloured_as(reply, api)
    classes = " ".join(s["cls"] for s in spans(reply))
    assert "sp3" in classes and "s0" in classes and "differs" in classes  # it shows something
    expect(page.locator("#legend")).to_contain_text("large_base")
    expect(reply.locator(".who")).to_contain_text("beta 3")
    probes = [e + d for e in EDGES for d in (-1e-6, 0.0, 1e-6)] + [-50.0, 0.0, 50.0]
    assert page.evaluate("xs => xs.map(binOf)", probes) == [colour(x) for x in probes]


def test_moving_the_beta_slider_changes_the_next_request(tab: Tab) -> None:
    page = tab.page
    page.fill("#temperature", "0")
    tab.ask(QUESTION)
    assert tab.requests[-1]["eft"]["beta"] == 1  # tiny-up's own value
    assert "lambda" not in tab.requests[-1]["eft"]  # tiny-up's formula has no lambda
    slider = page.locator("#beta-range")
    slider.focus()
    for _ in range(6):
        slider.press("ArrowRight")
    expect(page.locator("#beta")).to_have_value("1.3")
    reply = tab.ask(QUESTION)
    assert tab.requests[-1]["eft"]["beta"] == pytest.approx(1.3)
    expect(reply.locator(".who")).to_contain_text("beta 1.3")  # what the server used
    assert [m["role"] for m in tab.requests[-1]["messages"]] == ["user", "assistant", "user"]
    page.select_option("#model", "tiny-mix")
    expect(page.locator("#knob-lam")).to_be_visible()
    expect(page.locator("#lam")).to_have_value("0.5")


def test_the_penalty_knobs_reach_the_request_and_change_the_reply(tab: Tab, served: Served
                                                                   ) -> None:
    page = tab.page
    page.fill("#temperature", "0")
    question = "Tell me about Has Zhithdou."  # the family answers with a token of the prompt
    tab.ask(question)
    body = tab.requests[-1]
    assert (body["repeat_penalty"], body["frequency_penalty"], body["presence_penalty"]) == (
        1, 0, 0)  # the server's defaults: off
    page.fill("#frequency_penalty", "2")
    page.fill("#presence_penalty", "2")
    slider = page.locator("#repeat_penalty-range")
    slider.focus()
    for _ in range(2):
        slider.press("ArrowRight")
    expect(page.locator("#repeat_penalty")).to_have_value("1.1")
    reply = tab.ask(question)
    body = tab.requests[-1]
    assert body["frequency_penalty"] == 2 and body["presence_penalty"] == 2
    assert body["repeat_penalty"] == pytest.approx(1.1)
    text = reply.locator(".tokens").text_content()
    assert text == api_reply(served, body)["choices"][0]["message"]["content"]
    off = {**body, "repeat_penalty": 1, "frequency_penalty": 0, "presence_penalty": 0}
    assert text != api_reply(served, off)["choices"][0]["message"]["content"]
    page.click("[data-reset=frequency_penalty]")
    expect(page.locator("#frequency_penalty")).to_have_value("0")


def test_hovering_or_focusing_a_token_shows_what_each_model_thought(tab: Tab, served: Served
                                                                     ) -> None:
    page = tab.page
    page.fill("#beta", "3")
    page.fill("#temperature", "0")
    reply = tab.ask(QUESTION)
    tokens = api_reply(served, tab.requests[-1])["eft"]["tokens"]
    tip = page.locator("#tip")
    expect(tip).to_be_hidden()
    reply.locator(".tok").first.hover()
    expect(tip).to_be_visible()
    first = tokens[0]
    expect(tip.locator("h2")).to_have_text(
        "token \u201c" + first["text"].replace(" ", "\u2423") + "\u201d")
    for role in ROLES:
        expect(tip).to_contain_text(role)
    expect(tip).to_contain_text("large_base (base)")
    expect(tip).to_contain_text("small_ft alone would have chosen")  # marked: it differs
    assert first["differs"]
    for alt in first["alternatives"]["small_ft"]:
        expect(tip.locator(".alts")).to_contain_text(alt["text"].replace(" ", "\u2423"))
    page.mouse.move(1, 1)
    expect(tip).to_be_hidden()
    # the keyboard: from the message box back to the reply, then along its tokens
    page.focus("#prompt")
    page.keyboard.press("Shift+Tab")
    expect(reply.locator(".tok").first).to_be_focused()
    expect(tip).to_be_visible()
    page.keyboard.press("ArrowRight")
    expect(reply.locator(".tok").nth(1)).to_be_focused()
    expect(tip.locator("h2")).to_contain_text(tokens[1]["text"].replace(" ", "\u2423"))
    page.keyboard.press("Escape")
    expect(tip).to_be_hidden()


def test_compare_streams_two_settings_side_by_side(tab: Tab, served: Served) -> None:
    page = tab.page
    page.fill("#temperature", "0")
    page.fill("#seed", "3")
    page.click("#tab-compare")
    expect(page.locator("#view-compare")).to_be_visible()
    settings = page.locator("#settings .setting")
    expect(settings).to_have_count(3)  # beta 0, 1, 2 by default
    settings.nth(2).get_by_role("button", name="Remove").click()
    expect(settings).to_have_count(2)
    page.fill("#setting-2-beta", "3")
    page.fill("#compare-prompt", QUESTION)
    page.click("#compare-run")
    columns = page.locator("#columns .msg")
    expect(columns).to_have_count(2)
    for i in range(2):
        expect(columns.nth(i)).to_have_attribute("data-state", "done", timeout=30_000)
    assert sorted(r["eft"]["beta"] for r in tab.requests) == [0, 3]
    assert all(r["stream"] for r in tab.requests)
    for i, beta in enumerate((0, 3)):
        body = next(r for r in tab.requests if r["eft"]["beta"] == beta)
        assert_coloured_as(columns.nth(i), api_reply(served, body))
        expect(columns.nth(i).locator(".who")).to_contain_text(f"beta {beta}")
    # beta 0 is the base term alone: nothing moved; beta 3 moves tokens
    assert {s["cls"].split()[1] for s in spans(columns.nth(0))} == {"s0"}
    assert {s["cls"].split()[1] for s in spans(columns.nth(1))} - {"s0"}
    assert columns.nth(0).text_content() != columns.nth(1).text_content()


def test_stop_closes_the_stream_and_the_server_stops_generating(
        tab: Tab, served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    session = served.runner.session
    assert session is not None
    gate = threading.Event()
    monkeypatch.setattr(session, "step", session.step)
    slow_steps(session, 0.0, gate=gate, after=1)  # one token, then a slow model
    page = tab.page
    page.fill("#temperature", "0")
    page.fill("#max_tokens", "200")
    page.fill("#prompt", QUESTION)
    page.press("#prompt", "Enter")
    reply = page.locator("#log .msg.assistant").last
    try:
        expect(reply.locator(".tok").first).to_be_attached()
        expect(page.locator("#stop")).to_be_enabled()
        page.click("#stop")
        expect(reply).to_have_attribute("data-state", "stopped")
        expect(reply.locator(".meta")).to_contain_text("stopped")
        line = wait_until(lambda: [x for x in served.logs if "client gone: stopped after" in x],
                          "the server's log line")[-1]
    finally:
        gate.set()
    job = wait_until(lambda: next((j for j in reversed(served.runner.history)
                                   if j.generated_at_cancel is not None), None),
                     "the stopped job to end")
    assert f"stopped after {job.generated_at_cancel} tokens" in line
    assert job.info["cancelled"] and job.generated <= job.generated_at_cancel + 1 < 200
    expect(page.locator("#send")).to_be_enabled()
    expect(page.locator("#stop")).to_be_disabled()


# -- hostile output, a key, small screens ----------------------------------------------------
def test_hostile_output_is_shown_as_text(browser: Any, tmp_path: Path) -> None:
    echo = write_echo_model(tmp_path / "echo.gguf")
    with serving(models=[f"small_ft={echo}"]) as s:
        tab = open_tab(browser, s.url)
        page = tab.page
        try:
            page.set_viewport_size({"width": 360, "height": 740})
            page.fill("#temperature", "0")
            page.fill("#max_tokens", "2")
            prompt = '<img src=x onerror="document.body.dataset.pwned=\'prompt\'">'
            reply = tab.ask(prompt)
            assert reply.locator(".tokens").text_content() == HOSTILE * 2
            expect(page.locator("#log .msg.user .text")).to_have_text(prompt)
            reply.locator(".tok").first.hover()
            tip = page.locator("#tip")
            expect(tip.locator(".alts")).to_contain_text("<b\u2423onmouseover=")
            assert page.locator("#log img, #log script, #log b, #tip img, #tip b").count() == 0
            assert page.locator("script").count() == 1  # the page's own
            assert page.evaluate("() => document.body.dataset.pwned") is None
            width = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
            assert width[0] <= width[1]  # long unbroken tokens wrap at 360 px
            assert not tab.errors
        finally:
            page.close()


def test_with_an_api_key_the_page_asks_once_and_keeps_it_for_the_tab(browser: Any) -> None:
    with serving(options=ServerOptions(api_key="sekrit")) as s:
        assert httpx.get(s.url + "/").status_code == 200  # the page itself needs no key
        tab = open_tab(browser, s.url, ready=False)
        page = tab.page
        try:
            dialog = page.locator("#key-dialog")
            expect(dialog).to_be_visible()
            page.fill("#key", "guess")
            page.press("#key", "Enter")
            expect(page.locator("#key-message")).to_contain_text("refused")
            page.fill("#key", "sekrit")
            page.press("#key", "Enter")
            page.locator("body[data-ready=true]").wait_for()
            expect(dialog).to_be_hidden()
            page.fill("#temperature", "0")
            tab.ask(QUESTION)
            assert tab.headers[-1]["authorization"] == "Bearer sekrit"
            page.reload()
            page.locator("body[data-ready=true]").wait_for()  # no question this time
            expect(dialog).to_be_hidden()
            assert page.evaluate("() => [localStorage.length, document.cookie]") == [0, ""]
            other = open_tab(browser, s.url, ready=False)  # another tab asks again
            expect(other.page.locator("#key-dialog")).to_be_visible()
            other.page.close()
        finally:
            page.close()


def test_small_screens_and_dark_mode(tab: Tab) -> None:
    page = tab.page
    page.set_viewport_size({"width": 360, "height": 740})
    page.emulate_media(color_scheme="dark")
    page.reload()
    page.locator("body[data-ready=true]").wait_for()
    expect(page.locator("#knobs")).not_to_have_attribute("open", "")  # settings folded away
    page.fill("#prompt", QUESTION)
    expect(page.locator("#send")).to_be_in_viewport()
    width = page.evaluate("() => [document.documentElement.scrollWidth, innerWidth]")
    assert width[0] <= width[1]
    dark = page.evaluate("() => getComputedStyle(document.documentElement).backgroundColor")
    page.emulate_media(color_scheme="light")
    light = page.evaluate("() => getComputedStyle(document.documentElement).backgroundColor")
    assert dark != light and dark == "rgb(21, 21, 24)"
