"""No bytes on a queue stop a worker: a message kombu cannot decode is moved aside.

kombu's Redis transport decodes a message's body inside its read loop, so an envelope
whose `body_encoding` is base64 over bytes that are not base64 (or an encoding it does not
know, or a content type the worker does not accept) raised out of the consumer and killed
the worker. `transport_for(settings)` is the transport class the worker's Celery app uses:
kombu's own (plain or Sentinel), checking each message before it is handed on. A bad one
is pushed, with its queue and the reason, onto `Keys.dead_letters` and logged; the worker
goes on. Bytes that are not JSON at all are logged and dropped (kombu parsed them already).

This module only guards the read; it never changes a job record.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from datetime import UTC, datetime
from typing import Any

from kombu.transport import redis as kombu_redis

from tasks.keys import Keys
from tasks.settings import Settings

log = logging.getLogger(__name__)

ACCEPTED = frozenset({"application/json"})
"""Content types the worker's Celery app accepts (tasks/app.py: JSON only)."""

DEAD_LETTERS_MAX = 10_000
"""Entries the dead-letter list keeps, newest first."""


def problem(message: Any) -> str | None:
    """Why kombu could not decode `message` (a parsed envelope), or None if it can."""
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        return "not a kombu envelope"
    encoding = message["properties"].get("body_encoding")
    body = message.get("body")
    if encoding == "base64":
        try:
            base64.b64decode(body if isinstance(body, str | bytes) else b"", validate=True)
        except (binascii.Error, ValueError) as exc:
            return f"body_encoding base64 over a body that is not base64 ({exc})"
    elif encoding not in (None, "utf-8"):
        return f"unknown body_encoding {encoding!r}"
    content_type = message.get("content-type")
    if content_type not in ACCEPTED:
        return f"content type {content_type!r} (only JSON is accepted)"
    return None


def transport_for(settings: Settings) -> type[Any]:
    """kombu's Redis transport for `settings`' URL, with every delivered message checked."""
    keys = Keys(settings.key_prefix)
    base: type[Any] = (kombu_redis.SentinelTransport if settings.sentinel is not None
                       else kombu_redis.Transport)

    def _deliver(self: Any, message: Any, queue: str) -> None:
        reason = problem(message)
        if reason is None:
            base._deliver(self, message, queue)
            return
        log.error("moved an undecodable message from queue %s to %s: %s", queue,
                  keys.dead_letters(), reason)
        entry = json.dumps({"queue": queue, "reason": reason, "message": message,
                            "at": datetime.now(UTC).isoformat()}, default=str)
        for channel in self.channels:
            with channel.conn_or_acquire() as client:
                client.pipeline().lpush(keys.dead_letters(), entry) \
                    .ltrim(keys.dead_letters(), 0, DEAD_LETTERS_MAX - 1).execute()
            return

    def _channel_read(self: Any, **options: Any) -> Any:
        try:
            return base.Channel._brpop_read(self, **options)
        except ValueError as exc:  # bytes that are not JSON, already taken off the queue
            log.error("dropped a message that is not JSON from a queue: %s", exc)
            return True

    channel = type("QuarantineChannel", (base.Channel,), {"_brpop_read": _channel_read})
    return type("QuarantineTransport", (base,), {"_deliver": _deliver, "Channel": channel})
