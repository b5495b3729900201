-- wrk script for bench/bench.py: POST one prepared body to the URL, count answers by HTTP status
-- and print one JSON line (prefixed "BENCH_JSON ") with latency percentiles and the counts.
--   BENCH_AUTHORIZATION="Bearer <key>" wrk -s bench/post.lua <url> -- <body file> <content type>
-- The Authorization header comes from the environment, so the token does not show in `ps`.

counts = {}  -- per wrk thread: HTTP status -> responses (global: done() reads it via thread:get)

function init(args)
   local file = assert(io.open(args[1], "rb"), "cannot read the body file " .. tostring(args[1]))
   wrk.method = "POST"
   wrk.body = file:read("*a")
   file:close()
   wrk.headers["Content-Type"] = args[2]
   wrk.headers["Authorization"] = assert(os.getenv("BENCH_AUTHORIZATION"),
                                         "BENCH_AUTHORIZATION is not set")
end

function response(status, headers, body)
   counts[status] = (counts[status] or 0) + 1
end

local threads = {}

function setup(thread)
   table.insert(threads, thread)
end

function done(summary, latency, requests)
   local statuses = {}
   for _, thread in ipairs(threads) do
      for status, n in pairs(thread:get("counts")) do
         statuses[status] = (statuses[status] or 0) + n
      end
   end
   local parts = {}
   for status, n in pairs(statuses) do
      table.insert(parts, string.format('"%d": %d', status, n))
   end
   local e = summary.errors
   io.write(string.format(
      'BENCH_JSON {"duration_us": %d, "requests": %d, "bytes": %d, '
      .. '"latency_us": {"p50": %d, "p90": %d, "p99": %d, "mean": %.1f, "max": %d}, '
      .. '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, '
      .. '"statuses": {%s}}\n',
      summary.duration, summary.requests, summary.bytes,
      latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.mean,
      latency.max, e.connect, e.read, e.write, e.status, e.timeout, table.concat(parts, ", ")))
end
