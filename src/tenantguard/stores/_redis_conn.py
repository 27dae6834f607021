"""Talking to one Redis connection: checks that it is open and in step, one command and
its reply, and what an error reply means (forgotten scripts, a replica, a server not
ready). Shared by the lanes, the cluster's pooled connections and the health check.
"""

from __future__ import annotations

import asyncio
import re
import select
from typing import Any

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    NoScriptError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = [
    "NO_FUNCTIONS",
    "UNREACHABLE",
    "UNREADY",
    "ask",
    "demoted",
    "describe",
    "forgotten",
    "idle_writer",
    "is_unready",
    "open_writer",
    "refresh",
]


def open_writer(connection: Any) -> asyncio.StreamWriter | None:
    """The stream a connection writes to, if it is open and the server has not closed
    it; else None.

    redis-py's asyncio connections keep their streams as ``_reader`` and ``_writer``
    (every version since 4.2) and write only from a coroutine; a batch written straight
    to the stream goes out in the turn that made it. Were they renamed, every batch
    would take the coroutine's path (``send_packed_command``), slower but the same."""
    reader = getattr(connection, "_reader", None)
    writer = getattr(connection, "_writer", None)
    if not isinstance(reader, asyncio.StreamReader) or not isinstance(writer, asyncio.StreamWriter):
        return None
    if reader.at_eof() or reader.exception() is not None or writer.is_closing():
        return None
    return writer


async def ask(connection: Any, *args: str) -> Any:
    """One command and its reply on ``connection``; dropped if the exchange is cut short
    (an error reply leaves it in step)."""
    try:
        await connection.send_command(*args, check_health=False)
        return await connection.read_response()
    except ResponseError:
        raise
    except BaseException:
        await connection.disconnect(nowait=True)
        raise


def idle_writer(connection: Any) -> asyncio.StreamWriter | None:
    """The stream of an idle connection (nothing asked on it) if a command may go on it
    now: open, and with nothing unread. Only a connection the server closed (a restart,
    before the loop has read its end) or one out of step has something to read."""
    writer = open_writer(connection)
    return None if writer is None or _has_unread(writer) else writer


def _has_unread(writer: asyncio.StreamWriter) -> bool:
    """Has the socket something (data, its end, an error) the loop has not read yet?"""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


async def refresh(connection: Any) -> None:
    """Connect ``connection`` (idle: nothing asked on it) again if it was dropped or the
    server closed it (a restart, its idle timeout): a command sent there would be lost.
    redis-py's pool does not always check (it skips it when maintenance notifications
    may be on)."""
    if connection.is_connected and await _stale(connection):
        await connection.disconnect()
    if not connection.is_connected:
        await connection.connect()


async def _stale(connection: Any) -> bool:
    """Closed by the server, failed, or holding a stray reply (unread on the socket, or
    read but not parsed: redis-py's own check)."""
    writer = getattr(connection, "_writer", None)
    if isinstance(writer, asyncio.StreamWriter) and idle_writer(connection) is None:
        return True
    return bool(await connection.can_read())


def describe(error: BaseException) -> str:
    """The error's class and message: redis-py's own ``repr`` keeps only a category."""
    text = str(error)
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


# FUNCTION LOAD refused: an older server, or a user without the permission
NO_FUNCTIONS = re.compile(
    r"unknown command|unknown subcommand|NOPERM|no permissions", re.IGNORECASE
)


def forgotten(reply: Any) -> bool:
    """Did the server answer that it does not know the function or the script?"""
    return isinstance(reply, NoScriptError) or (
        isinstance(reply, ResponseError) and "Function not found" in str(reply)
    )


UNREACHABLE = (RedisConnectionError, RedisTimeoutError, TimeoutError, OSError)
UNREADY = (BusyLoadingError, ReadOnlyError, ClusterDownError, MasterDownError, TryAgainError)
# at the start (Redis 7) or after "-" inside a script error's text (Redis 6)
_UNREADY_TEXT = re.compile(r"(?:^|-)(?:BUSY|MASTERDOWN|READONLY|LOADING|CLUSTERDOWN|TRYAGAIN)\b")


def demoted(answers: list[Any]) -> bool:
    """Did a call or a record fail because the server is a replica (``READONLY``)? A
    function that may write is refused whole by a replica; a script, record by record."""
    for answer in answers:
        if isinstance(answer, ReadOnlyError):
            return True
        if isinstance(answer, list):
            for item in answer:
                if item.__class__ is str and item.startswith("error: ") and "READONLY" in item:
                    return True
    return False


def is_unready(error: ResponseError) -> bool:
    # redis-py turns these replies into their own classes and strips the prefix; an
    # error reported by the script for one record keeps it
    return isinstance(error, UNREADY) or _UNREADY_TEXT.search(str(error)) is not None
