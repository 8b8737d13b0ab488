-- A fixed request rate with Debian's wrk 4 (which has no -R option, unlike wrk2).
--
-- wrk calls delay() before every request of every connection; each call claims
-- the next free slot of its thread's schedule (one slot every threads/rate s, read
-- from CLOCK_MONOTONIC through LuaJIT's ffi) and waits for it. With enough
-- connections, each thread sends exactly rate/threads requests per second, and
-- latency is measured from the moment a request is written (the wait is not
-- counted). If the server falls behind, the schedule does not burst to catch up.
--
-- Arguments (after --): token rate threads method key_prefix path [path ...]
-- Requests cycle through the paths; a POST sends "{}" with its own Idempotency-Key.
-- done() prints one JSON line: requests, duration, errors, latency percentiles.

local ffi = require("ffi")
ffi.cdef([[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]])
local ts = ffi.new("bench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end

local thread_ids = 0
function setup(thread)
  thread_ids = thread_ids + 1
  thread:set("thread_id", thread_ids)
end

local token, method, prefix, paths, interval, slot
local counter = 0

function init(args)
  token = args[1]
  local rate = tonumber(args[2])
  local threads = tonumber(args[3])
  method = args[4]
  prefix = args[5]
  paths = {}
  for i = 6, #args do
    paths[#paths + 1] = args[i]
  end
  interval = 1000 * threads / rate
  math.randomseed(thread_id * 7919)
end

function delay()
  local t = now_ms()
  if slot == nil or slot < t - interval then
    -- First call, or behind schedule: restart from now (no catch-up burst).
    slot = t + math.random() * interval
  else
    slot = slot + interval
  end
  local wait = slot - t
  if wait < 0 then
    return 0
  end
  return math.floor(wait + 0.5)
end

function request()
  counter = counter + 1
  local path = paths[(counter % #paths) + 1]
  local headers = { ["Authorization"] = "Token " .. token }
  if method == "POST" then
    headers["Content-Type"] = "application/json"
    headers["Idempotency-Key"] = prefix .. "-" .. thread_id .. "-" .. counter
    return wrk.format("POST", path, headers, "{}")
  end
  return wrk.format("GET", path, headers)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests": %d, "duration_us": %d, "bytes": %d, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"p50_us": %d, "p90_us": %d, "p95_us": %d, "p99_us": %d, "max_us": %d, "mean_us": %.1f}\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(95),
    latency:percentile(99), latency.max, latency.mean
  ))
end
