"""Random identifiers for new resources and records (UUID version 4)."""

from __future__ import annotations

import os
import uuid


class _IdPool:
    """Random version-4 UUIDs drawn from a buffer of ``os.urandom`` (one syscall per 256 ids, not one each)."""

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def next(self) -> str:
        if self._pos >= len(self._buf):
            self._buf, self._pos = os.urandom(16 * 256), 0
        raw = self._buf[self._pos : self._pos + 16]
        self._pos += 16
        return str(uuid.UUID(bytes=raw, version=4))


_ids = _IdPool()


def new_id() -> str:
    return _ids.next()
