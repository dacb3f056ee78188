-- One rate-limit operation over every dimension of a request, atomically (Redis runs a
-- script alone). The counting rules are those of gateway/src/limits/counter.rs.
--
-- KEYS[i]: one counter per dimension. ARGV[1]: "decide" (check all, commit all only if all
-- pass), "peek" (check all, commit nothing: a status read), "add" (commit unconditionally,
-- in-flight counters skipped), "release" (end in-flight counts) or "refund" (give back what
-- a decision at ARGV[2] committed; in-flight counters skipped). ARGV[2]: now in epoch ms, or "" for the Redis server's clock (one clock
-- for every gateway). Then five values per key: kind ("s" sliding, "d" day, "m" month,
-- "c" in flight), window ms, bucket ms, limit, cost.
--
-- Counters: sliding = hash of bucket index -> units, expiring one window and a bucket after
-- its last write; day/month = hash {p = period start ms, n = units}, expiring a day after the
-- period ends (so a gateway restart keeps it); in flight = integer with a safety expiry.
--
-- Reply: allowed (0/1), now, then per key: used before, passes (0/1), reset ms, retry ms,
-- window ms.

local DAY = 86400000
local IN_FLIGHT_TTL_MS = 600000

local mode = ARGV[1]
local now
if ARGV[2] == '' then
  local t = redis.call('TIME')
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[2])
end

local function int(x)
  return string.format('%d', x)
end

-- Days since 1970-01-01 of a proleptic Gregorian date, and back (H. Hinnant's algorithms).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = math.floor(y / 400)
  local yoe = y - era * 400
  local doy = math.floor((153 * ((m + 9) % 12) + 2) / 5) + d - 1
  local doe = yoe * 365 + math.floor(yoe / 4) - math.floor(yoe / 100) + doy
  return era * 146097 + doe - 719468
end

local function civil_from_days(z)
  z = z + 719468
  local era = math.floor(z / 146097)
  local doe = z - era * 146097
  local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524) - math.floor(doe / 146096)) / 365)
  local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
  local mp = math.floor((5 * doy + 2) / 153)
  local m = mp < 10 and mp + 3 or mp - 9
  local y = yoe + era * 400
  if m <= 2 then y = y + 1 end
  return y, m
end

-- [start, end) of the UTC day or month holding `at`.
local function period(kind, at)
  local day = math.floor(at / DAY)
  if kind == 'd' then
    return day * DAY, (day + 1) * DAY
  end
  local y, m = civil_from_days(day)
  local start = days_from_civil(y, m, 1) * DAY
  if m == 12 then y, m = y + 1, 1 else m = m + 1 end
  return start, days_from_civil(y, m, 1) * DAY
end

local function fits(used, cost, limit)
  return used + math.max(cost, 1) <= limit
end

if mode == 'release' then
  for i = 1, #KEYS do
    local kind, cost = ARGV[2 + (i - 1) * 5 + 1], tonumber(ARGV[2 + (i - 1) * 5 + 5])
    if kind == 'c' then
      local left = redis.call('DECRBY', KEYS[i], cost)
      if left <= 0 then redis.call('DEL', KEYS[i]) end
    end
  end
  return {1, now}
end

if mode == 'refund' then
  for i = 1, #KEYS do
    local b = 2 + (i - 1) * 5
    local kind, bucket, cost = ARGV[b + 1], tonumber(ARGV[b + 3]), tonumber(ARGV[b + 5])
    local key = KEYS[i]
    if kind == 's' and cost > 0 then
      -- The bucket of the decision's time, or the oldest later one (a clock that stepped back
      -- committed into the newest bucket).
      local index = math.floor(now / bucket)
      local best
      local flat = redis.call('HKEYS', key)
      for j = 1, #flat do
        local k = tonumber(flat[j])
        if k >= index and (best == nil or k < best) then best = k end
      end
      if best then
        local left = redis.call('HINCRBY', key, int(best), -cost)
        if left <= 0 then redis.call('HDEL', key, int(best)) end
      end
    elseif (kind == 'd' or kind == 'm') and cost > 0 then
      local start = period(kind, now)
      local stored = redis.call('HMGET', key, 'p', 'n')
      if tonumber(stored[1]) == start then
        local left = math.max((tonumber(stored[2]) or 0) - cost, 0)
        redis.call('HSET', key, 'n', int(left))
      end
    end
  end
  return {1, now}
end

local reply = {1, now}
local plans = {}
local allowed = true
for i = 1, #KEYS do
  local b = 2 + (i - 1) * 5
  local kind = ARGV[b + 1]
  local w, bucket = tonumber(ARGV[b + 2]), tonumber(ARGV[b + 3])
  local limit, cost = tonumber(ARGV[b + 4]), tonumber(ARGV[b + 5])
  local key = KEYS[i]
  local plan = {kind = kind, w = w, bucket = bucket, cost = cost}
  local used, reset, retry, window = 0, 0, 0, w
  if kind == 's' then
    -- Every bucket overlapping (now - w, now] counts in full; older ones are dropped.
    local lowest = math.floor((now - w) / bucket)
    local flat = redis.call('HGETALL', key)
    local live = {}
    for j = 1, #flat, 2 do
      local index, amount = tonumber(flat[j]), tonumber(flat[j + 1])
      if index < lowest then
        redis.call('HDEL', key, flat[j])
      else
        live[#live + 1] = {index, amount}
        used = used + amount
      end
    end
    table.sort(live, function(x, y) return x[1] < y[1] end)
    if #live > 0 then
      reset = (live[1][1] + 1) * bucket + w - now
      plan.newest = live[#live][1]
    end
    if not fits(used, cost, limit) then
      local need = used + math.max(cost, 1) - limit
      local freed = 0
      for j = 1, #live do
        freed = freed + live[j][2]
        retry = (live[j][1] + 1) * bucket + w - now
        if freed >= need then break end
      end
      retry = math.max(retry, 1)
    end
  elseif kind == 'd' or kind == 'm' then
    local stored = redis.call('HMGET', key, 'p', 'n')
    local start, finish = period(kind, now)
    local p = tonumber(stored[1])
    -- A clock behind the stored period keeps counting into it (never a second allowance).
    if p and p > start then start, finish = period(kind, p) end
    if p == start then used = tonumber(stored[2]) or 0 end
    plan.start, plan.finish, plan.used = start, finish, used
    reset = finish - now
    window = finish - start
    if not fits(used, cost, limit) then retry = math.max(reset, 1) end
  else
    used = tonumber(redis.call('GET', key)) or 0
    window = 0
    if not fits(used, cost, limit) then retry = 1000 end
  end
  local passes = fits(used, cost, limit)
  if not passes then allowed = false end
  plans[i] = plan
  reply[#reply + 1] = used
  reply[#reply + 1] = passes and 1 or 0
  reply[#reply + 1] = reset
  reply[#reply + 1] = retry
  reply[#reply + 1] = window
end

if (mode == 'decide' or mode == 'peek') and not allowed then
  reply[1] = 0
end
if reply[1] == 0 or mode == 'peek' then
  return reply
end

for i = 1, #KEYS do
  local plan, key = plans[i], KEYS[i]
  if plan.kind == 's' then
    if plan.cost > 0 then
      local index = math.floor(now / plan.bucket)
      -- A clock that stepped back writes into the newest bucket: counted longer, never shorter.
      if plan.newest and plan.newest > index then index = plan.newest end
      redis.call('HINCRBY', key, int(index), int(plan.cost))
      redis.call('PEXPIRE', key, int(plan.w + plan.bucket + 1000))
    end
  elseif plan.kind == 'd' or plan.kind == 'm' then
    redis.call('HSET', key, 'p', int(plan.start), 'n', int(plan.used + plan.cost))
    redis.call('PEXPIREAT', key, int(plan.finish + DAY))
  elseif mode == 'decide' then
    redis.call('INCRBY', key, int(plan.cost))
    redis.call('PEXPIRE', key, IN_FLIGHT_TTL_MS)
  end
end
return reply
