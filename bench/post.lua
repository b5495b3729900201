-- wrk script for bench/bench.py: POST prepared bodies to the URL in turn, count answers by HTTP
-- status and print one JSON line (prefixed "BENCH_JSON ") with latency percentiles and the counts.
--   BENCH_AUTHORIZATION="Bearer <key>" wrk -s bench/post.lua <url> -- <body file> <content type>
-- A body file named *.list holds the paths of several body files, one a line: sent in turn, so a
-- run sees many images (gated TTA's cost depends on how many of them are unsure).
-- The Authorization header comes from the environment, so the token does not show in `ps`.

counts = {}  -- per wrk thread: HTTP status -> responses (global: done() reads it via thread:get)

local function read(path)
   local file = assert(io.open(path, "rb"), "cannot read the body file " .. tostring(path))
   local body = file:read("*a")
   file:close()
   return body
end

function init(args)
   bodies, turn = {}, 0
   if args[1]:sub(-5) == ".list" then
      for path in io.lines(args[1]) do table.insert(bodies, read(path)) end
   else
      table.insert(bodies, read(args[1]))
   end
   wrk.method = "POST"
   wrk.headers["Content-Type"] = args[2]
   wrk.headers["Authorization"] = assert(os.getenv("BENCH_AUTHORIZATION"),
                                         "BENCH_AUTHORIZATION is not set")
end

function request()
   turn = turn % #bodies + 1
   return wrk.format(nil, nil, nil, bodies[turn])
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
