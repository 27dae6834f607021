-- tenantguard counter script: a batch of decisions, each atomic and all-or-nothing, in
-- one call.
--
-- The functions below are line-for-line ports of tenantguard/algorithms/*.py; the
-- conformance suite (tests/conformance.py) runs the same scenarios against both.
--
-- ARGV is a sequence of records, one per decision (or release or refund), each naming the
-- next n KEYS:
--   op, at, cost, lease, n, then for apply/probe/refund 5 words per key:
--   algorithm code (f, s, t, g, c), limit, window (lease ttl for c), burst, enforce (1/0)
-- `at` is the record's instant in seconds; "" means the server's TIME (read once per call).
-- The reply holds one entry per record, in order:
--   apply:   { at as text, then per spec: allowed, remaining, reset, retry_after } with
--            reset and retry_after in whole microseconds (retry_after -1: never); nothing
--            is written unless every enforced spec admitted.
--   probe:   the same, without writing.
--   refund:  gives back what the apply at `at` counted. Commutative with other calls, so
--            it is exact even when other decisions have written the keys in between.
--   release: drops lease `lease` from the concurrency counter KEYS[i].
--   a record that fails (a key of the wrong type, say) answers "error: <message>" and
--   leaves the others untouched; every write of a record comes after all its reads.
--
-- Batching is what makes a busy Redis fast: the call, the script's set-up and the reply
-- are paid once per batch instead of once per decision.
--
-- States are MessagePack arrays (exact doubles, and packed in C, which matters: text
-- formatting was the largest cost of a call):
--   f: start, used   s: start, previous, current   t, g: wait, at
--   c: id, expires, cost, id, expires, cost, ...

local EPSILON = 1e-9
local EARLY = 1e-6
local NEVER = 1 / 0

local formatted_x, formatted  -- a batch's records mostly share one instant: format it once
local function num(x)
  if x ~= formatted_x then formatted_x, formatted = x, string.format('%.17g', x) end
  return formatted
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

-- the live leases of `state` but `lease`
local function live_without(state, now, lease)
  local ids, exps, costs = live_leases(state, now)
  local keep_ids, keep_exps, keep_costs = {}, {}, {}
  for i = 1, #ids do
    if ids[i] ~= lease then
      keep_ids[#keep_ids + 1] = ids[i]
      keep_exps[#keep_exps + 1] = exps[i]
      keep_costs[#keep_costs + 1] = costs[i]
    end
  end
  return keep_ids, keep_exps, keep_costs
end

local function release(now, key, lease)
  local ids, exps, costs = live_without(redis.call('GET', key) or nil, now, lease)
  if #ids == 0 then
    redis.call('DEL', key)
    return
  end
  local latest = now
  for i = 1, #exps do latest = math.max(latest, exps[i]) end
  local ttl = math.ceil((latest - now) * 1000) + 1000
  redis.call('SET', key, encode_leases(ids, exps, costs), 'PX', ttl)
end

-- what taking back `cost` counted at `now` leaves of `state`: a new state, false to
-- delete the key, nil to leave it (refunds commute: other writers may have come between)
local function refunded(code, state, now, limit, window, cost, lease)
  if not state then return nil end
  local f = split(state)
  if code == 'f' then
    if f[1] ~= now - math.fmod(now, window) then return nil end
    return pack(f[1], math.max(f[2] - cost, 0))
  elseif code == 's' then
    local start = now - math.fmod(now, window)
    local at = f[1]
    if at == start then
      return pack(f[1], f[2], math.max(f[3] - cost, 0))
    elseif at == start + window then
      return pack(f[1], math.max(f[2] - cost, 0), f[3])
    end
    return nil
  elseif code == 't' or code == 'g' then
    return pack(math.max(f[1] - cost * window / limit, 0), f[2])
  end
  local ids, exps, costs = live_without(state, now, lease)
  if #ids == 0 then return false end
  return encode_leases(ids, exps, costs)
end

-- a refund record: every key read and worked out first, then written, so a key that
-- cannot be read (of another type, say) leaves all of them as they were
local function refund(now, cost, lease, k, n, a)
  local pending, order = {}, {}
  for i = 1, n do
    local base = a + (i - 1) * 5
    local key = KEYS[k + i]
    local state = pending[key]
    if state == nil then
      state = redis.call('GET', key)
    end
    if state == false then state = nil end
    local new = refunded(ARGV[base + 1], state, now, tonumber(ARGV[base + 2]),
      tonumber(ARGV[base + 3]), cost, lease)
    if new ~= nil then
      if pending[key] == nil then order[#order + 1] = key end
      pending[key] = new
    end
  end
  for _, key in ipairs(order) do
    local new = pending[key]
    if new then
      redis.call('SET', key, new, 'KEEPTTL')
    else
      redis.call('DEL', key)
    end
  end
end

-- one decision: KEYS[k + 1 .. k + n], spec words from ARGV[a + 1]
local function decide(op, now, cost, lease, k, n, a)
  local pending = {}   -- key -> {state, expires}, applied in order, so a key named twice sees itself
  local replies = { num(now) }
  local blocked = false
  for i = 1, n do
    local base = a + (i - 1) * 5
    local code = ARGV[base + 1]
    local limit, window = tonumber(ARGV[base + 2]), tonumber(ARGV[base + 3])
    local burst, enforce = tonumber(ARGV[base + 4]), ARGV[base + 5] == '1'
    local key = KEYS[k + i]
    local state
    if pending[key] and not blocked then
      state = pending[key][1]
    else
      -- after a denial, the specs still unanswered see the stored state: nothing is written
      -- (GET, not one MGET: MGET reads a key of another type as empty, and the SET below
      -- would then overwrite it; GET refuses)
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
    local r = #replies  -- flat: a table per spec cost a fifth of the whole call
    replies[r + 1] = allowed and 1 or 0
    replies[r + 2] = remaining
    replies[r + 3] = micros(reset)
    replies[r + 4] = micros(retry)
  end
  if not blocked and op == 'apply' then
    for key, item in pairs(pending) do
      local ttl = math.ceil((item[2] - now) * 1000) + 1000
      redis.call('SET', key, item[1], 'PX', ttl)
    end
  end
  return replies
end

local function record(op, now, cost, lease, k, n, a)
  if op == 'apply' or op == 'probe' then
    return decide(op, now, cost, lease, k, n, a)
  elseif op == 'release' then
    for i = 1, n do release(now, KEYS[k + i], lease) end
  elseif op == 'refund' then
    refund(now, cost, lease, k, n, a)
  else
    error('unknown operation ' .. tostring(op))
  end
  return num(now)
end

local server_now
local replies = {}
local k, a = 0, 0
while a < #ARGV do
  local op, at, cost, lease, n = ARGV[a + 1], ARGV[a + 2], tonumber(ARGV[a + 3]),
    ARGV[a + 4], tonumber(ARGV[a + 5])
  a = a + 5
  local now = tonumber(at)
  if not now then
    if not server_now then
      local t = redis.call('TIME')
      server_now = tonumber(t[1]) + tonumber(t[2]) / 1000000
    end
    now = server_now
  end
  local ok, reply = pcall(record, op, now, cost, lease, k, n, a)
  if not ok then
    if type(reply) == 'table' then reply = reply.err end
    reply = 'error: ' .. tostring(reply)
  end
  replies[#replies + 1] = reply
  k = k + n
  if op ~= 'release' then a = a + 5 * n end
end
return replies
