"""Policy files: load, validate and compile (see DESIGN.md, "Policy file, version 1")."""

from tenantguard.policy._load import load_policy, parse_policy
from tenantguard.policy._model import UNAVAILABLE, UNLIMITED, PolicyDocument
from tenantguard.policy._policy import Policy

__all__ = ["UNAVAILABLE", "UNLIMITED", "Policy", "PolicyDocument", "load_policy", "parse_policy"]
