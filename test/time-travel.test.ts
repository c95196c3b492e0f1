/**
 * Time travel with real clients: qemu-style dirty bitmaps (`nbdinfo --map=qemu:dirty-bitmap:...`)
 * since a snapshot or a seq, with nothing declared in advance, and point-in-time read-only exports
 * (`VOLUME@seq:N`, `VOLUME@time:ISO`) whose bytes equal what the volume held then.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { cowstackOk, initStore, KiB, killAll, MiB, readExport, runOk, sameBytes, startServe, writeExport } from './harness.js';

interface EventLine {
  seq: number;
  time: string;
  type: string;
}

async function events(store: string): Promise<EventLine[]> {
  const r = await cowstackOk(['journal', 'inspect', store, '--json']);
  return r.stdout.trim().split('\n').map((line) => JSON.parse(line) as EventLine);
}

async function dirtyMap(uri: string, context: string): Promise<Array<[number, number, string]>> {
  const r = await runOk('nbdinfo', ['--json', `--map=${context}`, uri]);
  return (JSON.parse(r.stdout) as Array<{ offset: number; length: number; description: string }>).map((e) => [e.offset, e.length, e.description]);
}

test.after(killAll);

test('dirty bitmaps since a snapshot or a seq, and point-in-time exports, over NBD', async () => {
  const store = await initStore({ size: '16M' });
  const server = await startServe(store);
  try {
    const first = Buffer.alloc(64 * KiB, 0x11);
    await writeExport(server.uri('default'), 0, first);
    await cowstackOk(['snapshot', store, 'default', '--name', 'golden']);
    const afterFirst = (await events(store)).find((e) => e.type === 'Frozen')!;
    await writeExport(server.uri('default'), 1 * MiB, Buffer.alloc(8 * KiB, 0x22));
    await writeExport(server.uri('default'), 0, Buffer.alloc(4 * KiB, 0x33));

    const expected: Array<[number, number, string]> = [
      [0, 4 * KiB, 'dirty'],
      [4 * KiB, 1 * MiB - 4 * KiB, 'clean'],
      [1 * MiB, 8 * KiB, 'dirty'],
      [1 * MiB + 8 * KiB, 16 * MiB - 1 * MiB - 8 * KiB, 'clean'],
    ];
    assert.equal(await dirtyMap(server.uri('default'), 'qemu:dirty-bitmap:golden'), expected, 'since the snapshot');
    assert.equal(await dirtyMap(server.uri('default'), `qemu:dirty-bitmap:seq:${afterFirst.seq}`), expected, 'since the same seq');
    const all = await events(store);
    const lastWrite = all.filter((e) => e.type === 'Write').at(-1)!;
    assert.equal(await dirtyMap(server.uri('default'), `qemu:dirty-bitmap:seq:${lastWrite.seq}`), [[0, 16 * MiB, 'clean']], 'nothing changed since the last write');

    // The volume as it was right after the first write: only the first 64 KiB of 0x11.
    const then = Buffer.alloc(16 * MiB);
    first.copy(then, 0);
    sameBytes(await readExport(server.uri(`default@seq:${afterFirst.seq}`)), then, 'point-in-time export by seq');
    sameBytes(await readExport(server.uri(`default@time:${afterFirst.time}`)), then, 'point-in-time export by time');
    const r = await runOk('nbdinfo', ['--json', server.uri(`default@seq:${afterFirst.seq}`)]);
    const info = JSON.parse(r.stdout) as { exports: Array<{ is_read_only: boolean }> };
    assert.ok(info.exports[0].is_read_only, 'a point-in-time export is read-only');

    // The present is untouched by all that reading.
    const now = Buffer.from(then);
    now.fill(0x33, 0, 4 * KiB);
    now.fill(0x22, 1 * MiB, 1 * MiB + 8 * KiB);
    sameBytes(await readExport(server.uri('default')), now, 'the volume now');
  } finally {
    await server.stop();
  }
});

test.run();
