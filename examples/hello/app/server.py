#!/usr/bin/env python3
"""Tiny stdlib-only web server for the switchover "hello" example.

Serves the release directory it lives in:
  GET /         public/index.html with {{VERSION}} and {{RELEASE}} filled in
  GET /health   200 "ok <release>" if public/index.html is readable, else 503
  GET /version  the release id

Listens on 127.0.0.1:$HELLO_PORT (default 8089) and logs to logs/hello.log
(logs/ is a shared dir, i.e. DEPLOY_TO/shared/logs). Normally started by ctl.py.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

APP_DIR = Path(__file__).resolve().parent  # DEPLOY_TO/releases/<id> when deployed
INDEX = APP_DIR / "public" / "index.html"
HOST = "127.0.0.1"
PORT = int(os.environ.get("HELLO_PORT", "8089"))
# switchover exports SWITCHOVER_RELEASE to hooks; otherwise use the release dir's name.
RELEASE = os.environ.get("SWITCHOVER_RELEASE") or APP_DIR.name

log = logging.getLogger("hello")


def read_version() -> str:
    try:
        return (APP_DIR / "VERSION").read_text(encoding="utf-8").strip()
    except OSError:
        return "unknown"


class Handler(BaseHTTPRequestHandler):
    server_version = "hello/1"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            self.index()
        elif path == "/health":
            self.health()
        elif path == "/version":
            self.send_text(HTTPStatus.OK, f"{RELEASE}\n")
        else:
            self.send_text(HTTPStatus.NOT_FOUND, "not found\n")

    def index(self) -> None:
        try:
            page = INDEX.read_text(encoding="utf-8")
        except OSError as exc:
            log.error("cannot read %s: %s", INDEX, exc)
            self.send_text(HTTPStatus.INTERNAL_SERVER_ERROR, "index.html is unreadable\n")
            return
        page = page.replace("{{VERSION}}", read_version()).replace("{{RELEASE}}", RELEASE)
        self.send_text(HTTPStatus.OK, page, "text/html; charset=utf-8")

    def health(self) -> None:
        # Healthy means "this release can actually serve its page", so really read it.
        try:
            INDEX.read_bytes()
        except OSError as exc:
            log.error("health check failed: %s", exc)
            self.send_text(HTTPStatus.SERVICE_UNAVAILABLE, f"unhealthy {RELEASE}\n")
            return
        self.send_text(HTTPStatus.OK, f"ok {RELEASE}\n")

    def send_text(
        self, status: HTTPStatus, body: str, ctype: str = "text/plain; charset=utf-8"
    ) -> None:
        data = body.encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: object) -> None:
        # Access log goes to the log file instead of stderr.
        log.info("%s %s", self.address_string(), format % args)


def main() -> None:
    log_dir = APP_DIR / "logs"
    log_dir.mkdir(exist_ok=True)
    logging.basicConfig(
        filename=log_dir / "hello.log",
        level=logging.INFO,
        format="%(asctime)s hello[%(process)d] %(levelname)s %(message)s",
    )
    # Turn SIGTERM (sent by `ctl.py stop`) into a clean exit that closes the socket.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with ThreadingHTTPServer((HOST, PORT), Handler) as httpd:
        log.info("release %s (v%s) on http://%s:%d/", RELEASE, read_version(), HOST, PORT)
        try:
            httpd.serve_forever()
        finally:
            log.info("release %s stopped", RELEASE)


if __name__ == "__main__":
    main()
