/**
 * Frame codec of transmission requests: the fixed 28-byte header (magic, command flags, type, cookie,
 * offset, length); a WRITE's payload follows it on the wire and is taken by the caller. Pure, no I/O.
 *
 * Offsets are 64-bit on the wire and JavaScript numbers here: exact below 2^53 (devices are capped
 * there); a larger offset decodes to a number >= 2^53, which is past the end of every export, so the
 * range check rejects it without needing the exact value.
 */
import { assert } from './errors.js';
import { NBD_REQUEST_MAGIC, requestHeaderBytes } from './protocol-constants.js';

export interface RequestHeader {
  readonly magic: number;
  readonly flags: number;
  readonly type: number;
  readonly cookie: bigint;
  readonly offset: number;
  readonly length: number;
}

const twoTo32 = 4294967296;

export function decodeRequestHeader(bytes: Buffer, at = 0): RequestHeader {
  assert(bytes.length - at >= requestHeaderBytes, 'request header needs 28 bytes');
  return {
    magic: bytes.readUInt32BE(at),
    flags: bytes.readUInt16BE(at + 4),
    type: bytes.readUInt16BE(at + 6),
    cookie: bytes.readBigUInt64BE(at + 8),
    offset: bytes.readUInt32BE(at + 16) * twoTo32 + bytes.readUInt32BE(at + 20),
    length: bytes.readUInt32BE(at + 24),
  };
}

/** Client side, for tests and tools. `magic` defaults to NBD_REQUEST_MAGIC. */
export function encodeRequestHeader(request: Omit<RequestHeader, 'magic'> & { magic?: number }): Buffer {
  assert(Number.isSafeInteger(request.offset) && request.offset >= 0, `offset ${request.offset}`);
  const out = Buffer.allocUnsafe(requestHeaderBytes);
  out.writeUInt32BE((request.magic ?? NBD_REQUEST_MAGIC) >>> 0, 0);
  out.writeUInt16BE(request.flags, 4);
  out.writeUInt16BE(request.type, 6);
  out.writeBigUInt64BE(request.cookie, 8);
  out.writeUInt32BE(Math.floor(request.offset / twoTo32), 16);
  out.writeUInt32BE(request.offset % twoTo32, 20);
  out.writeUInt32BE(request.length, 24);
  return out;
}
