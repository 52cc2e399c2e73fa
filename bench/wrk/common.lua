-- Shared by the bench scripts: print wrk's summary as one machine-readable line.
-- bench/harness/workloads.py (run_wrk) parses the line that starts with "WRK_RESULT ".
-- Times are microseconds.
local M = {}

function M.done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      "WRK_RESULT {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
      "\"errors_connect\":%d,\"errors_read\":%d,\"errors_write\":%d," ..
      "\"errors_status\":%d,\"errors_timeout\":%d," ..
      "\"latency_mean_us\":%.1f,\"latency_max_us\":%d," ..
      "\"p50_us\":%d,\"p90_us\":%d,\"p99_us\":%d,\"p999_us\":%d}\n",
      summary.requests, summary.duration, summary.bytes,
      e.connect, e.read, e.write, e.status, e.timeout,
      latency.mean, latency.max,
      latency:percentile(50), latency:percentile(90),
      latency:percentile(99), latency:percentile(99.9)))
end

return M
