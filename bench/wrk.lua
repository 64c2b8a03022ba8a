-- wrk script for bench/run: an optional pause between requests on each
-- connection (WRK_DELAY_MS, whole milliseconds: wrk 4 has no fixed-rate
-- mode, so a paced run is closed-loop: N connections, each sending its next
-- request DELAY ms after the previous answer), and one machine-readable
-- summary line at the end (latencies in microseconds).

local delay_ms = tonumber(os.getenv("WRK_DELAY_MS") or "0") or 0

if delay_ms > 0 then
  function delay()
    return delay_ms
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "BENCH_JSON {\"requests\":%d,\"duration_us\":%d,\"bytes\":%d," ..
    "\"err_connect\":%d,\"err_read\":%d,\"err_write\":%d,\"err_status\":%d,\"err_timeout\":%d," ..
    "\"min\":%d,\"p50\":%d,\"p90\":%d,\"p99\":%d,\"p999\":%d,\"max\":%d,\"mean\":%.1f}\n",
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency.min, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), latency.max, latency.mean))
end
