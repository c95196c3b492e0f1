/**
 * The one table from errors to NBD errnos. Device errors cross the seam as BlockDeviceError with a
 * POSIX-style code; plain Node errors that carry a POSIX `code` (an fs error that leaked through) map
 * by the same table; anything else is an unexpected failure and becomes EIO.
 *
 * Two codes depend on the request, as the spec restricts them (and as nbdkit does):
 * - ENOTSUP is only sent for a WRITE_ZEROES with NBD_CMD_FLAG_FAST_ZERO; otherwise EINVAL.
 * - EOVERFLOW is only sent for a READ with NBD_CMD_FLAG_DF or a command without payload (TRIM,
 *   WRITE_ZEROES, BLOCK_STATUS, CACHE) whose length was too large; otherwise EINVAL.
 */
import { BlockDeviceError } from '@cowstack/core';
import {
  NBD_CMD_BLOCK_STATUS,
  NBD_CMD_CACHE,
  NBD_CMD_FLAG_DF,
  NBD_CMD_FLAG_FAST_ZERO,
  NBD_CMD_READ,
  NBD_CMD_TRIM,
  NBD_CMD_WRITE_ZEROES,
  NBD_EINVAL,
  NBD_EIO,
  NBD_ENOMEM,
  NBD_ENOSPC,
  NBD_ENOTSUP,
  NBD_EOVERFLOW,
  NBD_EPERM,
  NBD_ESHUTDOWN,
} from './protocol-constants.js';

/** POSIX code → NBD errno. BlockDeviceErrorCode is a subset of the keys. */
export const errnoTable: Readonly<Record<string, number>> = Object.freeze({
  EPERM: NBD_EPERM,
  EACCES: NBD_EPERM,
  EROFS: NBD_EPERM,
  EIO: NBD_EIO,
  ENOMEM: NBD_ENOMEM,
  EINVAL: NBD_EINVAL,
  ENOSPC: NBD_ENOSPC,
  EDQUOT: NBD_ENOSPC,
  EFBIG: NBD_ENOSPC,
  EOVERFLOW: NBD_EOVERFLOW,
  ENOTSUP: NBD_ENOTSUP,
  EOPNOTSUPP: NBD_ENOTSUP,
  ESHUTDOWN: NBD_ESHUTDOWN,
});

/** The POSIX code of an error if it has one this table knows, else undefined. */
export function posixCodeOf(error: unknown): string | undefined {
  if (error instanceof BlockDeviceError) return error.code;
  if (typeof error === 'object' && error !== null && 'code' in error) {
    const code = (error as { code: unknown }).code;
    if (typeof code === 'string' && Object.hasOwn(errnoTable, code)) return code;
  }
  return undefined;
}

/** The NBD errno to send for `error` thrown while serving a request of `command` with `flags`. */
export function nbdErrnoFor(error: unknown, command: number, flags: number): number {
  const code = posixCodeOf(error);
  if (code === undefined) return NBD_EIO;
  const errno = errnoTable[code];
  if (errno === NBD_ENOTSUP) {
    return command === NBD_CMD_WRITE_ZEROES && (flags & NBD_CMD_FLAG_FAST_ZERO) !== 0 ? NBD_ENOTSUP : NBD_EINVAL;
  }
  if (errno === NBD_EOVERFLOW) {
    const payloadless = command === NBD_CMD_TRIM || command === NBD_CMD_WRITE_ZEROES || command === NBD_CMD_BLOCK_STATUS || command === NBD_CMD_CACHE;
    const dfRead = command === NBD_CMD_READ && (flags & NBD_CMD_FLAG_DF) !== 0;
    return payloadless || dfRead ? NBD_EOVERFLOW : NBD_EINVAL;
  }
  return errno;
}

/** Short message for an error, for structured error chunks and logs. */
export function errorMessageOf(error: unknown): string {
  if (error instanceof Error) return error.message;
  return String(error);
}
