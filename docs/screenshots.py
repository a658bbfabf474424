"""Screenshots of the playground page for the README, from a real run.

Starts ``eft-local serve`` on the bundled family (a child process on a free loopback port),
drives the page at ``GET /`` in Debian's headless chromium through Playwright for Python
(tests/browserhelp.py: the same browser setup as the tests) and writes, into ``--out``:

- playground-chat.png: a chat at temperature 0, beta 1 then beta 2, tokens coloured;
- playground-tooltip.png: the tooltip of a token the fine-tuned model alone would not have
  chosen;
- playground-compare.png: one question under beta 0, 1 and 2 side by side;
- playground-phone-dark.png: the chat at 360 px wide in dark mode.

    python docs/screenshots.py [--out docs] [--port 0]

Needs ``pip install playwright`` and ``apt-get install chromium`` (never ``playwright
install``).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.browserhelp import launch  # noqa: E402

FIRST = "In which year was Has Zhithdou born?"
SECOND = "Who is Has Zhithdou?"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(port: int) -> subprocess.Popen:
    """``eft-local serve tiny-up`` on ``port``, once its /health says ok."""
    proc = subprocess.Popen([sys.executable, "-m", "eft_local", "serve", "tiny-up", "--port",
                             str(port)], cwd=ROOT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"eft-local serve exited with {proc.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit("eft-local serve did not become ready in 120 s")


def ask(page, text: str) -> object:
    """Send ``text``; the reply once complete."""
    replies = page.locator("#log .msg.assistant")
    before = replies.count()
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")
    reply = replies.nth(before)
    reply.and_(page.locator("[data-state=done]")).wait_for(timeout=60_000)
    return reply


def chat(page, url: str) -> None:
    """A fresh page with two exchanges at temperature 0: beta 1, then beta 2."""
    page.goto(url + "/")
    page.locator("body[data-ready=true]").wait_for()
    if page.locator("#knobs[open]").count() == 0:
        page.click("#knobs summary")
    page.fill("#temperature", "0")
    page.fill("#seed", "7")
    ask(page, FIRST)
    page.fill("#beta", "2")
    ask(page, SECOND)
    page.mouse.move(1, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    port = args.port or free_port()
    url = f"http://127.0.0.1:{port}"
    server = start_server(port)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        with sync_playwright() as p, tempfile.TemporaryDirectory() as profile:
            browser = launch(p, Path(profile), viewport={"width": 1280, "height": 900},
                             color_scheme="light", device_scale_factor=1)
            page = browser.new_page()
            chat(page, url)
            page.screenshot(path=out / "playground-chat.png")
            marked = page.locator("#log .msg.assistant").last.locator(".tok.differs").first
            marked.hover()
            page.locator("#tip").wait_for(state="visible")
            page.screenshot(path=out / "playground-tooltip.png")
            page.mouse.move(1, 1)
            page.click("#tab-compare")
            page.fill("#compare-prompt", SECOND)
            page.fill("#max_tokens", "48")
            page.click("#compare-run")
            for i in range(3):
                page.locator("#columns .msg").nth(i).and_(
                    page.locator("[data-state=done]")).wait_for(timeout=60_000)
            page.mouse.move(1, 1)
            page.screenshot(path=out / "playground-compare.png", full_page=True)
            page.close()
            phone = browser.new_page()
            phone.set_viewport_size({"width": 360, "height": 760})
            phone.emulate_media(color_scheme="dark")
            chat(phone, url)
            phone.click("#knobs summary")  # fold the settings away again
            phone.screenshot(path=out / "playground-phone-dark.png", full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    for name in ("chat", "tooltip", "compare", "phone-dark"):
        print(out / f"playground-{name}.png")


if __name__ == "__main__":
    main()
