-- wrk script for benches/compare.sh's ka-paced mode: each connection waits PACE_MS
-- milliseconds after a response before its next request, so every proxy gets the same offered
-- load, below saturation, and the latency columns compare proxies rather than queues.
local pace = tonumber(os.getenv("PACE_MS") or "2")

function delay()
    return pace
end
