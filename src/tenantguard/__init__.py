"""tenantguard: the limits a multi-tenant API platform sells with its plans, enforced.

The public API is what ``__all__`` lists; everything in a ``_module`` is private.
"""

from tenantguard.decision import Decision, RuleCheck
from tenantguard.errors import (
    PolicyError,
    PolicyIssue,
    StoreError,
    TenantguardError,
    UnknownLeaseError,
)
from tenantguard.guard import Guard
from tenantguard.policy import Policy, load_policy, parse_policy
from tenantguard.tenants import TenantRecord, UnknownPlanError

__all__ = [
    "Decision",
    "Guard",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "RuleCheck",
    "StoreError",
    "TenantRecord",
    "TenantguardError",
    "UnknownLeaseError",
    "UnknownPlanError",
    "load_policy",
    "parse_policy",
]

__version__ = "0.1.0"
