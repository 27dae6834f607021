"""The public API is exactly what ``__all__`` says, and nothing private leaks into it."""

from __future__ import annotations

import importlib

import pytest

import tenantguard

PUBLIC_MODULES = [
    "tenantguard",
    "tenantguard.algorithms",
    "tenantguard.decision",
    "tenantguard.errors",
    "tenantguard.guard",
    "tenantguard.ledger",
    "tenantguard.middleware",
    "tenantguard.reload",
    "tenantguard.server",
    "tenantguard.sync",
    "tenantguard.policy",
    "tenantguard.stores",
    "tenantguard.tenants",
]


@pytest.mark.parametrize("name", PUBLIC_MODULES)
def test_all_names_exist_once(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert len(set(exported)) == len(exported)
    for attribute in exported:
        assert hasattr(module, attribute), f"{name}.__all__ names missing {attribute}"
        assert not attribute.startswith("_")


def test_top_level_is_the_documented_surface() -> None:
    assert {"Guard", "load_policy", "parse_policy", "Decision", "PolicyError"} <= set(
        tenantguard.__all__
    )
    for attribute in tenantguard.__all__:
        value = getattr(tenantguard, attribute)
        module = getattr(value, "__module__", "tenantguard")
        assert module.startswith("tenantguard"), attribute


def test_errors_form_one_tree() -> None:
    for error in (
        tenantguard.PolicyError,
        tenantguard.StoreError,
        tenantguard.UnknownLeaseError,
    ):
        assert issubclass(error, tenantguard.TenantguardError)
