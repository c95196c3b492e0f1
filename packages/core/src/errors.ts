/**
 * Store errors: one class with a stable code for every store-level failure (create, open, volume and
 * snapshot management, recovery). Block I/O through a device fails with BlockDeviceError instead,
 * whose codes the protocol server maps to wire errnos.
 */

export type StoreErrorCode =
  | 'ENOENT' // no such store, volume, snapshot or layer
  | 'EEXIST' // the store, volume or snapshot already exists
  | 'EINVAL' // a bad argument (size, block size, name)
  | 'ELOCKED' // another process holds the store
  | 'EFORMAT' // a store format this build does not know
  | 'ECHANGED' // the external base image changed since the store was created
  | 'EBUSY' // the operation conflicts with the layer tree (shared layer, volume in use)
  | 'ECORRUPT' // the journal or a checkpoint is damaged; see the message for the seq
  | 'ERANGE' // a point in the past outside the journal's retention window
  | 'EIO'; // a file operation failed

export class StoreError extends Error {
  readonly code: StoreErrorCode;

  constructor(code: StoreErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'StoreError';
    this.code = code;
  }
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`cowstack invariant violated: ${message}`);
}
