"""The operators' console: pages under /console, its logins, sessions and actions."""

__all__ = [
    "actions",
    "app",
    "approvals",
    "auth",
    "charts",
    "explain",
    "oidc",
    "sessions",
    "views",
    "web",
]
