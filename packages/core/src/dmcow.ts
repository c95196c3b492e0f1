/**
 * dm-cow compatibility: the 2006 device-mapper target cowstack descends from stacked a base image B,
 * read-only layers R and one writable layer W, each R and W being a data device (blocks at their
 * volume offset) plus a bitmap device with one bit per 512-byte sector.
 *
 * Bitmap device layout, as the seed's bmapmagic() and set_cow() write it:
 *   - bit for sector s: byte s >> 3, bit s & 7 (least significant first);
 *   - bmap_len = 1 + (volume sectors >> 12), the bitmap's length in 512-byte sectors;
 *   - at byte ((bmap_len & ~63) + 192) * 512: the magic 0x00BABE0EAABABE11 then bmap_len, both u64
 *     little-endian; an all-zero magic means "never used" (an empty layer).
 * The seed addressed bitmap bytes within a buffer-cache block as (sector & (blocksize - 1)) >> 3,
 * which aliases sectors beyond the first `blocksize` of each block's range onto the same bytes; this
 * reader uses the linear layout above, which is what the seed meant and what it wrote for the first
 * `blocksize` sectors of every bitmap block.
 *
 * importDmCow turns one W (or R) into a new volume: the sectors its bitmap marks are written through
 * the ordinary journaled write path on top of a base view (copy-up handles sectors smaller than the
 * store's block). dmCowTable prints the dm-cow table line for a volume and writes a bitmap file per
 * layer, so the same stack can be assembled with dmsetup.
 */
import { closeSync, fstatSync, openSync, writeFileSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { StoreError } from './errors.js';
import { readAt } from './read-at.js';
import { BlockState } from './projection.js';
import type { Store, VolumeInfo } from './store.js';

export const dmCowMagic = 0x00babe0eaababe11n;
const sectorBytes = 512;

/** Bitmap length in 512-byte sectors for a volume of `volumeSectors` sectors (the seed's bmap_len). */
export function dmCowBitmapSectors(volumeSectors: number): number {
  return 1 + Math.floor(volumeSectors / 4096);
}

/** Byte offset of the magic in the bitmap device. */
export function dmCowMagicOffset(bitmapSectors: number): number {
  return ((bitmapSectors & ~63) + 192) * sectorBytes;
}

function sizeOf(path: string): number {
  const fd = openSync(path, 'r');
  try {
    return fstatSync(fd).size;
  } finally {
    closeSync(fd);
  }
}

export interface DmCowImportOptions {
  /** The layer's data device or image. */
  readonly dataPath: string;
  /** The layer's bitmap device or file. */
  readonly bitmapPath: string;
  /** Volume size in bytes (default: the data device's size). */
  readonly sizeBytes?: number;
  /** What the layer sits on: "VOLUME@SNAPSHOT" (default: a new zero base). */
  readonly below?: string;
}

export interface DmCowImportReport {
  readonly volume: VolumeInfo;
  readonly sectorsImported: number;
  readonly magicFound: boolean;
}

/** Read a dm-cow bitmap: the runs of marked sectors, after checking the magic and length. */
export function readDmCowBitmap(bitmapPath: string, volumeSectors: number): { runs: Array<[number, number]>; magicFound: boolean } {
  const bitmapSectors = dmCowBitmapSectors(volumeSectors);
  const header = readAt(bitmapPath, dmCowMagicOffset(bitmapSectors), 16);
  const magic = header.readBigUInt64LE(0);
  const length = header.readBigUInt64LE(8);
  if (magic === 0n) return { runs: [], magicFound: false };
  if (magic !== dmCowMagic) {
    throw new StoreError('EFORMAT', `${bitmapPath} is not a dm-cow bitmap: magic 0x${magic.toString(16)} at byte ${dmCowMagicOffset(bitmapSectors)}, expected 0x${dmCowMagic.toString(16)}`);
  }
  if (length !== BigInt(bitmapSectors)) {
    throw new StoreError('EFORMAT', `${bitmapPath} is a dm-cow bitmap for ${length} bitmap sectors, but a ${volumeSectors}-sector volume needs ${bitmapSectors}`);
  }
  const bits = readAt(bitmapPath, 0, Math.ceil(volumeSectors / 8));
  const runs: Array<[number, number]> = [];
  let start = -1;
  for (let s = 0; s < volumeSectors; s++) {
    const set = (bits[s >> 3] >> (s & 7)) & 1;
    if (set === 1 && start === -1) start = s;
    if (set === 0 && start !== -1) {
      runs.push([start, s - start]);
      start = -1;
    }
  }
  if (start !== -1) runs.push([start, volumeSectors - start]);
  return { runs, magicFound: true };
}

/** Build a dm-cow bitmap (with its magic) marking `runs` of sectors. */
export function buildDmCowBitmap(volumeSectors: number, runs: ReadonlyArray<readonly [number, number]>): Buffer {
  const bitmapSectors = dmCowBitmapSectors(volumeSectors);
  const magicAt = dmCowMagicOffset(bitmapSectors);
  const out = Buffer.alloc(magicAt + sectorBytes);
  for (const [start, count] of runs) for (let s = start; s < start + count; s++) out[s >> 3] |= 1 << (s & 7);
  out.writeBigUInt64LE(dmCowMagic, magicAt);
  out.writeBigUInt64LE(BigInt(bitmapSectors), magicAt + 8);
  return out;
}

/** Import a dm-cow layer as a new volume named `name`. */
export async function importDmCow(store: Store, name: string, options: DmCowImportOptions): Promise<DmCowImportReport> {
  const dataPath = resolve(options.dataPath);
  const sizeBytes = options.sizeBytes ?? sizeOf(dataPath);
  if (sizeBytes % sectorBytes !== 0) throw new StoreError('EINVAL', `a dm-cow volume is whole 512-byte sectors; ${sizeBytes} bytes is not`);
  const volumeSectors = sizeBytes / sectorBytes;
  const { runs, magicFound } = readDmCowBitmap(resolve(options.bitmapPath), volumeSectors);
  const volume = options.below !== undefined ? await store.clone(options.below, name) : await store.createVolume(name, sizeBytes);
  if (volume.sizeBytes !== sizeBytes) throw new StoreError('EINVAL', `${options.below} is ${volume.sizeBytes} bytes but the dm-cow layer is ${sizeBytes}`);
  const chunkSectors = 2048;
  let sectorsImported = 0;
  for (const [start, count] of runs) {
    for (let s = start; s < start + count; s += chunkSectors) {
      const n = Math.min(chunkSectors, start + count - s);
      await store.writeVolume(name, s * sectorBytes, readAt(dataPath, s * sectorBytes, n * sectorBytes), false);
      sectorsImported += n;
    }
  }
  await store.flush();
  return { volume: store.volumeInfo(name), sectorsImported, magicFound };
}

export interface DmCowTable {
  /** The dm-cow table line: "0 SECTORS cow BASE 0 BITMAP DATA 0 ...". */
  readonly line: string;
  /** Bitmap files written, one per layer above the base. */
  readonly bitmaps: string[];
  /** Layers holding zeroed blocks, which dm-cow cannot express (it has no "zero" state). */
  readonly warnings: string[];
}

/**
 * The dm-cow table for a volume, with one bitmap file per layer written into `bitmapDir`. The base is
 * the root layer's data (an external image, the store's layer file, or /dev/zero for a zero base).
 */
export function dmCowTable(store: Store, volume: string, bitmapDir: string): DmCowTable {
  const info = store.volumeInfo(volume);
  const state = store.projection;
  const bs = store.blockSizeBytes;
  const sectors = Math.ceil(info.sizeBytes / sectorBytes);
  const perBlock = bs / sectorBytes;
  const warnings: string[] = [];
  const bitmaps: string[] = [];
  const [rootId, ...above] = info.stack;
  const root = state.layers.get(rootId)!;
  const dataPath = (id: number): string => state.layers.get(id)?.source?.path ?? join(store.dir, 'layers', `${id}.data`);
  const rootHasData = root.kind === 'external' || root.bitmap.toRuns().length > 0;
  const parts = [`0 ${sectors} cow ${rootHasData ? dataPath(rootId) : '/dev/zero'} 0`];
  for (const id of above) {
    const layer = state.layers.get(id)!;
    const runs: Array<[number, number]> = [];
    let zeroed = 0;
    layer.bitmap.forEachSetRun((start, count, value) => {
      if (value === BlockState.Data) runs.push([start * perBlock, Math.min(count * perBlock, sectors - start * perBlock)]);
      else zeroed += count;
    });
    if (zeroed > 0) warnings.push(`layer ${id} has ${zeroed} zeroed block(s), which dm-cow cannot express: they read from below there`);
    const path = join(resolve(bitmapDir), `${id}.bitmap`);
    writeFileSync(path, buildDmCowBitmap(sectors, runs), { mode: 0o600 });
    bitmaps.push(path);
    parts.push(`${path} ${dataPath(id)} 0`);
  }
  return { line: parts.join(' '), bitmaps, warnings };
}
