"""Durable storage: one async ``Store`` contract (``base``), two real backends (``sqlite``, ``mongo``)."""

from __future__ import annotations

from .base import Store, StoredResource, Write


def open_store(url: str, *, base_url: str | None = None, sqlite_synchronous: str = "FULL") -> Store:
    """The backend for a ``FHIR_OUTREACH_STORE`` URL (``sqlite:///path`` or ``mongodb://host/db``)."""
    if url.startswith("sqlite:"):
        from .sqlite import SqliteStore

        return SqliteStore(url, base_url=base_url, synchronous=sqlite_synchronous)
    if url.startswith(("mongodb:", "mongodb+srv:")):
        from .mongo import MongoStore

        return MongoStore(url, base_url=base_url)
    raise ValueError(f"unsupported store URL scheme: {url.split(':', 1)[0]!r} (use sqlite:/// or mongodb://)")


__all__ = ["Store", "StoredResource", "Write", "open_store"]
