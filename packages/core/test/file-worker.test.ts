/**
 * The file worker thread: batches land in order, each operation's error and byte count come back by
 * its index, reads fill memory that goes to the thread and comes back (so the thread keeps none of
 * it), and the thread neither keeps the process alive when idle nor outlives close.
 */
import { closeSync, openSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { type FileRead, FileWorker, type FileWrite } from '../src/file-worker.js';
import { tempDir } from './helpers.js';

type Outcome = Array<{ error: NodeJS.ErrnoException | null; count: number }>;
type ReadOutcome = { outcome: Outcome; memory: ArrayBuffer | undefined };

const writeBatch = (worker: FileWorker, writes: FileWrite[]) =>
  new Promise<Outcome>((resolve) => worker.write(writes, (errorOf, countOf) => resolve(writes.map((_, i) => ({ error: errorOf(i), count: countOf(i) })))));
const readBatch = (worker: FileWorker, target: Buffer, reads: FileRead[]) =>
  new Promise<ReadOutcome>((resolve) => worker.read(target, reads, (errorOf, countOf, memory) => resolve({ outcome: reads.map((_, i) => ({ error: errorOf(i), count: countOf(i) })), memory })));

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

test('reads fill memory that comes back from the thread, from several files, and report short reads and errors by index', async () => {
  const dir = tempDir();
  writeFileSync(join(dir, 'a'), Buffer.alloc(8192, 0xaa));
  writeFileSync(join(dir, 'b'), Buffer.alloc(6000, 0xbb));
  const a = openSync(join(dir, 'a'), 'r');
  const b = openSync(join(dir, 'b'), 'r');
  const sent = Buffer.allocUnsafeSlow(3 * 4096 + 100);
  sent.fill(0);
  const target = sent.subarray(100);
  const worker = new FileWorker();
  const reading = readBatch(worker, target, [
    { fd: a, position: 4096, length: 4096, targetOffset: 0 },
    { fd: b, position: 4096, length: 4096, targetOffset: 4096 },
    { fd: 1_000_000, position: 0, length: 4096, targetOffset: 8192 },
  ]);
  assert.is(sent.buffer.byteLength, 0, 'the memory went to the thread: the caller\'s views are empty meanwhile');
  const { outcome, memory } = await reading;
  assert.ok(memory !== undefined && memory !== sent.buffer && memory.byteLength === 3 * 4096 + 100, 'and came back whole, as a new ArrayBuffer');
  const back = Buffer.from(memory, 100);
  assert.equal(
    outcome.map((o) => [o.error?.code ?? null, o.count]),
    [
      [null, 4096],
      [null, 6000 - 4096],
      ['EBADF', 0],
    ],
  );
  assert.ok(back.subarray(0, 4096).equals(Buffer.alloc(4096, 0xaa)), 'the first read landed at its offset');
  assert.ok(back.subarray(4096, 4096 + 1904).equals(Buffer.alloc(1904, 0xbb)), 'the short read got what the file has');
  assert.ok(back.subarray(4096 + 1904).equals(Buffer.alloc(4096 * 2 - 1904)), 'and nothing else was touched');
  assert.ok(Buffer.from(memory, 0, 100).equals(Buffer.alloc(100)), 'nor the bytes before the target');
  worker.close();
  closeSync(a);
  closeSync(b);
});

test.run();
