"""A well-behaved libnbd client that keeps working while the fuzzer attacks the same server.

Usage: /usr/bin/python3 fuzz-victim.py URI STOP_FILE SEED

Writes (plain and FUA), write-zeroes, reads and flushes at random offsets of one export, keeping a
shadow copy of what the export must hold; every read is compared with the shadow at once. It
reconnects every 100 operations (so its own handshakes happen under fuzzing too) and stops when
STOP_FILE exists, then reads the whole export back and compares it with the shadow. Prints one JSON
object: operations, bytes verified, latency percentiles, the longest gap between two completed
operations, and every error (any error is a failure: this client never sends anything invalid).
"""
import json
import os
import random
import sys
import time

import nbd

uri, stop_file, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
stats = {'ops': 0, 'writes': 0, 'fua_writes': 0, 'zeroes': 0, 'reads': 0, 'flushes': 0, 'verified_bytes': 0, 'connections': 0, 'errors': [], 'mismatches': []}
latencies = []
shadow = None
size = 0
last_done = time.monotonic()
max_gap = 0.0


def note_done(started):
    global last_done, max_gap
    now = time.monotonic()
    latencies.append(now - started)
    max_gap = max(max_gap, now - last_done)
    last_done = now
    stats['ops'] += 1


def connect():
    global shadow, size
    h = nbd.NBD()
    h.connect_uri(uri)
    stats['connections'] += 1
    if shadow is None:
        size = h.get_size()
        shadow = bytearray(size)   # the victim export starts as zeroes
    return h


def one_op(h):
    kind = rng.random()
    n = rng.choice([1, 512, 4096, 4096, 5000, 65536, rng.randint(1, 131072)])
    off = rng.randrange(0, size - n)
    started = time.monotonic()
    if kind < 0.45:
        data = rng.randbytes(n)
        fua = rng.random() < 0.2
        h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
        shadow[off:off + n] = data
        stats['fua_writes' if fua else 'writes'] += 1
    elif kind < 0.55:
        h.zero(n, off, nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
        shadow[off:off + n] = bytes(n)
        stats['zeroes'] += 1
    elif kind < 0.95:
        got = h.pread(n, off)
        if got != shadow[off:off + n]:
            stats['mismatches'].append({'offset': off, 'length': n})
        stats['verified_bytes'] += n
        stats['reads'] += 1
    else:
        h.flush()
        stats['flushes'] += 1
    note_done(started)


h = None
while not os.path.exists(stop_file):
    try:
        if h is None:
            h = connect()
        for _ in range(100):
            one_op(h)
            if os.path.exists(stop_file):
                break
        h.shutdown()
        h = None
    except nbd.Error as e:
        stats['errors'].append({'message': str(e.string), 'errno': e.errnum, 'at': time.time()})
        h = None
        time.sleep(0.05)
    if len(stats['errors']) > 50:
        break

# final check of the whole export on a fresh connection
try:
    h = connect()
    off = 0
    while off < size:
        n = min(4 << 20, size - off)
        if h.pread(n, off) != shadow[off:off + n]:
            stats['mismatches'].append({'offset': off, 'length': n, 'final': True})
        stats['verified_bytes'] += n
        off += n
    h.shutdown()
except nbd.Error as e:
    stats['errors'].append({'message': str(e.string), 'errno': e.errnum, 'final': True})

latencies.sort()


def pct(p):
    return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3) if latencies else None


stats['latency_ms'] = {'p50': pct(0.5), 'p99': pct(0.99), 'max': round(latencies[-1] * 1000, 3) if latencies else None}
stats['max_gap_ms'] = round(max_gap * 1000, 3)
print(json.dumps(stats))
