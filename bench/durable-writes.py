#!/usr/bin/python3
"""Durable 4 KiB writes with a fixed number in flight, each with NBD_CMD_FLAG_FUA (fio's nbd engine
cannot set FUA). Usage: durable-writes.py URI SECONDS INFLIGHT SIZE_BYTES. Prints one JSON line:
{"ops": N, "seconds": S, "iops": X, "p99_ms": Y}. Needs Debian's python3 with libnbd (python3-libnbd)."""
import json
import random
import sys
import time

import nbd

uri, seconds, inflight, size = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
block = 4096
h = nbd.NBD()
h.connect_uri(uri)
buf = nbd.Buffer.from_bytearray(bytearray(b"\xa5" * block))
latencies = []
started_at = {}
done = 0
rng = random.Random(1)


def completed(cookie_holder, error):
    global done
    cookie = cookie_holder[0]
    latencies.append(time.perf_counter() - started_at.pop(cookie))
    done += 1
    return 1  # auto-retire


def issue():
    holder = [0]
    offset = rng.randrange(size // block) * block
    t = time.perf_counter()
    cookie = h.aio_pwrite(buf, offset, completion=lambda err, holder=holder: completed(holder, err), flags=nbd.CMD_FLAG_FUA)
    holder[0] = cookie
    started_at[cookie] = t


start = time.perf_counter()
for _ in range(inflight):
    issue()
while True:
    h.poll(-1)
    now = time.perf_counter()
    if now - start >= seconds:
        break
    while h.aio_in_flight() < inflight:
        issue()
while h.aio_in_flight() > 0:
    h.poll(-1)
elapsed = time.perf_counter() - start
latencies.sort()
p99 = latencies[int(len(latencies) * 0.99)] if latencies else 0
print(json.dumps({"ops": done, "seconds": elapsed, "iops": done / elapsed, "p99_ms": p99 * 1000}))
h.shutdown()
