"""Per-tenant bounds on open connections and on responses running or queued at once.

The totals are bounded elsewhere (``--max-connections`` by the server, the engine's queue by
``--max-waiting-requests``); these bounds keep one tenant from taking all of them. Counting
happens on the event loop only, so plain dicts suffice. Every ``acquire_*`` that returns is
paired with one ``release_*``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from assistant.errors import RateLimitExceeded


@dataclass
class TenantLimits:
    max_connections_per_tenant: int
    max_responses_per_tenant: int | None  # None: no bound of its own (one tenant: the engine's queue bounds it)
    _connections: Counter[str] = field(default_factory=Counter)
    _responses: Counter[str] = field(default_factory=Counter)

    def acquire_connection(self, tenant: str) -> bool:
        """Count a new connection; False (nothing counted) when the tenant is at its bound."""
        if self._connections[tenant] >= self.max_connections_per_tenant:
            return False
        self._connections[tenant] += 1
        return True

    def release_connection(self, tenant: str) -> None:
        self._connections[tenant] -= 1
        if self._connections[tenant] <= 0:
            del self._connections[tenant]

    def acquire_response(self, tenant: str) -> int | None:
        """Count a new response; returns how many more the tenant may start (None: unbounded). Raises a coded
        error at the bound."""
        bound = self.max_responses_per_tenant
        if bound is not None and self._responses[tenant] >= bound:
            raise RateLimitExceeded(f"This key already has {bound} responses running or queued, the most allowed; "
                                    "retry when one ends.")
        self._responses[tenant] += 1
        return None if bound is None else bound - self._responses[tenant]

    def release_response(self, tenant: str) -> None:
        self._responses[tenant] -= 1
        if self._responses[tenant] <= 0:
            del self._responses[tenant]

    def num_responses(self, tenant: str) -> int:
        return self._responses[tenant]
