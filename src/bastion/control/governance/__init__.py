"""Governance: access reviews of agents, grants and upstream credentials, and the inventory
of what each agent can reach, and offboarding an owner."""

__all__ = [
    "inventory",
    "offboard",
    "review",
    "reviewer",
    "reviews",
]
