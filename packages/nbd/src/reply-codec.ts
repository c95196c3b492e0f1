/**
 * Frame codecs of transmission replies: simple replies and structured reply chunks (OFFSET_DATA,
 * OFFSET_HOLE, BLOCK_STATUS, ERROR, NONE). Pure, no I/O. Encoders return only headers for data chunks
 * so the caller can hand header and payload to the socket side by side without copying the payload.
 * Decoders are for tests and tools; a client needs its own state to know whether a simple reply
 * carries data, so `decodeSimpleReplyHeader` returns only the header.
 */
import { assert } from './errors.js';
import {
  NBD_REPLY_FLAG_DONE,
  NBD_REPLY_TYPE_BLOCK_STATUS,
  NBD_REPLY_TYPE_ERROR,
  NBD_REPLY_TYPE_NONE,
  NBD_REPLY_TYPE_OFFSET_DATA,
  NBD_REPLY_TYPE_OFFSET_HOLE,
  NBD_SIMPLE_REPLY_MAGIC,
  NBD_STRUCTURED_REPLY_MAGIC,
  simpleReplyHeaderBytes,
  structuredReplyHeaderBytes,
} from './protocol-constants.js';
import { encodeString } from './option-codec.js';

const twoTo32 = 4294967296;

function writeUint64(out: Buffer, value: number, at: number): void {
  out.writeUInt32BE(Math.floor(value / twoTo32), at);
  out.writeUInt32BE(value % twoTo32, at + 4);
}

// ---------------------------------------------------------------------------------------------
// encoders (server side)

export function encodeSimpleReply(cookie: bigint, errno: number): Buffer {
  const out = Buffer.allocUnsafe(simpleReplyHeaderBytes);
  out.writeUInt32BE(NBD_SIMPLE_REPLY_MAGIC, 0);
  out.writeUInt32BE(errno, 4);
  out.writeBigUInt64BE(cookie, 8);
  return out;
}

function writeChunkHeader(out: Buffer, flags: number, type: number, cookie: bigint, length: number): void {
  out.writeUInt32BE(NBD_STRUCTURED_REPLY_MAGIC, 0);
  out.writeUInt16BE(flags, 4);
  out.writeUInt16BE(type, 6);
  out.writeBigUInt64BE(cookie, 8);
  out.writeUInt32BE(length, 16);
}

/** NBD_REPLY_TYPE_NONE; always final. */
export function encodeNoneChunk(cookie: bigint): Buffer {
  const out = Buffer.allocUnsafe(structuredReplyHeaderBytes);
  writeChunkHeader(out, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, cookie, 0);
  return out;
}

/** Header (28 bytes) of an NBD_REPLY_TYPE_OFFSET_DATA chunk; `dataLength` payload bytes follow. */
export function encodeOffsetDataHeader(flags: number, cookie: bigint, offset: number, dataLength: number): Buffer {
  assert(dataLength >= 1 && dataLength <= 0xffffffff - 8, `OFFSET_DATA length ${dataLength}`);
  const out = Buffer.allocUnsafe(structuredReplyHeaderBytes + 8);
  writeChunkHeader(out, flags, NBD_REPLY_TYPE_OFFSET_DATA, cookie, 8 + dataLength);
  writeUint64(out, offset, 20);
  return out;
}

/** A whole NBD_REPLY_TYPE_OFFSET_HOLE chunk (32 bytes). */
export function encodeOffsetHole(flags: number, cookie: bigint, offset: number, holeLength: number): Buffer {
  assert(holeLength >= 1 && holeLength <= 0xffffffff, `OFFSET_HOLE length ${holeLength}`);
  const out = Buffer.allocUnsafe(structuredReplyHeaderBytes + 12);
  writeChunkHeader(out, flags, NBD_REPLY_TYPE_OFFSET_HOLE, cookie, 12);
  writeUint64(out, offset, 20);
  out.writeUInt32BE(holeLength, 28);
  return out;
}

export interface BlockDescriptor {
  readonly length: number;
  readonly status: number;
}

/** A whole NBD_REPLY_TYPE_BLOCK_STATUS chunk for one metadata context. */
export function encodeBlockStatusChunk(flags: number, cookie: bigint, contextId: number, descriptors: readonly BlockDescriptor[]): Buffer {
  assert(descriptors.length >= 1, 'a block status chunk needs at least one descriptor');
  const payload = 4 + 8 * descriptors.length;
  const out = Buffer.allocUnsafe(structuredReplyHeaderBytes + payload);
  writeChunkHeader(out, flags, NBD_REPLY_TYPE_BLOCK_STATUS, cookie, payload);
  out.writeUInt32BE(contextId, 20);
  let at = 24;
  for (const d of descriptors) {
    assert(d.length >= 1 && d.length <= 0xffffffff, `descriptor length ${d.length}`);
    out.writeUInt32BE(d.length, at);
    out.writeUInt32BE(d.status >>> 0, at + 4);
    at += 8;
  }
  return out;
}

/** A whole NBD_REPLY_TYPE_ERROR chunk with a human-readable message. */
export function encodeErrorChunk(flags: number, cookie: bigint, errno: number, message: string): Buffer {
  assert(errno !== 0, 'an error chunk needs a nonzero errno');
  const text = encodeString(message);
  const payload = 6 + text.length;
  const out = Buffer.allocUnsafe(structuredReplyHeaderBytes + payload);
  writeChunkHeader(out, flags, NBD_REPLY_TYPE_ERROR, cookie, payload);
  out.writeUInt32BE(errno, 20);
  out.writeUInt16BE(text.length, 24);
  text.copy(out, 26);
  return out;
}

// ---------------------------------------------------------------------------------------------
// decoders (client side, for tests and tools)

export interface SimpleReplyHeader {
  readonly magic: number;
  readonly errno: number;
  readonly cookie: bigint;
}

export function decodeSimpleReplyHeader(bytes: Buffer): SimpleReplyHeader {
  assert(bytes.length >= simpleReplyHeaderBytes, 'simple reply needs 16 bytes');
  return { magic: bytes.readUInt32BE(0), errno: bytes.readUInt32BE(4), cookie: bytes.readBigUInt64BE(8) };
}

export interface Chunk {
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly payload: Buffer;
}

/** One structured chunk from the front of `bytes`; undefined when it is not all there yet. */
export function decodeChunk(bytes: Buffer): { chunk: Chunk; bytes: number } | undefined {
  if (bytes.length < structuredReplyHeaderBytes) return undefined;
  assert(bytes.readUInt32BE(0) === NBD_STRUCTURED_REPLY_MAGIC, 'not a structured reply chunk');
  const length = bytes.readUInt32BE(16);
  if (bytes.length < structuredReplyHeaderBytes + length) return undefined;
  return {
    chunk: {
      flags: bytes.readUInt16BE(4),
      type: bytes.readUInt16BE(6),
      cookie: bytes.readBigUInt64BE(8),
      payload: bytes.subarray(structuredReplyHeaderBytes, structuredReplyHeaderBytes + length),
    },
    bytes: structuredReplyHeaderBytes + length,
  };
}

function readUint64(bytes: Buffer, at: number): number {
  return bytes.readUInt32BE(at) * twoTo32 + bytes.readUInt32BE(at + 4);
}

export function decodeOffsetData(payload: Buffer): { offset: number; data: Buffer } {
  assert(payload.length >= 9, 'OFFSET_DATA payload needs at least 9 bytes');
  return { offset: readUint64(payload, 0), data: payload.subarray(8) };
}

export function decodeOffsetHole(payload: Buffer): { offset: number; length: number } {
  assert(payload.length === 12, 'OFFSET_HOLE payload is 12 bytes');
  return { offset: readUint64(payload, 0), length: payload.readUInt32BE(8) };
}

export function decodeBlockStatus(payload: Buffer): { contextId: number; descriptors: BlockDescriptor[] } {
  assert(payload.length >= 12 && (payload.length - 4) % 8 === 0, 'BLOCK_STATUS payload is 4 + 8n bytes');
  const descriptors: BlockDescriptor[] = [];
  for (let at = 4; at < payload.length; at += 8) descriptors.push({ length: payload.readUInt32BE(at), status: payload.readUInt32BE(at + 4) });
  return { contextId: payload.readUInt32BE(0), descriptors };
}

export function decodeErrorChunk(payload: Buffer): { errno: number; message: string } {
  assert(payload.length >= 6, 'ERROR payload needs at least 6 bytes');
  const length = payload.readUInt16BE(4);
  assert(length <= payload.length - 6, 'ERROR message length exceeds the payload');
  return { errno: payload.readUInt32BE(0), message: payload.toString('utf8', 6, 6 + length) };
}
