"""The audit trail's error: it cannot take records right now, so the gateway must refuse calls.

```
BastionError
└── AuditUnavailable    audit.unavailable   HTTP 503   JSON-RPC -32603
```
"""

from __future__ import annotations

from bastion.errors import BastionError


class AuditUnavailable(BastionError):
    """The audit store failed, is full or lags too far behind; the call is not audited.

    Raised by a strict `append` whose record did not commit, and by a relaxed one that waited
    too long for room in the queue. The gateway answers 503 and does not forward the call.
    """

    code = "audit.unavailable"
    http_status = 503
    rpc_code = -32603
