"""The `bastion` command groups: the gateway, identity state, agents, audit trail and policy."""

__all__ = [
    "agents",
    "approvals",
    "audit",
    "discovery",
    "gateway",
    "identity",
    "inventory",
    "owners",
    "policy",
    "probe",
    "review",
    "tools",
]
