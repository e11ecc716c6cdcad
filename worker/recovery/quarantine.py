"""No bytes on a queue stop a worker: whatever kombu or Celery cannot take is moved aside.

kombu's Redis transport parses what its BRPOP pops and decodes the message's body inside
its read loop, so bytes that are not JSON, or an envelope whose `body_encoding` is base64
over bytes that are not base64 (or an encoding it does not know, a content type the worker
does not accept, no delivery tag) raised out of the consumer: the worker died, or the bytes
were lost. `transport_for(settings)` is the transport class the worker's Celery app uses:
kombu's own (plain or Sentinel) with its read replaced by one that keeps the popped bytes
until they have been checked, and a decoded message of the wrong shape (headers that are a
string: kombu's own parse raised AttributeError) that kombu or Celery still fails on is caught
around the delivery (`refused`). Bad ones go, with their queue and the reason, onto
`Keys.dead_letters` (`DeadLetters`), are logged and counted; the worker goes on.

This module only guards the read; it never changes a job record.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import redis
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from kombu.utils.json import loads

from tasks.settings import Settings
from tasks.state.keys import Keys

log = logging.getLogger(__name__)

ACCEPTED = frozenset({"application/json"})
"""Content types the worker's Celery app accepts (tasks/app.py: JSON only)."""

DEAD_LETTERS_MAX = 10_000
"""Entries the dead-letter list keeps, newest first."""

KEPT_BYTES = 16 * 1024
"""Bytes of a dead message an entry keeps: all of them up to this size, else the first ones
(with the list's length, at most 10,000 entries of some 22 KB: ~220 MB at the very worst)."""

LOGGED_BYTES = 80
"""Bytes of a dead message its log line shows, escaped."""


def problem(message: Any) -> str | None:
    """Why kombu could not decode `message` (a parsed envelope), or None if it can."""
    if not isinstance(message, dict) or not isinstance(message.get("properties"), dict):
        return "not a kombu envelope"
    if "delivery_tag" not in message["properties"]:
        return "a kombu envelope with no delivery tag"
    if not isinstance(message.get("headers") or {}, dict):
        return f"headers that are a {type(message['headers']).__name__}, not an object"
    info = message["properties"].get("delivery_info")
    if not isinstance(info, dict) or not {"exchange", "routing_key"} <= info.keys():
        return "a delivery_info that is not an object with an exchange and a routing_key"
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


def read(raw: bytes | str) -> tuple[Any, str | None]:
    """(the message, None) if kombu can take `raw`, popped off a queue; else (None, why not)."""
    try:
        message = loads(bytes_to_str(raw))  # as kombu reads it: undecodable UTF-8 replaced
    except (TypeError, ValueError) as exc:
        return None, f"not JSON ({exc})" if raw else "empty"
    reason = problem(message)
    return (message, None) if reason is None else (None, reason)


def entry(queue: str, reason: str, raw: bytes) -> str:
    """A dead-letter list entry: JSON {queue, reason, at, size, kept, body, body_encoding}.

    `body` is the first `kept` of the message's `size` bytes (all of them when within
    KEPT_BYTES): as text when they are UTF-8 (`body_encoding` "utf-8"), else in base64.
    """
    kept = raw[:KEPT_BYTES]
    try:
        body, encoding = kept.decode("utf-8"), "utf-8"
    except UnicodeDecodeError:
        body, encoding = base64.b64encode(kept).decode("ascii"), "base64"
    return json.dumps({"queue": queue, "reason": reason, "at": datetime.now(UTC).isoformat(),
                       "size": len(raw), "kept": len(kept), "body": body,
                       "body_encoding": encoding})


class DeadLetters:
    """Where a worker puts what it cannot decode: the list, one log line, and `counted`."""

    def __init__(self, keys: Keys, counted: Callable[[], None] | None = None) -> None:
        self.key = keys.dead_letters()
        self.counted = counted

    def put(self, client: redis.Redis, queue: str, reason: str, raw: bytes | str) -> None:
        data = raw.encode("utf-8", "surrogateescape") if isinstance(raw, str) else raw
        log.error("moved an undecodable message (%d bytes: %s) from queue %s to %s: %s",
                  len(data), repr(data[:LOGGED_BYTES]), queue, self.key, reason)
        if self.counted is not None:
            self.counted()
        try:
            pipe = client.pipeline()
            pipe.lpush(self.key, entry(queue, reason, data))
            pipe.ltrim(self.key, 0, DEAD_LETTERS_MAX - 1)
            pipe.execute()
        except redis.RedisError as exc:  # taken off its queue already: the log line is all left
            log.error("could not keep the undecodable message from queue %s: %s", queue, exc)


def refused(channel: Any, deliver: Callable[[], None], message: dict[str, Any]) -> str | None:
    """Run `deliver` (kombu's parse, then Celery's); None if it went through, else why not.

    `problem` names the wrong shapes known to stop a worker; this is the net for the rest: a
    decoded message that kombu or Celery fails on (an error that is not the broker's) is
    taken off the unacked set, if it got there, and moved aside like undecodable bytes.
    Errors of the broker connection propagate as before, for kombu to reconnect.
    """
    transport = channel.connection
    broker_errors = (*transport.connection_errors, *transport.channel_errors, redis.RedisError)
    try:
        deliver()
        return None
    except broker_errors:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever a wrong shape raises inside kombu or Celery
        log.exception("kombu or Celery could not take a decoded message")
        tag = message["properties"]["delivery_tag"]
        try:
            channel.qos.reject(tag, requeue=False)
        except (KeyError, redis.RedisError):  # never reached the unacked set
            pass
        return f"a message kombu or Celery could not take ({type(exc).__name__}: {str(exc)[:LOGGED_BYTES]})"


def transport_for(settings: Settings, counted: Callable[[], None] | None = None) -> type[Any]:
    """kombu's Redis transport for `settings`' URL, with every delivered message checked;
    `counted` is called once for each message moved aside (a metric)."""
    dead = DeadLetters(Keys(settings.key_prefix), counted)
    base: type[Any] = (kombu_redis.SentinelTransport if settings.sentinel is not None
                       else kombu_redis.Transport)

    def _brpop_read(self: Any, **options: Any) -> bool:
        """kombu's `Channel._brpop_read` (5.4-5.7), parsing the popped bytes through `read`."""
        try:
            try:
                popped = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                self.client.connection.disconnect()  # the next poll reconnects
                raise
            if not popped:
                raise kombu_redis.Empty()
            queue = bytes_to_str(popped[0]).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue)
            message, reason = read(popped[1])
            if reason is None:  # checked: past our `_deliver`
                reason = refused(self, lambda: base._deliver(self.connection, message, queue),
                                 message)
            if reason is not None:
                with self.conn_or_acquire() as client:
                    dead.put(client, queue, reason, popped[1])
            return True
        finally:
            self._in_poll = None
            flush = getattr(self, "_flush_brpop_reauth", None)  # kombu 5.7's, between BRPOPs
            if flush is not None:
                flush()

    def _deliver(self: Any, message: Any, queue: str) -> None:
        """Broadcasts (remote control), which kombu parses itself, are checked here."""
        reason = problem(message)
        if reason is None and self.channels:
            reason = refused(self.channels[0], lambda: base._deliver(self, message, queue), message)
        if reason is None:
            return
        for channel in self.channels:
            with channel.conn_or_acquire() as client:
                dead.put(client, queue, reason, json.dumps(message, default=str))
            return

    channel = type("QuarantineChannel", (base.Channel,), {"_brpop_read": _brpop_read})
    return type("QuarantineTransport", (base,), {"_deliver": _deliver, "Channel": channel})
