-- tenantguard counter script: every rule of one decision, atomically, in one call.
--
-- The functions below are line-for-line ports of tenantguard/algorithms/*.py; the
-- conformance suite (tests/conformance.py) runs the same scenarios against both.
--
-- apply:   KEYS[i] the counter key of spec i
--          ARGV "apply", now ("" = the server's TIME), cost, lease id, then per spec:
--          algorithm code (f, s, t, g, c), limit, window (lease ttl for c), burst, enforce (1/0)
--          returns { now as text, {allowed, remaining, reset, retry_after}... } with reset and
--          retry_after in whole microseconds (retry_after -1: never); nothing is written
--          unless every enforced spec admitted.
--          "probe" answers the same without writing.
-- refund:  KEYS and ARGV as for the apply being taken back (with the now it used): gives
--          back what that apply counted. Commutative with other calls, so it is exact
--          even when other decisions have written the keys in between.
-- release: KEYS[1] a concurrency counter; ARGV "release", now, lease id
--
-- States are MessagePack arrays (exact doubles, and packed in C, which matters: text
-- formatting was the largest cost of a call):
--   f: start, used   s: start, previous, current   t, g: wait, at
--   c: id, expires, cost, id, expires, cost, ...

local EPSILON = 1e-9
local EARLY = 1e-6
local NEVER = 1 / 0

local function num(x)
  return string.format('%.17g', x)
end

local unpack_table = unpack  -- Lua 5.1's global: a table's items as values
local pack, unpack = cmsgpack.pack, cmsgpack.unpack

local function split(state)
  if state then return { unpack(state) } end
  return {}
end

local function micros(x)
  if x == NEVER then return -1 end
  return math.floor(x * 1000000 + 0.5)
end

local function floor0(x)
  if x > 0 then return math.floor(x) end
  return 0
end

-- each returns allowed, new state (string or false), remaining, reset, retry, expires
local function fixed_window(state, now, limit, window, burst, cost)
  local start = now - math.fmod(now, window)
  local reset = start + window
  local f = split(state)
  local used = 0
  if #f == 2 and f[1] == start then used = f[2] end
  if used + cost <= limit then
    return true, pack(start, used + cost), limit - used - cost, reset, 0, reset
  end
  local retry = reset - now
  if cost > limit then retry = NEVER end
  return false, false, math.max(limit - used, 0), reset, retry, 0
end

local function sliding_window(state, now, limit, window, burst, cost)
  local start = now - math.fmod(now, window)
  local previous, current = 0, 0
  local f = split(state)
  if #f == 3 then
    local at = f[1]
    if at == start then
      previous, current = f[2], f[3]
    elseif at == start - window then
      previous = f[3]
    end
  end
  local weight = 1.0 - (now - start) / window
  local estimate = previous * weight + current
  local reset = start + window
  if estimate + cost <= limit + EPSILON + previous * EARLY / window then
    local remaining = math.max(math.floor(limit - estimate - cost + EPSILON), 0)
    local new = pack(start, previous, current + cost)
    return true, new, remaining, reset, 0, start + 2 * window
  end
  local remaining = math.max(math.floor(limit - estimate + EPSILON), 0)
  if cost > limit then return false, false, remaining, reset, NEVER, 0 end
  local at
  if current + cost <= limit then
    at = start + window * (1.0 - (limit - current - cost) / previous)
  else
    at = reset + window * (1.0 - (limit - cost) / current)
  end
  return false, false, remaining, reset, math.max(at - now, EARLY), 0
end

local function token_bucket(state, now, limit, window, burst, cost)
  if limit <= 0 then return false, false, 0, now, NEVER, 0 end
  local rate = limit / window
  local wait = 0.0
  local f = split(state)
  if #f == 2 then wait = f[1] - (now - f[2]) end
  if wait < 0.0 then wait = 0.0 end
  local tokens = burst - wait * rate
  if tokens + EARLY * rate >= cost then
    wait = wait + cost / rate
    return true, pack(wait, now), floor0(tokens - cost + EPSILON), now + wait, 0,
      now + wait
  end
  local retry = (cost - tokens) / rate
  if cost > burst then retry = NEVER end
  local remaining = 0
  if tokens > 0 then remaining = math.floor(tokens + EPSILON) end
  return false, false, remaining, now + wait, retry, 0
end

local function gcra(state, now, limit, window, burst, cost)
  if limit <= 0 then return false, false, 0, now, NEVER, 0 end
  local interval = window / limit
  local tolerance = burst * interval
  local ahead = 0.0
  local f = split(state)
  if #f == 2 then ahead = f[1] - (now - f[2]) end
  if ahead < 0.0 then ahead = 0.0 end
  local new_ahead = ahead + cost * interval
  if new_ahead <= tolerance + EARLY then
    local left = (tolerance - new_ahead) / interval + EPSILON
    return true, pack(new_ahead, now), floor0(left), now + new_ahead, 0,
      now + new_ahead
  end
  local retry = new_ahead - tolerance
  if cost > burst then retry = NEVER end
  local left = (tolerance - ahead) / interval
  local remaining = 0
  if left > 0 then remaining = math.floor(left + EPSILON) end
  return false, false, remaining, now + ahead, retry, 0
end

-- leases: parallel arrays of ids, expiries and costs, expired ones dropped
local function live_leases(state, now)
  local f = split(state)
  local ids, exps, costs = {}, {}, {}
  for i = 1, #f - 2, 3 do
    local expires = f[i + 1]
    if expires > now then
      ids[#ids + 1] = f[i]
      exps[#exps + 1] = expires
      costs[#costs + 1] = f[i + 2]
    end
  end
  return ids, exps, costs
end

local function encode_leases(ids, exps, costs)
  local flat = {}
  for i = 1, #ids do
    flat[#flat + 1] = ids[i]
    flat[#flat + 1] = exps[i]
    flat[#flat + 1] = costs[i]
  end
  return pack(unpack_table(flat))
end

local function concurrency(state, now, limit, ttl, burst, cost, lease)
  local ids, exps, costs = live_leases(state, now)
  local held = 0
  for i = 1, #costs do held = held + costs[i] end
  if held + cost <= limit then
    ids[#ids + 1] = lease
    exps[#exps + 1] = now + ttl
    costs[#costs + 1] = cost
    local soonest, latest = exps[1], exps[1]
    for i = 2, #exps do
      soonest = math.min(soonest, exps[i])
      latest = math.max(latest, exps[i])
    end
    return true, encode_leases(ids, exps, costs), limit - held - cost, soonest, 0, latest
  end
  if cost > limit then return false, false, math.max(limit - held, 0), now, NEVER, 0 end
  local order = {}
  for i = 1, #exps do order[i] = i end
  table.sort(order, function(a, b) return exps[a] < exps[b] end)
  local freed, at = 0, now
  for _, i in ipairs(order) do
    freed = freed + costs[i]
    at = exps[i]
    if held - freed + cost <= limit then break end
  end
  return false, false, math.max(limit - held, 0), at, at - now, 0
end

local STEPS = { f = fixed_window, s = sliding_window, t = token_bucket, g = gcra,
  c = concurrency }

local now = tonumber(ARGV[2])
if not now then
  local t = redis.call('TIME')
  now = tonumber(t[1]) + tonumber(t[2]) / 1000000
end

if ARGV[1] == 'release' then
  local ids, exps, costs = live_leases(redis.call('GET', KEYS[1]) or nil, now)
  local keep_ids, keep_exps, keep_costs = {}, {}, {}
  local latest = now
  for i = 1, #ids do
    if ids[i] ~= ARGV[3] then
      keep_ids[#keep_ids + 1] = ids[i]
      keep_exps[#keep_exps + 1] = exps[i]
      keep_costs[#keep_costs + 1] = costs[i]
      latest = math.max(latest, exps[i])
    end
  end
  if #keep_ids == 0 then
    redis.call('DEL', KEYS[1])
  else
    local ttl = math.ceil((latest - now) * 1000) + 1000
    redis.call('SET', KEYS[1], encode_leases(keep_ids, keep_exps, keep_costs), 'PX', ttl)
  end
  return num(now)
end

-- take back `cost` counted at `now` (refunds commute: other writers may have come between)
local function refund(code, key, now, limit, window, burst, cost, lease)
  local state = redis.call('GET', key)
  if not state then return end
  local f = split(state)
  local new
  if code == 'f' then
    if f[1] ~= now - math.fmod(now, window) then return end
    new = pack(f[1], math.max(f[2] - cost, 0))
  elseif code == 's' then
    local start = now - math.fmod(now, window)
    local at = f[1]
    if at == start then
      new = pack(f[1], f[2], math.max(f[3] - cost, 0))
    elseif at == start + window then
      new = pack(f[1], math.max(f[2] - cost, 0), f[3])
    else
      return
    end
  elseif code == 't' or code == 'g' then
    new = pack(math.max(f[1] - cost * window / limit, 0), f[2])
  else
    local ids, exps, costs = live_leases(state, now)
    local keep_ids, keep_exps, keep_costs = {}, {}, {}
    for i = 1, #ids do
      if ids[i] ~= lease then
        keep_ids[#keep_ids + 1] = ids[i]
        keep_exps[#keep_exps + 1] = exps[i]
        keep_costs[#keep_costs + 1] = costs[i]
      end
    end
    if #keep_ids == 0 then
      redis.call('DEL', key)
      return
    end
    new = encode_leases(keep_ids, keep_exps, keep_costs)
  end
  redis.call('SET', key, new, 'KEEPTTL')
end

if ARGV[1] == 'refund' then
  local cost, lease = tonumber(ARGV[3]), ARGV[4]
  for i = 1, #KEYS do
    local base = 4 + (i - 1) * 5
    refund(ARGV[base + 1], KEYS[i], now, tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3]),
      tonumber(ARGV[base + 4]), cost, lease)
  end
  return num(now)
end

local op = ARGV[1]
local cost = tonumber(ARGV[3])
local lease = ARGV[4]

local pending = {}   -- key -> {state, expires}, applied in order, so a key named twice sees itself
local replies = { num(now) }
local blocked = false
for i = 1, #KEYS do
  local base = 4 + (i - 1) * 5
  local code = ARGV[base + 1]
  local limit, window = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
  local burst, enforce = tonumber(ARGV[base + 4]), ARGV[base + 5] == '1'
  local key = KEYS[i]
  local state
  if pending[key] and not blocked then
    state = pending[key][1]
  else
    -- after a denial, the specs still unanswered see the stored state: nothing is written
    state = redis.call('GET', key)
  end
  if state == false then state = nil end
  local allowed, new, remaining, reset, retry, expires =
    STEPS[code](state, now, limit, window, burst, cost, lease)
  if allowed and not blocked then
    pending[key] = { new, expires }
  elseif not allowed and enforce then
    blocked = true
  end
  replies[#replies + 1] = { allowed and 1 or 0, remaining, micros(reset), micros(retry) }
end

if not blocked and op ~= 'probe' then
  for key, item in pairs(pending) do
    local ttl = math.ceil((item[2] - now) * 1000) + 1000
    redis.call('SET', key, item[1], 'PX', ttl)
  end
end
return replies
