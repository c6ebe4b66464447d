-- wrk script: GET /api/v1/payments/{id} over a set of existing payments.
--
--   wrk ... -s bench/wrk/get.lua URL -- IDS_FILE [API_KEY]
--
-- IDS_FILE holds one payment id per line; each request picks one at random. done() prints
-- "BENCH_JSON {...}"; non_expected counts responses whose status is not 200.

-- setup() and done() (the BENCH_JSON line) live in report.lua, next to this file.
dofile((debug.getinfo(1, "S").source:match("^@(.*/)") or "./") .. "report.lua")

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
