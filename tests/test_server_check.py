"""``POST /v1/check`` on its lean endpoint, held to the FastAPI route it replaced.

The reference is the FastAPI twin that documents the route (``server.check``, with
``CheckBody``), served by a FastAPI app wired as the service was. Generated bodies go
to both, and every answer must be the same: status, content type and JSON body, 200s
included (both guards see the same checks in the same order, under one pinned clock).
The fast decoder is also held directly to ``CheckBody``: whatever it accepts, pydantic
accepts, with the same values.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tenantguard import Guard, parse_policy
from tenantguard._api_check import _accepted
from tenantguard._api_models import CheckBody
from tenantguard._api_requests import ServiceState, Tokens, digest, json_object
from tenantguard.errors import LedgerUnavailable
from tenantguard.server import _documented, answer_with_problems, create_app

POLICY = """\
version: 1
plans:
  - {name: free, enforcement: hard}
default_plan: free
headers: [okta, ietf, github]
rate_limits:
  - name: by-client
    match: {paths: ["/c/**"]}
    per: [tenant, client]
    window: 1m
    limits: {default: 3}
  - name: by-ip
    match: {paths: ["/i/**"]}
    per: [ip]
    window: 1m
    limits: {default: 3}
  - name: by-user
    match: {paths: ["/u/**"]}
    per: [tenant, user]
    window: 1m
    limits: {default: 3}
  - name: by-key
    match: {paths: ["/h/**"]}
    per: [tenant, "header:x-key"]
    window: 1m
    limits: {default: 3}
  - name: posts
    match: {methods: [POST], paths: ["/**"]}
    window: 1m
    limits: {default: 4}
  - name: tenant-bucket
    group: tenant
    match: {paths: ["/**"]}
    algorithm: token-bucket
    window: 10s
    limits: {default: 6}
"""
TOKEN = "service-secret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
NOW = 1_700_000_040.0
CHECK = {"tenant": "acme", "method": "GET", "path": "/c/1"}


def make_guard() -> Guard:
    return Guard(parse_policy(POLICY, source="policy.yaml"), clock=lambda: NOW)


def reference_app(guard: Guard) -> FastAPI:
    """The route as FastAPI served it: the documented twin, wired as ``create_app`` was."""
    app = FastAPI()
    app.state.tenantguard = ServiceState(guard, Tokens(digest(TOKEN), digest("admin-secret")))
    app.router.routes.extend(_documented.routes)
    answer_with_problems(app)
    return app


def client_of(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://tg")


class Pair:
    """The lean service and the reference, each on its own guard."""

    def __init__(self) -> None:
        self.guards = (make_guard(), make_guard())
        lean = create_app(self.guards[0], service_token=TOKEN, admin_token="admin-secret")
        self.clients = (client_of(lean), client_of(reference_app(self.guards[1])))

    async def answers(self, body: bytes, headers: dict[str, str]) -> list[tuple[Any, ...]]:
        answers = []
        for client in self.clients:
            response = await client.post("/v1/check", content=body, headers=headers)
            answers.append(
                (response.status_code, response.headers["content-type"], response.json())
            )
        return answers

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()
        for guard in self.guards:
            await guard.close()


# bodies ---------------------------------------------------------------------------

odd_texts = st.sampled_from([
    "", " ", "/", "GET", "get", "GET\n", "G3T", "x" * 33, "x" * 1025, "a\x00b", "\ud800",
    "é", "😀" * 3, "/\x00", "/c/1", "/h/é", "ΣΑΣ", "\u2028",
])  # fmt: skip
odd_maps = st.sampled_from([{"x-key": "a\x00"}, {"\x00": "a"}, {"x": "\ud800"}, {"": "a"}])
texts = st.one_of(odd_texts, st.text(max_size=12))
scalars = st.one_of(
    texts,
    st.integers(min_value=-2, max_value=5),
    st.sampled_from([2**53 - 1, 2**53, 2**64, -(2**63)]),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
)
values = st.one_of(
    scalars, st.lists(scalars, max_size=2), st.dictionaries(texts, scalars, max_size=3)
)
plain = st.text(st.characters(exclude_characters="\x00", codec="utf-8"), max_size=8)
good = {
    "tenant": st.one_of(st.sampled_from(["acme", "globex", "ü ü"]), plain.filter(bool)),
    "method": st.sampled_from(["GET", "post", "Delete"]),
    "path": st.one_of(
        st.sampled_from(["/c/1", "/i/2", "/u/3", "/h/4", "/", "/C/1"]), plain.map("/".__add__)
    ),
    "client": st.one_of(st.none(), st.sampled_from(["0oa1", "0oa2", ""])),
    "ip": st.one_of(st.none(), st.sampled_from(["203.0.113.9", "::1"])),
    "user": st.one_of(st.none(), st.sampled_from(["u1", "u2"]), plain),
    "headers": st.one_of(
        st.none(),
        st.dictionaries(
            st.sampled_from(["x-key", "X-Key", "other"]),
            st.sampled_from(["a", "b", ""]),
            max_size=3,
        ),
    ),
    "cost": st.integers(min_value=1, max_value=3),
}
_REQUIRED = ("tenant", "method", "path")
objects = st.fixed_dictionaries(
    {name: good[name] for name in _REQUIRED},
    optional={name: value for name, value in good.items() if name not in _REQUIRED},
)


@st.composite
def bodies(draw: st.DrawFn) -> bytes:
    """JSON as a client would send it (ASCII-escaped or not, lone surrogates included):
    mostly good, then with one field wrong, missing or unknown, now and then mangled."""
    data: Any = draw(objects)
    broken = draw(st.sampled_from([None, None, None, *good, "tennant", "whole"]))
    if broken == "whole":
        data = draw(values)
    elif broken is not None:
        if draw(st.booleans()) and broken in data:
            del data[broken]
        else:
            data[broken] = draw(st.one_of(odd_texts, odd_maps, values))
    text = json.dumps(data, ensure_ascii=draw(st.booleans()))
    body = text.encode("utf-8", "surrogatepass")
    mangle = draw(st.sampled_from(["none"] * 12 + ["bom", "utf16", "truncate", "bytes"]))
    if mangle == "bom":
        return b"\xef\xbb\xbf" + body
    if mangle == "utf16":
        return text.encode("utf-16", "surrogatepass")
    if mangle == "truncate":
        return body[: draw(st.integers(min_value=0, max_value=len(body)))]
    if mangle == "bytes":
        return draw(st.binary(max_size=40))
    return body


# the fast decoder -----------------------------------------------------------------


@settings(max_examples=1500, deadline=None)
@given(body=bodies())
def test_what_the_fast_path_accepts_checkbody_accepts_alike(body: bytes) -> None:
    args = _accepted(body)
    if args is None:
        return
    reference = CheckBody.model_validate(json_object(body))
    assert {name: getattr(args, name) for name in CheckBody.model_fields} == dict(reference)


@pytest.mark.parametrize(
    "change",
    [
        {"tenant": "a\x00"}, {"path": "/\x00"}, {"client": "\x00"}, {"ip": "1\x00"},
        {"user": "u\x00"}, {"headers": {"k\x00": "v"}}, {"headers": {"k": "v\x00"}},
        {"path": "api"}, {"method": "GÉT"}, {"method": "G3T"}, {"method": "GET\n"},
        {"tenant": "x" * 1025}, {"method": "M" * 33}, {"cost": 2**53}, {"headers": {"": "v"}},
        {"headers": {f"h{i}": "v" for i in range(65)}}, {"ip": "1" * 65},
    ],
)  # fmt: skip
async def test_what_the_fast_path_refuses_the_reference_answers(
    pair: Pair, change: dict[str, Any]
) -> None:
    body = json.dumps({**CHECK, **change}).encode()
    assert _accepted(body) is None
    lean, reference = await pair.answers(body, AUTH)
    assert lean == reference
    assert lean[0] == 422


@pytest.mark.parametrize(
    "body",
    [
        CHECK,
        {**CHECK, "method": "post", "cost": 3, "client": "", "ip": "::1", "user": "u"},
        {**CHECK, "headers": {"X-Key": "é😀"}, "client": None, "tenant": "ü" * 1024},
        {**CHECK, "path": "/" + "p" * 8191, "method": "M" * 32, "cost": 2**53 - 1},
    ],
)
def test_ordinary_bodies_take_the_fast_path(body: dict[str, Any]) -> None:
    assert _accepted(json.dumps(body).encode()) is not None


# the endpoint against the reference ----------------------------------------------


def test_every_answer_is_the_reference_answer() -> None:
    with asyncio.Runner() as runner:
        pair = runner.run(_open_pair())

        @settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
        @given(body=bodies(), content_type=st.sampled_from(["application/json", "text/plain"]))
        def same(body: bytes, content_type: str) -> None:
            headers = {**AUTH, "Content-Type": content_type}
            lean, reference = runner.run(pair.answers(body, headers))
            assert lean == reference

        try:
            same()
        finally:
            runner.run(pair.close())


async def _open_pair() -> Pair:
    return Pair()


@pytest.fixture
async def pair() -> AsyncIterator[Pair]:
    pair = Pair()
    yield pair
    await pair.close()


@pytest.mark.parametrize(
    ("body", "headers"),
    [
        (b'{"tenant": "acme"}', {}),
        (b'{"tenant": "acme"}', {"Authorization": "Bearer wrong"}),
        (b'{"tenant": "acme"}', {"Authorization": "Bearer admin-secret"}),
        (b"", AUTH),
        (b"{}", AUTH),
        (json.dumps({**CHECK, "x": 1, "cost": 0, "tenant": ""}).encode(), AUTH),
        (b"x" * 70_000, AUTH),
    ],
)
async def test_auth_bounds_and_errors_answer_as_the_reference(
    pair: Pair, body: bytes, headers: dict[str, str]
) -> None:
    lean, reference = await pair.answers(body, headers)
    assert lean == reference
    assert lean[0] != 200 or headers.get("Authorization") == "Bearer admin-secret"


async def test_a_decision_is_the_reference_decision_field_for_field(pair: Pair) -> None:
    for body in [CHECK, CHECK, {**CHECK, "method": "post"}, {**CHECK, "cost": 9}]:
        lean, reference = await pair.answers(json.dumps(body).encode(), AUTH)
        assert lean == reference
    assert lean[0] == 200
    assert lean[2]["allowed"] is False  # the tenant bucket (6) cannot admit a cost of 9


# what only the lean endpoint has to get right -------------------------------------


@pytest.fixture
async def guard() -> AsyncIterator[Guard]:
    guard = make_guard()
    yield guard
    await guard.close()


@pytest.fixture
async def lean(guard: Guard) -> AsyncIterator[httpx.AsyncClient]:
    app = create_app(guard, service_token=TOKEN, admin_token="admin-secret")
    async with client_of(app) as client:
        yield client


@pytest.mark.parametrize("url", ["/v1/check", "/v1/check?debug=1", "/v1/ch%65ck"])
async def test_the_route_answers_at_every_spelling_of_its_path(
    lean: httpx.AsyncClient, url: str
) -> None:
    response = await lean.post(url, json=CHECK, headers=AUTH)
    assert response.status_code == 200, response.text
    assert response.json()["rule"] == "by-client"


async def test_a_path_that_only_decodes_to_the_route_is_not_it(lean: httpx.AsyncClient) -> None:
    response = await lean.post("/v1%2Fcheck", json=CHECK, headers=AUTH)
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


async def test_a_utf16_body_is_served_like_its_utf8_twin(lean: httpx.AsyncClient) -> None:
    body = json.dumps(CHECK)
    for encoded in [body.encode("utf-16"), b"\xef\xbb\xbf" + body.encode()]:
        response = await lean.post("/v1/check", content=encoded, headers=AUTH)
        assert response.status_code == 200, response.text


async def test_a_body_sent_in_chunks_is_read_whole(lean: httpx.AsyncClient) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        text = json.dumps(CHECK).encode()
        for start in range(0, len(text), 5):
            yield text[start : start + 5]

    response = await lean.post("/v1/check", content=chunks(), headers=AUTH)
    assert response.status_code == 200, response.text


async def test_a_client_that_hangs_up_gets_nothing_and_logs_nothing(
    guard: Guard, caplog: pytest.LogCaptureFixture
) -> None:
    app = create_app(guard, service_token=TOKEN, admin_token="admin-secret")
    messages = iter([
        {"type": "http.request", "body": b'{"tenant":', "more_body": True},
        {"type": "http.disconnect"},
    ])  # fmt: skip
    sent: list[Any] = []

    async def receive() -> Any:
        return next(messages)

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {
        "type": "http", "method": "POST", "path": "/v1/check", "raw_path": b"/v1/check",
        "query_string": b"", "headers": [(b"authorization", f"Bearer {TOKEN}".encode())],
    }  # fmt: skip
    with caplog.at_level(logging.DEBUG):
        await app(scope, receive, send)
    assert sent == []
    assert caplog.text == ""


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (ValueError("tenant: not allowed"), 422, "invalid_request"),
        (LedgerUnavailable("down"), 503, "ledger_unavailable"),
        (RuntimeError("secret internals"), 500, "internal_error"),
    ],
)
async def test_a_guard_error_is_a_problem_never_a_traceback(
    lean: httpx.AsyncClient,
    guard: Guard,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    error: Exception,
    status: int,
    code: str,
) -> None:
    async def failing(*args: object, **kwargs: object) -> None:
        raise error

    monkeypatch.setattr(guard, "check", failing)
    with caplog.at_level(logging.ERROR, logger="tenantguard.server"):
        response = await lean.post("/v1/check", json=CHECK, headers=AUTH)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code
    assert "secret internals" not in response.text
    assert ("secret internals" in caplog.text) == (status == 500)
    assert TOKEN not in caplog.text


def test_the_openapi_entry_is_the_fastapi_routes() -> None:
    """The document describes the route exactly as it described the FastAPI route."""
    guard = make_guard()
    app = create_app(guard, service_token=TOKEN, admin_token="admin-secret")
    operation = app.openapi()["paths"]["/v1/check"]
    reference = FastAPI()
    reference.router.routes.extend(_documented.routes)
    assert list(operation) == ["post"]
    documented = reference.openapi()["paths"]["/v1/check"]["post"]
    assert operation["post"]["requestBody"] == documented["requestBody"]
    assert operation["post"]["responses"]["200"] == documented["responses"]["200"]
    assert operation["post"]["summary"] == documented["summary"]
    assert operation["post"]["operationId"] == documented["operationId"]
