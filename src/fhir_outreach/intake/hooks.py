"""The hook registry: one ``/hooks/{key}`` endpoint per source subscription, and its secrets.

A hook is a ``Record(kind="hook")`` keyed by its URL key. It names its source server, what it listens to
(classic criteria or a topic), the Subscription it corresponds to on the source, and its bookkeeping
(poll checkpoint, last event number, last time the source was heard from). Secrets are never stored:
each hook's secret is derived from the deployment's master key (``HMAC(master, key)``) and only its
SHA-256 is kept for comparison, so a leaked store does not leak credentials; the same derivation lets us
verify Medplum's ``X-Signature`` HMAC without storing the shared secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from ..errors import Conflict, Forbidden, NotFound, Unauthorized
from ..store import Store
from ..store.base import Record

HOOK = "hook"
Mode = Literal["classic", "topic", "medplum", "eventgrid", "any"]
MASTER_KEY_FILE = "hook-master-key"


def load_master_key(configured: str | None, data_dir: Path) -> bytes:
    """The master key from settings, else from ``data_dir/hook-master-key`` (created 0600 on first use)."""
    if configured:
        return configured.encode()
    path = data_dir / MASTER_KEY_FILE
    if path.exists():
        return path.read_text().strip().encode()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process created it first
        return path.read_text().strip().encode()
    with os.fdopen(fd, "w") as fh:
        fh.write(key + "\n")
    return key.encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def sha256_hex(text: str | bytes) -> str:
    return hashlib.sha256(text.encode() if isinstance(text, str) else text).hexdigest()


@dataclass
class Hook:
    key: str
    source: str
    mode: Mode = "any"
    criteria: str | None = None  # classic: "Encounter?status=finished"
    topic: str | None = None  # topic canonical
    resource_type: str | None = None  # what the topic/criteria is about (for polls and recovery searches)
    payload: str | None = None  # full-resource | id-only | empty
    remote_id: str | None = None  # Subscription id on the source
    secret_hash: str = ""
    require_signature: bool = False
    heartbeat_period: int | None = None
    checkpoint: str | None = None  # meta.lastUpdated of the newest resource seen by a poll
    last_event_number: int = 0
    last_event_time: float = 0.0
    last_seen: float = 0.0
    status: str | None = None  # last status the source reported
    trigger: str | None = None  # the journey trigger this hook serves (provisioning)
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_record(cls, rec: Record) -> Hook:
        known = {k: v for k, v in rec.data.items() if k in cls.__dataclass_fields__}
        return cls(key=rec.key, **{k: v for k, v in known.items() if k != "key"})

    def to_data(self) -> dict[str, Any]:
        data = asdict(self)
        data.pop("key")
        return data


class HookRegistry:
    """Creates hooks, derives their secrets and authenticates deliveries. Owned by the lifespan."""

    def __init__(self, store: Store, master_key: bytes, public_base: str) -> None:
        self.store = store
        self.master = master_key
        self.public_base = public_base.rstrip("/")
        self._cache: dict[str, tuple[float, Hook]] = {}

    def secret_for(self, key: str) -> str:
        return _b64(hmac.new(self.master, f"hook-secret:{key}".encode(), hashlib.sha256).digest())

    def stable_key(self, source: str, name: str) -> str:
        """A key that is the same on every run for (source, name) yet unguessable without the master key."""
        return _b64(hmac.new(self.master, f"hook-key:{source}:{name}".encode(), hashlib.sha256).digest())[:32]

    def endpoint(self, key: str) -> str:
        return f"{self.public_base}/hooks/{key}"

    async def create(self, hook: Hook) -> tuple[Hook, str]:
        """Store a new hook; returns it and its secret (shown once, never stored)."""
        secret = self.secret_for(hook.key)
        hook.secret_hash = sha256_hex(secret)
        hook.last_seen = time.time()
        if not await self.store.add_record(Record(HOOK, hook.key, state="active", group=hook.source,
                                                  data=hook.to_data())):
            raise Conflict(f"hook {hook.key} already exists")
        return hook, secret

    async def get(self, key: str, *, cached: bool = False) -> Hook:
        now = time.monotonic()
        hit = self._cache.get(key)
        if cached and hit and hit[0] > now:
            return hit[1]
        rec = await self.store.get_record(HOOK, key)
        if rec is None or rec.state != "active":
            raise NotFound("no active hook at this URL")
        hook = Hook.from_record(rec)
        self._cache[key] = (now + 5.0, hook)
        return hook

    async def update(self, key: str, change: Any) -> Hook:
        """Apply ``change(hook)`` with compare-and-set, retrying on concurrent updates."""
        for _ in range(20):
            rec = await self.store.get_record(HOOK, key)
            if rec is None:
                raise NotFound(f"hook {key} not found")
            hook = Hook.from_record(rec)
            change(hook)
            rec.data = hook.to_data()
            if await self.store.save_record(rec):
                return hook
        raise Conflict(f"hook {key}: too many concurrent updates")

    async def all(self) -> list[Hook]:
        return [Hook.from_record(r) for r in await self.store.list_records(HOOK, state="active", limit=10000)]

    def authenticate(self, hook: Hook, *, presented: str | None, signature: str | None, body: bytes) -> None:
        """Raise Unauthorized (nothing presented) or Forbidden (wrong) unless the delivery proves the secret."""
        if signature:
            expected = hmac.new(self.secret_for(hook.key).encode(), body, hashlib.sha256).hexdigest()
            if not hmac.compare_digest(expected, signature.strip().lower()):
                raise Forbidden("X-Signature does not match the HMAC-SHA256 of the body")
            if presented is None:
                return
        elif hook.require_signature:
            raise Unauthorized("this hook requires an X-Signature header (HMAC-SHA256 of the body)")
        if presented is None:
            raise Unauthorized("missing hook credentials: send the secret header configured in the "
                               "Subscription's channel.header (Authorization: Bearer <secret>)")
        if not hmac.compare_digest(sha256_hex(presented), hook.secret_hash):
            raise Forbidden("wrong hook secret")


def presented_secret(headers: dict[str, str], query: dict[str, str]) -> str | None:
    auth = headers.get("authorization", "")
    if auth[:7].lower() == "bearer " and auth[7:].strip():
        return auth[7:].strip()
    for name in ("x-hook-secret", "x-api-key"):
        if headers.get(name):
            return headers[name].strip()
    for name in ("secret", "code"):
        if query.get(name):
            return query[name]
    return None
