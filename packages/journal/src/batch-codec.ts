/**
 * The batch frame: how one group-commit batch of records is laid out in one LevelDB value. Pure code,
 * no I/O, so it can be tested exhaustively.
 *
 * Payloads (write data) are not in the frame: a batch's payloads are appended contiguously to a
 * segment of the payload log (payload-log.ts), and the frame says where they start. Replaying
 * metadata never reads them, and retention drops them without rewriting frames. The frame holds, per
 * record, the payload's length and CRC32C, so a dropped payload still leaves the chain verifiable.
 *
 *   offset  size  field
 *   0       2     magic 0xC5 0x4A
 *   2       1     frame version (batchFrameVersion)
 *   3       1     flags: bit 0 = written by a synced batch (its payloads fdatasynced beside it)
 *   4       4     count: records in the frame (u32 LE)
 *   8       8     firstSeq (u32 LE high word, u32 LE low word)
 *   16      8     timeMs: commit time (f64 LE)
 *   24      8     payloadSegment: payload log segment holding the payloads (0: none)
 *   32      8     payloadOffset: where the first payload starts in it; the others follow in order
 *   40      4     prevChain: chained CRC of the record before firstSeq (u32 LE)
 *   44      4     regionBytes: length of the records region (u32 LE)
 *   48      R     records region: per record one msgpack value [payloadLength, payloadCrc, meta]
 *   48+R    4*n   chains: per record its chained CRC32C (u32 LE)
 *
 * Chaining: start = crc32c(frame[3..40), prevChain); chain[i] = crc32c(record i bytes, chain[i-1]).
 * Because CRC32C streams, crc32c(region, start) equals the last chain: one native call checks a whole
 * frame, and only a mismatch pays for the per-record walk that names the first bad seq.
 */
import { crc32c } from '@node-rs/crc32';
import { Packr } from 'msgpackr';
import { JournalCorruptionError } from './errors.js';
import { batchFrameVersion } from './limits.js';

export const frameHeaderBytes = 48;
const flagSynced = 0x01;
const magic0 = 0xc5;
const magic1 = 0x4a;

const packr = new Packr({ useRecords: false, moreTypes: false });

/** One record before it is framed: its encoded bytes are computed once, at append time. */
export interface EncodedRecord {
  readonly recordBytes: Buffer;
  readonly payloadLength: number;
  readonly payloadCrc: number;
}

export function encodeRecord(meta: unknown, payloadLength: number, payloadCrc: number): EncodedRecord {
  const recordBytes = packr.pack([payloadLength, payloadCrc, meta]);
  return { recordBytes, payloadLength, payloadCrc };
}

export interface EncodedFrame {
  readonly value: Buffer;
  readonly chains: Uint32Array;
}

/** Where a frame's payloads start in the payload log. */
export interface FramePayloads {
  readonly segment: number;
  readonly offset: number;
}

function writeU64(buf: Buffer, value: number, at: number): void {
  buf.writeUInt32LE(Math.floor(value / 0x1_0000_0000), at);
  buf.writeUInt32LE(value >>> 0, at + 4);
}

function readU64(buf: Buffer, at: number): number {
  return buf.readUInt32LE(at) * 0x1_0000_0000 + buf.readUInt32LE(at + 4);
}

export function encodeFrame(
  firstSeq: number,
  timeMs: number,
  prevChain: number,
  records: readonly EncodedRecord[],
  payloads: FramePayloads | undefined,
  synced: boolean,
): EncodedFrame {
  let regionBytes = 0;
  for (const r of records) regionBytes += r.recordBytes.length;
  const count = records.length;
  const value = Buffer.allocUnsafe(frameHeaderBytes + regionBytes + 4 * count);
  value[0] = magic0;
  value[1] = magic1;
  value[2] = batchFrameVersion;
  value[3] = synced ? flagSynced : 0;
  value.writeUInt32LE(count, 4);
  writeU64(value, firstSeq, 8);
  value.writeDoubleLE(timeMs, 16);
  writeU64(value, payloads?.segment ?? 0, 24);
  writeU64(value, payloads?.offset ?? 0, 32);
  value.writeUInt32LE(prevChain >>> 0, 40);
  value.writeUInt32LE(regionBytes, 44);
  const chains = new Uint32Array(count);
  let chain = crc32c(value.subarray(3, 40), prevChain);
  let at = frameHeaderBytes;
  for (let i = 0; i < count; i++) {
    const bytes = records[i].recordBytes;
    bytes.copy(value, at);
    at += bytes.length;
    chain = crc32c(bytes, chain);
    chains[i] = chain;
  }
  for (let i = 0; i < count; i++) {
    value.writeUInt32LE(chains[i], at);
    at += 4;
  }
  return { value, chains };
}

/** A decoded frame: records are decoded eagerly (one msgpack pass over the region). */
export interface DecodedFrame {
  readonly firstSeq: number;
  readonly count: number;
  readonly timeMs: number;
  /** Written by a synced batch. */
  readonly synced: boolean;
  readonly payloadSegment: number;
  readonly payloadOffset: number;
  readonly prevChain: number;
  readonly lastChain: number;
  /** Per record: [payloadLength, payloadCrc, meta]. */
  readonly records: ReadonlyArray<readonly [number, number, unknown]>;
  readonly chains: Uint32Array;
}

/**
 * Decode and verify one frame. `keySeq` is the seq its key names; it is used to name the damage
 * when the frame itself is unreadable. `expectPrev` (when known) is the chain of the previous record.
 * `fullCheck` also recomputes every per-record chain (the fast path checks the region in one call).
 */
export function decodeFrame(keySeq: number, value: Uint8Array, expectPrev: number | undefined, fullCheck: boolean): DecodedFrame {
  const buf = Buffer.isBuffer(value) ? value : Buffer.from(value.buffer, value.byteOffset, value.byteLength);
  if (buf.length < frameHeaderBytes) {
    throw new JournalCorruptionError(keySeq, 'decode', `frame is ${buf.length} bytes, shorter than its ${frameHeaderBytes}-byte header`, keySeq);
  }
  if (buf[0] !== magic0 || buf[1] !== magic1) {
    throw new JournalCorruptionError(keySeq, 'decode', `bad frame magic 0x${buf[0].toString(16)}${buf[1].toString(16)}`, keySeq);
  }
  if (buf[2] !== batchFrameVersion) {
    throw new JournalCorruptionError(keySeq, 'decode', `unknown frame version ${buf[2]}`, keySeq);
  }
  const count = buf.readUInt32LE(4);
  const firstSeq = readU64(buf, 8);
  const timeMs = buf.readDoubleLE(16);
  const payloadSegment = readU64(buf, 24);
  const payloadOffset = readU64(buf, 32);
  const prevChain = buf.readUInt32LE(40);
  const regionBytes = buf.readUInt32LE(44);
  if (firstSeq !== keySeq) {
    throw new JournalCorruptionError(keySeq, 'key', `key names seq ${keySeq} but the frame starts at seq ${firstSeq}`, keySeq);
  }
  if (count === 0 || frameHeaderBytes + regionBytes + 4 * count !== buf.length) {
    throw new JournalCorruptionError(keySeq, 'decode', `frame length ${buf.length} does not match ${count} records in a ${regionBytes}-byte region`, keySeq);
  }
  if (expectPrev !== undefined && expectPrev !== prevChain) {
    throw new JournalCorruptionError(keySeq, 'chain', `frame chains to CRC ${hex(prevChain)} but the record before it ends with CRC ${hex(expectPrev)}`, keySeq);
  }
  const chainsAt = frameHeaderBytes + regionBytes;
  const chains = new Uint32Array(count);
  for (let i = 0; i < count; i++) chains[i] = buf.readUInt32LE(chainsAt + 4 * i);
  const start = crc32c(buf.subarray(3, 40), prevChain);
  const region = buf.subarray(frameHeaderBytes, chainsAt);
  const records =
    !fullCheck && crc32c(region, start) === chains[count - 1]
      ? decodeVerifiedRegion(firstSeq, region)
      : walkRegion(firstSeq, region, start, chains);
  if (records.length !== count) {
    throw new JournalCorruptionError(firstSeq + Math.min(records.length, count - 1), 'decode', `frame says ${count} records but holds ${records.length}`, firstSeq);
  }
  for (let i = 0; i < count; i++) {
    const r = records[i];
    if (!Array.isArray(r) || r.length !== 3 || typeof r[0] !== 'number' || typeof r[1] !== 'number') {
      throw new JournalCorruptionError(firstSeq + i, 'decode', 'record is not [payloadLength, payloadCrc, meta]', firstSeq);
    }
  }
  return {
    firstSeq,
    count,
    timeMs,
    synced: (buf[3] & flagSynced) !== 0,
    payloadSegment,
    payloadOffset,
    prevChain,
    lastChain: chains[count - 1],
    records,
    chains,
  };
}

type RawRecord = [number, number, unknown];

/** Fast path: the region's CRC matched, decode it in one msgpack pass. */
function decodeVerifiedRegion(firstSeq: number, region: Buffer): RawRecord[] {
  try {
    return packr.unpackMultiple(region) as RawRecord[];
  } catch (cause) {
    throw new JournalCorruptionError(firstSeq, 'decode', `records region cannot be decoded: ${(cause as Error).message}`, firstSeq);
  }
}

/** Slow path: check every record's chained CRC in turn and name the first that fails. */
function walkRegion(firstSeq: number, region: Buffer, start: number, chains: Uint32Array): RawRecord[] {
  const records: RawRecord[] = [];
  let chain = start;
  try {
    packr.unpackMultiple(region, (value: unknown, from?: number, to?: number) => {
      const i = records.length;
      chain = crc32c(region.subarray(from ?? 0, to ?? 0), chain);
      if (i >= chains.length || chain !== chains[i]) {
        throw new JournalCorruptionError(firstSeq + i, 'crc', `stored CRC ${hex(chains[i] ?? 0)}, content gives ${hex(chain)}`, firstSeq);
      }
      records.push(value as RawRecord);
    });
  } catch (cause) {
    if (cause instanceof JournalCorruptionError) throw cause;
    throw new JournalCorruptionError(firstSeq + records.length, 'decode', `record cannot be decoded: ${(cause as Error).message}`, firstSeq);
  }
  if (records.length === chains.length && chain !== chains[chains.length - 1]) {
    throw new JournalCorruptionError(firstSeq + records.length - 1, 'crc', 'records region does not match its last chained CRC', firstSeq);
  }
  return records;
}

export function hex(n: number): string {
  return '0x' + (n >>> 0).toString(16).padStart(8, '0');
}
