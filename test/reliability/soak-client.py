"""Soak load: one process drives several libnbd connections with asynchronous I/O.

Usage: /usr/bin/python3 soak-client.py CONFIG.json

CONFIG: {"seed", "duration_s", "window_s", "rate_per_conn" (operations per second, Poisson),
"queue_depth" (per connection), "reconnect_s" (mean time between reconnects), "block_size",
"connections": [{"name", "uri", "role": "writer" | "reader", "offset", "length", "pattern_seed"}]}

A writer owns [offset, offset + length) of its export, which starts as pattern(pattern_seed) (the
prefill, or the snapshot a clone was made from), and sends a mix of reads, writes, FUA writes,
write-zeroes (with and without NO_HOLE), trims, block status and flushes. It keeps a shadow copy of
its region: every read is compared with it, every base:allocation extent reported as zero must be
zeroes in it. Operations in flight never overlap (the region is cut into 64 KiB slots, one operation
per slot), so each completes against a known shadow. Trim follows cowstack's documented semantics:
whole blocks in the range read as zeroes afterwards, partial blocks are left alone.
A reader reads and asks block status of its region of a snapshot (read-only), which must still read
as the pattern.

Every `window_s` it prints one JSON line {"window": ...} with operations, errors and latency
percentiles (ms, from submission to completion) overall and per kind. At the end each writer flushes
and reads its whole region back (its last writes included), each reader reads its region, and a final
{"final": ...} line gives totals, errors, mismatches and the sha256 of every region.
"""
import hashlib
import json
import math
import random
import select
import sys
import time

import nbd

config = json.load(open(sys.argv[1]))
rng = random.Random(config['seed'])
BS = config['block_size']
SLOT = 65536
QD = config['queue_depth']
RATE = config['rate_per_conn']


def pattern(seed, n):
    return bytearray(random.Random(seed).randbytes(n))


class Conn:
    def __init__(self, spec):
        self.spec = spec
        self.name = spec['name']
        self.uri = spec['uri']
        self.writer = spec['role'] == 'writer'
        self.base = spec['offset']
        self.length = spec['length']
        self.shadow = pattern(spec['pattern_seed'], self.length)
        self.h = None
        self.inflight = {}          # cookie -> op
        self.busy = set()           # slots in use
        self.next_at = time.monotonic() + rng.random() / RATE
        self.reconnect_at = time.monotonic() + rng.expovariate(1.0 / config['reconnect_s'])
        self.draining = False
        self.connects = 0

    def connect(self):
        h = nbd.NBD()
        h.add_meta_context('base:allocation')
        h.connect_uri(self.uri)
        self.h = h
        self.connects += 1


conns = [Conn(c) for c in config['connections']]
started = time.monotonic()
totals = {'ops': 0, 'errors': [], 'mismatches': [], 'by_kind': {}, 'connects': 0, 'verified_bytes': 0}
window = {'ops': 0, 'errors': 0, 'lat': [], 'by_kind': {}}
window_start = started
# latency histogram per window: bucket i holds [0.05 ms * 10^(i/20), 0.05 ms * 10^((i+1)/20))
BUCKETS = 120


def bucket(ms):
    return 0 if ms <= 0.05 else min(BUCKETS - 1, int(math.log10(ms / 0.05) * 20))


def record(kind, ms):
    window['ops'] += 1
    window['lat'].append(ms)
    window['by_kind'].setdefault(kind, []).append(ms)
    totals['ops'] += 1
    totals['by_kind'][kind] = totals['by_kind'].get(kind, 0) + 1


def error(conn, what, e):
    window['errors'] += 1
    if len(totals['errors']) < 50:
        totals['errors'].append({'conn': conn.name, 'op': what, 'message': str(getattr(e, 'string', e)), 'errno': getattr(e, 'errnum', None), 't': round(time.monotonic() - started, 3)})


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(p * len(values)))], 3)


def histogram(values):
    counts = {}
    for v in values:
        b = bucket(v)
        counts[b] = counts.get(b, 0) + 1
    return counts


def flush_window(now):
    global window, window_start
    window_s = config['window_s']
    line = {'window': {
        't_start': round(window_start - started, 3), 't_end': round(now - started, 3), 'ops': window['ops'], 'errors': window['errors'],
        'p50': pct(window['lat'], 0.5), 'p99': pct(window['lat'], 0.99), 'max': pct(window['lat'], 1.0),
        'kinds': {k: histogram(v) for k, v in window['by_kind'].items()},
        'inflight': sum(len(c.inflight) for c in conns), 'connected': sum(1 for c in conns if c.h is not None),
        'histogram': histogram(window['lat']),
    }}
    print(json.dumps(line), flush=True)
    window = {'ops': 0, 'errors': 0, 'lat': [], 'by_kind': {}}
    window_start += window_s   # fixed boundaries: windows of all processes line up


def pick_range(conn, max_len):
    """A range inside one free slot: (slot, offset in region, length)."""
    free = [s for s in range(conn.length // SLOT) if s not in conn.busy]
    if not free:
        return None
    slot = rng.choice(free)
    n = rng.choice([1, 512, 4096, 4096, 8192, 12345, rng.randint(1, max_len)])
    n = min(n, SLOT)
    off = slot * SLOT + rng.randrange(0, SLOT - n + 1)
    return slot, off, n


def issue(conn, now):
    h = conn.h
    r = rng.random()
    if conn.writer:
        kind = ('read' if r < 0.30 else 'write' if r < 0.60 else 'write_fua' if r < 0.68 else 'zero' if r < 0.76 else
                'trim' if r < 0.82 else 'block_status' if r < 0.90 else 'flush')
    else:
        kind = 'read' if r < 0.8 else 'block_status'
    if kind == 'flush':
        cookie = h.aio_flush()
        conn.inflight[cookie] = {'kind': kind, 't': now, 'slot': None}
        return
    picked = pick_range(conn, 65536)
    if picked is None:
        return
    slot, off, n = picked
    op = {'kind': kind, 't': now, 'slot': slot, 'off': off, 'n': n}
    at = conn.base + off
    if kind == 'read':
        op['buf'] = nbd.Buffer(n)
        cookie = h.aio_pread(op['buf'], at)
    elif kind in ('write', 'write_fua'):
        data = bytearray(rng.randbytes(n))
        op['data'] = data
        op['buf'] = nbd.Buffer.from_bytearray(data)
        cookie = h.aio_pwrite(op['buf'], at, flags=nbd.CMD_FLAG_FUA if kind == 'write_fua' else 0)
    elif kind == 'zero':
        cookie = h.aio_zero(n, at, flags=nbd.CMD_FLAG_NO_HOLE if rng.random() < 0.5 else 0)
    elif kind == 'trim':
        cookie = h.aio_trim(n, at)
    else:
        extents = []
        op['extents'] = extents

        def on_extents(context, offset, entries, err, extents=extents):
            if context == 'base:allocation':
                extents.append((offset, list(entries)))
            return 0
        cookie = h.aio_block_status(n, at, on_extents)
    conn.busy.add(slot)
    conn.inflight[cookie] = op


def complete(conn, op, now):
    kind = op['kind']
    record(kind, (now - op['t']) * 1000)
    if op['slot'] is not None:
        conn.busy.discard(op['slot'])
    if kind == 'flush':
        return
    off, n = op['off'], op['n']
    if kind == 'read':
        got = op['buf'].to_bytearray()
        if got != conn.shadow[off:off + n]:
            totals['mismatches'].append({'conn': conn.name, 'offset': conn.base + off, 'length': n, 't': round(now - started, 3)})
        totals['verified_bytes'] += n
    elif kind in ('write', 'write_fua'):
        conn.shadow[off:off + n] = op['data']
    elif kind == 'zero':
        conn.shadow[off:off + n] = bytes(n)
    elif kind == 'trim':
        first = -(-(conn.base + off) // BS) * BS - conn.base
        end = ((conn.base + off + n) // BS) * BS - conn.base
        if end > first:
            conn.shadow[first:end] = bytes(end - first)
    elif kind == 'block_status':
        for start, entries in op['extents']:
            at = start - conn.base
            for i in range(0, len(entries), 2):
                length, flags = entries[i], entries[i + 1]
                lo, hi = max(at, off), min(at + length, off + n)
                if hi > lo and flags & nbd.STATE_ZERO and any(conn.shadow[lo:hi]):
                    totals['mismatches'].append({'conn': conn.name, 'offset': conn.base + lo, 'length': hi - lo, 'what': 'extent reported zero, data expected', 't': round(now - started, 3)})
                at += length


def harvest(conn, now):
    h = conn.h
    while conn.inflight:
        try:
            cookie = h.aio_peek_command_completed()
        except nbd.Error:
            return
        if cookie <= 0:
            return
        op = conn.inflight.pop(cookie, None)
        try:
            h.aio_command_completed(cookie)
        except nbd.Error as e:
            error(conn, op['kind'] if op else '?', e)
            if op is not None and op['slot'] is not None:
                conn.busy.discard(op['slot'])
            continue
        if op is not None:
            complete(conn, op, now)


def drop(conn):
    """After an error on the connection itself: forget it (and what was in flight) and reconnect."""
    for op in conn.inflight.values():
        if op['slot'] is not None:
            conn.busy.discard(op['slot'])
    conn.inflight.clear()
    conn.h = None   # the handle is closed when it is collected (libnbd 1.14 has no close())


for c in conns:
    c.connect()
duration = config['duration_s']
window_start = started = time.monotonic()
window_s = config['window_s']
while True:
    now = time.monotonic()
    if now - window_start >= window_s:
        flush_window(now)
    if now - started >= duration:
        break
    for c in conns:
        if c.h is None:
            try:
                c.connect()
            except nbd.Error as e:
                error(c, 'connect', e)
                continue
        if c.draining and not c.inflight:
            try:
                c.h.shutdown()
                c.h = None
                c.connect()
            except nbd.Error as e:
                error(c, 'reconnect', e)
                c.h = None
            c.draining = False
            c.reconnect_at = now + rng.expovariate(1.0 / config['reconnect_s'])
            continue
        if not c.draining and now >= c.reconnect_at:
            c.draining = True
        while not c.draining and len(c.inflight) < QD and now >= c.next_at:
            try:
                issue(c, now)
            except nbd.Error as e:
                error(c, 'issue', e)
                drop(c)
                break
            c.next_at += rng.expovariate(RATE)
        if c.next_at < now - 1.0:
            c.next_at = now     # do not build a backlog to catch up on
    rlist, wlist = [], []
    fds = {}
    for c in conns:
        if c.h is None:
            continue
        fd = c.h.aio_get_fd()
        fds[fd] = c
        d = c.h.aio_get_direction()
        if d & nbd.AIO_DIRECTION_READ:
            rlist.append(fd)
        if d & nbd.AIO_DIRECTION_WRITE:
            wlist.append(fd)
    due = min([c.next_at for c in conns if c.h is not None] + [now + 0.05])
    timeout = max(0.0, min(0.05, due - time.monotonic()))
    readable, writable, _ = select.select(rlist, wlist, [], timeout)
    now = time.monotonic()
    for fd in writable:
        c = fds[fd]
        try:
            c.h.aio_notify_write()
        except nbd.Error as e:
            error(c, 'notify_write', e)
            drop(c)
    for fd in readable:
        c = fds[fd]
        if c.h is None:
            continue
        try:
            c.h.aio_notify_read()
        except nbd.Error as e:
            error(c, 'notify_read', e)
            drop(c)
    for c in conns:
        if c.h is not None and c.inflight:
            harvest(c, now)

flush_window(time.monotonic())

# ---- final: drain, flush, read every region back
for c in conns:
    if c.h is None:
        try:
            c.connect()
        except nbd.Error as e:
            error(c, 'connect', e)
            continue
    try:
        while c.inflight:
            c.h.poll(1000)
            harvest(c, time.monotonic())
        if c.writer:
            c.h.flush()
    except nbd.Error as e:
        error(c, 'final drain', e)
regions = {}
for c in conns:
    try:
        h = c.h
        digest = hashlib.sha256()
        for at in range(0, c.length, 1 << 20):
            n = min(1 << 20, c.length - at)
            got = h.pread(n, c.base + at)
            digest.update(got)
            if got != c.shadow[at:at + n]:
                for i in range(n):
                    if got[i] != c.shadow[at + i]:
                        break
                totals['mismatches'].append({'conn': c.name, 'offset': c.base + at + i, 'what': 'final read-back', 'length': n})
            totals['verified_bytes'] += n
        if hashlib.sha256(bytes(c.shadow)).hexdigest() != digest.hexdigest():
            pass  # reported above as a mismatch
        regions[c.name] = {'uri': c.uri, 'offset': c.base, 'length': c.length, 'sha256': hashlib.sha256(bytes(c.shadow)).hexdigest(), 'writer': c.writer}
        h.shutdown()
    except nbd.Error as e:
        error(c, 'final read-back', e)
totals['connects'] = sum(c.connects for c in conns)
print(json.dumps({'final': totals, 'regions': regions, 'seconds': round(time.monotonic() - started, 3)}), flush=True)
