"""A Bastion cluster for tests: Redis, PostgreSQL, three replicas and HAProxy, started by the
same launcher as `make cluster` (deploy/cluster.py), once for the test session.

Use it with `from tests.cluster import cluster  # noqa: F401` in a test module. Beside the
quickstart's demo it runs the everything-server fixture (one process for all replicas) behind
grants the cluster tests need: acme uses everything, globex one rate-limited tool and one that
needs the client's confirmation, and one more agent that a test suspends.

Redis, PostgreSQL and HAProxy are Debian packages that `make test` installs; missing, the
tests fail on CI and are skipped elsewhere.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from deploy import cluster as launcher
from deploy.cluster import Cluster
from tests import pg
from tests.conftest import FIXTURES, IN_CI, until
from tests.redis_server import binary as redis_binary

from bastion.identity.dpop import make_proof
from bastion.identity.jwt import mint
from bastion.identity.keys import SigningKey, thumbprint

__all__ = [
    "EVERYTHING",
    "RATE",
    "SUSPENDABLE",
    "Cluster",
    "admin",
    "agent_key",
    "assertion",
    "cluster",
    "direct",
    "restarted",
    "token",
    "token_form",
]

EVERYTHING = "/servers/everything/mcp"
RATE = 6  # calls per minute of the rate-limited tool, across the whole cluster
SUSPENDABLE = "acme-suspendable"
JWT_BEARER = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

OVERRIDES: dict[str, Any] = {
    "limits": {"sse_keepalive_seconds": 1},
    "auth": {
        "agents": [
            {
                "id": SUSPENDABLE,
                "environment": "demo",
                "tenant": "acme",
                "owner": "tests",
                "purpose": "suspended by a test",
            },
        ],
    },  # fmt: skip
    "upstreams": {
        "everything": {"transport": "http", "environment": "demo", "url": "{upstream:everything}"}
    },
    "policy": {
        "catalog_timeout_seconds": 5,
        "grants": [
            {
                "id": "acme-everything",
                "tenant": "acme",
                "server": "everything",
                "tools": "*",
                "prompts": "*",
                "resources": "*",
            },
            {
                "id": "globex-rated",
                "tenant": "globex",
                "server": "everything",
                "tools": ["test_simple_text"],
                "rate": f"{RATE}/minute",
            },
            {
                "id": "globex-confirmed",
                "tenant": "globex",
                "server": "everything",
                "tools": ["test_image_content"],
                "approval": "client",
            },
            {
                "id": "globex-roomy",
                "tenant": "globex",
                "server": "everything",
                "tools": ["json_schema_2020_12_tool"],
                "rate": "100000/minute",
            },
        ],
    },  # fmt: skip
}


def _require_binaries() -> None:
    redis_binary()
    pg.binaries()
    if not (shutil.which("haproxy") or Path("/usr/sbin/haproxy").exists()):
        message = "haproxy is not installed; run `make test`, which installs it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    """Three replicas behind HAProxy on Redis and PostgreSQL, for the whole session."""
    _require_binaries()
    root = Path(tempfile.mkdtemp(prefix="bastion-cluster-"))
    everything = [sys.executable, str(FIXTURES / "everything_server.py"), "--port", "{port}"]
    running = launcher.start(root, 3, OVERRIDES, {"everything": everything})
    try:
        yield running
    finally:
        running.stop()
        shutil.rmtree(root, ignore_errors=True)


def direct(cluster: Cluster, replica: str, path: str = EVERYTHING) -> str:
    """A URL on one replica's own port, past the balancer."""
    return f"http://127.0.0.1:{cluster.part(replica).port}{path}"


def restarted(cluster: Cluster, name: str) -> None:
    """Start a killed process again and wait until the balancer sends it traffic."""
    cluster.restart(name)
    until(lambda: launcher.balanced(cluster), f"HAProxy to see {name} UP", seconds=30)


def agent_key(cluster: Cluster, agent: str) -> SigningKey:
    """A seeded agent's private key, from the replicas' shared state_dir."""
    pem = (cluster.root / "state" / "agents" / f"{agent}.pem").read_bytes()
    key = SigningKey.from_pem(pem, "unset", "ES256")
    return SigningKey.from_pem(pem, thumbprint(key.public_jwk()), "ES256")


def assertion(cluster: Cluster, agent: str) -> str:
    """A fresh private_key_jwt client assertion of `agent` for the cluster's token endpoint."""
    now = int(time.time())
    claims = {"iss": agent, "sub": agent, "aud": cluster.base, "iat": now, "exp": now + 60,
              "jti": uuid.uuid4().hex}  # fmt: skip
    return mint(agent_key(cluster, agent), claims, typ="JWT")


def token_form(cluster: Cluster, agent: str, path: str) -> dict[str, str]:
    """The client_credentials form of `agent` for the resource `path` behind the balancer."""
    return {
        "grant_type": "client_credentials",
        "client_assertion": assertion(cluster, agent),
        "client_assertion_type": JWT_BEARER,
        "resource": cluster.url(path),
    }


def token(
    cluster: Cluster, agent: str, path: str = EVERYTHING, dpop: SigningKey | None = None
) -> str:
    """An access token from the cluster's token endpoint, through the balancer."""
    url = cluster.url("/oauth/token")
    headers = {}
    if dpop is not None:
        headers["DPoP"] = make_proof(dpop, "POST", url, time.time())
    response = httpx.post(url, data=token_form(cluster, agent, path), headers=headers, timeout=10)
    assert response.status_code == 200, response.text
    return str(response.json()["access_token"])


def admin(cluster: Cluster) -> dict[str, str]:
    """The headers of an admin API request."""
    return {"Authorization": f"Bearer {cluster.env[launcher.ADMIN_VAR]}"}
