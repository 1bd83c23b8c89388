"""Scrapes http://HOST:PORT/metrics at RATE requests a second over keep-alive connections
until killed (SIGTERM); prints how many scrapes it made, how many failed, and the rate it
reached. For bench/metrics.sh: the load a hostile or misconfigured Prometheus could put on a
nightlight."""
import http.client
import signal
import sys
import time

host, port, rate = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
done = ok = failed = 0
stop = False


def on_term(*_):
    global stop
    stop = True


signal.signal(signal.SIGTERM, on_term)
conn = None
start = time.monotonic()
gap = 1.0 / rate
next_at = start
while not stop:
    try:
        if conn is None:
            conn = http.client.HTTPConnection(host, port, timeout=5)
        conn.request("GET", "/metrics")
        r = conn.getresponse()
        r.read()
        ok += r.status == 200
        failed += r.status != 200
    except (OSError, http.client.HTTPException):
        failed += 1
        conn = None  # the endpoint closes a connection after its lifetime
    done += 1
    next_at += gap
    delay = next_at - time.monotonic()
    if delay > 0:
        time.sleep(delay)
elapsed = time.monotonic() - start
print(f"scrapes {done} ok {ok} failed {failed} rate {done / elapsed:.0f}/s", flush=True)
