/**
 * Bad requests sent by a real client (libnbd's Python binding, strict mode off so it sends what it
 * would normally refuse), with and without structured replies: each must come back with the errno
 * the spec asks for (see request-validation.ts), and the connection must go on serving afterwards.
 */
import { strict as assert } from 'node:assert';
import { test } from 'uvu';
import type { ZeroFlags } from '@cowstack/core';
import { BlockDeviceError } from '@cowstack/core';
import { MapProvider, MemoryDevice } from './memory-device.js';
import { python, run, startServer } from './helpers.js';

/** A device that claims fast zeroing but refuses it at run time (allowed by the spec). */
class RefusesFastZero extends MemoryDevice {
  override async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    if (flags.fast) throw new BlockDeviceError('ENOTSUP', 'zeroing here would be slow');
    return super.zero(offset, length, flags);
  }
}

const script = String.raw`
import json, sys, nbd
socket, structured = sys.argv[1], sys.argv[2] == '1'
SIZE = 1 << 20
results = {}

def handle(name, contexts=()):
    h = nbd.NBD()
    h.set_request_structured_replies(structured)
    for c in contexts:
        h.add_meta_context(c)
    h.connect_uri('nbd+unix:///%s?socket=%s' % (name, socket))
    h.set_strict_mode(0)
    return h

def attempt(key, fn):
    try:
        fn()
        results[key] = 0
    except nbd.Error as e:
        results[key] = e.errnum if e.errnum is not None else 'no errno: ' + str(e.string)

rw = handle('disk', ['base:allocation'])
attempt('read ok', lambda: rw.pread(4096, 0))
attempt('read past end', lambda: rw.pread(4096, SIZE - 100))
attempt('read offset past end', lambda: rw.pread(1, SIZE + 4096))
attempt('write past end', lambda: rw.pwrite(b'x' * 4096, SIZE - 100))
attempt('zero past end', lambda: rw.zero(4096, SIZE - 100))
attempt('trim past end', lambda: rw.trim(4096, SIZE - 100))
attempt('cache past end', lambda: rw.cache(4096, SIZE - 100))
attempt('block status past end', lambda: rw.block_status(4096, SIZE - 100, lambda *a: 0))
attempt('read length 0', lambda: rw.pread(0, 0))
attempt('write length 0', lambda: rw.pwrite(b'', 0))
attempt('trim length 0', lambda: rw.trim(0, 0))
attempt('zero length 0', lambda: rw.zero(0, 0))
attempt('read unknown flag', lambda: rw.pread(512, 0, 1 << 6))
attempt('write unknown flag', lambda: rw.pwrite(b'y' * 512, 0, 1 << 9))
attempt('read with NO_HOLE', lambda: rw.pread(512, 0, nbd.CMD_FLAG_NO_HOLE))
attempt('write with REQ_ONE', lambda: rw.pwrite(b'y' * 512, 0, nbd.CMD_FLAG_REQ_ONE))
attempt('trim with FAST_ZERO', lambda: rw.trim(512, 0, nbd.CMD_FLAG_FAST_ZERO))
attempt('read with DF', lambda: rw.pread(512, 0, nbd.CMD_FLAG_DF))
attempt('zero fast ok', lambda: rw.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE))
attempt('write fua ok', lambda: rw.pwrite(b'z' * 4096, 8192, nbd.CMD_FLAG_FUA))
attempt('still serving', lambda: rw.pread(4096, 8192) == b'z' * 4096 or (_ for _ in ()).throw(nbd.Error('bad data', 0)))
rw.shutdown()

nocontext = handle('disk')
attempt('block status without context', lambda: nocontext.block_status(4096, 0, lambda *a: 0))
nocontext.shutdown()

ro = handle('ro')
attempt('write on read-only', lambda: ro.pwrite(b'x' * 512, 0))
attempt('zero on read-only', lambda: ro.zero(512, 0))
attempt('trim on read-only', lambda: ro.trim(512, 0))
attempt('write past end on read-only', lambda: ro.pwrite(b'x' * 512, SIZE))
attempt('read on read-only', lambda: ro.pread(512, 0))
attempt('flush on read-only', lambda: ro.flush())
ro.shutdown()

nofast = handle('nofast')
attempt('fast zero not advertised', lambda: nofast.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
attempt('slow zero ok', lambda: nofast.zero(4096, 0))
nofast.shutdown()

refuses = handle('refuses')
attempt('fast zero refused by device', lambda: refuses.zero(4096, 0, nbd.CMD_FLAG_FAST_ZERO))
attempt('zero ok', lambda: refuses.zero(4096, 0))
refuses.shutdown()

print(json.dumps(results))
`;

const EPERM = 1;
const EINVAL = 22;
const ENOSPC = 28;
const ENOTSUP = 95;

for (const structured of [true, false]) {
  test(`bad requests get the spec's errno (${structured ? 'structured' : 'simple'} replies)`, async () => {
    const provider = MapProvider.of({
      disk: new MemoryDevice({ sizeBytes: 1 << 20 }),
      ro: new MemoryDevice({ sizeBytes: 1 << 20, readOnly: true }),
      nofast: new MemoryDevice({ sizeBytes: 1 << 20, canFastZero: false }),
      refuses: new RefusesFastZero({ sizeBytes: 1 << 20, canFastZero: true }),
    });
    const s = await startServer(provider);
    try {
      const result = await python(script, [s.socketPath, structured ? '1' : '0']);
      assert.equal(result.code, 0, result.stderr);
      const got = JSON.parse(result.stdout) as Record<string, number | string>;
      const want: Record<string, number> = {
        'read ok': 0,
        'read past end': EINVAL,
        'read offset past end': EINVAL,
        'write past end': ENOSPC,
        'zero past end': ENOSPC,
        'trim past end': EINVAL,
        'cache past end': EINVAL,
        'block status past end': EINVAL,
        'read length 0': EINVAL,
        'write length 0': EINVAL,
        'trim length 0': EINVAL,
        'zero length 0': EINVAL,
        'read unknown flag': EINVAL,
        'write unknown flag': EINVAL,
        'read with NO_HOLE': EINVAL,
        'write with REQ_ONE': EINVAL,
        'trim with FAST_ZERO': EINVAL,
        'read with DF': structured ? 0 : EINVAL,
        'zero fast ok': 0,
        'write fua ok': 0,
        'still serving': 0,
        'block status without context': EINVAL,
        'write on read-only': EPERM,
        'zero on read-only': EPERM,
        'trim on read-only': EPERM,
        'write past end on read-only': EPERM,
        'read on read-only': 0,
        'flush on read-only': 0,
        'fast zero not advertised': EINVAL,
        'slow zero ok': 0,
        'fast zero refused by device': ENOTSUP,
        'zero ok': 0,
      };
      assert.deepEqual(got, want);
    } finally {
      await s.server.close();
    }
  });
}

/** nbdsh runs `python3 -m nbd`: put the system interpreter (which has libnbd's module) first. */
const systemPython = { ...process.env, PATH: `/usr/bin:${process.env.PATH ?? ''}` };

test('nbdsh: size, a read past the end (EINVAL) and a write on a read-only export (EPERM)', async () => {
  const s = await startServer(MapProvider.of({ disk: new MemoryDevice({ sizeBytes: 1 << 20 }), ro: new MemoryDevice({ sizeBytes: 1 << 20, readOnly: true }) }));
  try {
    const code = [
      'import nbd',
      'h.set_strict_mode(0)',
      'print(h.get_size())',
      'try:\n    h.pread(4096, h.get_size() - 1)\nexcept nbd.Error as e:\n    print(e.errnum)',
    ].join('\n');
    const disk = await run('/usr/bin/nbdsh', ['-u', s.uri('disk'), '-c', code], { env: systemPython });
    assert.equal(disk.code, 0, disk.stderr);
    assert.deepEqual(disk.stdout.trim().split('\n'), [String(1 << 20), String(EINVAL)]);
    const ro = await run('/usr/bin/nbdsh', ['-u', s.uri('ro'), '-c', 'import nbd\nh.set_strict_mode(0)\ntry:\n    h.pwrite(b"x", 0)\nexcept nbd.Error as e:\n    print(e.errnum)'], { env: systemPython });
    assert.equal(ro.stdout.trim(), String(EPERM), ro.stderr);
  } finally {
    await s.server.close();
  }
});

test.run();
