"""Live upload progress: rsync's `--info=progress2` lines, read as they come.

`run_streaming` is `run_process` for a child whose stdout we want line by line while it runs
(rsync ends each progress update with a carriage return, not a newline).
"""

from __future__ import annotations

import contextlib
import os
import re
import selectors
import subprocess
import tempfile
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from switchover.transport.base import StepWatch, _kill_group, files_from, run_process

# rsync options that make it report progress on stdout, one line per update.
PROGRESS_ARGS = ("--info=progress2", "--outbuf=L")

_PROGRESS_RE = re.compile(
    r"^\s*(?P<bytes>[\d,.]+)\s+(?P<pct>\d+)%\s+(?P<rate>\S+)\s+(?P<eta>\d+:\d\d:\d\d)"
    r"(?:\s+\(xfr#(?P<xfr>\d+),\s+(?:ir|to)-chk=(?P<left>\d+)/(?P<total>\d+)\))?\s*$"
)


@dataclass(frozen=True)
class SyncProgress:
    """Where an upload stands. `files_total` may grow while rsync is still scanning."""

    bytes_sent: int = 0  # file data sent so far (unchanged files hard-linked are not sent)
    files_sent: int = 0
    files_checked: int = 0
    files_total: int | None = None
    percent: int = 0  # rsync's own figure: bytes sent / bytes of the whole tree
    rate: str = ""  # rsync's rate text, e.g. "3.10MB/s"

    @property
    def fraction(self) -> float:
        """0..1, whichever measure is further along: files checked or bytes sent."""
        by_files = self.files_checked / self.files_total if self.files_total else 0.0
        return max(0.0, min(1.0, max(by_files, self.percent / 100)))


ProgressCallback = Callable[[SyncProgress], None]


def parse_progress2(line: str, last: SyncProgress | None = None) -> SyncProgress | None:
    """One `--info=progress2` line, or None if the line is something else (e.g. --stats).

    Lines without the `(xfr#N, to-chk=A/B)` part keep the file counts of `last`.
    """
    m = _PROGRESS_RE.match(line)
    if not m:
        return None
    sent = int(re.sub(r"[,.]", "", m.group("bytes")))
    if m.group("xfr") is None:
        base = last or SyncProgress()
        return SyncProgress(sent, base.files_sent, base.files_checked, base.files_total,
                            int(m.group("pct")), m.group("rate"))
    total = int(m.group("total"))
    return SyncProgress(sent, int(m.group("xfr")), total - int(m.group("left")), total,
                        int(m.group("pct")), m.group("rate"))


def _split_lines(buf: bytes) -> tuple[list[bytes], bytes]:
    """Complete lines (ended by \\r or \\n) and the unfinished rest."""
    parts = re.split(rb"[\r\n]", buf)
    return parts[:-1], parts[-1]


def run_streaming(
    argv: Sequence[str],
    *,
    timeout: float | None,
    host: str,
    what: str,
    on_line: Callable[[str], None],
    abort: threading.Event | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run argv like `run_process`, handing each stdout line to `on_line` as it arrives.

    stderr goes to a temporary file, not a pipe: over an SSH ControlMaster the master may
    hold a copy of the child's stderr until the remote side ends, and reading a pipe to EOF
    would wait for that. Lines given to `on_line` are not kept in the returned stdout.
    """
    with tempfile.TemporaryFile() as errf:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=errf,
            start_new_session=True,
        )
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        kept: list[bytes] = []
        rest = b""
        watch = StepWatch(timeout, host, what, abort)
        sel = selectors.DefaultSelector()
        sel.register(fd, selectors.EVENT_READ)
        eof = False
        try:
            while True:
                wait = watch.next_wait()
                if eof:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=wait)
                        break
                    continue
                if not sel.select(timeout=wait):
                    continue
                data = os.read(fd, 65536)
                if not data:
                    eof = True
                    continue
                lines, rest = _split_lines(rest + data)
                for raw in lines:
                    text = raw.decode(errors="replace")
                    if _PROGRESS_RE.match(text):
                        # A display problem must never fail an upload.
                        with contextlib.suppress(Exception):
                            on_line(text)
                    else:
                        kept.append(raw + b"\n")
        except BaseException:  # our own Interrupted/HostError above, or Ctrl-C
            _kill_group(proc)  # type: ignore[arg-type]
            raise
        finally:
            sel.close()
        if proc.stdout is not None:
            proc.stdout.close()
        kept.append(rest)
        errf.seek(0)
        err = errf.read().decode(errors="replace")
    out = b"".join(kept).decode(errors="replace")
    return subprocess.CompletedProcess(list(argv), proc.returncode, out, err)


def progress_reader(callback: ProgressCallback) -> Callable[[str], None]:
    """An `on_line` for run_streaming that turns progress2 lines into SyncProgress calls."""
    last: list[SyncProgress | None] = [None]

    def on_line(line: str) -> None:
        p = parse_progress2(line, last[0])
        if p is not None:
            last[0] = p
            callback(p)

    return on_line


def run_rsync(argv: Sequence[str], *, timeout: float | None, host: str, what: str,
              abort: threading.Event | None, progress: ProgressCallback | None = None,
              only: Sequence[str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run an rsync argv (rsync_args + destination) the way both transports do: with the
    `only` paths on stdin, with progress streamed to `progress`, or plainly."""
    if only is not None:
        return run_process(argv, timeout=timeout, host=host, what=what, abort=abort,
                           input=files_from(only))
    if progress is None:
        return run_process(argv, timeout=timeout, host=host, what=what, abort=abort)
    return run_streaming([argv[0], *PROGRESS_ARGS, *argv[1:]], timeout=timeout, host=host,
                         what=what, abort=abort, on_line=progress_reader(progress))
