-- GET the analytics.js bundle the way a browser does (headers come from wrk -H flags).
-- Usage: wrk -s get_script.lua -H 'Accept-Encoding: gzip, br' <url>/analytics.js/v1/<key>/analytics.min.js
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
local common = dofile(here .. "common.lua")

done = common.done
