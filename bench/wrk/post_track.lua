-- POST an analytics.js track event to /v1/t, as the browser's standard delivery does.
-- Usage: wrk -s post_track.lua <url>/v1/t -- <event-template.json> <base64("<writeKey>:")>
-- The template holds __MESSAGE_ID__; each connection cycles through a set of prebuilt
-- requests with distinct messageIds, so wrk spends no Lua time per request building them.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
local common = dofile(here .. "common.lua")

local requests = {}
local n = 0
local i = 0

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local template = f:read("*a")
   f:close()
   local basic = args[2]
   local headers = {
      ["Content-Type"] = "text/plain",
      ["Authorization"] = "Basic " .. basic,
      ["Origin"] = "https://shop.example.com",
      ["User-Agent"] = "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 " ..
         "(KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
   }
   math.randomseed(os.time() + math.floor(os.clock() * 1000000))
   for j = 1, 512 do
      local id = string.format("ajs-next-%d-%08x-%04x-4%03x-%04x-%012x",
         1700000000000 + j, math.random(0, 0x7fffffff), math.random(0, 0xffff),
         math.random(0, 0xfff), math.random(0x8000, 0xbfff), math.random(0, 0x7fffffff))
      local body = template:gsub("__MESSAGE_ID__", id)
      requests[j] = wrk.format("POST", nil, headers, body)
   end
   n = #requests
end

function request()
   i = i % n + 1
   return requests[i]
end

done = common.done
