"""The control plane: registry, token service, admin API, CLI commands, audit delivery, and
`assembly`, which builds a gateway with all of them.
"""

__all__ = [
    "admin",
    "assembly",
    "audit",
    "cli",
    "governance",
    "probe",
    "registry",
    "tokens",
]
