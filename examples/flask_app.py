"""A tiny Flask app whose every request is rate limited by tenantguard.

Flask is synchronous, so the app talks to the guard through ``SyncGuard`` and is wrapped
in the WSGI middleware ``TenantGuardWSGI``. The limits are Okta's management API limits
(``okta-management.yaml`` beside this file); the tenant is named by the ``X-Tenant-Id``
header. Run it with either of

    .venv/bin/flask --app examples/flask_app run
    .venv/bin/python examples/flask_app.py

then call it 21 times in a minute and watch the headers count down to a 429 (26 times
for "acme", which this example puts on a paid plan):

    curl -i -H 'X-Tenant-Id: initech' http://127.0.0.1:5000/api/v1/apps
"""

from __future__ import annotations

from pathlib import Path

from flask import Flask, jsonify
from flask.typing import ResponseReturnValue

from tenantguard import Guard, load_policy
from tenantguard.sync import SyncGuard, TenantGuardWSGI

POLICY = Path(__file__).with_name("okta-management.yaml")


def create_app(guard: Guard | None = None) -> Flask:
    """Build the app; tests pass their own ``Guard`` (with a fake clock, say)."""
    # One guard per process, used without `await` through SyncGuard.
    limits = SyncGuard(guard or Guard(load_policy(POLICY)))
    # "acme" pays: 25 app-list calls a minute instead of the free plan's 20.
    limits.tenants.upsert("acme", plan="developer-paid")

    app = Flask(__name__)
    # Wrap the WSGI app: every request is checked before Flask routes it. Allowed
    # responses get X-Rate-Limit-* headers; over the limit the middleware answers 429 in
    # Okta's error format. Requests without X-Tenant-Id pass through unchecked.
    app.wsgi_app = TenantGuardWSGI(  # type: ignore[method-assign]
        app.wsgi_app, limits, tenant="header:X-Tenant-Id"
    )

    @app.get("/api/v1/apps")
    def list_apps() -> ResponseReturnValue:
        return jsonify([{"id": "0oa1", "label": "My app"}])

    @app.get("/api/v1/users/<user_id>")
    def get_user(user_id: str) -> ResponseReturnValue:
        return jsonify({"id": user_id})

    @app.get("/healthz")
    def health() -> ResponseReturnValue:
        return jsonify({"status": "ok"})  # no X-Tenant-Id: never counted

    return app


app = create_app()

if __name__ == "__main__":
    app.run(port=5000)
