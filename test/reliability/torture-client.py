# Load for the crash-torture harness (crash-torture.harness.ts): one libnbd connection to one export,
# DEPTH commands in flight (aio), a random mix of plain writes, FUA writes, write-zeroes, trims and
# flushes over the regions this client owns. One command at a time per region: the next command on a
# region is issued only after the previous one completed, so a region's history is a sequence.
#
# Every write carries content no other write has (a 16-byte unit naming client, op and region,
# repeated), so the harness can tell which write a region holds and whether it is torn.
#
# It prints one line per event, timestamps taken on this machine's wall clock (time.time()):
#   H <can_trim> <can_zero> <can_fua> <can_flush>             once, after connecting
#   I <op> <region> <kind> <offset> <length> <fua> <t>          issued (t taken before the request is sent)
#   A <op> <t>                                                  completed OK (t taken after libnbd said so)
#   E <op> <t> <message>                                        completed with an error
#   X <t> <message>                                             the connection failed; the client stops
# kind: w (write), z (write-zeroes), t (trim), f (flush; region -1, offset and length 0).
#   usage: torture-client.py JSON   (see ClientConfig in torture-lib.ts)
import json
import random
import struct
import sys
import time

import nbd

cfg = json.loads(sys.argv[1])
client = cfg['client']
regions = cfg['regions']          # [[region id, start byte, length], ...]
depth = cfg['depth']
bs = cfg['blockSize']
rng = random.Random(cfg['seed'])
w_write, w_fua, w_zero, w_trim, w_flush = cfg['mix']
deadline = time.time() + cfg['maxSeconds']
magic = (0xC0570000 + client) & 0xFFFFFFFF
seed32 = cfg['contentSeed'] & 0xFFFFFFFF

out = []


def emit():
    if out:
        sys.stdout.write(''.join(out))
        sys.stdout.flush()
        out.clear()


def content(op, region, length):
    unit = struct.pack('<IIII', magic, op, region, seed32)
    return (unit * ((length + 15) // 16))[:length]


h = nbd.NBD()
h.connect_uri(cfg['uri'])
can_trim, can_zero, can_fua, can_flush = h.can_trim(), h.can_zero(), h.can_fua(), h.can_flush()
out.append(f'H {int(can_trim)} {int(can_zero)} {int(can_fua)} {int(can_flush)}\n')
emit()

free = list(range(len(regions)))
inflight = {}          # cookie -> (op, index into regions or -1)
flushes = 0
op = 0
total = w_write + w_fua + w_zero + w_trim + w_flush


def issue():
    global op, flushes
    roll = rng.random() * total
    if roll >= total - w_flush:
        if flushes >= 2 or not can_flush:
            return False
        t = time.time()
        cookie = h.aio_flush()
        inflight[cookie] = (op, -1)
        out.append(f'I {op} -1 f 0 0 0 {t:.6f}\n')
        flushes += 1
        op += 1
        return True
    if not free:
        return False
    k = rng.randrange(len(free))
    index = free[k]
    free[k] = free[-1]
    free.pop()
    rid, start, length = regions[index]
    if rng.random() < 0.4:
        off, n = start, length
    else:
        a = rng.randrange(length)
        b = rng.randrange(a + 1, length + 1)
        off, n = start + a, b - a
    if roll < w_write:
        kind, fua = 'w', False
    elif roll < w_write + w_fua:
        kind, fua = 'w', can_fua
    elif roll < w_write + w_fua + w_zero:
        kind, fua = ('z', rng.random() < 0.3 and can_fua) if can_zero else ('w', False)
    else:
        kind, fua = ('t', rng.random() < 0.3 and can_fua) if can_trim else ('w', False)
    flags = nbd.CMD_FLAG_FUA if fua else 0
    t = time.time()
    if kind == 'w':
        cookie = h.aio_pwrite(content(op, rid, n), off, flags=flags)
    elif kind == 'z':
        cookie = h.aio_zero(n, off, flags=flags)
    else:
        cookie = h.aio_trim(n, off, flags=flags)
    inflight[cookie] = (op, index)
    out.append(f'I {op} {rid} {kind} {off} {n} {int(fua)} {t:.6f}\n')
    op += 1
    return True


def reap():
    global flushes
    while inflight:
        cookie = h.aio_peek_command_completed()
        if cookie <= 0:
            return
        this, index = inflight.pop(cookie)
        try:
            h.aio_command_completed(cookie)
            out.append(f'A {this} {time.time():.6f}\n')
        except nbd.Error as e:
            out.append(f'E {this} {time.time():.6f} {str(e.string).strip()}\n')
        if index == -1:
            flushes -= 1
        else:
            free.append(index)


try:
    while time.time() < deadline:
        while len(inflight) < depth and issue():
            pass
        emit()
        if inflight:
            h.poll(-1)
        reap()
        emit()
    out.append(f'X {time.time():.6f} deadline\n')
except nbd.Error as e:
    try:
        reap()
    except nbd.Error:
        pass
    out.append(f'X {time.time():.6f} {str(e.string).strip()}\n')
except BrokenPipeError:
    pass
emit()
