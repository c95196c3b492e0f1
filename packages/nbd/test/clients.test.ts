/**
 * Real clients against the server, with MemoryDevice as the model to check against: nbdinfo (list,
 * json, maps of both contexts), qemu-img (info, convert in and out, compare), qemu-io (unaligned
 * writes, reads, aio, zero, discard), nbdcopy with 4 connections both ways, and fio's nbd engine with
 * crc32c verification.
 */
import { strict as assert } from 'node:assert';
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { NbdServer } from '../src/index.js';
import { MapProvider, MemoryDevice } from './memory-device.js';
import { pattern, run, runOk, startServer, tempDir, type Started } from './helpers.js';

const MiB = 1024 * 1024;

function provider() {
  const disk = new MemoryDevice({ sizeBytes: 64 * MiB });
  const golden = new MemoryDevice({ sizeBytes: 16 * MiB, readOnly: true, blockSizeBytes: 65536, canMultiConn: false, extentContexts: ['base:allocation'] });
  golden.data.set(pattern(MiB, 3), 2 * MiB);
  golden.allocated.fill(1, 32, 48);
  const scratch = new MemoryDevice({ sizeBytes: 32 * MiB, canFastZero: false });
  return {
    disk,
    golden,
    scratch,
    provider: MapProvider.of({ disk, golden, scratch }, 'disk', { disk: 'a writable disk', golden: 'frozen golden image' }),
  };
}

/** A sparse source image: some data extents among holes. */
function sourceImage(sizeBytes: number): Buffer {
  const image = Buffer.alloc(sizeBytes);
  for (let i = 0; i < 12; i++) {
    const offset = (i * 2654435761) % (sizeBytes - 300000);
    pattern(100000 + i * 1111, i + 10).copy(image, offset);
  }
  return image;
}

let s: Started;
let model: ReturnType<typeof provider>;

test.before.each(async () => {
  model = provider();
  s = await startServer(model.provider);
});

test.after.each(async () => {
  await s.server.close();
});

test('nbdinfo --list --json shows every export with its properties', async () => {
  const { stdout } = await runOk('nbdinfo', ['--list', '--json', s.uri()]);
  const info = JSON.parse(stdout);
  assert.equal(info.protocol, 'newstyle-fixed');
  assert.equal(info.TLS, false);
  assert.equal(info.structured, true);
  const byName = Object.fromEntries(info.exports.map((e: { 'export-name': string }) => [e['export-name'], e]));
  assert.deepEqual(Object.keys(byName).sort(), ['disk', 'golden', 'scratch']);
  const disk = byName.disk;
  assert.equal(disk.description, 'a writable disk');
  assert.equal(disk['export-size'], 64 * MiB);
  assert.deepEqual(disk.contexts, ['base:allocation', 'qemu:allocation-depth']);
  assert.equal(disk.is_read_only, false);
  assert.equal(disk.is_rotational, false);
  for (const key of ['can_cache', 'can_df', 'can_fast_zero', 'can_flush', 'can_fua', 'can_multi_conn', 'can_trim', 'can_zero']) assert.equal(disk[key], true, key);
  assert.equal(disk.block_size_minimum, 1);
  assert.equal(disk.block_size_preferred, 4096);
  assert.equal(disk.block_size_maximum, 32 * MiB);
  const golden = byName.golden;
  assert.equal(golden.description, 'frozen golden image');
  assert.equal(golden.is_read_only, true);
  assert.equal(golden.can_multi_conn, false);
  assert.equal(golden.can_trim, false);
  assert.equal(golden.block_size_preferred, 65536);
  assert.deepEqual(golden.contexts, ['base:allocation']);
  assert.equal(byName.scratch.can_fast_zero, false);
  assert.equal(byName.scratch.can_zero, true);
});

test('nbdinfo --map for base:allocation and qemu:allocation-depth', async () => {
  model.disk.data.fill(7, 8192, 8192 + 20000);
  model.disk.allocated.fill(1, 2, 7); // 8192 .. 28671
  const base = JSON.parse((await runOk('nbdinfo', ['--map', '--json', s.uri('disk')])).stdout);
  assert.deepEqual(base, [
    { offset: 0, length: 8192, type: 3, description: 'hole,zero' },
    { offset: 8192, length: 20480, type: 0, description: 'data' },
    { offset: 28672, length: 64 * MiB - 28672, type: 3, description: 'hole,zero' },
  ]);
  const depth = JSON.parse((await runOk('nbdinfo', ['--map=qemu:allocation-depth', '--json', s.uri('disk')])).stdout);
  assert.deepEqual(
    depth.map((e: { offset: number; length: number; type: number }) => [e.offset, e.length, e.type]),
    [
      [0, 8192, 0],
      [8192, 20480, 1],
      [28672, 64 * MiB - 28672, 0],
    ],
  );
  const golden = JSON.parse((await runOk('nbdinfo', ['--map', '--json', s.uri('golden')])).stdout);
  assert.deepEqual(
    golden.map((e: { offset: number; length: number; type: number }) => [e.offset, e.length, e.type]),
    [
      [0, 2 * MiB, 3],
      [2 * MiB, MiB, 0],
      [3 * MiB, 13 * MiB, 3],
    ],
  );
});

test('qemu-img info, convert into and out of an export, compare', async () => {
  const dir = tempDir('img');
  const source = join(dir, 'source.raw');
  const image = sourceImage(64 * MiB);
  writeFileSync(source, image);
  const info = JSON.parse((await runOk('qemu-img', ['info', '--output=json', s.uri('disk')])).stdout);
  assert.equal(info['virtual-size'], 64 * MiB);
  await runOk('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', source, s.uri('disk')]);
  assert.ok(model.disk.data.equals(image), 'the model holds exactly the source image');
  await runOk('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, s.uri('disk')]);
  const out = join(dir, 'out.qcow2');
  await runOk('qemu-img', ['convert', '-f', 'raw', '-O', 'qcow2', s.uri('disk'), out]);
  await runOk('qemu-img', ['compare', '-f', 'qcow2', '-F', 'raw', out, source]);
  image[5 * MiB] ^= 0xff;
  writeFileSync(source, image);
  const differ = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', source, s.uri('disk')]);
  assert.equal(differ.code, 1, 'compare notices a one-byte difference');
  const ro = await run('qemu-img', ['convert', '-n', '-f', 'raw', '-O', 'raw', source, s.uri('golden')]);
  assert.notEqual(ro.code, 0, 'writing into a read-only export fails');
});

test('qemu-io: unaligned writes, reads, aio, zero and discard match the model', async () => {
  const commands = [
    'write -P 0xab 1000 5000',
    'read -P 0xab 1000 5000',
    'read -P 0 0 1000',
    'aio_write -P 0x11 100001 70000',
    'aio_write -P 0x22 300003 9999',
    'aio_flush',
    'read -P 0x11 100001 70000',
    'read -P 0x22 300003 9999',
    'write -z 4097 10000',
    'read -P 0 4097 10000',
    'write -z -u 65536 131072',
    'discard 300000 5000',
    'write -f 0 512',
    'flush',
  ];
  const { stdout } = await runOk('qemu-io', ['-f', 'raw', ...commands.flatMap((c) => ['-c', c]), s.uri('disk')]);
  assert.doesNotMatch(stdout, /fail|error/i);
  const expected = Buffer.alloc(64 * MiB);
  expected.fill(0xab, 1000, 6000);
  expected.fill(0x11, 100001, 170001);
  expected.fill(0x22, 300003, 310002);
  expected.fill(0, 4097, 14097);
  expected.fill(0, 65536, 196608);
  expected.fill(0, 300000, 305000);
  expected.fill(0xcd, 0, 512); // qemu-io's default pattern for write
  assert.ok(model.disk.data.equals(expected), 'device contents equal the model of the commands');
  assert.equal(model.disk.allocated[16], 0, 'write -z -u deallocated whole blocks');
  assert.ok(model.disk.flushes >= 1);
  const fua = model.disk.log.find((r) => r.op === 'write' && r.offset === 0 && r.length === 512 && r.phase === 'start');
  assert.equal(fua?.fua, true, 'write -f is sent with FUA');
  const bad = await run('qemu-io', ['-f', 'raw', '-c', 'read -P 0x99 1000 10', s.uri('disk')]);
  assert.match(bad.stdout + bad.stderr, /Pattern verification failed/, 'a wrong pattern is noticed');
});

test('nbdcopy with 4 connections, into the export and back out', async () => {
  const dir = tempDir('copy');
  const source = join(dir, 'source.raw');
  const back = join(dir, 'back.raw');
  const image = sourceImage(64 * MiB);
  writeFileSync(source, image);
  model.disk.data.fill(0x77); // stale contents nbdcopy must overwrite, holes included
  model.disk.allocated.fill(1);
  await runOk('nbdcopy', ['--connections', '4', '--threads', '4', '--flush', source, s.uri('disk')], { timeoutMs: 120000 });
  assert.ok(model.disk.data.equals(image));
  await runOk('nbdcopy', ['--connections', '4', '--threads', '4', s.uri('disk'), back], { timeoutMs: 120000 });
  assert.ok(readFileSync(back).equals(image));
  assert.equal(s.logs.filter((l) => /serving export 'disk'/.test(l)).length, 8, '4 connections each way');
});

test('fio --ioengine=nbd with crc32c verification', async () => {
  const dir = tempDir('fio');
  const output = join(dir, 'fio.json');
  const args = [
    '--name=verify',
    '--ioengine=nbd',
    `--uri=${s.uri('scratch')}`,
    '--rw=randwrite',
    '--bsrange=512-64k',
    '--size=32M',
    '--iodepth=16',
    '--verify=crc32c',
    '--do_verify=1',
    '--verify_fatal=1',
    '--verify_state_save=0',
    `--output=${output}`,
    '--output-format=json',
  ];
  const result = await run('fio', args, { timeoutMs: 120000 });
  assert.equal(result.code, 0, result.stdout + result.stderr);
  const report = JSON.parse(readFileSync(output, 'utf8'));
  const job = report.jobs[0];
  assert.equal(job.error, 0);
  assert.ok(job.write.io_bytes >= 32 * MiB, 'fio wrote the whole area');
  assert.ok(job.read.io_bytes >= 32 * MiB, 'fio read everything back to verify it');
});

test('TCP: qemu-io over nbd://127.0.0.1:PORT', async () => {
  const tcp = new NbdServer({ provider: model.provider });
  const address = await tcp.listen({ port: 0, host: '127.0.0.1' });
  try {
    assert.ok('port' in address);
    const uri = `nbd://127.0.0.1:${address.port}/disk`;
    const { stdout } = await runOk('qemu-io', ['-f', 'raw', '-c', 'write -P 0x5c 12345 100000', '-c', 'read -P 0x5c 12345 100000', uri]);
    assert.doesNotMatch(stdout, /fail/i);
    assert.ok(model.disk.data.subarray(12345, 112345).every((b) => b === 0x5c));
  } finally {
    await tcp.close();
  }
});

test.run();
