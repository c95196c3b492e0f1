/**
 * The fuzzer's judge: given the bytes a client sent on one connection, the bytes the server sent back,
 * and how the connection ended, decide whether the server answered per the NBD spec
 * (doc/proto.md) and cowstack's documented rules (packages/nbd/README.md), and name every deviation.
 *
 * It frames the client's stream the way a conforming server must (fixed newstyle: 4 bytes of client
 * flags, then 16-byte option headers with their data; after GO/EXPORT_NAME, 28-byte request headers,
 * a WRITE's payload following its header whatever the server thinks of the request), predicts for
 * every frame what may come back, and walks the server's bytes against that:
 * - handshake: every option gets its replies, in order, each carrying the option's code, ending with
 *   ACK or the error the spec names (UNSUP, INVALID, UNKNOWN, POLICY, TOO_BIG); a client that breaks
 *   the stream (no FIXED_NEWSTYLE, unknown client flags, bad option magic, too many options, an
 *   option too long to skip, an EXPORT_NAME that cannot be served) gets no reply and a clean close.
 * - transmission: every request the server had to parse gets exactly one answer (a simple reply, or
 *   structured chunks ending with DONE) with an allowed errno, the one the documented checks give
 *   (unknown command or flag → EINVAL, write on read-only → EPERM, past the end → ENOSPC for writes
 *   and EINVAL otherwise, ...), READ data covering exactly the range asked, BLOCK_STATUS one chunk per
 *   selected context; after DISC, a bad magic, an oversized WRITE or the end of the client's stream,
 *   everything parsed before is answered and the connection is closed cleanly (FIN, not a reset).
 *
 * Written from the spec and the README tables, independently of packages/nbd's decoders, so that the
 * server's code is checked rather than copied. Pure: no I/O.
 */
import { protocol as P } from '@cowstack/nbd';

export interface OracleExport {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
}

export interface OracleContext {
  /** What an export name opens: an export, nothing, or 'unsure' (point-in-time names). */
  resolve(name: string): OracleExport | undefined | 'unsure';
  readonly maxPayloadBytes: number;
  readonly maxOptionBytes: number;
  readonly maxDiscardedOptionBytes: number;
  readonly maxOptionsPerHandshake: number;
  readonly extraOptionsPerListedExport: number;
  /** A rejected WRITE longer than this ends the connection instead of having its payload skipped. */
  readonly maxDiscardedPayloadBytes: number;
  /** Whether export `name` has the dirty bitmap `qemu:dirty-bitmap:POINT` (POINT resolves for it). */
  dirtyBitmapExists(name: string, point: string): boolean | 'unsure';
  /** The whole content of an export that cannot change (a snapshot), to check READ data against. */
  contentOf(name: string): Buffer | undefined;
}

/**
 * cowstack bugs this fuzzer found, counted apart from new violations so a run still finds new
 * ones while these wait for a fix; each has its own failing test in fuzz.test.ts.
 */
export const knownBugs: Record<string, string> = {
  // none open: the four bugs this fuzzer found are fixed (RELIABILITY.md, "Fuzzing"); a bug found
  // later that needs time to fix gets a name here and a recogniser in judge(), next to its failing
  // test, so that a run still finds new problems meanwhile
};

/** How the connection ended, seen from the client. */
export type CloseKind = 'fin' | 'reset' | 'open';

export type Outcome =
  | 'handshake-refused'
  | 'handshake-aborted'
  | 'handshake-incomplete'
  | 'transmission-ended'
  | 'transmission-disc'
  | 'transmission-bad-magic'
  | 'transmission-oversized-write';

export interface Verdict {
  outcome: Outcome;
  /** Empty when the server behaved. */
  readonly violations: string[];
  /** Options and requests the server had to parse. */
  options: number;
  requests: number;
  /** Answers by errno name ('OK', 'EINVAL', ...). */
  readonly errnos: Record<string, number>;
  /** Deviations that are known cowstack bugs (knownBugs), by name. */
  readonly knownBugs: Record<string, number>;
}

const errnoNames: Record<number, string> = {
  [P.NBD_SUCCESS]: 'OK',
  [P.NBD_EPERM]: 'EPERM',
  [P.NBD_EIO]: 'EIO',
  [P.NBD_ENOMEM]: 'ENOMEM',
  [P.NBD_EINVAL]: 'EINVAL',
  [P.NBD_ENOSPC]: 'ENOSPC',
  [P.NBD_EOVERFLOW]: 'EOVERFLOW',
  [P.NBD_ENOTSUP]: 'ENOTSUP',
  [P.NBD_ESHUTDOWN]: 'ESHUTDOWN',
};

const commandNames = ['READ', 'WRITE', 'DISC', 'FLUSH', 'TRIM', 'CACHE', 'WRITE_ZEROES', 'BLOCK_STATUS'];
const cmd = (type: number): string => commandNames[type] ?? `CMD_${type}`;

class Cursor {
  at = 0;
  constructor(readonly buf: Buffer) {}
  get left(): number {
    return this.buf.length - this.at;
  }
  u16(): number {
    const v = this.buf.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    const v = this.buf.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  u64(): bigint {
    const v = this.buf.readBigUInt64BE(this.at);
    this.at += 8;
    return v;
  }
  take(n: number): Buffer {
    const v = this.buf.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }
}

/** A protocol string: valid UTF-8, no NUL, at most 4096 bytes (cowstack's rule; the spec's limit). */
function protocolString(bytes: Buffer): string | undefined {
  if (bytes.length > P.maxStringBytes || bytes.includes(0)) return undefined;
  const text = bytes.toString('utf8');
  return Buffer.from(text, 'utf8').equals(bytes) ? text : undefined;
}

function optName(option: number): string {
  return P.optionName(option);
}

function repName(type: number): string {
  const names: Record<number, string> = {
    [P.NBD_REP_ACK]: 'ACK',
    [P.NBD_REP_SERVER]: 'SERVER',
    [P.NBD_REP_INFO]: 'INFO',
    [P.NBD_REP_META_CONTEXT]: 'META_CONTEXT',
    [P.NBD_REP_ERR_UNSUP]: 'ERR_UNSUP',
    [P.NBD_REP_ERR_POLICY]: 'ERR_POLICY',
    [P.NBD_REP_ERR_INVALID]: 'ERR_INVALID',
    [P.NBD_REP_ERR_PLATFORM]: 'ERR_PLATFORM',
    [P.NBD_REP_ERR_TLS_REQD]: 'ERR_TLS_REQD',
    [P.NBD_REP_ERR_UNKNOWN]: 'ERR_UNKNOWN',
    [P.NBD_REP_ERR_SHUTDOWN]: 'ERR_SHUTDOWN',
    [P.NBD_REP_ERR_BLOCK_SIZE_REQD]: 'ERR_BLOCK_SIZE_REQD',
    [P.NBD_REP_ERR_TOO_BIG]: 'ERR_TOO_BIG',
  };
  return names[type] ?? `0x${type.toString(16)}`;
}

interface TransmissionState {
  readonly export: OracleExport;
  /** The export might not really be usable (point-in-time names): its data commands may fail EIO. */
  readonly unsure: boolean;
  readonly transmissionFlags: number;
  readonly structured: boolean;
  /** Selected metadata contexts: id → name. */
  readonly contexts: ReadonlyMap<number, string>;
  /** The export's name as chosen (for contentOf). */
  readonly name: string;
}

/** Checks data a READ returned at `offset` against the export's known content, if any. */
function checkData(content: Buffer | undefined, offset: bigint, data: Buffer | undefined, length: number, what: string, fail: (m: string) => void): void {
  if (content === undefined || offset + BigInt(length) > BigInt(content.length)) return;
  const want = content.subarray(Number(offset), Number(offset) + length);
  const ok = data === undefined ? !want.some((b) => b !== 0) : data.equals(want);
  if (!ok) fail(`${what}: ${data === undefined ? 'a hole over' : 'wrong data in'} ${offset}+${length} of an export whose content is known`);
}

interface Request {
  readonly index: number;
  readonly cookie: bigint;
  readonly type: number;
  readonly flags: number;
  readonly offset: bigint;
  readonly length: number;
  readonly allowed: readonly number[];
  answered: boolean;
  // structured reply in progress
  chunks: number;
  error: number | undefined;
  covered: [bigint, bigint][];
  contentChunks: number;
  statusContexts: Set<number>;
}

/** The errnos a request may get, from the documented checks in their documented order. */
export function allowedErrnos(h: { type: number; flags: number; offset: bigint; length: number }, st: TransmissionState, ctx: OracleContext): number[] {
  const { type, flags, offset, length } = h;
  const size = BigInt(st.export.sizeBytes);
  const tf = st.transmissionFlags;
  const known = [P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_FLUSH, P.NBD_CMD_TRIM, P.NBD_CMD_CACHE, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_BLOCK_STATUS];
  if (!known.includes(type)) return [P.NBD_EINVAL];
  const writeLike = type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES || type === P.NBD_CMD_TRIM;
  if (writeLike && st.export.readOnly) return [P.NBD_EPERM];
  if (flags & ~0x1f) return [P.NBD_EINVAL];
  if (flags & P.NBD_CMD_FLAG_FUA && !(tf & P.NBD_FLAG_SEND_FUA)) return [P.NBD_EINVAL];
  if (flags & P.NBD_CMD_FLAG_NO_HOLE && type !== P.NBD_CMD_WRITE_ZEROES) return [P.NBD_EINVAL];
  if (flags & P.NBD_CMD_FLAG_FAST_ZERO && (type !== P.NBD_CMD_WRITE_ZEROES || !(tf & P.NBD_FLAG_SEND_FAST_ZERO))) return [P.NBD_EINVAL];
  if (flags & P.NBD_CMD_FLAG_DF && (type !== P.NBD_CMD_READ || !(tf & P.NBD_FLAG_SEND_DF))) return [P.NBD_EINVAL];
  if (flags & P.NBD_CMD_FLAG_REQ_ONE && type !== P.NBD_CMD_BLOCK_STATUS) return [P.NBD_EINVAL];
  if (type === P.NBD_CMD_FLUSH) return offset === 0n && length === 0 ? [P.NBD_SUCCESS] : [P.NBD_EINVAL];
  if (length === 0) return [P.NBD_EINVAL];
  if (offset > size || BigInt(length) > size - offset) return [type === P.NBD_CMD_WRITE || type === P.NBD_CMD_WRITE_ZEROES ? P.NBD_ENOSPC : P.NBD_EINVAL];
  if ((type === P.NBD_CMD_READ || type === P.NBD_CMD_WRITE) && length > ctx.maxPayloadBytes) return [P.NBD_EINVAL];
  if (type === P.NBD_CMD_BLOCK_STATUS && (!st.structured || st.contexts.size === 0)) return [P.NBD_EINVAL];
  const ok = [P.NBD_SUCCESS];
  if (type === P.NBD_CMD_WRITE_ZEROES && flags & P.NBD_CMD_FLAG_FAST_ZERO) ok.push(P.NBD_ENOTSUP);
  if (st.unsure && (type === P.NBD_CMD_READ || type === P.NBD_CMD_CACHE || type === P.NBD_CMD_BLOCK_STATUS)) ok.push(P.NBD_EIO);
  return ok;
}

export function judge(sent: Buffer, received: Buffer, close: CloseKind, ctx: OracleContext, trace?: string[]): Verdict {
  const v: Verdict = { outcome: 'handshake-incomplete', violations: [], options: 0, requests: 0, errnos: {}, knownBugs: {} };
  const s = new Cursor(sent);
  const r = new Cursor(received);
  const fail = (message: string): void => {
    if (v.violations.length < 20) v.violations.push(message);
  };

  /** The server must have sent nothing more and closed cleanly. */
  const closed = (outcome: Outcome): Verdict => {
    v.outcome = outcome;
    if (r.left > 0) fail(`${outcome}: ${r.left} unexpected bytes from the server (first: ${r.buf.subarray(r.at, r.at + 16).toString('hex')})`);
    if (close === 'open') fail(`${outcome}: the server neither closed the connection nor answered (hang)`);
    if (close === 'reset') fail(`${outcome}: the connection was reset instead of closed cleanly`);
    return v;
  };

  // ---- greeting
  if (r.left < P.greetingBytes) {
    fail(`greeting: only ${r.left} bytes`);
    return v;
  }
  if (r.u64() !== P.NBD_MAGIC || r.u64() !== P.NBD_OPTS_MAGIC) fail('greeting: bad magic');
  const hsFlags = r.u16();
  if (hsFlags !== (P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES)) fail(`greeting: handshake flags 0x${hsFlags.toString(16)}`);

  // ---- handshake
  if (s.left < 4) return closed('handshake-incomplete');
  const clientFlags = s.u32();
  const noZeroes = (clientFlags & P.NBD_FLAG_C_NO_ZEROES) !== 0;
  if (!(clientFlags & P.NBD_FLAG_C_FIXED_NEWSTYLE) || clientFlags & ~(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES)) return closed('handshake-refused');

  let budget = ctx.maxOptionsPerHandshake;
  let seen = 0;
  let listGranted = false;
  let structured = false;
  let metaName: string | undefined;
  let metaContexts = new Map<number, string>();

  /** Reads one reply to `option`; undefined (with a violation) when it is missing or malformed. */
  const reply = (option: number): { type: number; payload: Buffer } | undefined => {
    if (r.left === 0) {
      fail(`option ${optName(option)}: no reply (${close === 'open' ? 'hang' : 'connection closed'})`);
      return undefined;
    }
    if (r.left < P.optionReplyHeaderBytes) {
      fail(`option ${optName(option)}: truncated reply header (${r.left} bytes)`);
      return undefined;
    }
    const magic = r.u64();
    const replyOption = r.u32();
    const type = r.u32();
    const length = r.u32();
    if (magic !== P.NBD_REP_MAGIC) {
      fail(`option ${optName(option)}: reply magic 0x${magic.toString(16)}`);
      return undefined;
    }
    if (replyOption !== option >>> 0) {
      fail(`option ${optName(option)}: reply names option ${replyOption}`);
      return undefined;
    }
    if (r.left < length) {
      fail(`option ${optName(option)}: reply ${repName(type)} of ${length} bytes truncated at ${r.left}`);
      return undefined;
    }
    const payload = r.take(length);
    if (type >= 0x80000000 && length > P.maxStringBytes) fail(`option ${optName(option)}: error message of ${length} bytes`);
    return { type, payload };
  };

  /** One terminal reply that must be one of `allowed` (error replies). */
  const expectOne = (option: number, allowed: readonly number[]): number | undefined => {
    const got = reply(option);
    if (got === undefined) return undefined;
    if (!allowed.includes(got.type)) fail(`option ${optName(option)}: got ${repName(got.type)}, expected ${allowed.map(repName).join(' or ')}`);
    return got.type;
  };

  for (;;) {
    if (s.left < P.optionHeaderBytes) return closed('handshake-incomplete');
    const magic = s.u64();
    const option = s.u32();
    const length = s.u32();
    if (magic !== P.NBD_OPTS_MAGIC) return closed('handshake-refused');
    seen++;
    v.options++;
    if (seen > budget) return closed('handshake-refused');
    if (length > ctx.maxOptionBytes) {
      if (option === P.NBD_OPT_EXPORT_NAME) return closed('handshake-refused');
      if (length > Math.max(ctx.maxDiscardedOptionBytes, ctx.maxOptionBytes)) return closed('handshake-refused');
      if (s.left < length) return closed('handshake-incomplete');
      s.take(length);
      if (expectOne(option, [P.NBD_REP_ERR_TOO_BIG]) === undefined) return v;
      continue;
    }
    if (s.left < length) return closed('handshake-incomplete');
    const data = s.take(length);
    const O = optName(option);

    switch (option) {
      case P.NBD_OPT_ABORT: {
        // The spec: the server SHOULD reply ACK, then close.
        if (r.left > 0 && expectOne(option, [P.NBD_REP_ACK]) === undefined) return v;
        return closed('handshake-aborted');
      }
      case P.NBD_OPT_EXPORT_NAME: {
        const name = protocolString(data);
        const target = name === undefined ? undefined : ctx.resolve(name);
        if (target === undefined) return closed('handshake-refused');
        if (r.left === 0 && close !== 'open' && target === 'unsure') return closed('handshake-refused');
        const want = 10 + (noZeroes ? 0 : P.exportNameReplyZeroesBytes);
        if (r.left < want) {
          fail(`EXPORT_NAME '${name}': ${r.left} bytes of the ${want}-byte reply (${close})`);
          return v;
        }
        const size = r.u64();
        const flags = r.u16();
        const zeroes = r.take(want - 10);
        if (zeroes.some((b) => b !== 0)) fail('EXPORT_NAME: nonzero padding');
        const known = target === 'unsure' ? { sizeBytes: Number(size), readOnly: (flags & P.NBD_FLAG_READ_ONLY) !== 0 } : target;
        checkTransmissionFlags(fail, `EXPORT_NAME '${name}'`, flags, known, structured);
        if (size !== BigInt(known.sizeBytes)) fail(`EXPORT_NAME '${name}': size ${size}, expected ${known.sizeBytes}`);
        return transmission(s, r, close, ctx, v, fail, trace, {
          export: known,
          unsure: target === 'unsure',
          transmissionFlags: flags,
          structured,
          contexts: metaName === name ? metaContexts : new Map(),
          name: name!,
        });
      }
      case P.NBD_OPT_LIST: {
        if (length !== 0) {
          if (expectOne(option, [P.NBD_REP_ERR_INVALID]) === undefined) return v;
          break;
        }
        let servers = 0;
        for (;;) {
          const got = reply(option);
          if (got === undefined) return v;
          if (got.type === P.NBD_REP_ACK) break;
          if (got.type !== P.NBD_REP_SERVER) {
            fail(`LIST: got ${repName(got.type)}`);
            return v;
          }
          servers++;
          if (got.payload.length < 4 || got.payload.readUInt32BE(0) > got.payload.length - 4) fail('LIST: malformed SERVER reply');
        }
        if (!listGranted) {
          listGranted = true;
          budget += ctx.extraOptionsPerListedExport * servers;
        }
        break;
      }
      case P.NBD_OPT_STARTTLS:
        if (expectOne(option, [length !== 0 ? P.NBD_REP_ERR_INVALID : P.NBD_REP_ERR_POLICY]) === undefined) return v;
        break;
      case P.NBD_OPT_STRUCTURED_REPLY: {
        const want = length !== 0 || structured ? P.NBD_REP_ERR_INVALID : P.NBD_REP_ACK;
        const got = expectOne(option, [want]);
        if (got === undefined) return v;
        if (got === P.NBD_REP_ACK) structured = true;
        break;
      }
      case P.NBD_OPT_INFO:
      case P.NBD_OPT_GO: {
        const request = decodeInfoRequest(data);
        const name = request === undefined ? undefined : protocolString(request.name);
        if (request === undefined || name === undefined) {
          if (expectOne(option, request === undefined ? [P.NBD_REP_ERR_INVALID] : [P.NBD_REP_ERR_INVALID, P.NBD_REP_ERR_UNKNOWN]) === undefined) return v;
          break;
        }
        const target = ctx.resolve(name);
        if (target === undefined) {
          if (expectOne(option, [P.NBD_REP_ERR_UNKNOWN]) === undefined) return v;
          break;
        }
        let info: { size: bigint; flags: number } | undefined;
        let failed = false;
        for (;;) {
          const got = reply(option);
          if (got === undefined) return v;
          if (got.type === P.NBD_REP_ACK) break;
          if (got.type === P.NBD_REP_ERR_UNKNOWN && target === 'unsure' && info === undefined) {
            failed = true;
            break;
          }
          if (got.type !== P.NBD_REP_INFO) {
            fail(`${O} '${name}': got ${repName(got.type)}`);
            return v;
          }
          const p = got.payload;
          if (p.length < 2) {
            fail(`${O}: INFO reply of ${p.length} bytes`);
            continue;
          }
          const kind = p.readUInt16BE(0);
          if (kind === P.NBD_INFO_EXPORT) {
            if (p.length !== 12) fail(`${O}: NBD_INFO_EXPORT of ${p.length} bytes`);
            else info = { size: p.readBigUInt64BE(2), flags: p.readUInt16BE(10) };
          } else if (kind === P.NBD_INFO_BLOCK_SIZE) {
            if (p.length !== 14) fail(`${O}: NBD_INFO_BLOCK_SIZE of ${p.length} bytes`);
            else {
              const min = p.readUInt32BE(2);
              const preferred = p.readUInt32BE(6);
              const max = p.readUInt32BE(10);
              const pow2 = (n: number): boolean => n > 0 && (n & (n - 1)) === 0;
              if (!pow2(min) || !pow2(preferred) || min > 65536 || preferred < 512 || preferred < min || max < preferred) fail(`${O}: block sizes ${min}/${preferred}/${max}`);
            }
          } else if (kind !== P.NBD_INFO_NAME && kind !== P.NBD_INFO_DESCRIPTION) fail(`${O}: unrequested info type ${kind}`);
          else if (!request.infos.includes(kind)) fail(`${O}: info type ${kind} sent without being asked`);
        }
        if (failed) break;
        if (info === undefined) {
          fail(`${O} '${name}': ACK without NBD_INFO_EXPORT`);
          return v;
        }
        const known = target === 'unsure' ? { sizeBytes: Number(info.size), readOnly: (info.flags & P.NBD_FLAG_READ_ONLY) !== 0 } : target;
        if (info.size !== BigInt(known.sizeBytes)) fail(`${O} '${name}': size ${info.size}, expected ${known.sizeBytes}`);
        checkTransmissionFlags(fail, `${O} '${name}'`, info.flags, known, structured);
        if (option === P.NBD_OPT_GO) {
          return transmission(s, r, close, ctx, v, fail, trace, {
            export: known,
            unsure: target === 'unsure',
            transmissionFlags: info.flags,
            structured,
            contexts: metaName === name ? metaContexts : new Map(),
            name,
          });
        }
        break;
      }
      case P.NBD_OPT_LIST_META_CONTEXT:
      case P.NBD_OPT_SET_META_CONTEXT: {
        const set = option === P.NBD_OPT_SET_META_CONTEXT;
        if (set) {
          metaName = undefined;
          metaContexts = new Map();
          if (!structured) {
            if (expectOne(option, [P.NBD_REP_ERR_INVALID]) === undefined) return v;
            break;
          }
        }
        const request = decodeMetaRequest(data);
        if (request === undefined) {
          if (expectOne(option, [P.NBD_REP_ERR_INVALID]) === undefined) return v;
          break;
        }
        const target = ctx.resolve(request.name);
        if (target === undefined) {
          if (expectOne(option, [P.NBD_REP_ERR_UNKNOWN]) === undefined) return v;
          break;
        }
        const selected = new Map<number, string>();
        let failed = false;
        for (;;) {
          const got = reply(option);
          if (got === undefined) return v;
          if (got.type === P.NBD_REP_ACK) break;
          if (got.type === P.NBD_REP_ERR_UNKNOWN && target === 'unsure' && selected.size === 0) {
            failed = true;
            break;
          }
          if (got.type !== P.NBD_REP_META_CONTEXT || got.payload.length < 4) {
            fail(`${O}: got ${repName(got.type)} (${got.payload.length} bytes)`);
            return v;
          }
          const id = got.payload.readUInt32BE(0);
          const context = got.payload.toString('utf8', 4);
          if (set) {
            if (id === 0 || selected.has(id)) fail(`${O}: context id ${id} zero or repeated`);
            const bitmap = 'qemu:dirty-bitmap:';
            if (context.startsWith(bitmap) && target !== 'unsure' && ctx.dirtyBitmapExists(request.name, context.slice(bitmap.length)) === false) {
              fail(`${O}: selected '${context}', a dirty bitmap of a point that does not exist for '${request.name}'`);
            }
            if (!request.queries.includes(context)) fail(`${O}: context '${context}' was not asked for (queries: ${JSON.stringify(request.queries)})`);
            selected.set(id, context);
          } else if (request.queries.length > 0 && !request.queries.some((q) => context === q || (q.endsWith(':') && context.startsWith(q)) || context.startsWith(q.slice(0, q.indexOf(':') + 1)))) {
            fail(`${O}: listed context '${context}' matches no query`);
          }
        }
        if (set && !failed) {
          metaName = request.name;
          metaContexts = selected;
        }
        break;
      }
      default:
        if (expectOne(option, [P.NBD_REP_ERR_UNSUP]) === undefined) return v;
    }
  }
}

function checkTransmissionFlags(fail: (m: string) => void, what: string, flags: number, target: OracleExport, structured: boolean): void {
  if (!(flags & P.NBD_FLAG_HAS_FLAGS)) fail(`${what}: transmission flags 0x${flags.toString(16)} lack HAS_FLAGS`);
  if (((flags & P.NBD_FLAG_READ_ONLY) !== 0) !== target.readOnly) fail(`${what}: READ_ONLY flag ${(flags & P.NBD_FLAG_READ_ONLY) !== 0}, export read-only ${target.readOnly}`);
  if (flags & P.NBD_FLAG_SEND_DF && !structured) fail(`${what}: SEND_DF without structured replies`);
  if (target.readOnly && flags & (P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES)) fail(`${what}: write flags on a read-only export`);
}

function decodeInfoRequest(data: Buffer): { name: Buffer; infos: number[] } | undefined {
  if (data.length < 6) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 6) return undefined;
  const count = data.readUInt16BE(4 + nameLength);
  if (data.length !== 4 + nameLength + 2 + 2 * count) return undefined;
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(data.readUInt16BE(6 + nameLength + 2 * i));
  return { name: data.subarray(4, 4 + nameLength), infos };
}

function decodeMetaRequest(data: Buffer): { name: string; queries: string[] } | undefined {
  if (data.length < 8) return undefined;
  const nameLength = data.readUInt32BE(0);
  if (nameLength > data.length - 8) return undefined;
  const name = protocolString(data.subarray(4, 4 + nameLength));
  if (name === undefined) return undefined;
  let at = 4 + nameLength;
  const count = data.readUInt32BE(at);
  at += 4;
  const queries: string[] = [];
  for (let i = 0; i < count; i++) {
    if (at + 4 > data.length) return undefined;
    const length = data.readUInt32BE(at);
    at += 4;
    if (length > data.length - at) return undefined;
    const query = protocolString(data.subarray(at, at + length));
    if (query === undefined) return undefined;
    queries.push(query);
    at += length;
  }
  return at === data.length ? { name, queries } : undefined;
}

// ---------------------------------------------------------------------------------------------
// transmission

const allowedErrnoValues = new Set([P.NBD_EPERM, P.NBD_EIO, P.NBD_ENOMEM, P.NBD_EINVAL, P.NBD_ENOSPC, P.NBD_EOVERFLOW, P.NBD_ENOTSUP, P.NBD_ESHUTDOWN]);

function transmission(
  s: Cursor,
  r: Cursor,
  close: CloseKind,
  ctx: OracleContext,
  v: Verdict,
  fail: (m: string) => void,
  trace: string[] | undefined,
  st: TransmissionState,
): Verdict {
  v.outcome = 'transmission-ended';
  const requests: Request[] = [];
  // ---- frame the client's stream as the server must
  for (;;) {
    if (s.left < P.requestHeaderBytes) break;
    const magic = s.u32();
    const flags = s.u16();
    const type = s.u16();
    const cookie = s.u64();
    const offset = s.u64();
    const length = s.u32();
    if (magic !== P.NBD_REQUEST_MAGIC) {
      v.outcome = 'transmission-bad-magic';
      break;
    }
    if (type === P.NBD_CMD_DISC) {
      v.outcome = 'transmission-disc';
      break;
    }
    const allowed = allowedErrnos({ type, flags, offset, length }, st, ctx);
    const request: Request = {
      index: requests.length,
      cookie,
      type,
      flags,
      offset,
      length,
      allowed,
      answered: false,
      chunks: 0,
      error: undefined,
      covered: [],
      contentChunks: 0,
      statusContexts: new Set(),
    };
    if (type === P.NBD_CMD_WRITE) {
      const rejected = !allowed.includes(P.NBD_SUCCESS);
      if (rejected && length > ctx.maxDiscardedPayloadBytes) {
        requests.push(request);
        v.outcome = 'transmission-oversized-write';
        break;
      }
      if (length > 0) {
        // a payload that never fully arrives: the request is abandoned, not answered
        if (s.left < length) break;
        s.take(length);
      }
    }
    requests.push(request);
  }
  v.requests = requests.length;
  if (trace !== undefined) {
    trace.push(`transmission: structured ${st.structured}, contexts ${[...st.contexts].map(([id, c]) => `${id}=${c}`).join(',')}, flags 0x${st.transmissionFlags.toString(16)}, size ${st.export.sizeBytes}`);
    for (const q of requests) trace.push(`request #${q.index} ${cmd(q.type)} flags 0x${q.flags.toString(16)} ${q.offset}+${q.length} cookie ${q.cookie} allowed ${q.allowed.join('/')}`);
  }

  // ---- walk the server's replies
  const content = ctx.contentOf(st.name);
  const waiting = new Map<bigint, Request[]>();
  for (const q of requests) {
    const list = waiting.get(q.cookie);
    if (list === undefined) waiting.set(q.cookie, [q]);
    else list.push(q);
  }
  const inProgress = new Map<bigint, Request>();
  const describe = (q: Request): string => `#${q.index} ${cmd(q.type)} flags 0x${q.flags.toString(16)} offset ${q.offset} length ${q.length} cookie ${q.cookie}`;
  const settle = (q: Request, errno: number): void => {
    q.answered = true;
    const list = waiting.get(q.cookie)!;
    list.splice(list.indexOf(q), 1);
    const name = errnoNames[errno] ?? `errno ${errno}`;
    v.errnos[name] = (v.errnos[name] ?? 0) + 1;
    if (errno !== 0 && !allowedErrnoValues.has(errno)) fail(`${describe(q)}: errno ${errno} is not one the spec allows`);
    if (q.allowed.includes(errno)) return;
    fail(`${describe(q)}: got ${name}, expected ${q.allowed.map((e) => errnoNames[e]).join(' or ')}`);
  };
  /** The outstanding request a reply belongs to: the first with this cookie that fits best. */
  const pick = (cookie: bigint, fit: (q: Request) => number): Request | undefined => {
    const list = waiting.get(cookie);
    if (list === undefined || list.length === 0) return undefined;
    let best = list[0];
    let bestScore = 0;
    for (const q of list) {
      const score = fit(q);
      if (score > bestScore) {
        best = q;
        bestScore = score;
      }
    }
    return best;
  };
  /** How well a simple reply fits a request (0: not at all). */
  const simpleFit = (q: Request, errno: number): number => {
    if (!q.allowed.includes(errno)) return 0;
    if (st.structured && (q.type === P.NBD_CMD_READ || (q.type === P.NBD_CMD_BLOCK_STATUS && errno === 0))) return 0;
    return 1;
  };

  let truncated = false;
  while (r.left > 0) {
    if (r.left < 4) {
      fail(`truncated reply (${r.left} bytes)`);
      truncated = true;
      break;
    }
    const magic = r.buf.readUInt32BE(r.at);
    if (magic === P.NBD_SIMPLE_REPLY_MAGIC) {
      if (r.left < P.simpleReplyHeaderBytes) {
        fail(`truncated simple reply (${r.left} bytes)`);
        truncated = true;
        break;
      }
      r.u32();
      const errno = r.u32();
      const cookie = r.u64();
      if (inProgress.has(cookie)) fail(`simple reply to cookie ${cookie} in the middle of its structured reply`);
      // Requests that share a cookie make simple replies ambiguous (does read data follow, and how
      // much?): prefer the request after whose data the next reply magic (or the end) follows.
      const nextIsReply = (skip: number): boolean => {
        const at = r.at + skip;
        if (at === r.buf.length) return true;
        if (at + 4 > r.buf.length) return false;
        const m = r.buf.readUInt32BE(at);
        return m === P.NBD_SIMPLE_REPLY_MAGIC || m === P.NBD_STRUCTURED_REPLY_MAGIC;
      };
      const dataOf = (c: Request): number => (c.type === P.NBD_CMD_READ && errno === 0 && !st.structured ? c.length : 0);
      const q = pick(cookie, (c) => simpleFit(c, errno) * (nextIsReply(dataOf(c)) ? 2 : 1));
      if (q === undefined) {
        fail(`simple reply (errno ${errno}) to cookie ${cookie}, which has no request outstanding`);
        break;
      }
      if (q.type === P.NBD_CMD_READ && st.structured) fail(`${describe(q)}: simple reply to READ with structured replies`);
      if (q.type === P.NBD_CMD_BLOCK_STATUS && errno === 0) fail(`${describe(q)}: BLOCK_STATUS answered with a simple success`);
      if (q.type === P.NBD_CMD_READ && errno === 0 && !st.structured) {
        if (r.left < q.length) {
          fail(`${describe(q)}: read data truncated (${r.left} of ${q.length} bytes)`);
          truncated = true;
          break;
        }
        checkData(content, q.offset, r.take(q.length), q.length, describe(q), fail);
      }
      trace?.push(`simple reply errno ${errno} cookie ${cookie} -> #${q.index}`);
      settle(q, errno);
      continue;
    }
    if (magic !== P.NBD_STRUCTURED_REPLY_MAGIC) {
      fail(`reply magic 0x${magic.toString(16)} at byte ${r.at}`);
      break;
    }
    if (r.left < P.structuredReplyHeaderBytes) {
      fail(`truncated chunk header (${r.left} bytes)`);
      truncated = true;
      break;
    }
    r.u32();
    const flags = r.u16();
    const type = r.u16();
    const cookie = r.u64();
    const length = r.u32();
    if (r.left < length) {
      fail(`chunk type ${type} of ${length} bytes truncated at ${r.left}`);
      truncated = true;
      break;
    }
    const chunkStart = r.at - P.structuredReplyHeaderBytes;
    const payload = r.take(length);
    if (!st.structured) fail(`structured chunk (type ${type}) without structured replies negotiated`);
    // Requests sharing a cookie: judge by the whole reply (its chunks are contiguous) when it is there.
    const shared = (waiting.get(cookie)?.length ?? 0) > 1;
    const whole = shared && !inProgress.has(cookie) ? peekReply(r.buf, chunkStart, cookie) : undefined;
    const q = inProgress.get(cookie) ?? pick(cookie, (c) => (whole !== undefined ? replyFit(c, whole) : 0) * 10 + chunkFit(c, type, flags, payload));
    if (q === undefined) {
      fail(`chunk type ${type} to cookie ${cookie}, which has no request outstanding`);
      break;
    }
    inProgress.set(cookie, q);
    trace?.push(`chunk type ${type} flags ${flags} cookie ${cookie} ${payload.length >= 12 && type !== 5 && type < 0x8000 ? `at ${payload.readBigUInt64BE(0)}` : ''}${type >= 0x8000 && payload.length >= 6 ? `errno ${payload.readUInt32BE(0)} '${payload.toString('utf8', 6)}'` : ''} ${payload.length} bytes -> #${q.index}`);
    q.chunks++;
    if (flags & ~P.NBD_REPLY_FLAG_DONE) fail(`${describe(q)}: chunk flags 0x${flags.toString(16)}`);
    chunk(q, type, payload, flags, st, fail, describe);
    if (content !== undefined && q.type === P.NBD_CMD_READ) {
      if (type === P.NBD_REPLY_TYPE_OFFSET_DATA && payload.length >= 9) checkData(content, payload.readBigUInt64BE(0), payload.subarray(8), payload.length - 8, describe(q), fail);
      if (type === P.NBD_REPLY_TYPE_OFFSET_HOLE && payload.length === 12) checkData(content, payload.readBigUInt64BE(0), undefined, payload.readUInt32BE(8), describe(q), fail);
    }
    if (flags & P.NBD_REPLY_FLAG_DONE) {
      inProgress.delete(cookie);
      settle(q, finalize(q, st, fail, describe));
    }
  }
  if (!truncated) for (const q of inProgress.values()) fail(`${describe(q)}: structured reply without a DONE chunk`);
  const unanswered = requests.filter((q) => !q.answered);
  if (unanswered.length > 0) {
    const how = close === 'open' ? 'hang: the server neither answered nor closed' : close === 'reset' ? 'the connection was reset' : 'the server closed the connection';
    fail(`${unanswered.length} of ${requests.length} requests unanswered (${how}); first: ${describe(unanswered[0])}`);
  } else {
    if (close === 'open') fail(`${v.outcome}: every request answered but the connection was not closed (hang)`);
    if (close === 'reset') fail(`${v.outcome}: the connection was reset instead of closed cleanly`);
  }
  return v;
}

interface WholeReply {
  readonly errno: number | undefined;
  readonly lo: bigint | undefined;
  readonly hi: bigint | undefined;
  readonly content: number;
  readonly status: number;
  readonly done: boolean;
}

/** The chunks of one reply from `at` on: the run of chunks with this cookie up to DONE. */
function peekReply(buf: Buffer, at: number, cookie: bigint): WholeReply {
  let errno: number | undefined;
  let lo: bigint | undefined;
  let hi: bigint | undefined;
  let content = 0;
  let status = 0;
  let done = false;
  while (at + P.structuredReplyHeaderBytes <= buf.length && buf.readUInt32BE(at) === P.NBD_STRUCTURED_REPLY_MAGIC && buf.readBigUInt64BE(at + 8) === cookie) {
    const flags = buf.readUInt16BE(at + 4);
    const type = buf.readUInt16BE(at + 6);
    const length = buf.readUInt32BE(at + 16);
    const p = buf.subarray(at + P.structuredReplyHeaderBytes, at + P.structuredReplyHeaderBytes + length);
    if ((type === P.NBD_REPLY_TYPE_ERROR || type === P.NBD_REPLY_TYPE_ERROR_OFFSET) && p.length >= 4) errno ??= p.readUInt32BE(0);
    if ((type === P.NBD_REPLY_TYPE_OFFSET_DATA && p.length >= 9) || (type === P.NBD_REPLY_TYPE_OFFSET_HOLE && p.length === 12)) {
      const from = p.readBigUInt64BE(0);
      const to = from + BigInt(type === P.NBD_REPLY_TYPE_OFFSET_HOLE ? p.readUInt32BE(8) : p.length - 8);
      lo = lo === undefined || from < lo ? from : lo;
      hi = hi === undefined || to > hi ? to : hi;
      content++;
    }
    if (type === P.NBD_REPLY_TYPE_BLOCK_STATUS) status++;
    at += P.structuredReplyHeaderBytes + length;
    if (flags & P.NBD_REPLY_FLAG_DONE) {
      done = true;
      break;
    }
  }
  return { errno, lo, hi, content, status, done };
}

/** How well a whole reply fits a request (0: not at all). */
function replyFit(q: Request, w: WholeReply): number {
  if (w.errno !== undefined) return q.allowed.includes(w.errno) ? 2 : 0;
  if (w.content > 0) {
    if (q.type !== P.NBD_CMD_READ || !q.allowed.includes(0)) return 0;
    return w.done && w.lo === q.offset && w.hi === q.offset + BigInt(q.length) ? 3 : 1;
  }
  if (w.status > 0) return q.type === P.NBD_CMD_BLOCK_STATUS && q.allowed.includes(0) ? 2 : 0;
  return 0;
}

/** How well a chunk fits a request (0: not at all), to tell apart requests that share a cookie. */
function chunkFit(q: Request, type: number, flags: number, payload: Buffer): number {
  if (type === P.NBD_REPLY_TYPE_OFFSET_DATA || type === P.NBD_REPLY_TYPE_OFFSET_HOLE) {
    if (q.type !== P.NBD_CMD_READ || !q.allowed.includes(0) || payload.length < 8) return 0;
    const at = payload.readBigUInt64BE(0);
    const end = q.offset + BigInt(q.length);
    const n = type === P.NBD_REPLY_TYPE_OFFSET_HOLE ? BigInt(payload.length >= 12 ? payload.readUInt32BE(8) : 0) : BigInt(payload.length - 8);
    if (at < q.offset || at + n > end) return 0;
    if (flags & P.NBD_REPLY_FLAG_DONE && at === q.offset && at + n === end) return 3; // the whole reply in one chunk
    return at === q.offset ? 2 : 1;
  }
  if (type === P.NBD_REPLY_TYPE_BLOCK_STATUS) return q.type === P.NBD_CMD_BLOCK_STATUS && q.allowed.includes(0) ? 1 : 0;
  if (type === P.NBD_REPLY_TYPE_ERROR || type === P.NBD_REPLY_TYPE_ERROR_OFFSET) return payload.length >= 4 && q.allowed.includes(payload.readUInt32BE(0)) ? 1 : 0;
  return q.allowed.includes(0) && q.type !== P.NBD_CMD_READ && q.type !== P.NBD_CMD_BLOCK_STATUS ? 1 : 0;
}

function chunk(q: Request, type: number, p: Buffer, flags: number, st: TransmissionState, fail: (m: string) => void, describe: (q: Request) => string): void {
  const D = describe(q);
  const end = q.offset + BigInt(q.length);
  switch (type) {
    case P.NBD_REPLY_TYPE_NONE:
      if (p.length !== 0) fail(`${D}: NONE chunk with ${p.length} bytes`);
      if (!(flags & P.NBD_REPLY_FLAG_DONE)) fail(`${D}: NONE chunk without DONE`);
      return;
    case P.NBD_REPLY_TYPE_ERROR:
    case P.NBD_REPLY_TYPE_ERROR_OFFSET: {
      const extra = type === P.NBD_REPLY_TYPE_ERROR_OFFSET ? 8 : 0;
      if (p.length < 6 + extra) {
        fail(`${D}: error chunk of ${p.length} bytes`);
        return;
      }
      const errno = p.readUInt32BE(0);
      const messageLength = p.readUInt16BE(4);
      if (errno === 0) fail(`${D}: error chunk with errno 0`);
      if (p.length !== 6 + messageLength + extra) fail(`${D}: error chunk of ${p.length} bytes with a ${messageLength}-byte message`);
      if (q.error === undefined) q.error = errno;
      return;
    }
    case P.NBD_REPLY_TYPE_OFFSET_DATA:
    case P.NBD_REPLY_TYPE_OFFSET_HOLE: {
      if (q.type !== P.NBD_CMD_READ) {
        fail(`${D}: read chunk type ${type}`);
        return;
      }
      const hole = type === P.NBD_REPLY_TYPE_OFFSET_HOLE;
      if (hole ? p.length !== 12 : p.length < 9) {
        fail(`${D}: chunk type ${type} of ${p.length} bytes`);
        return;
      }
      const at = p.readBigUInt64BE(0);
      const n = BigInt(hole ? p.readUInt32BE(8) : p.length - 8);
      if (n === 0n || at < q.offset || at + n > end) fail(`${D}: chunk type ${type} covers ${at}+${n}, outside the request`);
      q.covered.push([at, at + n]);
      q.contentChunks++;
      return;
    }
    case P.NBD_REPLY_TYPE_BLOCK_STATUS: {
      if (q.type !== P.NBD_CMD_BLOCK_STATUS) {
        fail(`${D}: BLOCK_STATUS chunk`);
        return;
      }
      if (p.length < 12 || (p.length - 4) % 8 !== 0) {
        fail(`${D}: BLOCK_STATUS chunk of ${p.length} bytes`);
        return;
      }
      const id = p.readUInt32BE(0);
      if (!st.contexts.has(id)) fail(`${D}: BLOCK_STATUS for context id ${id}, not selected (${[...st.contexts.keys()].join(',')})`);
      if (q.statusContexts.has(id)) fail(`${D}: two BLOCK_STATUS chunks for context ${id}`);
      q.statusContexts.add(id);
      const count = (p.length - 4) / 8;
      if (q.flags & P.NBD_CMD_FLAG_REQ_ONE && count !== 1) fail(`${D}: REQ_ONE answered with ${count} descriptors`);
      let total = 0n;
      for (let i = 0; i < count; i++) {
        const n = p.readUInt32BE(4 + 8 * i);
        if (n === 0) fail(`${D}: descriptor ${i} of length 0`);
        total += BigInt(n);
      }
      if (q.offset + total > BigInt(st.export.sizeBytes)) fail(`${D}: descriptors total ${total}, past the end of the export`);
      if (q.flags & P.NBD_CMD_FLAG_REQ_ONE && total > BigInt(q.length)) fail(`${D}: REQ_ONE descriptor of ${total} bytes exceeds the request`);
      return;
    }
    default:
      fail(`${D}: unknown chunk type ${type}`);
  }
}

function finalize(q: Request, st: TransmissionState, fail: (m: string) => void, describe: (q: Request) => string): number {
  if (q.error !== undefined) return q.error;
  const D = describe(q);
  if (q.type === P.NBD_CMD_READ) {
    const spans = [...q.covered].sort((a, b) => (a[0] < b[0] ? -1 : a[0] > b[0] ? 1 : 0));
    let at = q.offset;
    for (const [from, to] of spans) {
      if (from !== at) {
        fail(`${D}: read chunks ${from < at ? 'overlap' : 'leave a gap'} at ${at}`);
        break;
      }
      at = to;
    }
    if (at !== q.offset + BigInt(q.length)) fail(`${D}: read chunks cover up to ${at}, not the whole request`);
    if (q.flags & P.NBD_CMD_FLAG_DF && q.contentChunks > 1) fail(`${D}: DF read answered in ${q.contentChunks} chunks`);
  } else if (q.type === P.NBD_CMD_BLOCK_STATUS) {
    if (q.statusContexts.size !== st.contexts.size) fail(`${D}: ${q.statusContexts.size} BLOCK_STATUS chunks for ${st.contexts.size} contexts`);
  } else if (q.covered.length > 0 || q.statusContexts.size > 0) fail(`${D}: data chunks for a command without data`);
  return 0;
}
