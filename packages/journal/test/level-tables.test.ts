/**
 * LevelDB table verification: a healthy journal's tables (compressed and not) pass; a flipped byte
 * in a table refuses the open with ECORRUPT naming the file and block, before LevelDB reads it (the
 * LevelDB in classic-level can abort the process on such a block); a missing table is named too.
 *
 * Table salvage (Journal.salvageTables, for `recover --force`): a damaged table is set aside in
 * `damaged/`, the database repaired, and every entry of its readable blocks written back, so exactly
 * the frames of the damaged block are missing (a gap named by its seq); frames lost from the end
 * that the newest checkpoint covers make the journal resume after it; a table whose index is lost
 * takes every entry with it; a damaged MANIFEST alone loses nothing; each entry written back is
 * counted once, for the table it came from.
 */
import { existsSync, readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { rejects } from 'node:assert/strict';
import { Journal, type JournalError } from '../src/index.js';
import { entriesRestoredByTable, restorable, type SetAside } from '../src/level-salvage.js';
import { liveTables, salvageTable, type TableEntry, verifyLevelTables } from '../src/level-tables.js';
import { tempDir } from './helpers.js';

/** A closed journal whose records are in LevelDB tables (reopening flushes the log into one). */
async function journalWithTables(): Promise<string> {
  const dir = tempDir('tables');
  const journal = await Journal.open(dir, { create: true });
  // Repetitive metadata compresses (snappy blocks); the checkpoint blob is random (stored blocks).
  for (let batch = 0; batch < 40; batch++) {
    await Promise.all(Array.from({ length: 50 }, (_, i) => journal.append({ volume: 'default', block: batch * 50 + i, note: 'x'.repeat(40) }, { payload: Buffer.alloc(512, i) })));
  }
  await journal.putCheckpoint(2000, Buffer.from(Array.from({ length: 20000 }, (_, i) => (i * 7919) % 251)));
  await journal.close();
  await (await Journal.open(dir)).close();
  return dir;
}

/** Flip a byte inside the MANIFEST's first record (it then fails its checksum); returns its name. */
function damageManifest(dir: string): string {
  const manifest = readdirSync(dir).find((n) => n.startsWith('MANIFEST-'))!;
  const bytes = readFileSync(join(dir, manifest));
  bytes[10] ^= 0x01;
  writeFileSync(join(dir, manifest), bytes);
  return manifest;
}

test('the tables of a healthy journal pass, compressed blocks included', async () => {
  const dir = await journalWithTables();
  const tables = liveTables(dir);
  assert.ok(tables.length > 0, 'the journal has tables');
  for (const t of tables) assert.is(statSync(join(dir, t.name)).size, t.sizeBytes, `${t.name} has the size the MANIFEST gives`);
  verifyLevelTables(dir);
  const journal = await Journal.open(dir);
  assert.is(journal.lastSeq, 2000);
  await journal.close();
});

test('a flipped byte in a table\'s blocks or footer refuses the open, naming the file', async () => {
  const dir = await journalWithTables();
  const table = liveTables(dir).sort((a, b) => b.sizeBytes - a.sizeBytes)[0];
  const original = readFileSync(join(dir, table.name));
  // Bytes across the file: data blocks, the filter, the index, the footer's first handle and magic.
  // (The footer's zero padding is read by no one: a flip there is harmless.)
  for (const at of [0, Math.floor(original.length / 3), Math.floor(original.length / 2), original.length - 60, original.length - 48, original.length - 1]) {
    const damaged = Buffer.from(original);
    damaged[at] ^= 0x41;
    writeFileSync(join(dir, table.name), damaged);
    await rejects(
      () => Journal.open(dir),
      (err: unknown) => (err as JournalError).code === 'ECORRUPT' && (err as Error).message.includes(`LevelDB file ${table.name} is damaged`),
      `a flip at byte ${at} of ${original.length}`,
    );
  }
  writeFileSync(join(dir, table.name), original);
  await (await Journal.open(dir)).close();
});

test('a table the MANIFEST names but the directory lacks is named', async () => {
  const dir = await journalWithTables();
  const table = liveTables(dir)[0];
  rmSync(join(dir, table.name));
  await rejects(() => Journal.open(dir), (err: unknown) => (err as JournalError).code === 'ECORRUPT' && /the MANIFEST names it but it is missing/.test((err as Error).message));
});

test('a MANIFEST record that fails its checksum is damage', async () => {
  const dir = await journalWithTables();
  const manifest = damageManifest(dir);
  await rejects(() => Journal.open(dir), (err: unknown) => (err as JournalError).code === 'ECORRUPT' && (err as Error).message.includes(`LevelDB file ${manifest} is damaged`));
});

/** The largest live table, and a byte inside its data block number `n` (found by flipping bytes of a copy). */
function tableAndBlock(dir: string, n: number): { name: string; original: Buffer; at: number; blocks: number } {
  const { name } = liveTables(dir).sort((a, b) => b.sizeBytes - a.sizeBytes)[0];
  const original = readFileSync(join(dir, name));
  const whole = salvageTable(name, original);
  assert.is(whole.lostBlocks.length, 0, 'a healthy table loses no block');
  const offsets: number[] = [];
  for (let at = 0; at < original.length; at += 256) {
    const damaged = Buffer.from(original);
    damaged[at] ^= 0x41;
    const lost = salvageTable(name, damaged).lostBlocks;
    if (lost.length !== 1 || offsets.includes(lost[0].offset)) continue;
    if (offsets.push(lost[0].offset) === n + 1) return { name, original, at, blocks: whole.dataBlocks };
  }
  throw new Error(`table ${name} has no data block ${n}`);
}

test('salvage: a damaged data block costs its frames only; the rest of the table is written back', async () => {
  const dir = await journalWithTables();
  const { name, original, at, blocks } = tableAndBlock(dir, 3);
  assert.ok(blocks > 5, `the table has several data blocks (${blocks})`);
  const damaged = Buffer.from(original);
  damaged[at] ^= 0x41;
  writeFileSync(join(dir, name), damaged);
  await rejects(() => Journal.open(dir), (err: unknown) => (err as JournalError).code === 'ECORRUPT');

  const report = await Journal.salvageTables(dir);
  assert.ok(report !== undefined, 'salvage found the damage');
  assert.is(report.tables.length, 1);
  const table = report.tables[0];
  assert.is(table.file, name);
  assert.is(table.movedTo, join('damaged', name));
  assert.ok(existsSync(join(dir, 'damaged', name)) && !existsSync(join(dir, name)), 'the damaged table is set aside, not deleted');
  assert.equal(readFileSync(join(dir, 'damaged', name)), damaged, 'set aside byte for byte');
  assert.is(table.blocksLost, 1);
  assert.match(table.problem, `LevelDB file ${name} is damaged`);
  assert.match(table.lost[0], /keys after frame seq \d+ up to frame seq \d+/);
  assert.ok(table.entriesRestored > 0, 'the readable blocks were written back');
  assert.not.ok(report.formatRewritten);

  // Exactly the frames of the lost block are missing: the first is a gap named by its seq.
  const journal = await Journal.open(dir);
  assert.is(journal.lastSeq, 2000, 'the frames after the lost block are back');
  const verify = await journal.verify();
  const gaps = verify.problems.filter((p) => p.kind === 'gap');
  assert.is(gaps.length, 1, `one gap: ${verify.problems.map((p) => p.message).join(' | ')}`);
  const [afterSeq, throughSeq] = [...table.lost[0].matchAll(/frame seq (\d+)/g)].map((m) => Number(m[1]));
  assert.ok(gaps[0].seq > afterSeq && gaps[0].seq <= throughSeq, `the gap (seq ${gaps[0].seq}) lies in the lost block's range (${table.lost[0]})`);
  assert.ok(verify.problems.every((p) => p.kind === 'gap' || p.kind === 'chain' || p.seq! >= gaps[0].seq), 'nothing before the gap is damaged');
  await journal.close();
  assert.is(await Journal.salvageTables(dir), undefined, 'a second salvage finds nothing to do');
});

test('salvage: frames lost from the end that the newest checkpoint covers: the journal resumes after it', async () => {
  const dir = await journalWithTables();
  const { blocks } = tableAndBlock(dir, 0);
  const { name, original, at } = tableAndBlock(dir, blocks - 1);
  const damaged = Buffer.from(original);
  damaged[at] ^= 0x41;
  writeFileSync(join(dir, name), damaged);
  const report = await Journal.salvageTables(dir);
  assert.ok(report !== undefined);
  assert.match(report.tables[0].lost[0], /up to the last frame/);
  const resumed = report.resumedAfterCheckpoint;
  assert.ok(resumed !== undefined, 'the checkpoint at seq 2000 covers the lost frames');
  assert.is(resumed.throughSeq, 2000);
  assert.ok(resumed.fromSeq > 1 && resumed.fromSeq <= 2000, `the lost frames start inside the journal (${resumed.fromSeq})`);
  const journal = await Journal.open(dir);
  assert.is(journal.firstSeq, 2001);
  assert.is(journal.lastSeq, 2000, 'nothing committed is missing: the seal agrees');
  assert.equal(await journal.checkpointSeqs(), [2000]);
  assert.is(await journal.append({ after: 'salvage' }, { payload: Buffer.alloc(512, 9) }), 2001);
  assert.ok((await journal.verify()).ok, 'the chain starts afresh after the checkpoint');
  await journal.close();
});

test('salvage: a table whose index is lost is set aside whole, and its records are named as lost', async () => {
  const dir = await journalWithTables();
  const { name, sizeBytes } = liveTables(dir).sort((a, b) => b.sizeBytes - a.sizeBytes)[0];
  const damaged = readFileSync(join(dir, name));
  damaged[sizeBytes - 1] ^= 0x41; // the footer's magic
  writeFileSync(join(dir, name), damaged);
  const report = await Journal.salvageTables(dir);
  assert.ok(report !== undefined);
  assert.is(report.tables[0].entriesRestored, 0);
  assert.match(report.tables[0].lost[0], /every entry: .*footer/);
  // Every frame was in that table: the journal names them as lost instead of failing on LevelDB,
  // and salvage's open (skipDamagedTail) reports what the seal says is missing.
  await rejects(() => Journal.open(dir), (err: unknown) => (err as JournalError).code === 'ECORRUPT' && /records seq 1\.\.2000 were committed/.test((err as Error).message));
  const journal = await Journal.open(dir, { skipDamagedTail: true });
  assert.equal(journal.lostTail, { fromSeq: 1, toSeq: 2000 });
  await journal.close();
});

test('salvage: a damaged MANIFEST alone is rebuilt and loses nothing', async () => {
  const dir = await journalWithTables();
  const manifest = damageManifest(dir);
  const report = await Journal.salvageTables(dir);
  assert.ok(report !== undefined);
  assert.is(report.tables.length, 0);
  assert.match(report.manifestProblem ?? '', `LevelDB file ${manifest} is damaged`);
  const journal = await Journal.open(dir);
  assert.is(journal.lastSeq, 2000);
  assert.ok((await journal.verify()).ok);
  await journal.close();
});

test('salvage of a sound journal touches nothing', async () => {
  const dir = await journalWithTables();
  const before = readdirSync(dir).sort();
  assert.is(await Journal.salvageTables(dir), undefined);
  assert.equal(readdirSync(dir).sort(), before);
});

test('salvage counts each entry written back once, for the table it came from', () => {
  const entry = (key: string, sequence: number, deleted = false): TableEntry => ({ key: Buffer.from(key), sequence, deleted, value: Buffer.from(`${key}@${sequence}`) });
  // Two set-aside tables: `k` in both (the newer version in the second, an older one twice in the
  // first), `a` only in the first, `d` deleted last in the second.
  const first = [entry('a', 3), entry('k', 4), entry('k', 5), entry('d', 6)];
  const second = [entry('k', 9), entry('d', 10, true)];
  const table = (entries: TableEntry[]) => ({ file: 'x.ldb', movedTo: 'damaged/x.ldb', problem: 'p', dataBlocks: 2, blocksLost: 1, lost: [], entries });
  const setAside: SetAside = { tables: [table(first), table(second)], manifestProblem: undefined };
  const written = restorable(setAside);
  assert.equal(written.map((e) => `${e.key}@${e.sequence}`).sort(), ['a@3', 'k@9']);
  assert.equal(entriesRestoredByTable(setAside, written), [1, 1]);
  // Only what was actually written back counts (a key the repaired database still held is not).
  assert.equal(entriesRestoredByTable(setAside, written.filter((e) => e.key.toString() === 'k')), [0, 1]);
});

test.run();
