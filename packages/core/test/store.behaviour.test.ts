/**
 * Engine behaviour beyond the model suite: bad input is refused clearly without changing state;
 * snapshots order correctly against concurrent writes; depth does not matter; external and imported
 * bases; recover and check name what they did and what is damaged.
 */
import { rejects } from 'node:assert/strict';
import { appendFileSync, closeSync, cpSync, mkdirSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { Journal } from '@cowstack/journal';
import { Level } from 'level';
import { pack } from 'msgpackr';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { BlockDeviceError, type CheckpointWritten, checkStore, EventType, parseRetention, pointInTimeView, recoverStore, Store, StoreError, type StoreEvent, StoreExports, type StoreJournalReport, verifyStoreJournal } from '../src/index.js';
import { maxWritebackBytes } from '../src/limits.js';
import { flat, tempDir } from './helpers.js';

const mib = 1024 * 1024;
const code = (c: string) => (err: unknown) => (err as { code?: string }).code === c;

test('out-of-range I/O, unknown volumes and read-only layers are refused and change nothing', async () => {
  const store = await Store.create(tempDir(), { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), false);
  const before = store.lastSeq;
  await rejects(() => store.writeVolume('default', mib - 10, Buffer.alloc(20), false), code('ENOSPC'));
  await rejects(() => store.zeroVolume('default', mib, 1, false), code('ENOSPC'));
  await rejects(() => store.writeVolume('default', -1, Buffer.alloc(1), false), code('EINVAL'));
  assert.throws(() => store.readVolume('default', mib - 1, 2), (e: unknown) => e instanceof BlockDeviceError && e.code === 'EINVAL');
  assert.throws(() => store.readVolume('default', 0, 0), (e: unknown) => e instanceof BlockDeviceError && e.code === 'EINVAL');
  await rejects(() => store.writeVolume('nope', 0, Buffer.alloc(1), false), code('ENOENT'));
  await rejects(() => store.zeroVolume('nope', 0, 4096, false), code('ENOENT'));
  assert.throws(() => store.readVolume('nope', 0, 512), (e: unknown) => e instanceof StoreError && e.code === 'ENOENT' && /no volume nope/.test((e as Error).message));
  await rejects(() => store.snapshot('nope'), code('ENOENT'));
  await rejects(() => store.clone('default@missing', 'x'), code('ENOENT'));
  await rejects(() => store.clone('default', 'x'), code('EINVAL'));
  await rejects(() => store.createVolume('bad/name', mib), code('EINVAL'));
  await rejects(() => store.createVolume('default', mib), code('EEXIST'));
  await store.snapshot('default', 'golden');
  await rejects(() => store.snapshot('default', 'golden'), code('EEXIST'));
  const exports = new StoreExports(store);
  const snap = exports.open('default@golden')!;
  assert.ok(snap.readOnly);
  await rejects(() => snap.write(0, Buffer.alloc(512), { fua: false }), code('EPERM'));
  assert.is(exports.open('missing'), undefined);
  assert.is(exports.open('default@missing'), undefined);
  assert.equal(exports.list().map((e) => e.name), ['default', 'default@golden']);
  assert.is(store.lastSeq, before + 1, 'only the snapshot was recorded');
  await store.close();
});

test('bad store parameters and a second opener are refused clearly', async () => {
  await rejects(() => Store.create(tempDir(), { sizeBytes: mib, blockSizeBytes: 3000 }), /block size 3000 is not a power of two from 512 to 65536/);
  await rejects(() => Store.create(tempDir(), {}), /a size is needed/);
  await rejects(() => Store.open(tempDir()), code('ENOENT'));
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await rejects(() => Store.create(dir, { sizeBytes: mib }), code('EEXIST'));
  await rejects(() => Store.open(dir), (e: unknown) => e instanceof StoreError && e.code === 'ELOCKED' && /in use by another process/.test(e.message));
  await store.close();
});

test('a store or journal of an unknown format version is refused', async () => {
  const dir = tempDir();
  await (await Store.create(dir, { sizeBytes: mib })).close();
  const db = new Level<Buffer, Buffer>(join(dir, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.put(Buffer.from('mformat'), pack({ format: 'cowstack-journal', version: 1 }));
  await db.close();
  await rejects(() => Store.open(dir), (e: unknown) => e instanceof StoreError && e.code === 'EFORMAT' && /journal format version 1 is not supported; this build reads version 2/.test(e.message));

  // A store whose first event says a newer store format (written as a newer build would).
  const newer = tempDir();
  const journal = await Journal.open<StoreEvent>(join(newer, 'journal'), { create: true });
  await journal.append([EventType.StoreCreated, { formatVersion: 99, storeId: 'x', blockSizeBytes: 4096, createdMs: 0 }], { sync: true });
  await journal.close();
  mkdirSync(join(newer, 'layers'));
  await rejects(() => Store.open(newer), (e: unknown) => e instanceof StoreError && e.code === 'EFORMAT' && /format version 99; this build opens version 1/.test(e.message));
});

test('writes issued before a snapshot are in it; writes issued after are not', async () => {
  const store = await Store.create(tempDir(), { sizeBytes: mib });
  const before = Array.from({ length: 40 }, (_, i) => store.writeVolume('default', i * 4096, Buffer.alloc(4096, 1), i % 3 === 0));
  const snap = store.snapshot('default', 's');
  const after = Array.from({ length: 40 }, (_, i) => store.writeVolume('default', i * 4096, Buffer.alloc(4096, 2), false));
  await Promise.all([...before, snap, ...after]);
  const layer = store.snapshotLayer('default@s');
  assert.ok(flat(store.readLayer(layer, 0, 40 * 4096)).equals(Buffer.alloc(40 * 4096, 1)));
  assert.ok(flat(store.readVolume('default', 0, 40 * 4096)).equals(Buffer.alloc(40 * 4096, 2)));
  await store.close();
});

test('commit and flatten wait for writes already in flight; none is lost', async () => {
  const store = await Store.create(tempDir(), { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(mib, 9), false);
  await store.snapshot('default', 'base');
  await store.deleteSnapshot('default@base');
  const racing = Array.from({ length: 64 }, (_, i) => store.writeVolume('default', i * 8192, Buffer.alloc(4096, i + 1), false));
  const committed = store.commit('default');
  const racing2 = Array.from({ length: 64 }, (_, i) => store.writeVolume('default', i * 8192 + 4096, Buffer.alloc(4096, i + 100), false));
  const flattened = store.flatten('default');
  await Promise.all([...racing, committed, ...racing2, flattened]);
  const data = flat(store.readVolume('default', 0, mib));
  for (let i = 0; i < 64; i++) {
    assert.is(data[i * 8192], i + 1, `write ${i} before the commit survives`);
    assert.is(data[i * 8192 + 4096], i + 100, `write ${i} before the flatten survives`);
  }
  await store.close();
});

test('a device bound to a deleted volume is refused, also once a new volume takes its name', async () => {
  const store = await Store.create(tempDir(), { sizeBytes: mib });
  const exports = new StoreExports(store);
  const old = exports.open('default')!;
  await store.deleteVolume('default');
  await rejects(() => old.write(0, Buffer.alloc(512, 1), { fua: false }), code('ESHUTDOWN'));
  await store.createVolume('default', mib);
  await rejects(() => old.write(0, Buffer.alloc(512, 1), { fua: false }), code('ESHUTDOWN'));
  await rejects(() => old.read(0, 512), code('ESHUTDOWN'));
  assert.ok(flat(store.readVolume('default', 0, 512)).equals(Buffer.alloc(512)), 'the new volume was not written');
  const fresh = exports.open('default')!;
  await fresh.write(0, Buffer.alloc(512, 2), { fua: false });
  assert.is(flat(store.readVolume('default', 0, 1))[0], 2);
  await store.close();
});

test('1000-deep stacks read correctly, survive reopen, and report allocation depth', async () => {
  const dir = tempDir();
  let store = await Store.create(dir, { sizeBytes: 4 * mib });
  for (let i = 0; i < 1000; i++) {
    await store.writeVolume('default', (i % 1024) * 4096, Buffer.alloc(4096, (i % 250) + 1), false);
    await store.snapshot('default');
  }
  const check = (s: Store): void => {
    const data = flat(s.readVolume('default', 0, 4 * mib));
    for (let i = 0; i < 1000; i++) assert.is(data[(i % 1024) * 4096], (i % 250) + 1);
    assert.is(data[1000 * 4096], 0);
    const depth = s.extents(s.volumeInfo('default').topLayerId, 0, 8192, 'qemu:allocation-depth');
    assert.equal(depth.map((e) => e.depth), [1001, 1000], 'block 0 was written 1000 layers down, block 1 one layer above it');
  };
  check(store);
  assert.is(store.volumeInfo('default').stack.length, 1002);
  await store.close();
  store = await Store.open(dir);
  check(store);
  const snap = flat(store.readLayer(store.snapshotLayer('default@snap-500'), 0, 4096 * 501));
  assert.is(snap[499 * 4096], (499 % 250) + 1);
  assert.is(snap[500 * 4096], 0, 'snapshot 500 predates write 500');
  await store.close();
});

test('an external base is read through, never written, and refused once it changes', async () => {
  const dir = tempDir();
  const image = join(tempDir('img'), 'base.raw');
  const content = Buffer.alloc(2 * mib);
  for (let i = 0; i < content.length; i += 4096) content.fill((i / 4096) & 0xff, i, i + 4096);
  writeFileSync(image, content);
  const store = await Store.create(dir, { base: { kind: 'external', path: image }, blockSizeBytes: 4096 });
  assert.is(store.volumeInfo('default').sizeBytes, 2 * mib);
  assert.ok(flat(store.readVolume('default', 0, 2 * mib)).equals(content));
  await store.writeVolume('default', 100, Buffer.from('xyz'), false);
  const expect = Buffer.from(content);
  expect.write('xyz', 100);
  assert.ok(flat(store.readVolume('default', 0, 2 * mib)).equals(expect));
  const depth = store.extents(store.volumeInfo('default').topLayerId, 0, 2 * mib, 'qemu:allocation-depth');
  assert.equal(depth.map((e) => [e.length, e.depth]), [[4096, 1], [2 * mib - 4096, 2]]);
  await store.close();
  const fd = openSync(image, 'r+');
  writeSync(fd, Buffer.from('changed'), 0, 7, 0);
  closeSync(fd);
  await rejects(() => Store.open(dir), (e: unknown) => e instanceof StoreError && e.code === 'ECHANGED' && /changed content/.test(e.message));
  appendFileSync(image, Buffer.alloc(10));
  await rejects(() => Store.open(dir), /changed size/);
});

test('an imported base holds the image in the store; zero blocks stay unallocated', async () => {
  const image = join(tempDir('img'), 'import.raw');
  const content = Buffer.alloc(mib + 512);
  content.fill(7, 4096, 8192);
  content.fill(9, mib, mib + 512);
  writeFileSync(image, content);
  const store = await Store.create(tempDir(), { base: { kind: 'import', path: image }, blockSizeBytes: 4096 });
  assert.ok(flat(store.readVolume('default', 0, mib + 512)).equals(content));
  const base = store.layers().find((l) => l.kind === 'imported')!;
  assert.is(base.dataBytes, 2 * 4096, 'only the two non-zero blocks are stored');
  assert.ok(base.frozen);
  await store.close();
});

/**
 * The crash window where the journal has committed writes but their data never reached the layer
 * file: a copy of the store's files with the default volume's top layer file emptied. Closes `store`.
 */
async function crashBeforeLayerData(store: Store, dir: string): Promise<string> {
  const top = store.volumeInfo('default').topLayerId;
  await store.flush();
  const crashed = tempDir('crashed');
  cpSync(dir, crashed, { recursive: true });
  await store.close();
  writeFileSync(join(crashed, 'layers', `${top}.data`), Buffer.alloc(0));
  return crashed;
}

test('recover re-applies journaled writes whose data never reached the layer file', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 8192, Buffer.alloc(8192, 0x5a), true);
  const crashed = await crashBeforeLayerData(store, dir);
  const report = await recoverStore(crashed);
  assert.is(report.writesReapplied, 1);
  assert.ok(report.eventsReplayed >= 1);
  assert.ok(report.checkpointWritten);
  const reopened = await Store.open(crashed);
  assert.ok(flat(reopened.readVolume('default', 8192, 8192)).equals(Buffer.alloc(8192, 0x5a)));
  await reopened.close();
  const again = await recoverStore(crashed);
  assert.is(again.eventsReplayed, 0, 'a recovered store has nothing left to replay');
});

test('recovery re-applies large and small overlapping writes in journal order, more than a writeback backlog of them', async () => {
  // Re-applied writes go behind (small ones to the writer thread, large ones to the threadpool), and
  // replay waits for room while more than maxWritebackBytes of them is behind.
  const dir = tempDir();
  const sizeBytes = 16 * mib;
  const store = await Store.create(dir, { sizeBytes });
  const model = Buffer.alloc(sizeBytes);
  const write = (offset: number, data: Buffer): Promise<void> => {
    data.copy(model, offset);
    return store.writeVolume('default', offset, data, false);
  };
  let written = 0;
  let writesIssued = 0;
  for (let round = 0; written <= maxWritebackBytes + 8 * mib; round++) {
    const fill = (round % 250) + 1;
    const offset = ((round * 5) % 14) * mib + (round % 4) * 4096;
    const writes = [write(offset, Buffer.alloc(2 * mib, fill))];
    for (let i = 0; i < 64; i++) writes.push(write(offset + ((i * 37) % 512) * 4096, Buffer.alloc(4096, ((fill + i) % 250) + 1)));
    await Promise.all(writes);
    written += 2 * mib + 64 * 4096;
    writesIssued += writes.length;
  }
  const crashed = await crashBeforeLayerData(store, dir);
  const report = await recoverStore(crashed);
  assert.ok(report.writesReapplied >= writesIssued, `${report.writesReapplied} writes re-applied, ${writesIssued} issued`);
  const reopened = await Store.open(crashed);
  const got = flat(reopened.readVolume('default', 0, sizeBytes));
  if (!got.equals(model)) assert.unreachable(`the recovered volume differs from the writes at byte ${got.findIndex((b, i) => b !== model[i])}`);
  await reopened.close();
});

/** The LevelDB key of the journal frame that starts at `seq` (keys.ts in packages/journal). */
function frameKey(seq: number): Buffer {
  const key = Buffer.alloc(9);
  key.write('r', 0);
  key.writeUInt32BE(seq, 5);
  return key;
}

/** Wait (up to 2 s) until a file holds `block` at `offset`: a write behind reaching the layer file. */
async function untilBlockIs(path: string, block: Buffer, offset = 0): Promise<void> {
  for (let i = 0; i < 200 && !blockOf(path, offset).equals(block); i++) await new Promise((r) => setTimeout(r, 10));
}

/** The 4 KiB of a file at `offset` (the first by default). */
function blockOf(path: string, offset = 0): Buffer {
  const fd = openSync(path, 'r');
  const buf = Buffer.alloc(4096);
  readSync(fd, buf, 0, 4096, offset);
  closeSync(fd);
  return buf;
}

/**
 * What an OS crash can leave of an open store: a copy taken now, without the last `lostPayloadBytes`
 * bytes of its newest payload segment. The store is closed after the copy.
 */
async function osCrashCopy(dir: string, store: Store, lostPayloadBytes: number): Promise<string> {
  const crashed = tempDir('os-crash');
  cpSync(dir, crashed, { recursive: true });
  await store.close();
  const segments = join(crashed, 'journal', 'payloads');
  const last = readdirSync(segments).filter((f) => f.endsWith('.seg')).sort().pop()!;
  truncateSync(join(segments, last), statSync(join(segments, last)).size - lostPayloadBytes);
  return crashed;
}

test('after an OS crash, an unsynced tail whose data never reached disk is cut; flushed data stays', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), true);
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 2), false);
  await store.flush();
  const flushedSeq = store.lastSeq;
  await store.writeVolume('default', 8192, Buffer.alloc(4096, 3), false);
  await store.writeVolume('default', 0, Buffer.alloc(4096, 4), false);
  // What a power cut can leave: the LevelDB records of the last two writes, but not their data.
  const crashed = await osCrashCopy(dir, store, 4096 + 100);
  const reopened = await Store.open(crashed);
  try {
    assert.equal(reopened.openReport.tailCut, { fromSeq: flushedSeq + 1, records: reopened.openReport.tailCut!.records, kind: 'payload-missing', blocksRestored: 0 });
    assert.ok(reopened.openReport.tailCut!.records >= 1);
    const data = flat(reopened.readVolume('default', 0, 12288));
    assert.ok(data.subarray(0, 4096).equals(Buffer.alloc(4096, 1)), 'the flushed write survives (the torn one over it is gone)');
    assert.ok(data.subarray(4096, 8192).equals(Buffer.alloc(4096, 2)), 'a write covered by a flush survives');
    assert.ok(data.subarray(8192).equals(Buffer.alloc(4096, 0)), 'the unsynced write is gone, not half there');
  } finally {
    await reopened.close();
  }
  const report = await checkStore(crashed);
  assert.ok(report.ok, JSON.stringify(report.problems));
});

test('a cut torn tail gives the blocks its writes had already put in the layer file their earlier content back', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(8192, 1), true);
  await store.checkpoint();
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 2), true);
  const tornSeq = store.lastSeq + 1;
  await store.writeVolume('default', 0, Buffer.alloc(8192, 3), false);
  // Written behind after the acknowledgement: wait until the layer file holds it, as the disk may
  // have before an OS crash.
  const layerFile = join(dir, 'layers', `${store.volumes()[0].topLayerId}.data`);
  await untilBlockIs(layerFile, Buffer.alloc(4096, 3));
  assert.ok(blockOf(layerFile).equals(Buffer.alloc(4096, 3)), 'precondition: the unsynced write is in the layer file');
  // What an OS crash can leave: the write's LevelDB record and layer data, but not its payload.
  const crashed = await osCrashCopy(dir, store, 100);
  const reopened = await Store.open(crashed);
  try {
    assert.equal(reopened.openReport.tailCut, { fromSeq: tornSeq, records: 1, kind: 'payload-missing', blocksRestored: 2 });
    const data = flat(reopened.readVolume('default', 0, 8192));
    assert.ok(data.subarray(0, 4096).equals(Buffer.alloc(4096, 1)), 'block 0 holds its write from before the checkpoint again');
    assert.ok(data.subarray(4096).equals(Buffer.alloc(4096, 2)), 'block 1 holds its durable write from after the checkpoint');
  } finally {
    await reopened.close();
  }
  const report = await checkStore(crashed);
  assert.ok(report.ok, JSON.stringify(report.problems));
});

test('a torn tail over a journal with a gap the checkpoint covers still opens; its blocks are left to check', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  const gapSeq = store.lastSeq + 1;
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), true);
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 2), true);
  await store.checkpoint();
  await store.writeVolume('default', 0, Buffer.alloc(4096, 3), false);
  const layerFile = join(dir, 'layers', `${store.volumes()[0].topLayerId}.data`);
  await untilBlockIs(layerFile, Buffer.alloc(4096, 3));
  const crashed = await osCrashCopy(dir, store, 100);
  const db = new Level<Buffer, Buffer>(join(crashed, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  const key = frameKey(gapSeq);
  assert.ok((await db.get(key)) !== undefined, 'the first write has a frame of its own');
  await db.del(key);
  await db.close();
  const reopened = await Store.open(crashed);
  try {
    assert.is(reopened.openReport.tailCut?.blocksRestored, 0, 'which write came last before the checkpoint cannot be told across the gap');
    assert.ok(flat(reopened.readVolume('default', 4096, 4096)).equals(Buffer.alloc(4096, 2)));
  } finally {
    await reopened.close();
  }
});

test('recover --force salvages a journal damaged in the middle: everything before the damage is kept', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), true);
  const goodSeq = store.lastSeq;
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 2), true);
  await store.writeVolume('default', 0, Buffer.alloc(4096, 3), true);
  await store.close();
  // Damage the frame of the second write (its records region), then drop the checkpoints past it.
  const db = new Level<Buffer, Buffer>(join(dir, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  const key = frameKey(goodSeq + 1);
  const value = (await db.get(key))!;
  value[50] ^= 0xff;
  await db.put(key, value);
  for await (const k of db.keys({ gte: Buffer.from('c'), lt: Buffer.from('d') })) if (k.readUInt32BE(5) > goodSeq - 1) await db.del(k);
  await db.close();
  await rejects(() => recoverStore(dir), (e: unknown) => e instanceof StoreError && e.code === 'ECORRUPT' && new RegExp(`seq ${goodSeq + 1}`).test(e.message));
  const report = await recoverStore(dir, { force: true });
  assert.is(report.salvage?.fromSeq, goodSeq + 1);
  assert.ok(report.salvage!.recordsDiscarded >= 2);
  const reopened = await Store.open(dir);
  const data = flat(reopened.readVolume('default', 0, 12288));
  assert.is(data[0], 1, 'the write before the damage is kept, though a discarded write had overwritten it in the file');
  assert.ok(report.salvage!.writesReapplied >= 1);
  assert.is(data[4096], 0, 'the damaged write is gone');
  await reopened.close();
  const check = await checkStore(dir);
  assert.ok(check.ok, JSON.stringify(check.problems));
});

test('recover --force records a gap a checkpoint covers; check then notes it and verifies the blocks written after it', async () => {
  const { dir, top } = await lossTheCheckpointCovers(
    async (dir, seq) => {
      const db = new Level<Buffer, Buffer>(join(dir, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
      assert.ok((await db.get(frameKey(seq))) !== undefined, 'the second write has a frame of its own');
      await db.del(frameKey(seq));
      await db.close();
    },
    (seq) => new RegExp(`records seq ${seq}\\.\\.${seq} are missing; the checkpoint at seq \\d+ holds the state they made`),
  );

  const fd = openSync(join(dir, 'layers', `${top}.data`), 'r+');
  writeSync(fd, Buffer.from([0xee]), 0, 1, 12288 + 5);
  closeSync(fd);
  const damaged = await checkStore(dir);
  assert.equal(damaged.problems.map((p) => [p.kind, p.block]), [['data', 3]], 'damage after the loss is still found');

  // Later journal damage: salvage cuts there, not at the accepted gap before it.
  const more = await Store.open(dir);
  await more.writeVolume('default', 16384, Buffer.alloc(4096, 5), true);
  const damagedSeq = more.lastSeq + 1;
  await more.writeVolume('default', 20480, Buffer.alloc(4096, 6), true);
  await more.writeVolume('default', 24576, Buffer.alloc(4096, 7), true);
  await more.close();
  await flipFrameByte(dir, damagedSeq);
  await dropCheckpointsFrom(dir, damagedSeq);
  const salvaged = await recoverStore(dir, { force: true });
  assert.is(salvaged.salvage?.fromSeq, damagedSeq, 'the cut is at the new damage');
  const kept = await Store.open(dir);
  assert.ok(flat(kept.readVolume('default', 16384, 12288)).equals(Buffer.concat([Buffer.alloc(4096, 5), Buffer.alloc(8192, 0)])), 'the write between the gap and the damage is kept, the ones from the damage on are not');
  await kept.close();
});

test('recover --force records a damaged frame a checkpoint covers as a loss; check then notes it and verifies the blocks written after it', async () => {
  const { dir } = await lossTheCheckpointCovers(
    async (dir, seq) => {
      await flipFrameByte(dir, seq);
      const verified = await verifyJournalOf(dir);
      assert.equal(verified.problems.map((p) => [p.fromSeq, p.toSeq]), [[seq, seq]], 'verify names the records the damaged frame held');
    },
    (seq) => new RegExp(`records seq ${seq}\\.\\.${seq} cannot be read \\(journal record seq ${seq} is corrupt \\(crc\\): .+\\); the checkpoint at seq \\d+ holds the state they made`),
  );
  const verified = await verifyJournalOf(dir);
  assert.equal(verified.problems.map((p) => [p.kind, p.accepted !== undefined]), [['crc', true]], 'the damaged frame stays in the journal, marked accepted');
  assert.ok(verified.ok);
});

/**
 * Writes 1, 2 and 3, a checkpoint, write 4; then `damage` takes the record of write 2 (seq
 * `lostSeq`). check names it; recover --force records it once as a loss the checkpoint covers (with
 * `reason`); check then passes, noting it, verifying the blocks last written after it; every write
 * reads back.
 */
async function lossTheCheckpointCovers(damage: (dir: string, lostSeq: number) => Promise<void>, reason: (lostSeq: number) => RegExp): Promise<{ dir: string; lostSeq: number; top: number }> {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), true);
  const lostSeq = store.lastSeq + 1;
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 2), true);
  await store.writeVolume('default', 8192, Buffer.alloc(4096, 3), true);
  await store.checkpoint();
  await store.writeVolume('default', 12288, Buffer.alloc(4096, 4), true);
  const top = store.volumeInfo('default').topLayerId;
  await store.close();
  await damage(dir, lostSeq);

  const before = await checkStore(dir);
  assert.equal(before.problems.map((p) => [p.kind, p.seq]), [['journal', lostSeq]], JSON.stringify(before.problems));
  assert.is((await recoverStore(dir)).lossesRecorded.length, 0, 'without --force nothing is recorded');
  const forced = await recoverStore(dir, { force: true });
  assert.equal(forced.lossesRecorded.map((l) => [l.fromSeq, l.toSeq]), [[lostSeq, lostSeq]]);
  assert.match(forced.lossesRecorded[0].reason, reason(lostSeq));
  assert.is(forced.salvage, undefined, 'nothing is cut');
  assert.is((await recoverStore(dir, { force: true })).lossesRecorded.length, 0, 'a loss is recorded once');

  const after = await checkStore(dir);
  assert.ok(after.ok, JSON.stringify(after.problems));
  assert.match(after.notes[0], new RegExp(`records seq ${lostSeq}\\.\\.${lostSeq} are lost, accepted by recover --force at 20`));
  assert.is(after.dataBlocksChecked, 2, 'the blocks last written after the loss are verified');
  assert.is(after.dataBlocksUnverifiable, 2, "the lost write's block and the one written before it cannot be");
  const reopened = await Store.open(dir);
  assert.ok(flat(reopened.readVolume('default', 0, 16384)).equals(Buffer.concat([1, 2, 3, 4].map((v) => Buffer.alloc(4096, v)))), 'the checkpoint held the lost write');
  await reopened.close();
  return { dir, lostSeq, top };
}

test('recover --force cuts at damage after the newest checkpoint, not at older damage the checkpoint covers', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), true);
  const oldSeq = store.lastSeq + 1;
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 2), true);
  const missingSeq = store.lastSeq + 1;
  await store.writeVolume('default', 8192, Buffer.alloc(4096, 3), true);
  await store.checkpoint();
  await store.writeVolume('default', 12288, Buffer.alloc(4096, 4), true);
  const newSeq = store.lastSeq + 1;
  await store.writeVolume('default', 16384, Buffer.alloc(4096, 5), true);
  await store.writeVolume('default', 20480, Buffer.alloc(4096, 6), true);
  await store.close();
  await flipFrameByte(dir, oldSeq);
  const db = new Level<Buffer, Buffer>(join(dir, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.del(frameKey(missingSeq));
  await db.close();
  await flipFrameByte(dir, newSeq);
  await dropCheckpointsFrom(dir, newSeq);
  await rejects(() => recoverStore(dir), (e: unknown) => e instanceof StoreError && e.code === 'ECORRUPT');

  const forced = await recoverStore(dir, { force: true });
  assert.is(forced.salvage?.fromSeq, newSeq, 'the cut is at the damage after the checkpoint');
  assert.equal(forced.lossesRecorded.map((l) => [l.fromSeq, l.toSeq]), [[oldSeq, missingSeq]], 'the damage before it is recorded as a loss the checkpoint covers');
  const kept = await Store.open(dir);
  assert.ok(flat(kept.readVolume('default', 0, 24576)).equals(Buffer.concat([1, 2, 3, 4, 0, 0].map((v) => Buffer.alloc(4096, v)))), 'the checkpoint and the write after it are kept; the writes from the new damage on are not');
  await kept.close();
  const after = await checkStore(dir);
  assert.ok(after.ok, JSON.stringify(after.problems));
});

/** Flip a byte inside the journal frame of `seq` (LevelDB key `r` + seq). */
async function flipFrameByte(dir: string, seq: number): Promise<void> {
  const db = new Level<Buffer, Buffer>(join(dir, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  const value = await db.get(frameKey(seq));
  assert.ok(value !== undefined, `record ${seq} has a frame of its own`);
  value[50] ^= 0xff;
  await db.put(frameKey(seq), value);
  await db.close();
}

/** Delete the checkpoints at or after `seq`, so that damage there is after the newest one. */
async function dropCheckpointsFrom(dir: string, seq: number): Promise<void> {
  const db = new Level<Buffer, Buffer>(join(dir, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  for await (const k of db.keys({ gte: Buffer.from('c'), lt: Buffer.from('d') })) if (k.readUInt32BE(5) >= seq) await db.del(k);
  await db.close();
}

/** The verify report of a store's journal at rest (`journal verify`). */
async function verifyJournalOf(dir: string): Promise<StoreJournalReport> {
  const journal = await Journal.open<StoreEvent>(join(dir, 'journal'));
  try {
    return await verifyStoreJournal(journal);
  } finally {
    await journal.close();
  }
}
/** Flip a byte of the payload log inside the first place that holds `data` (a write's payload). */
function flipPayload(dir: string, data: Buffer): void {
  const segments = join(dir, 'journal', 'payloads');
  for (const name of readdirSync(segments).filter((f) => f.endsWith('.seg'))) {
    const at = readFileSync(join(segments, name)).indexOf(data);
    if (at < 0) continue;
    const fd = openSync(join(segments, name), 'r+');
    writeSync(fd, Buffer.from([data[100] ^ 0xff]), 0, 1, at + 100);
    closeSync(fd);
    return;
  }
  assert.unreachable('the payload is in the payload log');
}

test('check says whether a damaged payload can be mended; recover --force writes back those the layer files still hold', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib, retain: parseRetention('all') });
  await store.writeVolume('default', 0, Buffer.alloc(8192, 0x11), true);
  const mendable = store.lastSeq;
  await store.writeVolume('default', 65536, Buffer.alloc(4096, 0x22), true);
  const overwritten = store.lastSeq;
  await store.writeVolume('default', 65536, Buffer.alloc(4096, 0x23), true);
  const top = store.volumeInfo('default').topLayerId;
  await store.close();
  flipPayload(dir, Buffer.alloc(8192, 0x11));
  flipPayload(dir, Buffer.alloc(4096, 0x22));

  const before = await checkStore(dir);
  assert.equal(before.problems.map((p) => [p.kind, p.seq]), [['journal', mendable], ['journal', overwritten]], JSON.stringify(before.problems));
  assert.match(before.problems[0].message, new RegExp(`seq ${mendable} is corrupt \\(payload-crc\\).*; recover --force can write it back from layer ${top}'s data file$`));
  assert.match(before.problems[1].message, new RegExp(`; it cannot be rebuilt: layer ${top} no longer holds it: 1 of its 1 block\\(s\\) \\(16\\) differ from what the write recorded`));
  assert.is(before.dataBlocksChecked, 3, 'damaged payloads do not stop the replay and the data checks');

  const plain = await recoverStore(dir);
  assert.equal([plain.payloadsRepaired, plain.payloadsUnrepaired], [[], []], 'without --force nothing is repaired');
  const forced = await recoverStore(dir, { force: true });
  assert.equal(forced.payloadsRepaired, [{ seq: mendable, layerId: top, firstBlock: 0, blocks: 2 }]);
  assert.equal(forced.payloadsUnrepaired.map((u) => u.seq), [overwritten]);
  assert.is(forced.salvage, undefined);
  // The payload no layer holds is lost for good; the checkpoint holds the state its write made.
  assert.equal(forced.lossesRecorded.map((l) => [l.fromSeq, l.toSeq, l.payloadOnly]), [[overwritten, overwritten, true]]);
  assert.match(forced.lossesRecorded[0].reason, new RegExp(`seq ${overwritten} is corrupt \\(payload-crc\\).*; it cannot be rebuilt: layer ${top} no longer holds it: .*; the checkpoint at seq \\d+ holds the state it made$`));
  assert.is((await recoverStore(dir, { force: true })).lossesRecorded.length, 0, 'a loss is recorded once');

  const after = await checkStore(dir);
  assert.ok(after.ok, JSON.stringify(after.problems));
  assert.equal(after.notes.length, 1, after.notes.join(' | '));
  assert.match(after.notes[0], new RegExp(`^the payload of write seq ${overwritten} is lost, accepted by recover --force at 20.*; a view of the past that needs it fails$`));
  assert.is(after.dataBlocksChecked, 3, 'a lost payload leaves every data block checked');
  assert.is(after.dataBlocksUnverifiable, 0);
  const verified = await verifyJournalOf(dir);
  assert.equal(verified.problems.map((p) => [p.seq, p.accepted !== undefined]), [[overwritten, true]]);
  const reopened = await Store.open(dir);
  try {
    assert.ok((await reopened.eventLog.readPayload(mendable))!.equals(Buffer.alloc(8192, 0x11)), 'the journal holds the write again');
    const past = await pointInTimeView(reopened, 'default', mendable);
    assert.ok((await past.read(0, 8192)).equals(Buffer.alloc(8192, 0x11)));
    assert.ok(flat(reopened.readVolume('default', 65536, 4096)).equals(Buffer.alloc(4096, 0x23)));
  } finally {
    await reopened.close();
  }
});

test('recover --force salvages past a damaged payload a checkpoint covers: it cuts at the later damage, re-applies the rest and records the payload as lost', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib, retain: parseRetention('all') });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 0x22), true);
  const overwritten = store.lastSeq;
  await store.writeVolume('default', 0, Buffer.alloc(4096, 0x23), true);
  await store.checkpoint();
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 4), true);
  const newSeq = store.lastSeq + 1;
  await store.writeVolume('default', 8192, Buffer.alloc(4096, 5), true);
  await store.writeVolume('default', 12288, Buffer.alloc(4096, 6), true);
  await store.close();
  flipPayload(dir, Buffer.alloc(4096, 0x22));
  await flipFrameByte(dir, newSeq);
  await dropCheckpointsFrom(dir, newSeq);

  const forced = await recoverStore(dir, { force: true });
  assert.equal([forced.salvage?.fromSeq, forced.salvage?.recordsDiscarded], [newSeq, 2], 'the cut is at the damage after the checkpoint');
  assert.equal(forced.payloadsUnrepaired.map((u) => u.seq), [overwritten], 'the payload no layer holds any more is not mended');
  const kept = await Store.open(dir);
  assert.ok(flat(kept.readVolume('default', 0, 16384)).equals(Buffer.concat([0x23, 4, 0, 0].map((v) => Buffer.alloc(4096, v)))), 'every write before the cut is kept');
  await kept.close();
  assert.equal(forced.lossesRecorded.map((l) => [l.fromSeq, l.payloadOnly]), [[overwritten, true]], 'the damaged payload is recorded as lost');
  const after = await checkStore(dir);
  assert.ok(after.ok, JSON.stringify(after.problems));
});

test('check does not promise to write back a payload whose segment, the newest, was removed by hand', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib, retain: parseRetention('all') });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 0x31), true);
  const written = store.lastSeq;
  await store.close();
  const payloads = join(dir, 'journal', 'payloads');
  const segments = readdirSync(payloads).filter((f) => f.endsWith('.seg'));
  assert.is(segments.length, 1);
  rmSync(join(payloads, segments[0]));

  const report = await checkStore(dir);
  const problem = report.problems.find((p) => p.seq === written);
  assert.ok(problem !== undefined, JSON.stringify(report.problems));
  assert.match(problem.message, new RegExp(`\\(payload-missing\\).*; it cannot be rebuilt: payload segment ${segments[0].replace('.', '\\.')} is gone from .*, and it was the newest$`));
  const forced = await recoverStore(dir, { force: true });
  assert.equal(forced.payloadsRepaired, [], 'recover --force agrees with check');
  assert.equal(forced.payloadsUnrepaired.map((u) => u.seq), [written]);
});

test('recover --force mends a durable payload after the checkpoint from the layer file, discarding nothing', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), true);
  await store.checkpoint();
  await store.writeVolume('default', 16384, Buffer.alloc(8192, 0x44), true);
  const damagedSeq = store.lastSeq;
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 0x55), true);
  const layerFile = join(dir, 'layers', `${store.volumeInfo('default').topLayerId}.data`);
  await untilBlockIs(layerFile, Buffer.alloc(4096, 0x44), 16384 + 4096);
  // A process crash (the store is copied open), then rot in the payload log.
  const crashed = tempDir('crashed');
  cpSync(dir, crashed, { recursive: true });
  await store.close();
  flipPayload(crashed, Buffer.alloc(8192, 0x44));

  await rejects(() => recoverStore(crashed), (e: unknown) => e instanceof StoreError && e.code === 'ECORRUPT' && new RegExp(`seq ${damagedSeq} is corrupt \\(payload-crc\\)`).test(e.message));
  const forced = await recoverStore(crashed, { force: true });
  assert.equal(forced.payloadsRepaired.map((r) => [r.seq, r.blocks]), [[damagedSeq, 2]]);
  assert.is(forced.salvage, undefined, 'nothing is cut');
  assert.ok(forced.eventsReplayed >= 2, 'the records after the checkpoint are replayed');
  const reopened = await Store.open(crashed);
  try {
    const data = flat(reopened.readVolume('default', 0, 24576));
    const expected = Buffer.alloc(24576);
    expected.fill(1, 0, 4096);
    expected.fill(0x55, 4096, 8192);
    expected.fill(0x44, 16384, 24576);
    assert.ok(data.equals(expected), 'every acknowledged write is there, the one after the mended record too');
  } finally {
    await reopened.close();
  }
  const check = await checkStore(crashed);
  assert.ok(check.ok, JSON.stringify(check.problems));
});

test('a damaged seal found by an open that then fails is reported by the next open that succeeds', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), true);
  await store.checkpoint();
  await store.writeVolume('default', 4096, Buffer.alloc(4096, 0x66), true);
  // The write's data never reached the layer file, so its damaged payload cannot be mended.
  const crashed = await crashBeforeLayerData(store, dir);
  flipPayload(crashed, Buffer.alloc(4096, 0x66));
  const sealPath = join(crashed, 'journal', 'payloads', 'seal');
  const seal = readFileSync(sealPath);
  seal[10] ^= 0x01;
  writeFileSync(sealPath, seal);
  await rejects(() => Store.open(crashed), code('ECORRUPT'));
  const forced = await recoverStore(crashed, { force: true });
  assert.ok(forced.salvage !== undefined, 'the damaged payload is cut');
  assert.is(forced.sealDamage, 'it fails its CRC32C', 'the seal damage the failed open found is still reported');
  assert.is((await recoverStore(crashed)).sealDamage, undefined, 'once reported, it is not reported again');
});

test('a point-in-time view built earlier still reads the past after the volume is overwritten', async () => {
  const store = await Store.create(tempDir(), { sizeBytes: mib, retain: { kind: 'all' } });
  await store.writeVolume('default', 0, Buffer.alloc(8192, 1), false);
  const then = store.lastSeq;
  const view = await pointInTimeView(store, 'default', then);
  assert.ok((await view.read(0, 8192)).equals(Buffer.alloc(8192, 1)));
  await store.writeVolume('default', 0, Buffer.alloc(4096, 2), false);
  await store.checkpoint();
  assert.ok((await view.read(0, 8192)).equals(Buffer.alloc(8192, 1)), 'the overwritten block comes from the journal, not the layer file');
  const exports = new StoreExports(store);
  const device = exports.open(`default@seq:${then}`)!;
  assert.ok(flat(await device.read(0, 8192)).equals(Buffer.alloc(8192, 1)));
  await store.close();
});

test('retention: a point whose data is gone is refused up front and changes nothing; the policy decides what is kept', async () => {
  const writeAndCheckpoint = async (store: Store): Promise<{ p1: number; p2: number }> => {
    await store.writeVolume('default', 0, Buffer.alloc(8192, 1), false); // blocks 0 and 1
    const p1 = store.lastSeq;
    await store.writeVolume('default', 0, Buffer.alloc(4096, 2), false); // block 0 again
    const p2 = store.lastSeq;
    for (const block of [10, 11]) {
      await store.writeVolume('default', block * 4096, Buffer.alloc(4096, 3), false);
      await store.checkpoint();
    }
    return { p1, p2 };
  };

  // Default policy: only what recovery needs. seq p1's data of block 0 was overwritten and dropped.
  const store = await Store.create(tempDir(), { sizeBytes: mib });
  const { p1, p2 } = await writeAndCheckpoint(store);
  assert.ok(store.eventLog.payloadsDroppedThroughSeq >= p2, 'the checkpoints dropped the early payloads');
  await rejects(pointInTimeView(store, 'default', p1), (err: unknown) => code('ERANGE')(err) && /outside the journal's retention window: 1 block\(s\).*block 0, written at seq/.test((err as Error).message));
  const before = { seq: store.lastSeq, snapshots: store.volumeInfo('default').snapshots.length, layers: store.layers().length };
  await rejects(store.snapshotAt('default', p1, 'too-old'), code('ERANGE'));
  assert.equal({ seq: store.lastSeq, snapshots: store.volumeInfo('default').snapshots.length, layers: store.layers().length }, before, 'a refused snapshot --at changes nothing');
  // Block 1 still holds seq p1's bytes and block 0 seq p2's: seq p2 is inside the window.
  const view = await pointInTimeView(store, 'default', p2);
  const want = Buffer.alloc(8192, 1).fill(2, 0, 4096);
  assert.ok((await view.read(0, 8192)).equals(want));
  const atP2 = await store.snapshotAt('default', p2, 'at-p2');
  assert.ok(flat(store.readLayer(atP2.layerId, 0, 8192)).equals(want));

  // Over NBD the name is accepted (the window needs a fold), and the first read says why it fails.
  const exports = new StoreExports(store);
  const old = exports.open(`default@seq:${p1}`)!;
  await rejects(old.read(0, 4096), (err: unknown) => err instanceof BlockDeviceError && err.code === 'EIO' && /retention window/.test(err.message));
  // Points the journal does not have are unknown export names.
  assert.is(exports.open(`default@seq:${store.lastSeq + 1}`), undefined);
  assert.is(exports.open('default@time:yesterday-ish'), undefined);
  assert.is(exports.open(`default@time:${new Date(Date.now() + 3_600_000).toISOString()}`), undefined);
  assert.ok(exports.open(`default@time:${new Date().toISOString()}`) !== undefined);
  await store.close();

  // Policies that keep more: from a seq (bare or seq:N), by age, by size.
  for (const policy of ['seq:1', '1', '1h', '1G']) {
    const kept = await Store.create(tempDir(), { sizeBytes: mib, retain: parseRetention(policy) });
    const points = await writeAndCheckpoint(kept);
    const past = await pointInTimeView(kept, 'default', points.p1);
    assert.ok((await past.read(0, 8192)).equals(Buffer.alloc(8192, 1)), `retention ${policy} keeps seq ${points.p1}`);
    await kept.close();
  }
});

test('large writes checkpoint every checkpointEveryPayloadBytes, so the payloads kept stay bounded', async () => {
  const newestCheckpoint = async (store: Store): Promise<number> => (await store.eventLog.checkpointSeqs()).at(-1) ?? 0;
  // 24 MiB in 1 MiB writes against a 4 MiB interval: a checkpoint after every fourth write.
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: 32 * mib, checkpointEveryPayloadBytes: 4 * mib });
  const written: CheckpointWritten[] = [];
  store.checkpoints$.subscribe((c) => written.push(c));
  // A checkpoint starts in the background after the commit that makes it due, is stored, and then
  // prunes older checkpoints and drops payloads before checkpoints$ reports it: wait for that report
  // (up to 10 s), so the next write cannot slip into it and every checkpoint lands on its mark.
  const checkpointAt = async (seq: number): Promise<number> => {
    for (let waitedMs = 0; waitedMs < 10_000 && (written.at(-1)?.seq ?? 0) < seq; waitedMs += 10) {
      await new Promise((resolve) => setTimeout(resolve, 10));
    }
    return written.at(-1)?.seq ?? 0;
  };
  const seqs: number[] = [];
  for (let i = 0; i < 24; i++) {
    await store.writeVolume('default', i * mib, Buffer.alloc(mib, i + 1), false);
    seqs.push(store.lastSeq);
    if (i % 4 === 3) assert.is(await checkpointAt(store.lastSeq), store.lastSeq, `a checkpoint after ${i + 1} MiB`);
    else assert.ok((await newestCheckpoint(store)) < store.lastSeq, `no checkpoint after ${i + 1} MiB`);
  }
  assert.equal(await store.eventLog.checkpointSeqs(), [seqs[19], seqs[23]], 'the two newest are kept');
  assert.is(store.eventLog.payloadsDroppedThroughSeq, seqs[19], 'payloads are dropped through the older one');
  assert.equal(written.map((c) => [c.seq, c.reason]), [3, 7, 11, 15, 19, 23].map((i) => [seqs[i], 'bytes']), 'checkpoints$ reports each, for write data');
  assert.ok(written.every((c) => c.durationMs > 0));
  await store.writeVolume('default', 0, Buffer.alloc(mib, 1), false);
  await store.close();
  assert.equal(written.at(-1)?.reason, 'request', 'close takes one more');
  const reopened = await Store.open(dir);
  for (let i = 0; i < 24; i++) assert.ok(flat(reopened.readVolume('default', i * mib, mib)).equals(Buffer.alloc(mib, i + 1)), `MiB ${i}`);
  await reopened.close();

  // The default interval (1 GiB) takes no checkpoint for the same writes: the ones above are the option's.
  const plain = await Store.create(tempDir(), { sizeBytes: 32 * mib });
  const created = await newestCheckpoint(plain);
  for (let i = 0; i < 24; i++) await plain.writeVolume('default', i * mib, Buffer.alloc(mib, i + 1), false);
  await new Promise((resolve) => setTimeout(resolve, 200));
  assert.is(await newestCheckpoint(plain), created);
  assert.ok(plain.eventLog.payloadsDroppedThroughSeq <= created);
  await plain.close();

  const badInterval = (err: unknown) => code('EINVAL')(err) && /checkpointEveryPayloadBytes/.test((err as Error).message);
  await rejects(Store.open(dir, { checkpointEveryPayloadBytes: 0 }), badInterval);
  const notCreated = tempDir();
  await rejects(Store.create(notCreated, { sizeBytes: mib, checkpointEveryPayloadBytes: 0.5 }), badInterval);
  assert.equal(readdirSync(notCreated), [], 'a refused create leaves nothing behind');
});

test('large reads of ever-new lengths leave no memory behind in the reader thread', async () => {
  // Each read of a new length takes a new buffer, which goes to the reader thread. When it went there
  // as shared memory, the thread's handle kept it alive until that thread's garbage collector ran:
  // 400 such reads held about 600 MiB.
  const store = await Store.create(tempDir(), { sizeBytes: 8 * mib });
  const device = new StoreExports(store).open('default')!;
  await store.writeVolume('default', 0, Buffer.alloc(8 * mib, 0x5a), false);
  const rss = (): number => process.memoryUsage.rss();
  const before = rss();
  let most = before;
  for (let i = 0; i < 400; i++) {
    const length = mib + 4096 * (i + 1);
    const result = await device.read((i * 4096) % mib, length);
    assert.ok(Buffer.isBuffer(result) && result.length === length && result[length - 1] === 0x5a, `read ${i}`);
    device.recycle?.(result);
    most = Math.max(most, rss());
  }
  assert.ok(most - before < 256 * mib, `RSS grew by ${((most - before) / mib).toFixed(0)} MiB over 400 reads of 1-2.6 MiB`);
  await store.close();
});

test('close() lets the writes already issued land before its checkpoint and refuses new ones', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  const writes = Array.from({ length: 32 }, (_, i) => store.writeVolume('default', i * 4096, Buffer.alloc(4096, i + 1), i % 4 === 0));
  const closing = store.close();
  await rejects(store.writeVolume('default', 0, Buffer.alloc(4096, 0xee), false), code('ESHUTDOWN'));
  await Promise.all(writes);
  await closing;
  const reopened = await Store.open(dir);
  assert.is(reopened.openReport.eventsReplayed, 0, 'the checkpoint covers every write that was issued');
  for (let i = 0; i < 32; i++) assert.ok(flat(reopened.readVolume('default', i * 4096, 4096)).equals(Buffer.alloc(4096, i + 1)), `block ${i}`);
  await reopened.close();
});

test('thousands of small writes queued behind a large one reach the layer file in order', async () => {
  // Regression: small writes finish inside the writeback pump, which called itself once per queued
  // write and overflowed the stack behind a large (threadpool) write they overlapped.
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: 8 * mib });
  const writes: Promise<void>[] = [store.writeVolume('default', 0, Buffer.alloc(mib, 0x11), false)];
  for (let i = 0; i < 20_000; i++) writes.push(store.writeVolume('default', (i % 256) * 4096, Buffer.alloc(4096, (i % 250) + 1), false));
  await Promise.all(writes);
  const expected = Buffer.alloc(mib);
  for (let block = 0; block < 256; block++) {
    const last = block < 20_000 % 256 ? 20_000 - (20_000 % 256) + block : 20_000 - (20_000 % 256) - 256 + block; // the last i with i % 256 === block
    expected.fill((last % 250) + 1, block * 4096, (block + 1) * 4096);
  }
  assert.ok(flat(store.readVolume('default', 0, mib)).equals(expected), 'the last write of each block wins');
  await store.close();
  const reopened = await Store.open(dir);
  assert.ok(flat(reopened.readVolume('default', 0, mib)).equals(expected), 'and it is what the layer file holds');
  await reopened.close();
});

test('small writes reach the layer file in order, whether the writer thread or the event loop writes them', async () => {
  // Unsynced batches' blocks go to the layer writer thread; synced batches' blocks are written inline.
  // Both kinds overwrite the same few blocks, turn after turn, with reads in between.
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  const model = Buffer.alloc(mib);
  for (let round = 0; round < 300; round++) {
    const writes: Promise<void>[] = [];
    for (let i = 0; i < 8; i++) {
      const block = (round * 7 + i * 3) % 16;
      const fill = ((round * 8 + i) % 255) + 1;
      writes.push(store.writeVolume('default', block * 4096, Buffer.alloc(4096, fill), round % 3 === 0 && i === 0));
      model.fill(fill, block * 4096, (block + 1) * 4096);
    }
    await Promise.all(writes);
    if (round % 10 === 0) assert.ok(flat(store.readVolume('default', 0, 16 * 4096)).equals(model.subarray(0, 16 * 4096)), `reads agree after round ${round}`);
  }
  await store.close();
  const reopened = await Store.open(dir);
  assert.is(reopened.openReport.eventsReplayed, 0, 'a clean close leaves nothing to replay');
  assert.ok(flat(reopened.readVolume('default', 0, mib)).equals(model), 'the layer file holds the last write of each block');
  await reopened.close();
});

test('check passes on a healthy store and names the volume, block and seq of damaged data', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(16384, 1), false);
  await store.snapshot('default', 'base');
  await store.writeVolume('default', 4096 * 3, Buffer.alloc(4096, 2), false);
  await store.clone('default@base', 'vm1');
  await store.writeVolume('vm1', 4096, Buffer.alloc(100, 3), false);
  const top = store.volumeInfo('default').topLayerId;
  const writeSeq = store.lastSeq - 2;
  await store.close();
  const healthy = await checkStore(dir);
  assert.ok(healthy.ok, JSON.stringify(healthy.problems));
  assert.ok(healthy.eventsChecked >= 8);
  assert.is(healthy.dataBlocksChecked, 4 + 1 + 1);

  const fd = openSync(join(dir, 'layers', `${top}.data`), 'r+');
  writeSync(fd, Buffer.from([0xee]), 0, 1, 4096 * 3 + 17);
  closeSync(fd);
  const damaged = await checkStore(dir);
  assert.not.ok(damaged.ok);
  assert.is(damaged.problems.length, 1);
  const [problem] = damaged.problems;
  assert.is(problem.kind, 'data');
  assert.is(problem.block, 3);
  assert.is(problem.seq, writeSeq);
  assert.equal(problem.volumes, ['default']);
  assert.match(problem.message, new RegExp(`volume default, layer ${top}, block 3 .*seq ${writeSeq}`));
});

test('a new store directory is private to its owner', async () => {
  const dir = join(tempDir(), 'private');
  await (await Store.create(dir, { sizeBytes: mib })).close();
  const { statSync } = await import('node:fs');
  assert.is(statSync(dir).mode & 0o777, 0o700);
});

test('orphan layer files left by a crash are removed on open', async () => {
  const dir = tempDir();
  await (await Store.create(dir, { sizeBytes: mib })).close();
  writeFileSync(join(dir, 'layers', '999.data'), 'orphan');
  const store = await Store.open(dir);
  assert.is(store.openReport.orphanFilesRemoved, 1);
  assert.not.ok(readdirSync(join(dir, 'layers')).includes('999.data'));
  await store.close();
});

test('events are tuples the journal replays in order', async () => {
  const dir = tempDir();
  const store = await Store.create(dir, { sizeBytes: mib });
  await store.writeVolume('default', 0, Buffer.alloc(4096, 1), false);
  const { lastValueFrom, toArray } = await import('rxjs');
  const records = await lastValueFrom(store.eventLog.replay(1, undefined, { payloads: false }).pipe(toArray()));
  assert.equal(records.map((r) => r.meta[0]), [EventType.StoreCreated, EventType.LayerCreated, EventType.VolumeCreated, EventType.Write]);
  await store.close();
});

test.run();
