/**
 * qemu-io against a volume export, for each block size (512: no copy-up, 4096: default, 65536: the
 * largest): pattern writes and reads at unaligned offsets, concurrent aio writes that share a block,
 * aio_flush, write-zeroes and discard (unaligned and whole blocks), and requests at and across the end
 * of the device. A model of the expected bytes is kept alongside and the whole export is compared
 * with it at the end.
 *
 * Discard semantics are cowstack's documented ones (store.ts trimVolume): whole blocks inside the range
 * read as zeroes afterwards, partial blocks at the edges are left alone.
 */
import { strict as assert } from 'node:assert';
import { test } from 'uvu';
import { initStore, killAll, MiB, readExport, run, sameBytes, startServe, type Served } from './harness.js';

const sizeBytes = 16 * MiB;

test.after.each(killAll);

class Model {
  readonly data = Buffer.alloc(sizeBytes);
  constructor(readonly blockSizeBytes: number) {}
  fill(offset: number, length: number, byte: number): void {
    this.data.fill(byte, offset, offset + length);
  }
  discard(offset: number, length: number): void {
    const bs = this.blockSizeBytes;
    const from = Math.ceil(offset / bs) * bs;
    const to = Math.floor((offset + length) / bs) * bs;
    if (to > from) this.data.fill(0, from, to);
  }
}

/** Run qemu-io commands in one process; every command must succeed and every pattern must verify. */
async function qemuIo(uri: string, commands: string[]): Promise<string> {
  const args = ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), uri];
  const r = await run('qemu-io', args);
  const out = r.stdout + r.stderr;
  assert.doesNotMatch(out, /Pattern verification failed/, `qemu-io ${commands.join(' ; ')}:\n${out}`);
  assert.doesNotMatch(out, /failed|error/i, `qemu-io ${commands.join(' ; ')}:\n${out}`);
  assert.equal(r.code, 0, `qemu-io exited ${r.code}:\n${out}`);
  return out;
}

/** Run one qemu-io command that must fail. */
async function qemuIoFails(uri: string, command: string): Promise<string> {
  const r = await run('qemu-io', ['-f', 'raw', '-c', command, uri]);
  const out = r.stdout + r.stderr;
  // qemu-io does not turn a failed aio_write into its exit status; the message is what counts there.
  if (!command.startsWith('aio_')) assert.notEqual(r.code, 0, `qemu-io ${command} should fail:\n${out}`);
  assert.match(out, /failed/, `qemu-io ${command} should report a failure:\n${out}`);
  return out;
}

async function exercise(server: Served, bs: number): Promise<void> {
  const uri = server.uri('default');
  const m = new Model(bs);
  const end = sizeBytes;

  // Unaligned pattern writes and reads; the bytes around them stay zero.
  await qemuIo(uri, ['write -P 0xa1 1000 10000', 'read -P 0xa1 1000 10000', 'read -P 0 0 1000', 'read -P 0 11000 5000']);
  m.fill(1000, 10000, 0xa1);

  // Concurrent aio writes that share blocks (25000 is inside block 24576..28671 and, at 512, inside
  // block 24576..25087), then a flush; both must survive the copy-up.
  await qemuIo(uri, [
    'aio_write -P 0xb2 20000 5000',
    'aio_write -P 0xb3 25000 9000',
    'aio_write -P 0xb4 34000 3',
    'aio_write -P 0xb5 34003 70000',
    'aio_flush',
    'read -P 0xb2 20000 5000',
    'read -P 0xb3 25000 9000',
    'read -P 0xb4 34000 3',
    'read -P 0xb5 34003 70000',
  ]);
  m.fill(20000, 5000, 0xb2);
  m.fill(25000, 9000, 0xb3);
  m.fill(34000, 3, 0xb4);
  m.fill(34003, 70000, 0xb5);

  // Write-zeroes inside the first write (partial blocks only at 64 KiB, whole ones at 512).
  await qemuIo(uri, ['write -z 1000 3000', 'read -P 0 1000 3000', 'read -P 0xa1 4000 7000']);
  m.fill(1000, 3000, 0);

  // Whole blocks: write 0xc4 over 1 MiB + 256 KiB, then zero and discard whole blocks inside it.
  const base = MiB;
  await qemuIo(uri, ['write -P 0xc4 1048576 262144', 'read -P 0xc4 1048576 262144']);
  m.fill(base, 256 * 1024, 0xc4);
  const zeroAt = base + 65536;
  const discardAt = base + 131072;
  await qemuIo(uri, [
    `write -z ${zeroAt} 65536`,
    `read -P 0 ${zeroAt} 65536`,
    `discard ${discardAt} 65536`,
    `read -P 0 ${discardAt} 65536`,
    `read -P 0xc4 ${base} 65536`,
    `read -P 0xc4 ${discardAt + 65536} 65536`,
  ]);
  m.fill(zeroAt, 65536, 0);
  m.discard(discardAt, 65536);

  // Unaligned write-zeroes (with and without -u, which lets the server unmap) and unaligned discard.
  await qemuIo(uri, ['write -P 0xd6 3145728 1048576', 'write -z 3146000 200000', 'write -z -u 3400000 300000', 'read -P 0 3146000 200000', 'read -P 0 3400000 300000']);
  m.fill(3 * MiB, MiB, 0xd6);
  m.fill(3146000, 200000, 0);
  m.fill(3400000, 300000, 0);
  await qemuIo(uri, ['discard 3800001 150000']);
  m.discard(3800001, 150000);

  // The end of the device: a write ending exactly at the end works.
  await qemuIo(uri, [`write -P 0xe7 ${end - 1000} 1000`, `read -P 0xe7 ${end - 1000} 1000`, `aio_write -P 0xe8 ${end - 1} 1`, 'aio_flush', `read -P 0xe8 ${end - 1} 1`]);
  m.fill(end - 1000, 1000, 0xe7);
  m.fill(end - 1, 1, 0xe8);

  // Across and past the end: errors, and nothing changes.
  await qemuIoFails(uri, `write -P 0xee ${end - 500} 1000`);
  await qemuIoFails(uri, `write -P 0xee ${end} 1`);
  await qemuIoFails(uri, `read ${end - 500} 1000`);
  await qemuIoFails(uri, `write -z ${end - 500} 1000`);
  await qemuIoFails(uri, `aio_write -P 0xee ${end - 4096} 8192`);
  await qemuIo(uri, [`read -P 0xe7 ${end - 1000} 999`, `read -P 0xe8 ${end - 1} 1`]);

  sameBytes(await readExport(uri), m.data, `whole export (block size ${bs})`);
}

for (const bs of [4096, 512, 65536]) {
  test(`qemu-io patterns, zero, discard and the end of the device (block size ${bs})`, async () => {
    const store = await initStore({ size: '16M', blockSize: bs });
    const server = await startServe(store);
    await exercise(server, bs);
    // What was acknowledged is there after a clean restart.
    await server.stop();
    const again = await startServe(store);
    const after = await readExport(again.uri());
    assert.equal(after.length, sizeBytes);
    await qemuIo(again.uri(), ['read -P 0xa1 4000 7000', 'read -P 0xb3 25000 9000', `read -P 0xe8 ${sizeBytes - 1} 1`]);
    await again.stop();
  });
}

test.run();
