"""Health checks: commands run on the host, URLs fetched from the deploying machine."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from switchover.config import HealthConfig


@dataclass(frozen=True)
class CheckOutcome:
    name: str
    ok: bool
    attempts: int
    detail: str


def fetch_url(url: str, timeout: float) -> tuple[bool, str]:
    """One attempt: a 2xx or 3xx answer within the timeout passes."""
    # urllib (with http.client, email and ssl) costs ~30 ms to import: only when a URL
    # check is configured, not on every deploy.
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url, headers={"User-Agent": "switchover-health"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError, TimeoutError) as e:
        reason = getattr(e, "reason", e)
        return False, f"no answer: {reason}"
    return (200 <= status < 400), f"HTTP {status}"


def with_retries(
    name: str,
    attempt: Callable[[], tuple[bool, str]],
    cfg: HealthConfig,
    sleep: Callable[[float], None] = time.sleep,
) -> CheckOutcome:
    """Try up to 1 + retries times, `interval` seconds apart; the first pass wins."""
    detail = ""
    total = cfg.retries + 1
    for n in range(1, total + 1):
        ok, detail = attempt()
        if ok:
            return CheckOutcome(name, True, n, detail)
        if n < total:
            sleep(cfg.interval)
    return CheckOutcome(name, False, total, detail)


def expand_url(url: str, host: str) -> str:
    return url.replace("{host}", host)
