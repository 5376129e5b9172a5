"""Putting a policy together: read the sources, build the schema, validate, index."""

from __future__ import annotations

import logging
import os
import re

from bastion.config import PolicySettings
from bastion.errors import PolicyLoadError
from bastion.policy.catalog import Catalog
from bastion.policy.engine import PolicyEngine
from bastion.policy.schema import PolicySchema, build_schema
from bastion.policy.source import (
    Problem,
    SourceText,
    compile_grants,
    compile_separation,
    load_policies,
    read_files,
    validate,
)

log = logging.getLogger("bastion.policy")
_UNRECOGNIZED = re.compile(r'unrecognized action `Bastion::Action::"([^"]+)"`')


def sources_of(settings: PolicySettings) -> list[SourceText]:
    """The policy files, the compiled grants and the built-in environment separation."""
    sources = read_files(settings.files)
    if settings.grants:
        sources.append(compile_grants(settings.grants))
    sources.append(compile_separation(settings.cross_environment))
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
    waiting = _waiting(problems, set(catalog.servers) - set(catalog.listed))
    failed = [p.text for p in problems if p.place not in waiting]
    if failed:
        raise PolicyLoadError(failed)
    for doc in docs:
        if doc.place in waiting:
            log.warning(
                "policy %s (%s) names tools of %s, not listed yet: not in force until it is",
                doc.id,
                doc.origin,
                waiting[doc.place],
            )
    kept = [doc for doc in docs if doc.place not in waiting]
    return PolicyEngine(schema, catalog, kept, version)


def _waiting(problems: list[Problem], unlisted: set[str]) -> dict[tuple[str, int], str]:
    """Policies that fail only because they name tools of upstreams that could not be listed
    (down at start, no saved listing): they wait for those upstreams instead of refusing the
    start. A policy with any other problem is not waiting."""
    waiting: dict[tuple[str, int], str] = {}
    for problem in problems:
        match = _UNRECOGNIZED.search(problem.error)
        if match and match.group(1).partition("__")[0] in unlisted:
            waiting[problem.place] = match.group(1).partition("__")[0]
    for problem in problems:
        if problem.place in waiting and not _UNRECOGNIZED.search(problem.error):
            # Cedar reports follow-on errors for the other actions once one is unknown.
            if "not found" not in problem.error:
                waiting.pop(problem.place)
    return waiting


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
