"""The admin API: the operators' HTTP interface, its bearer-token guard and its parameters."""

__all__ = [
    "app",
    "approvals",
    "auth",
    "params",
    "reviews",
]
