"""What the operator sees, and the run's log file.

Progress goes to stderr; results to stdout (exactly one JSON document with --json). On a
terminal: colours, a live upload display per host and a spinner for long remote steps. Off a
terminal (CI, pipes) or with NO_COLOR set: plain `[command] host: text` lines, no control
codes. -v adds timestamps and command output, -vv the scripts run on the hosts.

Every piece of text passes through `Reporter.redact` and then goes to the console and, when
one is open, to the run's log file (which always gets the full -vv trace, timestamped).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from io import StringIO
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from switchover.secrets import redact_doc
from switchover.units import human_size

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from switchover.transport.progress import ProgressCallback, SyncProgress

# Log files kept per log directory; older ones are removed when a new run starts.
LOG_KEEP = 200


def plain_requested() -> bool:
    """NO_COLOR (any non-empty value, see no-color.org) or a dumb terminal: no styling."""
    return bool(os.environ.get("NO_COLOR")) or os.environ.get("TERM") == "dumb"


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


# What rich drops from a Text (BEL, BS, VT, FF, CR): plain lines drop the same.
_RICH_STRIPS = dict.fromkeys((7, 8, 11, 12, 13))


def _expand_tabs(text: str) -> str:
    """Tabs to spaces every 8 cells, as rich does, counting cells with rich's own table
    (wide characters take two, combining and control characters none). Only a line with
    a tab loads that table."""
    if "\t" not in text:
        return text
    from rich.cells import cell_len

    out, col = [], 0
    for ch in text:
        if ch == "\t":
            out.append(" " * (8 - col % 8))
            col += 8 - col % 8
        else:
            out.append(ch)
            col = 0 if ch == "\n" else col + cell_len(ch)
    return "".join(out)


def _write_plain(stdout: bool, line: str) -> None:
    """One line written as rich's console writes an unstyled Text off a terminal, without
    loading rich (~30 ms of every command's start-up in CI and pipes). The stream is looked
    up at each write, as rich does: a test or a wrapper may have replaced it."""
    stream = sys.stdout if stdout else sys.stderr
    stream.write(_expand_tabs(line.translate(_RICH_STRIPS)) + "\n")
    stream.flush()


def _live_display(console: Console) -> Progress:
    """Spinners and upload bars, on a terminal only: rich.progress (and rich.live) is only
    imported here, so runs in CI and pipes never load it."""
    from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task
    from rich.text import Text

    class UploadBar(BarColumn):
        """A bar for uploads only: a spinner task shows its spinner and elapsed time."""

        def render(self, task: Task) -> Any:
            if task.fields.get("kind") != "upload":
                return Text("")
            return super().render(task)

    class Info(ProgressColumn):
        def render(self, task: Task) -> Text:
            if task.fields.get("kind") == "upload":
                left = task.time_remaining
                eta = "?" if left is None else time.strftime(
                    "%H:%M:%S" if left >= 3600 else "%M:%S", time.gmtime(left))
                return Text(f"{task.fields.get('info', '')}  ETA {eta}", style="cyan")
            return Text(f"{task.elapsed or 0:.1f} s", style="dim")

    return Progress(SpinnerColumn(), "{task.description}", UploadBar(bar_width=30), Info(),
                    console=console, transient=True, refresh_per_second=8)


class Reporter:
    def __init__(self, command: str, *, json_mode: bool = False, verbose: int = 0) -> None:
        self.command = command
        self.json_mode = json_mode
        self.verbose = verbose
        self._plain = plain_requested()
        self.fancy = _isatty(sys.stderr) and not self._plain
        # The result line is styled where rich would style it: a terminal, or FORCE_COLOR.
        self._styled_out = (_isatty(sys.stdout) or bool(os.environ.get("FORCE_COLOR"))) \
            and not self._plain
        # Parallel hosts report from threads: keep each line whole. Reentrant: a failing log
        # write reports itself from inside a locked section.
        self._lock = threading.RLock()
        self._progress: Progress | None = None
        self._tasks = 0
        self._log_file: IO[str] | None = None
        self.log_path: Path | None = None
        self._held: dict[str, list[str]] | None = None  # see ordered()

    # rich is loaded for a terminal (colours, the live display) and for tables only: off a
    # terminal every line goes out through _write_plain.

    @functools.cached_property
    def err(self) -> Console:
        from rich.console import Console

        # color_system=None: rich writes no escape codes at all (NO_COLOR alone would still
        # let it emit bold and dim).
        return Console(stderr=True, highlight=False, soft_wrap=True,
                       color_system="auto" if self.fancy else None)

    @functools.cached_property
    def out(self) -> Console:
        from rich.console import Console

        # Off a terminal rich assumes 80 columns and folds tables into unreadable slivers;
        # pipes and CI logs have no width, so give tables room (COLUMNS still wins).
        width = None if _isatty(sys.stdout) or "COLUMNS" in os.environ else 240
        return Console(highlight=False, soft_wrap=True, width=width,
                       color_system=None if self._plain else "auto")

    def _line(self, parts: Sequence[tuple[str, str]], *, stdout: bool = False) -> None:
        """One line of (text, style) parts; styled on a terminal, plain elsewhere. The
        caller holds the lock."""
        if not (self._styled_out if stdout else self.fancy):
            _write_plain(stdout, "".join(text for text, _ in parts))
            return
        from rich.text import Text

        # Text() + Text() would give the whole line the first part's style.
        line = Text()
        for text, style in parts:
            line.append(text, style=style)
        (self.out if stdout else self.err).print(line)

    # -- the one way out ---------------------------------------------------------------------

    def redact(self, text: str) -> str:
        """Every piece of text the Reporter writes (console, log file, JSON) passes through
        here first: the single place to mask anything that must not be shown."""
        return text

    @contextlib.contextmanager
    def ordered(self, hosts: Sequence[str]) -> Iterator[None]:
        """Hold host lines during a parallel phase and print them host by host afterwards.

        Off a terminal (CI logs, pipes) parallel hosts would interleave in completion order;
        this keeps one block per host in the fleet's own order. On a terminal lines stay
        live (the spinners and bars say what is running). The log file gets every line as
        it happens either way.
        """
        if self.fancy or len(hosts) < 2 or self._held is not None:
            yield
            return
        with self._lock:
            self._held = {h: [] for h in hosts}
        try:
            yield
        finally:
            with self._lock:
                held, self._held = self._held, None
                for lines in held.values():
                    for line in lines:
                        _write_plain(False, line)

    def _emit(self, text: str, style: str | None = None, *, level: int = 0,
              host: str | None = None) -> None:
        line = f"[{self.command}] {self.redact(text)}"
        self._log(line)
        if level > self.verbose:
            return
        if not self.fancy:
            with self._lock:
                if self._held is not None and host in self._held:
                    stamp = time.strftime("%H:%M:%S ") if self.verbose else ""
                    self._held[host].append(stamp + line)
                    return
        stamp = time.strftime("%H:%M:%S ") if self.verbose else ""
        with self._lock:
            self._line([(stamp, "dim"), (line, style or "")])

    # -- progress lines --------------------------------------------------------------------

    def step(self, host: str, text: str) -> None:
        self._emit(f"{host}: {text}", host=host)

    def good(self, host: str, text: str) -> None:
        self._emit(f"{host}: {text}", "green", host=host)

    def bad(self, host: str, text: str) -> None:
        self._emit(f"{host}: {text}", "bold red", host=host)

    def warn(self, text: str) -> None:
        self._emit(f"warning: {text}", "yellow")

    def note(self, text: str) -> None:
        """A line shown with -v (always logged)."""
        self._emit(text, "dim", level=1)

    def detail(self, host: str, text: str) -> None:
        """Shown with -v: command output and the like."""
        for line in text.rstrip().splitlines():
            self._emit(f"{host}:   {line}", "dim", level=1, host=host)

    def trace(self, host: str, script: str) -> None:
        """Shown with -vv (always in the log file): a script about to run on the host."""
        for line in script.rstrip("\n").splitlines():
            self._emit(f"{host}: $ {line}", "dim", level=2)

    def trace_result(self, host: str, rc: int, seconds: float) -> None:
        self._emit(f"{host}: => exit {rc} ({seconds:.2f} s)", "dim", level=2)

    @contextlib.contextmanager
    def activity(self, host: str, text: str, *, announce: bool = True) -> Iterator[None]:
        """A step that may take a while: a spinner with its name on a terminal.

        `announce=False`: the step's line is only shown with -v (and logged).
        """
        self._emit(f"{host}: {text}", level=0 if announce else 1, host=host)
        task = self._add_task(host, text, total=None, kind="spin")
        try:
            yield
        finally:
            self._remove_task(task)

    @contextlib.contextmanager
    def transfer(self, host: str, files: int, size: int) -> Iterator[ProgressCallback | None]:
        """A live bar for one host's upload; yields the callback for Transport.sync.

        Off a terminal it yields None: no progress is streamed, the step lines say enough.
        """
        task = self._add_task(host, "upload", total=1000, kind="upload",
                              info=f"0/{files} files")
        if task is None:
            yield None
            return
        progress = self._progress
        assert progress is not None

        def update(p: SyncProgress) -> None:
            total = p.files_total or files
            by_files = p.files_checked / total if total else 0.0
            fraction = max(0.0, min(1.0, max(by_files, p.percent / 100)))
            info = f"{min(p.files_checked, total)}/{total} files  {human_size(p.bytes_sent)} sent"
            if p.rate:
                info += f"  {p.rate}"
            progress.update(task, completed=round(fraction * 1000), info=info)

        try:
            yield update
        finally:
            self._remove_task(task)

    def _add_task(self, host: str, text: str, *, total: float | None,
                  **fields: Any) -> TaskID | None:
        if not self.fancy:
            return None
        from rich.markup import escape

        description = f"[bold]{escape(host)}[/]: {escape(text)}"
        with self._lock:
            if self._progress is None:
                self._progress = _live_display(self.err)
            if self._tasks == 0:
                self._progress.start()
            self._tasks += 1
            return self._progress.add_task(description, total=total, **fields)

    def _remove_task(self, task: TaskID | None) -> None:
        if task is None or self._progress is None:
            return
        with self._lock:
            self._progress.remove_task(task)
            self._tasks -= 1
            if self._tasks == 0:
                self._progress.stop()

    # -- results ---------------------------------------------------------------------------

    def result_line(self, text: str, ok: bool = True) -> None:
        """The final summary line: stdout on success, stderr on failure or under --json.

        On failure it names the log file, where the whole trace is.
        """
        text = self.redact(text)
        if not ok and self.log_path is not None:
            text += f"; full log: {self.log_path}"
        line = f"[{self.command}] {text}"
        self._log(line)
        with self._lock:
            self._line([(line, "bold green" if ok else "bold red")],
                       stdout=ok and not self.json_mode)

    def error(self, message: str, hint: str | None = None) -> None:
        """An error that ended the command (printed by the CLI), then where the log is."""
        message = self.redact(message)
        hint = self.redact(hint) if hint else None
        self._log(f"[{self.command}] error: {message}")
        if hint:
            self._log(f"[{self.command}] hint: {hint}")
        with self._lock:
            self._line([("error:", "bold red"), (f" {message}", "")])
            if hint:
                self._line([(f"hint: {hint}", "")])
            if self.log_path is not None:
                self._line([(f"[{self.command}] full log: {self.log_path}", "dim")])

    def print(self, renderable: Any) -> None:
        """A table or the like, on stdout."""
        with self.out.capture() as cap:
            self.out.print(renderable)
        text = self.redact(cap.get())
        if self._log_file is not None:
            from rich.console import Console

            plain = Console(file=StringIO(), width=200, color_system=None, soft_wrap=True)
            plain.print(renderable)
            self._log(self.redact(plain.file.getvalue()))  # type: ignore[attr-defined]
        with self._lock:
            self.out.file.write(text)
            self.out.file.flush()

    def emit_json(self, doc: Any) -> None:
        # Redact each string, not the serialized text: masking a value like "8080" or
        # "true" in the text would break the JSON; inside strings it cannot.
        text = json.dumps(redact_doc(doc, self.redact), indent=2, default=str)
        self._log(text)
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    # -- the log file ----------------------------------------------------------------------

    def open_log(self, directory: Path, label: str) -> Path | None:
        """Start this run's log file in `directory`. Never fails: a log that cannot be
        written is a warning, not a reason to stop a deploy."""
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:80]
            path = directory / f"{stamp}-{safe}-{os.getpid()}.log"
            # 0600: the trace holds the scripts run on the hosts and their output.
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._log_file = os.fdopen(fd, "a", encoding="utf-8", errors="replace",
                                       buffering=1)
        except OSError as e:
            self.warn(f"no log file for this run: cannot write in {directory}: "
                      f"{e.strerror or e}")
            return None
        self.log_path = path
        prune_logs(directory, LOG_KEEP)
        return path

    def _log(self, text: str) -> None:
        f = self._log_file
        if f is None:
            return
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        try:
            with self._lock:
                for line in text.splitlines() or [""]:
                    f.write(f"{stamp} {line}\n")
        except (OSError, ValueError) as e:
            # Disk full, file gone: stop logging, say so once, carry on with the deploy.
            self._log_file = None
            with contextlib.suppress(Exception):
                f.close()
            with self._lock:
                self._line([(f"[{self.command}] warning: stopped writing the log file "
                             f"{self.log_path}: {e}", "")])

    def close(self) -> None:
        """Stop the live display and close the log file. Safe to call more than once."""
        with self._lock:
            if self._progress is not None and self._tasks:
                self._tasks = 0
                self._progress.stop()
        f, self._log_file = self._log_file, None
        if f is not None:
            with contextlib.suppress(OSError, ValueError):
                f.close()


def prune_logs(directory: Path, keep: int) -> None:
    """Remove all but the newest `keep` log files (by name: they start with a timestamp)."""
    with contextlib.suppress(OSError):
        logs = sorted(p for p in directory.iterdir() if p.suffix == ".log" and p.is_file())
        for old in logs[:-keep] if keep > 0 else logs:
            with contextlib.suppress(OSError):
                old.unlink()
