/**
 * The seam between the engine and any protocol server: one narrow interface in the style of an
 * nbdkit plugin's op table. packages/nbd imports only this file's types from @cowstack/core.
 *
 * Offsets and lengths are byte counts as JavaScript numbers (exact below 2^53 = 8 PiB; devices are
 * capped there). Errors cross the seam as BlockDeviceError with a POSIX-style code; the protocol
 * server maps codes to its own errnos in one table.
 */

export type BlockDeviceErrorCode = 'EIO' | 'ENOSPC' | 'EINVAL' | 'EPERM' | 'EROFS' | 'EOVERFLOW' | 'ENOTSUP' | 'ESHUTDOWN';

export class BlockDeviceError extends Error {
  readonly code: BlockDeviceErrorCode;

  constructor(code: BlockDeviceErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'BlockDeviceError';
    this.code = code;
  }
}

/** A piece of a sparse read: `data` present, or absent meaning `length` bytes of zeroes. */
export interface ReadPiece {
  readonly length: number;
  readonly data: Buffer | undefined;
}

/**
 * A read result: one Buffer of exactly the requested length (the common, allocation-free case), or
 * pieces in order whose lengths sum to the requested length (zero pieces let a server send holes).
 */
export type ReadResult = Buffer | readonly ReadPiece[];

/**
 * Metadata contexts a device can describe: allocation, allocation depth, and qemu-style dirty bitmaps
 * (`qemu:dirty-bitmap:NAME`, where cowstack's NAME is a point in the journal: a snapshot name,
 * `seq:N` or `time:ISO-8601`; dirty = written since that point).
 */
export type ExtentContext = 'base:allocation' | 'qemu:allocation-depth' | `qemu:dirty-bitmap:${string}`;

export const dirtyBitmapPrefix = 'qemu:dirty-bitmap:';

/**
 * One extent of block status, in order from the requested offset. For 'base:allocation': `hole` (not
 * allocated in any layer) and `zero` (reads as zeroes). For 'qemu:allocation-depth': `depth`, 0 when
 * no layer (base included) holds the range, 1 when the top layer does, N for the Nth layer down.
 */
export interface Extent {
  readonly length: number;
  readonly hole: boolean;
  readonly zero: boolean;
  readonly depth: number;
  /** For a `qemu:dirty-bitmap:*` context: changed since the bitmap's point. */
  readonly dirty?: boolean;
}

export interface WriteFlags {
  /** Force unit access: durable before the promise resolves. */
  readonly fua: boolean;
}

export interface ZeroFlags extends WriteFlags {
  /** The device may deallocate (punch a hole) instead of writing zeroes. */
  readonly mayTrim: boolean;
  /** Fail with ENOTSUP rather than do slow work (NBD_CMD_FLAG_FAST_ZERO). */
  readonly fast: boolean;
}

export interface BlockDevice {
  readonly sizeBytes: number;
  readonly readOnly: boolean;
  /** Smallest unit the device handles without read-modify-write (advertised as preferred size). */
  readonly blockSizeBytes: number;
  /** True when a flush on any handle makes writes acknowledged on every handle durable. */
  readonly canMultiConn: boolean;
  /** True when zero(..., { fast: true }) can succeed (writing zeroes costs no data I/O). */
  readonly canFastZero: boolean;
  /** The metadata contexts extents() answers, as listed to clients. */
  readonly extentContexts: readonly ExtentContext[];
  /** Whether extents() also answers a context not listed (e.g. a dirty bitmap named by a seq). */
  acceptsContext?(name: string): boolean;

  read(offset: number, length: number): Promise<ReadResult>;
  /** The caller is done with a read's result (its bytes were sent): the device may reuse the memory. */
  recycle?(result: ReadResult): void;
  /** The device takes `data` over (it may keep it, without copying, after the promise settles): never reuse it. */
  write(offset: number, data: Buffer, flags: WriteFlags): Promise<void>;
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void>;
  trim(offset: number, length: number, flags: WriteFlags): Promise<void>;
  flush(): Promise<void>;
  /** A hint to bring the range into cache; may do nothing. */
  cache(offset: number, length: number): Promise<void>;
  /** Block status from `offset`; may cover less than `length` but at least one byte. */
  extents(offset: number, length: number, context: ExtentContext): Promise<Extent[]>;
}

/** What a server exports: a named device, with an optional description, found at connect time. */
export interface ExportInfo {
  readonly name: string;
  readonly description: string;
}

/** Who a connection is, as the server knows it: recorded with writes so `blame` can name the client. */
export interface ClientInfo {
  /** The server's connection number. */
  readonly id: number;
  /** The peer address ("unix" for a unix socket, else host:port). */
  readonly peer: string;
}

/** The server asks this at every handshake, so exports created later appear at once. */
export interface ExportProvider {
  list(): readonly ExportInfo[];
  /** The device for an export name, or undefined when there is none. The empty name is the default. */
  open(name: string, client?: ClientInfo): BlockDevice | undefined;
}
