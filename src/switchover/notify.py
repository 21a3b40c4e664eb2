"""Webhook notifications after a deploy or a rollback.

One JSON POST per configured URL: a Slack-compatible `text` line plus a structured body.
A webhook that fails, times out or answers non-2xx is a warning; it never changes the
outcome or the exit code of the command that triggered it. Every request is bounded by
`[notify] timeout`, and all of them together by about that long too (sent in parallel).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from switchover import __version__
from switchover.secrets import redact_doc

# urllib (with http.client, email and ssl) is imported where a webhook is actually sent
# or shown: ~30 ms of start-up otherwise paid by every deploy and rollback.
if TYPE_CHECKING:
    from switchover.config import Environment
    from switchover.context import RunContext
    from switchover.output import Reporter

ICONS = {"succeeded": ":white_check_mark:", "rolled_back": ":leftwards_arrow_with_hook:",
         "failed": ":x:", "rollback_failed": ":rotating_light:", "interrupted": ":warning:"}


@dataclass
class Notice:
    """What happened, in the terms a chat channel or an incident tool wants."""

    event: str  # "deploy" or "rollback"
    status: str  # succeeded, failed, rolled_back, rollback_failed, interrupted
    app: str
    env: str
    release: str | None
    user: str
    origin: str
    deploy_id: str
    duration: float
    message: str = ""
    hosts: list[dict[str, Any]] = field(default_factory=list)

    def text(self) -> str:
        icon = ICONS.get(self.status, "")
        what = "deploy" if self.event == "deploy" else "rollback"
        release = f" {self.release}" if self.release else ""
        n = len(self.hosts)
        line = (f"{icon} {self.app}/{self.env}: {what}{release} {self.status.replace('_', ' ')}"
                f" on {n} host{'s' if n != 1 else ''} by {self.user} ({self.duration:.1f} s)")
        if self.message and self.status != "succeeded":
            line += f": {self.message}"
        return line.strip()

    def body(self) -> dict[str, Any]:
        return {
            "text": self.text(),
            "event": self.event,
            "status": self.status,
            "app": self.app,
            "env": self.env,
            "release": self.release,
            "hosts": self.hosts,
            "user": self.user,
            "origin": self.origin,
            "duration": round(self.duration, 3),
            "deploy_id": self.deploy_id,
            "message": self.message,
            "switchover": __version__,
        }


def safe_url(url: str) -> str:
    """A webhook URL as it may be shown: the path and query often hold the secret token."""
    import urllib.parse

    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}/..."


def post(url: str, body: dict[str, Any], timeout: float) -> str | None:
    """POST the body as JSON; None on a 2xx answer, else why not."""
    import urllib.error
    import urllib.request

    data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST", headers={
        "Content-Type": "application/json", "User-Agent": f"switchover/{__version__}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        return f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError, ValueError) as e:
        return f"no answer: {getattr(e, 'reason', e)}"
    return None if 200 <= status < 300 else f"HTTP {status}"


def send(urls: Sequence[str], notice: Notice, timeout: float,
         out: Reporter) -> dict[str, str | None]:
    """Send to every URL in parallel; warn about each failure. Returns url -> error."""
    if not urls:
        return {}
    # Leaves this machine: every [secrets] value masked, like all other output.
    body = redact_doc(notice.body(), out.redact)
    results: dict[str, str | None] = {}

    def one(url: str) -> None:
        try:
            results[url] = post(url, body, timeout)
        except Exception as e:  # a notification must never break the command
            results[url] = f"{type(e).__name__}: {e}"

    threads = [threading.Thread(target=one, args=(u,), daemon=True) for u in urls]
    for t in threads:
        t.start()
    for t in threads:
        # urlopen's timeout bounds each socket operation; DNS and a slow trickle are not
        # covered by it, so the wait here is bounded as well.
        t.join(timeout + 2)
    for url in urls:
        error = results.get(url, "timed out")
        results[url] = error
        if error is not None:
            out.warn(f"webhook {safe_url(url)} failed: {error}")
        else:
            out.note(f"notified {safe_url(url)}")
    return results


def deploy_notice(report: Any, ctx: RunContext) -> Notice:
    """From a deploy.DeployReport."""
    return Notice(
        event="deploy", status=report.status, app=ctx.app, env=ctx.env, release=report.release,
        user=ctx.user, origin=ctx.origin, deploy_id=ctx.deploy_id, duration=report.seconds,
        message=report.message,
        hosts=[{"host": h.name, "status": h.status,
                "error": h.error.message if h.error else None} for h in report.hosts],
    )


def rollback_notice(doc: dict[str, Any], ctx: RunContext, seconds: float) -> Notice:
    """From the document manage.rollback returns."""
    rows = doc.get("hosts", [])
    ok = doc.get("status") == "ok"
    releases = sorted({r["release"] for r in rows if r.get("release")})
    errors = "; ".join(f"{r['host']}: {r['error']}" for r in rows if r.get("error"))
    return Notice(
        event="rollback", status="rolled_back" if ok else "rollback_failed", app=ctx.app,
        env=ctx.env, release=", ".join(releases) or None, user=ctx.user, origin=ctx.origin,
        deploy_id=ctx.deploy_id, duration=seconds,
        message="manual rollback" if ok else errors,
        hosts=[{"host": r["host"], "status": "rolled_back" if r.get("status") == "ok"
                else "failed", "error": r.get("error")} for r in rows],
    )


def notify(env: Environment, notice: Notice, out: Reporter) -> None:
    """Send `notice` to the environment's webhooks, if any."""
    send(env.notify.webhooks, notice, env.notify.timeout, out)
