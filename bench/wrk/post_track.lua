-- POST an analytics.js track event to /v1/t, as the browser's standard delivery does.
-- Usage: wrk -s post_track.lua <url>/v1/t -- <event-template.json> <request-head.txt>
-- The head file holds one "Name: value" line per header, in the order they are sent (the
-- harness writes it for the request shape: bench/harness/fixtures.py); the Host and
-- Content-Length lines get this target's authority and each body's length. The template
-- holds __MESSAGE_ID__; each connection cycles through a set of prebuilt requests with
-- distinct messageIds, so wrk spends no Lua time per request building them.
local here = debug.getinfo(1, "S").source:sub(2):match("(.*/)") or "./"
local common = dofile(here .. "common.lua")

local requests = {}
local n = 0
local i = 0

local function read_head(path)
   local head = {}
   for line in io.lines(path) do
      local name, value = line:match("^([^:]+): ?(.*)$")
      if name then
         head[#head + 1] = {name, value}
      end
   end
   return head
end

-- The request as bytes on the wire: the head lines in their order, then the body.
local function build(head, body)
   local lines = {"POST " .. wrk.path .. " HTTP/1.1"}
   for _, h in ipairs(head) do
      local name, value = h[1], h[2]
      local lower = name:lower()
      if lower == "host" then
         value = wrk.headers["Host"]
      elseif lower == "content-length" then
         value = tostring(#body)
      end
      lines[#lines + 1] = name .. ": " .. value
   end
   return table.concat(lines, "\r\n") .. "\r\n\r\n" .. body
end

function init(args)
   local f = assert(io.open(args[1], "rb"))
   local template = f:read("*a")
   f:close()
   local head = read_head(args[2])
   math.randomseed(os.time() + math.floor(os.clock() * 1000000))
   for j = 1, 512 do
      local id = string.format("ajs-next-%d-%08x-%04x-4%03x-%04x-%012x",
         1700000000000 + j, math.random(0, 0x7fffffff), math.random(0, 0xffff),
         math.random(0, 0xfff), math.random(0x8000, 0xbfff), math.random(0, 0x7fffffff))
      local body = template:gsub("__MESSAGE_ID__", id)
      requests[j] = build(head, body)
   end
   n = #requests
end

function request()
   i = i % n + 1
   return requests[i]
end

done = common.done
