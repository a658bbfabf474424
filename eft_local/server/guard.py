"""What keeps web pages from driving ``eft-local serve``: the Host check.

A page the user visits may send requests to the server (its fetch reaches 127.0.0.1 like any
client), and by DNS rebinding (its own name made to resolve to 127.0.0.1) read the answers
too: the browser takes the server for the page's own origin. Such a request always names
the page's host in its ``Host`` header, so the server answers only requests whose Host is a
name it knows as its own, 403 otherwise (as Ollama, vLLM and Jupyter do):

- an IP address (127.0.0.1, [::1], 192.168.1.4: a rebinding needs a DNS name);
- ``localhost`` and names under ``.localhost`` (RFC 6761: they never leave the machine);
- the ``--host`` name the server was started with;
- names given with ``--allowed-host`` (``*`` turns the check off);
- when the server listens beyond loopback (``--host 0.0.0.0``: Docker, Open WebUI, other
  machines): also this machine's host name and names under ``.local`` (mDNS) and
  ``.internal`` (private use, ``host.docker.internal``), which no public DNS answers.

A request that a browser marks as sent from another site's page (its ``Origin`` is not
this server, or ``Sec-Fetch-Site: cross-site``) gets 403 too, but for a link to the
playground page (:func:`cross_site`): it could not read the answer, yet switch presets.

The last part, in :meth:`eft_local.server.app.Api.body` (:func:`require_json`): a JSON body
must come with ``Content-Type: application/json``, which a page can send to another origin
only after a CORS preflight (a plain form or a ``text/plain`` fetch gets 415), even in a
browser that sends neither header.

CORS is off by default: only the origins given with ``--cors`` (:class:`CorsPolicy`; ``*``:
every origin) pass the cross-site check, and only their preflights are answered
(Starlette's CORS middleware with :func:`cors_settings`), so a notebook UI or a static chat
page the user chose can call the server while every other page still gets 403.

``--allowed-host '*'`` turns the Host and the cross-site checks off (a reverse proxy that
rewrites the Host header), not the Content-Type check.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import re
import socket
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any

from eft_local.errors import EftError
from eft_local.server.protocol import ApiError

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]

NETWORK_SUFFIXES = (".local", ".internal")
"""Names allowed when the server listens beyond loopback: no public DNS answers them."""


def host_name(header: str) -> str | None:
    """The name in a Host header without its port, lower case, without a final dot; an IPv6
    address without its brackets. None when the header is malformed or names nothing
    (``:8080``)."""
    value = header.strip()
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
    else:
        try:  # an IPv6 address without brackets (no port then)
            return str(ipaddress.IPv6Address(value))
        except ValueError:
            pass
        name, colon, port = value.partition(":")
        if colon and not port.isdigit():
            return None
    name = name.lower().rstrip(".")
    return name or None


def is_ip(name: str) -> bool:
    """True when ``name`` is an IPv4 or IPv6 address."""
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def is_loopback(host: str) -> bool:
    """True for 127.0.0.0/8, ::1 and localhost."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True)
class HostPolicy:
    """Which Host headers the server answers (see the module's docstring)."""

    names: frozenset[str] = frozenset()
    """Names allowed besides the built-in ones (lower case, no port)."""
    any_host: bool = False
    """``--allowed-host '*'``: no check."""
    network: bool = False
    """Listening beyond loopback: this machine's name, ``.local`` and ``.internal`` too."""
    hostname: str = ""
    """This machine's host name (lower case)."""

    @classmethod
    def for_server(cls, host: str, allowed: Iterable[str] = ()) -> HostPolicy:
        """The policy of a server listening on ``host`` with ``--allowed-host`` names
        ``allowed``."""
        extra = {a.strip().lower().rstrip(".") for a in allowed}
        names = {n for n in extra if n and n != "*"}
        bound = host.strip("[]").lower().rstrip(".")
        if bound and not is_ip(bound):
            names.add(bound)
        network = not is_loopback(host)
        return cls(names=frozenset(names), any_host="*" in extra, network=network,
                   hostname=socket.gethostname().lower() if network else "")

    def allows(self, name: str) -> bool:
        """True when a request whose Host names ``name`` (see :func:`host_name`) is
        answered."""
        if self.any_host or is_ip(name) or name in self.names:
            return True
        if name == "localhost" or name.endswith(".localhost"):
            return True
        return self.network and (name == self.hostname or name.endswith(NETWORK_SUFFIXES))

    def describe(self) -> str:
        """The policy in a few words, for the server's first log lines."""
        if self.any_host:
            return "requests with any Host header are answered (--allowed-host '*')"
        parts = ["IP addresses", "localhost"]
        if self.network:
            parts += [self.hostname, "*.local", "*.internal"] if self.hostname else [
                "*.local", "*.internal"]
        parts += sorted(self.names)
        return ("requests are answered when their Host header names one of: "
                + ", ".join(p for p in parts if p) + " (--allowed-host NAME adds one)")


_ORIGIN = re.compile(r"(https?)://([a-z0-9.-]+|\[[0-9a-f:.]+\])(?::(\d{1,5}))?")
"""``scheme://host[:port]``: what a browser sends as ``Origin`` (lower case, no path)."""
_DEFAULT_PORTS = {"http": "80", "https": "443"}


def origin_of(value: str) -> str:
    """``value`` as the ``Origin`` header a browser sends for it (``HTTP://Host:80/`` ->
    ``http://host``); a one-line error naming ``--cors`` unless it is an origin, ``null``
    or ``*``."""
    text = value.strip().lower().rstrip("/")
    if text in ("*", "null"):
        return text
    found = _ORIGIN.fullmatch(text)
    if found is None:
        raise EftError(f"--cors {value!r}: give a web page's origin, scheme://host[:port] "
                       "(e.g. --cors http://localhost:3000), or '*' for every page")
    scheme, host, port = found.groups()
    if port is not None and not 0 < int(port) < 65536:
        raise EftError(f"--cors {value!r}: the port must be in 1..65535")
    keep = port is not None and port != _DEFAULT_PORTS[scheme]
    return f"{scheme}://{host}" + (f":{port}" if keep else "")


@dataclass(frozen=True)
class CorsPolicy:
    """Which web pages may call the server from their own origin (``--cors``): those
    pass the cross-site check and get CORS answers; none by default."""

    origins: frozenset[str] = frozenset()
    """Allowed ``Origin`` values (as browsers send them: lower case, no default port)."""
    any_origin: bool = False
    """``--cors '*'``: every page."""

    @classmethod
    def parse(cls, values: Iterable[str]) -> CorsPolicy:
        """The policy of ``--cors`` values (see :func:`origin_of`)."""
        origins = {origin_of(v) for v in values}
        return cls(origins=frozenset(origins - {"*"}), any_origin="*" in origins)

    @property
    def enabled(self) -> bool:
        """True when some page may call the server."""
        return self.any_origin or bool(self.origins)

    def allows(self, origin: str) -> bool:
        """True when a page whose ``Origin`` header is ``origin`` may call the server."""
        return self.any_origin or origin.strip().lower() in self.origins

    def describe(self) -> str:
        """The policy in a few words, for the server's first log lines."""
        if self.any_origin:
            return "every web page may call this server (--cors '*')"
        return "web pages from " + ", ".join(sorted(self.origins)) + " may call this server " \
            "(--cors)"


def cors_settings(policy: CorsPolicy) -> dict[str, Any]:
    """Starlette's ``CORSMiddleware`` settings for ``policy``: its origins, the methods the
    APIs use, any request header (``Authorization``, ``Content-Type``, the OpenAI clients'
    ``x-stainless-*``), preflights cached 10 minutes, and Chrome's private-network
    preflight granted (a page on the internet that the user let in calls a server on their
    machine)."""
    return {"allow_origins": ["*"] if policy.any_origin else sorted(policy.origins),
            "allow_methods": ["GET", "HEAD", "POST", "OPTIONS"], "allow_headers": ["*"],
            "allow_private_network": True, "max_age": 600}


def require_json(content_type: str) -> None:
    """415 unless ``content_type`` (a Content-Type header) is ``application/json``, with
    parameters (``charset=utf-8``) or without."""
    if content_type.partition(";")[0].strip().lower() != "application/json":
        got = f"got {json.dumps(content_type[:100])}" if content_type else "the request has none"
        raise ApiError(415, f"send the JSON body with 'Content-Type: application/json' ({got})",
                       param="Content-Type", code="unsupported_media_type")


def refusal(header: str) -> ApiError:
    """The 403 of a request whose Host header is ``header``."""
    name = host_name(header)
    shown = json.dumps(header[:100])
    if name is None:
        return ApiError(403, f"the Host header {shown} names no host this server answers to",
                        code="host_not_allowed")
    return ApiError(403, f"the Host header names {json.dumps(name[:100])}, which is not a name "
                    "of this server (a guard against DNS rebinding); if it is one, start the "
                    f"server with --allowed-host {name[:100]}", code="host_not_allowed")


class HostGuard:
    """ASGI middleware: before any route sees it, 403 in the API's error shape (and one log
    line) for a request whose Host header the policy does not allow, and for one that a
    browser sends from another site's page (see :func:`cross_site`)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]], *,
                 policy: HostPolicy, log: Callable[[str], None],
                 cors: CorsPolicy = CorsPolicy()) -> None:
        self.app, self.policy, self.log, self.cors = app, policy, log, cors

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.policy.any_host:
            await self.app(scope, receive, send)
            return
        error = self.check(scope)
        if error is None:
            await self.app(scope, receive, send)
            return
        self.log(f"{scope.get('method', '?')} {scope.get('path', '?')} 403 {error.message}")
        body = json.dumps(error.body(scope.get("path", ""))).encode()
        await send({"type": "http.response.start", "status": 403,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    def check(self, scope: Scope) -> ApiError | None:
        """Why the request ``scope`` is refused, or None."""
        headers: dict[bytes, list[str]] = {}
        for key, value in scope.get("headers", ()):
            headers.setdefault(key, []).append(value.decode("latin-1"))
        hosts = headers.get(b"host", [])  # none at all: HTTP/1.0, never a browser
        bad = next((h for h in hosts if not self._allowed(h)), None)
        if bad is not None:
            return refusal(bad)
        if len(hosts) > 1:
            return ApiError(403, "a request may carry one Host header", code="host_not_allowed")
        return cross_site(scope.get("method", ""), scope.get("path", ""), hosts,
                          headers.get(b"origin", []), headers.get(b"sec-fetch-site", []),
                          self.cors)

    def _allowed(self, header: str) -> bool:
        name = host_name(header)
        return name is not None and self.policy.allows(name)


def cross_site(method: str, path: str, hosts: list[str], origins: list[str],
               sites: list[str], cors: CorsPolicy = CorsPolicy()) -> ApiError | None:
    """The 403 of a request a browser sent from another site's page: its ``Origin`` is
    neither this server's (the Host it names) nor one ``cors`` allows, or it names no other
    origin and its ``Sec-Fetch-Site`` says another site. Such a request cannot read the answer, but
    could still switch presets or tie up the worker (``GET /tokenizer_info?model=...``, a
    form's POST). A link to the playground (``GET /``) is the one cross-site request
    answered."""
    if method == "GET" and path == "/":
        return None
    host = hosts[0].strip().lower() if hosts else None
    foreign = [o for o in origins if o.strip().lower().partition("://")[2] != host]
    if foreign and all(cors.allows(o) for o in foreign):
        return None  # a page the server was told to let in (--cors)
    if not foreign and not any(s.strip().lower() in ("cross-site", "same-site")
                               for s in sites):
        return None
    shown = "another site" if not foreign else json.dumps(foreign[0][:100])
    page = _page_origin(foreign[0]) if foreign else None
    hint = f"; to let that page in, start the server with --cors {page}" if page else ""
    return ApiError(403, f"a request from {shown}: a web page of another site may not use "
                    f"this server (call it from a program, or from the playground at /{hint})",
                    code="cross_site_request")


def _page_origin(value: str) -> str | None:
    """``value`` as an origin worth naming in a ``--cors`` hint (not ``null``: sandboxed
    frames and files of any site send it), or None."""
    with contextlib.suppress(EftError):
        origin = origin_of(value)
        if origin not in ("*", "null"):
            return origin
    return None
