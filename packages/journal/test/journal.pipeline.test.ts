/**
 * Batches in flight together: two unsynced batches are written to LevelDB at once, commit in seq
 * order, and when one fails the one behind it fails too and is taken back, so seqs stay dense. An
 * unsynced batch writes its payloads while LevelDB writes its frames; a failed payload write fails
 * the batch, and a crash between the two leaves a torn tail. A synced batch flushes its payloads
 * while LevelDB writes its frames; the seal names it durable at once, and LevelDB's durable mark
 * follows with the next batch or close. A hole a crash leaves past the durable mark and the seal's
 * committed seq is a torn tail; a hole in committed records is damage. LevelDB's batch write
 * (`_batch`) and the payload log's write and flush are wrapped here to slow, fail or watch chosen
 * calls (the only way to make a real write fail on demand).
 */
import { rejects } from 'node:assert/strict';
import { spawnSync } from 'node:child_process';
import { closeSync, openSync, readdirSync, readFileSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { Level } from 'level';
import { pack, unpack } from 'msgpackr';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Journal, JournalCorruptionError, JournalError, JournalTornTailError } from '../src/index.js';
import { recordKey } from '../src/keys.js';
import { maxBatchesInFlight } from '../src/limits.js';
import { Seal } from '../src/seal.js';
import { replayAll, replayError, tempDir } from './helpers.js';

type BatchOp = { type: 'put' | 'del'; key: Buffer; value?: Buffer };
type Batch = (ops: BatchOp[], options?: { sync?: boolean }) => Promise<void>;

/**
 * Replace the journal's LevelDB batch write (`_batch`, which the write path calls and the public
 * `batch` calls in turn) with `wrap(original, callNumber, ops)`; calls count from 1.
 */
function wrapBatch(journal: Journal<number>, wrap: (original: Batch, call: number, ops: BatchOp[], options: Parameters<Batch>[1]) => Promise<void>): void {
  const db = (journal as unknown as { db: { _batch: Batch } }).db;
  const original = db._batch.bind(db) as Batch;
  let calls = 0;
  db._batch = (ops, options) => wrap((o, opt) => original(o, opt ?? options), ++calls, ops, options);
}

/** The durable mark's own put, which an idle journal makes after a synced batch: not a batch of records. */
const markOnly = (ops: BatchOp[]): boolean => ops.every((op) => op.key.toString('latin1', 0, 1) === 'm');

type PayloadWrite = (reservation: unknown, payloads: readonly Buffer[]) => void;

/** Replace the payload log's write with `wrap(original, callNumber)`; calls count from 1. */
function wrapPayloadWrite(journal: Journal<number>, wrap: (original: () => void, call: number) => void): void {
  const log = (journal as unknown as { payloadLog: { write: PayloadWrite } }).payloadLog;
  const original = log.write.bind(log);
  let calls = 0;
  log.write = (reservation, payloads) => wrap(() => original(reservation, payloads), ++calls);
}

const sleep = (ms: number): Promise<void> => new Promise((r) => setTimeout(r, ms));
const nextTurn = (): Promise<void> => new Promise((r) => setImmediate(r));
const payloadOf = (n: number): Buffer => Buffer.alloc(32, n & 0xff);

/** Append metas 0..count-1, one per event-loop turn (or per `gapMs`), without waiting for any. */
async function appendOverTurns(journal: Journal<number>, count: number, gapMs = 0): Promise<PromiseSettledResult<number>[]> {
  const appends: Promise<PromiseSettledResult<number>>[] = [];
  for (let i = 0; i < count; i++) {
    // Settled at once: an append may fail while later ones are still being issued.
    appends.push(
      journal.append(i, { payload: payloadOf(i) }).then(
        (value) => ({ status: 'fulfilled' as const, value }),
        (reason: unknown) => ({ status: 'rejected' as const, reason }),
      ),
    );
    await (gapMs > 0 ? sleep(gapMs) : nextTurn());
  }
  return Promise.all(appends);
}

/**
 * Fail LevelDB write number 3 once write 4 (the next batch) has started, so a batch is in flight
 * behind the failed one; with `deletes`, also fail taking frames back.
 */
function failThirdWrite(journal: Journal<number>, deletes: boolean): void {
  let fourthStarted: () => void = () => undefined;
  const fourth = new Promise<void>((resolve) => (fourthStarted = resolve));
  wrapBatch(journal, async (original, call, ops) => {
    if (call === 3) {
      await Promise.race([fourth, sleep(2000)]);
      throw new Error('injected write failure');
    }
    if (call === 4) fourthStarted();
    if (deletes && ops.every((op) => op.type === 'del')) throw new Error('injected delete failure');
    await original(ops);
  });
}

/** The appends that succeeded hold seqs 1..n in append order, and the log replays exactly them. */
async function expectDense(journal: Journal<number>, results: PromiseSettledResult<number>[]): Promise<void> {
  const committed = results.flatMap((r, meta) => (r.status === 'fulfilled' ? [{ seq: r.value, meta }] : []));
  assert.equal(
    committed.map((c) => c.seq),
    committed.map((_, i) => i + 1),
    'seqs are dense and follow the order of the appends',
  );
  const records = await replayAll(journal);
  assert.equal(
    records.map((r) => [r.seq, r.meta]),
    committed.map((c) => [c.seq, c.meta]),
  );
  for (const r of records) assert.ok(r.payload !== undefined && Buffer.from(r.payload).equals(payloadOf(r.meta)), `payload of seq ${r.seq}`);
  const report = await journal.verify();
  assert.ok(report.ok, JSON.stringify(report.problems));
}

/** `expectDense`, then again after closing the journal and opening it anew. */
async function expectDenseAcrossReopen(journal: Journal<number>, dir: string, results: PromiseSettledResult<number>[]): Promise<void> {
  await expectDense(journal, results);
  await journal.close();
  const reopened = await Journal.open<number>(dir);
  await expectDense(reopened, results);
  await reopened.close();
}

/** The messages of the appends that failed, in append order. */
function failureMessages(results: PromiseSettledResult<number>[]): string[] {
  return results.flatMap((r) => (r.status === 'rejected' ? [(r.reason as Error).message] : []));
}

test('two unsynced batches are written at once and commit in seq order', async () => {
  const journal = await Journal.open<number>(tempDir('pipeline'), { create: true });
  let writing = 0;
  let mostAtOnce = 0;
  wrapBatch(journal, async (original, _call, ops) => {
    writing++;
    mostAtOnce = Math.max(mostAtOnce, writing);
    try {
      await sleep(2);
      await original(ops);
    } finally {
      writing--;
    }
  });
  const committed: number[] = [];
  journal.onCommit = (records) => committed.push(...records.map((r) => r.seq));
  const results = await appendOverTurns(journal, 200);
  assert.ok(results.every((r) => r.status === 'fulfilled'));
  assert.is(mostAtOnce, maxBatchesInFlight, `at most ${maxBatchesInFlight} batches in flight, and that many were`);
  assert.equal(committed, Array.from({ length: 200 }, (_, i) => i + 1), 'the hook saw every record once, in seq order');
  await expectDense(journal, results);
  await journal.close();
});

test('a synced batch waits for the batches in flight and is alone in flight', async () => {
  const journal = await Journal.open<number>(tempDir('pipeline'), { create: true });
  const log: string[] = [];
  wrapBatch(journal, async (original, call, ops, options) => {
    if (markOnly(ops)) return original(ops);
    log.push(`start ${call}${options?.sync === true ? ' sync' : ''}`);
    await sleep(3);
    await original(ops);
    log.push(`end ${call}`);
  });
  const appends = [journal.append(1), journal.append(2)];
  await nextTurn();
  appends.push(journal.append(3));
  await nextTurn();
  appends.push(journal.append(4, { sync: true }));
  await nextTurn();
  appends.push(journal.append(5));
  assert.equal(await Promise.all(appends), [1, 2, 3, 4, 5]);
  // Batches 1 and 2 were in flight together (LevelDB may finish either first); the synced batch
  // started after both ended, and append 5, arriving while it waited, joined it.
  assert.equal(log.slice(0, 2), ['start 1', 'start 2']);
  assert.equal([...log.slice(2, 4)].sort(), ['end 1', 'end 2']);
  assert.equal(log.slice(4), ['start 3 sync', 'end 3']);
  await journal.close();
});

test('a failed batch fails the one in flight behind it, which is taken back; seqs stay dense', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  failThirdWrite(journal, false);
  const results = await appendOverTurns(journal, 60, 1);
  const failures = failureMessages(results);
  assert.ok(failures.some((m) => /injected write failure/.test(m)), 'the failed batch');
  assert.ok(failures.some((m) => /the batch before it failed/.test(m)), 'the batch in flight behind it');
  assert.ok(failures.every((m) => /injected write failure|the batch before it failed/.test(m)));
  await expectDenseAcrossReopen(journal, dir, results);
});

test('when the frames behind a failed batch cannot be taken back, later appends fail, and a reopen cuts them', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  failThirdWrite(journal, true);
  const results = await appendOverTurns(journal, 30, 1);
  const firstFailed = results.findIndex((r) => r.status === 'rejected');
  assert.ok(firstFailed > 0);
  assert.ok(results.slice(firstFailed).every((r) => r.status === 'rejected'), 'nothing commits after the failure');
  const last = results[results.length - 1] as PromiseRejectedResult;
  assert.ok(last.reason instanceof JournalError);
  assert.match((last.reason as Error).message, /could not be taken back/);
  await journal.close();

  const reopened = await Journal.open<number>(dir);
  const err = await replayError(reopened);
  assert.ok(err instanceof JournalTornTailError, String(err));
  assert.is(err.kind, 'gap');
  assert.is(err.seq, firstFailed + 1);
  assert.ok((await reopened.cutTail(err.seq)) > 0, 'the frames behind the hole go');
  await expectDense(reopened, results);
  assert.is(await reopened.append(99), firstFailed + 1, 'appends go on after the cut');
  await reopened.close();
});

/**
 * A journal of seqs 1..6 (durable through 2) as a crash can leave it: seq 4's frame never reached
 * LevelDB, seqs 5 and 6 did; the seal says records were committed through `sealedCommitted`.
 */
async function withHole(sealedCommitted: number): Promise<string> {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  for (let i = 1; i <= 6; i++) await journal.append(i, { payload: payloadOf(i), sync: i === 2 });
  await journal.close();
  const raw = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await raw.del(recordKey(4));
  await raw.put(Buffer.from('mdurable'), pack(2));
  await raw.close();
  const seal = new Seal(join(dir, 'payloads'));
  seal.write(sealedCommitted, 2);
  seal.close();
  return dir;
}

test('a hole past the durable mark and past what the seal says was committed is a torn tail', async () => {
  const reopened = await Journal.open<number>(await withHole(3));
  const err = await replayError(reopened);
  assert.ok(err instanceof JournalTornTailError, String(err));
  assert.is(err.seq, 4);
  assert.is(err.kind, 'gap');
  assert.is(await reopened.cutTail(4), 3);
  assert.equal((await replayAll(reopened)).map((r) => r.meta), [1, 2, 3]);
  assert.is(await reopened.append(7), 4);
  await reopened.close();
});

test('a hole in records the seal says were committed in this boot is damage, named by its seq', async () => {
  const reopened = await Journal.open<number>(await withHole(6));
  const err = await replayError(reopened);
  assert.ok(err instanceof JournalCorruptionError && !(err instanceof JournalTornTailError), String(err));
  assert.is(err.seq, 4);
  assert.is(err.kind, 'gap');
  assert.match(err.message, /seal says it was committed/);
  const report = await reopened.verify();
  assert.is(report.ok, false);
  assert.is(report.problems[0].seq, 4);
  await reopened.close();
});

test('a damaged seal is reported at open and written anew from what LevelDB holds, and named until acknowledged', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  assert.is(journal.damagedSeal, undefined, 'a new journal has no seal yet, which is not damage');
  for (let i = 1; i <= 3; i++) await journal.append(i, { payload: payloadOf(i), sync: i === 2 });
  await journal.close();
  const sealPath = join(dir, 'payloads', 'seal');
  const bytes = readFileSync(sealPath);
  bytes[10] ^= 0x01;
  writeFileSync(sealPath, bytes);
  const reopened = await Journal.open<number>(dir);
  assert.is(reopened.damagedSeal, 'it fails its CRC32C');
  await reopened.close();
  const seal = new Seal(join(dir, 'payloads'));
  const reading = seal.read();
  seal.close();
  assert.ok(reading.kind === 'ok', `the seal was not written anew: ${JSON.stringify(reading)}`);
  assert.is(reading.state.committedSeq, 3);
  assert.is(reading.state.durableSeq, 3, 'closing made every record durable');
  // Until someone acknowledges having reported it, every open names it (an open that failed after
  // the one that found it must not lose it).
  const again = await Journal.open<number>(dir);
  assert.is(again.damagedSeal, 'it fails its CRC32C', 'still named by the next open');
  await again.acknowledgeSealDamage();
  assert.is(again.damagedSeal, 'it fails its CRC32C', 'this open still says so');
  await again.close();
  const acknowledged = await Journal.open<number>(dir);
  assert.is(acknowledged.damagedSeal, undefined);
  await acknowledged.close();
  truncateSync(sealPath, 17);
  const short = await Journal.open<number>(dir);
  assert.is(short.damagedSeal, '17 bytes long, not 40');
  await short.close();
});

test('an unsynced batch writes its payloads while LevelDB writes its frames; a synced one writes them first', async () => {
  const journal = await Journal.open<number>(tempDir('pipeline'), { create: true });
  const log: string[] = [];
  wrapBatch(journal, async (original, call, ops) => {
    if (markOnly(ops)) return original(ops);
    log.push(`frames ${call} start`);
    await sleep(2);
    await original(ops);
    log.push(`frames ${call} end`);
  });
  wrapPayloadWrite(journal, (original, call) => {
    log.push(`payloads ${call}`);
    original();
  });
  const settled: string[] = [];
  const first = journal.append(1, { payload: payloadOf(1) }).then((seq) => settled.push(`append ${seq}`));
  await first;
  await journal.append(2, { payload: payloadOf(2), sync: true });
  assert.equal(log, ['frames 1 start', 'payloads 1', 'frames 1 end', 'payloads 2', 'frames 2 start', 'frames 2 end']);
  assert.equal(settled, ['append 1'], 'the unsynced append resolved after both of its writes');
  assert.equal((await replayAll(journal)).map((r) => [r.seq, Buffer.from(r.payload!).equals(payloadOf(r.meta))]), [
    [1, true],
    [2, true],
  ]);
  await journal.close();
});

/** Run a crash-test child (fixtures/NAME.ts) on `dir`, which must die by SIGKILL; its stdout. */
function crashChild(name: string, dir: string, acked: number): string {
  const child = join(import.meta.dirname, `fixtures/${name}.ts`);
  const run = spawnSync(process.execPath, ['--conditions=source', '--import', 'tsx', child, dir, String(acked)], { encoding: 'utf8' });
  assert.is(run.signal, 'SIGKILL', run.stderr);
  return run.stdout;
}

/** A synced append of 2 must fail with `message`; a synced append of 3 then takes seq 2. */
async function syncedAppendFails(journal: Journal<number>, message: RegExp): Promise<void> {
  const failed = await journal.append(2, { payload: payloadOf(2), sync: true }).then(
    () => undefined,
    (err: unknown) => err as Error,
  );
  assert.match(failed?.message ?? 'resolved', message);
  assert.is(await journal.append(3, { payload: payloadOf(3), sync: true }), 2, 'the failed batch consumed no seq');
}

/** The journal holds appends 1 and 3, as seqs 1 and 2, with their payloads. */
async function expectFirstAndThird(journal: Journal<number>): Promise<void> {
  assert.equal((await replayAll(journal)).map((r) => [r.seq, r.meta, Buffer.from(r.payload!).equals(payloadOf(r.meta))]), [
    [1, 1, true],
    [2, 3, true],
  ]);
}

type Flush = () => Promise<void>;

/** Replace the payload log's fdatasync with `wrap(original, callNumber)`; calls count from 1. */
function wrapPayloadFlush(journal: Journal<number>, wrap: (original: Flush, call: number) => Promise<void>): void {
  const log = (journal as unknown as { payloadLog: { sync: Flush } }).payloadLog;
  const original = log.sync.bind(log);
  let calls = 0;
  log.sync = () => wrap(original, ++calls);
}

test('a synced batch flushes its payloads while LevelDB writes and syncs its frames, and resolves after both', async () => {
  const journal = await Journal.open<number>(tempDir('pipeline'), { create: true });
  const log: string[] = [];
  wrapBatch(journal, async (original, call, ops, options) => {
    if (markOnly(ops)) return original(ops);
    log.push(`frames ${call}${options?.sync === true ? ' sync' : ''} start`);
    await original(ops);
    log.push(`frames ${call} end`);
  });
  wrapPayloadFlush(journal, async (original) => {
    log.push('flush start');
    await sleep(30);
    await original();
    log.push('flush end');
  });
  await journal.append(1, { payload: payloadOf(1), sync: true });
  log.push('append 1 resolved');
  assert.equal(log, ['frames 1 sync start', 'flush start', 'frames 1 end', 'flush end', 'append 1 resolved']);
  await journal.close();
});

test('a failed payload flush fails its synced batch, whose frames are taken back; seqs stay dense', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  await journal.append(1, { payload: payloadOf(1), sync: true });
  wrapPayloadFlush(journal, async (original, call) => {
    if (call === 1) throw new Error('injected: EIO on fdatasync');
    await original();
  });
  await syncedAppendFails(journal, /batch of 1 records failed: payload log: injected: EIO on fdatasync/);
  await journal.close();
  const reopened = await Journal.open<number>(dir);
  await expectFirstAndThird(reopened);
  await reopened.close();
});

test('a synced batch is durable at once: after a crash before any later write, its damaged payload is damage, not a torn tail', async () => {
  const dir = tempDir('pipeline');
  assert.is(crashChild('synced-crash-child', dir, 5), 'acked 5\n');
  // LevelDB's durable mark still says what was durable before the synced batch; the seal says 5.
  const raw = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  const mark = await raw.get(Buffer.from('mdurable'));
  assert.ok(mark === undefined || unpack(mark) < 5, 'the synced batch could not carry its own durable mark');
  await raw.close();
  const segment = join(dir, 'payloads', readdirSync(join(dir, 'payloads')).find((f) => f.endsWith('.seg'))!);
  const offset = [1, 2, 3, 4].reduce((sum, n) => sum + 1000 + n, 0) + 7;
  const fd = openSync(segment, 'r+');
  writeSync(fd, Buffer.from([0x5a]), 0, 1, offset);
  closeSync(fd);
  const reopened = await Journal.open<number>(dir);
  try {
    const err = await replayError(reopened);
    assert.ok(err instanceof JournalCorruptionError && !(err instanceof JournalTornTailError), String(err));
    assert.is(err.seq, 5);
    assert.is(err.kind, 'payload-crc');
    await rejects(() => reopened.cutTail(5), /is durable/);
  } finally {
    await reopened.close();
  }
});

test('an OS crash between a synced batch\'s LevelDB write and its payload flush leaves a torn tail, never acknowledged', async () => {
  const dir = tempDir('pipeline');
  assert.is(crashChild('flush-crash-child', dir, 4), 'acked 4\n', 'the child died before the synced batch committed');
  // What the OS crash loses: the payload bytes never flushed, and the seal written since its last flush.
  const payloads = join(dir, 'payloads');
  const segment = join(payloads, readdirSync(payloads).find((f) => f.endsWith('.seg'))!);
  truncateSync(segment, [1, 2, 3, 4].reduce((sum, n) => sum + 1000 + n, 0));
  const seal = new Seal(payloads);
  seal.write(4, 4);
  seal.close();
  const reopened = await Journal.open<number>(dir);
  try {
    assert.is(reopened.lastSeq, 5, 'LevelDB kept the synced frame');
    const err = await replayError(reopened);
    assert.ok(err instanceof JournalTornTailError, String(err));
    assert.is(err.seq, 5);
    assert.is(await reopened.cutTail(5), 1);
    assert.equal((await replayAll(reopened)).map((r) => [r.seq, r.payload?.length]), [1, 2, 3, 4].map((n) => [n, 1000 + n]));
    assert.ok((await reopened.verify()).ok);
  } finally {
    await reopened.close();
  }
});

test('an idle journal carries the durable mark into LevelDB, and sync and close wait for it', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  for (let n = 1; n <= 3; n++) await journal.append(n, { payload: payloadOf(n), sync: n === 3 });
  await journal.sync();
  const db = (journal as unknown as { db: Level<Buffer, Buffer> }).db;
  assert.is(unpack((await db.get(Buffer.from('mdurable')))!), 3, 'sync waited for the mark');
  await journal.append(4, { payload: payloadOf(4), sync: true });
  await journal.close();
  const raw = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  assert.is(unpack((await raw.get(Buffer.from('mdurable')))!), 4, 'close waited for the mark');
  await raw.close();
});

test('under continuous load, sync waits for the next batch to carry the durable mark, not for the journal to go idle', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  const db = (journal as unknown as { db: Level<Buffer, Buffer> }).db;
  await journal.append(0, { payload: payloadOf(0), sync: true });
  // The synced batch is durable; LevelDB's mark still trails it.
  const synced = journal.sync();
  // Two writers keep an append queued at every moment, so the flush loop never goes idle.
  let stop = false;
  let appended = 0;
  const writer = async (): Promise<void> => {
    while (!stop) {
      await journal.append(1, { payload: payloadOf(1) });
      appended++;
    }
  };
  const writers = [writer(), writer()];
  const outcome = await Promise.race([synced.then(() => 'synced'), sleep(5000).then(() => 'still waiting')]);
  const appendedAtSync = appended;
  const mark = unpack((await db.get(Buffer.from('mdurable')))!) as number;
  stop = true;
  await Promise.all(writers);
  assert.is(outcome, 'synced', 'sync resolved while the load went on');
  assert.ok(appendedAtSync < 1000, `sync waited for ${appendedAtSync} appends; one or two batches carry the mark`);
  assert.ok(mark >= 1, `LevelDB's durable mark is ${mark} after sync`);
  await journal.close();
});

test('when the idle put of the durable mark fails, sync says so; the records stay durable and the next sync carries it', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  let markPuts = 0;
  wrapBatch(journal, (original, _call, ops) => {
    if (markOnly(ops) && ++markPuts === 1) return Promise.reject(new Error('injected: I/O error'));
    return original(ops);
  });
  await journal.append(1, { payload: payloadOf(1), sync: true });
  await rejects(journal.sync(), /records through seq 1 are durable, but LevelDB's durable mark could not be written: injected: I\/O error/);
  await journal.sync();
  assert.is(markPuts, 2);
  await journal.close();
  const raw = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  assert.is(unpack((await raw.get(Buffer.from('mdurable')))!), 1);
  await raw.close();
});

test('a failed payload write fails its batch, whose frames are taken back; seqs stay dense', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  wrapPayloadWrite(journal, (original, call) => {
    if (call === 3) throw new Error('injected: no space left on device');
    original();
  });
  const results = await appendOverTurns(journal, 40, 1);
  const failures = failureMessages(results);
  assert.ok(failures.length > 0 && failures.every((m) => /payload log: injected: no space left on device|the batch before it failed/.test(m)), JSON.stringify(failures));
  assert.ok(failures.some((m) => /payload log: injected/.test(m)), 'the batch whose payloads failed');
  assert.ok(results.slice(-5).every((r) => r.status === 'fulfilled'), 'appends go on after the failure');
  await expectDenseAcrossReopen(journal, dir, results);
});

test('a failed payload write fails a synced batch too, named as the payload log\'s', async () => {
  const dir = tempDir('pipeline');
  const journal = await Journal.open<number>(dir, { create: true });
  await journal.append(1, { payload: payloadOf(1), sync: true });
  wrapPayloadWrite(journal, (original, call) => {
    if (call === 1) throw new Error('injected: no space left on device');
    original();
  });
  await syncedAppendFails(journal, /batch of 1 records failed: payload log: injected: no space left on device/);
  await expectFirstAndThird(journal);
  await journal.close();
});

test('a crash after LevelDB took the frames of a batch but before its payloads were written leaves a torn tail', async () => {
  const dir = tempDir('pipeline');
  assert.is(crashChild('payload-crash-child', dir, 5), 'acked 5\n', 'the child died before the batch committed');
  const reopened = await Journal.open<number>(dir);
  assert.is(reopened.lastSeq, 7, 'LevelDB kept the frames of the batch that never committed');
  const err = await replayError(reopened);
  assert.ok(err instanceof JournalTornTailError, String(err));
  assert.is(err.seq, 6);
  assert.is(err.kind, 'payload-missing');
  assert.is(await reopened.cutTail(6), 2);
  const records = await replayAll(reopened);
  assert.equal(
    records.map((r) => [r.seq, r.meta, r.payload?.length]),
    [1, 2, 3, 4, 5].map((n) => [n, n, 1000 + n]),
  );
  assert.ok((await reopened.verify()).ok);
  assert.is(await reopened.append(6, { payload: payloadOf(6) }), 6, 'appends go on after the cut');
  assert.ok(Buffer.from((await replayAll(reopened, 6, 6))[0].payload!).equals(payloadOf(6)));
  await reopened.close();
});

test.run();
