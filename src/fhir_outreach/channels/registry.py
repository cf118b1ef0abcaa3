"""The channels a process delivers through, built from settings: email when an SMTP host is set, SMS when a
provider is chosen, Teams and push always (Teams needs a webhook URL per recipient or a default; push needs
the patient's registered devices). A channel that is not configured is simply absent: its messages end
``not-done`` with the reason ``channel-unavailable`` instead of waiting forever."""

from __future__ import annotations

import logging
from typing import Any

import httpx

from ..settings import Settings
from .base import Channel

log = logging.getLogger("fhir_outreach.channels")


def build_channels(settings: Settings, *, vapid_key: Any = None,
                   transport: httpx.AsyncBaseTransport | None = None,
                   email_options: dict[str, Any] | None = None) -> dict[str, Channel]:
    from .push import PushChannel, load_vapid_key
    from .sms import sms_channel
    from .teams import TeamsChannel

    channels: dict[str, Channel] = {"teams": TeamsChannel()}
    key = vapid_key if vapid_key is not None else load_vapid_key(settings.vapid_private_key, settings.data_dir)
    channels["push"] = PushChannel(key, settings.vapid_subject)
    if settings.smtp_host:
        from .email import EmailChannel

        channels["email"] = EmailChannel(settings, **(email_options or {}))
    sms = sms_channel(settings, transport=transport)
    if sms is not None:
        channels["sms"] = sms
    log.debug("channels: %s", ", ".join(sorted(channels)))
    return channels
