/**
 * dm-cow compatibility: a layer in the seed's on-disk format (data device + bitmap device with the
 * magic and length after the bitmap) imports as a volume that reads the marked sectors from the data
 * and everything else from below; `dmCowTable` writes bitmaps that import back to the same content.
 */
import { readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { rejects } from 'node:assert/strict';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { buildDmCowBitmap, dmCowMagicOffset, dmCowTable, importDmCow, readDmCowBitmap, Store } from '../src/index.js';
import { flat, tempDir } from './helpers.js';

const sizeBytes = 4 * 1024 * 1024;
const sectors = sizeBytes / 512;

function makeLayer(dir: string, runs: Array<[number, number]>, fill: number): { data: string; bitmap: string } {
  const data = join(dir, 'w.data');
  const bitmap = join(dir, 'w.bitmap');
  writeFileSync(data, Buffer.alloc(sizeBytes, fill));
  writeFileSync(bitmap, buildDmCowBitmap(sectors, runs));
  return { data, bitmap };
}

test('the bitmap layout: magic and length after the bitmap, one bit per sector', () => {
  const bitmap = buildDmCowBitmap(sectors, [[3, 2], [100, 1]]);
  const at = dmCowMagicOffset(1 + Math.floor(sectors / 4096));
  assert.is(bitmap.readBigUInt64LE(at), 0x00babe0eaababe11n);
  assert.is(bitmap.readBigUInt64LE(at + 8), BigInt(1 + Math.floor(sectors / 4096)));
  assert.is(bitmap[0], 0b00011000);
  assert.is(bitmap[12], 0b00010000);
});

test('a dm-cow layer imports on a snapshot: marked sectors from its data, the rest from below', async () => {
  const dir = tempDir('dmcow');
  const store = await Store.create(tempDir(), { sizeBytes, blockSizeBytes: 4096 });
  await store.writeVolume('default', 0, Buffer.alloc(sizeBytes, 0x44), false);
  await store.snapshot('default', 'base');
  // Sectors 1-2 (inside block 0: copy-up keeps sectors 0 and 3..7) and 16..31 (blocks 2-3).
  const layer = makeLayer(dir, [[1, 2], [16, 16]], 0x77);
  const report = await importDmCow(store, 'imported', { dataPath: layer.data, bitmapPath: layer.bitmap, below: 'default@base' });
  assert.ok(report.magicFound);
  assert.is(report.sectorsImported, 18);
  const expected = Buffer.alloc(sizeBytes, 0x44);
  expected.fill(0x77, 512, 3 * 512);
  expected.fill(0x77, 16 * 512, 32 * 512);
  assert.ok(flat(store.readVolume('imported', 0, sizeBytes)).equals(expected));

  // The table's bitmaps describe the same stack: re-importing its top layer gives the same volume.
  const table = dmCowTable(store, 'imported', dir);
  assert.match(table.line, new RegExp(`^0 ${sectors} cow \\S+ 0 (\\S+\\.bitmap \\S+\\.data 0 ?)+$`));
  const topBitmap = table.bitmaps[table.bitmaps.length - 1];
  const marked = readDmCowBitmap(topBitmap, sectors).runs;
  assert.equal(marked, [[0, 8], [16, 16]], 'whole 4 KiB blocks (copy-up made block 0 whole)');
  assert.equal(table.warnings, []);
  await store.close();
});

test('a bitmap with a foreign magic or the wrong length is refused; an unused one imports empty', async () => {
  const dir = tempDir('dmcow-bad');
  const store = await Store.create(tempDir(), { sizeBytes });
  const layer = makeLayer(dir, [[0, 8]], 0x55);
  const bad = readFileSync(layer.bitmap);
  const at = dmCowMagicOffset(1 + Math.floor(sectors / 4096));
  bad.writeBigUInt64LE(0x1234n, at);
  writeFileSync(join(dir, 'bad.bitmap'), bad);
  await rejects(() => importDmCow(store, 'x', { dataPath: layer.data, bitmapPath: join(dir, 'bad.bitmap') }), /not a dm-cow bitmap: magic 0x1234/);
  bad.writeBigUInt64LE(0x00babe0eaababe11n, at);
  bad.writeBigUInt64LE(99n, at + 8);
  writeFileSync(join(dir, 'bad.bitmap'), bad);
  await rejects(() => importDmCow(store, 'y', { dataPath: layer.data, bitmapPath: join(dir, 'bad.bitmap') }), /for 99 bitmap sectors/);
  writeFileSync(join(dir, 'unused.bitmap'), Buffer.alloc(at + 512));
  const empty = await importDmCow(store, 'z', { dataPath: layer.data, bitmapPath: join(dir, 'unused.bitmap') });
  assert.not.ok(empty.magicFound);
  assert.ok(flat(store.readVolume('z', 0, sizeBytes)).equals(Buffer.alloc(sizeBytes)));
  await store.close();
});

test.run();
