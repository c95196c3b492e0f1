/**
 * Frame codecs of the handshake phase: the server greeting, client flags, option headers and payloads,
 * and option replies. Pure functions over Buffers, no I/O. Decoders validate everything a client
 * controls and say what is wrong instead of throwing; encoders assert what the server controls. The
 * client-side encoders and reply decoders exist for tests and tools (and keep the codec honest through
 * round-trip properties).
 */
import { assert } from './errors.js';
import {
  NBD_INFO_BLOCK_SIZE,
  NBD_INFO_DESCRIPTION,
  NBD_INFO_EXPORT,
  NBD_INFO_NAME,
  NBD_MAGIC,
  NBD_OPTS_MAGIC,
  NBD_REP_MAGIC,
  exportNameReplyZeroesBytes,
  greetingBytes,
  maxStringBytes,
  optionHeaderBytes,
  optionReplyHeaderBytes,
} from './protocol-constants.js';

const utf8 = new TextDecoder('utf-8', { fatal: true });

// ---------------------------------------------------------------------------------------------
// strings

/** A protocol string: valid UTF-8, no NUL, at most 4096 bytes. Undefined when it is not one. */
export function decodeString(bytes: Buffer): string | undefined {
  if (bytes.length > maxStringBytes || bytes.includes(0)) return undefined;
  try {
    return utf8.decode(bytes);
  } catch {
    return undefined;
  }
}

/** Encodes a server-side string, cut at a character boundary to fit the spec's 4096 bytes. */
export function encodeString(text: string, maxBytes = maxStringBytes): Buffer {
  let bytes = Buffer.from(text.replace(/\0/g, ''), 'utf8');
  if (bytes.length > maxBytes) {
    let end = maxBytes;
    while (end > 0 && (bytes[end] & 0xc0) === 0x80) end--; // do not split a UTF-8 sequence
    bytes = bytes.subarray(0, end);
  }
  return bytes;
}

// ---------------------------------------------------------------------------------------------
// greeting, client flags, option header

export function encodeGreeting(handshakeFlags: number): Buffer {
  const out = Buffer.allocUnsafe(greetingBytes);
  out.writeBigUInt64BE(NBD_MAGIC, 0);
  out.writeBigUInt64BE(NBD_OPTS_MAGIC, 8);
  out.writeUInt16BE(handshakeFlags, 16);
  return out;
}

export interface Greeting {
  readonly nbdMagic: bigint;
  readonly secondMagic: bigint;
  /** Present for newstyle greetings only. */
  readonly handshakeFlags: number;
}

export function decodeGreeting(bytes: Buffer): Greeting {
  assert(bytes.length >= greetingBytes, 'greeting needs 18 bytes');
  return { nbdMagic: bytes.readBigUInt64BE(0), secondMagic: bytes.readBigUInt64BE(8), handshakeFlags: bytes.readUInt16BE(16) };
}

export function encodeClientFlags(flags: number): Buffer {
  const out = Buffer.allocUnsafe(4);
  out.writeUInt32BE(flags >>> 0, 0);
  return out;
}

export interface OptionHeader {
  /** False when the 8-byte magic is not IHAVEOPT (the client is not speaking newstyle). */
  readonly magicOk: boolean;
  readonly option: number;
  readonly length: number;
}

export function decodeOptionHeader(bytes: Buffer): OptionHeader {
  assert(bytes.length >= optionHeaderBytes, 'option header needs 16 bytes');
  return {
    magicOk: bytes.readBigUInt64BE(0) === NBD_OPTS_MAGIC,
    option: bytes.readUInt32BE(8),
    length: bytes.readUInt32BE(12),
  };
}

/** A whole client option (header + data): client side, for tests and tools. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.allocUnsafe(optionHeaderBytes + data.length);
  out.writeBigUInt64BE(NBD_OPTS_MAGIC, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(data.length, 12);
  data.copy(out, optionHeaderBytes);
  return out;
}

// ---------------------------------------------------------------------------------------------
// NBD_OPT_INFO / NBD_OPT_GO data

export interface InfoRequest {
  readonly name: string;
  /** NBD_INFO_* codes the client asked for, in order, duplicates kept as sent. */
  readonly infos: readonly number[];
}

export type Decoded<T> = { readonly ok: true; readonly value: T } | { readonly ok: false; readonly reason: string };

export function decodeInfoRequest(data: Buffer): Decoded<InfoRequest> {
  if (data.length < 6) return { ok: false, reason: `option data is ${data.length} bytes, at least 6 needed` };
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) return { ok: false, reason: `export name length ${nameLength} exceeds the option data` };
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 4 + nameLength + 2 + 2 * count) {
    return { ok: false, reason: `option data is ${data.length} bytes but the name and ${count} information requests take ${4 + nameLength + 2 + 2 * count}` };
  }
  const name = decodeString(data.subarray(4, 4 + nameLength));
  if (name === undefined) return { ok: false, reason: 'export name is not a valid string (too long, NUL or bad UTF-8)' };
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(4 + nameLength + 2 + 2 * i));
  return { ok: true, value: { name, infos } };
}

export function encodeInfoRequest(request: InfoRequest): Buffer {
  const name = Buffer.from(request.name, 'utf8');
  const out = Buffer.allocUnsafe(4 + name.length + 2 + 2 * request.infos.length);
  out.writeUInt32BE(name.length, 0);
  name.copy(out, 4);
  out.writeUInt16BE(request.infos.length, 4 + name.length);
  request.infos.forEach((info, i) => out.writeUInt16BE(info, 4 + name.length + 2 + 2 * i));
  return out;
}

// ---------------------------------------------------------------------------------------------
// NBD_OPT_LIST_META_CONTEXT / NBD_OPT_SET_META_CONTEXT data

export interface MetaContextRequest {
  readonly name: string;
  readonly queries: readonly string[];
}

export function decodeMetaContextRequest(data: Buffer): Decoded<MetaContextRequest> {
  if (data.length < 8) return { ok: false, reason: `option data is ${data.length} bytes, at least 8 needed` };
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return { ok: false, reason: `export name length ${nameLength} exceeds the option data` };
  const name = decodeString(data.subarray(4, 4 + nameLength));
  if (name === undefined) return { ok: false, reason: 'export name is not a valid string (too long, NUL or bad UTF-8)' };
  let at = 4 + nameLength;
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return { ok: false, reason: `query ${i} of ${count} lies past the option data` };
    const length = data.readUInt32BE(at);
    at += 4;
    if (length > data.length - at) return { ok: false, reason: `query ${i} length ${length} exceeds the option data` };
    const query = decodeString(data.subarray(at, at + length));
    if (query === undefined) return { ok: false, reason: `query ${i} is not a valid string (too long, NUL or bad UTF-8)` };
    queries.push(query);
    at += length;
  }
  if (at !== data.length) return { ok: false, reason: `${data.length - at} bytes after the last query` };
  return { ok: true, value: { name, queries } };
}

export function encodeMetaContextRequest(request: MetaContextRequest): Buffer {
  const name = Buffer.from(request.name, 'utf8');
  const queries = request.queries.map((q) => Buffer.from(q, 'utf8'));
  const out = Buffer.allocUnsafe(8 + name.length + queries.reduce((n, q) => n + 4 + q.length, 0));
  out.writeUInt32BE(name.length, 0);
  name.copy(out, 4);
  let at = 4 + name.length;
  out.writeUInt32BE(queries.length, at);
  at += 4;
  for (const q of queries) {
    out.writeUInt32BE(q.length, at);
    q.copy(out, at + 4);
    at += 4 + q.length;
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// option replies

export function encodeOptionReply(option: number, reply: number, payload: Buffer = Buffer.alloc(0)): Buffer {
  const out = Buffer.allocUnsafe(optionReplyHeaderBytes + payload.length);
  out.writeBigUInt64BE(NBD_REP_MAGIC, 0);
  out.writeUInt32BE(option >>> 0, 8);
  out.writeUInt32BE(reply >>> 0, 12);
  out.writeUInt32BE(payload.length, 16);
  payload.copy(out, optionReplyHeaderBytes);
  return out;
}

/** An error reply carrying a human-readable message (the spec allows a string on every error). */
export function encodeOptionError(option: number, reply: number, message: string): Buffer {
  return encodeOptionReply(option, reply, encodeString(message));
}

export interface OptionReply {
  readonly magicOk: boolean;
  readonly option: number;
  readonly reply: number;
  readonly payload: Buffer;
}

/** Decodes one option reply from the front of `bytes`; undefined when it is not all there yet. */
export function decodeOptionReply(bytes: Buffer): { reply: OptionReply; bytes: number } | undefined {
  if (bytes.length < optionReplyHeaderBytes) return undefined;
  const length = bytes.readUInt32BE(16);
  if (bytes.length < optionReplyHeaderBytes + length) return undefined;
  return {
    reply: {
      magicOk: bytes.readBigUInt64BE(0) === NBD_REP_MAGIC,
      option: bytes.readUInt32BE(8),
      reply: bytes.readUInt32BE(12),
      payload: bytes.subarray(optionReplyHeaderBytes, optionReplyHeaderBytes + length),
    },
    bytes: optionReplyHeaderBytes + length,
  };
}

/** NBD_REP_SERVER payload: name length, name, description. */
export function encodeServerPayload(name: string, description: string): Buffer {
  const nameBytes = encodeString(name);
  const descriptionBytes = encodeString(description);
  const out = Buffer.allocUnsafe(4 + nameBytes.length + descriptionBytes.length);
  out.writeUInt32BE(nameBytes.length, 0);
  nameBytes.copy(out, 4);
  descriptionBytes.copy(out, 4 + nameBytes.length);
  return out;
}

export function decodeServerPayload(payload: Buffer): { name: string; description: string } | undefined {
  if (payload.length < 4) return undefined;
  const length = payload.readUInt32BE(0);
  if (length > payload.length - 4) return undefined;
  return { name: payload.toString('utf8', 4, 4 + length), description: payload.toString('utf8', 4 + length) };
}

/** NBD_REP_INFO payload of type NBD_INFO_EXPORT. */
export function encodeInfoExport(sizeBytes: number, transmissionFlags: number): Buffer {
  assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0, `export size ${sizeBytes}`);
  const out = Buffer.allocUnsafe(12);
  out.writeUInt16BE(NBD_INFO_EXPORT, 0);
  out.writeBigUInt64BE(BigInt(sizeBytes), 2);
  out.writeUInt16BE(transmissionFlags, 10);
  return out;
}

/** NBD_REP_INFO payload of type NBD_INFO_NAME or NBD_INFO_DESCRIPTION. */
export function encodeInfoString(info: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION, text: string): Buffer {
  const bytes = encodeString(text);
  const out = Buffer.allocUnsafe(2 + bytes.length);
  out.writeUInt16BE(info, 0);
  bytes.copy(out, 2);
  return out;
}

export interface BlockSizes {
  readonly minimumBytes: number;
  readonly preferredBytes: number;
  readonly maximumBytes: number;
}

/** NBD_REP_INFO payload of type NBD_INFO_BLOCK_SIZE. */
export function encodeInfoBlockSize(sizes: BlockSizes): Buffer {
  const out = Buffer.allocUnsafe(14);
  out.writeUInt16BE(NBD_INFO_BLOCK_SIZE, 0);
  out.writeUInt32BE(sizes.minimumBytes, 2);
  out.writeUInt32BE(sizes.preferredBytes, 6);
  out.writeUInt32BE(sizes.maximumBytes, 10);
  return out;
}

export type Info =
  | { readonly type: typeof NBD_INFO_EXPORT; readonly sizeBytes: number; readonly transmissionFlags: number }
  | { readonly type: typeof NBD_INFO_NAME | typeof NBD_INFO_DESCRIPTION; readonly text: string }
  | ({ readonly type: typeof NBD_INFO_BLOCK_SIZE } & BlockSizes)
  | { readonly type: number; readonly raw: Buffer };

export function decodeInfo(payload: Buffer): Info | undefined {
  if (payload.length < 2) return undefined;
  const type = payload.readUInt16BE(0);
  switch (type) {
    case NBD_INFO_EXPORT:
      if (payload.length !== 12) return undefined;
      return { type, sizeBytes: Number(payload.readBigUInt64BE(2)), transmissionFlags: payload.readUInt16BE(10) };
    case NBD_INFO_NAME:
    case NBD_INFO_DESCRIPTION:
      return { type, text: payload.toString('utf8', 2) };
    case NBD_INFO_BLOCK_SIZE:
      if (payload.length !== 14) return undefined;
      return { type, minimumBytes: payload.readUInt32BE(2), preferredBytes: payload.readUInt32BE(6), maximumBytes: payload.readUInt32BE(10) };
    default:
      return { type, raw: payload.subarray(2) };
  }
}

/** NBD_REP_META_CONTEXT payload. */
export function encodeMetaContext(id: number, name: string): Buffer {
  const nameBytes = encodeString(name);
  const out = Buffer.allocUnsafe(4 + nameBytes.length);
  out.writeUInt32BE(id >>> 0, 0);
  nameBytes.copy(out, 4);
  return out;
}

export function decodeMetaContext(payload: Buffer): { id: number; name: string } | undefined {
  if (payload.length < 4) return undefined;
  return { id: payload.readUInt32BE(0), name: payload.toString('utf8', 4) };
}

/** The reply to NBD_OPT_EXPORT_NAME: size, transmission flags, and 124 zeroes unless NO_ZEROES. */
export function encodeExportNameReply(sizeBytes: number, transmissionFlags: number, noZeroes: boolean): Buffer {
  assert(Number.isSafeInteger(sizeBytes) && sizeBytes >= 0, `export size ${sizeBytes}`);
  const out = Buffer.alloc(10 + (noZeroes ? 0 : exportNameReplyZeroesBytes));
  out.writeBigUInt64BE(BigInt(sizeBytes), 0);
  out.writeUInt16BE(transmissionFlags, 8);
  return out;
}
