/**
 * Checks a transmission request against the negotiated state before any device call, and names the
 * errno the spec asks for. Pure. Order (as nbdkit): unknown command, read-only export, flags, then
 * offset/length. Decisions, from doc/proto.md "Error values" and the command sections:
 * - unknown command, unknown flag, or a flag not documented for the command or not advertised: EINVAL
 * - WRITE, WRITE_ZEROES or TRIM on a read-only export: EPERM
 * - FLUSH with nonzero offset or length: EINVAL
 * - length 0 on any other command: EINVAL (the spec leaves it unspecified; nbdkit says EINVAL)
 * - past the end of the export: ENOSPC for WRITE and WRITE_ZEROES, EINVAL for READ, TRIM, CACHE and
 *   BLOCK_STATUS
 * - READ or WRITE longer than maxPayloadBytes: EINVAL (client MUST NOT send; not a DoS below the cap)
 * - BLOCK_STATUS without structured replies or without a selected metadata context: EINVAL
 */
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_FLAG_FUA,
  NBD_CMD_FLAG_NO_HOLE,
  NBD_CMD_FLAG_REQ_ONE,
  NBD_CMD_FLUSH,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_ENOSPC,
  NBD_EPERM,
  NBD_FLAG_SEND_DF,
  NBD_FLAG_SEND_FAST_ZERO,
  NBD_FLAG_SEND_FUA,
  commandName,
} from './protocol-constants.js';
import type { RequestHeader } from './request-codec.js';

export interface ValidationContext {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  readonly transmissionFlags: number;
  readonly structuredReplies: boolean;
  readonly metaContextCount: number;
  readonly maxPayloadBytes: number;
}

export interface Rejection {
  readonly errno: number;
  readonly message: string;
}

const allFlags = NBD_CMD_FLAG_FUA | NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_DF | NBD_CMD_FLAG_REQ_ONE | NBD_CMD_FLAG_FAST_ZERO;

function reject(errno: number, message: string): Rejection {
  return { errno, message };
}

/** Undefined when the request may go to the device; otherwise the errno and a message. */
export function validateRequest(request: RequestHeader, ctx: ValidationContext): Rejection | undefined {
  const { type, flags, offset, length } = request;
  const name = commandName(type);
  switch (type) {
    case NBD_CMD_READ:
    case NBD_CMD_WRITE:
    case NBD_CMD_FLUSH:
    case NBD_CMD_TRIM:
    case NBD_CMD_CACHE:
    case NBD_CMD_WRITE_ZEROES:
    case NBD_CMD_BLOCK_STATUS:
      break;
    default:
      return reject(NBD_EINVAL, `unknown command ${type}`);
  }

  const writes = type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES || type === NBD_CMD_TRIM;
  if (writes && ctx.readOnly) return reject(NBD_EPERM, `${name} on a read-only export`);

  if ((flags & ~allFlags) !== 0) return reject(NBD_EINVAL, `${name}: unknown command flags 0x${flags.toString(16)}`);
  if (flags & NBD_CMD_FLAG_FUA && !(ctx.transmissionFlags & NBD_FLAG_SEND_FUA)) return reject(NBD_EINVAL, `${name}: FUA was not advertised`);
  if (flags & NBD_CMD_FLAG_NO_HOLE && type !== NBD_CMD_WRITE_ZEROES) return reject(NBD_EINVAL, `${name}: NO_HOLE is only valid on WRITE_ZEROES`);
  if (flags & NBD_CMD_FLAG_FAST_ZERO) {
    if (type !== NBD_CMD_WRITE_ZEROES) return reject(NBD_EINVAL, `${name}: FAST_ZERO is only valid on WRITE_ZEROES`);
    if (!(ctx.transmissionFlags & NBD_FLAG_SEND_FAST_ZERO)) return reject(NBD_EINVAL, `${name}: FAST_ZERO was not advertised (the export cannot zero fast)`);
  }
  if (flags & NBD_CMD_FLAG_DF) {
    if (type !== NBD_CMD_READ) return reject(NBD_EINVAL, `${name}: DF is only valid on READ`);
    if (!(ctx.transmissionFlags & NBD_FLAG_SEND_DF)) return reject(NBD_EINVAL, `${name}: DF needs structured replies`);
  }
  if (flags & NBD_CMD_FLAG_REQ_ONE && type !== NBD_CMD_BLOCK_STATUS) return reject(NBD_EINVAL, `${name}: REQ_ONE is only valid on BLOCK_STATUS`);

  if (type === NBD_CMD_FLUSH) {
    if (offset !== 0 || length !== 0) return reject(NBD_EINVAL, 'FLUSH: offset and length must be zero');
    return undefined;
  }
  if (length === 0) return reject(NBD_EINVAL, `${name}: length 0`);
  if (offset > ctx.sizeBytes || length > ctx.sizeBytes - offset) {
    const errno = type === NBD_CMD_WRITE || type === NBD_CMD_WRITE_ZEROES ? NBD_ENOSPC : NBD_EINVAL;
    return reject(errno, `${name}: offset ${offset} + length ${length} is beyond the export size ${ctx.sizeBytes}`);
  }
  if ((type === NBD_CMD_READ || type === NBD_CMD_WRITE) && length > ctx.maxPayloadBytes) {
    return reject(NBD_EINVAL, `${name}: length ${length} exceeds the maximum payload ${ctx.maxPayloadBytes}`);
  }
  if (type === NBD_CMD_BLOCK_STATUS) {
    if (!ctx.structuredReplies) return reject(NBD_EINVAL, 'BLOCK_STATUS needs structured replies');
    if (ctx.metaContextCount === 0) return reject(NBD_EINVAL, 'BLOCK_STATUS needs a metadata context selected with NBD_OPT_SET_META_CONTEXT');
  }
  return undefined;
}
