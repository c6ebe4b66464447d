-- wrk script: GET /api/v1/payments/{id} over a set of existing payments.
--
--   wrk ... -s bench/wrk/get.lua URL -- IDS_FILE [API_KEY]
--
-- IDS_FILE holds one payment id per line; each request picks one at random. done() prints
-- "BENCH_JSON {...}"; non_expected counts responses whose status is not 200.

local threads = {}

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
end

function init(args)
   local path = args[1]
   api_key = args[2] or "secret-api-key"
   ids = {}
   for line in io.lines(path) do
      if #line > 0 then
         table.insert(ids, line)
      end
   end
   if #ids == 0 then
      error("no ids in " .. path)
   end
   math.randomseed(os.time() * 100 + tid)
   responses = 0
   non_expected = 0
   headers = { ["X-API-Key"] = api_key }
end

function request()
   local id = ids[math.random(#ids)]
   return wrk.format("GET", "/api/v1/payments/" .. id, headers, nil)
end

function response(status, _headers, _body)
   responses = responses + 1
   if status ~= 200 then
      non_expected = non_expected + 1
   end
end

function done(summary, latency, _requests)
   local bad, answered = 0, 0
   for _, t in ipairs(threads) do
      bad = bad + t:get("non_expected")
      answered = answered + t:get("responses")
   end
   io.write(string.format(
      'BENCH_JSON {"requests": %d, "answered": %d, "duration_us": %d, "non_expected": %d, ' ..
      '"errors": {"connect": %d, "read": %d, "write": %d, "status": %d, "timeout": %d}, ' ..
      '"latency_us": {"mean": %.1f, "p50": %d, "p90": %d, "p99": %d, "max": %d}}\n',
      summary.requests, answered, summary.duration, bad,
      summary.errors.connect, summary.errors.read, summary.errors.write, summary.errors.status,
      summary.errors.timeout,
      latency.mean, latency:percentile(50), latency:percentile(90), latency:percentile(99),
      latency.max))
end
