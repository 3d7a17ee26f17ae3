"""The error type of bad input found before any work."""

from __future__ import annotations


class PreflightError(ValueError):
    """Bad input found before any work; the message names the problem and the fix."""
