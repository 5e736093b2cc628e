"""Sign-in to the page: :class:`LoginThrottle` slows down password guessing per client (one client locked out
does not lock out the others), and :class:`LockedOutMiddleware` answers a locked client's sign-in with 429 and
the seconds left, which the page's script shows on the sign-in form (Gradio's own form can only say
"Incorrect credentials")."""

from __future__ import annotations

import contextvars
import hmac
import json
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("medtl.ui.safety")

_client: contextvars.ContextVar[str | None] = contextvars.ContextVar("medtl_ui_client", default=None)


def current_client() -> str | None:
    """The client address of the request being served, as recorded by :class:`ClientAddressMiddleware`
    (None outside a request or without the middleware)."""
    return _client.get()


class ClientAddressMiddleware:
    """Pure ASGI middleware: records ``scope["client"]`` host for the duration of each HTTP request, so
    that an ``auth`` callable, which Gradio calls without the request, can see who is logging in.

    The address is the one uvicorn reports: behind a reverse proxy on 127.0.0.1 it is the address in
    ``X-Forwarded-For`` (uvicorn trusts that header from 127.0.0.1), which a local client can forge
    (:class:`LoginThrottle`'s optional global count covers that).
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") != "http":
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        token = _client.set(str(client[0]) if client else None)
        try:
            await self.app(scope, receive, send)
        finally:
            _client.reset(token)


LOCKED_STATUS = 429  # what a locked client's sign-in gets (Gradio's form shows its own words for 400 only)


class LockedOutMiddleware:
    """Pure ASGI middleware: a sign-in (POST .../login) from a client that ``throttle`` has locked out is answered
    429 with ``{"detail": "... try again in N s"}`` before Gradio compares any password; the page's script shows it
    on the sign-in form. Other clients are not affected."""

    def __init__(self, app: Any, throttle: LoginThrottle) -> None:
        self.app, self.throttle = app, throttle

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope.get("type") == "http" and scope.get("method") == "POST" and scope.get("path", "").endswith("/login"):
            client = scope.get("client")
            left = self.throttle.lock_remaining(client=str(client[0]) if client else None)
            if left > 0:
                detail = f"Too many failed sign-ins from this computer: try again in {math.ceil(left)} s."
                body = json.dumps({"detail": detail}).encode()
                headers = [(b"content-type", b"application/json"), (b"retry-after", str(math.ceil(left)).encode())]
                await send({"type": "http.response.start", "status": LOCKED_STATUS, "headers": headers})
                await send({"type": "http.response.body", "body": body})
                return
        if scope.get("type") == "http" and scope.get("method") == "GET":
            await self.app(scope, receive, _with_login_script(send))
            return
        await self.app(scope, receive, send)


def _with_login_script(send: Any) -> Any:
    """``send`` that adds ``static/login.js`` to an HTML page (the sign-in page gets no ``head`` from Gradio):
    the page's body is held until complete, the script put before ``</head>`` and the length corrected."""
    from medtl_ui.viewer import read_static  # (the package's files)

    started: dict = {}
    chunks: list[bytes] = []

    async def wrapped(message: dict) -> None:
        if message["type"] == "http.response.start":
            headers = {k.lower(): v for k, v in message.get("headers", [])}
            html = headers.get(b"content-type", b"").startswith(b"text/html") and b"content-encoding" not in headers
            if not html:
                started["pass"] = True
                await send(message)
                return
            started["message"] = message
            return
        if started.get("pass") or message["type"] != "http.response.body":
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body"):
            return
        body = b"".join(chunks)
        script = f"<script>\n{read_static('login.js')}</script>\n".encode()
        if b"</head>" in body and b"__medtlLogin" not in body:
            body = body.replace(b"</head>", script + b"</head>", 1)
        start = started["message"]
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        headers.append((b"content-length", str(len(body)).encode()))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return wrapped


def client_middleware(throttle: LoginThrottle | None = None) -> list[Any]:
    """The middleware for ``demo.launch(app_kwargs={"middleware": ...})``: the client's address recorded for each
    request, and with a ``throttle`` a locked client's sign-in answered with the time left."""
    from starlette.middleware import Middleware  # the web server's (with gradio): imported only to serve

    out = [Middleware(ClientAddressMiddleware)]
    if throttle is not None:
        out.append(Middleware(LockedOutMiddleware, throttle=throttle))
    return out


@dataclass
class _Record:
    failures: int = 0
    locked_until: float = 0.0
    seen: float = 0.0
    logged: bool = False


class LoginThrottle:
    """A Gradio ``auth`` callable for one account that slows down password guessing.

    ``throttle(username, password)`` is True only for the right user name and password (compared with
    :func:`hmac.compare_digest`). The first ``free_failures`` failures cost nothing; each further one
    locks logins for ``base_delay`` seconds, doubling each time up to ``max_delay`` (1, 2, 4, ... 60 s).
    During a lock every attempt is refused at once, without checking the password and without
    sleeping (the callable runs in the server's event loop). A success resets the count.

    Who is locked: the client address when :func:`client_middleware` is installed (see
    :func:`current_client`), otherwise the user name (every wrong user name shares one count, so
    changing it does not help). One client locked out does not lock out the others: the right password
    from another client still works. A global count (``global_free_failures`` free failures; default
    None: none) can lock everyone, against an attacker who changes address. ``clock`` (monotonic seconds)
    is injectable for tests. Only "login refused (locked for N s)" is logged, never the user name or address.
    """

    def __init__(
        self,
        user: str,
        password: str,
        *,
        free_failures: int = 3,
        base_delay: float = 1.0,
        max_delay: float = 60.0,
        global_free_failures: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 10_000,
    ) -> None:
        if not user or not password:
            raise ValueError("user and password must not be empty")
        if free_failures < 0 or base_delay <= 0 or max_delay < base_delay:
            raise ValueError("need free_failures >= 0 and 0 < base_delay <= max_delay")
        self._user = user.encode("utf-8")
        self._password = password.encode("utf-8")
        self.free_failures = free_failures
        self.base_delay = float(base_delay)
        self.max_delay = float(max_delay)
        self.global_free_failures = global_free_failures
        self.clock = clock
        self.max_clients = max_clients
        self.checks = 0  #: how many attempts had their password actually compared
        self._records: dict[tuple[str, str], _Record] = {}
        self._global = _Record()
        self._lock = threading.Lock()

    # The key never holds a user name other than the configured one (memory stays bounded).
    def _key(self, username: str, client: str | None) -> tuple[str, str]:
        if client is not None:
            return ("client", client)
        known = hmac.compare_digest(username.encode("utf-8"), self._user)
        return ("user", "known" if known else "other")

    def _delay(self, failures: int, free: int) -> float:
        over = failures - free
        if over <= 0:
            return 0.0
        return min(self.max_delay, self.base_delay * 2.0 ** min(over - 1, 64))

    def _records_for(self, key: tuple[str, str], now: float) -> list[tuple[_Record, int]]:
        record = self._records.get(key)
        if record is None:
            if len(self._records) >= self.max_clients:
                self._prune(now)
            record = self._records[key] = _Record()
        record.seen = now
        pairs = [(record, self.free_failures)]
        if self.global_free_failures is not None:
            pairs.append((self._global, self.global_free_failures))
        return pairs

    def _prune(self, now: float) -> None:
        for k in [k for k, r in self._records.items() if r.locked_until <= now]:
            del self._records[k]
        while len(self._records) >= self.max_clients:  # all locked: drop the least recently seen
            del self._records[min(self._records, key=lambda k: self._records[k].seen)]

    def lock_remaining(self, username: str = "", client: str | None = None) -> float:
        """Seconds until ``username`` (or ``client``, if given) may try again (0.0 if not locked)."""
        with self._lock:
            now = self.clock()
            record = self._records.get(self._key(username, client))
            until = max(
                record.locked_until if record else 0.0,
                self._global.locked_until if self.global_free_failures is not None else 0.0,
            )
            return max(0.0, until - now)

    def __call__(self, username: str, password: str) -> bool:
        client = current_client()
        with self._lock:
            now = self.clock()
            pairs = self._records_for(self._key(username, client), now)
            until = max(r.locked_until for r, _ in pairs)
            if until > now:
                first = [r for r, _ in pairs if r.locked_until > now and not r.logged]
                for r in first:
                    r.logged = True
                if first:  # once per lock, not once per attempt
                    log.warning("login refused (locked for %d s)", math.ceil(until - now))
                return False
            self.checks += 1
            ok_user = hmac.compare_digest(username.encode("utf-8"), self._user)
            ok_password = hmac.compare_digest(password.encode("utf-8"), self._password)
            if ok_user and ok_password:
                for r, _ in pairs:
                    r.failures, r.locked_until, r.logged = 0, 0.0, False
                return True
            longest = 0.0
            for r, free in pairs:
                r.failures += 1
                delay = self._delay(r.failures, free)
                if delay:
                    r.locked_until, r.logged = max(r.locked_until, now + delay), True
                    longest = max(longest, delay)
            if longest:
                log.warning("login refused (locked for %d s)", math.ceil(longest))
            return False
