"""Every MCP method the gateway knows, and what the gateway does with each one.

The one place MCP method names are spelled out: code compares against these constants and asks
the table (`METHODS`) about a method's properties rather than keeping its own list.

```
request                    routing   eras           Cedar action
initialize                 local     2025           -
ping                       local     2025           -
server/discover            local     2025, 2026     -
logging/setLevel           local     2025           -
subscriptions/listen       local     2025, 2026     -
tools/list                 listed    2025, 2026     list_tools               (tools, name)
prompts/list               listed    2025, 2026     list_prompts             (prompts, name)
resources/list             listed    2025, 2026     list_resources           (resources, uri)
resources/templates/list   listed    2025, 2026     list_resource_templates  (..., uriTemplate)
tools/call                 by_name   2025, 2026     the tool's own (group call_tool)
prompts/get                by_name   2025, 2026     get_prompt
resources/read             by_uri    2025, 2026     read_resource
resources/subscribe        by_uri    2025           subscribe_resource
resources/unsubscribe      by_uri    2025           - (only gives up access)
completion/complete        by_ref    2025, 2026     complete
```

"2025" is the legacy era (2025-06-18, 2025-11-25: initialize handshake and sessions), "2026"
the stateless 2026-07-28. `server/discover` and `subscriptions/listen` are new in 2026-07-28;
the gateway serves them to legacy sessions too. The requests a server sends (elicitation,
sampling, roots) and the notifications either side sends have no routing: the gateway relays
them within a session, or sends them itself.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from bastion.types import Era

# -- requests a client sends ------------------------------------------------------------------
INITIALIZE = "initialize"
PING = "ping"
SERVER_DISCOVER = "server/discover"
LOGGING_SET_LEVEL = "logging/setLevel"
SUBSCRIPTIONS_LISTEN = "subscriptions/listen"
TOOLS_LIST = "tools/list"
TOOLS_CALL = "tools/call"
PROMPTS_LIST = "prompts/list"
PROMPTS_GET = "prompts/get"
RESOURCES_LIST = "resources/list"
RESOURCES_TEMPLATES_LIST = "resources/templates/list"
RESOURCES_READ = "resources/read"
RESOURCES_SUBSCRIBE = "resources/subscribe"
RESOURCES_UNSUBSCRIBE = "resources/unsubscribe"
COMPLETION_COMPLETE = "completion/complete"

# -- requests a server sends ------------------------------------------------------------------
ELICITATION_CREATE = "elicitation/create"
SAMPLING_CREATE_MESSAGE = "sampling/createMessage"
ROOTS_LIST = "roots/list"

# -- notifications ----------------------------------------------------------------------------
NOTIFICATION_PREFIX = "notifications/"
INITIALIZED = "notifications/initialized"
CANCELLED = "notifications/cancelled"
PROGRESS = "notifications/progress"
ROOTS_LIST_CHANGED = "notifications/roots/list_changed"
SUBSCRIPTIONS_ACKNOWLEDGED = "notifications/subscriptions/acknowledged"
TOOLS_LIST_CHANGED = "notifications/tools/list_changed"
PROMPTS_LIST_CHANGED = "notifications/prompts/list_changed"
RESOURCES_LIST_CHANGED = "notifications/resources/list_changed"
RESOURCES_UPDATED = "notifications/resources/updated"
MESSAGE = "notifications/message"


class Routing(enum.Enum):
    """How the gateway serves a client's request."""

    BY_NAME = "by_name"  # to the upstream behind the tool or prompt in params.name
    BY_URI = "by_uri"  # to the upstream that listed the resource in params.uri
    BY_REF = "by_ref"  # to the upstream behind the prompt or resource in params.ref
    LISTED = "listed"  # every upstream's page, merged (one upstream's on its own route)
    LOCAL = "local"  # answered by the gateway itself, fanning out where it must


class Sender(enum.Enum):
    """Which side of MCP sends a message."""

    CLIENT = "client"
    SERVER = "server"
    EITHER = "either"


FORWARDED_ROUTINGS = frozenset((Routing.BY_NAME, Routing.BY_URI, Routing.BY_REF))
_BOTH_ERAS = frozenset(Era)
_LEGACY_ONLY = frozenset((Era.LEGACY,))


@dataclass(frozen=True, slots=True)
class Method:
    """One MCP method and what the gateway does with it."""

    name: str
    # None: not a request the gateway serves (a server's request, or a notification).
    routing: Routing | None = None
    sender: Sender = Sender.CLIENT
    notification: bool = False
    # The eras in which a client may send it to the gateway.
    eras: frozenset[Era] = _BOTH_ERAS
    # The Cedar action policy decides it with (policy/schema.py); None when there is none,
    # and for tools/call, whose action is the called tool's own (in the group call_tool).
    action: str | None = None
    # For a list: the result member holding the items, and the item member naming each.
    result_key: str | None = None
    item_key: str | None = None
    # For a request routed by name: what the name names ("tool", "prompt").
    names: str | None = None

    @property
    def forwarded(self) -> bool:
        """Whether the request goes to the one upstream that owns what it names."""
        return self.routing in FORWARDED_ROUTINGS


def _table(*methods: Method) -> Mapping[str, Method]:
    return MappingProxyType({m.name: m for m in methods})


def _listed(name: str, action: str, result_key: str, item_key: str) -> Method:
    return Method(name, Routing.LISTED, action=action, result_key=result_key, item_key=item_key)


def _notification(name: str, sender: Sender) -> Method:
    return Method(name, sender=sender, notification=True)


METHODS: Mapping[str, Method] = _table(
    Method(INITIALIZE, Routing.LOCAL, eras=_LEGACY_ONLY),
    Method(PING, Routing.LOCAL, eras=_LEGACY_ONLY),
    Method(SERVER_DISCOVER, Routing.LOCAL),
    Method(LOGGING_SET_LEVEL, Routing.LOCAL, eras=_LEGACY_ONLY),
    Method(SUBSCRIPTIONS_LISTEN, Routing.LOCAL),
    _listed(TOOLS_LIST, "list_tools", "tools", "name"),
    _listed(PROMPTS_LIST, "list_prompts", "prompts", "name"),
    _listed(RESOURCES_LIST, "list_resources", "resources", "uri"),
    _listed(
        RESOURCES_TEMPLATES_LIST, "list_resource_templates", "resourceTemplates", "uriTemplate"
    ),
    Method(TOOLS_CALL, Routing.BY_NAME, names="tool"),
    Method(PROMPTS_GET, Routing.BY_NAME, action="get_prompt", names="prompt"),
    Method(RESOURCES_READ, Routing.BY_URI, action="read_resource"),
    Method(RESOURCES_SUBSCRIBE, Routing.BY_URI, eras=_LEGACY_ONLY, action="subscribe_resource"),
    Method(RESOURCES_UNSUBSCRIBE, Routing.BY_URI, eras=_LEGACY_ONLY),
    Method(COMPLETION_COMPLETE, Routing.BY_REF, action="complete"),
    Method(ELICITATION_CREATE, sender=Sender.SERVER),
    Method(SAMPLING_CREATE_MESSAGE, sender=Sender.SERVER),
    Method(ROOTS_LIST, sender=Sender.SERVER),
    _notification(INITIALIZED, Sender.CLIENT),
    _notification(CANCELLED, Sender.EITHER),
    _notification(PROGRESS, Sender.EITHER),
    _notification(ROOTS_LIST_CHANGED, Sender.CLIENT),
    _notification(SUBSCRIPTIONS_ACKNOWLEDGED, Sender.SERVER),
    _notification(TOOLS_LIST_CHANGED, Sender.SERVER),
    _notification(PROMPTS_LIST_CHANGED, Sender.SERVER),
    _notification(RESOURCES_LIST_CHANGED, Sender.SERVER),
    _notification(RESOURCES_UPDATED, Sender.SERVER),
    _notification(MESSAGE, Sender.SERVER),
)

# The requests a client may send the gateway (in some era); anything else is "not found".
KNOWN_METHODS = frozenset(name for name, m in METHODS.items() if m.routing is not None)
# The Cedar action of each method that has one (tools/call aside).
METHOD_ACTIONS: Mapping[str, str] = MappingProxyType(
    {name: m.action for name, m in METHODS.items() if m.action is not None}
)


def routed(*routings: Routing) -> frozenset[str]:
    """The client requests routed in any of these ways."""
    return frozenset(name for name, m in METHODS.items() if m.routing in routings)


def served(name: str, era: Era) -> bool:
    """Whether a client speaking `era` may send this request to the gateway."""
    method = METHODS.get(name)
    return method is not None and method.routing is not None and era in method.eras


def list_keys(name: str) -> tuple[str, str]:
    """A list method's result member holding the items and the member naming each item;
    KeyError for a method that is not a list."""
    method = METHODS[name]
    if method.result_key is None or method.item_key is None:
        raise KeyError(name)
    return method.result_key, method.item_key
