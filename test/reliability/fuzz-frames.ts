/**
 * Fuzz sessions for the NBD server: fast-check generators over the frame codecs of @cowstack/nbd,
 * plus byte-level mutation of the frames they produce. Pure: no sockets here (fuzz-client.ts sends,
 * fuzz-oracle.ts judges).
 *
 * A session is what one client connection sends, frame by frame:
 * - `handshake`: client flags, then up to 40 options of every kind (well-formed, with random fields,
 *   unknown, oversized, past the option budget), sometimes ending with ABORT.
 * - `transmission`: client flags and a mostly well-formed prefix (STRUCTURED_REPLY,
 *   SET_META_CONTEXT, INFO, then GO or EXPORT_NAME to a fuzz export), then 20 to 250 requests with
 *   random types, flags, cookies, offsets and lengths biased to the edges (0, the export size, 2^32-1,
 *   the maximum payload, 2^63, ...), WRITE payloads that sometimes lie about their length, and
 *   sometimes NBD_CMD_DISC.
 *
 * Every frame is first encoded well-formed with the server's own codecs (optionCodec,
 * requestCodec), then, with a per-session probability, mutated: bit flips, interesting byte and
 * 16/32-bit field values (length fields above all), truncation, duplication, splicing with another
 * frame, insertion and deletion. A session may also be cut short, written in many small pieces, or
 * abandoned with a reset in the middle. Sessions are generated from a seed and an index, so any one
 * can be regenerated to reproduce a failure.
 */
import fc from 'fast-check';
import { optionCodec, protocol, requestCodec } from '@cowstack/nbd';
import { pattern } from '../harness.js';

export interface FuzzExport {
  readonly name: string;
  readonly sizeBytes: number;
  readonly readOnly: boolean;
}

/** What the generators may aim at. The victim exports are never named here. */
export interface FuzzTargets {
  /** Exports sessions may enter transmission on (fuzz volumes and snapshots). */
  readonly exports: readonly FuzzExport[];
  /** Other names that exist (only handshake options name them: LIST, INFO, META_CONTEXT). */
  readonly volumesForPointInTime: readonly string[];
  /** Relative weight of point-in-time names (VOLUME@seq:N, VOLUME@time:T) among export names. */
  readonly pointInTimeWeight: number;
}

export interface FuzzFrame {
  readonly bytes: Buffer;
  /** Changed at the byte level after encoding (the "mutated frames" of the report). */
  readonly mutated: boolean;
  /** A WRITE payload: part of the frame before it, not counted as a frame. */
  readonly payload: boolean;
}

export interface FuzzSession {
  readonly kind: 'handshake' | 'transmission';
  readonly frames: readonly FuzzFrame[];
  /** The whole stream, frames concatenated (after session-level cuts). */
  readonly stream: Buffer;
  /** Written in these many pieces, each on its own turn of the event loop (1 = one write). */
  readonly pieces: number;
  /** `reset`: the client sends `resetAfter` bytes and then destroys the socket without a FIN. */
  readonly ending: 'end' | 'reset';
  readonly resetAfter: number;
  readonly transport: 'unix' | 'tcp';
}

// ---------------------------------------------------------------------------------------------
// field values

const twoTo32 = 4294967296;
const u16 = fc.integer({ min: 0, max: 0xffff });
/** A uniform choice in [0, max] (fast-check biases plain integers towards small values). */
const choice = (max: number): fc.Arbitrary<number> => fc.noBias(fc.nat({ max }));
/** True with probability p. */
const chance = (p: number): fc.Arbitrary<boolean> => choice(9999).map((n) => n < p * 10000);
/** Uniform in [0, 1] (fc.double is uniform over representations, so mostly tiny). */
const fraction = choice(1_000_000).map((n) => n / 1_000_000);
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const u64 = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });

const interesting32 = [
  0, 1, 2, 3, 7, 8, 16, 511, 512, 513, 4095, 4096, 4097, 65535, 65536, 65537, 1 << 20, (1 << 20) + 1, 32 << 20, (32 << 20) + 1, 64 << 20, (64 << 20) + 1, 0x7fffffff,
  0x80000000, 0xfffffffe, 0xffffffff,
];
const interesting16 = [0, 1, 2, 3, 7, 8, 0x10, 0x1f, 0x20, 0x7fff, 0x8000, 0x8001, 0xffff];
const interesting8 = [0x00, 0x01, 0x7f, 0x80, 0xfe, 0xff];

/** A 32-bit number, biased to the boundaries. */
const any32 = fc.oneof({ arbitrary: fc.constantFrom(...interesting32), weight: 3 }, { arbitrary: u32, weight: 1 });

// ---------------------------------------------------------------------------------------------
// mutations

type Mutation =
  | { readonly op: 'bitflip'; readonly at: number; readonly bit: number }
  | { readonly op: 'byte'; readonly at: number; readonly value: number }
  | { readonly op: 'field16'; readonly at: number; readonly value: number }
  | { readonly op: 'field32'; readonly at: number; readonly value: number }
  | { readonly op: 'magic'; readonly at: number; readonly bit: number }
  | { readonly op: 'truncate'; readonly at: number }
  | { readonly op: 'duplicate' }
  | { readonly op: 'splice'; readonly other: number; readonly at: number; readonly from: number }
  | { readonly op: 'insert'; readonly at: number; readonly bytes: readonly number[] }
  | { readonly op: 'delete'; readonly at: number; readonly length: number };

const position = fc.noBias(fc.nat({ max: 1 << 20 }));

/**
 * Field mutations change values but keep the frame's length and magic, so the server keeps parsing
 * the stream (unless a length field now claims a different payload: length-field corruption).
 */
const fieldMutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('bitflip' as const), at: position, bit: choice(7) }), weight: 5 },
  { arbitrary: fc.record({ op: fc.constant('byte' as const), at: position, value: fc.constantFrom(...interesting8) }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('field16' as const), at: position, value: fc.oneof(fc.constantFrom(...interesting16), u16) }), weight: 4 },
  // length-field corruption: option length (offset 12), request length (24), offsets (16, 20)
  { arbitrary: fc.record({ op: fc.constant('field32' as const), at: position, value: any32 }), weight: 6 },
);

/** Structural mutations break the framing: what follows is read from the wrong place. */
const structuralMutationArb: fc.Arbitrary<Mutation> = fc.oneof(
  { arbitrary: fc.record({ op: fc.constant('magic' as const), at: position, bit: choice(7) }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('truncate' as const), at: position }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('duplicate' as const) }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('splice' as const), other: choice(1 << 16), at: position, from: position }), weight: 2 },
  { arbitrary: fc.record({ op: fc.constant('insert' as const), at: position, bytes: fc.array(fc.nat({ max: 255 }), { minLength: 1, maxLength: 8 }) }), weight: 1 },
  { arbitrary: fc.record({ op: fc.constant('delete' as const), at: position, length: fc.integer({ min: 1, max: 8 }) }), weight: 1 },
);

type FrameKind = 'flags' | 'option' | 'request' | 'payload';

/** Bytes of magic at the start of a frame of this kind. */
function magicBytes(kind: FrameKind): number {
  return kind === 'request' ? 4 : kind === 'option' ? 8 : 0;
}

/** Field positions worth corrupting in a frame of this kind (the length fields first). */
function fieldOffsets32(kind: FrameKind, length: number): number[] {
  if (kind === 'request') return [24, 16, 20, 8, 12].filter((at) => at + 4 <= length);
  if (kind === 'option') return [12, 8, 16, 20].filter((at) => at + 4 <= length);
  return length >= 4 ? [0] : [];
}

function fieldOffsets16(kind: FrameKind, length: number): number[] {
  if (kind === 'request') return [4, 6].filter((at) => at + 2 <= length);
  if (kind === 'option') return [14, 10, 16, 20].filter((at) => at + 2 <= length);
  return length >= 2 ? [0, 2] : [];
}

interface PlannedFrame {
  readonly kind: FrameKind;
  readonly bytes: Buffer;
  readonly mutations: readonly Mutation[];
}

/** Applies a frame's mutations; `others` are the session's frames (for splicing). */
function mutate(frame: PlannedFrame, others: readonly PlannedFrame[]): Buffer[] {
  let bytes = Buffer.from(frame.bytes);
  let copies = 1;
  const skip = magicBytes(frame.kind);
  for (const m of frame.mutations) {
    const n = bytes.length;
    switch (m.op) {
      case 'bitflip':
        if (n > skip) bytes[skip + (m.at % (n - skip))] ^= 1 << m.bit;
        break;
      case 'byte':
        if (n > skip) bytes[skip + (m.at % (n - skip))] = m.value;
        break;
      case 'magic':
        if (n > 0) bytes[m.at % Math.max(1, Math.min(n, skip))] ^= 1 << m.bit;
        break;
      case 'field16': {
        const fields = fieldOffsets16(frame.kind, n);
        if (fields.length > 0) bytes.writeUInt16BE(m.value, fields[m.at % fields.length]);
        break;
      }
      case 'field32': {
        const fields = fieldOffsets32(frame.kind, n);
        if (fields.length > 0) bytes.writeUInt32BE(m.value >>> 0, fields[m.at % fields.length]);
        break;
      }
      case 'truncate':
        bytes = bytes.subarray(0, n === 0 ? 0 : m.at % n);
        break;
      case 'duplicate':
        copies = 2;
        break;
      case 'splice': {
        const other = others[m.other % others.length].bytes;
        const cut = n === 0 ? 0 : m.at % (n + 1);
        const from = other.length === 0 ? 0 : m.from % other.length;
        bytes = Buffer.concat([bytes.subarray(0, cut), other.subarray(from)]);
        break;
      }
      case 'insert': {
        const at = m.at % (n + 1);
        bytes = Buffer.concat([bytes.subarray(0, at), Buffer.from(m.bytes), bytes.subarray(at)]);
        break;
      }
      case 'delete': {
        const at = n === 0 ? 0 : m.at % n;
        bytes = Buffer.concat([bytes.subarray(0, at), bytes.subarray(at + m.length)]);
        break;
      }
    }
  }
  return copies === 2 ? [bytes, Buffer.from(bytes)] : [bytes];
}

// ---------------------------------------------------------------------------------------------
// handshake frames

const P = protocol;

function bytesOf(text: string): Buffer {
  return Buffer.from(text, 'utf8');
}

/** Export names as raw bytes: real ones, point-in-time ones, and broken strings. */
function exportNameArb(targets: FuzzTargets): fc.Arbitrary<Buffer> {
  const names = [...targets.exports.map((e) => e.name), ''];
  const pit = targets.volumesForPointInTime;
  const arbs: fc.WeightedArbitrary<Buffer>[] = [
    { arbitrary: fc.constantFrom(...names).map(bytesOf), weight: 20 },
    { arbitrary: fc.constantFrom('nope', 'fuzz@nope', '@', 'fuzz@', '#1', 'fuzz@seq:', 'default@time:').map(bytesOf), weight: 2 },
    { arbitrary: fc.string({ maxLength: 24 }).map(bytesOf), weight: 2 },
    { arbitrary: fc.constantFrom(4095, 4096, 4097).map((n) => Buffer.alloc(n, 0x61)), weight: 1 },
    { arbitrary: fc.constantFrom(Buffer.from('fuzz\0'), Buffer.from([0xff, 0xfe, 0x41]), Buffer.from([0xc3]), Buffer.from([0xed, 0xa0, 0x80])), weight: 1 },
  ];
  if (pit.length > 0 && targets.pointInTimeWeight > 0) {
    const point = fc.oneof(
      fc.nat({ max: 2000 }).map((n) => `seq:${n}`),
      fc.constantFrom('seq:99999999999', 'seq:x', 'time:2020-01-01T00:00:00Z', 'time:2999-01-01T00:00:00Z', 'time:garbage', 'seq:-1'),
    );
    arbs.push({ arbitrary: fc.tuple(fc.constantFrom(...pit), point).map(([v, p]) => bytesOf(`${v}@${p}`)), weight: targets.pointInTimeWeight });
  }
  return fc.oneof(...arbs);
}

const contextQueryArb: fc.Arbitrary<Buffer> = fc.oneof(
  { arbitrary: fc.constantFrom('base:allocation', 'qemu:allocation-depth').map(bytesOf), weight: 10 },
  { arbitrary: fc.constantFrom('base:', 'qemu:', '', 'base:allocation:', 'x-other:thing', 'qemu:dirty-bitmap:', 'qemu:dirty-bitmap:ro').map(bytesOf), weight: 3 },
  {
    arbitrary: fc
      .constantFrom('seq:0', 'seq:1', 'seq:99999999999', 'seq:x', 'time:2000-01-01T00:00:00Z', 'time:2999-01-01T00:00:00Z', 'time:garbage', 'nope', 'ro@x')
      .map((point) => bytesOf(`qemu:dirty-bitmap:${point}`)),
    weight: 2,
  },
  { arbitrary: fc.string({ maxLength: 30 }).map(bytesOf), weight: 1 },
  { arbitrary: fc.constantFrom(Buffer.from('base:allocation\0'), Buffer.from([0xff]), Buffer.alloc(4097, 0x62)), weight: 1 },
);

function infoRequestBytes(name: Buffer, infos: readonly number[]): Buffer {
  const out = Buffer.alloc(4 + name.length + 2 + 2 * infos.length);
  out.writeUInt32BE(name.length, 0);
  name.copy(out, 4);
  out.writeUInt16BE(infos.length, 4 + name.length);
  infos.forEach((info, i) => out.writeUInt16BE(info, 4 + name.length + 2 + 2 * i));
  return out;
}

function metaRequestBytes(name: Buffer, queries: readonly Buffer[]): Buffer {
  const parts = [Buffer.alloc(4), name, Buffer.alloc(4)];
  parts[0].writeUInt32BE(name.length, 0);
  parts[2].writeUInt32BE(queries.length, 0);
  for (const q of queries) {
    const len = Buffer.alloc(4);
    len.writeUInt32BE(q.length, 0);
    parts.push(len, q);
  }
  return Buffer.concat(parts);
}

/** Well-formed through the codec when the name is a string the codec can carry, else by hand. */
function infoData(name: Buffer, infos: readonly number[]): Buffer {
  const text = name.toString('utf8');
  if (Buffer.from(text, 'utf8').equals(name)) return optionCodec.encodeInfoRequest({ name: text, infos });
  return infoRequestBytes(name, infos);
}

function metaData(name: Buffer, queries: readonly Buffer[]): Buffer {
  const text = name.toString('utf8');
  const texts = queries.map((q) => q.toString('utf8'));
  if (Buffer.from(text, 'utf8').equals(name) && texts.every((t, i) => Buffer.from(t, 'utf8').equals(queries[i]))) {
    return optionCodec.encodeMetaContextRequest({ name: text, queries: texts });
  }
  return metaRequestBytes(name, queries);
}

const infoCodes = fc.array(fc.oneof({ arbitrary: fc.constantFrom(0, 1, 2, 3), weight: 8 }, { arbitrary: u16, weight: 1 }), { maxLength: 6 });

/** One option as (code, data). */
function optionArb(targets: FuzzTargets): fc.Arbitrary<{ option: number; data: Buffer }> {
  const name = exportNameArb(targets);
  const noData = (option: number) => ({ option, data: Buffer.alloc(0) });
  return fc.oneof(
    { arbitrary: fc.constant(noData(P.NBD_OPT_STRUCTURED_REPLY)), weight: 6 },
    { arbitrary: fc.constant(noData(P.NBD_OPT_LIST)), weight: 4 },
    { arbitrary: fc.tuple(name, infoCodes).map(([n, i]) => ({ option: P.NBD_OPT_INFO, data: infoData(n, i) })), weight: 10 },
    { arbitrary: fc.tuple(name, infoCodes).map(([n, i]) => ({ option: P.NBD_OPT_GO, data: infoData(n, i) })), weight: 3 },
    {
      arbitrary: fc
        .tuple(fc.constantFrom(P.NBD_OPT_LIST_META_CONTEXT, P.NBD_OPT_SET_META_CONTEXT), name, fc.array(contextQueryArb, { maxLength: 4 }))
        .map(([option, n, q]) => ({ option, data: metaData(n, q) })),
      weight: 10,
    },
    { arbitrary: name.map((n) => ({ option: P.NBD_OPT_EXPORT_NAME, data: n })), weight: 2 },
    { arbitrary: fc.constant(noData(P.NBD_OPT_STARTTLS)), weight: 1 },
    { arbitrary: fc.constantFrom(P.NBD_OPT_PEEK_EXPORT, P.NBD_OPT_EXTENDED_HEADERS, 0, 12, 0x7fffffff, 0xffffffff).map(noData), weight: 2 },
    // options with data they do not take, and unknown options with data
    {
      arbitrary: fc
        .tuple(fc.oneof(fc.constantFrom(P.NBD_OPT_STRUCTURED_REPLY, P.NBD_OPT_LIST, P.NBD_OPT_STARTTLS, P.NBD_OPT_ABORT), u32), fc.nat({ max: 64 }), fc.nat())
        .map(([option, n, seed]) => ({ option, data: pattern(n, seed + 1) })),
      weight: 3,
    },
    // option payloads at the size limits: just below, at and above maxOptionBytes (64 KiB)
    {
      arbitrary: fc.tuple(fc.constantFrom(P.NBD_OPT_INFO, P.NBD_OPT_LIST_META_CONTEXT, 99), fc.constantFrom(65535, 65536, 65537, 200_000)).map(([option, n]) => ({ option, data: Buffer.alloc(n, 7) })),
      weight: 1,
    },
  );
}

function optionFrame(option: number, data: Buffer): Buffer {
  return optionCodec.encodeOption(option, data);
}

// ---------------------------------------------------------------------------------------------
// transmission frames

/** Request header with a 64-bit offset (the codec takes safe integers only). */
function requestFrame(fields: { magic: number; flags: number; type: number; cookie: bigint; offset: bigint; length: number }): Buffer {
  if (fields.offset <= BigInt(Number.MAX_SAFE_INTEGER)) {
    return requestCodec.encodeRequestHeader({ magic: fields.magic, flags: fields.flags, type: fields.type, cookie: fields.cookie, offset: Number(fields.offset), length: fields.length });
  }
  const out = Buffer.alloc(P.requestHeaderBytes);
  out.writeUInt32BE(fields.magic >>> 0, 0);
  out.writeUInt16BE(fields.flags, 4);
  out.writeUInt16BE(fields.type, 6);
  out.writeBigUInt64BE(fields.cookie, 8);
  out.writeBigUInt64BE(fields.offset, 16);
  out.writeUInt32BE(fields.length >>> 0, 24);
  return out;
}

const validFlags: Record<number, readonly number[]> = {
  [P.NBD_CMD_READ]: [P.NBD_CMD_FLAG_DF],
  [P.NBD_CMD_WRITE]: [P.NBD_CMD_FLAG_FUA],
  [P.NBD_CMD_FLUSH]: [],
  [P.NBD_CMD_TRIM]: [P.NBD_CMD_FLAG_FUA],
  [P.NBD_CMD_CACHE]: [],
  [P.NBD_CMD_WRITE_ZEROES]: [P.NBD_CMD_FLAG_FUA, P.NBD_CMD_FLAG_NO_HOLE, P.NBD_CMD_FLAG_FAST_ZERO],
  [P.NBD_CMD_BLOCK_STATUS]: [P.NBD_CMD_FLAG_REQ_ONE],
};

interface RequestPlan {
  readonly type: number;
  readonly flagsChoice: number;
  readonly flagBits: number;
  readonly offsetChoice: number;
  readonly offsetFraction: number;
  readonly offsetEdge: bigint;
  readonly lengthChoice: number;
  readonly smallLength: number;
  readonly anyLength: number;
  readonly cookieChoice: number;
  readonly cookie: bigint;
  readonly payloadChoice: number;
  readonly payloadDelta: number;
  readonly seed: number;
}

const requestPlanArb: fc.Arbitrary<RequestPlan> = fc.record({
  type: fc.oneof(
    { arbitrary: fc.constant(P.NBD_CMD_READ), weight: 24 },
    { arbitrary: fc.constant(P.NBD_CMD_WRITE), weight: 22 },
    { arbitrary: fc.constant(P.NBD_CMD_FLUSH), weight: 6 },
    { arbitrary: fc.constant(P.NBD_CMD_TRIM), weight: 8 },
    { arbitrary: fc.constant(P.NBD_CMD_WRITE_ZEROES), weight: 10 },
    { arbitrary: fc.constant(P.NBD_CMD_BLOCK_STATUS), weight: 12 },
    { arbitrary: fc.constant(P.NBD_CMD_CACHE), weight: 5 },
    { arbitrary: fc.constant(P.NBD_CMD_DISC), weight: 1 },
    { arbitrary: fc.oneof(fc.integer({ min: 8, max: 12 }), u16), weight: 3 },
  ),
  flagsChoice: choice(99),
  flagBits: u16,
  offsetChoice: choice(99),
  offsetFraction: fraction,
  offsetEdge: fc.oneof(
    fc.constantFrom(1n << 53n, (1n << 53n) - 1n, (1n << 53n) + 1n, 1n << 63n, (1n << 64n) - 1n, (1n << 64n) - 4096n, 1n << 32n, (1n << 32n) - 1n),
    u64,
  ),
  lengthChoice: choice(99),
  smallLength: fc.oneof(fc.integer({ min: 1, max: 4096 }), fc.constantFrom(1, 511, 512, 513, 4095, 4096, 4097, 8192, 65536)),
  anyLength: any32,
  cookieChoice: choice(99),
  cookie: u64,
  payloadChoice: choice(99),
  payloadDelta: fc.integer({ min: -64, max: 64 }),
  seed: fc.nat(),
});

/** Largest WRITE payload actually sent; longer declared lengths are sent short (the stream desyncs). */
const maxSentPayloadBytes = 64 * 1024;

function buildRequest(plan: RequestPlan, index: number, previousCookie: bigint, target: FuzzExport): { frames: PlannedFrame[]; cookie: bigint } {
  const size = BigInt(target.sizeBytes);
  const type = plan.type;
  let flags: number;
  if (plan.flagsChoice < 70) {
    const allowed = validFlags[type] ?? [];
    flags = allowed.reduce((f, bit, i) => ((plan.flagBits >> i) & 1 ? f | bit : f), 0);
  } else if (plan.flagsChoice < 92) flags = plan.flagBits & 0x1f;
  else flags = plan.flagBits;
  let offset: bigint;
  let length: number;
  if (type === P.NBD_CMD_FLUSH && plan.offsetChoice < 85) {
    offset = 0n;
    length = 0;
  } else {
    if (plan.offsetChoice < 60) offset = BigInt(Math.floor(plan.offsetFraction * target.sizeBytes));
    else if (plan.offsetChoice < 70) offset = (BigInt(Math.floor(plan.offsetFraction * target.sizeBytes)) / 4096n) * 4096n;
    else if (plan.offsetChoice < 85) offset = size - BigInt(Math.floor(plan.offsetFraction * 8192)) < 0n ? 0n : size - BigInt(Math.floor(plan.offsetFraction * 8192));
    else if (plan.offsetChoice < 90) offset = size + BigInt(Math.floor(plan.offsetFraction * 2));
    else offset = plan.offsetEdge;
    if (plan.lengthChoice < 65) length = plan.smallLength;
    else if (plan.lengthChoice < 75) length = Number(size - offset > 0n && size - offset < BigInt(twoTo32) ? size - offset : 1n);
    else if (plan.lengthChoice < 80) length = 0;
    // a WRITE declaring more than 64 MiB ends the connection: keep that rare so sessions go deep
    else length = type === P.NBD_CMD_WRITE && plan.lengthChoice < 96 ? plan.smallLength : plan.anyLength;
    // keep reads and writes of the valid kind within what is cheap to move (the big export aside)
    if ((type === P.NBD_CMD_READ || type === P.NBD_CMD_WRITE) && plan.lengthChoice < 75 && length > 1 << 20 && target.sizeBytes <= 1 << 20) length = plan.smallLength;
  }
  let cookie: bigint;
  if (plan.cookieChoice < 85) cookie = BigInt(index + 1);
  else if (plan.cookieChoice < 95) cookie = plan.cookie;
  else cookie = previousCookie;
  const frames: PlannedFrame[] = [{ kind: 'request', bytes: requestFrame({ magic: P.NBD_REQUEST_MAGIC, flags, type, cookie, offset, length }), mutations: [] }];
  if (type === P.NBD_CMD_WRITE && length > 0) {
    let n = length;
    if (plan.payloadChoice >= 98) n = Math.max(0, length + plan.payloadDelta); // a payload that lies about its length
    n = Math.min(n, maxSentPayloadBytes);
    if (n > 0) frames.push({ kind: 'payload', bytes: pattern(n, plan.seed + 1), mutations: [] });
  }
  return { frames, cookie };
}

// ---------------------------------------------------------------------------------------------
// sessions

interface SessionPlan {
  readonly kind: 'handshake' | 'transmission';
  readonly flags: number;
  readonly options: readonly { option: number; data: Buffer }[];
  readonly abort: boolean;
  // transmission
  readonly target: number;
  readonly structured: boolean;
  readonly meta: readonly Buffer[] | undefined;
  readonly info: boolean;
  readonly viaExportName: boolean;
  readonly goInfos: readonly number[];
  readonly requests: readonly RequestPlan[];
  readonly disc: boolean;
  // mutation: per frame, field mutations at fieldRate and a structural one at structuralRate
  readonly fieldRate: number;
  readonly structuralRate: number;
  readonly prefixRate: number;
  /** Resize data after a mutated length or type so the stream stays framed (see reframe). */
  readonly keepFraming: boolean;
  readonly fieldMutations: readonly (readonly Mutation[])[];
  readonly structuralMutations: readonly Mutation[];
  readonly cutAt: number | undefined;
  readonly pieces: number;
  readonly reset: boolean;
  readonly resetFraction: number;
  readonly tcp: boolean;
}

const clientFlagsArb = fc.oneof(
  { arbitrary: fc.constantFrom(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES, P.NBD_FLAG_C_FIXED_NEWSTYLE), weight: 20 },
  { arbitrary: fc.constantFrom(0, P.NBD_FLAG_C_NO_ZEROES, 4, 5, 0x80000001, 0xffffffff), weight: 1 },
  { arbitrary: u32, weight: 1 },
);

/** Longest run of requests in one transmission session. */
export const maxRequestsPerSession = 250;

export function sessionPlanArb(targets: FuzzTargets): fc.Arbitrary<SessionPlan> {
  return fc.record({
    kind: fc.oneof({ arbitrary: fc.constant('handshake' as const), weight: 3 }, { arbitrary: fc.constant('transmission' as const), weight: 7 }),
    flags: clientFlagsArb,
    options: fc.array(optionArb(targets), { minLength: 1, maxLength: 40 }),
    abort: chance(0.1),
    target: choice(targets.exports.length - 1),
    structured: chance(0.7),
    meta: fc.tuple(chance(0.6), fc.array(contextQueryArb, { minLength: 1, maxLength: 3 })).map(([on, q]) => (on ? q : undefined)),
    info: chance(0.3),
    viaExportName: chance(0.1),
    goInfos: infoCodes,
    requests: fc.array(requestPlanArb, { minLength: 20, maxLength: maxRequestsPerSession }),
    disc: chance(0.5),
    fieldRate: fc.constantFrom(0.05, 0.3, 0.6, 0.9, 1, 1),
    structuralRate: fc.constantFrom(0, 0, 0.005, 0.02, 0.1),
    prefixRate: fc.constantFrom(0, 0, 0, 0.05, 0.3),
    keepFraming: chance(0.85),
    fieldMutations: fc.array(fc.array(fieldMutationArb, { minLength: 1, maxLength: 3 }), { minLength: 1, maxLength: 16 }),
    structuralMutations: fc.array(structuralMutationArb, { minLength: 1, maxLength: 4 }),
    cutAt: fc.tuple(chance(0.05), fraction).map(([on, at]) => (on ? at : undefined)),
    pieces: fc.oneof({ arbitrary: fc.constant(1), weight: 7 }, { arbitrary: fc.integer({ min: 2, max: 24 }), weight: 3 }),
    reset: chance(0.04),
    resetFraction: fraction,
    tcp: chance(0.2),
  });
}

/** A small deterministic generator for per-frame coin tosses (fast-check supplies the seed). */
function coins(seed: number): () => number {
  let x = seed >>> 0 || 1;
  return () => {
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    return (x >>> 0) / 4294967296;
  };
}

export function buildSession(plan: SessionPlan, targets: FuzzTargets, seed: number): FuzzSession {
  const planned: PlannedFrame[] = [];
  const flagsFrame = optionCodec.encodeClientFlags(plan.kind === 'transmission' && plan.prefixRate === 0 ? P.NBD_FLAG_C_FIXED_NEWSTYLE | (plan.flags & P.NBD_FLAG_C_NO_ZEROES) : plan.flags);
  planned.push({ kind: 'flags', bytes: flagsFrame, mutations: [] });
  let prefixEnd: number;
  if (plan.kind === 'handshake') {
    for (const o of plan.options) planned.push({ kind: 'option', bytes: optionFrame(o.option, o.data), mutations: [] });
    if (plan.abort) planned.push({ kind: 'option', bytes: optionFrame(P.NBD_OPT_ABORT, Buffer.alloc(0)), mutations: [] });
    prefixEnd = 0;
  } else {
    const target = targets.exports[plan.target];
    const name = bytesOf(target.name);
    if (plan.structured) planned.push({ kind: 'option', bytes: optionFrame(P.NBD_OPT_STRUCTURED_REPLY, Buffer.alloc(0)), mutations: [] });
    if (plan.meta !== undefined) planned.push({ kind: 'option', bytes: optionFrame(P.NBD_OPT_SET_META_CONTEXT, metaData(name, plan.meta)), mutations: [] });
    if (plan.info) planned.push({ kind: 'option', bytes: optionFrame(P.NBD_OPT_INFO, infoData(name, plan.goInfos)), mutations: [] });
    if (plan.viaExportName) planned.push({ kind: 'option', bytes: optionFrame(P.NBD_OPT_EXPORT_NAME, name), mutations: [] });
    else planned.push({ kind: 'option', bytes: optionFrame(P.NBD_OPT_GO, infoData(name, plan.goInfos)), mutations: [] });
    prefixEnd = planned.length;
    let cookie = 0n;
    plan.requests.forEach((r, i) => {
      const built = buildRequest(r, i, cookie, target);
      cookie = built.cookie;
      planned.push(...built.frames);
    });
    if (plan.disc) planned.push({ kind: 'request', bytes: requestFrame({ magic: P.NBD_REQUEST_MAGIC, flags: 0, type: P.NBD_CMD_DISC, cookie: (cookie + 1n) & ((1n << 64n) - 1n), offset: 0n, length: 0 }), mutations: [] });
  }
  // choose which frames to mutate
  const toss = coins(seed);
  let nextField = 0;
  let nextStructural = 0;
  const withMutations = planned.map((f, i) => {
    if (f.kind === 'payload') return f;
    // the client flags are fuzzed by their generator; mutated as well, most sessions would end there
    const prefix = i < prefixEnd || f.kind === 'flags';
    const mutations: Mutation[] = [];
    if (toss() < (prefix ? plan.prefixRate : plan.fieldRate)) mutations.push(...plan.fieldMutations[nextField++ % plan.fieldMutations.length]);
    if (toss() < (prefix ? plan.prefixRate / 4 : plan.structuralRate)) mutations.push(plan.structuralMutations[nextStructural++ % plan.structuralMutations.length]);
    return mutations.length === 0 ? f : { ...f, mutations };
  });
  const frames: FuzzFrame[] = [];
  for (let i = 0; i < withMutations.length; i++) {
    const f = withMutations[i];
    if (f.kind === 'payload') {
      frames.push({ bytes: f.bytes, mutated: false, payload: true });
      continue;
    }
    const mutated = f.mutations.length > 0;
    for (const bytes of mutate(f, withMutations)) {
      if (!mutated || !plan.keepFraming) {
        frames.push({ bytes, mutated, payload: false });
        continue;
      }
      // A field mutation that changed what follows the header (an option's length, a request's type
      // or length) gets data of the new length, so the stream stays framed and the server goes on
      // parsing; without keepFraming, or beyond maxSentPayloadBytes, the stream desyncs instead.
      const framed = reframe(f.kind, bytes, withMutations[i + 1]?.kind === 'payload' ? withMutations[i + 1].bytes : undefined);
      frames.push({ bytes: framed.header, mutated, payload: false });
      if (framed.payload !== undefined && framed.payload.length > 0) frames.push({ bytes: framed.payload, mutated: false, payload: true });
      if (framed.consumedPayload) i++;
    }
  }
  let stream = Buffer.concat(frames.map((f) => f.bytes));
  if (plan.cutAt !== undefined) stream = stream.subarray(0, Math.floor(plan.cutAt * stream.length));
  return {
    kind: plan.kind,
    frames,
    stream,
    pieces: plan.pieces,
    ending: plan.reset ? 'reset' : 'end',
    resetAfter: Math.floor(plan.resetFraction * stream.length),
    transport: plan.tcp ? 'tcp' : 'unix',
  };
}

/**
 * Keeps the framing of a mutated header: an option gets data of its declared length; a request that
 * now declares a WRITE payload gets one of that length (a former payload is dropped or resized).
 */
function reframe(kind: FrameKind, bytes: Buffer, nextPayload: Buffer | undefined): { header: Buffer; payload: Buffer | undefined; consumedPayload: boolean } {
  if (kind === 'option' && bytes.length >= P.optionHeaderBytes && bytes.readBigUInt64BE(0) === P.NBD_OPTS_MAGIC) {
    const declared = bytes.readUInt32BE(12);
    const actual = bytes.length - P.optionHeaderBytes;
    if (declared === actual || declared > 70_000) return { header: bytes, payload: undefined, consumedPayload: false };
    const data = Buffer.alloc(declared);
    bytes.copy(data, 0, P.optionHeaderBytes, P.optionHeaderBytes + Math.min(declared, actual));
    return { header: Buffer.concat([bytes.subarray(0, P.optionHeaderBytes), data]), payload: undefined, consumedPayload: false };
  }
  if (kind === 'request' && bytes.length === P.requestHeaderBytes && bytes.readUInt32BE(0) === P.NBD_REQUEST_MAGIC) {
    const type = bytes.readUInt16BE(6);
    const length = bytes.readUInt32BE(24);
    const needs = type === P.NBD_CMD_WRITE ? length : 0;
    const have = nextPayload?.length ?? 0;
    if (needs === have) return { header: bytes, payload: nextPayload, consumedPayload: nextPayload !== undefined };
    if (needs > maxSentPayloadBytes) return { header: bytes, payload: nextPayload, consumedPayload: nextPayload !== undefined };
    const payload = Buffer.alloc(needs);
    if (nextPayload !== undefined) nextPayload.copy(payload, 0, 0, Math.min(needs, have));
    return { header: bytes, payload, consumedPayload: nextPayload !== undefined };
  }
  return { header: bytes, payload: undefined, consumedPayload: false };
}

/** The sessions numbered [first, first + count) of a run with this seed. */
export function generateSessions(targets: FuzzTargets, seed: number, first: number, count: number): FuzzSession[] {
  const arb = sessionPlanArb(targets);
  const out: FuzzSession[] = [];
  for (let i = 0; i < count; i++) {
    const sessionSeed = (seed * 1_000_003 + first + i) | 0;
    const [plan] = fc.sample(arb, { seed: sessionSeed, numRuns: 1 });
    out.push(buildSession(plan, targets, sessionSeed));
  }
  return out;
}

/** Frames that count in the report: payloads are not frames of their own. */
export function countFrames(session: FuzzSession): { frames: number; mutated: number } {
  let frames = 0;
  let mutated = 0;
  for (const f of session.frames) {
    if (f.payload) continue;
    frames++;
    if (f.mutated) mutated++;
  }
  return { frames, mutated };
}
