-- wrk script: POST /api/v1/payments with a unique Idempotency-Key on every request.
--
--   wrk ... -s bench/wrk/post.lua URL -- RUN_ID [QUOTA] [API_KEY]
--
-- RUN_ID makes the keys unique across wrk runs (the key is RUN_ID-THREAD-N). QUOTA > 0 makes
-- each thread stop after that many responses (the pipeline step posts a fixed number of
-- payments; requests already in flight at that moment are still answered by the server, so the
-- database may hold up to one per connection more). wrk itself waits out its -d even when all its
-- threads stopped, so bench.py ends it with SIGINT once every thread said BENCH_THREAD_DONE. The body is the README's example without a
-- webhook_url (the bench sends no webhooks anywhere).
--
-- done() prints one line "BENCH_JSON {...}" with the figures bench.py reads. non_expected counts
-- responses whose status is not 202 (wrk's own errors.status only counts statuses >= 400).

-- setup() and done() (the BENCH_JSON line) live in report.lua, next to this file.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

function init(args)
   run_id = args[1] or tostring(os.time())
   quota = tonumber(args[2] or "0") or 0
   api_key = args[3] or "secret-api-key"
   counter = 0
   responses = 0
   non_expected = 0
   body = '{"amount":"100.50","currency":"RUB","description":"Order #123","metadata":{"order_id":"123"}}'
   headers = { ["Content-Type"] = "application/json", ["X-API-Key"] = api_key }
end

function request()
   counter = counter + 1
   headers["Idempotency-Key"] = run_id .. "-" .. tid .. "-" .. counter
   return wrk.format("POST", "/api/v1/payments", headers, body)
end

function response(status, _headers, _body)
   responses = responses + 1
   if status ~= 202 then
      non_expected = non_expected + 1
   end
   if quota > 0 and responses == quota then
      -- wrk's main thread sleeps for the whole -d even when every thread has stopped: this line
      -- tells bench.py, which then ends wrk with SIGINT (wrk still prints its summary then).
      io.stderr:write("BENCH_THREAD_DONE\n")
      wrk.thread:stop()
   end
end
