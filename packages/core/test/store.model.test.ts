/**
 * The engine's conformance suite: random sequences of write / read / zero / trim / concurrent
 * sub-block writes / snapshot / clone / delete / commit / flatten / close-reopen / crash-and-recover /
 * time travel (point-in-time views, changed blocks, retroactive snapshots) on a real store (real
 * LevelDB, real layer files), compared after every step with a plain reference model: one flat Buffer
 * per volume and per snapshot, and its history.
 *
 * "Crash" copies the store directory while the store is open and the journal is synced (what a
 * SIGKILL leaves on disk), then scribbles over every block written since the newest checkpoint in the
 * copy's layer files (as if those pwrites never reached the file), and continues on the copy: recovery
 * must restore every acknowledged write from the journal.
 */
import { closeSync, cpSync, existsSync, openSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import fc from 'fast-check';
import { lastValueFrom, toArray } from 'rxjs';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Journal } from '@cowstack/journal';
import { changedSince, EventType, pointInTimeView, Store, StoreError, type StoreEvent } from '../src/index.js';
import { checkProperty, flat, tempDir } from './helpers.js';

const volumeBytes = 192 * 1024;

type Action =
  | { kind: 'write'; vol: number; offset: number; length: number; seed: number; fua: boolean }
  | { kind: 'sectors'; vol: number; block: number; sectors: number[]; seed: number }
  | { kind: 'zero'; vol: number; offset: number; length: number }
  | { kind: 'trim'; vol: number; offset: number; length: number }
  | { kind: 'read'; vol: number; offset: number; length: number }
  | { kind: 'snapshot'; vol: number }
  | { kind: 'clone'; snap: number }
  | { kind: 'deleteVolume'; vol: number }
  | { kind: 'deleteSnapshot'; snap: number }
  | { kind: 'commit'; vol: number }
  | { kind: 'commitSnapshot'; snap: number }
  | { kind: 'flatten'; vol: number }
  | { kind: 'reopen' }
  | { kind: 'crash'; scribble: number }
  | { kind: 'timeTravel'; back: number; until: number; vol: number }
  | { kind: 'snapshotAt'; back: number; vol: number };

const rangeArb = fc.tuple(fc.nat(volumeBytes - 1), fc.integer({ min: 1, max: 3 * 4096 + 100 })).map(([offset, length]) => ({ offset, length: Math.min(length, volumeBytes - offset) }));

const actionArb: fc.Arbitrary<Action> = fc.oneof(
  { weight: 10, arbitrary: fc.record({ vol: fc.nat(7), range: rangeArb, seed: fc.nat(255), fua: fc.boolean() }).map((a) => ({ kind: 'write' as const, vol: a.vol, ...a.range, seed: a.seed, fua: a.fua })) },
  { weight: 3, arbitrary: fc.record({ vol: fc.nat(7), block: fc.nat(11), sectors: fc.uniqueArray(fc.nat(7), { minLength: 1, maxLength: 8 }), seed: fc.nat(255) }).map((a) => ({ kind: 'sectors' as const, ...a })) },
  { weight: 3, arbitrary: fc.record({ vol: fc.nat(7), range: rangeArb }).map((a) => ({ kind: 'zero' as const, vol: a.vol, ...a.range })) },
  { weight: 2, arbitrary: fc.record({ vol: fc.nat(7), range: rangeArb }).map((a) => ({ kind: 'trim' as const, vol: a.vol, ...a.range })) },
  { weight: 3, arbitrary: fc.record({ vol: fc.nat(7), range: rangeArb }).map((a) => ({ kind: 'read' as const, vol: a.vol, ...a.range })) },
  { weight: 3, arbitrary: fc.record({ kind: fc.constant('snapshot' as const), vol: fc.nat(7) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('clone' as const), snap: fc.nat(15) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('deleteVolume' as const), vol: fc.nat(7) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('deleteSnapshot' as const), snap: fc.nat(15) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('commit' as const), vol: fc.nat(7) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('commitSnapshot' as const), snap: fc.nat(15) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('flatten' as const), vol: fc.nat(7) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('reopen' as const) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('crash' as const), scribble: fc.nat(255) }) },
  { weight: 2, arbitrary: fc.record({ kind: fc.constant('timeTravel' as const), back: fc.nat(30), until: fc.nat(30), vol: fc.nat(7) }) },
  { weight: 1, arbitrary: fc.record({ kind: fc.constant('snapshotAt' as const), back: fc.nat(30), vol: fc.nat(7) }) },
);

function pattern(length: number, seed: number): Buffer {
  const buf = Buffer.allocUnsafe(length);
  for (let i = 0; i < length; i++) buf[i] = (seed * 31 + i * 7 + (i >> 9)) & 0xff;
  return buf;
}

function pick<T>(items: T[], n: number): T | undefined {
  return items.length === 0 ? undefined : items[n % items.length];
}

/** Simulate a crash: copy the open store's files, then scribble over every block written after the newest checkpoint. */
async function crashCopy(store: Store, scribble: number): Promise<string> {
  await store.flush();
  const copy = tempDir('crash-copy');
  cpSync(store.dir, copy, { recursive: true });
  const journal = await Journal.open<StoreEvent>(join(copy, 'journal'));
  const checkpoint = await journal.latestCheckpoint();
  const records = await lastValueFrom(journal.replay((checkpoint?.seq ?? 0) + 1, undefined, { payloads: false }).pipe(toArray()));
  await journal.close();
  const bs = store.blockSizeBytes;
  for (const r of records) {
    const event = r.meta;
    if (event[0] !== EventType.Write) continue;
    const file = join(copy, 'layers', `${event[1]}.data`);
    if (!existsSync(file)) continue; // the layer was deleted later; recovery recreates and removes it
    const fd = openSync(file, 'r+');
    writeSync(fd, Buffer.alloc(event[3] * bs, scribble), 0, event[3] * bs, event[2] * bs);
    closeSync(fd);
  }
  return copy;
}

async function checkAll(store: Store, volumes: Map<string, Buffer>, snapshots: Map<string, Buffer>, step: string): Promise<void> {
  assert.equal(store.volumes().map((v) => v.name).sort(), [...volumes.keys()].sort(), `${step}: volume names`);
  assert.equal(store.snapshots().map((s) => `${s.volume}@${s.name}`).sort(), [...snapshots.keys()].sort(), `${step}: snapshot names`);
  for (const [name, model] of volumes) {
    // The whole-volume read is large enough to go to the reader thread (laying held blocks over what
    // it read); a sync read must agree.
    const got = flat(await store.readViewOf(store.volumeInfo(name).topLayerId, 0, volumeBytes));
    assert.ok(got.equals(flat(store.readVolume(name, 0, volumeBytes))), `${step}: async and sync reads of ${name} differ`);
    if (!got.equals(model)) assert.unreachable(`${step}: volume ${name} differs from the model at byte ${got.findIndex((b, i) => b !== model[i])}`);
  }
  for (const [ref, model] of snapshots) {
    const got = flat(await store.readViewOf(store.snapshotLayer(ref), 0, volumeBytes));
    if (!got.equals(model)) assert.unreachable(`${step}: snapshot ${ref} differs from the model at byte ${got.findIndex((b, i) => b !== model[i])}`);
  }
}

test('random operation sequences on a real store always agree with the flat-buffer model', async () => {
  await checkProperty(
    fc.asyncProperty(fc.constantFrom(512, 4096), fc.array(actionArb, { minLength: 1, maxLength: 30 }), async (blockSizeBytes, actions) => {
      let store = await Store.create(tempDir('model'), { sizeBytes: volumeBytes, blockSizeBytes, retain: { kind: 'all' } });
      const volumes = new Map<string, Buffer>([['default', Buffer.alloc(volumeBytes)]]);
      const snapshots = new Map<string, Buffer>();
      // The model's history: every volume's content after each step, with the journal seq then.
      const history: Array<{ seq: number; volumes: Map<string, Buffer> }> = [];
      const remember = (): void => {
        history.push({ seq: store.lastSeq, volumes: new Map([...volumes].map(([k, v]) => [k, Buffer.from(v)])) });
      };
      remember();
      let made = 0;
      try {
        for (const [i, action] of actions.entries()) {
          const step = `step ${i} ${JSON.stringify(action)}`;
          const volNames = [...volumes.keys()];
          const snapNames = [...snapshots.keys()];
          switch (action.kind) {
            case 'write': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              const data = pattern(action.length, action.seed);
              await store.writeVolume(vol, action.offset, Buffer.from(data), action.fua);
              data.copy(volumes.get(vol)!, action.offset);
              break;
            }
            case 'sectors': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              const base = (action.block * 4096) % volumeBytes;
              await Promise.all(
                action.sectors.map((s) => {
                  const data = pattern(512, action.seed + s);
                  data.copy(volumes.get(vol)!, base + s * 512);
                  return store.writeVolume(vol, base + s * 512, data, false);
                }),
              );
              break;
            }
            case 'zero': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              await store.zeroVolume(vol, action.offset, action.length, false);
              volumes.get(vol)!.fill(0, action.offset, action.offset + action.length);
              break;
            }
            case 'trim': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              await store.trimVolume(vol, action.offset, action.length, false);
              const first = Math.ceil(action.offset / blockSizeBytes) * blockSizeBytes;
              const end = Math.floor((action.offset + action.length) / blockSizeBytes) * blockSizeBytes;
              if (end > first) volumes.get(vol)!.fill(0, first, end);
              break;
            }
            case 'read': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              const got = flat(store.readVolume(vol, action.offset, action.length));
              assert.ok(got.equals(volumes.get(vol)!.subarray(action.offset, action.offset + action.length)), `${step}: read differs`);
              break;
            }
            case 'snapshot': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              const snap = await store.snapshot(vol);
              snapshots.set(`${vol}@${snap.name}`, Buffer.from(volumes.get(vol)!));
              break;
            }
            case 'clone': {
              const snap = pick(snapNames, action.snap);
              if (snap === undefined) break;
              const name = `clone${++made}`;
              await store.clone(snap, name);
              volumes.set(name, Buffer.from(snapshots.get(snap)!));
              break;
            }
            case 'deleteVolume': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              await store.deleteVolume(vol);
              volumes.delete(vol);
              break;
            }
            case 'deleteSnapshot': {
              const snap = pick(snapNames, action.snap);
              if (snap === undefined) break;
              await store.deleteSnapshot(snap);
              snapshots.delete(snap);
              break;
            }
            case 'commit':
            case 'commitSnapshot': {
              const target = action.kind === 'commit' ? pick(volNames, action.vol) : pick(snapNames, action.snap);
              if (target === undefined) break;
              // Commit never changes what any volume or snapshot reads; it may be refused.
              await store.commit(target).catch((err: unknown) => {
                if (!(err instanceof StoreError) || (err.code !== 'EBUSY' && err.code !== 'EINVAL')) throw err;
              });
              break;
            }
            case 'flatten': {
              const vol = pick(volNames, action.vol);
              if (vol === undefined) break;
              await store.flatten(vol);
              assert.is(store.volumeInfo(vol).stack.length, 1, `${step}: a flattened volume has one layer`);
              break;
            }
            case 'reopen': {
              const dir = store.dir;
              await store.close();
              store = await Store.open(dir);
              assert.is(store.openReport.eventsReplayed, 0, `${step}: a clean close leaves nothing to replay`);
              break;
            }
            case 'crash': {
              const copy = await crashCopy(store, action.scribble);
              await store.close();
              store = await Store.open(copy);
              break;
            }
            case 'timeTravel': {
              // A point-in-time view equals the model then; changes since then cover every changed byte.
              const past = history[Math.max(0, history.length - 1 - action.back)];
              const vol = pick([...past.volumes.keys()].filter((v) => volumes.has(v)), action.vol);
              if (vol === undefined) break;
              const pit = await pointInTimeView(store, vol, past.seq);
              const then = past.volumes.get(vol)!;
              const got = await pit.read(0, volumeBytes);
              if (!got.equals(then)) assert.unreachable(`${step}: ${vol} at seq ${past.seq} differs from the model at byte ${got.findIndex((b, k) => b !== then[k])}`);
              // Changed between that point and a later one (--until), or now.
              const pastIndex = Math.max(0, history.length - 1 - action.back);
              const laterIndex = Math.min(history.length - 1, pastIndex + action.until);
              const later = history[laterIndex];
              const untilNow = laterIndex === history.length - 1;
              const thenAfter = untilNow ? volumes.get(vol)! : later.volumes.get(vol);
              if (thenAfter === undefined) break;
              const changed = await changedSince(store, vol, past.seq, untilNow ? store.lastSeq : later.seq);
              for (let k = 0; k < volumeBytes; k++) {
                if (thenAfter[k] !== then[k] && !changed.some((e) => k >= e.offset && k < e.offset + e.length)) {
                  assert.unreachable(`${step}: byte ${k} of ${vol} changed between seq ${past.seq} and ${untilNow ? 'now' : `seq ${later.seq}`} but is not reported`);
                }
              }
              break;
            }
            case 'snapshotAt': {
              const past = history[Math.max(0, history.length - 1 - action.back)];
              const vol = pick([...past.volumes.keys()].filter((v) => volumes.has(v)), action.vol);
              if (vol === undefined) break;
              const name = `retro${++made}`;
              await store.snapshotAt(vol, past.seq, name);
              snapshots.set(`${vol}@${name}`, Buffer.from(past.volumes.get(vol)!));
              break;
            }
          }
          await checkAll(store, volumes, snapshots, step);
          remember();
        }
      } finally {
        await store.close();
      }
    }),
    { numRuns: Number(process.env.COWSTACK_PROPERTY_RUNS ?? 40) },
  );
});

test.run();
