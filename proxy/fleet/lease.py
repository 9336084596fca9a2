"""Leadership as this member sees it: pure arithmetic over a monotonic clock, no I/O.

The lease key lives in the store with a TTL of `lease` * TTL_FRACTION, so a dead leader's key
is gone, and another member has it, within `lease` of the death (`lease` is the operator's
bound). It is renewed every `lease` * RENEW_FRACTION. The store's TTL starts when a renewal
*arrives*, which is after it was sent, so the lease is ours at least until `sent + ttl`. We
stop deciding earlier, at `sent + lease * DECIDE_FRACTION`, so a member that is slowed, paused
or cut off stops before another member can take the lease (argo-rollouts #2117); the fencing
number refuses a late write anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

# The lease key's TTL in the store (fraction of `lease`): the rest of `lease` is for another
# member to notice it expired and take it.
TTL_FRACTION = 0.8
# Renew this often (fraction of the lease): two renewals can fail before we stop deciding.
RENEW_FRACTION = 0.15
# A leader decides until this fraction of the lease after the last renewal it sent: well
# before the key can expire (TTL_FRACTION).
DECIDE_FRACTION = 0.5
# A member that does not lead tries to take the lease at least this often (fraction of the
# lease), and right when the holder's key expires.
ACQUIRE_FRACTION = 0.2


@dataclass
class Leadership:
    """Whether this member holds the lease and may decide."""

    lease: float  # seconds
    epoch: int | None = None  # the fencing number of our lease; None: not the leader
    decide_until: float = 0.0  # monotonic

    def acquired(self, epoch: int, sent_at: float) -> None:
        self.epoch = epoch
        self.decide_until = sent_at + self.lease * DECIDE_FRACTION

    def renewed(self, sent_at: float) -> None:
        if self.epoch is not None:
            self.decide_until = max(self.decide_until, sent_at + self.lease * DECIDE_FRACTION)

    def lost(self) -> None:
        self.epoch = None
        self.decide_until = 0.0

    def deciding(self, now: float) -> bool:
        """True while this member may take a decision (and write it, fenced)."""
        return self.epoch is not None and now < self.decide_until

    def expired(self, now: float) -> bool:
        """We held the lease but could not renew it in time: give it up."""
        return self.epoch is not None and now >= self.decide_until

    @property
    def ttl(self) -> float:
        """The lease key's TTL in the store (seconds)."""
        return self.lease * TTL_FRACTION

    @property
    def renew_every(self) -> float:
        return self.lease * RENEW_FRACTION

    @property
    def acquire_every(self) -> float:
        return self.lease * ACQUIRE_FRACTION
