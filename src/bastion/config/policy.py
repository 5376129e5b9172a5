"""Authorization (`policy:`): Cedar files, YAML grants and exceptions to environment separation."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import ConfigDict, Field, field_validator, model_validator

from bastion.config.base import ENVIRONMENTS, NAME_PATTERN, RATE_PATTERN, Environment, _Frozen

__all__ = [
    "ArgumentRule",
    "CrossEnvironment",
    "Grant",
    "PolicySettings",
]


class ArgumentRule(_Frozen):
    """A constraint on one tool argument in a grant (exactly one of the operators)."""

    equals: str | int | bool | None = None
    like: str | None = None  # Cedar glob: * matches any run of characters
    one_of: tuple[str, ...] | None = None
    max: int | None = None  # integers only

    @model_validator(mode="after")
    def _one(self) -> ArgumentRule:
        given = [k for k in ("equals", "like", "one_of", "max") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of equals, like, one_of, max")
        return self


class Grant(_Frozen):
    """A simple permission compiled to a Cedar permit: who (tenant, agents or roles), which
    server, which tools/prompts/resources, with which constraints and obligations."""

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
    tenant: str  # a tenant name, or "*" for every tenant (flagged by `bastion policy lint`)
    agents: tuple[str, ...] = ()
    roles: tuple[str, ...] = ()
    server: str  # an upstream name, or "*"
    tools: tuple[str, ...] | Literal["*"] = ()
    prompts: tuple[str, ...] | Literal["*"] = ()
    resources: tuple[str, ...] | Literal["*"] = ()  # URI globs
    read_only: bool = False  # only tools a trusted server marks read-only
    arguments: dict[str, ArgumentRule] = Field(default_factory=dict)
    # human: a person with an `approvers` role decides (console, CLI, admin API, link);
    # client (or true, the older spelling): the client is asked through elicitation.
    approval: bool | Literal["human", "client"] = False
    approvers: tuple[str, ...] = ()  # roles that may approve; none: policy.approvers
    approval_timeout_seconds: float | None = Field(None, gt=0)  # none: the policy's
    # Arguments the approver is shown first, marked: recipients, egress targets, amounts.
    sensitive: tuple[str, ...] = ()
    rate: str | None = Field(None, pattern=RATE_PATTERN)
    reason: str | None = None

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if value != "*" and not re.match(NAME_PATTERN, value):
            raise ValueError(f"expected a tenant name or '*', found {value!r}")
        return value

    @model_validator(mode="after")
    def _shape(self) -> Grant:
        if not (self.tools or self.prompts or self.resources):
            raise ValueError("a grant names at least one of tools, prompts, resources")
        if self.arguments and (self.tools == "*" or not self.tools):
            raise ValueError("argument rules need an explicit list of tools")
        return self


class CrossEnvironment(_Frozen):
    """An exception to environment separation: agents of `from_` may reach upstreams of `to`.

    It is written into the built-in `environment-separation` forbid (`unless { … }`), so
    `bastion policy explain` shows it with the rule it relaxes."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)

    from_: Environment = Field(alias="from")  # the agents' environment
    to: Environment  # the upstreams' environment
    tenant: str  # a tenant name, or "*" for every tenant
    agents: tuple[str, ...] = ()  # none: every agent of the tenant in `from`
    servers: tuple[str, ...] = ()  # none: every upstream in `to`
    reason: str = Field(min_length=1)  # why; shown in the policy text

    @field_validator("tenant")
    @classmethod
    def _tenant(cls, value: str) -> str:
        if value != "*" and not re.match(NAME_PATTERN, value):
            raise ValueError(f"expected a tenant name or '*', found {value!r}")
        return value

    @model_validator(mode="after")
    def _crosses(self) -> CrossEnvironment:
        if self.from_ == self.to:
            raise ValueError(f"from and to are both {self.to!r}: nothing to allow")
        return self


class PolicySettings(_Frozen):
    """Authorization: Cedar policy files and YAML grants, evaluated on every request."""

    files: tuple[str, ...] = ()  # .cedar files, relative to the config file
    grants: tuple[Grant, ...] = ()
    # The old name of the top-level `environment` (the gateway's), still read.
    environment: str | None = None
    cross_environment: tuple[CrossEnvironment, ...] = ()
    reload_seconds: float = Field(1.0, gt=0)  # how often the files are checked for changes
    approval_timeout_seconds: float = Field(120.0, gt=0)
    approvers: tuple[str, ...] = ("approver",)  # who may approve held calls by default
    catalog_timeout_seconds: float = Field(10.0, gt=0)  # listing upstream tools at start

    @field_validator("environment")
    @classmethod
    def _environment(cls, value: str | None) -> str | None:
        if value is not None and value not in ENVIRONMENTS:
            raise ValueError(
                f"expected one of {', '.join(ENVIRONMENTS)}, found {value[:40]!r} "
                "(the gateway's environment; write it as the top-level `environment:`)"
            )
        return value
