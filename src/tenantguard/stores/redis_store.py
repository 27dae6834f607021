"""Counters in Redis, Redis Cluster or a Sentinel-managed Redis.

Every decision is one record of a call of ``counters.lua`` (a Redis function, or a script
where the server allows none), which ports the pure algorithms line for line. All of a
decision's keys carry the tenant's ``{hash tag}``, so they share a cluster slot and one
call can touch them atomically; the tenant's own counters are the fields of one hash.
Concurrent decisions from one process are gathered into one call (on a cluster: one per
slot, pipelined per node), so throughput grows with concurrency: the round trip, the
command and the call's set-up are paid once per batch instead of once per check. A
circuit breaker stops waiting on a dead server and probes for its return; every failure
surfaces as ``StoreError`` for the guard to handle by policy.

URLs: ``redis://host:port/db``, ``rediss://…`` (TLS), ``redis+cluster://host:port`` (any
seed node), ``redis+sentinel://host:port[,host:port]/service[/db]``. Query options:
``timeout`` (seconds per call, default 0.25) and ``clock`` (``server``, the default:
the script reads Redis ``TIME`` so every replica shares one clock; ``local``: the
caller's ``now`` is used, which is what tests inject).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import Awaitable, Sequence
from functools import partial
from importlib import resources
from typing import Any
from urllib.parse import SplitResult, parse_qs, unquote, urlsplit, urlunsplit

from hiredis import pack_command
from redis import asyncio as aioredis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import (
    AskError,
    MovedError,
    ReadOnlyError,
    RedisError,
    ResponseError,
    TryAgainError,
)

from tenantguard._metrics import STORE_ERRORS
from tenantguard.algorithms import Outcome
from tenantguard.errors import StoreError
from tenantguard.stores._base import CounterSpec
from tenantguard.stores._breaker import CircuitBreaker
from tenantguard.stores._redis_conn import (
    NO_FUNCTIONS,
    UNREACHABLE,
    ask,
    demoted,
    describe,
    forgotten,
    idle_writer,
    is_unready,
    refresh,
)
from tenantguard.stores._redis_records import (
    CACHED,
    counter_key,
    hash_tag,
    layout,
    outcomes_of,
    record_answer,
    record_head,
    table_part,
)

__all__ = ["RedisCounters", "counter_key"]

_log = logging.getLogger("tenantguard.redis")

_SOURCE = resources.files("tenantguard.stores").joinpath("counters.lua").read_text()
# As a Redis function (Redis 7+): loaded once, what it parses stays parsed between calls.
# The name carries the version, so replicas running two versions (a rolling upgrade)
# each call their own, and none replaces the other's.
FUNCTION = "tenantguard_" + hashlib.sha256(_SOURCE.encode()).hexdigest()[:16]
# Releases and refunds only give back: they may run when Redis is out of memory
# (maxmemory with noeviction), where a function that may write is refused whole.
FREEING = FUNCTION + "_free"
LIBRARY = (
    f"#!lua name={FUNCTION}\n{_SOURCE}\nredis.register_function('{FUNCTION}', run)\n"
    f"redis.register_function{{function_name='{FREEING}', callback=run, flags={{'allow-oom'}}}}\n"
)
# As a script, where functions are not to be had (Redis 6, no FUNCTION permission)
SCRIPT = f"{_SOURCE}\nreturn run(script_inputs())\n"


def _check_address(parts: SplitResult) -> None:
    """redis-py reads a URL without a host as the default server, a database that is
    not a number as database 0, and ``unix://path`` (two slashes) without its first
    part: each would count somewhere else than meant."""
    if parts.scheme == "unix":
        if parts.netloc.rpartition("@")[2] or not parts.path:
            raise ValueError(
                f"{urlunsplit(parts)}: a socket's path goes after three slashes, as in"
                " unix:///var/run/redis.sock"
            )
        return
    if not parts.hostname:
        raise ValueError(
            f"no host in the {parts.scheme}:// URL (its path is {parts.path!r});"
            f" expected {parts.scheme}://host:port/…"
        )
    pieces = [piece for piece in parts.path.split("/") if piece]
    if parts.scheme == "redis+sentinel":
        pieces = pieces[1:]  # the service name comes first
    for db in pieces[:1]:
        if not re.fullmatch("[0-9]+", db):
            raise ValueError(f"/{db}: a Redis database is a number, such as /0")


# records per script call: enough to amortise the call, few enough that one call holds
# Redis (single-threaded) for no more than a few milliseconds
MAX_BATCH = 256
# At most SPLIT batches are in flight, each on a connection of its own (a lane, on a
# single server): the callers of one reply run (and queue their next checks) while Redis
# works on the other, so client and server overlap instead of taking turns. Calls made
# while every lane is busy wait for one to come back and go out together, so under load
# batches grow instead of multiplying. A batch goes out as soon as it holds a third of
# the busy callers' calls (at least EAGER) and a lane is free, written at once rather
# than at the end of the loop's turn: Redis starts on it while the rest of the turn's
# callers run, and the next batch follows after them. (A turn's calls cut into batches
# written together would be read by Redis together and answered together: client and
# server would take turns, in lockstep.)
SPLIT = 2
EAGER = 8
BATCHES = SPLIT + 1  # batches the busy callers' calls are cut into (see _answer)
# a single server's pool: the lanes, a lane replacing a dropped one, a health check
MIN_CONNECTIONS = SPLIT + 2
# a route's specs, its words when every counter is the tenant's own, its usual record
_Route = tuple[tuple[CounterSpec, ...], list[str], list[str]]
RELEARN_EVERY = 1.0  # seconds between cluster map refreshes after connection failures


class _Call:
    """One record of a batch: its keys and its words (see ``counters.lua``). ``decided``:
    the caller wants the reply as outcomes, converted when it arrives. ``frees``: a
    release or refund, which only gives back."""

    __slots__ = ("args", "decided", "frees", "future", "keys")

    def __init__(
        self,
        keys: list[str],
        args: list[str],
        future: asyncio.Future[Any],
        decided: bool,
        frees: bool,
    ) -> None:
        self.keys = keys
        self.args = args
        self.future = future
        self.decided = decided
        self.frees = frees


class RedisCounters:
    """The ``CounterStore`` on Redis. Build with ``RedisCounters.from_url``."""

    def __init__(
        self,
        client: Any,
        *,
        cluster: bool = False,
        timeout: float = 0.25,
        server_clock: bool = True,
        breaker: CircuitBreaker | None = None,
    ) -> None:
        self._client = client
        self._cluster = cluster
        self._timeout = timeout
        self._server_clock = server_clock
        self.breaker = breaker or CircuitBreaker()
        # how records are sent: ("FCALL", FUNCTION) or ("EVALSHA", sha); None until loaded
        self._command: tuple[str, str] | None = None
        self._queue: list[_Call] = []
        self._scheduled = False
        self._queued_at = 0.0  # when the oldest queued call was made (loop time)
        self._eager = EAGER  # queued calls that go out at once if a slot is free
        self._loading = asyncio.Lock()
        self._loads = 0  # loads of the counters so far
        self._pinging: asyncio.Task[bool] | None = None
        self._last_error = ""  # the last failure's description, for refused calls
        self._callers = 0  # busy callers, as last seen (see _answer)
        # the batch in flight on each of the SPLIT slots (None: free); on a single server
        # each slot has a lane, a connection kept from the pool for its batches alone
        self._slots: list[list[_Call] | None] = [None] * SPLIT
        self._lanes: list[Any] = [None] * SPLIT
        self._tasks: set[asyncio.Task[Any]] = set()
        self._node_options: dict[str, Any] = {}
        self._node_url = ("redis", "", "")  # scheme, user info, query of the nodes' URLs
        self._nodes: dict[str, Any] = {}  # cluster: a plain client per node, for pipelines
        self._owned: list[Any] = []  # other clients to close with this store (sentinels)
        self._routes: dict[int, _Route] = {}
        self._hashes: dict[str, list[str]] = {}  # tenant -> [the key of its hash]
        self._relearning = False
        self._relearned_at = -RELEARN_EVERY

    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisCounters:
        parts = urlsplit(url)
        query = {key: values[-1] for key, values in parse_qs(parts.query).items()}
        raw_timeout = query.pop("timeout", options.pop("timeout", 0.25))
        try:
            timeout = float(raw_timeout)
        except (TypeError, ValueError):
            raise ValueError(f"timeout={raw_timeout!r}: expected seconds, such as 0.25") from None
        if not 0 < timeout < float("inf"):
            raise ValueError(f"timeout={raw_timeout!r}: expected a positive number of seconds")
        clock = query.pop("clock", "server")
        if clock not in ("server", "local"):
            raise ValueError(f"clock={clock!r}: expected server or local")
        common: dict[str, Any] = {
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "decode_responses": True,
        }
        rest = "&".join(f"{key}={value}" for key, value in query.items())
        credentials: dict[str, Any] = {
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password else None,
        }
        try:
            return cls._open(parts, common, rest, credentials, timeout, clock, options)
        except TypeError as error:
            # redis-py takes any query option as a keyword, and refuses it only when a
            # connection is made: say so now, naming it
            found = re.search(r"argument '(\w+)'", str(error))
            name = found.group(1) if found else str(error)
            if name.startswith("ssl") and not parts.scheme.startswith("rediss"):
                raise ValueError(f"{name}: a TLS option, for rediss:// URLs") from None
            raise ValueError(f"{name}: not an option of a Redis URL") from None

    @classmethod
    def _open(
        cls,
        parts: SplitResult,
        common: dict[str, Any],
        rest: str,
        credentials: dict[str, Any],
        timeout: float,
        clock: str,
        options: dict[str, Any],
    ) -> RedisCounters:
        extras: list[Any] = []  # clients to close beside the main one (sentinels)
        scheme = parts.scheme
        if scheme in ("redis", "rediss", "unix"):
            _check_address(parts)
            plain = urlunsplit((scheme, parts.netloc, parts.path, rest, ""))
            client: Any = aioredis.Redis.from_url(plain, **common)
            pool = client.connection_pool
            pool.connection_class(**pool.connection_kwargs)  # unknown options raise here
            cluster = False
        elif scheme in ("redis+cluster", "rediss+cluster"):
            _check_address(parts)
            plain = urlunsplit((scheme.split("+")[0], parts.netloc, parts.path, rest, ""))
            client = RedisCluster.from_url(plain, **common)
            cluster = True
        elif scheme == "redis+sentinel":
            _check_address(parts)
            hosts = []
            for host in parts.netloc.rpartition("@")[2].split(","):
                name, _, port = host.partition(":")
                hosts.append((name, int(port or 26379)))
            pieces = [piece for piece in parts.path.split("/") if piece]
            if not pieces:
                raise ValueError("redis+sentinel:// needs the service name: /service[/db]")
            db = int(pieces[1]) if len(pieces) > 1 else 0
            sentinel = Sentinel(hosts, **common)  # type: ignore[no-untyped-call]
            # the URL's credentials are the master's, as for the other schemes
            client = sentinel.master_for(pieces[0], db=db, **common, **credentials)
            cluster = False
            extras = list(sentinel.sentinels)
        else:
            raise ValueError(
                f"counter store {scheme!r} is not supported; expected memory, redis, rediss, "
                "redis+cluster or redis+sentinel"
            )
        if not cluster:
            wanted = client.connection_pool.max_connections
            if wanted < MIN_CONNECTIONS:
                raise ValueError(
                    f"max_connections={wanted}: the counters may need {MIN_CONNECTIONS} "
                    f"connections at once ({SPLIT} kept for their batches, one replacing a "
                    f"dropped one, one for a health check): at least {MIN_CONNECTIONS}"
                )
        store = cls(
            client, cluster=cluster, timeout=timeout, server_clock=clock == "server", **options
        )
        # a cluster's pipelines go to each node through a client of its own, made from
        # the same URL (credentials, TLS and other options) as the cluster client
        userinfo = parts.netloc.rpartition("@")[0]
        store._node_url = (scheme.split("+")[0], userinfo, rest)
        store._node_options = common
        store._owned = extras
        return store

    # -- the CounterStore interface -------------------------------------------------------

    def apply(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        now: float,
        tenant: str = "",
    ) -> Awaitable[list[Outcome]]:
        """Not a coroutine: the usual check gets the batch's future itself, one coroutine
        frame fewer to create and resume per decision (they cost more than the record)."""
        clock = "" if self._server_clock else repr(now)
        if tenant and isinstance(specs, tuple) and keys.count(tenant) == len(keys):
            # the common case, every counter keyed by the tenant alone: all of them are
            # fields of the tenant's hash, and the route's words are the same every time
            route = self._routes.get(id(specs))
            if route is None or route[0] is not specs:
                route = self._learn(specs)
            if route[1]:
                hashed = self._hashes.get(tenant) or self._hash_of(tenant)
                if clock or cost != 1 or lease:
                    args = record_head("apply", clock, cost, lease, 1, route[1])
                else:
                    args = route[2]
                return self._call(hashed, args, True)
        return self._apply(specs, keys, cost, lease, clock, tenant)

    async def _apply(
        self,
        specs: Sequence[CounterSpec],
        keys: Sequence[str],
        cost: int,
        lease: str | None,
        clock: str,
        tenant: str,
    ) -> list[Outcome]:
        places = [
            counter_key(tenant or key, spec[0], key, scoped=bool(tenant) and spec[6])
            for spec, key in zip(specs, keys, strict=True)
        ]
        redis_keys, words = layout(specs, places)
        if self._cluster and len({hash_tag(key) for key in redis_keys}) > 1:
            return await self._apply_across_slots(specs, places, cost, lease, clock)
        args = record_head("apply", clock, cost, lease, len(redis_keys), words)
        outcomes: list[Outcome] = await self._call(redis_keys, args, decided=True)
        return outcomes

    async def release(self, table: str, key: str, lease: str, now: float, tenant: str = "") -> None:
        place = counter_key(tenant or key, table, key, scoped=bool(tenant))
        clock = "" if self._server_clock else repr(now)
        release = CounterSpec(table, "concurrency", 0.0, 0, 0, True)
        redis_keys, words = layout((release,), [place])
        await self._call(redis_keys, record_head("release", clock, 0, lease, 1, words), frees=True)

    async def close(self) -> None:
        # calls still queued behind the batches in flight go out when those come back:
        # answer them all before the connections close
        while self._tasks or self._queue:
            self._send_queued()
            if not self._tasks:
                # queued with no batch to wait for (cannot happen): fail them, never spin
                queued, self._queue = self._queue, []
                self._fail(queued, RedisError("counter store closed"))
                break
            await asyncio.gather(*self._tasks, return_exceptions=True)
        lanes = [lane for lane in self._lanes if lane is not None]
        self._lanes = [None] * SPLIT
        for lane in lanes:  # a single server's: back to the pool, which closes them
            await self._client.connection_pool.release(lane)
        for other in (*self._nodes.values(), *self._owned):
            await other.aclose()
        await self._client.aclose()

    async def ping(self) -> bool:
        """Does Redis answer within the timeout? Health checks made meanwhile share one
        ping, so overlapping probes need one connection, not one each."""
        pinging = self._pinging
        if pinging is None or pinging.done():
            pinging = asyncio.get_running_loop().create_task(self._ping())
            self._pinging = pinging
            self._tasks.add(pinging)
            pinging.add_done_callback(self._tasks.discard)
        # shielded: a probe that gives up does not cancel the others' answer
        return await asyncio.shield(pinging)

    async def _ping(self) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                if self._cluster:
                    return bool(await self._client.ping())
                # on a checked connection: a pooled one the server closed (a restart, its
                # idle timeout) would answer "down" once while checks count normally
                pool = self._client.connection_pool
                connection = await pool.get_connection()
                try:
                    await refresh(connection)
                    return bool(await ask(connection, "PING"))
                finally:
                    await pool.release(connection)
        except (RedisError, OSError, TimeoutError):
            return False

    # -- internals ------------------------------------------------------------------------

    def _learn(self, specs: tuple[CounterSpec, ...]) -> _Route:
        """A route's words when all its counters are the tenant's own (else empty), and
        its whole record for the usual call (server clock, cost 1, no lease). Keyed by
        the route's specs tuple itself, which the entry holds so its id stays its own:
        hashing the specs' contents on every check would cost more than the words."""
        words: list[str] = []
        if all(spec.scoped for spec in specs):
            words = layout(specs, [("", table_part(spec.table)) for spec in specs])[1]
        route = (specs, words, record_head("apply", "", 1, None, 1, words))
        if len(self._routes) >= CACHED:
            self._routes.clear()
        self._routes[id(specs)] = route
        return route

    def _hash_of(self, tenant: str) -> list[str]:
        """The keys of a record on the tenant's hash alone (read only, so shared)."""
        hashed = [counter_key(tenant, "", tenant, scoped=True)[0]]
        if len(self._hashes) >= CACHED:
            self._hashes.clear()
        self._hashes[tenant] = hashed
        return hashed

    async def _apply_across_slots(
        self,
        specs: Sequence[CounterSpec],
        places: list[tuple[str, str]],
        cost: int,
        lease: str | None,
        clock: str,
    ) -> list[Outcome]:
        """Cluster only: a decision whose rules live in several slots (a rule keyed by IP
        alone, say) is applied slot by slot. If a later slot denies, the earlier slots
        are refunded (a commutative give-back, exact even when other decisions wrote in
        between), so the decision counts nothing; the rest are answered without writing."""
        groups: dict[str, list[int]] = {}
        for index, (key, _field) in enumerate(places):
            groups.setdefault(hash_tag(key), []).append(index)
        outcomes: list[Outcome | None] = [None] * len(specs)
        taken: list[tuple[list[str], list[str]]] = []
        blocked = False
        try:
            for indices in groups.values():
                chosen = [specs[i] for i in indices]
                keys, words = layout(chosen, [places[i] for i in indices])
                op = "probe" if blocked else "apply"
                reply = await self._call(
                    keys, record_head(op, clock, cost, lease, len(keys), words)
                )
                answered = outcomes_of(reply)
                for i, outcome in zip(indices, answered, strict=True):
                    outcomes[i] = outcome
                if blocked:
                    continue
                if any(not o[0] and s[5] for o, s in zip(answered, chosen, strict=True)):
                    blocked = True
                else:
                    # refund what was counted (not shadow denials), at its own instant
                    kept = [indices[j] for j, outcome in enumerate(answered) if outcome[0]]
                    if kept:
                        back, words = layout([specs[i] for i in kept], [places[i] for i in kept])
                        words = record_head("refund", str(reply[0]), cost, lease, len(back), words)
                        taken.append((back, words))
        except StoreError:
            # a later slot failed: the decision is made without the store, so what the
            # earlier slots counted must not stay counted either
            await self._give_back(taken)
            raise
        if blocked:
            await self._give_back(taken)
        return [outcome for outcome in outcomes if outcome is not None]

    async def _give_back(self, taken: list[tuple[list[str], list[str]]]) -> None:
        """Refund each slot's share; best effort, since a slot that cannot be reached
        now cannot be refunded now either (its counts end with their window)."""
        for keys, words in taken:
            with contextlib.suppress(StoreError):
                await self._call(keys, words, frees=True)

    def _call(
        self, keys: list[str], args: list[str], decided: bool = False, frees: bool = False
    ) -> asyncio.Future[Any]:
        """Queue one record for the next batch; its future is the reply (a list of
        outcomes if ``decided``). A future rather than a coroutine: see ``apply``."""
        loop = asyncio.get_running_loop()
        if not self.breaker.allow():
            STORE_ERRORS.labels(store="redis", kind="circuit_open").inc()
            failed: asyncio.Future[Any] = loop.create_future()
            failed.set_exception(
                StoreError(
                    "counter store circuit is open after repeated failures"
                    f" (last: {self._last_error})"
                )
            )
            return failed
        call = _Call(keys, args, loop.create_future(), decided, frees)
        queue = self._queue
        if not queue:
            self._queued_at = loop.time()
        queue.append(call)
        if len(queue) >= self._eager:
            self._send_queued()
        elif not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._flush)
        return call.future

    def _flush(self) -> None:
        """At the end of the loop's turn: send what the turn queued, if a slot is free
        (else the first batch to come back sends it)."""
        self._scheduled = False
        self._send_queued()

    def _send_queued(self) -> None:
        slots = self._slots
        if not self._queue or None not in slots:
            return
        slot = slots.index(None)
        batch, self._queue = self._queue, []
        slots[slot] = batch
        # a call's one timeout counts from when it was made, time queued included
        deadline = self._queued_at + self._timeout
        loop = asyncio.get_running_loop()
        written = None
        if not self._cluster and loop.time() < deadline:
            try:
                written = self._write_now(slot, batch)
            except Exception:
                # not written, or not wholly: the task sends it on a fresh connection
                _log.exception("Redis counters: a batch could not be written")
                self._drop_lane(slot, loop)
        task = loop.create_task(self._send(batch, deadline, slot, written))
        self._tasks.add(task)
        task.add_done_callback(partial(self._sent, batch, slot))

    def _write_now(self, slot: int, batch: list[_Call]) -> list[list[int]] | None:
        """Write ``batch`` on its lane now, if the lane is open and the counters are
        loaded: the groups written, else None (the batch's task connects, loads and
        writes). Writing here rather than in the task saves the task's first turn."""
        connection = self._lanes[slot]
        if connection is None or self._command is None:
            return None
        writer = idle_writer(connection)
        if writer is None:
            # closed by the server (a restart), maybe before the loop has read its end:
            # the task's connection check comes after the loop's next look at the socket
            return None
        groups = _grouped(batch)
        writer.write(self._packed(batch, groups))
        return groups

    def _release(self, slot: int, batch: list[_Call]) -> None:
        """Free the slot ``batch`` held (once: it may hold another batch by now) and send
        the calls that waited for it."""
        if self._slots[slot] is batch:
            self._slots[slot] = None
            self._send_queued()

    async def _send(
        self, batch: list[_Call], deadline: float, slot: int, written: list[list[int]] | None
    ) -> None:
        try:
            if written is None and asyncio.get_running_loop().time() >= deadline:
                # queued past its timeout (behind slow batches, or in a process busier
                # than the timeout): do not send what no one waits for (it would count).
                # The server was not asked, so this says nothing of it to the breaker;
                # the batches ahead, if slow, report for themselves
                STORE_ERRORS.labels(store="redis", kind="expired_unsent").inc()
                error = TimeoutError(
                    f"not sent: queued for longer than the timeout ({self._timeout:g} s)"
                )
                for call in batch:
                    _settle(call, error, f"counter store failed: {describe(error)}")
                return
            try:
                # a timeout scope, not wait_for: no extra task per batch on the hot path
                async with asyncio.timeout_at(deadline):
                    replies = await self._pipeline(batch, slot, written)
            except Exception as error:
                if isinstance(error, TimeoutError) and not str(error):
                    error = TimeoutError(
                        f"no answer within the timeout ({self._timeout:g} s from the check,"
                        " time queued in this process included)"
                    )
                self._fail(batch, error)
                if self._cluster and isinstance(error, UNREACHABLE):
                    self._relearn_slots()
                return
            self._answer(batch, replies)
        finally:
            # before the callers this batch woke run: those that check again may use it
            self._release(slot, batch)

    def _answer(self, batch: list[_Call], replies: list[Any]) -> None:
        # its callers are about to check again. The calls in flight and queued now are
        # about as many as there are busy callers (a high-water mark, slowly forgotten,
        # as some may be running): a third of them makes a batch
        active = len(self._queue) + sum(len(b) for b in self._slots if b is not None)
        self._callers = max(active, self._callers * 63 // 64)
        self._eager = max(EAGER, self._callers // BATCHES)
        unready = [
            r
            for r in replies
            if r.__class__ is not list and isinstance(r, ResponseError) and is_unready(r)
        ]
        if unready:
            # the server answers but cannot serve (loading, a replica after failover,
            # cluster down): an outage for the breaker, not a success. The calls it did
            # answer still get their answers: what they counted stays counted.
            self._outage(unready[0])
        else:
            self._answered()
        for call, reply in zip(batch, replies, strict=True):
            if isinstance(reply, Exception):
                what = "counter store failed" if reply in unready else "counter script failed"
                _settle(call, reply, f"{what}: {describe(reply)}")
            elif not call.future.done():
                answer = reply
                if call.decided:
                    try:
                        answer = outcomes_of(reply)
                    except (TypeError, ValueError) as error:
                        _settle(call, error, f"counter script answered {str(reply)[:80]!r}")
                        continue
                call.future.set_result(answer)

    def _node_client(self, host: str, port: int) -> Any:
        scheme, userinfo, query = self._node_url
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        netloc = f"{userinfo}@{address}" if userinfo else address
        url = urlunsplit((scheme, netloc, "", query, ""))
        return aioredis.Redis.from_url(url, **self._node_options)

    def _relearn_slots(self) -> None:
        """A node did not answer: it may have died and its slots gone to another. Redis
        only says MOVED from a live node, so ask the cluster for its map again (at most
        once a second, in the background) instead of waiting on the dead one forever."""
        loop = asyncio.get_running_loop()
        if self._relearning or loop.time() < self._relearned_at + RELEARN_EVERY:
            return
        self._relearning = True
        self._relearned_at = loop.time()

        async def relearn() -> None:
            try:
                await self._client.nodes_manager.initialize()
            except (RedisError, OSError, TimeoutError):
                pass  # every node is down: the next failure tries again
            finally:
                self._relearning = False

        task = loop.create_task(relearn())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _sent(self, batch: list[_Call], slot: int, task: asyncio.Task[None]) -> None:
        """A batch task cancelled (even before it began) never reaches its ``except``:
        fail its calls here, or their checks would wait forever and a probe among them
        would never report to the breaker."""
        self._tasks.discard(task)
        if task.cancelled():
            self._fail(batch, asyncio.CancelledError())
            if self._slots[slot] is batch:
                # cancelled before it began: what was written is never read, so the
                # lane's replies would be out of step with its calls
                self._drop_lane(slot, task.get_loop())
        elif (error := task.exception()) is not None:
            # a fault of this module's own: still, no caller may be left waiting
            self._fail(batch, error)
        self._release(slot, batch)

    def _drop_lane(self, slot: int, loop: asyncio.AbstractEventLoop) -> None:
        """Stop using the slot's connection (it may hold unread replies): closed and
        given back to the pool in the background; the slot's next batch takes another."""
        lane = self._lanes[slot]
        if lane is None:
            return
        self._lanes[slot] = None
        retiring = loop.create_task(self._retire(lane))
        self._tasks.add(retiring)
        retiring.add_done_callback(self._tasks.discard)

    async def _retire(self, connection: Any) -> None:
        await connection.disconnect(nowait=True)
        await self._client.connection_pool.release(connection)

    def _outage(self, error: BaseException) -> None:
        """One failure for the breaker, one for the metric; the log says when the
        breaker opens, and why, so an operator can tell a misconfiguration (a password,
        a permission) from a passing outage."""
        was = self.breaker.state
        self.breaker.failure()
        kind = "timeout" if isinstance(error, TimeoutError) else type(error).__name__
        STORE_ERRORS.labels(store="redis", kind=kind).inc()
        self._last_error = describe(error)
        # once per outage: a failed probe (half-open) opens it again without a word
        if was == "closed" and self.breaker.state == "open":
            _log.warning("Redis counters unavailable, circuit open: %s", self._last_error)

    def _answered(self) -> None:
        if self.breaker.state != "closed":
            _log.warning("Redis counters answer again, circuit closed")
        self.breaker.success()

    def _fail(self, batch: list[_Call], error: BaseException) -> None:
        """One failed batch: one outage, a ``StoreError`` per call."""
        self._outage(error)
        for call in batch:
            _settle(call, error, f"counter store failed: {describe(error)}")

    async def _pipeline(
        self, batch: list[_Call], slot: int, written: list[list[int]] | None
    ) -> list[Any]:
        # a single server's batch goes on its lane, loads included: the lane is checked
        # (and connected again if need be) before anything is sent on it
        lane = None
        if not self._cluster:
            lane = self._lanes[slot] if written is not None else await self._lane(slot)
        if self._command is None:
            await self._ensure_loaded(lane, 0)
        seen = self._loads
        replies = await self._execute(batch, lane, written)
        missing = [
            i for i, reply in enumerate(replies) if reply.__class__ is not list and forgotten(reply)
        ]
        if missing:
            # a restart (without persistence), a failover or a flush forgot the function or
            # the script: load it again, resend those calls
            await self._ensure_loaded(lane, seen)
            again = await self._execute([batch[i] for i in missing], lane, None)
            for i, reply in zip(missing, again, strict=True):
                replies[i] = reply
        return replies

    async def _ensure_loaded(self, lane: Any, seen: int) -> None:
        """Load the counters, unless another batch did since load number ``seen`` (0:
        none yet): the batches in flight after a restart load them once."""
        async with self._loading:
            if self._loads == seen:
                self._command = await self._load(lane)
                self._loads += 1

    async def _load(self, lane: Any) -> tuple[str, str]:
        """Load the counters as a function if the server has them, else as a script; on
        a single server, on the batch's lane (a pooled connection may be one the server
        closed when it restarted, which redis-py would not notice before using it)."""
        try:
            if lane is None:
                await self._client.function_load(LIBRARY, replace=True)
            else:
                await ask(lane, "FUNCTION", "LOAD", "REPLACE", LIBRARY)
        except ReadOnlyError:
            # a replica, such as a demoted master: drop its connections, so the next ones
            # ask Sentinel (or DNS) where the master is now
            if not self._cluster:
                await self._client.connection_pool.disconnect()
            raise
        except ResponseError as error:
            if not NO_FUNCTIONS.search(str(error)):
                raise
            refused = describe(error)
        else:
            _log.info("Redis counters loaded as the function library %s", FUNCTION)
            return "FCALL", FUNCTION
        if lane is None:
            loaded = await self._client.script_load(SCRIPT)
        else:
            loaded = await ask(lane, "SCRIPT", "LOAD", SCRIPT)
        # a cluster loads it on every primary and may answer per node
        sha = next(iter(loaded.values())) if isinstance(loaded, dict) else loaded
        _log.info("Redis counters loaded as the script %s (no function: %s)", sha, refused)
        return "EVALSHA", str(sha)

    async def _execute(
        self, batch: list[_Call], lane: Any, written: list[list[int]] | None
    ) -> list[Any]:
        """One reply per call: the record's answer or the exception that stopped it."""
        replies: list[Any] = [None] * len(batch)
        if lane is not None:
            # a single server; what ``_write_now`` wrote is only read here
            if written is None:
                written = _grouped(batch)
                packed = self._packed(batch, written)
                await lane.send_packed_command(packed, check_health=False)
            await self._exchange(lane, batch, written, replies)
            return replies
        # a cluster script may only touch one slot: a call per hash tag, pipelined per node
        tags: dict[tuple[str, bool], list[int]] = {}
        for index, call in enumerate(batch):
            tags.setdefault((hash_tag(call.keys[0]), call.frees), []).append(index)
        nodes: dict[str, list[list[int]]] = {}
        owners: dict[str, Any] = {}
        for indices in tags.values():
            node = self._client.get_node_from_key(batch[indices[0]].keys[0])
            for chunk in _chunks(indices):
                nodes.setdefault(node.name, []).append(chunk)
            owners[node.name] = node

        async def run(name: str, groups: list[list[int]]) -> None:
            node = owners[name]
            client = self._nodes.get(name)
            if client is None:
                client = self._node_client(node.host, node.port)
                self._nodes[name] = client
            await self._send_pooled(client, batch, groups, replies)

        await asyncio.gather(*(run(name, groups) for name, groups in nodes.items()))
        moved = [
            i
            for i, reply in enumerate(replies)
            if isinstance(reply, MovedError | AskError | TryAgainError)
        ]
        if moved:
            # slots moved (resharding, failover), or a slot is migrating and a group's keys
            # sit on both sides (TRYAGAIN): learn the new map, and let the cluster client
            # follow redirects and retry for these few, one call each
            await self._client.nodes_manager.initialize()
            for i in moved:
                call = batch[i]
                try:
                    answer = await self._client.execute_command(
                        *self._command_for(call), len(call.keys), *call.keys, *call.args
                    )
                    replies[i] = record_answer(answer[0])
                except ResponseError as error:
                    replies[i] = error
        return replies

    async def _lane(self, slot: int) -> Any:
        """The slot's connection, taken from the pool once and kept; connected again if
        it was dropped after a fault or the server closed it (a restart, its idle
        timeout): a command sent there would be lost."""
        connection = self._lanes[slot]
        if connection is None:
            connection = await self._client.connection_pool.get_connection()
            # a lane is read only within its batch's own deadline: redis-py's timeout per
            # read would be a second timer on every read
            connection.socket_timeout = None
            self._lanes[slot] = connection
        await refresh(connection)
        return connection

    async def _send_pooled(
        self, client: Any, batch: list[_Call], groups: list[list[int]], replies: list[Any]
    ) -> None:
        """Cluster: ``groups`` of ``batch`` on a connection of a node's pool."""
        packed = self._packed(batch, groups)
        pool = client.connection_pool
        connection = await pool.get_connection()
        try:
            await refresh(connection)
            await connection.send_packed_command(packed, check_health=False)
            await self._exchange(connection, batch, groups, replies)
        finally:
            await pool.release(connection)

    def _command_for(self, call: _Call) -> tuple[str, str]:
        """The command and name that run ``call``: releases and refunds as FREEING."""
        kind, name = self._command or ("FCALL", FUNCTION)
        return kind, FREEING if kind == "FCALL" and call.frees else name

    def _packed(self, batch: list[_Call], groups: list[list[int]]) -> bytes:
        """One script call per group of ``batch``'s calls, for one write.

        Packed by hiredis in C: redis-py's asyncio client packs in Python, argument by
        argument, which cost more than everything else a batched decision does."""
        packed = []
        for group in groups:
            keys: list[str] = []
            args: list[str] = []
            for i in group:
                call = batch[i]
                keys += call.keys
                args += call.args
            # hiredis's stub types the tuple as one item; any length is accepted
            command: Any = (*self._command_for(batch[group[0]]), len(keys), *keys, *args)
            packed.append(pack_command(command))
        return b"".join(packed)

    async def _exchange(
        self, connection: Any, batch: list[_Call], groups: list[list[int]], replies: list[Any]
    ) -> None:
        """Read the answers to ``groups`` (written on ``connection``): each call's reply
        goes to its index in ``replies``."""
        answers: list[Any] = []
        try:
            for _ in groups:
                try:
                    answers.append(await connection.read_response())
                except ResponseError as error:
                    answers.append(error)
            if demoted(answers):
                # writes refused by a replica: this connection reached a demoted master.
                # Drop it, so the next one asks Sentinel (or DNS) where the master is now
                await connection.disconnect(nowait=True)
        except BaseException:
            # a read cut short (timeout, cancel, I/O): the stream is out of step
            await connection.disconnect(nowait=True)
            raise
        for group, answer in zip(groups, answers, strict=True):
            if isinstance(answer, Exception):
                for i in group:
                    replies[i] = answer
            elif not isinstance(answer, list) or len(answer) != len(group):
                # not the reply of this call: whatever the connection holds is suspect
                await connection.disconnect(nowait=True)
                raise RedisError(f"a batch of {len(group)} answered {str(answer)[:80]!r}")
            else:
                # records answer lists; only texts may be a record's failure
                for i, item in zip(group, answer, strict=True):
                    replies[i] = record_answer(item) if item.__class__ is str else item


def _chunks(items: list[Any]) -> list[list[Any]]:
    return [items[start : start + MAX_BATCH] for start in range(0, len(items), MAX_BATCH)]


def _grouped(batch: list[_Call]) -> list[list[int]]:
    """A single server's script calls for ``batch``, by index: up to MAX_BATCH records
    each; releases and refunds in calls of their own (FREEING), in the same write."""
    if len(batch) <= MAX_BATCH and not any(call.frees for call in batch):
        return [list(range(len(batch)))]
    keep = [i for i, call in enumerate(batch) if not call.frees]
    free = [i for i, call in enumerate(batch) if call.frees]
    return _chunks(keep) + _chunks(free)


def _settle(call: _Call, cause: BaseException, message: str) -> None:
    """Fail one caller (unless it gave up already) with a ``StoreError`` caused by ``cause``."""
    if not call.future.done():
        error = StoreError(message)
        error.__cause__ = cause
        call.future.set_exception(error)
