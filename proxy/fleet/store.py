"""The fleet's store: Redis through redis-py's asyncio client. The only module that talks to it.

Keys, all under `laneswitch:{name}:` so several fleets share one Redis:

    gen        the state's generation; +1 on every state write
    state      the state (JSON: weights, undo points, rollout runs) of generation `gen`
    lease      the leader's "member\\ntoken", with a TTL of `lease`
    epoch      the fencing number: +1 on every acquisition of the lease
    event_id   the decision record's id sequence (INCR)
    events     the decision record's decisions: a sorted set of event JSON by id, at most
               MAX_EVENTS (oldest dropped first)
    noise      its records of NOISE_ACTIONS (reloads, holds, webhook calls), at most
               MAX_NOISE_EVENTS: the local record's rule, so a storm of them never evicts
               a decision
    members    member -> JSON (admin URL, config hash, applied generation, leader view)
    seen       member -> the store's clock (ms) at its last heartbeat
    counts:S   service S's analysis counters reported since the leader last took them
               (see `counts`), expiring
    changes    the pub/sub channel: only generation numbers are published

Every state write is one Lua script that refuses it unless the generation is the one the
writer read (compare and set), and, for a leader's write, unless the lease and the epoch are
still the writer's (fencing). Leadership is three small scripts (acquire with SET NX PX and an
epoch increment, extend if the token matches, release if it matches): not redis-py's Lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.events import MAX_EVENTS, MAX_NOISE_EVENTS, NOISE_ACTIONS

# A members-hash entry not seen for this long (seconds) is removed from the table.
MEMBER_FORGET_AFTER = 3600.0
# How long one call to the store may take before the store counts as unavailable (seconds).
CALL_TIMEOUT = 1.0
# A service's open counts expire this long after their last increment (a fleet whose leader
# never takes them, or that went away, leaves nothing behind for long).
COUNTS_TTL = 3600

# Retries of a call whose pooled connection turned out to be closed (see `FleetStore`).
RECONNECT_RETRIES = 1

T = TypeVar("T")


class StoreUnavailable(Exception):
    """The store cannot be reached (or answered with an error)."""


class WriteRefused(Exception):
    """A state write was refused: `stale` (the generation moved on) or `fenced` (the writer no
    longer holds the lease)."""

    def __init__(self, kind: str, generation: int) -> None:
        super().__init__(f"state write refused ({kind}; store at generation {generation})")
        self.kind = kind
        self.generation = generation


@dataclass(frozen=True, slots=True)
class Fence:
    """A leader's proof: its lease value and epoch, checked by every write it makes."""

    value: str
    epoch: int


@dataclass(frozen=True, slots=True)
class MemberRecord:
    member: str
    info: dict[str, Any]
    age: float | None  # seconds since its last heartbeat, by the store's clock


# KEYS: lease, epoch. ARGV: value, lease ms. The epoch when taken, else minus the holder's
# remaining ms (so the caller can try again right when it expires).
_ACQUIRE = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return redis.call('INCR', KEYS[2])
end
return -math.max(redis.call('PTTL', KEYS[1]), 0)
"""
# KEYS: lease. ARGV: value, lease ms. 1 extended, 0 not ours.
_EXTEND = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""
# KEYS: lease. ARGV: value.
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""
# Events are passed as one letter, `d` (a decision) or `n` (noise: which set it goes to), then
# JSON whose first member is `{"id": 0`; the script puts the id it draws there (no JSON
# decoding in Lua: its cjson turns empty lists into objects).
_EVENT_PREFIX = '{"id": 0'
_DECISION, _NOISE = "d", "n"
_APPEND = """
local ids = {}
for i = FIRST, #ARGV do
  local id = redis.call('INCR', KEYS[4])
  local key = KEYS[3]
  if string.sub(ARGV[i], 1, 1) == 'n' then key = KEYS[7] end
  redis.call('ZADD', key, id, '{"id": ' .. id .. string.sub(ARGV[i], PREFIX + 2))
  ids[#ids + 1] = id
end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -(MAX + 1))
redis.call('ZREMRANGEBYRANK', KEYS[7], 0, -(NOISE_CAP + 1))
"""
# KEYS: gen, state, events, event_id, lease, epoch, noise.
# ARGV: expected gen, state JSON ('' = events only, no generation check), fence value ('' = no
# fence), fence epoch, channel, events... Returns {gen, ids...}, or {-1, gen} stale, {-2, gen}
# fenced.
_COMMIT = (
    """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
if ARGV[3] ~= '' then
  if redis.call('GET', KEYS[5]) ~= ARGV[3]
     or tonumber(redis.call('GET', KEYS[6]) or '0') ~= tonumber(ARGV[4]) then
    return {-2, current}
  end
end
if ARGV[2] ~= '' and current ~= tonumber(ARGV[1]) then
  return {-1, current}
end
"""
    + _APPEND.replace("FIRST", "6")
    .replace("PREFIX", str(len(_EVENT_PREFIX)))
    .replace("NOISE_CAP", str(MAX_NOISE_EVENTS))
    .replace("MAX", str(MAX_EVENTS))
    + """
if ARGV[2] ~= '' then
  current = current + 1
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('SET', KEYS[1], current)
  redis.call('PUBLISH', ARGV[5], current)
end
return {current, unpack(ids)}
"""
)
# KEYS: gen, state, events, event_id, epoch, noise. ARGV: gen, state JSON, least event id,
# channel, least epoch, events (`d` or `n`, then JSON with their ids)... Only into an empty
# store (restarted or never used): 1 seeded, 0 not. The id and epoch sequences go on from where
# the members saw them.
_SEED = f"""
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
if tonumber(redis.call('GET', KEYS[4]) or '0') < tonumber(ARGV[3]) then
  redis.call('SET', KEYS[4], ARGV[3])
end
if tonumber(redis.call('GET', KEYS[5]) or '0') < tonumber(ARGV[5]) then
  redis.call('SET', KEYS[5], ARGV[5])
end
for i = 6, #ARGV do
  local text = string.sub(ARGV[i], 2)
  local key = KEYS[3]
  if string.sub(ARGV[i], 1, 1) == 'n' then key = KEYS[6] end
  redis.call('ZADD', key, cjson.decode(text)['id'], text)
end
redis.call('ZREMRANGEBYRANK', KEYS[3], 0, -({MAX_EVENTS} + 1))
redis.call('ZREMRANGEBYRANK', KEYS[6], 0, -({MAX_NOISE_EVENTS} + 1))
redis.call('PUBLISH', ARGV[4], ARGV[1])
return 1
"""
# KEYS: counts, lease, epoch. ARGV: fence value, fence epoch. {1, fields} taken (and emptied),
# {0, 0} fenced.
_TAKE = """
if redis.call('GET', KEYS[2]) ~= ARGV[1]
   or tonumber(redis.call('GET', KEYS[3]) or '0') ~= tonumber(ARGV[2]) then
  return {0, 0}
end
local fields = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
return {1, fields}
"""
# KEYS: members, seen. ARGV: member, JSON, forget-after ms. The store's clock in ms.
_HEARTBEAT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[1], now)
local seen = redis.call('HGETALL', KEYS[2])
for i = 1, #seen, 2 do
  if now - tonumber(seen[i + 1]) > tonumber(ARGV[3]) then
    redis.call('HDEL', KEYS[1], seen[i])
    redis.call('HDEL', KEYS[2], seen[i])
  end
end
return now
"""
# KEYS: members, seen. The store's clock in ms, then the members and their last heartbeats.
_MEMBERS = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
return {now, redis.call('HGETALL', KEYS[1]), redis.call('HGETALL', KEYS[2])}
"""


def _kind(event: Mapping[str, Any]) -> str:
    return _NOISE if event.get("action") in NOISE_ACTIONS else _DECISION


def event_payload(event: Mapping[str, Any]) -> str:
    """An event as the store's scripts take it: its kind, then JSON starting with a
    placeholder id."""
    body = {key: value for key, value in event.items() if key != "id"}
    text = json.dumps({"id": 0, **body}, sort_keys=False, separators=(", ", ": "))
    assert text.startswith(_EVENT_PREFIX)
    return _kind(event) + text


def new_lease_value(member: str) -> str:
    return f"{member}\n{secrets.token_hex(16)}"


class FleetStore:
    """One fleet's keys in one Redis; every call raises StoreUnavailable when it cannot be
    reached within CALL_TIMEOUT."""

    def __init__(self, url: str, name: str, *, timeout: float = CALL_TIMEOUT) -> None:
        self.url = url
        self.name = name
        self.timeout = timeout
        self.prefix = f"laneswitch:{name}:"
        self.channel = self.key("changes")
        self.redis: aioredis.Redis = aioredis.from_url(
            url,
            decode_responses=True,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry_on_timeout=False,
            health_check_interval=0,
        )
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._extend = self.redis.register_script(_EXTEND)
        self._release = self.redis.register_script(_RELEASE)
        self._commit = self.redis.register_script(_COMMIT)
        self._seed = self.redis.register_script(_SEED)
        self._heartbeat = self.redis.register_script(_HEARTBEAT)
        self._members = self.redis.register_script(_MEMBERS)
        self._take = self.redis.register_script(_TAKE)

    def key(self, name: str) -> str:
        return self.prefix + name

    async def _call(self, call: Callable[[], Awaitable[T]]) -> T:
        """`call()` within the timeout; once more at once if its pooled connection turned out
        to be closed (every pooled connection is, after the store restarted). A write that
        did reach the store before its connection broke is refused as stale the second time:
        generations make a retry safe."""
        for attempt in range(1 + RECONNECT_RETRIES):
            try:
                async with asyncio.timeout(self.timeout):
                    return await call()
            except RedisConnectionError as exc:
                if attempt < RECONNECT_RETRIES:
                    continue
                raise StoreUnavailable(f"fleet store unavailable: {exc}") from exc
            except (RedisError, OSError, TimeoutError) as exc:
                raise StoreUnavailable(
                    f"fleet store unavailable: {exc or type(exc).__name__}"
                ) from exc
        raise AssertionError("unreachable")

    async def close(self) -> None:
        with contextlib.suppress(Exception):
            await self.redis.aclose()

    # -- the state ---------------------------------------------------------------------------

    async def ping(self) -> None:
        await self._call(lambda: self.redis.ping())

    async def generation(self) -> int | None:
        """The state's generation; None when the store holds no state (new or restarted)."""
        raw = await self._call(lambda: self.redis.get(self.key("gen")))
        return None if raw is None else int(raw)

    async def read(self) -> tuple[int, dict[str, Any]] | None:
        """(generation, state), read together; None when the store holds no state."""
        gen, state = await self._call(lambda: self.redis.mget([self.key("gen"), self.key("state")]))
        if gen is None or state is None:
            return None
        data = json.loads(state)
        return int(gen), data if isinstance(data, dict) else {}

    def _state_keys(self) -> list[str]:
        names = ("gen", "state", "events", "event_id", "lease", "epoch", "noise")
        return [self.key(k) for k in names]

    async def commit(
        self,
        expected: int,
        state: Mapping[str, Any] | None,
        events: Sequence[Mapping[str, Any]] = (),
        fence: Fence | None = None,
    ) -> tuple[int, list[int]]:
        """Write `state` as generation expected + 1 with `events` appended (state None: only
        the events, no generation check). Returns (generation, event ids). WriteRefused when
        the generation is not `expected` or `fence` no longer holds the lease."""
        args: list[Any] = [
            expected,
            json.dumps(state, sort_keys=True) if state is not None else "",
            fence.value if fence is not None else "",
            fence.epoch if fence is not None else 0,
            self.channel,
            *(event_payload(e) for e in events),
        ]
        answer = await self._call(lambda: self._commit(keys=self._state_keys(), args=args))
        first = int(answer[0])
        if first == -1:
            raise WriteRefused("stale", int(answer[1]))
        if first == -2:
            raise WriteRefused("fenced", int(answer[1]))
        return first, [int(i) for i in answer[1:]]

    async def seed(
        self,
        generation: int,
        state: Mapping[str, Any],
        events: Sequence[Mapping[str, Any]],
        epoch: int = 0,
    ) -> bool:
        """Put a member's applied state into an empty store, keeping its generation, event
        ids and the fencing epoch it last saw; False when the store is not empty (another
        member seeded it first)."""
        last = max((int(e["id"]) for e in events), default=0)
        args: list[Any] = [
            generation,
            json.dumps(state, sort_keys=True),
            last,
            self.channel,
            epoch,
            *(_kind(e) + json.dumps(dict(e)) for e in events),
        ]
        keys = [self.key(k) for k in ("gen", "state", "events", "event_id", "epoch", "noise")]
        return bool(await self._call(lambda: self._seed(keys=keys, args=args)))

    async def events_since(
        self, since: int, limit: int = MAX_EVENTS + MAX_NOISE_EVENTS
    ) -> list[dict[str, Any]]:
        """The record after `since`, decisions and noise merged by id, oldest first."""

        def send() -> Awaitable[list[Any]]:
            pipe = self.redis.pipeline(transaction=True)
            for name in ("events", "noise"):
                pipe.zrangebyscore(self.key(name), f"({since}", "+inf", start=0, num=limit)
            return pipe.execute()

        decisions, noise = await self._call(send)
        found = [json.loads(str(item)) for item in [*decisions, *noise]]
        found.sort(key=lambda event: int(event.get("id", 0)))
        return found[:limit]

    async def last_event_id(self) -> int:
        raw = await self._call(lambda: self.redis.get(self.key("event_id")))
        return int(raw) if raw is not None else 0

    # -- the lease ---------------------------------------------------------------------------

    async def acquire(self, value: str, lease: float) -> int:
        """The new epoch when the lease was free and is now `value`'s, else 0."""
        epoch, _ = await self.try_acquire(value, lease)
        return epoch

    async def try_acquire(self, value: str, lease: float) -> tuple[int, float]:
        """(the new epoch, 0) when the lease was free and is now `value`'s, else (0, seconds
        until the holder's lease expires unless renewed)."""
        keys = [self.key("lease"), self.key("epoch")]
        answer = int(await self._call(lambda: self._acquire(keys=keys, args=[value, _ms(lease)])))
        return (answer, 0.0) if answer > 0 else (0, -answer / 1000)

    async def extend(self, value: str, lease: float) -> bool:
        keys = [self.key("lease")]
        return bool(await self._call(lambda: self._extend(keys=keys, args=[value, _ms(lease)])))

    async def release(self, value: str) -> bool:
        return bool(await self._call(lambda: self._release(keys=[self.key("lease")], args=[value])))

    async def epoch(self) -> int:
        raw = await self._call(lambda: self.redis.get(self.key("epoch")))
        return int(raw) if raw is not None else 0

    async def leader(self) -> str | None:
        """The member holding the lease, if any."""
        raw = await self._call(lambda: self.redis.get(self.key("lease")))
        return str(raw).split("\n", 1)[0] if raw else None

    # -- members -----------------------------------------------------------------------------

    async def heartbeat(self, member: str, info: Mapping[str, Any]) -> None:
        keys = [self.key("members"), self.key("seen")]
        args: list[str | int] = [
            member,
            json.dumps(info, sort_keys=True),
            _ms(MEMBER_FORGET_AFTER),
        ]
        await self._call(lambda: self._heartbeat(keys=keys, args=args))

    async def members(self) -> list[MemberRecord]:
        keys = [self.key("members"), self.key("seen")]
        now, infos, seen = await self._call(lambda: self._members(keys=keys, args=[]))
        last = {seen[i]: int(seen[i + 1]) for i in range(0, len(seen), 2)}
        found = []
        for i in range(0, len(infos), 2):
            member = infos[i]
            try:
                info = json.loads(infos[i + 1])
            except ValueError:
                continue
            at = last.get(member)
            age = (int(now) - at) / 1000 if at is not None else None
            found.append(MemberRecord(member, info if isinstance(info, dict) else {}, age))
        return sorted(found, key=lambda record: record.member)

    # -- counts ------------------------------------------------------------------------------

    async def add_counts(self, reports: Mapping[str, Mapping[str, int]]) -> None:
        """Add a member's counter deltas (service -> HINCRBY fields) to each service's open
        counts, all or nothing (one MULTI): a report that failed is sent again whole, never
        counted twice."""
        if not any(reports.values()):
            return

        def send() -> Awaitable[list[Any]]:
            pipe = self.redis.pipeline(transaction=True)
            for service, fields in reports.items():
                if not fields:
                    continue
                key = self.counts_key(service)
                for name, value in fields.items():
                    pipe.hincrby(key, name, value)
                pipe.expire(key, COUNTS_TTL)
            return pipe.execute()

        await self._call(send)

    async def take_counts(self, service: str, fence: Fence) -> dict[str, str]:
        """The service's open counts, read and emptied in one step: what every member reported
        since the last take. Only the leader takes (a deposed one would steal the window of the
        one that replaced it): WriteRefused("fenced") when `fence` no longer holds the lease."""
        keys = [self.counts_key(service), self.key("lease"), self.key("epoch")]
        args: list[Any] = [fence.value, fence.epoch]
        answer = await self._call(lambda: self._take(keys=keys, args=args))
        if int(answer[0]) != 1:
            raise WriteRefused("fenced", int(answer[1]))
        flat = answer[1]
        return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}

    def counts_key(self, service: str) -> str:
        return self.key(f"counts:{service}")

    # -- change notices ----------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[aioredis.client.PubSub]:
        """A subscription to the generation channel (the caller polls `get_message`)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._call(lambda: pubsub.subscribe(self.channel))
            yield pubsub
        finally:
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
