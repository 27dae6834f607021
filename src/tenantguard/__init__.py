"""tenantguard: the limits a multi-tenant API platform sells with its plans, enforced.

The public API is what ``__all__`` lists; everything in a ``_module`` is private.
"""

from tenantguard.decision import Decision, RuleCheck
from tenantguard.errors import (
    LedgerUnavailable,
    PolicyError,
    PolicyIssue,
    StoreError,
    TenantguardError,
    UnknownLeaseError,
)
from tenantguard.guard import Guard
from tenantguard.increases import RequestConflict, UnknownRequestError
from tenantguard.ledger import EventRecord, IncreaseRequest, OverrideRecord, TenantRecord
from tenantguard.overrides import OverrideRefused, UnknownLimitError
from tenantguard.policy import Policy, load_policy, parse_policy
from tenantguard.quotas import QuotaExceeded, UnknownQuotaError, Usage
from tenantguard.tenants import UnknownPlanError

__all__ = [
    "Decision",
    "EventRecord",
    "Guard",
    "IncreaseRequest",
    "LedgerUnavailable",
    "OverrideRecord",
    "OverrideRefused",
    "Policy",
    "PolicyError",
    "PolicyIssue",
    "QuotaExceeded",
    "RequestConflict",
    "RuleCheck",
    "StoreError",
    "TenantRecord",
    "TenantguardError",
    "UnknownLeaseError",
    "UnknownLimitError",
    "UnknownPlanError",
    "UnknownQuotaError",
    "UnknownRequestError",
    "Usage",
    "load_policy",
    "parse_policy",
]

__version__ = "0.1.0"
