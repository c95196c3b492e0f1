/**
 * ReadBuffers: a returned buffer serves the next read of its length; buffers it did not lend, or
 * returns of one already returned, are ignored, so memory a caller may still hold is never reused.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { maxFreeReadBuffersPerLength } from '../src/limits.js';
import { ReadBuffers } from '../src/read-buffers.js';

test('a given-back buffer is reused once, for the same length only', () => {
  const pool = new ReadBuffers();
  const a = pool.take(1 << 20);
  assert.is(a.length, 1 << 20);
  pool.give(a.subarray(4096, 8192)); // any view of it returns the whole buffer
  const b = pool.take(4096);
  assert.is.not(b.buffer, a.buffer, 'another length gets other memory');
  const c = pool.take(1 << 20);
  assert.is(c.buffer, a.buffer, 'the same length reuses it');
  const d = pool.take(1 << 20);
  assert.is.not(d.buffer, a.buffer, 'but only once');
});

test('foreign buffers and second returns are ignored; what is kept is bounded', () => {
  const pool = new ReadBuffers();
  pool.give(Buffer.alloc(65536));
  assert.is.not(pool.take(65536).buffer, undefined);
  const a = pool.take(65536);
  pool.give(a);
  pool.give(a);
  const first = pool.take(65536);
  const second = pool.take(65536);
  assert.is(first.buffer, a.buffer);
  assert.is.not(second.buffer, a.buffer, 'a buffer returned twice is lent once');
  const many = Array.from({ length: maxFreeReadBuffersPerLength + 10 }, () => pool.take(512));
  for (const m of many) pool.give(m);
  const again = new Set(Array.from({ length: maxFreeReadBuffersPerLength + 10 }, () => pool.take(512).buffer));
  const reused = many.filter((m) => again.has(m.buffer)).length;
  assert.is(reused, maxFreeReadBuffersPerLength);
});

test.run();
