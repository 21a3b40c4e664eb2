"""What the operator sees. Progress goes to stderr; results to stdout (one JSON document
with --json). Plain `[command] host: text` lines when stderr is not a terminal."""

from __future__ import annotations

import json
import os
import sys
import threading
from typing import Any

from rich.console import Console
from rich.markup import escape


class Reporter:
    def __init__(self, command: str, *, json_mode: bool = False, verbose: int = 0) -> None:
        self.command = command
        self.json_mode = json_mode
        self.verbose = verbose
        self.err = Console(stderr=True, highlight=False, soft_wrap=True)
        # Off a terminal rich assumes 80 columns and folds tables into unreadable slivers;
        # pipes and CI logs have no width, so give tables room (COLUMNS still wins).
        width = None if sys.stdout.isatty() or "COLUMNS" in os.environ else 240
        self.out = Console(highlight=False, soft_wrap=True, width=width)
        # Parallel hosts report from threads: keep each line whole.
        self._lock = threading.Lock()

    def _emit(self, text: str, style: str | None = None) -> None:
        line = f"[{self.command}] {text}"
        with self._lock:
            self.err.print(escape(line), style=style)

    def step(self, host: str, text: str) -> None:
        self._emit(f"{host}: {text}")

    def good(self, host: str, text: str) -> None:
        self._emit(f"{host}: {text}", "green")

    def bad(self, host: str, text: str) -> None:
        self._emit(f"{host}: {text}", "bold red")

    def warn(self, text: str) -> None:
        self._emit(f"warning: {text}", "yellow")

    def detail(self, host: str, text: str) -> None:
        """Shown with -v: command output and the like."""
        if self.verbose:
            for line in text.rstrip().splitlines():
                self._emit(f"{host}:   {line}", "dim")

    def result_line(self, text: str, ok: bool = True) -> None:
        """The final summary line: stdout on success, stderr on failure or under --json."""
        line = f"[{self.command}] {text}"
        style = "bold green" if ok else "bold red"
        console = self.out if ok and not self.json_mode else self.err
        with self._lock:
            console.print(escape(line), style=style)

    def print(self, renderable: Any) -> None:
        self.out.print(renderable)

    def emit_json(self, doc: Any) -> None:
        sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")
        sys.stdout.flush()
