"""Errors that only training raises; the shared base (`AdapterDockError`) stays in `hub.errors`.

Boundary: exception classes only. Like hub's, each subclasses `AdapterDockError` and the closest
builtin and carries a remedy; the hub never raises these (it knows nothing about training data).
"""

from __future__ import annotations

from hub.errors import AdapterDockError


class DataError(AdapterDockError, ValueError):
    """Training or evaluation data that cannot be used; the message names file, line and problem."""

    default_remedy = "Fix the listed lines and run again; nothing was trained or registered."
