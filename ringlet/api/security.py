"""Who may call a node's API.

- **An API key**, where one is set (`--api-key`, or `RINGLET_API_KEY` with several separated by commas): every
  endpoint but `/health` and the dashboard's own files wants `Authorization: Bearer KEY`; the dashboard asks for
  the key once and sends it with its calls. Without it: 401.
- **The Host header names this node**: localhost names, this machine's host name and addresses, and whatever
  `--allow-host` adds. A web page whose own name was made to resolve to this node (DNS rebinding) still sends its
  own name as the Host: 403.
- **From a browser, only this node's own pages change anything**: a request other than GET, HEAD and OPTIONS that
  carries an Origin (browsers send it on every such request) must come from this node's own origin or one that
  `--allow-origin` adds. A page on another site cannot POST here, not even a `text/plain` form post, which needs no
  CORS preflight: 403.

Pure ASGI, before anything reads the body, so a refused request costs no work and streamed answers keep their
disconnect handling.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import psutil
from starlette.types import ASGIApp, Receive, Scope, Send

from ringlet.api.errors import ApiError, error_bytes

API_KEY_ENV = "RINGLET_API_KEY"
PUBLIC_PATHS = frozenset({"/health"})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
LOCAL_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def keys_from(flags: Iterable[str], environment: str | None) -> tuple[str, ...]:
    """The API keys of `--api-key` flags and the comma-separated variable, blanks dropped."""
    keys = [*flags, *(environment or "").split(",")]
    return tuple(dict.fromkeys(k.strip() for k in keys if k.strip()))


def own_host_names() -> set[str]:
    """This machine's names and addresses, as a Host header may give them (lowercase, IPv6 without brackets)."""
    names = set(LOCAL_NAMES)
    hostname = socket.gethostname().lower()
    names |= {hostname, f"{hostname}.local", hostname.split(".")[0]}
    try:
        names.add(socket.getfqdn().lower())
    except OSError:
        pass  # no resolver: the host name itself is enough
    for addresses in psutil.net_if_addrs().values():
        for address in addresses:
            if address.family in (socket.AF_INET, socket.AF_INET6):
                names.add(address.address.split("%")[0].lower())  # fe80::1%eth0 is written without its zone
    return names


def host_name(host_header: str) -> str:
    """The name or address of a Host header or an origin's netloc, without its port."""
    host = host_header.strip().lower()
    if host.startswith("["):  # [::1]:52415
        return host[1:host.find("]")] if "]" in host else host
    if host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    return host


@dataclass
class Access:
    """What the node accepts: its keys, the names it answers to, the other origins its API may be used from."""

    keys: tuple[str, ...] = ()
    hosts: frozenset[str] = field(default_factory=lambda: frozenset(own_host_names()))
    origins: frozenset[str] = frozenset()  # e.g. "https://chat.example.org", as a browser writes an Origin

    def __post_init__(self) -> None:
        self.hosts = frozenset(host_name(h) for h in self.hosts)
        self.origins = frozenset(o.strip().rstrip("/").lower() for o in self.origins)
        self._keys = [k.encode() for k in self.keys]

    def known_host(self, host: str) -> bool:
        name = host_name(host)
        if name in self.hosts:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback  # 127.0.0.2 and the like
        except ValueError:
            return False

    def own_origin(self, origin: str, host: str) -> bool:
        """The Origin is this node's (same host and port as the request's Host) or an allowed one."""
        origin = origin.strip().rstrip("/").lower()
        if origin in self.origins:
            return True
        parts = urlsplit(origin)
        return parts.scheme in ("http", "https") and parts.netloc == host.strip().lower()

    def key_matches(self, authorization: str) -> bool:
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return False
        given = token.strip().encode()
        # every key compared, in constant time each: the answer's timing tells nothing about which one was close
        return sum(hmac.compare_digest(given, key) for key in self._keys) > 0


class ApiAccess:
    """The checks above, for every HTTP request; `is_dashboard(path)` says which paths are the dashboard's files."""

    def __init__(self, app: ASGIApp, access: Access, is_dashboard: Callable[[str], bool]) -> None:
        self.app, self.access, self.is_dashboard = app, access, is_dashboard

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self._refusal(scope)
        if refusal is not None:
            body = error_bytes(scope["path"], refusal)
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            headers += [(k.lower().encode(), v.encode()) for k, v in refusal.headers.items()]
            await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: Scope) -> ApiError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        host, path, method = headers.get("host", ""), scope["path"], scope["method"]
        if not self.access.known_host(host):
            return ApiError(403, f"this node does not answer to the name {host_name(host) or '(none)'!r} in the "
                                 "Host header; use its own name or address, or start it with --allow-host NAME",
                            type="permission_error", code="unknown_host")
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and not self.access.own_origin(origin, host):
            return ApiError(403, f"requests from the web page at {origin!r} may not change or run anything here; "
                                 "start the node with --allow-origin ORIGIN to allow that site",
                            type="permission_error", code="foreign_origin")
        if not self.access.keys or path in PUBLIC_PATHS or (method in SAFE_METHODS and self.is_dashboard(path)):
            return None
        # Anthropic's clients send the key as x-api-key
        if self.access.key_matches(headers.get("authorization", "")) or (
                "x-api-key" in headers and self.access.key_matches(f"Bearer {headers['x-api-key']}")):
            return None
        given = "a wrong API key" if headers.get("authorization") or headers.get("x-api-key") else "no API key"
        return ApiError(401, f"this node wants an API key and the request has {given}: send the header "
                             "'Authorization: Bearer KEY' or 'x-api-key: KEY' (the key the node was started with: "
                             "--api-key or "
                             f"{API_KEY_ENV})", type="authentication_error", code="invalid_api_key",
                        headers={"WWW-Authenticate": 'Bearer realm="ringlet"'})
