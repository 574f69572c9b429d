"""Fixtures the method tests share."""
from .planted import planted  # noqa: F401 (the planted-redundancy fixture)
