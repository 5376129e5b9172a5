"""The control plane: registry, token service, admin API, CLI commands, audit delivery, and
`assembly`, which builds a gateway with all of them.
"""

__all__ = [
    "admin",
    "approval_links",
    "assembly",
    "audit",
    "console",
    "cli",
    "governance",
    "probe",
    "registry",
    "tokens",
]
