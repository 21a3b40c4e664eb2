"""Sizes for people: apart from output.py so that the host code can use it without loading
the output code."""

from __future__ import annotations


def human_size(n: int) -> str:
    """`n` bytes in decimal units: 512 B, 1.5 kB, 50.0 MB."""
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{n} B"
