"""Errors raised while reading data sets from disk."""
from __future__ import annotations


class DatasetError(ValueError):
    """A data set file exists but is unreadable, truncated, corrupt or inconsistent.

    Subclasses ValueError so generic callers that already catch bad input keep working;
    the message always names the offending file and how to fix it.
    """
