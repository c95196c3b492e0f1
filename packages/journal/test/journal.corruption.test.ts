/**
 * Corruption: alter a stored frame, a payload or a checkpoint, or delete a frame or payload in the
 * middle; `verify()` and `replay()` must name the damaged seq and kind, never skip it.
 */
import { closeSync, openSync, rmSync, truncateSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { Level } from 'level';
import { pack } from 'msgpackr';
import { lastValueFrom, toArray } from 'rxjs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { rejects } from 'node:assert/strict';
import { Journal, JournalCorruptionError, JournalTornTailError } from '../src/index.js';
import { Seal } from '../src/seal.js';
import { tempDir } from './helpers.js';

/** A closed journal of 5 batches of 4 records (seqs 1..20), each record with a 64-byte payload. */
async function makeJournal(): Promise<string> {
  const dir = tempDir('corrupt');
  const journal = await Journal.open(dir, { create: true });
  for (let batch = 0; batch < 5; batch++) {
    await Promise.all(Array.from({ length: 4 }, (_, i) => journal.append({ n: batch * 4 + i + 1 }, { payload: Buffer.alloc(64, batch * 4 + i + 1) })));
  }
  await journal.putCheckpoint(20, Buffer.from('projection'));
  await journal.close();
  return dir;
}

function key(prefix: string, seq: number): Buffer {
  const k = Buffer.alloc(9);
  k.write(prefix, 0);
  k.writeUInt32BE(0, 1);
  k.writeUInt32BE(seq, 5);
  return k;
}

async function tamper(dir: string, edit: (db: Level<Buffer, Buffer>) => Promise<void>): Promise<void> {
  const db = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.open();
  await edit(db);
  await db.close();
}

async function expectDamage(dir: string, seq: number, kind: string): Promise<void> {
  const journal = await Journal.open(dir);
  try {
    const report = await journal.verify();
    assert.not.ok(report.ok);
    assert.is(report.problems[0].seq, seq, report.problems[0].message);
    assert.is(report.problems[0].kind, kind);
    await rejects(
      () => lastValueFrom(journal.replay().pipe(toArray())),
      (err: unknown) => err instanceof JournalCorruptionError && err.seq === seq && err.kind === kind && err.message.includes(`seq ${seq}`),
    );
  } finally {
    await journal.close();
  }
}

test('verify goes on past damage: every gap and damaged frame is named, with the records it passed over', async () => {
  const dir = await makeJournal();
  await tamper(dir, async (db) => {
    await db.del(key('r', 5));
    const value = (await db.get(key('r', 13)))!;
    value[value.length - 3] ^= 0x10;
    await db.put(key('r', 13), value);
  });
  const journal = await Journal.open(dir);
  try {
    const report = await journal.verify();
    assert.equal(
      report.problems.map((p) => [p.seq, p.kind, p.fromSeq, p.toSeq]),
      [
        [5, 'gap', 5, 8],
        // The damage is in the frame's last record; the walk passed over the whole frame.
        [16, 'crc', 13, 16],
      ],
      report.problems.map((p) => p.message).join(' | '),
    );
    assert.is(report.recordsChecked, 12, 'the frames around the damage are checked');
  } finally {
    await journal.close();
  }
});

test('a flipped byte inside a record is named by its seq', async () => {
  const dir = await makeJournal();
  await tamper(dir, async (db) => {
    const value = (await db.get(key('r', 9)))!;
    // Records of the frame starting at seq 9 follow the 48-byte header; flip a byte of the second.
    const recordBytes = (value.length - 48 - 16) / 4;
    value[48 + recordBytes + recordBytes - 1] ^= 0x01;
    await db.put(key('r', 9), value);
  });
  await expectDamage(dir, 10, 'crc');
});

test('a frame deleted from the middle is reported as a gap at its first seq', async () => {
  const dir = await makeJournal();
  await tamper(dir, (db) => db.del(key('r', 5)));
  await expectDamage(dir, 5, 'gap');
});

/** The payload log segment of makeJournal's journal: record seq s's 64-byte payload is at (s - 1) * 64. */
const segment = (dir: string): string => join(dir, 'payloads', '0000000000000001.seg');

test('an altered payload is named by its seq', async () => {
  const dir = await makeJournal();
  const fd = openSync(segment(dir), 'r+');
  writeSync(fd, Buffer.from([0xee]), 0, 1, 13 * 64 + 3);
  closeSync(fd);
  await expectDamage(dir, 14, 'payload-crc');
});

test('a payload missing from the payload log is named by its seq', async () => {
  const dir = await makeJournal();
  truncateSync(segment(dir), 6 * 64 + 10);
  await expectDamage(dir, 7, 'payload-missing');
});

test('verify names every damaged payload of a frame, and rewritePayload mends one with its exact bytes only', async () => {
  const dir = await makeJournal();
  const fd = openSync(segment(dir), 'r+');
  writeSync(fd, Buffer.from([0xee]), 0, 1, 9 * 64 + 5);
  writeSync(fd, Buffer.from([0xee]), 0, 1, 11 * 64 + 60);
  closeSync(fd);
  const journal = await Journal.open(dir);
  try {
    const damaged = await journal.verify();
    assert.equal(
      damaged.problems.map((p) => [p.seq, p.kind]),
      [
        [10, 'payload-crc'],
        [12, 'payload-crc'],
      ],
      damaged.problems.map((p) => p.message).join(' | '),
    );
    // Anything but the recorded bytes is refused, and changes nothing.
    await rejects(
      () => journal.rewritePayload(10, Buffer.alloc(64, 11)),
      (err: unknown) => err instanceof Error && /are not the payload of record seq 10 \(64 bytes, CRC 0x/.test(err.message),
    );
    await rejects(() => journal.rewritePayload(10, Buffer.alloc(65, 10)), /65 bytes with CRC/);
    await journal.rewritePayload(10, Buffer.alloc(64, 10));
    assert.equal(await journal.readPayload(10), Buffer.alloc(64, 10));
    assert.equal(
      (await journal.verify()).problems.map((p) => p.seq),
      [12],
    );
  } finally {
    await journal.close();
  }
  // Durable and in place: a reopened journal reads it, and the other records' payloads are untouched.
  const reopened = await Journal.open(dir);
  try {
    await reopened.rewritePayload(12, Buffer.alloc(64, 12));
    const report = await reopened.verify();
    assert.ok(report.ok, report.problems.map((p) => p.message).join(' | '));
    assert.is(report.payloadsChecked, 20);
    for (let seq = 1; seq <= 20; seq++) assert.equal(await reopened.readPayload(seq), Buffer.alloc(64, seq));
  } finally {
    await reopened.close();
  }
});

test('rewritePayload fills a payload a short active segment lost, and later appends go after it', async () => {
  const dir = await makeJournal();
  truncateSync(segment(dir), 19 * 64);
  const journal = await Journal.open(dir);
  try {
    assert.equal(
      (await journal.verify()).problems.map((p) => [p.seq, p.kind]),
      [[20, 'payload-missing']],
    );
    await journal.rewritePayload(20, Buffer.alloc(64, 20));
    await journal.append({ n: 21 }, { payload: Buffer.alloc(64, 21), sync: true });
  } finally {
    await journal.close();
  }
  const reopened = await Journal.open(dir);
  try {
    const report = await reopened.verify();
    assert.ok(report.ok, report.problems.map((p) => p.message).join(' | '));
    assert.equal(await reopened.readPayload(20), Buffer.alloc(64, 20));
    assert.equal(await reopened.readPayload(21), Buffer.alloc(64, 21));
  } finally {
    await reopened.close();
  }
});

test('rewritePayload makes a payload segment removed by hand anew, except the newest', async () => {
  // 256-byte segments: each batch of four 64-byte payloads fills one (segments 1, 5, 9, 13, 17).
  const dir = tempDir('corrupt');
  const journal = await Journal.open(dir, { create: true, payloadSegmentBytes: 256 });
  for (let batch = 0; batch < 5; batch++) {
    await Promise.all(Array.from({ length: 4 }, (_, i) => journal.append({ n: batch * 4 + i + 1 }, { payload: Buffer.alloc(64, batch * 4 + i + 1) })));
  }
  await journal.close();
  const payloads = join(dir, 'payloads');
  rmSync(join(payloads, '0000000000000005.seg'));
  rmSync(join(payloads, '0000000000000017.seg'));
  const reopened = await Journal.open(dir, { payloadSegmentBytes: 256 });
  try {
    assert.equal(
      (await reopened.verify()).problems.map((p) => [p.seq, p.kind]),
      [
        [5, 'payload-missing'],
        [17, 'payload-missing'],
      ],
    );
    assert.is(await reopened.payloadRewriteObstacle(5), undefined);
    assert.match((await reopened.payloadRewriteObstacle(17)) ?? 'none', /payload segment 0000000000000017\.seg is gone from .*, and it was the newest/);
    for (let seq = 5; seq <= 8; seq++) await reopened.rewritePayload(seq, Buffer.alloc(64, seq));
    await rejects(() => reopened.rewritePayload(17, Buffer.alloc(64, 17)), /payload segment 0000000000000017\.seg is gone from .*, and it was the newest/);
    assert.equal(
      (await reopened.verify()).problems.map((p) => p.seq),
      [17],
    );
    await reopened.append({ n: 21 }, { payload: Buffer.alloc(64, 21), sync: true });
  } finally {
    await reopened.close();
  }
  const again = await Journal.open(dir, { payloadSegmentBytes: 256 });
  try {
    for (let seq = 5; seq <= 8; seq++) assert.equal(await again.readPayload(seq), Buffer.alloc(64, seq));
    assert.equal(await again.readPayload(21), Buffer.alloc(64, 21));
  } finally {
    await again.close();
  }
});

test('after an OS crash, an unsynced tail whose payloads never reached disk is cut cleanly', async () => {
  const dir = tempDir('torn');
  const journal = await Journal.open(dir, { create: true });
  for (let i = 1; i <= 10; i++) await journal.append(i, { payload: Buffer.alloc(100, i), sync: i === 5 });
  // Simulate the crash: frames 6..10 reached LevelDB, their payload bytes did not reach the file, and
  // neither did a durable mark past 5, in LevelDB or in the seal.
  await journal.close();
  const raw = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await raw.put(Buffer.from('mdurable'), pack(5));
  await raw.close();
  const seal = new Seal(join(dir, 'payloads'));
  seal.write(10, 5);
  seal.close();
  truncateSync(segment(dir), 5 * 100 + 30);
  const reopened = await Journal.open(dir);
  try {
    const err = await lastValueFrom(reopened.replay().pipe(toArray())).then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(err instanceof JournalTornTailError, String(err));
    assert.is((err as JournalTornTailError).seq, 6);
    assert.is(await reopened.cutTail(6), 5);
    assert.equal((await lastValueFrom(reopened.replay().pipe(toArray()))).map((r) => r.meta), [1, 2, 3, 4, 5]);
    assert.ok((await reopened.verify()).ok);
    assert.is(await reopened.append(99, { payload: Buffer.alloc(10, 9) }), 6, 'appends continue after the cut');
    await rejects(() => reopened.cutTail(3), /is durable/);
  } finally {
    await reopened.close();
  }
});

test('an undecodable frame is named by the seq its key holds', async () => {
  const dir = await makeJournal();
  await tamper(dir, (db) => db.put(key('r', 13), Buffer.from('garbage')));
  await expectDamage(dir, 13, 'decode');
});

test('a frame rewritten to chain to a different predecessor is a broken chain', async () => {
  const dir = await makeJournal();
  await tamper(dir, async (db) => {
    const value = (await db.get(key('r', 13)))!;
    value.writeUInt32LE((value.readUInt32LE(40) ^ 1) >>> 0, 40);
    await db.put(key('r', 13), value);
  });
  await expectDamage(dir, 13, 'chain');
});

test('a damaged checkpoint is reported and refused, never loaded', async () => {
  const dir = await makeJournal();
  await tamper(dir, async (db) => {
    const value = (await db.get(key('c', 20)))!;
    value[value.length - 1] ^= 0x10;
    await db.put(key('c', 20), value);
  });
  const journal = await Journal.open(dir);
  try {
    const report = await journal.verify();
    assert.equal(report.problems.map((p) => [p.seq, p.kind]), [[20, 'checkpoint']]);
    assert.is(report.recordsChecked, 20);
    await rejects(() => journal.latestCheckpoint(), /seq 20 is corrupt \(checkpoint\)/);
  } finally {
    await journal.close();
  }
});

test('a corrupt last frame stops open with its seq, rather than appending after it', async () => {
  const dir = await makeJournal();
  await tamper(dir, async (db) => {
    const value = (await db.get(key('r', 17)))!;
    value[56] ^= 0x55;
    await db.put(key('r', 17), value);
  });
  await rejects(() => Journal.open(dir), (err: unknown) => err instanceof JournalCorruptionError && err.seq >= 17 && err.seq <= 20);
});

test('records LevelDB loses from the end of its log are noticed through the seal, not silently missing', async () => {
  const dir = tempDir('seal');
  const journal = await Journal.open(dir, { create: true });
  for (let i = 1; i <= 6; i++) await journal.append(i, { sync: i <= 4 });
  await journal.close();
  // As LevelDB does when its write-ahead log is damaged: the last frames are simply gone.
  await tamper(dir, async (db) => {
    await db.del(key('r', 6));
    await db.del(key('r', 5));
  });
  await rejects(() => Journal.open(dir), (err: unknown) => err instanceof JournalCorruptionError && err.seq === 5 && err.kind === 'gap' && /seal/.test(err.message));
  const salvage = await Journal.open(dir, { skipDamagedTail: true });
  assert.equal(salvage.lostTail, { fromSeq: 5, toSeq: 6 });
  await salvage.discardFrom(5);
  await salvage.close();
  const reopened = await Journal.open(dir);
  assert.is(reopened.lastSeq, 4);
  await reopened.close();
});

test('an empty journal verifies and replays nothing (empty is not corrupt)', async () => {
  const journal = await Journal.open(tempDir('empty'), { create: true });
  const report = await journal.verify();
  assert.ok(report.ok);
  assert.is(report.recordsChecked, 0);
  assert.equal(await lastValueFrom(journal.replay().pipe(toArray())), []);
  await journal.close();
});

test.run();
