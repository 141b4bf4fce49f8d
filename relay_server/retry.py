"""What happens to a delivery after a failed attempt: pure functions, no I/O.

Backoff is exponential with full jitter: the delay before retry n (n >= 1) is uniform in
[0, min(cap, initial * factor ** (n - 1))]. A delivery goes DEAD once it has used
max_attempts, or once max_age has passed since its first attempt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from relay_server import models

MS = 1
SECOND_MS = 1000 * MS
HOUR_MS = 3600 * SECOND_MS


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    initial_ms: int = 5 * SECOND_MS
    factor: float = 2.0
    cap_ms: int = HOUR_MS
    max_attempts: int = 60
    max_age_ms: int = 48 * HOUR_MS

    def __post_init__(self) -> None:
        if self.initial_ms < 0 or self.cap_ms < self.initial_ms:
            raise ValueError("backoff needs 0 <= initial_ms <= cap_ms")
        if self.factor < 1:
            raise ValueError("backoff factor must be >= 1")
        if self.max_attempts < 1 or self.max_age_ms < 1:
            raise ValueError("max_attempts and max_age_ms must be positive")


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    state: models.DeliveryState  # PENDING (retry) or DEAD
    available_at_ms: int  # when a PENDING delivery may be leased again


def backoff_ceiling_ms(policy: RetryPolicy, failures: int) -> int:
    """The upper bound of the jittered delay after `failures` failed attempts (>= 1)."""
    exponent = max(failures - 1, 0)
    # Cap the exponent before raising so huge attempt counts cannot overflow floats.
    if exponent > 64:
        return policy.cap_ms
    return int(min(policy.cap_ms, policy.initial_ms * policy.factor**exponent))


def backoff_ms(policy: RetryPolicy, failures: int, rand: float) -> int:
    """Full jitter: rand in [0, 1) scales the ceiling."""
    return int(backoff_ceiling_ms(policy, failures) * rand)


def after_failure(
    policy: RetryPolicy,
    *,
    attempts: int,
    first_attempt_ms: int,
    now_ms: int,
    retry_after_ms: int | None,
    rand: float | None = None,
) -> Decision:
    """Next state of a delivery whose attempt number `attempts` just failed."""
    if attempts >= policy.max_attempts or now_ms - first_attempt_ms >= policy.max_age_ms:
        return Decision(state=models.DeliveryState.DEAD, available_at_ms=now_ms)
    if retry_after_ms is None:
        delay = backoff_ms(policy, attempts, random.random() if rand is None else rand)
    else:
        delay = min(max(retry_after_ms, 0), policy.cap_ms)
    return Decision(state=models.DeliveryState.PENDING, available_at_ms=now_ms + delay)
