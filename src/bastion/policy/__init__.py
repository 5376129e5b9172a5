"""Policy: Cedar decisions on every request, typed by the upstreams' own tool schemas.

`catalog` holds what the upstreams offer; `schema` turns it into a Cedar schema (through
`cedar-policy-mcp-schema-generator`) and converts arguments to typed Cedar values; `source`
reads `.cedar` files and compiles YAML grants; `build` puts them together into a validated
engine; `engine` validates, partitions and decides; `approval` signs the states a held call
carries to its retry; `redaction` applies `@redact` paths; `lint` is the operator's tool.
Everything here is pure: no I/O but reading policy files.
"""

from bastion.policy.catalog import Catalog, ToolInfo
from bastion.policy.engine import CedarRequest, PolicyEngine, Verdict
from bastion.policy.schema import NAMESPACE, PolicySchema, build_schema
from bastion.policy.source import PolicyDoc, load_policies

__all__ = [
    "NAMESPACE",
    "Catalog",
    "CedarRequest",
    "PolicyDoc",
    "PolicyEngine",
    "PolicySchema",
    "ToolInfo",
    "Verdict",
    "build_schema",
    "load_policies",
]
