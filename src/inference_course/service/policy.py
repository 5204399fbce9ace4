"""The policies the service puts in front of the engine: who may call, how often, how many at once.

* ``KeyRing``: Bearer API keys, each belonging to a tenant. Keys are compared as SHA-256 digests with
  ``hmac.compare_digest`` against every known key (the time taken does not tell an attacker how much
  of a guess was right, nor which key matched), and only the tenant's name ever reaches a log.
* ``TokenBucket``: per-tenant rate limiting. A bucket holds at most ``burst`` tokens and refills at
  ``rate`` tokens per second; a request takes one token or is refused with the time until the next
  token (sent to the client as ``Retry-After``).
* ``Admission``: a cap on requests in flight. There is no queue in the service: a request beyond the
  cap is answered 503 at once, so that a client (or the load balancer) retries elsewhere instead of
  waiting behind an unbounded line. The engine's own scheduler still batches what was admitted.
"""
from __future__ import annotations

import hashlib
import hmac
import math
import threading
import time
from collections.abc import Callable, Mapping


def parse_keys(spec: str | None) -> dict[str, str]:
    """``"tenant-a:key1,tenant-b:key2"`` -> ``{"key1": "tenant-a", "key2": "tenant-b"}``."""
    keys: dict[str, str] = {}
    for number, item in enumerate((spec or "").split(","), 1):
        item = item.strip()
        if not item:
            continue
        tenant, sep, key = item.partition(":")
        tenant, key = tenant.strip(), key.strip()
        # The messages name the entry by its position: an entry without ':' may be a bare key.
        if not sep or not tenant or not key:
            raise ValueError(f"API key entry {number} must look like 'tenant:key'")
        if key in keys and keys[key] != tenant:
            raise ValueError(f"API key entry {number} gives tenant {tenant!r} the key of tenant {keys[key]!r}")
        keys[key] = tenant
    return keys


class KeyRing:
    """API keys -> tenants. Empty: authentication is off and every caller is tenant ``anonymous``."""

    def __init__(self, keys: Mapping[str, str] | None = None):
        self._digests = [(hashlib.sha256(k.encode()).digest(), tenant) for k, tenant in (keys or {}).items()]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def tenant(self, authorization: str | None) -> str | None:
        """The tenant of an ``Authorization: Bearer <key>`` header, or None when it is not a valid key."""
        if not self.enabled:
            return "anonymous"
        if not authorization:
            return None
        scheme, _, key = authorization.partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            return None
        digest = hashlib.sha256(key.strip().encode()).digest()
        found = None
        for known, tenant in self._digests:  # no early exit: every key is compared
            if hmac.compare_digest(digest, known):
                found = tenant
        return found


class TokenBucket:
    """``rate`` requests per second on average, bursts of up to ``burst``."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        if rate <= 0 or burst < 1:
            raise ValueError(f"rate must be > 0 and burst >= 1, got rate={rate}, burst={burst}")
        self.rate, self.burst, self.clock = float(rate), int(burst), clock
        self.tokens = float(burst)
        self.updated = clock()

    def take(self) -> float:
        """Take one token: 0.0 when allowed, else the seconds until a token will be there."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    """One ``TokenBucket`` per tenant (None rate: no limit)."""

    def __init__(self, rate: float | None, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate, self.burst, self.clock = rate, burst, clock
        self._buckets: dict[str, TokenBucket] = {}
        self._lock = threading.Lock()

    def retry_after(self, tenant: str) -> float:
        """0.0 when ``tenant`` may send a request now, else the seconds to wait."""
        if self.rate is None:
            return 0.0
        with self._lock:
            bucket = self._buckets.get(tenant)
            if bucket is None:
                bucket = self._buckets[tenant] = TokenBucket(self.rate, self.burst, self.clock)
            return bucket.take()


def retry_after_header(seconds: float) -> str:
    """``Retry-After`` takes whole seconds; round up so that a client that obeys it is let in."""
    return str(max(1, math.ceil(seconds)))


class Admission:
    """At most ``limit`` requests in flight (None: no cap). Single event loop: no lock needed."""

    def __init__(self, limit: int | None):
        if limit is not None and limit < 1:
            raise ValueError(f"max_in_flight must be >= 1, got {limit}")
        self.limit = limit
        self.in_flight = 0

    def try_enter(self) -> bool:
        if self.limit is not None and self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def leave(self) -> None:
        self.in_flight -= 1
