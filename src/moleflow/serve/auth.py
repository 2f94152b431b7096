"""Access control of `moleflow serve`: bearer tokens, and a warning when the service is open to the network.

    tokens = parse_tokens("alice:s3cret-1,bob:s3cret-2")    # name -> token ("TOKEN" alone is named "token")
    app.add_middleware(BearerTokens, tokens=tokens)         # 401 without `Authorization: Bearer <token>`

With tokens set, every request needs one of them except GET /health and GET /ready (load balancers probe
them) and the review page's own files (GET / and /static/...: HTML, script and style, no data; the page asks
for a token and sends it with each of its API calls). The matching token's name is put in the request's
state (`request.state.token_name`), so that what a request records (a review) can say who sent it. Tokens
are compared in constant time.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from typing import Any, Awaitable, Callable

from ..errors import MoleflowError

ENV_TOKEN = "MOLEFLOW_TOKEN"
OPEN_PATHS = ("/health", "/ready", "/")
OPEN_PREFIXES = ("/static/",)  # the review page's script and style
DEFAULT_NAME = "token"


def parse_tokens(text: str | None) -> dict[str, str]:
    """`--token` / MOLEFLOW_TOKEN: one token, or comma-separated NAME:TOKEN pairs -> {name: token}."""
    if text is None or not text.strip():
        return {}
    tokens: dict[str, str] = {}
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        name, token = item.split(":", 1) if ":" in item else (DEFAULT_NAME, item)
        name, token = name.strip(), token.strip()
        if not name or not token:
            raise MoleflowError(f"--token: {item!r} has an empty name or token; write TOKEN or NAME:TOKEN[,NAME:TOKEN]")
        if name in tokens:
            raise MoleflowError(f"--token: the name {name!r} is given twice; give each token its own name "
                                "(NAME:TOKEN,NAME:TOKEN)")
        if token in tokens.values():
            raise MoleflowError(f"--token: the token of {name!r} is the same as another's; give each person their own")
        tokens[name] = token
    return tokens


def is_loopback(host: str) -> bool:
    """True when `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host.strip().lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def exposure_warning(host: str, tokens: dict[str, str]) -> str | None:
    """The warning to log when the service listens beyond this machine without access control, else None."""
    if tokens or is_loopback(host):
        return None
    return (f"!!! moleflow serve listens on {host} WITHOUT A TOKEN: anyone who can reach this port can send images, "
            "read every recent verdict and reload the model. Start it with --token NAME:TOKEN (or set "
            f"{ENV_TOKEN}), or listen on 127.0.0.1 behind a proxy that checks who calls. !!!")


def match_token(header: str | None, tokens: dict[str, str]) -> str | None:
    """The name of the token in an `Authorization: Bearer <token>` header value, or None."""
    if not header:
        return None
    scheme, _, given = header.strip().partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    given_bytes = given.strip().encode()
    found = None
    for name, token in tokens.items():  # every token compared, in constant time each
        if hmac.compare_digest(given_bytes, token.encode()):
            found = name
    return found


Scope = dict[str, Any]
ASGIApp = Callable[[Scope, Callable, Callable], Awaitable[None]]


class BearerTokens:
    """ASGI middleware: requests other than `OPEN_PATHS` and GETs under `OPEN_PREFIXES` need a known bearer token
    (else 401, one JSON line)."""

    def __init__(self, app: ASGIApp, tokens: dict[str, str], open_paths: tuple[str, ...] = OPEN_PATHS,
                 open_prefixes: tuple[str, ...] = OPEN_PREFIXES) -> None:
        self.app, self.tokens, self.open_paths, self.open_prefixes = app, dict(tokens), open_paths, open_prefixes

    def is_open(self, scope: Scope) -> bool:
        path = scope.get("path") or ""
        if path in self.open_paths:
            return True
        return scope.get("method") in ("GET", "HEAD") and path.startswith(self.open_prefixes) and ".." not in path

    async def __call__(self, scope: Scope, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self.is_open(scope):
            await self.app(scope, receive, send)
            return
        header = next((v.decode("latin-1") for k, v in scope.get("headers", ()) if k == b"authorization"), None)
        name = match_token(header, self.tokens)
        if name is None:
            why = "a bearer token is required" if not header else "the bearer token is not valid"
            body = json.dumps({"error": f"{why}: send the header 'Authorization: Bearer <token>' "
                                        "(GET /health, /ready and the review page's files need none)"}).encode()
            await send({"type": "http.response.start", "status": 401,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                    (b"www-authenticate", b'Bearer realm="moleflow"')]})
            await send({"type": "http.response.body", "body": body})
            return
        scope.setdefault("state", {})["token_name"] = name
        await self.app(scope, receive, send)
