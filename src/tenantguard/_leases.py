"""Lease tokens: self-describing, so any replica can end a lease another one issued.

A token is ``<random id>.<base64 JSON of [[rule, key, tenant], ...]>``. The random id is what
makes a token unguessable; the rest only says where the lease is counted.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import secrets

from tenantguard.errors import UnknownLeaseError

__all__ = ["decode_lease", "encode_lease", "new_lease_id"]


# what ``new_lease_id`` makes: 16 characters of the URL-safe base64 alphabet
_LEASE_ID = re.compile(r"[A-Za-z0-9_-]{16}")


def new_lease_id() -> str:
    return secrets.token_urlsafe(12)


def encode_lease(lease_id: str, held: list[tuple[str, str, str]]) -> str:
    body = json.dumps(held, separators=(",", ":")).encode()
    return f"{lease_id}.{base64.urlsafe_b64encode(body).decode().rstrip('=')}"


def decode_lease(token: str) -> tuple[str, list[tuple[str, str, str]]]:
    problem = UnknownLeaseError(f"not a lease token issued by tenantguard: {token[:64]!r}")
    lease_id, _, body = token.partition(".")
    try:
        held = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        pairs = [(str(rule), str(key), str(tenant)) for rule, key, tenant in held]
    except (ValueError, TypeError, binascii.Error) as error:
        raise problem from error
    if not _LEASE_ID.fullmatch(lease_id) or not isinstance(held, list):
        raise problem
    return lease_id, pairs
