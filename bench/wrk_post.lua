-- wrk script: POST real request bodies, count statuses, print machine-readable results.
--
--   wrk -t2 -c64 -d20s --timeout 60s -s bench/wrk_post.lua URL -- BODIES [MEAN_DELAY_MS]
--
-- BODIES holds one JSON request body per line; each connection walks through them from its
-- own starting point. MEAN_DELAY_MS > 0 makes every connection wait an exponentially
-- distributed think time before each request, so many connections approximate an open loop
-- at connections / (delay + latency) requests per second (bench/loadgen.py picks the numbers).

local bodies = {}
local position = 0
local mean_delay = 0
local thread_count = 0
local threads = {}
-- Status counts per thread, as plain globals: thread:get() can only copy scalar values.
s2xx, s429, s503, s504, s4xx, s5xx, sother = 0, 0, 0, 0, 0, 0, 0

function setup(thread)
  thread_count = thread_count + 1
  thread:set("thread_index", thread_count)
  table.insert(threads, thread)
end

function init(args)
  for line in io.lines(args[1]) do
    if #line > 0 then bodies[#bodies + 1] = line end
  end
  mean_delay = tonumber(args[2] or "0")
  math.randomseed(7919 * thread_index)
  position = math.random(#bodies)
  wrk.method = "POST"
  wrk.headers["Content-Type"] = "application/json"
end

function request()
  position = position % #bodies + 1
  return wrk.format(nil, nil, nil, bodies[position])
end


function delay()
  if mean_delay <= 0 then return 0 end
  return -mean_delay * math.log(1 - math.random())
end

function response(status, headers, body)
  if status >= 200 and status < 300 then s2xx = s2xx + 1
  elseif status == 429 then s429 = s429 + 1
  elseif status == 503 then s503 = s503 + 1
  elseif status == 504 then s504 = s504 + 1
  elseif status >= 400 and status < 500 then s4xx = s4xx + 1
  elseif status >= 500 then s5xx = s5xx + 1
  else sother = sother + 1 end
end

function done(summary, latency, requests)
  local counts = { s2xx = 0, s429 = 0, s503 = 0, s504 = 0, s4xx = 0, s5xx = 0, sother = 0 }
  for _, thread in ipairs(threads) do
    for name, _ in pairs(counts) do
      counts[name] = counts[name] + (thread:get(name) or 0)
    end
  end
  local parts = {}
  local function add(key, value) parts[#parts + 1] = string.format('"%s": %s', key, value) end
  add("requests", summary.requests)
  add("duration_us", summary.duration)
  add("errors_connect", summary.errors.connect)
  add("errors_read", summary.errors.read)
  add("errors_write", summary.errors.write)
  add("errors_timeout", summary.errors.timeout)
  for name, value in pairs(counts) do add(name, value) end
  add("latency_mean_us", string.format("%.1f", latency.mean))
  add("latency_max_us", latency.max)
  local cdf = {}
  for _, p in ipairs({ 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 97.5, 99, 99.5, 99.9 }) do
    cdf[#cdf + 1] = string.format("[%s, %d]", p, latency:percentile(p))
  end
  cdf[#cdf + 1] = string.format("[100, %d]", latency.max)  -- percentile(100) reads 0
  add("latency_percentiles_us", "[" .. table.concat(cdf, ", ") .. "]")
  io.write("BENCH_JSON {" .. table.concat(parts, ", ") .. "}\n")
end
