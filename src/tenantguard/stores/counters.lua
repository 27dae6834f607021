-- tenantguard counter script: a batch of decisions, each atomic and all-or-nothing, in
-- one call.
--
-- The functions below are line-for-line ports of tenantguard/algorithms/*.py; the
-- conformance suite (tests/conformance.py) runs the same scenarios against both.
--
-- ARGV holds one word per record, one record per decision (or release or refund):
--   "op|at|cost|lease|m code|limit|window|burst|enforce|field ..."
-- a head, then one spec per counter (code: f, s, t, g, c; window is the lease ttl for c;
-- enforce 1/0). The record names the next m KEYS. `at` is the record's instant in
-- seconds; "" means the server's TIME (read once per call). A route's checks send the
-- same word every time, so each distinct word is parsed once (see `parse`).
--
-- Where a counter lives: a spec with a field keeps its state in that field of the
-- record's hash, its first key (a tenant's own counters share one hash: one read and
-- one write per decision, and one key to create and expire per tenant instead of one per
-- rule); a spec without one keeps it in a string key of its own, the record's next key
-- (counters per client, whose number has no bound, each expire on their own). A hash's
-- field ":ttl" holds the instant, on the server's clock, its TTL runs to, so a write
-- extends the TTL only when a counter needs longer, by HORIZON more.
--
-- The reply holds one entry per record, in order:
--   apply:   { at as text, then per spec: allowed, remaining, reset, retry_after } with
--            reset and retry_after in whole microseconds (retry_after -1: never); nothing
--            is written unless every enforced spec admitted.
--   probe:   the same, without writing.
--   refund:  gives back what the apply at `at` counted. Commutative with other calls, so
--            it is exact even when other decisions have written the keys in between.
--   release: drops lease `lease` from the concurrency counters named.
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

-- How it runs. As a Redis function (Redis 7+, FUNCTION LOAD): this file is loaded once
-- and `run` is registered under a name of its version, so what is parsed stays parsed
-- from one call to the next. Loading sees no standard library yet: nothing below touches
-- a global before `run` is called. As a script (EVALSHA, Redis 6, or no FUNCTION
-- permission): every call runs the file, then `return run(script_inputs())`.

-- EVAL's globals; defined before the locals of the same names below, which it would
-- otherwise mean
local function script_inputs() return KEYS, ARGV end
local function libraries() return unpack, cmsgpack.pack, cmsgpack.unpack end

local KEYS, ARGV  -- this call's keys and records
local unpack_table, pack, unpack  -- Lua 5.1's table unpack; MessagePack's pair

local EPSILON = 1e-9
local EARLY = 1e-6
local NEVER = 1 / 0

local formatted_x, formatted  -- a batch's records mostly share one instant: format it once
local function num(x)
  if x ~= formatted_x then formatted_x, formatted = x, string.format('%.17g', x) end
  return formatted
end

local function split(state)
  if state then return { unpack(state) } end
  return {}
end

-- a state of exactly two numbers, or nils (the rate algorithms' hot path: no table)
local function pair(state)
  if not state then return nil, nil end
  local a, b, c = unpack(state)
  if c ~= nil then return nil, nil end
  return a, b
end

-- a state of exactly three numbers, or nils
local function triple(state)
  if not state then return nil, nil, nil end
  local a, b, c, d = unpack(state)
  if d ~= nil then return nil, nil, nil end
  return a, b, c
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
  local at, counted = pair(state)
  local used = 0
  if counted ~= nil and at == start then used = counted end
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
  local at, before, now_count = triple(state)
  if now_count ~= nil then
    if at == start then
      previous, current = before, now_count
    elseif at == start - window then
      previous = now_count
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
  local waited, at = pair(state)
  if at ~= nil then wait = waited - (now - at) end
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
  local was_ahead, at = pair(state)
  if at ~= nil then ahead = was_ahead - (now - at) end
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

local server_now  -- this call's Redis TIME, read at most once per call

local function server_time()
  if not server_now then
    local t = redis.call('TIME')
    server_now = tonumber(t[1]) + tonumber(t[2]) / 1000000
  end
  return server_now
end

local TTL = ':ttl'  -- encoded table names never hold ':', so no counter is called this
local HORIZON = 10  -- seconds a hash's TTL is set past what its counters need

-- parsed words, kept from call to call as a function (per call as a script); a record
-- with its own instant or lease is one of a kind and not kept
local records, specs, kept = {}, {}, 0
local KEEP = 4096  -- parsed words kept at most; then they are parsed afresh

-- a parsed spec: code, limit, window, burst, enforce, field (false: a string key), step
local function spec(word)
  local s = specs[word]
  if s == nil then
    local code, limit, window, burst, enforce, field =
      string.match(word, '^(%l)|([^|]*)|([^|]*)|([^|]*)|([01])|(.*)$')
    if not code or not STEPS[code] then error('malformed spec ' .. word) end
    s = { code, tonumber(limit), tonumber(window), tonumber(burst), enforce == '1',
      field ~= '' and field, STEPS[code] }
    specs[word] = s
    kept = kept + 1
  end
  return s
end

-- a parsed record: its head, its specs, and where each spec's counter lives
local OP, AT, COST, LEASE, N, M, SPECS, SLOTS, FIELDS, AT_FIELD, TWICE =
  1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11

-- SLOTS[i] is the offset of spec i's string key among the record's keys, or false for a
-- field of the record's hash (then its first key). FIELDS lists what one HMGET reads
-- (the deadline, then each spec's field) and AT_FIELD[i] where spec i's value comes
-- back; TWICE says some counter is named by two specs (rare: each then sees the other).
local function parse(word)
  local r = records[word]
  if r ~= nil then return r end
  local head, rest = string.match(word, '^(%S+)(.*)$')
  local op, at, cost, lease, m =
    string.match(head or '', '^(%l+)|([^|]*)|(%d+)|([^|]*)|(%d+)$')
  if not op then error('malformed record ' .. word) end
  local rec, slots, fields, at_field, strings = {}, {}, { TTL }, {}, 0
  for part in string.gmatch(rest, '%S+') do
    local s = spec(part)
    rec[#rec + 1] = s
    if not s[6] then strings = strings + 1 end
  end
  m = tonumber(m)
  local offset = m - strings + 1
  -- two string keys may be one key (known only from KEYS): then `same` looks
  local twice = strings > 1
  for i = 1, #rec do
    if rec[i][6] then
      slots[i] = false
      fields[#fields + 1] = rec[i][6]
      at_field[i] = #fields
      for j = 1, i - 1 do
        if rec[i][6] == rec[j][6] then twice = true end
      end
    else
      slots[i] = offset
      offset = offset + 1
    end
  end
  if #fields == 1 then fields = false end
  -- the keys a record names: its string keys, and its hash first if it has fields
  if m ~= strings + (fields and 1 or 0) then error('record names ' .. m .. ' keys: ' .. word) end
  r = { op, tonumber(at), tonumber(cost), lease, #rec, m, rec, slots, fields, at_field, twice }
  if at == '' and lease == '' then
    records[word] = r
    kept = kept + 1
  end
  return r
end

-- do specs i and j of the record at KEYS[k + 1 ..] name the same counter?
local function same(k, r, i, j)
  local a, b = r[SLOTS][i], r[SLOTS][j]
  if a and b then return KEYS[k + a] == KEYS[k + b] end
  return not a and not b and r[SPECS][i][6] == r[SPECS][j][6]
end

-- every spec's stored state (false: none) and the hash's deadline: one HMGET for the
-- hash, one GET per string key (GET, not MGET: MGET reads a key of another type as
-- empty, and a write would then overwrite it; GET refuses)
local function read(k, r)
  local fields, slots, deadline, values = r[FIELDS], r[SLOTS], false, nil
  if fields then
    values = redis.call('HMGET', KEYS[k + 1], unpack_table(fields))
    deadline = tonumber(values[1]) or false
  end
  local at_field = r[AT_FIELD]
  local states = { false, false, false, false }
  for i = 1, r[N] do
    local slot = slots[i]
    if slot then
      states[i] = redis.call('GET', KEYS[k + slot])
    else
      states[i] = values[at_field[i]]
    end
  end
  return states, deadline
end

local function ttl_ms(expires, now)
  return math.ceil((expires - now) * 1000) + 1000
end

-- writes news[i] of each spec (a state; false: delete it; nil: leave it), the last spec
-- naming a counter winning. expires[i] is when the state may be forgotten; nil keeps
-- the TTL as it is.
local function write(now, k, r, news, expires, deadline)
  local rec, slots, twice = r[SPECS], r[SLOTS], r[TWICE]
  local n = r[N]
  local sets, dels, needed = nil, nil, false
  for i = 1, n do
    local new = news[i]
    if twice and new ~= nil then
      for j = i + 1, n do
        if news[j] ~= nil and same(k, r, i, j) then new = nil end
      end
    end
    local slot, e = slots[i], expires[i]
    if new == nil then
      -- superseded by a later spec, or nothing to write
    elseif slot then
      if not new then
        redis.call('DEL', KEYS[k + slot])
      elseif e then
        redis.call('SET', KEYS[k + slot], new, 'PX', ttl_ms(e, now))
      else
        redis.call('SET', KEYS[k + slot], new, 'KEEPTTL')
      end
    elseif new then
      if not sets then sets = {} end
      sets[#sets + 1] = rec[i][6]
      sets[#sets + 1] = new
      if e and (not needed or e > needed) then needed = e end
    else
      if not dels then dels = {} end
      dels[#dels + 1] = rec[i][6]
    end
  end
  local key = KEYS[k + 1]
  local extend, server = false, 0
  if needed then
    -- the deadline is kept on the server's clock: callers on their own clocks
    -- (clock=local) may disagree, and each would otherwise trust another's deadline
    server = server_time()
    needed = needed - now + server
    extend = not deadline or deadline < needed + 1
  end
  if extend then
    needed = needed + 1 + HORIZON
    sets[#sets + 1] = TTL
    sets[#sets + 1] = string.format('%.17g', needed)
  end
  if sets then redis.call('HSET', key, unpack_table(sets)) end
  if dels then redis.call('HDEL', key, unpack_table(dels)) end
  if extend then redis.call('PEXPIRE', key, math.ceil((needed - server) * 1000)) end
end

-- one decision
local function decide(now, k, r, apply)
  local states, deadline = read(k, r)
  local rec, cost, lease, twice = r[SPECS], r[COST], r[LEASE], r[TWICE]
  local news, expires = { nil, nil, nil, nil }, { nil, nil, nil, nil }
  -- flat: a table per spec cost a fifth of the whole call. Two specs are the common
  -- case: built at its size at once, as growing a table reallocates it
  local n = r[N]
  local replies
  if n == 2 then
    replies = { num(now), 0, 0, 0, 0, 0, 0, 0, 0 }
  else
    replies = { num(now) }
  end
  local blocked = false
  for i = 1, n do
    local s = rec[i]
    local state = states[i]
    if twice and not blocked then
      -- a counter named twice sees what the earlier spec wrote; after a denial, the
      -- specs still unanswered see the stored state (nothing is written)
      for j = i - 1, 1, -1 do
        if news[j] and same(k, r, i, j) then
          state = news[j]
          break
        end
      end
    end
    if state == false then state = nil end
    local allowed, new, remaining, reset, retry, expiry =
      s[7](state, now, s[2], s[3], s[4], cost, lease)
    if allowed and not blocked then
      news[i], expires[i] = new, expiry
    elseif not allowed and s[5] then
      blocked = true
    end
    local at = i * 4 - 2
    replies[at] = allowed and 1 or 0
    replies[at + 1] = remaining
    replies[at + 2] = micros(reset)
    replies[at + 3] = micros(retry)
  end
  if not blocked and apply then write(now, k, r, news, expires, deadline) end
  return replies
end

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

local function release(now, k, r)
  local states, deadline = read(k, r)
  local news, expires = {}, {}
  for i = 1, r[N] do
    local ids, exps, costs = live_without(states[i] or nil, now, r[LEASE])
    if #ids == 0 then
      news[i] = false
    else
      local latest = now
      for j = 1, #exps do latest = math.max(latest, exps[j]) end
      news[i], expires[i] = encode_leases(ids, exps, costs), latest
    end
  end
  write(now, k, r, news, expires, deadline)
end

-- what taking back `cost` counted at `now` leaves of `state`: a new state, false to
-- delete it, nil to leave it (refunds commute: other writers may have come between)
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

-- a refund record: every counter read and worked out first, then written, so one that
-- cannot be read (a key of another type, say) leaves all of them as they were
local function refund(now, k, r)
  local states, deadline = read(k, r)
  local rec, news = r[SPECS], {}
  for i = 1, r[N] do
    local state = states[i]
    for j = i - 1, 1, -1 do
      if news[j] ~= nil and same(k, r, i, j) then
        state = news[j]
        break
      end
    end
    local s = rec[i]
    news[i] = refunded(s[1], state or nil, now, s[2], s[3], r[COST], r[LEASE])
  end
  write(now, k, r, news, {}, deadline)
end

local function record(now, k, r)
  local op = r[OP]
  if op == 'apply' or op == 'probe' then
    return decide(now, k, r, op == 'apply')
  elseif op == 'release' then
    release(now, k, r)
  elseif op == 'refund' then
    refund(now, k, r)
  else
    error('unknown operation ' .. tostring(op))
  end
  return num(now)
end

local function run(keys, args)
  KEYS, ARGV = keys, args
  if not pack then unpack_table, pack, unpack = libraries() end
  if kept > KEEP then records, specs, kept = {}, {}, 0 end
  server_now = nil
  -- every record is parsed before any runs: one that is malformed, or names more keys
  -- than were sent, fails the whole call before anything is written
  local parsed, named = {}, 0
  for a = 1, #ARGV do
    local r = parse(ARGV[a])
    parsed[a] = r
    named = named + r[M]
  end
  if named ~= #KEYS then error('records name ' .. named .. ' keys, ' .. #KEYS .. ' sent') end
  local replies = {}
  local k = 0
  for a = 1, #parsed do
    local r = parsed[a]
    local now = r[AT] or server_time()
    local ok, reply = pcall(record, now, k, r)
    if not ok then
      if type(reply) == 'table' then reply = reply.err end
      reply = 'error: ' .. tostring(reply)
    end
    replies[a] = reply
    k = k + r[M]
  end
  return replies
end
