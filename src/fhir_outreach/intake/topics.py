"""The shipped SubscriptionTopics: one trigger per file, read from JSON, for provisioning and intake.

Each file holds the trigger's summary (resource, interactions, FHIRPath on ``%current``/``%previous``, the
classic fallback criteria ``query_current``, filter parameters) next to the same topic as an R4B
``SubscriptionTopic`` and as its R4 backport ``Basic`` form. Provisioning writes one of the two resources to
sources that support topic-based subscriptions and falls back to ``Type?query_current`` classic criteria
elsewhere; ``periodic`` topics are also evaluated by a scan, because no server emits their event.

The source of truth is ``subscriptions/topics/`` at the repository root; ``scripts/sync-topics`` copies it
into this package (``topic_data/``) so that a non-editable install carries it, and a test keeps the two
byte-identical. ``load_topics()`` reads the in-package copy unless given a directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

_FIELDS = (
    "name",
    "title",
    "resource",
    "interactions",
    "fhirpath",
    "query_current",
    "can_filter_by",
    "periodic",
    "topic",
    "basic",
)


@dataclass(frozen=True)
class Topic:
    name: str
    canonical: str
    title: str
    resource: str
    interactions: tuple[str, ...]
    fhirpath: str | None
    query_current: str | None
    can_filter_by: tuple[str, ...]
    periodic: bool
    topic: dict[str, Any] = field(repr=False, compare=False, hash=False)
    basic: dict[str, Any] = field(repr=False, compare=False, hash=False)


def default_topic_dir() -> Traversable:
    return resources.files("fhir_outreach.intake") / "topic_data"


def load_topics(directory: Path | None = None) -> dict[str, Topic]:
    """All topics in ``directory`` (default: the in-package copy), by name. Raises ``ValueError`` naming the file."""
    root: Traversable = directory if directory is not None else default_topic_dir()
    files = sorted((f for f in root.iterdir() if f.name.endswith(".json")), key=lambda f: f.name)
    topics: dict[str, Topic] = {}
    for file in files:
        topic = _parse(file.name, json.loads(file.read_text(encoding="utf-8")))
        topics[topic.name] = topic
    if not topics:
        raise ValueError(f"no topic files in {root}")
    return topics


def _parse(filename: str, doc: Any) -> Topic:
    if not isinstance(doc, dict):
        raise ValueError(f"{filename}: expected a JSON object")
    missing = [key for key in _FIELDS if key not in doc]
    if missing:
        raise ValueError(f"{filename}: missing {', '.join(missing)}")
    name = doc["name"]
    if f"{name}.json" != filename:
        raise ValueError(f"{filename}: name {name!r} does not match the file name")
    url = doc["topic"].get("url") if isinstance(doc["topic"], dict) else None
    if not isinstance(url, str) or not url.endswith(f"/{name}"):
        raise ValueError(f"{filename}: topic.url {url!r} does not end with /{name}")
    return Topic(
        name=name,
        canonical=url,
        title=doc["title"],
        resource=doc["resource"],
        interactions=tuple(doc["interactions"]),
        fhirpath=doc["fhirpath"],
        query_current=doc["query_current"],
        can_filter_by=tuple(doc["can_filter_by"]),
        periodic=bool(doc["periodic"]),
        topic=doc["topic"],
        basic=doc["basic"],
    )
