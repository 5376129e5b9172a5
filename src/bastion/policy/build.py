"""Putting a policy together: read the sources, build the schema, validate, index."""

from __future__ import annotations

import os

from bastion.config import PolicySettings
from bastion.policy.catalog import Catalog
from bastion.policy.engine import PolicyEngine
from bastion.policy.schema import PolicySchema, build_schema
from bastion.policy.source import (
    PolicyLoadError,
    SourceText,
    compile_grants,
    load_policies,
    read_files,
    validate,
)


def sources_of(settings: PolicySettings) -> list[SourceText]:
    """The policy files and the compiled grants."""
    sources = read_files(settings.files)
    if settings.grants:
        sources.append(compile_grants(settings.grants))
    return sources


def build_engine(
    settings: PolicySettings,
    catalog: Catalog,
    version: int = 1,
    schema: PolicySchema | None = None,
) -> PolicyEngine:
    """A validated engine, or PolicyLoadError naming every problem."""
    sources = sources_of(settings)
    docs = load_policies(sources)
    schema = schema or build_schema(catalog)
    problems = validate(sources, schema.schema)
    if problems:
        raise PolicyLoadError(problems)
    return PolicyEngine(schema, catalog, docs, version)


def fingerprint(settings: PolicySettings) -> tuple[tuple[str, int, int], ...]:
    """What changes when a policy file is edited (mtime in ns and size; missing = -1)."""
    out = []
    for file in settings.files:
        try:
            st = os.stat(file)
            out.append((file, st.st_mtime_ns, st.st_size))
        except OSError:
            out.append((file, -1, -1))
    return tuple(out)
