"""The playground page served at ``GET /``: one self-contained HTML file shipped with the
package (``playground.html``: plain JavaScript and CSS, no build step, nothing fetched from
elsewhere). It speaks only the public API. Its Content-Security-Policy lets the browser run
the page's own inline script and style and talk to this server, nothing else: a defence in
depth behind the page never treating model output as HTML.
"""

from __future__ import annotations

import base64
import hashlib
import re
from functools import cache
from importlib import resources

from starlette.requests import Request
from starlette.responses import Response

PAGE = "playground.html"


def _hashes(text: str, tag: str) -> str:
    """CSP source expressions for the inline ``<tag>`` blocks of ``text``."""
    blocks = re.findall(rf"<{tag}>(.*?)</{tag}>", text, flags=re.S)
    return " ".join("'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode()
                    + "'" for b in blocks)


@cache
def page() -> tuple[bytes, str]:
    """The page's bytes and its Content-Security-Policy (read once)."""
    text = resources.files("eft_local.server").joinpath(PAGE).read_text("utf-8")
    policy = (f"default-src 'none'; script-src {_hashes(text, 'script')}; "
              f"style-src {_hashes(text, 'style')}; connect-src 'self'; img-src data:; "
              "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return text.encode("utf-8"), policy


async def playground(_request: Request) -> Response:
    """``GET /``: the page (no API key needed: it asks for one when the API does)."""
    body, policy = page()
    return Response(body, media_type="text/html; charset=utf-8", headers={
        "Content-Security-Policy": policy, "X-Content-Type-Options": "nosniff",
        "Referrer-Policy": "no-referrer", "Cache-Control": "no-cache"})
