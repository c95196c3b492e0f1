/**
 * The layer writer thread: batches land in order, each write's error comes back by its index, and
 * the thread neither keeps the process alive when idle nor outlives close.
 */
import { closeSync, openSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { LayerWriter } from '../src/layer-writer.js';
import { tempDir } from './helpers.js';

const batch = (writer: LayerWriter, writes: Parameters<LayerWriter['write']>[0]) =>
  new Promise<Array<NodeJS.ErrnoException | null>>((resolve) => writer.write(writes, (errorOf) => resolve(writes.map((_, i) => errorOf(i)))));

test('batches are written in the order they were sent; a failed write is named by its index', async () => {
  const path = join(tempDir(), 'layer.data');
  const fd = openSync(path, 'w+');
  const writer = new LayerWriter();
  const first = batch(writer, [
    { fd, position: 0, data: Buffer.alloc(4096, 1) },
    { fd, position: 8192, data: Buffer.alloc(4096, 2) },
  ]);
  // Sent before the first is answered, overwriting its first block: it must land after it.
  const second = batch(writer, [
    { fd, position: 0, data: Buffer.alloc(4096, 3) },
    { fd: 1_000_000, position: 0, data: Buffer.alloc(4096, 4) },
    { fd, position: 4096, data: Buffer.alloc(4096, 5) },
  ]);
  assert.equal(await first, [null, null]);
  const errors = await second;
  assert.is(errors[0], null);
  assert.is(errors[1]?.code, 'EBADF', 'the write to a bad descriptor fails with its errno');
  assert.is(errors[2], null, 'and the writes after it still land');
  writer.close();
  closeSync(fd);
  const bytes = readFileSync(path);
  assert.ok(bytes.subarray(0, 4096).equals(Buffer.alloc(4096, 3)), 'the later batch wins');
  assert.ok(bytes.subarray(4096, 8192).equals(Buffer.alloc(4096, 5)));
  assert.ok(bytes.subarray(8192, 12288).equals(Buffer.alloc(4096, 2)));
});

test('the source buffers stay usable: the writer gets a copy', async () => {
  const fd = openSync(join(tempDir(), 'layer.data'), 'w+');
  const writer = new LayerWriter();
  const pooled = Buffer.from('held block'.padEnd(64, '.'));
  await batch(writer, [{ fd, position: 0, data: pooled }]);
  assert.is(pooled.toString(), 'held block'.padEnd(64, '.'), 'the caller keeps its bytes (reads lay them over the file)');
  writer.close();
  closeSync(fd);
});

test.run();
