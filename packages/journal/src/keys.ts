/**
 * Key spaces inside the one LevelDB database. Each key starts with a one-byte prefix; record and
 * checkpoint keys end in a big-endian u64 sequence number so LevelDB's byte order is seq order.
 *
 *   'r' + u64be(firstSeq)  one group-commit batch frame (see batch-codec.ts)
 *   'c' + u64be(seq)       one checkpoint (see checkpoint-codec.ts)
 *   'm' + utf8(name)       journal metadata: format version, retention window, durable seq,
 *                          user metadata
 *
 * Payloads live outside LevelDB, in the payload log (payload-log.ts).
 */

export const recordPrefix = 0x72; // 'r'
export const checkpointPrefix = 0x63; // 'c'
export const metaPrefix = 0x6d; // 'm'

function seqKey(prefix: number, seq: number): Buffer {
  const key = Buffer.allocUnsafe(9);
  key[0] = prefix;
  key.writeUInt32BE(Math.floor(seq / 0x1_0000_0000), 1);
  key.writeUInt32BE(seq >>> 0, 5);
  return key;
}

function keySeq(key: Uint8Array): number {
  const view = Buffer.from(key.buffer, key.byteOffset, key.byteLength);
  return view.readUInt32BE(1) * 0x1_0000_0000 + view.readUInt32BE(5);
}

export const recordKey = (seq: number): Buffer => seqKey(recordPrefix, seq);
export const checkpointKey = (seq: number): Buffer => seqKey(checkpointPrefix, seq);
export const metaKey = (name: string): Buffer => Buffer.concat([Buffer.of(metaPrefix), Buffer.from(name, 'utf8')]);
export const seqOfKey = keySeq;

/** Lower and upper bounds that cover one whole key space. */
export const recordRange = { gte: seqKey(recordPrefix, 0), lt: Buffer.of(recordPrefix + 1) };
export const checkpointRange = { gte: seqKey(checkpointPrefix, 0), lt: Buffer.of(checkpointPrefix + 1) };
export const metaRange = { gte: Buffer.of(metaPrefix), lt: Buffer.of(metaPrefix + 1) };
