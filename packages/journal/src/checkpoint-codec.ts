/**
 * Checkpoint values: an opaque blob (the caller's projection) framed with the seq it reflects, the
 * time it was taken and a CRC32C of the blob, so a damaged checkpoint is refused, never loaded.
 *
 *   0  2  magic 0xC5 0x43       4  4  crc32c(blob) (u32 LE)     16  8  seq (u32 LE high, u32 LE low)
 *   2  1  version               8  8  timeMs (f64 LE)           24  -  blob
 *   3  1  flags (0)
 */
import { crc32c } from '@node-rs/crc32';
import { JournalCorruptionError } from './errors.js';

const headerBytes = 24;
const version = 1;

export interface Checkpoint {
  readonly seq: number;
  readonly timeMs: number;
  readonly blob: Buffer;
}

export function encodeCheckpoint(seq: number, timeMs: number, blob: Uint8Array): Buffer {
  const value = Buffer.allocUnsafe(headerBytes + blob.length);
  value[0] = 0xc5;
  value[1] = 0x43;
  value[2] = version;
  value[3] = 0;
  value.writeUInt32LE(crc32c(Buffer.from(blob.buffer, blob.byteOffset, blob.byteLength)), 4);
  value.writeDoubleLE(timeMs, 8);
  value.writeUInt32LE(Math.floor(seq / 0x1_0000_0000), 16);
  value.writeUInt32LE(seq >>> 0, 20);
  value.set(blob, headerBytes);
  return value;
}

export function decodeCheckpoint(keySeq: number, value: Buffer): Checkpoint {
  if (value.length < headerBytes || value[0] !== 0xc5 || value[1] !== 0x43 || value[2] !== version) {
    throw new JournalCorruptionError(keySeq, 'checkpoint', 'checkpoint header is unreadable');
  }
  const seq = value.readUInt32LE(16) * 0x1_0000_0000 + value.readUInt32LE(20);
  if (seq !== keySeq) throw new JournalCorruptionError(keySeq, 'checkpoint', `checkpoint key names seq ${keySeq} but it holds seq ${seq}`);
  const blob = value.subarray(headerBytes);
  if (crc32c(blob) !== value.readUInt32LE(4)) throw new JournalCorruptionError(keySeq, 'checkpoint', 'checkpoint blob fails its CRC32C');
  return { seq, timeMs: value.readDoubleLE(8), blob };
}
