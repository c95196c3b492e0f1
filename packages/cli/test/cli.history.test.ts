/**
 * The time-travel and dm-cow commands through the built CLI, online (through a serving store's
 * control socket) and offline: diff --since, blame, snapshot --at, retain, import-dmcow and table.
 */
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildDmCowBitmap } from '@cowstack/core';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { cow, cowJson, cowOk, jsonLines, qemuIo, readExport, Server, stopAll, tempDir } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

test('diff --since, blame and snapshot --at answer from the journal, online and offline', async () => {
  const store = join(tempDir('history'), 'store');
  await cowOk(['init', store, '--size', '8M', '--retain', 'all']);
  let server: Server | undefined = await Server.start(store);
  try {
    await qemuIo(server.uri('default'), ['write -P 0x11 0 64k']);
    await cowOk(['snapshot', store, 'default', '--name', 'golden']);
    await qemuIo(server.uri('default'), ['write -P 0x22 4k 8k', 'write -z 1M 64k']);

    const since = await cowJson<{ sinceSeq: number; extents: Array<{ offset: number; length: number }> }>(['diff', store, 'default', '--since', 'golden']);
    assert.equal(since.extents, [
      { offset: 4 * KiB, length: 8 * KiB },
      { offset: 1 * MiB, length: 64 * KiB },
    ]);
    const text = await cowOk(['diff', store, 'default', '--since', `seq:${since.sinceSeq}`]);
    assert.match(text.stdout, /default: 72 KiB written between seq \d+ and seq \d+/);
    // --until: only what was written between the two points (the first write after golden).
    const firstAfter = (await cowJson<Array<{ seq: number }>>(['blame', store, 'default', String(4 * KiB), String(4 * KiB)]))[0].seq;
    const until = await cowJson<{ untilSeq: number; extents: Array<{ offset: number; length: number }> }>(['diff', store, 'default', '--since', 'golden', '--until', `seq:${firstAfter}`]);
    assert.is(until.untilSeq, firstAfter);
    assert.equal(until.extents, [{ offset: 4 * KiB, length: 8 * KiB }]);
    const untilTime = await cowJson<{ extents: unknown[] }>(['diff', store, 'default', '--since', 'golden', '--until', `time:${new Date().toISOString()}`]);
    assert.equal(untilTime.extents, since.extents, '--until now (a time) is everything since');

    const blame = await cowJson<Array<{ offset: number; length: number; type: string; origin: string | null; seq: number | null }>>(['blame', store, 'default', '0', String(16 * KiB)]);
    assert.equal(blame.map((b) => [b.offset, b.length, b.type]), [
      [0, 4 * KiB, 'Write'],
      [4 * KiB, 8 * KiB, 'Write'],
      [12 * KiB, 4 * KiB, 'Write'],
    ]);
    assert.ok(blame.every((b) => b.origin !== null && /^nbd#\d+ unix$/.test(b.origin)), 'writes name the client connection');
    assert.ok(blame[1].seq! > blame[0].seq!, 'the overwrite is the later event');

    // The volume as it was at the snapshot point, materialised as a new snapshot, then served.
    const retro = await cowJson<{ name: string; seq: number }>(['snapshot', store, 'default', '--at', 'golden', '--name', 'retro']);
    assert.is(retro.name, 'retro');
    const expected = Buffer.alloc(8 * MiB);
    expected.fill(0x11, 0, 64 * KiB);
    const got = await readExport(server.uri('default@retro'));
    assert.ok(got.equals(expected), 'the retroactive snapshot holds the volume as it was');

    const retain = await cowJson<{ policy: { kind: string } }>(['retain', store]);
    assert.is(retain.policy.kind, 'all');
    await stopAll([server]);
    server = undefined;

    // Offline, the same answers.
    const offline = await cowJson<{ extents: unknown[] }>(['diff', store, 'default', '--since', 'golden']);
    assert.equal(offline.extents, since.extents);
    await cowOk(['retain', store, '24h']);
    assert.match((await cowOk(['journal', 'stats', store])).stdout, /retention {8}payloads of the last 86400 s/);
    const usage = await cow(['diff', store, 'default', 'other', '--since', 'golden']);
    assert.is(usage.code, 2);
    const bad = await cow(['retain', store, 'forever']);
    assert.is(bad.code, 2);
    const inspect = jsonLines<{ type: string }>((await cowOk(['journal', 'inspect', store, '--json'])).stdout);
    assert.ok(inspect.some((e) => e.type === 'SnapshotNamed'), 'the retroactive snapshot is an event');
  } finally {
    await stopAll([server]);
  }
});

test('a dm-cow layer imports as a volume, and table writes bitmaps that describe it', async () => {
  const dir = tempDir('dmcow');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '4M']);
  const sectors = (4 * MiB) / 512;
  writeFileSync(join(dir, 'w.data'), Buffer.alloc(4 * MiB, 0x5a));
  writeFileSync(join(dir, 'w.bitmap'), buildDmCowBitmap(sectors, [[8, 8]]));
  const r = await cowJson<{ sectorsImported: number; magicFound: boolean }>(['import-dmcow', store, '--data', join(dir, 'w.data'), '--bitmap', join(dir, 'w.bitmap'), '--volume', 'node17']);
  assert.equal(r, { ...r, sectorsImported: 8, magicFound: true });
  const out = join(dir, 'export.raw');
  await cowOk(['export', store, 'node17', out]);
  const { readFileSync } = await import('node:fs');
  const image = readFileSync(out);
  const expected = Buffer.alloc(4 * MiB);
  expected.fill(0x5a, 4096, 8192);
  assert.ok(image.equals(expected));
  const table = await cowOk(['table', store, 'node17', '--bitmaps', dir]);
  assert.match(table.stdout, new RegExp(`^0 ${sectors} cow /dev/zero 0 \\S+\\.bitmap \\S+\\.data 0\\n$`));
});

test.run();
