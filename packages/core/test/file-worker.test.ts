/**
 * The file worker thread: batches land in order, each operation's error and byte count come back by
 * its index, reads fill shared memory, and the thread neither keeps the process alive when idle nor
 * outlives close.
 */
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { type FileRead, FileWorker, type FileWrite } from '../src/file-worker.js';
import { tempDir } from './helpers.js';

type Outcome = Array<{ error: NodeJS.ErrnoException | null; count: number }>;

const writeBatch = (worker: FileWorker, writes: FileWrite[]) =>
  new Promise<Outcome>((resolve) => worker.write(writes, (errorOf, countOf) => resolve(writes.map((_, i) => ({ error: errorOf(i), count: countOf(i) })))));
const readBatch = (worker: FileWorker, reads: FileRead[]) =>
  new Promise<Outcome>((resolve) => worker.read(reads, (errorOf, countOf) => resolve(reads.map((_, i) => ({ error: errorOf(i), count: countOf(i) })))));

test('write batches land in the order they were sent; a failed write is named by its index', async () => {
  const path = join(tempDir(), 'layer.data');
  const fd = openSync(path, 'w+');
  const worker = new FileWorker();
  const first = writeBatch(worker, [
    { fd, position: 0, data: Buffer.alloc(4096, 1) },
    { fd, position: 8192, data: Buffer.alloc(4096, 2) },
  ]);
  // Sent before the first is answered, overwriting its first block: it must land after it.
  const second = writeBatch(worker, [
    { fd, position: 0, data: Buffer.alloc(4096, 3) },
    { fd: 1_000_000, position: 0, data: Buffer.alloc(4096, 4) },
    { fd, position: 4096, data: Buffer.alloc(4096, 5) },
  ]);
  assert.equal(await first, [
    { error: null, count: 4096 },
    { error: null, count: 4096 },
  ]);
  const outcome = await second;
  assert.is(outcome[0].error, null);
  assert.is(outcome[1].error?.code, 'EBADF', 'the write to a bad descriptor fails with its errno');
  assert.is(outcome[2].error, null, 'and the writes after it still land');
  worker.close();
  closeSync(fd);
  const bytes = readFileSync(path);
  assert.ok(bytes.subarray(0, 4096).equals(Buffer.alloc(4096, 3)), 'the later batch wins');
  assert.ok(bytes.subarray(4096, 8192).equals(Buffer.alloc(4096, 5)));
  assert.ok(bytes.subarray(8192, 12288).equals(Buffer.alloc(4096, 2)));
});

test('the written buffers stay usable: the worker gets a copy', async () => {
  const fd = openSync(join(tempDir(), 'layer.data'), 'w+');
  const worker = new FileWorker();
  const held = Buffer.from('held block'.padEnd(64, '.'));
  await writeBatch(worker, [{ fd, position: 0, data: held }]);
  assert.is(held.toString(), 'held block'.padEnd(64, '.'), 'the caller keeps its bytes (reads lay them over the file)');
  worker.close();
  closeSync(fd);
});

test('write batches take arena regions in order, wrap round, and get their own buffer when the arena is full', async () => {
  const path = join(tempDir(), 'layer.data');
  const fd = openSync(path, 'w+');
  const worker = new FileWorker(16 * 1024);
  const kib = (n: number, fill: number): Buffer => Buffer.alloc(n * 1024, fill);
  // Sent in one turn: no answer can come back in between, so every region stays lent.
  const b1 = writeBatch(worker, [{ fd, position: 0, data: kib(6, 1) }]);
  const b2 = writeBatch(worker, [{ fd, position: 6 * 1024, data: kib(2, 2) }, { fd, position: 8 * 1024, data: kib(4, 2) }]);
  const big = writeBatch(worker, [{ fd, position: 40 * 1024, data: kib(9, 9) }]);
  assert.equal(
    worker.lentArenaRegions,
    [
      [0, 6144],
      [6144, 12288],
    ],
    'back to back; a batch over half the arena gets its own buffer',
  );
  await b1;
  const b3 = writeBatch(worker, [{ fd, position: 12 * 1024, data: kib(6, 3) }]);
  const b4 = writeBatch(worker, [{ fd, position: 18 * 1024, data: kib(6, 4) }]);
  const b5 = writeBatch(worker, [{ fd, position: 24 * 1024, data: kib(4, 5) }]);
  assert.equal(
    worker.lentArenaRegions,
    [
      [6144, 12288],
      [0, 6144],
    ],
    'the third batch wraps to the start, freed by the first; the fourth and fifth find no room between the newest and the oldest region',
  );
  await Promise.all([b2, big, b3, b4, b5]);
  assert.equal(worker.lentArenaRegions, [], 'every region is given back once answered');
  const b6 = writeBatch(worker, [{ fd, position: 28 * 1024, data: kib(8, 6) }]);
  assert.equal(worker.lentArenaRegions, [[0, 8192]], 'an empty arena lends from its start');
  await b6;
  worker.close();
  closeSync(fd);
  const bytes = readFileSync(path);
  const expect = Buffer.concat([kib(6, 1), kib(6, 2), kib(6, 3), kib(6, 4), kib(4, 5), kib(8, 6), kib(4, 0), kib(9, 9)]);
  assert.ok(bytes.equals(expect), 'every batch landed with its own bytes');
});

test('reads fill shared memory from several files and report short reads and errors by index', async () => {
  const dir = tempDir();
  writeFileSync(join(dir, 'a'), Buffer.alloc(8192, 0xaa));
  writeFileSync(join(dir, 'b'), Buffer.alloc(6000, 0xbb));
  const a = openSync(join(dir, 'a'), 'r');
  const b = openSync(join(dir, 'b'), 'r');
  const target = Buffer.from(new SharedArrayBuffer(3 * 4096 + 100)).subarray(100);
  target.fill(0);
  const worker = new FileWorker();
  const outcome = await readBatch(worker, [
    { fd: a, position: 4096, length: 4096, target, targetOffset: 0 },
    { fd: b, position: 4096, length: 4096, target, targetOffset: 4096 },
    { fd: 1_000_000, position: 0, length: 4096, target, targetOffset: 8192 },
  ]);
  assert.equal(
    outcome.map((o) => [o.error?.code ?? null, o.count]),
    [
      [null, 4096],
      [null, 6000 - 4096],
      ['EBADF', 0],
    ],
  );
  assert.ok(target.subarray(0, 4096).equals(Buffer.alloc(4096, 0xaa)), 'the first read landed at its offset');
  assert.ok(target.subarray(4096, 4096 + 1904).equals(Buffer.alloc(1904, 0xbb)), 'the short read got what the file has');
  assert.ok(target.subarray(4096 + 1904).equals(Buffer.alloc(4096 * 2 - 1904)), 'and nothing else was touched');
  worker.close();
  closeSync(a);
  closeSync(b);
});

test.run();
