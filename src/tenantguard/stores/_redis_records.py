"""How a decision is spelled for ``counters.lua``, and how its answer reads.

Keys: a tenant's own counters are fields of one hash per tenant; counters per client are
string keys of their own; both carry the tenant's ``{hash tag}`` so one call can touch
them in a cluster. A record is one word: a head (operation, clock, cost, lease, number
of keys) and a word per counter spec. Every part a caller or a policy names is
percent-encoded, so no id can reach another's keys or reshape a record.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from functools import lru_cache
from typing import Any
from urllib.parse import quote

from redis.exceptions import ResponseError

from tenantguard.algorithms import NEVER, Outcome
from tenantguard.stores._base import CounterSpec

__all__ = [
    "CACHED",
    "Layout",
    "counter_key",
    "hash_tag",
    "key_part",
    "layout",
    "outcomes_of",
    "record_answer",
    "record_head",
    "table_part",
]

CODES = {
    "fixed-window": "f",
    "sliding-window": "s",
    "token-bucket": "t",
    "gcra": "g",
    "concurrency": "c",
}
PREFIX = "tg"
_SAFE = re.compile(r"[A-Za-z0-9_.~-]*")


def key_part(text: str) -> str:
    """Percent-encode every byte but letters, digits and ``_.-~``.

    So a braces, colons, ``*``, spaces or unicode in a tenant id can neither end the hash
    tag early nor make two different (tag, table, key) triples spell one Redis key.
    Ids that need no escaping (most) skip ``quote``, which costs a microsecond.
    """
    return text if _SAFE.fullmatch(text) else quote(text, safe="")


@lru_cache(maxsize=4096)
def table_part(table: str) -> str:
    # tables are few and named by the policy ("rule|algorithm|window"): encode each once
    return key_part(table)


def counter_key(tenant: str, table: str, key: str, *, scoped: bool) -> tuple[str, str]:
    """Where a counter lives: ``(redis key, field)``.

    A tenant's own counters (keyed by the tenant alone) are fields of one hash,
    ``tg:{tenant}``, named by their table: one key per tenant to read, write and expire,
    whatever the number of rules. Counters per client within a tenant have no bound on
    their number, so each is a string key of its own (field ``""``) that expires alone:
    ``tg:{tenant}:table:key``. Counters not keyed by tenant tag by their own key.
    """
    if scoped:
        tag = key_part(tenant)
        if key == tenant:
            return f"{PREFIX}:{{{tag}}}", table_part(table)
        return f"{PREFIX}:{{{tag}}}:{table_part(table)}:{key_part(key)}", ""
    return f"{PREFIX}:{{~{key_part(key)}}}:{table_part(table)}", ""


def hash_tag(redis_key: str) -> str:
    return redis_key[redis_key.index("{") : redis_key.index("}") + 1]


# a record's keys (the tenant's hash first, if any of its counters live there, then the
# string keys) and its spec words (see counters.lua)
Layout = tuple[list[str], list[str]]
CACHED = 65_536  # entries per cache (routes, tenants, spec words); a full one starts again
_WORDS: dict[tuple[CounterSpec, str], str] = {}


def layout(specs: Sequence[CounterSpec], places: list[tuple[str, str]]) -> Layout:
    hashed = ""
    strings: list[str] = []
    words: list[str] = []
    for spec, (key, field) in zip(specs, places, strict=True):
        if field:
            hashed = key
        else:
            strings.append(key)
        word = _WORDS.get((spec, field))
        if word is None:
            if len(_WORDS) >= CACHED:
                _WORDS.clear()
            code = CODES[spec.algorithm]
            enforce = "1" if spec.enforce else "0"
            word = f"{code}|{spec.limit}|{spec.window!r}|{spec.burst}|{enforce}|{field}"
            _WORDS[(spec, field)] = word
        words.append(word)
    return ([hashed, *strings] if hashed else strings), words


def record_head(
    op: str, clock: str, cost: int, lease: str | None, keys: int, words: list[str]
) -> list[str]:
    """A record: its head, then its spec words (naming ``keys`` keys), as one word."""
    # the lease comes from a caller's token: encoded, so no space or "|" can reshape
    # the record (name other keys, or other counters)
    lease_word = key_part(lease) if lease else ""
    return [" ".join((f"{op}|{clock}|{cost}|{lease_word}|{keys}", *words))]


def record_answer(answer: Any) -> Any:
    """A record's answer, or the ``ResponseError`` the script reported for it alone."""
    if isinstance(answer, str) and answer.startswith("error: "):
        return ResponseError(answer[len("error: ") :])
    return answer


def outcomes_of(reply: list[Any]) -> list[Outcome]:
    """A record's flat reply (instant, then four numbers per spec) to outcome tuples; the
    state stays in Redis (``None`` here).

    Instants and waits arrive in whole microseconds; a wait of -1 means never. Two specs
    (an endpoint rule and a tenant-wide one) are the usual route: unrolled, as this runs
    once per decision."""
    if len(reply) == 9:
        _, a1, r1, s1, w1, a2, r2, s2, w2 = reply
        return [
            (a1 == 1, None, r1, s1 / 1e6, NEVER if w1 == -1 else w1 / 1e6),
            (a2 == 1, None, r2, s2 / 1e6, NEVER if w2 == -1 else w2 / 1e6),
        ]
    numbers = iter(reply)
    next(numbers)  # the instant, for refunds
    return [
        (allowed == 1, None, remaining, reset / 1e6, NEVER if retry == -1 else retry / 1e6)
        for allowed, remaining, reset, retry in zip(numbers, numbers, numbers, numbers, strict=True)
    ]
