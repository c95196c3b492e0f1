/**
 * Journal errors: one class, a stable `code` per failure kind (part of the API, like abstract-level's
 * error codes). Corruption errors also name the first bad sequence number and what is wrong with it, so
 * a damaged record is always reported by its seq and never silently skipped.
 */

export type JournalErrorCode =
  | 'ELOCKED' // another process (or another handle in this one) holds the database
  | 'EFORMAT' // not a cowstack journal, or a format version this build does not understand
  | 'ECORRUPT' // a record failed an integrity check; see `seq` and `kind`
  | 'ECLOSED' // the journal is closed or closing
  | 'EIO' // the underlying LevelDB write or read failed
  | 'ERETAINED' // the requested records were dropped by the retention policy
  | 'EINVAL' // bad argument
  | 'ENOENT'; // no journal at that path and creation was not asked for

export type CorruptionKind =
  | 'crc' // the record's chained CRC does not match its content
  | 'payload-crc' // the record's payload does not match its payload CRC
  | 'payload-missing' // the record's payload should be retained but is not stored
  | 'gap' // a sequence number is missing
  | 'chain' // the record does not chain to the record before it
  | 'decode' // the stored value cannot be decoded
  | 'key' // the key does not match the record it holds
  | 'checkpoint'; // a checkpoint blob fails its CRC or cannot be decoded

export class JournalError extends Error {
  readonly code: JournalErrorCode;

  constructor(code: JournalErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'JournalError';
    this.code = code;
  }
}

export class JournalCorruptionError extends JournalError {
  readonly seq: number;
  readonly kind: CorruptionKind;
  /** Damage inside a stored frame: the frame's first seq (its key), which may come before `seq`. */
  readonly frameSeq: number | undefined;

  constructor(seq: number, kind: CorruptionKind, detail: string, frameSeq?: number) {
    super('ECORRUPT', `journal record seq ${seq} is corrupt (${kind}): ${detail}`);
    this.name = 'JournalCorruptionError';
    this.seq = seq;
    this.kind = kind;
    this.frameSeq = frameSeq;
  }
}

export function assert(condition: unknown, message: string): asserts condition {
  if (!condition) throw new Error(`journal invariant violated: ${message}`);
}

/**
 * A damaged record past the last durable point of the log: after an OS crash, frames that were never
 * synced can survive while their payload bytes did not. That is a torn tail, not corruption: nothing
 * in it was promised durable. `Journal.cutTail(seq)` removes it.
 */
export class JournalTornTailError extends JournalCorruptionError {
  constructor(seq: number, kind: CorruptionKind, detail: string, durableSeq: number) {
    super(seq, kind, `${detail}; it is past the last durable seq ${durableSeq}, so this is a torn tail left by a crash (cut it with cutTail)`);
    this.name = 'JournalTornTailError';
  }
}
