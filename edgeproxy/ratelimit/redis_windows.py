"""Sliding-window logs in Redis: one Lua script checks and charges every policy of a request atomically.

Each bucket is a sorted set (score: Redis server time in ms; member: `<call id>:<index>:<amount>`)
and a running total, so N gateway processes share exact counters and one clock. The script
runs by EVALSHA (redis-py loads it on the first NOSCRIPT); both keys of a bucket share a
hash tag, and both expire a second after the window, so idle buckets cost nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis

from ..cache.remote import FaultGate, GuardedRedis, RedisCounters, RedisUnavailable, open_redis
from ..settings import RateLimitSettings
from .windows import Charge, Verdict, WindowsUnavailable

SCRIPT = """
-- KEYS: per charge, its log (sorted set) then its total.  ARGV: mode ('admit' | 'settle'),
-- reservation id, then per charge: window_ms, quota, amount, reserved.  Returns
-- {admitted, wait_ms, used...}; numbers go back as strings because Redis would truncate a
-- Lua number to an integer.  'settle' swaps a reserved entry for the actual amount at the
-- entry's own score (or adds an unreserved charge now).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mode, id = ARGV[1], ARGV[2]
local n = #KEYS / 2
local eps = 1e-9
local used, windows, quotas, amounts = {}, {}, {}, {}

local function amount_of(member)
  return tonumber(string.match(member, ':([^:]+)$'))
end

local function admits(u, amount, quota)
  if amount > 0 then return u + amount <= quota + eps end
  return u < quota - eps
end

for i = 1, n do
  local log, total = KEYS[2 * i - 1], KEYS[2 * i]
  windows[i] = tonumber(ARGV[4 * i - 1])
  quotas[i] = tonumber(ARGV[4 * i])
  amounts[i] = tonumber(ARGV[4 * i + 1])
  local cutoff = now - windows[i]
  local expired = redis.call('ZRANGEBYSCORE', log, '-inf', cutoff)
  if #expired > 0 then
    local sum = 0
    for _, member in ipairs(expired) do sum = sum + amount_of(member) end
    redis.call('ZREMRANGEBYSCORE', log, '-inf', cutoff)
    if redis.call('ZCARD', log) == 0 then
      redis.call('DEL', total)
    else
      redis.call('INCRBYFLOAT', total, -sum)
    end
  end
  used[i] = math.max(0, tonumber(redis.call('GET', total) or '0'))
end

if mode == 'settle' then
  for i = 1, n do
    local log, total = KEYS[2 * i - 1], KEYS[2 * i]
    local reserved = tonumber(ARGV[4 * i + 2])
    if reserved > 0 then
      local old = id .. ':' .. i .. ':' .. ARGV[4 * i + 2]
      local score = redis.call('ZSCORE', log, old)
      if score and amounts[i] ~= reserved then
        redis.call('ZREM', log, old)
        if amounts[i] > 0 then redis.call('ZADD', log, score, id .. ':' .. i .. ':' .. ARGV[4 * i + 1]) end
        redis.call('INCRBYFLOAT', total, amounts[i] - reserved)
      end
    elseif amounts[i] > 0 then
      redis.call('ZADD', log, now, id .. ':' .. i .. ':' .. ARGV[4 * i + 1])
      redis.call('INCRBYFLOAT', total, amounts[i])
      redis.call('PEXPIRE', log, windows[i] + 1000)
      redis.call('PEXPIRE', total, windows[i] + 1000)
    end
  end
  return {1, '0'}
end

local wait, refused = 0, false
if mode == 'admit' then
  for i = 1, n do
    if not admits(used[i], amounts[i], quotas[i]) then
      refused = true
      -- Walk the oldest entries until enough of the window frees up.
      local freed, found, start = 0, false, 0
      while not found do
        local batch = redis.call('ZRANGE', KEYS[2 * i - 1], start, start + 127, 'WITHSCORES')
        if #batch == 0 then break end
        for j = 1, #batch, 2 do
          freed = freed + amount_of(batch[j])
          if admits(used[i] - freed, amounts[i], quotas[i]) then
            wait = math.max(wait, tonumber(batch[j + 1]) + windows[i] - now)
            found = true
            break
          end
        end
        start = start + 128
      end
      if not found then wait = math.max(wait, windows[i]) end
    end
  end
end

if not refused then
  for i = 1, n do
    if amounts[i] > 0 then
      local log, total = KEYS[2 * i - 1], KEYS[2 * i]
      redis.call('ZADD', log, now, id .. ':' .. i .. ':' .. ARGV[4 * i + 1])
      redis.call('INCRBYFLOAT', total, amounts[i])
      redis.call('PEXPIRE', log, windows[i] + 1000)
      redis.call('PEXPIRE', total, windows[i] + 1000)
      used[i] = used[i] + amounts[i]
    end
  end
end

local reply = {refused and 0 or 1, tostring(wait)}
for i = 1, n do reply[#reply + 1] = tostring(used[i]) end
return reply
"""


class RedisWindows:
    """Windows shared by every gateway process through one Redis; each call bounded by `timeout`."""

    def __init__(
        self, client: aioredis.Redis, *, prefix: str, timeout: float, counters: RedisCounters | None = None
    ) -> None:
        self._client = client
        self._script = client.register_script(SCRIPT)
        self._prefix = prefix + "rl:"
        self._guarded = GuardedRedis("ratelimit", timeout, counters)

    @property
    def gate(self) -> FaultGate:
        return self._guarded.gate

    @classmethod
    def open(cls, settings: RateLimitSettings, counters: RedisCounters | None = None) -> RedisWindows:
        client = open_redis(settings.url, settings.timeout_seconds, settings.max_connections)
        return cls(client, prefix=settings.key_prefix, timeout=settings.timeout_seconds, counters=counters)

    async def start(self) -> None:
        """Open a first connection and load the script, so the first requests pay for neither."""
        try:
            await self._guarded(lambda: self._client.script_load(SCRIPT))
        except RedisUnavailable:
            pass  # counted and warned by the gate; the first request loads it instead

    async def admit(self, charges: Sequence[Charge], reservation: str) -> Verdict:
        reply = await self._run("admit", charges, reservation)
        used = tuple(float(value) for value in reply[2:])
        return Verdict(bool(int(reply[0])), used, float(reply[1]) / 1000.0)

    async def settle(self, charges: Sequence[Charge], reservation: str) -> None:
        """`charges` in the order admission had them: entries are named by reservation and position."""
        await self._run("settle", charges, reservation)

    async def close(self) -> None:
        await self._guarded.calls.drain()
        await self._client.aclose(close_connection_pool=True)

    async def _run(self, mode: str, charges: Sequence[Charge], reservation: str) -> list[bytes]:
        keys: list[str] = []
        args: list[str | int | float] = [mode, reservation]
        for charge in charges:
            bucket = f"{self._prefix}{{{charge.bucket}}}"
            keys += (bucket + ":log", bucket + ":sum")
            # repr() in both calls, so the settle step names the member admission wrote.
            args += (charge.window_seconds * 1000, charge.quota, repr(charge.amount), repr(charge.reserved))
        try:
            reply = await self._guarded(lambda: self._script(keys=keys, args=args))
        except RedisUnavailable as exc:
            raise WindowsUnavailable(str(exc)) from exc
        return list(reply)
