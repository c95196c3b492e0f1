/**
 * Errors of the NBD package: one class with a stable `code` per failure kind (part of the API). These
 * are errors of the server's own API (bad options, listen failures); protocol errors a client causes
 * never throw out of a connection: they become NBD errnos or a disconnect (see errno-table.ts).
 */

export type NbdServerErrorCode =
  | 'EINVAL' // bad argument to the server's API
  | 'EADDRINUSE' // the socket path or port is in use
  | 'ECLOSED' // the server is closed or closing
  | 'EPROTO'; // a client broke the protocol (used internally, logged, never thrown to callers)

export class NbdServerError extends Error {
  readonly code: NbdServerErrorCode;

  constructor(code: NbdServerErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'NbdServerError';
    this.code = code;
  }
}

/** An invariant of this package; a failure is a bug in the server, never in a client. */
export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`nbd invariant violated: ${message}`);
}
