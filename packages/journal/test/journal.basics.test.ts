import { readFileSync, writeFileSync } from 'node:fs';
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { Level } from 'level';
import { pack } from 'msgpackr';
import { lastValueFrom, take, tap, toArray } from 'rxjs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { rejects } from 'node:assert/strict';
import { Journal, JournalCorruptionError, JournalError } from '../src/index.js';
import { replayChunkValues } from '../src/limits.js';
import { replayAll, tempDir } from './helpers.js';

const range = (from: number, to: number): number[] => Array.from({ length: to - from + 1 }, (_, i) => from + i);

test('appends in one turn share one batch and resolve with consecutive seqs', async () => {
  const journal = await Journal.open(tempDir(), { create: true });
  const batches: number[] = [];
  journal.batches$.subscribe((b) => batches.push(b.records));
  const seqs = await Promise.all([journal.append('a'), journal.append('b', { payload: Buffer.from('xyz') }), journal.append('c')]);
  assert.equal(seqs, [1, 2, 3]);
  assert.equal(batches, [3]);
  const records = await replayAll(journal);
  assert.equal(records.map((r) => r.meta), ['a', 'b', 'c']);
  assert.equal(records[1].payload?.toString(), 'xyz');
  assert.equal(records[1].payloadLength, 3);
  assert.is(records[0].payload, undefined);
  await journal.close();
});

test('a payload CRC given by the caller is stored as is, and replay checks the payload against it', async () => {
  const dir = tempDir();
  const journal = await Journal.open(dir, { create: true });
  const payload = Buffer.from('block');
  await journal.append('right', { payload, payloadCrc: crc32c(payload) });
  await journal.append('wrong', { payload, payloadCrc: crc32c(payload) ^ 1 });
  const records: number[] = [];
  await rejects(
    lastValueFrom(journal.replay().pipe(tap((r) => records.push(r.seq)))),
    (err: unknown) => err instanceof JournalCorruptionError && err.seq === 2 && err.kind === 'payload-crc',
  );
  assert.equal(records, [1], 'the record with the right CRC replays; the wrong one is named');
  await journal.close();
});

test('a batch is synced when any member asks, and sync() waits for durability', async () => {
  const journal = await Journal.open(tempDir(), { create: true });
  const syncs: boolean[] = [];
  journal.batches$.subscribe((b) => syncs.push(b.sync));
  await Promise.all([journal.append(1), journal.append(2, { sync: true })]);
  await journal.append(3);
  await journal.sync();
  await journal.sync();
  assert.equal(syncs, [true, false, true], 'one synced batch, one plain batch, one sync barrier, no barrier when already durable');
  await journal.close();
});

test('the commit hook sees records in seq order before appends resolve', async () => {
  const seen: number[] = [];
  let resolvedBeforeHook = false;
  const journal = await Journal.open<number>(tempDir(), {
    create: true,
    onCommit: (records) => {
      for (const r of records) seen.push(r.seq);
    },
  });
  const results = await Promise.all(
    Array.from({ length: 50 }, (_, i) =>
      journal.append(i).then((seq) => {
        if (!seen.includes(seq)) resolvedBeforeHook = true;
        return seq;
      }),
    ),
  );
  assert.equal(seen, results);
  assert.not.ok(resolvedBeforeHook);
  await journal.close();
});

test('a throwing commit hook rejects its batch but the records stay committed', async () => {
  const dir = tempDir();
  const journal = await Journal.open(dir, { create: true });
  journal.onCommit = () => {
    throw new Error('apply failed');
  };
  await rejects(() => journal.append('x'), /apply failed/);
  journal.onCommit = undefined;
  assert.is(await journal.append('y'), 2);
  assert.equal((await replayAll(journal)).map((r) => r.meta), ['x', 'y']);
  await journal.close();
});

test('a failed LevelDB batch rejects every member, consumes no seq, and later batches commit in order', async () => {
  const dir = tempDir();
  const journal = await Journal.open<string>(dir, { create: true });
  await journal.append('before', { payload: Buffer.from('p0') });
  // Fault injection: the database refuses the next batch as a full or failing disk would.
  // (`_batch` is LevelDB's batch write, which the write path and the public `batch` both call.)
  const db = (journal as unknown as { db: { _batch: (...args: unknown[]) => Promise<void> } }).db;
  const batch = db._batch;
  db._batch = () => Promise.reject(new Error('injected: no space left on device'));
  const failed = await Promise.allSettled([journal.append('a'), journal.append('b', { sync: true, payload: Buffer.from('lost') }), journal.append('c')]);
  db._batch = batch;
  assert.equal(failed.map((f) => f.status), ['rejected', 'rejected', 'rejected']);
  for (const f of failed) assert.match(String((f as PromiseRejectedResult).reason), /batch of 3 records failed: injected: no space left on device/);
  assert.equal(await Promise.all([journal.append('d', { payload: Buffer.from('p1') }), journal.append('e', { sync: true })]), [2, 3]);
  await journal.close();
  const reopened = await Journal.open<string>(dir);
  const records = await replayAll(reopened);
  assert.equal(records.map((r) => [r.seq, r.meta, r.payload?.toString()]), [
    [1, 'before', 'p0'],
    [2, 'd', 'p1'],
    [3, 'e', undefined],
  ]);
  assert.ok((await reopened.verify()).ok);
  await reopened.close();
});

test('replay honours from/to, stops reading when unsubscribed, and returns nothing past the end', async () => {
  const journal = await Journal.open(tempDir(), { create: true });
  for (let round = 0; round < 10; round++) await Promise.all(Array.from({ length: 10 }, (_, i) => journal.append(round * 10 + i + 1)));
  assert.equal((await replayAll(journal, 15, 22)).map((r) => r.seq), [15, 16, 17, 18, 19, 20, 21, 22]);
  assert.equal((await replayAll(journal, 99)).map((r) => r.meta), [99, 100]);
  assert.equal(await replayAll(journal, 101), []);
  const firstThree = await lastValueFrom(journal.replay().pipe(take(3), toArray()));
  assert.equal(firstThree.map((r) => r.seq), [1, 2, 3]);
  await journal.close();
});

test('replayFrames gives the records of replay, one array per frame, honouring from/to and unsubscribing', async () => {
  const journal = await Journal.open<number>(tempDir(), { create: true });
  for (let round = 0; round < 10; round++) await Promise.all(Array.from({ length: 10 }, (_, i) => journal.append(round * 10 + i + 1, { payload: Buffer.alloc(8, i) })));
  const frames = await lastValueFrom(journal.replayFrames(15, 42).pipe(toArray()));
  // Each round of ten appends is one batch and one frame; the range cuts the first and the last.
  assert.equal(frames.map((f) => f.map((r) => r.seq)), [[15, 16, 17, 18, 19, 20], range(21, 30), range(31, 40), [41, 42]]);
  assert.equal(frames.flat(), await replayAll(journal, 15, 42));
  assert.equal(
    frames.flat().map((r) => r.payload),
    frames.flat().map((r) => Buffer.alloc(8, (r.seq - 1) % 10)),
  );
  const firstTwo = await lastValueFrom(journal.replayFrames().pipe(take(2), toArray()));
  assert.equal(firstTwo.map((f) => f[0].seq), [1, 11]);
  assert.equal(await lastValueFrom(journal.replayFrames(101).pipe(toArray())), []);
  await journal.close();
});

test('replay reads ahead across chunks, and pause holds it back until its promise resolves', async () => {
  const journal = await Journal.open<number>(tempDir(), { create: true });
  // One frame per batch, more frames than one LevelDB chunk (replayChunkValues) holds.
  const frames = replayChunkValues * 2 + 7;
  for (let i = 1; i <= frames; i++) await journal.append(i, { payload: Buffer.alloc(8, i & 0xff) });
  const seen: number[] = [];
  let release: () => void = () => undefined;
  const held = new Promise<void>((resolve) => (release = resolve));
  let pauses = 0;
  const done = lastValueFrom(
    journal.replay(1, undefined, { pause: () => (++pauses === 10 ? held : undefined) }).pipe(
      tap((r) => seen.push(r.meta)),
      toArray(),
    ),
  );
  await new Promise((resolve) => setTimeout(resolve, 50));
  assert.is(seen.length, 10, 'replay stops after the frame whose pause it waits for');
  release();
  const records = await done;
  assert.equal(records.map((r) => r.seq), Array.from({ length: frames }, (_, i) => i + 1));
  assert.ok(records.every((r) => r.payload?.equals(Buffer.alloc(8, r.seq & 0xff))));
  assert.is(pauses, frames - 1, 'pause is called after every frame but the last');
  // Stopping inside the second chunk leaves the read-ahead of the third to finish before the iterator closes.
  const some = await lastValueFrom(journal.replay().pipe(take(replayChunkValues + 3), toArray()));
  assert.is(some.at(-1)?.seq, replayChunkValues + 3);
  await journal.close();
});

test('checkpoints: latest wins, pruning keeps the newest, a checkpoint past the log is refused', async () => {
  const journal = await Journal.open(tempDir(), { create: true });
  assert.is(await journal.latestCheckpoint(), undefined);
  for (let i = 1; i <= 5; i++) {
    await journal.append(i);
    await journal.putCheckpoint(i, Buffer.from(`state-${i}`));
  }
  const latest = await journal.latestCheckpoint();
  assert.is(latest?.seq, 5);
  assert.is(latest?.blob.toString(), 'state-5');
  assert.is(await journal.pruneCheckpoints(2), 3);
  assert.equal(await journal.checkpointSeqs(), [4, 5]);
  await rejects(() => journal.putCheckpoint(6, Buffer.alloc(1)), (e: unknown) => (e as JournalError).code === 'EINVAL');
  await journal.close();
});

test('retention: dropped payloads keep the chain verifiable; dropped records move the start', async () => {
  const dir = tempDir();
  const journal = await Journal.open(dir, { create: true });
  for (let i = 1; i <= 30; i++) await journal.append(i, { payload: Buffer.alloc(100, i) });
  await journal.dropPayloads(10);
  let records = await replayAll(journal);
  assert.is(records.length, 30);
  assert.ok(records.slice(0, 10).every((r) => r.payload === undefined && r.payloadLength === 100));
  assert.ok(records.slice(10).every((r) => r.payload?.[0] === r.seq));
  assert.ok((await journal.verify()).ok);
  const first = await journal.dropRecords(20);
  assert.is(first, 21);
  await journal.close();
  const reopened = await Journal.open(dir);
  records = await replayAll(reopened);
  assert.equal(records.map((r) => r.seq), Array.from({ length: 10 }, (_, i) => 21 + i));
  const report = await reopened.verify();
  assert.ok(report.ok, JSON.stringify(report.problems));
  assert.is(report.firstSeq, 21);
  assert.is(await reopened.append(31), 31);
  const stats = await reopened.stats();
  assert.is(stats.records, 11);
  assert.is(stats.firstSeq, 21);
  assert.is(stats.lastSeq, 31);
  await reopened.close();
});

test('an unknown format version, a foreign LevelDB and a missing journal are refused clearly', async () => {
  const dir = tempDir();
  (await Journal.open(dir, { create: true })).close();
  await new Promise((r) => setTimeout(r, 50));
  const raw = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await raw.put(Buffer.from('mformat'), pack({ format: 'cowstack-journal', version: 99 }));
  await raw.close();
  await rejects(() => Journal.open(dir), /format version 99 is not supported; this build reads version 2/);

  const foreign = tempDir();
  const other = new Level(foreign);
  await other.put('hello', 'world');
  await other.close();
  await rejects(() => Journal.open(foreign), /not a cowstack journal/);

  await rejects(() => Journal.open(join(tempDir(), 'nope')), (e: unknown) => (e as JournalError).code === 'ENOENT');
});

test('a journal held by another process is refused with ELOCKED, not a hang', async () => {
  const dir = tempDir();
  (await Journal.open(dir, { create: true })).close();
  await new Promise((r) => setTimeout(r, 50));
  const holder = spawn(
    process.execPath,
    ['--conditions=source', '--import', 'tsx', '-e', `import('${join(import.meta.dirname, '../src/index.ts')}').then(async ({ Journal }) => { await Journal.open(${JSON.stringify(dir)}); console.log('held'); setInterval(() => {}, 1000); })`],
    { stdio: ['ignore', 'pipe', 'inherit'] },
  );
  await new Promise<void>((resolve) => holder.stdout.on('data', () => resolve()));
  try {
    const err = await Journal.open(dir).then(
      () => undefined,
      (e: unknown) => e as JournalError,
    );
    assert.ok(err instanceof JournalError);
    assert.is(err.code, 'ELOCKED');
    assert.match(err.message, /in use by another process/);
  } finally {
    holder.kill('SIGKILL');
  }
});

test('operations on a closed journal fail with ECLOSED', async () => {
  const journal = await Journal.open(tempDir(), { create: true });
  await journal.close();
  await rejects(() => journal.append(1), (e: unknown) => (e as JournalError).code === 'ECLOSED');
  await rejects(() => journal.stats(), (e: unknown) => (e as JournalError).code === 'ECLOSED');
});

test('a file left in the store does not confuse stats', async () => {
  const dir = tempDir();
  const journal = await Journal.open(dir, { create: true });
  await journal.append('x');
  writeFileSync(join(dir, 'note.txt'), 'hello');
  const stats = await journal.stats();
  assert.ok(stats.diskBytes >= readFileSync(join(dir, 'note.txt')).length);
  await journal.close();
});

test.run();
