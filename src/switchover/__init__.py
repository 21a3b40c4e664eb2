"""switchover: atomic, reversible releases over SSH."""

__version__ = "0.1.0"
