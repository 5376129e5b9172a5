"""The admin API: the operators' HTTP interface, its bearer-token guard and its parameters."""

__all__ = [
    "app",
    "auth",
    "params",
    "reviews",
]
