"""The request path's stages, in the order a request meets them, run by `chain.Pipeline`.

authn → session → route → authz → credentials → (upstream) → inspection → audit; `dispatch`
runs the MCP method once the stages before it have passed the exchange.
"""

__all__ = [
    "approval",
    "approvals",
    "authn",
    "authz",
    "buffer",
    "catalog",
    "chain",
    "client_session",
    "consent",
    "credentials",
    "dispatch",
    "elicitation",
    "exchange",
    "handshake",
    "history",
    "inspection",
    "lists",
    "mirror",
    "quotas",
    "route",
    "session",
    "sharing",
    "streams",
    "tenancy",
    "trail",
    "upstream",
]
