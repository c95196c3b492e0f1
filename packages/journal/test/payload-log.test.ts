/**
 * Payload log segments: retired segments become spares and are renamed into place as new segments;
 * a clean close cuts the active segment to its tail; after a crash a recycled segment's stale bytes
 * are never taken for data (a frame whose payload did not reach it is a torn tail, and the segment
 * named by a cut seq is rewritten from its start).
 */
import { cpSync, closeSync, openSync, readdirSync, statSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Journal, JournalTornTailError } from '../src/index.js';
import { payloadSpareSegments } from '../src/limits.js';
import { replayAll, replayError, tempDir } from './helpers.js';

/** Four 256-byte payloads fill a segment. */
const segmentBytes = 1024;
const payloadBytes = 256;
const payloadOf = (seq: number): Buffer => Buffer.alloc(payloadBytes, seq & 0xff);
const open = (dir: string, create = false): Promise<Journal<number>> => Journal.open<number>(dir, { create, payloadSegmentBytes: segmentBytes });

/** Append records one batch each; the meta is the seq. */
async function appendRecords(journal: Journal<number>, count: number): Promise<void> {
  for (let i = 0; i < count; i++) {
    const seq = journal.lastSeq + 1;
    assert.is(await journal.append(seq, { payload: payloadOf(seq) }), seq);
  }
}

function files(dir: string, ext: string): Map<number, number> {
  const payloads = join(dir, 'payloads');
  return new Map(
    readdirSync(payloads)
      .filter((name) => name.endsWith(ext))
      .map((name) => [Number(name.slice(0, 16)), statSync(join(payloads, name)).ino]),
  );
}

const segmentPath = (dir: string, id: number): string => join(dir, 'payloads', `${String(id).padStart(16, '0')}.seg`);

/** Every record replays with its own payload, except those at or below droppedThrough. */
async function expectRecords(journal: Journal<number>, firstSeq: number, lastSeq: number, droppedThrough: number): Promise<void> {
  const records = await replayAll(journal);
  assert.equal(
    records.map((r) => r.seq),
    Array.from({ length: lastSeq - firstSeq + 1 }, (_, i) => firstSeq + i),
  );
  for (const r of records) {
    assert.is(r.meta, r.seq);
    assert.is(r.payloadLength, payloadBytes);
    if (r.seq <= droppedThrough) assert.is(r.payload, undefined, `seq ${r.seq} was dropped`);
    else assert.ok(r.payload !== undefined && Buffer.from(r.payload).equals(payloadOf(r.seq)), `payload of seq ${r.seq}`);
  }
  const report = await journal.verify();
  assert.ok(report.ok, JSON.stringify(report.problems));
}

/** A journal whose segments 1..21 were retired (9, 13, 17, 21 kept as spares) and 25..37 are live. */
async function withSpares(): Promise<{ dir: string; journal: Journal<number>; spareInodes: Map<number, number> }> {
  const dir = tempDir('spares');
  const journal = await open(dir, true);
  await appendRecords(journal, 40);
  assert.equal([...files(dir, '.seg').keys()], [1, 5, 9, 13, 17, 21, 25, 29, 33, 37]);
  await journal.dropPayloads(24);
  const spareInodes = files(dir, '.spare');
  assert.is(payloadSpareSegments, 4);
  assert.equal([...spareInodes.keys()], [9, 13, 17, 21], 'the newest retired segments are kept, up to the limit');
  assert.equal([...files(dir, '.seg').keys()], [25, 29, 33, 37]);
  const stats = await journal.stats();
  assert.is(stats.spareBytes, 4 * segmentBytes);
  assert.ok(stats.diskBytes >= 8 * segmentBytes, 'disk bytes count the spares');
  return { dir, journal, spareInodes };
}

test('retired segments become spares, and new segments reuse them before any new file', async () => {
  const { dir, journal, spareInodes } = await withSpares();
  await appendRecords(journal, 16);
  const segments = files(dir, '.seg');
  assert.equal([...segments.keys()], [25, 29, 33, 37, 41, 45, 49, 53]);
  assert.equal(
    [41, 45, 49, 53].map((id) => segments.get(id)),
    [9, 13, 17, 21].map((id) => spareInodes.get(id)),
    'each new segment is a spare renamed, oldest first',
  );
  assert.is(files(dir, '.spare').size, 0);
  assert.is((await journal.stats()).spareBytes, 0);
  await appendRecords(journal, 1);
  assert.ok(![...spareInodes.values()].includes(files(dir, '.seg').get(57)!), 'with no spare left, a new file');
  await expectRecords(journal, 1, 57, 24);
  await journal.close();
  const reopened = await open(dir);
  await expectRecords(reopened, 1, 57, 24);
  await reopened.close();
});

test('a clean close cuts a recycled active segment to its tail, and a reopen appends right after it', async () => {
  const { dir, journal } = await withSpares();
  await appendRecords(journal, 14);
  assert.is(statSync(segmentPath(dir, 53)).size, segmentBytes, 'the recycled segment keeps its old length while open');
  await journal.close();
  assert.is(statSync(segmentPath(dir, 53)).size, 2 * payloadBytes);
  const reopened = await open(dir);
  await appendRecords(reopened, 2);
  assert.equal([...files(dir, '.seg').keys()], [25, 29, 33, 37, 41, 45, 49, 53], 'seqs 55 and 56 went into segment 53');
  await expectRecords(reopened, 1, 56, 24);
  await reopened.close();
});

test('after a crash, a recycled active segment counts as full: appends go to a new segment', async () => {
  const { dir, journal } = await withSpares();
  await appendRecords(journal, 14);
  const crashed = tempDir('spares-crash');
  cpSync(dir, crashed, { recursive: true });
  await journal.close();
  const reopened = await open(crashed);
  await expectRecords(reopened, 1, 54, 24);
  await appendRecords(reopened, 2);
  assert.equal([...files(crashed, '.seg').keys()], [25, 29, 33, 37, 41, 45, 49, 53, 55]);
  await expectRecords(reopened, 1, 56, 24);
  await reopened.close();
  const again = await open(crashed);
  await expectRecords(again, 1, 56, 24);
  await again.close();
});

/**
 * A power cut after seqs 53 and 54 reached LevelDB but their payloads never left the page cache: the
 * recycled segment 53 (once segment 21) still holds segment 21's bytes where they should be.
 */
async function powerCut(): Promise<string> {
  const { dir, journal } = await withSpares();
  await appendRecords(journal, 14);
  const crashed = tempDir('spares-power');
  cpSync(dir, crashed, { recursive: true });
  await journal.close();
  const fd = openSync(segmentPath(crashed, 53), 'r+');
  writeSync(fd, Buffer.concat([payloadOf(21), payloadOf(22)]), 0, 2 * payloadBytes, 0);
  closeSync(fd);
  return crashed;
}

async function tornAt(journal: Journal<number>): Promise<JournalTornTailError> {
  const err = await replayError(journal);
  assert.ok(err instanceof JournalTornTailError, String(err));
  return err;
}

test('after a power cut, stale bytes in a recycled segment read as a torn tail, and the segment is rewritten', async () => {
  const crashed = await powerCut();
  const reopened = await open(crashed);
  const err = await tornAt(reopened);
  assert.is(err.seq, 53);
  assert.is(err.kind, 'payload-crc');
  assert.is(await reopened.cutTail(53), 2);
  await expectRecords(reopened, 1, 52, 24);
  // Seq 53 again: the segment of that name holds no committed payload, so it is written from its start.
  await appendRecords(reopened, 3);
  assert.equal([...files(crashed, '.seg').keys()], [25, 29, 33, 37, 41, 45, 49, 53]);
  await expectRecords(reopened, 1, 55, 24);
  await reopened.close();
  assert.is(statSync(segmentPath(crashed, 53)).size, 3 * payloadBytes);
  const again = await open(crashed);
  await expectRecords(again, 1, 55, 24);
  await again.close();
});

test('a torn tail inside a recycled segment is cut at its first bad record, and later appends start a new segment', async () => {
  const crashed = await powerCut();
  // Seq 53's payload did reach the disk; seq 54's did not.
  const fd = openSync(segmentPath(crashed, 53), 'r+');
  writeSync(fd, payloadOf(53), 0, payloadBytes, 0);
  closeSync(fd);
  const reopened = await open(crashed);
  const err = await tornAt(reopened);
  assert.is(err.seq, 54);
  assert.is(await reopened.cutTail(54), 1);
  await appendRecords(reopened, 1);
  assert.equal([...files(crashed, '.seg').keys()], [25, 29, 33, 37, 41, 45, 49, 53, 54]);
  await expectRecords(reopened, 1, 54, 24);
  await reopened.close();
});

test.run();
