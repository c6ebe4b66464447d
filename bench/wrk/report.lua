-- Shared by post.lua and get.lua (loaded with dofile): keeps the thread list and prints, when
-- wrk is done, one line "BENCH_JSON {...}" with the figures bench.py reads. Each script counts
-- `responses` and `non_expected` (statuses other than the one it expects; wrk's own
-- errors.status only counts statuses >= 400) in its threads.

local threads = {}

function setup(thread)
   thread:set("tid", #threads + 1)
   table.insert(threads, thread)
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
