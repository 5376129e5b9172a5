"""The admin API's access reviews, the same operations as `bastion review`:

```
GET  /admin/review?since=30d                       the findings as of now (no review started)
POST /admin/reviews                  {"since": "30d", "by": "..."}              201, the review
GET  /admin/reviews/{id}                           the review, its findings and decisions
POST /admin/reviews/{id}/decisions   {"finding": "...", "decision": "keep|revoke",
                                      "reason": "...", "by": "..."}
POST /admin/reviews/{id}/close       {"by": "..."}
GET  /admin/reviews/{id}/report?format=md|json     the report for auditors
```

Every act is written to the audit trail (`admin/reviews/start|decide|close`). A `revoke` that
suspends an agent is in force on this gateway before the answer (its view re-read), and on
every other gateway of the registry within its poll.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion.audit import AuditRecord, AuditWriter
from bastion.audit.read import parse_time
from bastion.config import Settings
from bastion.control.admin import params as ask
from bastion.control.governance import reviewer
from bastion.control.governance.reviews import Review
from bastion.errors import AuditUnavailable, BadRequest, shown
from bastion.pipeline.chain import Pipeline

__all__ = ["ReviewApi"]

log = logging.getLogger("bastion.admin")
_ACTOR = "admin"


class ReviewApi:
    """The review endpoints over one gateway's configuration, pipeline and audit writer."""

    def __init__(self, settings: Settings, pipeline: Pipeline, writer: AuditWriter | None) -> None:
        self._settings = settings
        self._pipeline = pipeline
        self._writer = writer

    def routes(self) -> list[Route]:
        """The routes, relative to the admin prefix."""
        return [
            Route("/review", self.findings),
            Route("/reviews", self.start, methods=["POST"]),
            Route("/reviews/{review_id}", self.show),
            Route("/reviews/{review_id}/decisions", self.decide, methods=["POST"]),
            Route("/reviews/{review_id}/close", self.close, methods=["POST"]),
            Route("/reviews/{review_id}/report", self.report),
        ]

    async def findings(self, request: Request) -> Response:
        """The findings of the rules as of now."""
        since = ask.params(request, ("since",)).get("since", "30d")
        now = time.time()
        start = parse_time(since[:100], now, "since")
        found = await asyncio.to_thread(reviewer.findings, self._settings, start, now)
        return _json(200, {"since": since, "findings": [f.to_dict() for f in found]})

    async def start(self, request: Request) -> Response:
        """Open a review of the findings as of now; 409 while another is open."""
        ask.params(request, ())
        given = await ask.fields(request, ("since", "by"))
        since, by = given.get("since", "30d"), given.get("by", _ACTOR)
        now = time.time()
        start = parse_time(since[:100], now, "since")

        def run() -> Review:
            found = reviewer.findings(self._settings, start, now)
            with reviewer.review_store(self._settings) as store:
                return store.start(found, {"since": since}, by, now)

        review = await asyncio.to_thread(run)
        audited = await self._append(
            reviewer.record("start", review, by, _client(request), findings=len(review.findings))
        )
        return _json(201, {"review": review.to_dict(), "audited": audited})

    async def show(self, request: Request) -> Response:
        """One review with its findings and decisions."""
        ask.params(request, ())
        review = await self._get(request.path_params["review_id"])
        return _json(200, {"review": review.to_dict()})

    async def decide(self, request: Request) -> Response:
        """A decision on one finding, carried out and audited."""
        ask.params(request, ())
        given = await ask.fields(request, ("finding", "decision", "reason", "by"))
        for name in ("finding", "decision"):
            if name not in given:
                raise BadRequest(name, "required")
        review_id, by = request.path_params["review_id"], given.get("by", _ACTOR)
        review, finding, made = await asyncio.to_thread(
            reviewer.decide, self._settings, review_id, given["finding"], given["decision"],
            given.get("reason"), by, time.time(),
        )  # fmt: skip
        directory = self._pipeline.agents
        if finding.kind == "agent" and made.decision == "revoke" and directory is not None:
            await directory.reread()  # in force here before answering, not at the next poll
        record = reviewer.decision_record(review, finding, made, by, _client(request))
        audited = await self._append(record)
        log.info("admin review %s: %s %s: %s", review.id, made.decision, finding.id, made.effect)
        return _json(200, {"decision": made.to_dict(), "audited": audited})

    async def close(self, request: Request) -> Response:
        """Close a review whose findings are all decided; 409 naming what is left."""
        ask.params(request, ())
        by = (await ask.fields(request, ("by",))).get("by", _ACTOR)
        review_id = request.path_params["review_id"]

        def run() -> Review:
            with reviewer.review_store(self._settings) as store:
                return store.close_review(review_id, by, time.time())

        review = await asyncio.to_thread(run)
        audited = await self._append(
            reviewer.record("close", review, by, _client(request), decisions=len(review.decisions))
        )
        return _json(200, {"review": review.to_dict(), "audited": audited})

    async def report(self, request: Request) -> Response:
        """The report: Markdown (text/markdown) or JSON."""
        kind = ask.params(request, ("format",)).get("format", "md")
        if kind not in ("md", "json"):
            raise BadRequest("format", f"expected md or json, found {shown(kind)}")
        review = await self._get(request.path_params["review_id"])
        if kind == "json":
            return _json(200, reviewer.report_json(review))
        return Response(
            reviewer.report_markdown(review),
            headers={"cache-control": "no-store"},
            media_type="text/markdown; charset=utf-8",
        )

    async def _get(self, review_id: str) -> Review:
        def run() -> Review:
            with reviewer.review_store(self._settings) as store:
                return store.get(review_id)

        return await asyncio.to_thread(run)

    async def _append(self, record: AuditRecord) -> bool:
        """The act in the trail; whether it was committed."""
        if self._writer is None:
            return False
        try:
            await self._writer.append(record, True)
        except AuditUnavailable as exc:
            log.error("admin %s not audited: %s", record.method, exc.message)
            return False
        return True


def _client(request: Request) -> str | None:
    client = request.client
    return f"{client.host}:{client.port}" if client else None


def _json(status: int, body: dict[str, Any]) -> Response:
    return Response(
        orjson.dumps(body), status, headers={"cache-control": "no-store"},
        media_type="application/json",
    )  # fmt: skip
