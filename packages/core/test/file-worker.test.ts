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
