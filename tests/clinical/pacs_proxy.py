"""A loopback HTTP proxy in front of a real PACS, for tests: it forwards every request, unless its ``rule`` answers
one with an HTTP error (an outage, a refusal) or holds it (a PACS that takes its time) until released."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "content-length", "host", "content-encoding"}


class PacsProxy:
    """``url``: the proxy's DICOMweb URL. ``rule(method, path) -> int | None``: a status to answer with, or None
    to forward. ``hold_posts``: POSTs wait until :meth:`release` (``held`` is set when one arrives)."""

    def __init__(self, target_url: str):
        self.target = target_url.split("/dicom-web")[0]
        self.rule = lambda method, path: None
        self.hold_posts = False
        self.held, self._release = threading.Event(), threading.Event()
        self.requests: list[tuple[str, str, int]] = []
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                status = proxy.rule(self.command, self.path)
                if self.command == "POST" and proxy.hold_posts:
                    proxy.held.set()
                    proxy._release.wait(60)
                if status is None:
                    headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                    r = requests.request(self.command, proxy.target + self.path, headers=headers, data=body, timeout=60)
                    status, content, out = r.status_code, r.content, r.headers
                else:
                    content, out = b"proxy says no", {"Content-Type": "text/plain"}
                proxy.requests.append((self.command, self.path, status))
                self.send_response(status)
                for k, v in out.items():
                    if k.lower() not in HOP_BY_HOP:
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(content)))
                self.end_headers()
                self.wfile.write(content)

            do_GET = do_POST = do_PUT = do_DELETE = _any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/dicom-web"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def release(self) -> None:
        self._release.set()

    def __enter__(self) -> PacsProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()
