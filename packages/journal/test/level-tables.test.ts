/**
 * LevelDB table verification: a healthy journal's tables (compressed and not) pass; a flipped byte
 * in a table refuses the open with ECORRUPT naming the file and block, before LevelDB reads it (the
 * LevelDB in classic-level can abort the process on such a block); a missing table is named too.
 */
import { readdirSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { rejects } from 'node:assert/strict';
import { Journal, type JournalError } from '../src/index.js';
import { liveTables, verifyLevelTables } from '../src/level-tables.js';
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
  const manifest = readdirSync(dir).find((n) => n.startsWith('MANIFEST-'))!;
  const bytes = readFileSync(join(dir, manifest));
  bytes[10] ^= 0x01;
  writeFileSync(join(dir, manifest), bytes);
  await rejects(() => Journal.open(dir), (err: unknown) => (err as JournalError).code === 'ECORRUPT' && (err as Error).message.includes(`LevelDB file ${manifest} is damaged`));
});

test.run();
