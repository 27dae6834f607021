"""A tiny FastAPI app whose every request is rate limited by tenantguard.

The limits are Okta's management API limits (``okta-management.yaml`` beside this
file); the tenant is named by the ``X-Tenant-Id`` request header. Run it with either of

    .venv/bin/uvicorn examples.fastapi_app:app
    .venv/bin/python examples/fastapi_app.py

then call it 21 times in a minute and watch the headers count down to a 429:

    curl -i -H 'X-Tenant-Id: acme' http://127.0.0.1:8000/api/v1/apps
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import uvicorn
from fastapi import FastAPI

from tenantguard import Guard, load_policy
from tenantguard.middleware import TenantGuardMiddleware

POLICY = Path(__file__).with_name("okta-management.yaml")


def create_app(guard: Guard | None = None) -> FastAPI:
    """Build the app; tests pass their own ``Guard`` (with a fake clock, say)."""
    # One Guard for the whole process: memory counters and an in-memory ledger by
    # default; pass counters="redis://…" and ledger="sqlite:///…" to share them.
    guard = guard or Guard(load_policy(POLICY))

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await guard.close()  # writes pending events, closes the stores

    app = FastAPI(title="tenantguard example", lifespan=lifespan)
    # Every HTTP request is checked before a route sees it. Allowed responses get
    # X-Rate-Limit-* headers; over the limit the middleware itself answers 429 in
    # Okta's error format. Requests without X-Tenant-Id pass through unchecked.
    app.add_middleware(TenantGuardMiddleware, guard=guard, tenant="header:X-Tenant-Id")

    @app.get("/api/v1/apps")
    async def list_apps() -> list[dict[str, str]]:
        return [{"id": "0oa1", "label": "My app"}]  # 20 a minute on developer-free

    @app.get("/api/v1/users/{user_id}")
    async def get_user(user_id: str) -> dict[str, str]:
        return {"id": user_id}  # a different rule, with its own count

    @app.get("/healthz")
    async def health() -> dict[str, str]:
        return {"status": "ok"}  # no X-Tenant-Id: never counted

    return app


app = create_app()

if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=8000)
