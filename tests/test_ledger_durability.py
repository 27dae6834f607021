"""The ledger never loses an acknowledged change and never counts one twice.

Both durable ledgers (SQLite in a temp file, PostgreSQL from the session's server) are
driven by real OS processes (spawned, so nothing is shared but the database):

* Eight workers race for one entity cap, every acquire with its own idempotency key and
  every acquire sent twice, as a client that retries would: half the time the retry waits
  for the first answer, half the time both copies are in flight together. The cap admits
  exactly ``LIMIT`` keys, each admitted key sees its own count (1…LIMIT, no two alike),
  every refusal sees the cap full, and every key's two answers agree (one of them a replay).
* A client acquires with keys ``k0, k1, …`` one after another and reports each key after
  ``change_usage`` returned; it is killed with SIGKILL once it has reported at least
  ``CRASH_AFTER``. Reopened, the ledger holds every reported acquire and at most the one
  that was in flight; a restarted client re-sends every key, and the count ends equal to
  the number of distinct keys. The kill lands either right after a report, or (``in-commit``)
  once the database shows the child mid-write: SQLite's WAL grew, or the child's PostgreSQL
  backend holds a transaction id. On PostgreSQL the client dies and the server stays.

Nothing here waits on a clock: readiness is a barrier, the kill follows the reports.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
from collections.abc import Iterator
from multiprocessing.connection import Connection
from multiprocessing.pool import Pool
from pathlib import Path
from typing import Any, NamedTuple

import psycopg
import pytest

from tenantguard.ledger import ChangeResult, UsageChange, open_ledger

PROCESSES = 8
KEYS_PER_WORKER = 40  # 320 keys, 640 calls
LIMIT = 200  # < PROCESSES * KEYS_PER_WORKER: the cap fills and the rest are refused
IN_FLIGHT = 4  # keys each worker has in flight at once
TENANT = "acme"
QUOTA = "applications"
NOW = 1_700_000_000.0
TIMEOUT = 120.0  # seconds: the barrier, a worker's whole run, the crash child's reports
CRASH_AFTER = 50  # reports to wait for before the kill
CRASH_MAX_KEYS = 100_000  # the crash child would stop here; it is killed long before
CRASH_POLLS = 1_000_000  # polls of InCommit before giving up (the child writes every ms)
CRASH_APPLICATION = "tenantguard-crash-child"

_WORKER: dict[str, Any] = {}


class Answer(NamedTuple):
    used: tuple[int, ...]
    refused: int | None
    replayed: bool


def _answer(result: ChangeResult) -> Answer:
    return Answer(tuple(result.used), result.refused, result.replayed)


def _acquire(limit: int | None) -> list[UsageChange]:
    return [UsageChange(quota=QUOTA, scope="", period="", amount=1, limit=limit)]


async def _prepare(url: str) -> None:
    """Open once in this process, so the schema exists before the workers race."""
    ledger = open_ledger(url)
    try:
        assert await ledger.ping(), f"{url} does not answer"
        assert await ledger.usage(TENANT) == []
    finally:
        await ledger.close()


async def _used(url: str) -> list[tuple[str, str, str, int]]:
    ledger = open_ledger(url)
    try:
        rows = await ledger.usage(TENANT)
    finally:
        await ledger.close()
    return [(row.quota, row.scope, row.period, row.used) for row in rows]


# --- eight workers, one cap, every acquire retried


class Job(NamedTuple):
    url: str
    worker: int


def _init_worker(barrier: Any) -> None:
    _WORKER["barrier"] = barrier


def _race(job: Job) -> dict[str, list[Answer]]:
    """In a worker process: every key's two answers."""
    return asyncio.run(_race_async(job))


async def _race_async(job: Job) -> dict[str, list[Answer]]:
    ledger = open_ledger(job.url)
    answers: dict[str, list[Answer]] = {}
    try:
        if not await ledger.ping():
            _WORKER["barrier"].abort()  # fail the others now, not at the timeout
            raise AssertionError(f"{job.url} does not answer")
        _WORKER["barrier"].wait(TIMEOUT)  # every process connected: go together

        async def send(key: str) -> Answer:
            result = await ledger.change_usage(
                TENANT, _acquire(LIMIT), idempotency_key=key, now=NOW
            )
            return _answer(result)

        async def acquire_twice(index: int) -> None:
            key = f"w{job.worker}-k{index}"
            if index % 2 == 0:  # the retry races the first copy
                answers[key] = list(await asyncio.gather(send(key), send(key)))
            else:  # the retry follows a first copy whose answer was lost
                answers[key] = [await send(key), await send(key)]

        queue = list(range(KEYS_PER_WORKER))

        async def lane() -> None:
            while queue:
                await acquire_twice(queue.pop(0))

        await asyncio.gather(*(lane() for _ in range(IN_FLIGHT)))
    finally:
        await ledger.close()
    return answers


@pytest.fixture(scope="module")
def pool() -> Iterator[Pool]:
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(PROCESSES)
    workers = context.Pool(PROCESSES, initializer=_init_worker, initargs=(barrier,))
    try:
        yield workers
    finally:
        workers.close()
        workers.join()


def test_eight_workers_with_retries_and_idempotency_keys_fill_one_cap_exactly(
    pool: Pool, ledger_url: str
) -> None:
    asyncio.run(_prepare(ledger_url))
    jobs = [Job(ledger_url, worker) for worker in range(PROCESSES)]
    # a worker blocks at the barrier until all eight have a job, so each job gets its own
    per_worker = pool.map_async(_race, jobs, chunksize=1).get(TIMEOUT)

    answers: dict[str, list[Answer]] = {}
    for worker_answers in per_worker:
        answers.update(worker_answers)
    assert len(answers) == PROCESSES * KEYS_PER_WORKER

    firsts: dict[str, Answer] = {}
    for key, pair in answers.items():
        assert len(pair) == 2, (key, pair)
        # one copy did the work and the other replayed its result, whichever came first
        assert sorted(answer.replayed for answer in pair) == [False, True], (key, pair)
        first = next(answer for answer in pair if not answer.replayed)
        assert [(a.used, a.refused) for a in pair] == [(first.used, first.refused)] * 2, (
            key,
            pair,
        )
        firsts[key] = first

    admitted = sorted(a.used[0] for a in firsts.values() if a.refused is None)
    refused = [a for a in firsts.values() if a.refused is not None]
    # exactly the cap, each admitted key its own count: no acquire applied twice, none lost
    assert admitted == list(range(1, LIMIT + 1))
    assert len(refused) == PROCESSES * KEYS_PER_WORKER - LIMIT
    assert {(a.used, a.refused) for a in refused} == {((LIMIT,), 0)}

    assert asyncio.run(_used(ledger_url)) == [(QUOTA, "", "", LIMIT)]


# --- kill -9 in the middle of a stream of acquires


def _crash_child(url: str, reports: Connection) -> None:
    """In a child process: acquire k0, k1, … one by one; report ``(i, used)`` after each."""
    asyncio.run(_crash_stream(url, reports))


async def _crash_stream(url: str, reports: Connection) -> None:
    ledger = open_ledger(url)
    assert await ledger.ping()
    for index in range(CRASH_MAX_KEYS):
        result = await ledger.change_usage(
            TENANT, _acquire(None), idempotency_key=f"k{index}", now=NOW
        )
        reports.send((index, result.used[0], result.refused, result.replayed))
    await ledger.close()


class InCommit:
    """Tells, by polling the database from outside, that the child is inside a write.

    SQLite: the ``-wal`` file grew (a transaction's frames are appended when it commits,
    so the kill lands between that write and the fsync, or just after). PostgreSQL: the
    child's backend holds a transaction id (it has written and not yet committed).
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._wal: Path | None = None
        self._size = -1
        self._conn: psycopg.Connection[Any] | None = None
        if url.startswith("sqlite:///"):
            self._wal = Path(url.removeprefix("sqlite:///") + "-wal")
        else:
            self._conn = psycopg.connect(url.partition("?")[0], autocommit=True)

    def arm(self) -> None:
        if self._wal is not None:
            self._size = self._wal.stat().st_size if self._wal.exists() else -1

    def __call__(self) -> bool:
        if self._wal is not None:
            return self._wal.exists() and self._wal.stat().st_size != self._size
        assert self._conn is not None
        row = self._conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE application_name = %s AND backend_xid IS NOT NULL",
            (CRASH_APPLICATION,),
        ).fetchone()
        return row is not None and row[0] > 0

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()


def _kill_mid_stream(url: str, moment: str) -> list[tuple[int, int]]:
    """Run `_crash_child`, SIGKILL it after ``CRASH_AFTER`` reports (and, ``in-commit``,
    once `InCommit` says so); return every ``(i, used)`` it reported, including those
    still in the pipe when it died."""
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_crash_child, args=(url, sender), daemon=True)
    in_commit = InCommit(url) if moment == "in-commit" else None
    child.start()
    sender.close()  # the child holds the only writer: EOF once it is dead
    reports: list[tuple[int, int]] = []

    def receive() -> None:
        index, used, refused, replayed = receiver.recv()
        assert (index, refused, replayed) == (len(reports), None, False)
        reports.append((index, used))

    try:
        while len(reports) < CRASH_AFTER:
            if not receiver.poll(TIMEOUT):
                pytest.fail(f"the child reported {len(reports)} acquires in {TIMEOUT:g} s")
            receive()
        if in_commit is not None:
            in_commit.arm()
            polls = 0
            while not in_commit():  # bounded: a busy child writes every few milliseconds
                polls += 1
                assert child.is_alive(), f"the child died on its own: {child.exitcode}"
                assert polls < CRASH_POLLS, f"no write seen in {polls} polls"
        assert child.pid is not None
        os.kill(child.pid, signal.SIGKILL)
        child.join(TIMEOUT)
        assert child.exitcode == -signal.SIGKILL
        while True:  # what it acknowledged between the last read and the kill
            try:
                receive()
            except EOFError:
                break
    finally:
        if child.is_alive():
            child.kill()
            child.join()
        receiver.close()
        if in_commit is not None:
            in_commit.close()
    return reports


async def _restart_and_resend(url: str, keys: int) -> tuple[int, list[Answer], int]:
    """Reopen: (used before, answers to re-sending k0…k<keys-1>, used after)."""
    ledger = open_ledger(url)
    try:
        rows = await ledger.usage(TENANT)
        before = sum(row.used for row in rows)
        answers = [
            _answer(
                await ledger.change_usage(
                    TENANT, _acquire(None), idempotency_key=f"k{index}", now=NOW
                )
            )
            for index in range(keys)
        ]
        after = sum(row.used for row in await ledger.usage(TENANT))
    finally:
        await ledger.close()
    return before, answers, after


@pytest.mark.parametrize("moment", ["after-ack", "in-commit"])
def test_kill_9_mid_stream_loses_no_acknowledged_acquire_and_counts_none_twice(
    ledger_url: str, moment: str
) -> None:
    asyncio.run(_prepare(ledger_url))
    url = ledger_url
    if url.startswith("postgresql://"):  # so InCommit can find the child's backend
        url += f"?application_name={CRASH_APPLICATION}"
    reports = _kill_mid_stream(url, moment)
    acked = len(reports)
    assert acked >= CRASH_AFTER
    # acquired one at a time: the i-th saw count i + 1
    assert reports == [(index, index + 1) for index in range(acked)]

    # every acknowledged acquire, and at most the one in flight (k<acked>)
    before, answers, after = asyncio.run(_restart_and_resend(ledger_url, acked + 1))
    assert acked <= before <= acked + 1, (acked, before)

    # a restarted client re-sends k0…k<acked>: the acknowledged ones replay their result
    for index, answer in enumerate(answers[:acked]):
        assert answer == Answer((index + 1,), None, True), (index, answer)
    in_flight = answers[acked]
    if before == acked + 1:  # it committed, the kill only lost its answer
        assert in_flight == Answer((acked + 1,), None, True)
    else:  # it never committed: applied now, for the first time
        assert in_flight == Answer((acked + 1,), None, False)
    assert after == acked + 1  # every distinct key once, none twice
    assert asyncio.run(_used(ledger_url)) == [(QUOTA, "", "", acked + 1)]
