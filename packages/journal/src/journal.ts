/**
 * The journal: a durable, ordered, CRC-chained log of records on one LevelDB database.
 *
 * Write path (group commit): `append` encodes its record at once and queues it; every append issued
 * before the queue is flushed (one event-loop turn, plus whatever arrives while earlier batches are
 * being written) goes into one atomic LevelDB batch. A batch is written with `sync: true` if any
 * member asked for it or a `sync()` call is waiting. Up to maxBatchesInFlight unsynced batches are
 * written at once; each reserves its seqs when it starts and commits only after the one before it,
 * so nothing commits out of order. A failed batch fails the ones behind it (their frames are taken
 * back) and consumes no seq. A crash can leave a later batch's frames without an earlier one's; both
 * are past the durable mark, so replay reports the hole as a torn tail. An unsynced batch writes its
 * payloads to the payload log while LevelDB writes its frames, and a synced one flushes them while
 * LevelDB writes and syncs its frames, so a crash can also leave the newest batch's frames without
 * their payloads: a torn tail too (see payload-log.ts). The durable mark in LevelDB therefore trails
 * a synced batch by one batch; the seal says it at once (see markedDurableSeq).
 *
 * After a batch commits, the `onCommit` hook sees its records in seq order, synchronously, before any
 * member's promise resolves: a consumer that applies records there applies them in exactly journal
 * order (the live path and replay cannot disagree about order).
 *
 * Replay is an RxJS Observable that reads frames in chunks from a LevelDB iterator (the next chunk is
 * read while one is consumed, and a consumer can hold it back with `pause`), verifies each frame
 * (chained CRC, no gap, chains to its predecessor) and each payload, and errors, never skips, on the
 * first bad record, naming its seq. It stops reading as soon as it is unsubscribed.
 */
import { existsSync } from 'node:fs';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { Level } from 'level';
import { Packr } from 'msgpackr';
import { concatAll, Observable, Subject } from 'rxjs';
import { type DecodedFrame, decodeFrame, encodeFrame, encodeRecord, type EncodedRecord, hex } from './batch-codec.js';
import { type Checkpoint, decodeCheckpoint, encodeCheckpoint } from './checkpoint-codec.js';
import { assert, type CorruptionKind, JournalCorruptionError, JournalError, JournalTornTailError } from './errors.js';
import {
  checkpointKey,
  checkpointPrefix,
  checkpointRange,
  metaKey,
  recordKey,
  recordPrefix,
  recordRange,
  seqOfKey,
} from './keys.js';
import { entriesRestoredByTable, restorable, type SetAsideTable, setAsideDamagedTables } from './level-salvage.js';
import { LevelTableDamage, verifyLevelTables } from './level-tables.js';
import { PayloadLog, type PayloadReservation } from './payload-log.js';
import { Seal } from './seal.js';
import {
  journalFormatVersion,
  maxBatchValueBytes,
  maxBatchesInFlight,
  maxPayloadBytes,
  maxSeq,
  payloadSegmentBytes,
  replayChunkBytes,
  replayChunkValues,
} from './limits.js';

const formatName = 'cowstack-journal';
const metaPackr = new Packr({ useRecords: false });

/** The LevelDB put that moves the durable mark (metadata key 'durable') to `seq`. */
function durableMarkOp(seq: number): { type: 'put'; key: Buffer; value: Buffer } {
  return { type: 'put', key: metaKey('durable'), value: metaPackr.pack(seq) };
}
/** Journal metadata: why the seal was damaged, until a caller acknowledges it (see damagedSeal). */
const sealDamageMetaName = 'seal-damage';

/** A string packed into metadata, or undefined if it is not one. */
function unpackReason(raw: Buffer): string | undefined {
  try {
    const value: unknown = metaPackr.unpack(raw);
    return typeof value === 'string' ? value : undefined;
  } catch {
    return undefined;
  }
}

/** One committed record, as replay and the commit hook see it. */
export interface JournalRecord<M = unknown> {
  readonly seq: number;
  /** Commit time of the record's batch, ms since the epoch. */
  readonly timeMs: number;
  readonly meta: M;
  /** Length of the payload when it was appended (kept after retention drops the payload). */
  readonly payloadLength: number;
  readonly payloadCrc: number;
  /** The payload, or undefined when there is none, it was not asked for, or retention dropped it. */
  readonly payload: Buffer | undefined;
  /** The record's chained CRC32C. */
  readonly crc: number;
}

export interface AppendOptions {
  /** Bytes stored beside the record (write data). Retention may drop them later; the CRC stays. */
  readonly payload?: Buffer;
  /**
   * The payload's CRC32C when the caller has it already (the store combines it from a write's block
   * CRCs), so the journal need not read the bytes again. Replay checks the payload against it like
   * any other.
   */
  readonly payloadCrc?: number;
  /** Make this record (and everything before it) durable before the promise resolves. */
  readonly sync?: boolean;
}

export interface ReplayOptions {
  /** Read, verify and return payloads (default true). */
  readonly payloads?: boolean;
  /** Recompute every record's chained CRC instead of one check per frame (default false). */
  readonly fullCheck?: boolean;
  /**
   * Backpressure for a consumer that queues work of its own (recovery writes layer data behind):
   * called after each frame's records are delivered; replay reads on once a returned promise resolves.
   */
  readonly pause?: () => Promise<void> | undefined;
  /**
   * Payloads of records at or before this seq that are missing or fail their CRC come back undefined
   * instead of failing the replay (salvage re-applying what is kept where a checkpoint holds the
   * state; default: none).
   */
  readonly damagedPayloadsThrough?: number;
}

export interface BatchCommitted {
  readonly firstSeq: number;
  readonly records: number;
  readonly bytes: number;
  readonly sync: boolean;
  readonly durationMs: number;
}

export interface JournalStats {
  /** Records retained (first..last). */
  readonly records: number;
  /** First retained seq; last committed seq (0 when the journal is empty). */
  readonly firstSeq: number;
  readonly lastSeq: number;
  /** Payloads of records at or below this seq were dropped by retention (0: none dropped). */
  readonly payloadsDroppedThroughSeq: number;
  /** Bytes of the database's files on disk (records, payloads, spare segments, checkpoints, LevelDB overhead). */
  readonly diskBytes: number;
  /** Of diskBytes, retired payload segments kept for reuse (at most payloadSpareSegments files). */
  readonly spareBytes: number;
  /** Why the seal could not be written, if it could not (damage detection is weaker then). */
  readonly sealError: string | undefined;
  readonly checkpointSeqs: number[];
}

export interface VerifyProblem {
  readonly seq: number;
  readonly kind: string;
  readonly message: string;
  /**
   * For a gap or a damaged frame, the records the walk passed over, fromSeq..toSeq: a gap's missing
   * seqs; a damaged frame's records from its first (which may come before `seq`) up to the next
   * frame, so with any missing right after it.
   */
  readonly fromSeq?: number;
  readonly toSeq?: number;
  /** Past the last durable seq: a torn tail a crash left, which opening a store cuts (see cutTail). */
  readonly tornTail?: boolean;
}

export interface VerifyReport {
  readonly ok: boolean;
  readonly recordsChecked: number;
  readonly payloadsChecked: number;
  readonly firstSeq: number;
  readonly lastSeq: number;
  /** Every bad record or gap in seq order (the walk goes on at the next frame), then every bad checkpoint. */
  readonly problems: VerifyProblem[];
}

export interface OpenOptions<M> {
  /** Create the journal when the directory holds none (default false). */
  readonly create?: boolean;
  /**
   * Called synchronously, in seq order, with each committed batch before its appends resolve;
   * `durable` when the batch was written with sync.
   */
  readonly onCommit?: (records: ReadonlyArray<JournalRecord<M>>, durable: boolean) => void;
  /**
   * Salvage: when the last frames cannot be decoded, open anyway from the last good frame (the
   * damaged ones are dropped by a later discardFrom). Without it, a damaged last frame refuses open.
   */
  readonly skipDamagedTail?: boolean;
  /** Size at which a payload log segment is closed (default payloadSegmentBytes); tests use small ones. */
  readonly payloadSegmentBytes?: number;
}

/** What `Journal.salvageTables` did. */
export interface TableSalvageReport {
  /** The damaged tables, each moved into `damaged/`, and how many of its entries were written back. */
  readonly tables: ReadonlyArray<Omit<SetAsideTable, 'entries'> & { readonly entriesRestored: number }>;
  /** What was wrong with the MANIFEST, when it alone was damaged (LevelDB's repair rewrote it). */
  readonly manifestProblem: string | undefined;
  /** The format record was lost with a damaged table and has been written anew. */
  readonly formatRewritten: boolean;
  /** The retention record was lost with a damaged table and has been rebuilt from the frames. */
  readonly retentionRebuilt: boolean;
  /**
   * Frames lost from the journal's end that its newest checkpoint covers: the journal resumes after
   * that checkpoint (`throughSeq`), its older records dropped as retention would.
   */
  readonly resumedAfterCheckpoint: { readonly fromSeq: number; readonly throughSeq: number } | undefined;
}

interface Retention {
  /** First retained seq (records below were dropped). */
  firstSeq: number;
  /** Chained CRC of the record before firstSeq. */
  chainBefore: number;
  /** Payloads of records <= this seq are dropped. */
  payloadsThrough: number;
}

interface Pending<M> {
  readonly meta: M;
  readonly encoded: EncodedRecord;
  readonly payload: Buffer | undefined;
  readonly resolve: (seq: number) => void;
  readonly reject: (err: unknown) => void;
}

type Db = Level<Buffer, Buffer>;

type BatchOp = { type: 'put'; key: Buffer; value: Buffer } | { type: 'del'; key: Buffer };

/**
 * abstract-level's implementation method behind `batch` (its private API, which classic-level
 * provides): it takes the operations as they are, Buffers here, and hands them to LevelDB.
 */
interface BatchImplementation {
  _batch(operations: BatchOp[], options: { sync: boolean }): Promise<void>;
}

export class Journal<M = unknown> {
  readonly path: string;
  /** Called with each committed batch, in seq order, before the batch's appends resolve. */
  onCommit: ((records: ReadonlyArray<JournalRecord<M>>, durable: boolean) => void) | undefined;
  /** Every committed batch, for metrics. */
  readonly batches$ = new Subject<BatchCommitted>();
  /** Every committed record (payloads omitted), for live tailing. */
  readonly records$ = new Subject<JournalRecord<M>>();

  private readonly db: Db;
  private readonly payloadLog: PayloadLog;
  private readonly seal: Seal;
  /** Opened with skipDamagedTail while the seal says records are missing: where they were. */
  private missingTail: { fromSeq: number; toSeq: number } | undefined;
  /** Opened with skipDamagedTail and the retention record was damaged: it was rebuilt. */
  private retentionRebuilt = false;
  /** The first failed seal write (kept for diagnosis; journal writes go on). */
  private sealFailure: Error | undefined;
  /** Why the seal could not be read at open, when it was damaged (it has been written anew since). */
  private sealDamage: string | undefined;
  /** The committed end of the log: the seq after the last committed record, and that record's chained CRC. */
  private nextSeq: number;
  private lastChain: number;
  /**
   * Where the next batch to start goes: past the batches in flight. Equal to nextSeq and lastChain
   * when none is in flight; set back to them once the batches in flight after a failed one settle.
   */
  private reservedSeq: number;
  private reservedChain: number;
  /** Batches written and not yet settled, oldest first (at most maxBatchesInFlight, one if synced). */
  private readonly inFlight: Array<{ readonly sync: boolean; readonly settled: Promise<boolean> }> = [];
  /** A batch in flight failed: the ones behind it fail too, and no batch starts until all settle. */
  private rollingBack = false;
  /** Frames of a failed pipeline could not be taken back: every later append fails with this. */
  private broken: JournalError | undefined;
  /**
   * Records up to here are known to have been committed: by this process, or (from the seal at open)
   * before a process crash in this boot, or made durable. A hole at or below it is damage, not a
   * torn tail.
   */
  private knownCommittedSeq = 0;
  /** Resolves the flush loop's wait for more work (set while it waits). */
  private wakeFlushLoop: (() => void) | undefined;
  private durableSeq: number;
  /**
   * The durable mark as LevelDB holds it (metadata key 'durable'). A synced batch's frames are written
   * while its payloads are being flushed, so its frames can only carry the mark as it stood before
   * it; the next batch carries the new one, or, with nothing left to write, a put of its own
   * (carryDurableMark; `sync()` and close wait for it). Meanwhile the seal, rewritten after every
   * batch, says it: exactly after a process crash, and as of the last synced batch's flush after an
   * OS crash. Open takes the higher of the two.
   */
  private markedDurableSeq: number;
  /** Syncs waiting for LevelDB's durable mark to reach their seq (see sync). */
  private markWaiters: Array<{ seq: number; resolve: () => void; reject: (err: unknown) => void }> = [];
  private retention: Retention;
  private pending: Pending<M>[] = [];
  private pendingSync = false;
  private syncWaiters: Array<{ resolve: () => void; reject: (err: unknown) => void }> = [];
  private flushScheduled = false;
  private flushActive = false;
  private flushDone: Promise<void> = Promise.resolve();
  private closed = false;

  private constructor(
    path: string,
    db: Db,
    payloadLog: PayloadLog,
    seal: Seal,
    retention: Retention,
    nextSeq: number,
    lastChain: number,
    durableSeq: number,
    markedDurableSeq: number,
    onCommit: OpenOptions<M>['onCommit'],
  ) {
    this.path = path;
    this.db = db;
    this.payloadLog = payloadLog;
    this.seal = seal;
    this.retention = retention;
    this.nextSeq = nextSeq;
    this.lastChain = lastChain;
    this.reservedSeq = nextSeq;
    this.reservedChain = lastChain;
    this.durableSeq = Math.min(durableSeq, nextSeq - 1);
    this.markedDurableSeq = markedDurableSeq;
    this.onCommit = onCommit;
  }

  /** Open (or, with `create`, create) the journal in directory `path`. */
  static async open<M = unknown>(path: string, options: OpenOptions<M> = {}): Promise<Journal<M>> {
    const create = options.create ?? false;
    if (!create && !existsSync(join(path, 'CURRENT'))) {
      throw new JournalError('ENOENT', `no journal at ${path}`);
    }
    if (existsSync(join(path, 'CURRENT'))) Journal.verifyTables(path);
    const db: Db = new Level<Buffer, Buffer>(path, { keyEncoding: 'buffer', valueEncoding: 'buffer', createIfMissing: create });
    try {
      await db.open();
    } catch (err) {
      const cause = (err as { cause?: { code?: string } }).cause;
      if (cause?.code === 'LEVEL_LOCKED') {
        throw new JournalError('ELOCKED', `journal ${path} is in use by another process (its LevelDB LOCK is held)`, { cause: err });
      }
      throw new JournalError('EIO', `cannot open journal ${path}: ${(cause as Error | undefined)?.message ?? (err as Error).message}`, { cause: err });
    }
    try {
      await Journal.checkFormat(path, db);
      let retentionRebuilt = false;
      const retention = await Journal.readRetention(path, db).catch(async (err: unknown) => {
        if (options.skipDamagedTail !== true) throw err;
        retentionRebuilt = true;
        return Journal.rebuildRetention(db);
      });
      const [lastKey, lastValue] = await Journal.lastEntry(db, recordRange);
      let nextSeq = retention.firstSeq;
      let lastChain = retention.chainBefore;
      if (lastKey !== undefined && lastValue !== undefined) {
        const frame = options.skipDamagedTail === true ? await Journal.lastGoodFrame(db) : decodeFrame(seqOfKey(lastKey), lastValue, undefined, true);
        if (frame !== undefined) {
          nextSeq = frame.firstSeq + frame.count;
          lastChain = frame.lastChain;
        }
      }
      const durableSeq = (await Journal.readMeta<number>(path, db, 'durable', 'durable mark')) ?? 0;
      if (!Number.isSafeInteger(durableSeq) || durableSeq < 0) throw new JournalError('ECORRUPT', `journal ${path}: its durable mark (metadata key 'durable') is damaged`);
      const payloadLog = new PayloadLog(path, options.payloadSegmentBytes ?? payloadSegmentBytes);
      const seal = new Seal(payloadLog.dir);
      const reading = seal.read();
      const sealed = reading.kind === 'ok' ? reading.state : undefined;
      const lastSeq = nextSeq - 1;
      let missingTail: Journal<M>['missingTail'];
      if (sealed !== undefined && (lastSeq < sealed.durableSeq || (lastSeq < sealed.committedSeq && seal.sameBoot(sealed)))) {
        missingTail = { fromSeq: lastSeq + 1, toSeq: lastSeq < sealed.durableSeq ? Math.max(sealed.durableSeq, sealed.committedSeq) : sealed.committedSeq };
        if (options.skipDamagedTail !== true) {
          payloadLog.close();
          seal.close();
          throw new JournalCorruptionError(
            missingTail.fromSeq,
            'gap',
            `records seq ${missingTail.fromSeq}..${missingTail.toSeq} were committed${lastSeq < sealed.durableSeq ? ' and made durable' : ' in this boot'} (the journal's seal says so), but LevelDB no longer has them: its write-ahead log was damaged`,
          );
        }
      }
      const journal = new Journal<M>(path, db, payloadLog, seal, retention, nextSeq, lastChain, Math.max(durableSeq, sealed?.durableSeq ?? 0), durableSeq, options.onCommit);
      journal.missingTail = missingTail;
      if (sealed !== undefined) journal.knownCommittedSeq = Math.min(lastSeq, seal.sameBoot(sealed) ? Math.max(sealed.committedSeq, sealed.durableSeq) : sealed.durableSeq);
      journal.retentionRebuilt = retentionRebuilt;
      if (reading.kind === 'damaged') {
        // Unreadable, the seal witnesses nothing: it says again how far LevelDB's records go, so
        // that losses from here on are noticed. The damage is kept in the metadata until a caller
        // that reported it acknowledges it: an open that fails after this one must not lose it.
        journal.sealDamage = reading.reason;
        await db.put(metaKey(sealDamageMetaName), metaPackr.pack(reading.reason), { sync: true });
        journal.writeSeal();
      } else {
        const pending = await db.get(metaKey(sealDamageMetaName));
        if (pending !== undefined) journal.sealDamage = unpackReason(pending) ?? 'an earlier open found it damaged';
      }
      return journal;
    } catch (err) {
      await db.close().catch(() => undefined);
      if (!(err instanceof JournalError)) throw levelDamage(path, err, 'opening it');
      throw err;
    }
  }

  /**
   * Check LevelDB's tables before LevelDB reads them (see level-tables.ts). Damage found is checked
   * once more, in case another process holding the database was compacting it meanwhile (opening
   * then fails with ELOCKED, as it should).
   */
  private static verifyTables(path: string): void {
    for (let attempt = 1; ; attempt++) {
      try {
        verifyLevelTables(path);
        return;
      } catch (err) {
        if (!(err instanceof LevelTableDamage)) throw new JournalError('EIO', `cannot read journal ${path}: ${(err as Error).message}`, { cause: err });
        if (attempt === 2) throw new JournalError('ECORRUPT', `journal ${path}: ${err.message}`, { cause: err });
      }
    }
  }

  private static async checkFormat(path: string, db: Db): Promise<void> {
    const raw = await db.get(metaKey('format'));
    if (raw === undefined) {
      const any = await db.keys({ limit: 1 }).all();
      if (any.length > 0) throw new JournalError('EFORMAT', `${path} is a LevelDB database but not a cowstack journal (no format record)`);
      await db.put(metaKey('format'), metaPackr.pack({ format: formatName, version: journalFormatVersion, createdMs: Date.now() }), { sync: true });
      return;
    }
    let format: { format?: unknown; version?: unknown };
    try {
      format = metaPackr.unpack(raw) as typeof format;
    } catch {
      throw new JournalError('EFORMAT', `${path}: the journal format record cannot be decoded`);
    }
    if (typeof format !== 'object' || format === null || typeof format.format !== 'string') {
      throw new JournalError('EFORMAT', `${path}: the journal format record is damaged (it names no format: ${describeRecord(raw)})`);
    }
    if (format.format !== formatName) throw new JournalError('EFORMAT', `${path} is not a cowstack journal (format "${format.format}")`);
    if (typeof format.version !== 'number') {
      throw new JournalError('EFORMAT', `${path}: the journal format record is damaged (it names no version: ${describeRecord(raw)})`);
    }
    if (format.version !== journalFormatVersion) {
      throw new JournalError(
        'EFORMAT',
        `${path}: journal format version ${String(format.version)} is not supported; this build reads version ${journalFormatVersion}`,
      );
    }
  }

  private static async readRetention(path: string, db: Db): Promise<Retention> {
    const retention = await Journal.readMeta<Retention>(path, db, 'retention', 'retention record');
    if (retention === undefined) return { firstSeq: 1, chainBefore: 0, payloadsThrough: 0 };
    const valid = (n: unknown): boolean => Number.isSafeInteger(n) && (n as number) >= 0;
    if (!valid(retention.firstSeq) || !valid(retention.chainBefore) || !valid(retention.payloadsThrough)) {
      throw new JournalError('ECORRUPT', `journal ${path}: its retention record (metadata key 'retention') is damaged: it does not hold three sequence numbers`);
    }
    return retention;
  }

  /**
   * Salvage of a damaged retention record: the first frame gives where the journal starts and how it
   * chains; payloads are taken as dropped through the oldest checkpoint (what the default policy
   * does). Written back, so the next open reads it.
   */
  private static async rebuildRetention(db: Db): Promise<Retention> {
    const [first] = await db.iterator({ ...recordRange, limit: 1 }).all();
    const checkpoints = await db.keys({ ...checkpointRange, limit: 1 }).all();
    let retention: Retention = { firstSeq: 1, chainBefore: 0, payloadsThrough: checkpoints.length > 0 ? seqOfKey(checkpoints[0]) : 0 };
    if (first !== undefined) {
      const frame = decodeFrame(seqOfKey(first[0]), first[1], undefined, false);
      retention = { ...retention, firstSeq: frame.firstSeq, chainBefore: frame.prevChain };
    }
    await db.put(metaKey('retention'), metaPackr.pack(retention), { sync: true });
    return retention;
  }

  /**
   * Salvage of damaged LevelDB files (`recover --force`; see level-salvage.ts), with the journal
   * closed and its lock held by the caller (LevelDB's repair takes no lock of its own). Damaged
   * tables are moved into `damaged/`, LevelDB's repair rebuilds the MANIFEST from the files left,
   * and every key the damaged tables still held that the repaired database lacks is written back,
   * except records and checkpoints below the retained window (retention deleted those). A format or
   * retention record lost with them is written anew. Records still missing are gaps for the caller's
   * salvage to name. Undefined when every table and the MANIFEST are sound: nothing is touched then.
   */
  static async salvageTables(path: string): Promise<TableSalvageReport | undefined> {
    if (!existsSync(path)) throw new JournalError('ENOENT', `no journal at ${path}`);
    const setAside = setAsideDamagedTables(path);
    if (setAside === undefined) return undefined;
    try {
      await (Level as unknown as { repair(location: string): Promise<void> }).repair(path);
    } catch (err) {
      throw new JournalError('EIO', `journal ${path}: LevelDB's repair failed: ${(err as Error).message}`, { cause: err });
    }
    const db: Db = new Level<Buffer, Buffer>(path, { keyEncoding: 'buffer', valueEncoding: 'buffer', createIfMissing: false });
    try {
      await db.open();
    } catch (err) {
      throw new JournalError('EIO', `journal ${path}: cannot open it after LevelDB's repair: ${(err as { cause?: Error }).cause?.message ?? (err as Error).message}`, { cause: err });
    }
    try {
      const retention = await Journal.readRetention(path, db).catch(() => undefined);
      const seqKeyed = (key: Buffer): boolean => key.length === 9 && (key[0] === recordPrefix || key[0] === checkpointPrefix);
      const dropped = (key: Buffer): boolean => retention !== undefined && seqKeyed(key) && seqOfKey(key) < retention.firstSeq;
      const candidates = restorable(setAside).filter((e) => !dropped(e.key));
      const present = candidates.length === 0 ? [] : await db.getMany(candidates.map((e) => e.key));
      const restore = candidates.filter((_, i) => present[i] === undefined);
      if (restore.length > 0) await db.batch(restore.map((e) => ({ type: 'put' as const, key: e.key, value: e.value })), { sync: true });
      // A database this salvage found damaged was a journal: a format record lost with it comes back.
      const formatRewritten = (await db.keys({ limit: 1 }).all()).length > 0 && (await db.get(metaKey('format'))) === undefined;
      if (formatRewritten) await db.put(metaKey('format'), metaPackr.pack({ format: formatName, version: journalFormatVersion, createdMs: Date.now() }), { sync: true });
      const journalKeys = (await db.keys({ ...recordRange, limit: 1 }).all()).length + (await db.keys({ ...checkpointRange, limit: 1 }).all()).length;
      const retentionRebuilt = journalKeys > 0 && (await db.get(metaKey('retention'))) === undefined;
      if (retentionRebuilt) await Journal.rebuildRetention(db);
      const resumed = await Journal.resumeAfterCheckpoint(path, db);
      const restoredByTable = entriesRestoredByTable(setAside, restore);
      return {
        resumedAfterCheckpoint: resumed,
        tables: setAside.tables.map(({ entries: _entries, ...table }, i) => ({ ...table, entriesRestored: restoredByTable[i] })),
        manifestProblem: setAside.manifestProblem,
        formatRewritten,
        retentionRebuilt,
      };
    } finally {
      await db.close();
    }
  }

  /**
   * Salvage: frames lost from the journal's end that its newest sound checkpoint covers (the
   * checkpoint names a seq past the last frame). That checkpoint holds the whole state at its seq, so
   * the journal resumes after it, as if retention had dropped every record through it: the frames
   * before it are deleted and the chain starts afresh. Returns the lost seqs, or undefined.
   */
  private static async resumeAfterCheckpoint(path: string, db: Db): Promise<{ fromSeq: number; throughSeq: number } | undefined> {
    const [lastKey, lastValue] = await Journal.lastEntry(db, recordRange);
    let nextSeq = (await Journal.readRetention(path, db).catch(() => undefined))?.firstSeq ?? 1;
    if (lastKey !== undefined && lastValue !== undefined) {
      try {
        const frame = decodeFrame(seqOfKey(lastKey), lastValue, undefined, false);
        nextSeq = frame.firstSeq + frame.count;
      } catch (err) {
        if (err instanceof JournalCorruptionError) return undefined;
        throw err;
      }
    }
    for (const [key, value] of await db.iterator({ ...checkpointRange, reverse: true }).all()) {
      const seq = seqOfKey(key);
      try {
        decodeCheckpoint(seq, value);
      } catch (err) {
        if (err instanceof JournalCorruptionError) continue;
        throw err;
      }
      if (seq < nextSeq) return undefined;
      const frames = await db.keys({ ...recordRange }).all();
      const retention: Retention = { firstSeq: seq + 1, chainBefore: 0, payloadsThrough: seq };
      await db.batch([...frames.map((k) => ({ type: 'del' as const, key: k })), { type: 'put' as const, key: metaKey('retention'), value: metaPackr.pack(retention) }], { sync: true });
      return { fromSeq: nextSeq, throughSeq: seq };
    }
    return undefined;
  }

  /** One of the journal's own metadata records, decoded; a damaged one is named, not misreported. */
  private static async readMeta<T>(path: string, db: Db, name: string, what: string): Promise<T | undefined> {
    const raw = await db.get(metaKey(name));
    if (raw === undefined) return undefined;
    try {
      return metaPackr.unpack(raw) as T;
    } catch (err) {
      throw new JournalError('ECORRUPT', `journal ${path}: its ${what} (metadata key '${name}') is damaged: ${(err as Error).message}`, { cause: err });
    }
  }

  /** The newest frame that decodes, walking back from the end (salvage only). */
  private static async lastGoodFrame(db: Db): Promise<DecodedFrame | undefined> {
    for await (const [key, value] of db.iterator({ ...recordRange, reverse: true })) {
      try {
        return decodeFrame(seqOfKey(key), value, undefined, true);
      } catch (err) {
        if (!(err instanceof JournalCorruptionError)) throw err;
      }
    }
    return undefined;
  }

  private static async lastEntry(db: Db, range: { gte: Buffer; lt: Buffer }): Promise<[Buffer | undefined, Buffer | undefined]> {
    const entries = await db.iterator({ ...range, reverse: true, limit: 1 }).all();
    return entries.length === 0 ? [undefined, undefined] : entries[0];
  }

  /** The last committed seq (0 before the first record). */
  get lastSeq(): number {
    return this.nextSeq - 1;
  }

  /** The first retained seq. */
  get firstSeq(): number {
    return this.retention.firstSeq;
  }

  /** Payloads of records at or below this seq were dropped by retention. */
  get payloadsDroppedThroughSeq(): number {
    return this.retention.payloadsThrough;
  }

  /**
   * Append one record. Resolves with its seq once its batch is committed (and durable, with `sync`).
   * Rejects, and consumes no seq, when its batch fails.
   */
  append(meta: M, options?: AppendOptions): Promise<number> {
    if (this.closed) return Promise.reject(new JournalError('ECLOSED', `journal ${this.path} is closed`));
    if (this.broken !== undefined) return Promise.reject(this.broken);
    const payload = options?.payload;
    let payloadCrc = 0;
    if (payload !== undefined && payload.length > 0) {
      if (payload.length > maxPayloadBytes) {
        return Promise.reject(new JournalError('EINVAL', `payload of ${payload.length} bytes is over maxPayloadBytes (${maxPayloadBytes})`));
      }
      payloadCrc = options?.payloadCrc ?? crc32c(payload);
    }
    let encoded: EncodedRecord;
    try {
      encoded = encodeRecord(meta, payload?.length ?? 0, payloadCrc);
    } catch (err) {
      return Promise.reject(new JournalError('EINVAL', `record cannot be encoded: ${(err as Error).message}`, { cause: err }));
    }
    if (options?.sync) this.pendingSync = true;
    return new Promise<number>((resolve, reject) => {
      this.pending.push({ meta, encoded, payload: payload !== undefined && payload.length > 0 ? payload : undefined, resolve, reject });
      this.scheduleFlush();
    });
  }

  /**
   * Resolves when every record committed before the call is durable, and LevelDB's durable mark says
   * so: the mark a synced batch leaves to carry goes with the next batch, or in a put of its own when
   * there is none (see markedDurableSeq), so under load the wait is one batch more, not until idle.
   */
  sync(): Promise<void> {
    if (this.closed) return Promise.reject(new JournalError('ECLOSED', `journal ${this.path} is closed`));
    if (this.durableSeq === this.lastSeq) return this.untilMarked(this.durableSeq);
    const target = this.lastSeq;
    return new Promise<void>((resolve, reject) => {
      this.syncWaiters.push({ resolve, reject });
      this.scheduleFlush();
    }).then(() => this.untilMarked(target));
  }

  /** Resolves when LevelDB's durable mark is at `seq` or past it (at once on a broken journal). */
  private untilMarked(seq: number): Promise<void> {
    if (this.markedDurableSeq >= seq || this.broken !== undefined) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.markWaiters.push({ seq, resolve, reject });
      this.scheduleFlush();
    });
  }

  /** The durable mark in LevelDB moved to `mark`: settle the syncs waiting for it. */
  private marked(mark: number): void {
    if (mark <= this.markedDurableSeq) return;
    this.markedDurableSeq = mark;
    if (this.markWaiters.length === 0) return;
    const still = [];
    for (const waiter of this.markWaiters) {
      if (waiter.seq <= mark) waiter.resolve();
      else still.push(waiter);
    }
    this.markWaiters = still;
  }

  private scheduleFlush(): void {
    this.wakeFlushLoop?.();
    if (this.flushScheduled || this.flushActive) return;
    this.flushScheduled = true;
    setImmediate(() => {
      this.flushScheduled = false;
      this.flushDone = this.flushLoop();
    });
  }

  /**
   * Writes batches until the queue is empty and none is in flight; `flushActive` drops in the same
   * turn. Up to maxBatchesInFlight unsynced batches are written to LevelDB at once: a batch's LevelDB
   * write waits in the threadpool, and the next batch is built meanwhile (measured in BENCHMARKS.md).
   * A synced batch (or a sync barrier) starts only when none is in flight, and none starts beside it.
   */
  private async flushLoop(): Promise<void> {
    this.flushActive = true;
    try {
      for (;;) {
        const queued = this.pending.length > 0 || this.syncWaiters.length > 0;
        if (!queued && this.inFlight.length === 0) {
          if (this.markedDurableSeq < this.durableSeq && this.broken === undefined) {
            const failure = await this.carryDurableMark();
            if (failure === undefined) continue;
            // The records are durable; only the mark could not be written. The syncs waiting for it
            // fail with why; the next batch, or close, carries it.
            for (const waiter of this.markWaiters) waiter.reject(failure);
            this.markWaiters = [];
          }
          // Any still waiting are on a broken journal, whose sync does not wait for the mark.
          for (const waiter of this.markWaiters) waiter.resolve();
          this.markWaiters = [];
          break;
        }
        const sync = this.pendingSync || this.syncWaiters.length > 0;
        const oldest = this.inFlight[0];
        if (!queued || (oldest !== undefined && (sync || oldest.sync || this.rollingBack || this.inFlight.length >= maxBatchesInFlight))) {
          // Wait for the oldest batch to settle, or (with room for another) for more work.
          await new Promise<void>((resolve) => {
            this.wakeFlushLoop = queued ? undefined : resolve;
            void oldest.settled.then(() => resolve());
          });
          this.wakeFlushLoop = undefined;
          continue;
        }
        if (this.broken !== undefined) {
          this.failQueued(this.broken);
          continue;
        }
        const items = this.pending;
        const waiters = this.syncWaiters;
        this.pending = [];
        this.syncWaiters = [];
        this.pendingSync = false;
        const previous = oldest === undefined ? undefined : this.inFlight[this.inFlight.length - 1].settled;
        // An exception after the commit (a broken invariant) must not wedge the batches behind it.
        const flight = { sync, settled: this.commitBatch(items, waiters, sync, previous).catch(() => false) };
        this.inFlight.push(flight);
        void flight.settled.then(() => {
          assert(this.inFlight[0] === flight, 'batches settle in the order they started');
          this.inFlight.shift();
          if (this.inFlight.length === 0 && this.rollingBack) {
            // Every batch after the failed one has failed and been taken back: start over from the
            // committed end, so a failed batch consumes no seq.
            this.reservedSeq = this.nextSeq;
            this.reservedChain = this.lastChain;
            this.rollingBack = false;
          }
        });
      }
    } finally {
      this.flushActive = false;
    }
  }

  /**
   * With nothing left to write, carry the durable mark of the last synced batch into LevelDB on its
   * own (unsynced: it survives a process crash, and an OS crash has the seal's flushed copy). Under
   * load the next batch carries it instead. Returns why the write failed, if it did: the next batch,
   * or close, tries again.
   */
  private async carryDurableMark(): Promise<JournalError | undefined> {
    const mark = this.durableSeq;
    try {
      await this.writeBatch([durableMarkOp(mark)], false);
    } catch (err) {
      return new JournalError('EIO', `journal ${this.path}: records through seq ${mark} are durable, but LevelDB's durable mark could not be written: ${(err as Error).message}`, { cause: err });
    }
    this.marked(mark);
    return undefined;
  }

  private failQueued(failure: JournalError): void {
    for (const item of this.pending) item.reject(failure);
    for (const waiter of this.syncWaiters) waiter.reject(failure);
    this.pending = [];
    this.syncWaiters = [];
    this.pendingSync = false;
  }

  /**
   * One LevelDB batch of the write path. It goes straight to the database's implementation method:
   * keys and values are Buffers already, and the public `batch` copies every operation with the
   * call's options and checks encodings first, which cost the event loop 7.5 µs per batch
   * (BENCHMARKS.md). The open check is the one the public method makes.
   */
  private writeBatch(ops: BatchOp[], sync: boolean): Promise<void> {
    if (this.db.status !== 'open') return Promise.reject(new Error(`the database is ${this.db.status}`));
    return (this.db as unknown as BatchImplementation)._batch(ops, { sync });
  }

  /**
   * Write one batch, then commit it once the batch started before it (`previous`, in flight) has
   * settled. Resolves true when committed, false when it failed, with its appends and waiters
   * rejected; never rejects. A batch fails when its own write fails or the one before it failed
   * (its frames would follow a hole); then its frames, if written, are taken back.
   */
  private async commitBatch(items: Pending<M>[], waiters: Journal['syncWaiters'], sync: boolean, previous: Promise<boolean> | undefined): Promise<boolean> {
    const startedMs = performance.now();
    const timeMs = Date.now();
    const firstSeq = this.reservedSeq;
    const ops: BatchOp[] = [];
    const frameKeys: Buffer[] = [];
    const chains = new Uint32Array(items.length);
    let bytes = 0;
    let batchChain = this.reservedChain;
    let written = false;
    let failure: JournalError | undefined;
    try {
      // 1. The payloads' place in the payload log, which the frames name.
      const payloads: Buffer[] = [];
      let payloadBytes = 0;
      for (const item of items) {
        if (item.payload !== undefined) {
          payloads.push(item.payload);
          payloadBytes += item.payload.length;
        }
      }
      const reservation = payloadBytes > 0 ? this.payloadLog.reserve(firstSeq, payloadBytes) : undefined;
      // 2. A synced batch writes its payloads to the page cache before its frames; the payload log's
      // and the seal's fdatasyncs then run beside LevelDB's synced write (step 4).
      if (sync && reservation !== undefined) this.writePayloads(reservation, payloads);
      // 3. The frames: one LevelDB value per maxBatchValueBytes of records, all in one atomic batch.
      // (A synced batch is alone in flight, so the reserved end cannot move during its flushes.)
      let prev = this.reservedChain;
      let start = 0;
      let payloadOffset = reservation?.offset ?? 0;
      while (start < items.length) {
        let end = start;
        let frameBytes = 0;
        let framePayloadBytes = 0;
        while (end < items.length && (end === start || frameBytes + items[end].encoded.recordBytes.length <= maxBatchValueBytes)) {
          frameBytes += items[end].encoded.recordBytes.length;
          framePayloadBytes += items[end].encoded.payloadLength;
          end++;
        }
        const framePayloads = reservation !== undefined && framePayloadBytes > 0 ? { segment: reservation.segment, offset: payloadOffset } : undefined;
        const frame = encodeFrame(
          firstSeq + start,
          timeMs,
          prev,
          items.slice(start, end).map((i) => i.encoded),
          framePayloads,
          sync,
        );
        const key = recordKey(firstSeq + start);
        ops.push({ type: 'put', key, value: frame.value });
        frameKeys.push(key);
        chains.set(frame.chains, start);
        bytes += frame.value.length;
        payloadOffset += framePayloadBytes;
        prev = frame.chains[frame.chains.length - 1];
        start = end;
      }
      bytes += payloadBytes;
      // The durable mark moves only to what was durable before this batch began (see markedDurableSeq).
      const mark = this.durableSeq > this.markedDurableSeq ? this.durableSeq : undefined;
      if (mark !== undefined) ops.push(durableMarkOp(mark));
      batchChain = prev;
      this.reservedSeq = firstSeq + items.length;
      this.reservedChain = prev;
      // 4. An unsynced batch writes its payloads while LevelDB writes its frames in the threadpool
      // (measured in BENCHMARKS.md); a synced batch fdatasyncs the payload log and the seal while
      // LevelDB writes and syncs its frames: one round of device flushes instead of two. Either
      // commits only after both. A crash in between can leave its frames without their payloads: a
      // torn tail, as after an OS crash (see payload-log.ts). A failed payload write or flush fails
      // the batch, whose frames are then taken back like any failed one's.
      const framesWritten = this.writeBatch(ops, sync);
      const flushed = sync ? Promise.all([this.payloadLog.sync(), this.seal.sync()]) : undefined;
      let payloadFailure: unknown;
      if (!sync && reservation !== undefined) {
        try {
          this.writePayloads(reservation, payloads);
        } catch (err) {
          payloadFailure = err;
        }
      }
      if (flushed === undefined) await framesWritten;
      else {
        const [frames, flush] = await Promise.allSettled([framesWritten, flushed]);
        if (frames.status === 'rejected') throw frames.reason;
        if (flush.status === 'rejected') payloadFailure = new Error(`payload log: ${(flush.reason as Error).message}`, { cause: flush.reason });
      }
      written = true;
      if (mark !== undefined) this.marked(mark);
      if (payloadFailure !== undefined) throw payloadFailure;
    } catch (err) {
      failure = new JournalError('EIO', `journal ${this.path}: batch of ${items.length} records failed: ${(err as Error).message}`, { cause: err });
    }
    const previousCommitted = previous === undefined || (await previous);
    if (failure === undefined && !previousCommitted) {
      failure = new JournalError('EIO', `journal ${this.path}: batch of ${items.length} records failed: the batch before it failed`);
    }
    if (failure !== undefined) {
      this.rollingBack = true;
      if (written) {
        try {
          await this.writeBatch(frameKeys.map((key) => ({ type: 'del' as const, key })), false);
        } catch (err) {
          this.broken ??= new JournalError(
            'EIO',
            `journal ${this.path}: the frames from seq ${firstSeq} on, written after a failed batch, could not be taken back (${(err as Error).message}); reopen the journal, which cuts them as a torn tail`,
            { cause: err },
          );
        }
      }
      for (const item of items) item.reject(failure);
      for (const waiter of waiters) waiter.reject(failure);
      return false;
    }
    this.nextSeq = firstSeq + items.length;
    this.lastChain = batchChain;
    this.knownCommittedSeq = this.lastSeq;
    if (sync) this.durableSeq = this.lastSeq;
    assert(this.nextSeq <= maxSeq, 'sequence numbers stay below 2^53');
    this.writeSeal();
    if (items.length > 0) {
      const records: JournalRecord<M>[] = new Array(items.length);
      for (let i = 0; i < items.length; i++) {
        const item = items[i];
        records[i] = {
          seq: firstSeq + i,
          timeMs,
          meta: item.meta,
          payloadLength: item.encoded.payloadLength,
          payloadCrc: item.encoded.payloadCrc,
          payload: item.payload,
          crc: chains[i],
        };
      }
      let hookError: unknown;
      if (this.onCommit !== undefined) {
        try {
          this.onCommit(records, sync);
        } catch (err) {
          hookError = err;
        }
      }
      for (let i = 0; i < items.length; i++) {
        if (hookError === undefined) items[i].resolve(firstSeq + i);
        else items[i].reject(hookError);
      }
      if (this.records$.observed) for (const r of records) this.records$.next({ ...r, payload: undefined });
    }
    for (const waiter of waiters) waiter.resolve();
    if (this.batches$.observed) {
      this.batches$.next({ firstSeq, records: items.length, bytes, sync, durationMs: performance.now() - startedMs });
    }
    return true;
  }

  /** Write a batch's payloads where `reservation` placed them; a failure is named as the payload log's. */
  private writePayloads(reservation: PayloadReservation, payloads: readonly Buffer[]): void {
    try {
      this.payloadLog.write(reservation, payloads);
    } catch (err) {
      throw new Error(`payload log: ${(err as Error).message}`, { cause: err });
    }
  }

  /**
   * Record in the seal how far the journal got. Best effort: the seal is a witness for damage
   * detection, and a disk that cannot take 40 bytes fails the next batch anyway.
   */
  private writeSeal(): void {
    try {
      this.seal.write(this.lastSeq, this.durableSeq);
    } catch (err) {
      this.sealFailure ??= err as Error;
    }
  }

  /**
   * Why the seal (`payloads/seal`) was unreadable, when it was: records LevelDB lost before then went
   * unnoticed. The open that found it wrote it anew from the records LevelDB holds; every open after
   * that says it again until `acknowledgeSealDamage`.
   */
  get damagedSeal(): string | undefined {
    return this.sealDamage;
  }

  /** The damaged seal has been reported to someone: later opens no longer name it. */
  async acknowledgeSealDamage(): Promise<void> {
    this.checkOpen();
    if (this.sealDamage !== undefined) await this.db.del(metaKey(sealDamageMetaName), { sync: true });
  }

  /** Whether opening (with skipDamagedTail) rebuilt a damaged retention record. */
  get rebuiltRetention(): boolean {
    return this.retentionRebuilt;
  }

  /** Records the seal says were committed but LevelDB lost (only set when opened with skipDamagedTail). */
  get lostTail(): { fromSeq: number; toSeq: number } | undefined {
    return this.missingTail;
  }

  /**
   * Records from `fromSeq` to `toSeq` (inclusive) in seq order, starting at the first record
   * retention kept when `fromSeq` is before it. Errors with JournalCorruptionError on the first bad
   * record.
   */
  replay(fromSeq: number = this.retention.firstSeq, toSeq: number = maxSeq, options: ReplayOptions = {}): Observable<JournalRecord<M>> {
    return this.replayFrames(fromSeq, toSeq, options).pipe(concatAll());
  }

  /**
   * The records of `replay`, one array per frame (in seq order, never empty). For a consumer that
   * folds millions of records: one RxJS notification per record cost store recovery more than
   * applying the record (BENCHMARKS.md).
   */
  replayFrames(fromSeq: number = this.retention.firstSeq, toSeq: number = maxSeq, options: ReplayOptions = {}): Observable<ReadonlyArray<JournalRecord<M>>> {
    return new Observable<ReadonlyArray<JournalRecord<M>>>((subscriber) => {
      let stopped = false;
      const run = async (): Promise<void> => {
        for await (const records of this.replayChunks(fromSeq, toSeq, options, () => stopped)) {
          if (stopped) return;
          subscriber.next(records);
        }
      };
      run().then(
        () => subscriber.complete(),
        (err: unknown) => subscriber.error(err),
      );
      return () => {
        stopped = true;
      };
    });
  }

  /**
   * The replay engine: yields the verified records of one frame at a time, reading LevelDB a chunk of
   * frames at a time.
   */
  private async *replayChunks(fromSeq: number, toSeq: number, options: ReplayOptions, isStopped: () => boolean): AsyncGenerator<JournalRecord<M>[]> {
    if (this.closed) throw new JournalError('ECLOSED', `journal ${this.path} is closed`);
    if (!Number.isSafeInteger(fromSeq) || !Number.isSafeInteger(toSeq) || fromSeq < 0) {
      throw new JournalError('EINVAL', `replay range ${fromSeq}..${toSeq} is not a range of sequence numbers`);
    }
    const retention = { ...this.retention };
    if (fromSeq < retention.firstSeq) fromSeq = retention.firstSeq;
    const lastAtStart = this.lastSeq;
    const end = Math.min(toSeq, lastAtStart);
    if (fromSeq > end) return;
    const wantPayloads = options.payloads ?? true;
    const fullCheck = options.fullCheck ?? false;
    const damagedPayloadsThrough = options.damagedPayloadsThrough ?? 0;
    const startKey = await this.frameKeyAtOrBefore(fromSeq);
    const frames = this.db.iterator({ gte: startKey, lt: recordRange.lt, highWaterMarkBytes: replayChunkBytes });
    // The next chunk is read (in the threadpool) while this one is decoded and consumed. A read is
    // marked handled when it starts: its failure is raised where it is awaited, or is moot after a stop.
    const readChunk = (): Promise<Array<[Buffer, Buffer]>> => {
      const read = frames.nextv(replayChunkValues);
      read.catch(() => undefined);
      return read;
    };
    let next: Promise<Array<[Buffer, Buffer]>> | undefined = readChunk();
    let expectSeq: number | undefined;
    let expectPrev: number | undefined;
    try {
      while (!isStopped()) {
        const entries = await next.catch((err: unknown) => {
          throw levelDamage(this.path, err, `reading the records from seq ${expectSeq ?? fromSeq}`);
        });
        next = undefined;
        if (entries.length === 0) break;
        next = readChunk();
        for (const [key, value] of entries) {
          const keySeq = seqOfKey(key);
          if (expectSeq === undefined) {
            if (keySeq > fromSeq) {
              this.missingRecords(fromSeq, `no frame holds seq ${fromSeq}; the first frame at or after it starts at seq ${keySeq}`);
            }
            if (keySeq === retention.firstSeq) expectPrev = retention.chainBefore;
          } else if (keySeq !== expectSeq) {
            this.missingRecords(expectSeq, `record seq ${expectSeq} is missing; the next frame starts at seq ${keySeq}`);
          }
          const frame = decodeFrame(keySeq, value, expectPrev, fullCheck);
          const first = Math.max(0, fromSeq - frame.firstSeq);
          const last = Math.min(frame.count - 1, end - frame.firstSeq);
          const payloads = wantPayloads ? this.framePayloads(frame, first, last, retention.payloadsThrough, damagedPayloadsThrough) : undefined;
          // One array per frame: short-lived, so records die young instead of being promoted.
          const out: JournalRecord<M>[] = [];
          for (let i = first; i <= last; i++) {
            const [payloadLength, payloadCrc, meta] = frame.records[i];
            out.push({ seq: frame.firstSeq + i, timeMs: frame.timeMs, meta: meta as M, payloadLength, payloadCrc, payload: payloads?.[i], crc: frame.chains[i] });
          }
          expectSeq = frame.firstSeq + frame.count;
          expectPrev = frame.lastChain;
          if (out.length > 0) yield out;
          if (expectSeq > end || isStopped()) return;
          const paused = options.pause?.();
          if (paused !== undefined) await paused;
        }
      }
      if (!isStopped() && (expectSeq === undefined || expectSeq <= end)) {
        const missing = expectSeq ?? fromSeq;
        throw new JournalCorruptionError(missing, 'gap', `the log ends before seq ${missing}, but records up to seq ${end} were committed`);
      }
    } finally {
      // A read still in flight finishes before the iterator closes.
      if (next !== undefined) await next.catch(() => undefined);
      await frames.close();
    }
  }

  /**
   * The verified payloads of records [first, last] of a frame (indexed by record), read in one piece
   * from the payload log. A missing or damaged payload is corruption, or a torn tail when the record
   * is past the last durable seq.
   */
  private framePayloads(frame: DecodedFrame, first: number, last: number, droppedThrough: number, damagedThrough = 0): Array<Buffer | undefined> {
    const out: Array<Buffer | undefined> = new Array(frame.count);
    let skip = 0;
    let want = 0;
    let from = -1;
    for (let i = 0; i <= last; i++) {
      const length = frame.records[i][0];
      if (length === 0) continue;
      if (i < first || frame.firstSeq + i <= droppedThrough) skip += length;
      else {
        if (from === -1) from = i;
        want += length;
      }
    }
    if (from === -1) return out;
    const bytes = this.payloadLog.read(frame.payloadSegment, frame.payloadOffset + skip, want);
    let at = 0;
    for (let i = from; i <= last; i++) {
      const [length, crc] = frame.records[i];
      if (length === 0) continue;
      const seq = frame.firstSeq + i;
      const payload = bytes.subarray(at, at + length);
      at += length;
      const missing = payload.length < length;
      if (missing || crc32c(payload) !== crc) {
        if (seq <= damagedThrough) continue;
        if (missing) this.payloadDamage(seq, 'payload-missing', `payload of ${length} bytes is not in payload segment ${frame.payloadSegment} (it ends ${at - bytes.length} bytes short)`);
        this.payloadDamage(seq, 'payload-crc', `payload of ${length} bytes does not match its CRC ${hex(crc)}`);
      }
      out[i] = payload;
    }
    return out;
  }

  /**
   * Records missing before later ones. Two unsynced batches are written to LevelDB at once, and a
   * crash can keep the second without the first; neither was committed (a batch commits only after
   * the one before it), so such a hole lies past both the durable mark and what the seal says was
   * committed: a torn tail. A hole in records known to have been committed is damage.
   */
  private missingRecords(seq: number, detail: string): never {
    if (seq > this.durableSeq && seq > this.knownCommittedSeq) throw new JournalTornTailError(seq, 'gap', detail, this.durableSeq);
    throw new JournalCorruptionError(seq, 'gap', seq > this.durableSeq ? `${detail}; the journal's seal says it was committed` : detail);
  }

  private payloadDamage(seq: number, kind: CorruptionKind, detail: string): never {
    if (seq > this.durableSeq) throw new JournalTornTailError(seq, kind, detail, this.durableSeq);
    throw new JournalCorruptionError(seq, kind, detail);
  }

  /**
   * Remove a torn tail: every record from the frame holding `seq` on (none of it was durable), and any
   * checkpoint past the new end. Returns how many records were cut.
   */
  async cutTail(seq: number): Promise<number> {
    this.checkOpen();
    if (seq <= this.durableSeq) throw new JournalError('EINVAL', `seq ${seq} is durable (last durable seq ${this.durableSeq}); only a torn tail can be cut`);
    return this.discardFrom(seq);
  }

  /** The seq the newest frame key names (decodable or not); 0 when there is none. */
  async lastFrameKeySeq(): Promise<number> {
    this.checkOpen();
    const [key] = await Journal.lastEntry(this.db, recordRange);
    return key === undefined ? 0 : seqOfKey(key);
  }

  /**
   * Salvage after damage: remove every record from the frame holding `seq` on (the damaged record
   * and everything after it, durable or not), any checkpoint past the new end, and lower the durable
   * mark to it. Returns how many records went. Only `recover --force` should call this.
   */
  async discardFrom(seq: number): Promise<number> {
    this.checkOpen();
    const from = await this.discardStart(seq);
    const doomed = await this.db.keys({ gte: recordKey(from), lt: recordRange.lt }).all();
    // What stays: the last frame before `from`.
    const [lastKey, lastValue] = await Journal.lastEntry(this.db, { gte: recordRange.gte, lt: recordKey(from) });
    let nextSeq = this.retention.firstSeq;
    let lastChain = this.retention.chainBefore;
    if (lastKey !== undefined && lastValue !== undefined) {
      const frame = decodeFrame(seqOfKey(lastKey), lastValue, undefined, false);
      nextSeq = frame.firstSeq + frame.count;
      lastChain = frame.lastChain;
    }
    const checkpoints = (await this.checkpointSeqs()).filter((c) => c >= nextSeq);
    const durable = Math.min(this.durableSeq, nextSeq - 1);
    await this.db.batch(
      [
        ...doomed.map((k) => ({ type: 'del' as const, key: k })),
        ...checkpoints.map((c) => ({ type: 'del' as const, key: checkpointKey(c) })),
        durableMarkOp(durable),
      ],
      { sync: true },
    );
    const discarded = this.nextSeq - nextSeq;
    this.nextSeq = nextSeq;
    this.lastChain = lastChain;
    this.reservedSeq = nextSeq;
    this.reservedChain = lastChain;
    this.knownCommittedSeq = Math.min(this.knownCommittedSeq, nextSeq - 1);
    this.durableSeq = durable;
    this.markedDurableSeq = durable;
    this.missingTail = undefined;
    this.writeSeal();
    await this.seal.sync();
    return discarded;
  }

  /**
   * The records `discardFrom(seq)` (and so `cutTail(seq)`) would remove, as far as their frames
   * decode; their payloads are not read. Recovery uses them to find the layer blocks a torn tail had
   * written before the crash.
   */
  async recordsFrom(seq: number): Promise<Array<{ seq: number; meta: M }>> {
    this.checkOpen();
    const out: Array<{ seq: number; meta: M }> = [];
    for await (const [key, value] of this.db.iterator({ gte: recordKey(await this.discardStart(seq)), lt: recordRange.lt })) {
      let frame: DecodedFrame;
      try {
        frame = decodeFrame(seqOfKey(key), value, undefined, false);
      } catch {
        continue;
      }
      frame.records.forEach(([, , meta], i) => out.push({ seq: frame.firstSeq + i, meta: meta as M }));
    }
    return out;
  }

  /** Where discarding from `seq` starts: the frame holding seq, if one does (a missing frame leaves the previous one intact). */
  private async discardStart(seq: number): Promise<number> {
    const key = await this.frameKeyAtOrBefore(seq);
    const value = key[0] === recordRange.gte[0] ? await this.db.get(key) : undefined;
    if (value === undefined) return seq;
    try {
      const frame = decodeFrame(seqOfKey(key), value, undefined, false);
      return frame.firstSeq + frame.count > seq ? frame.firstSeq : seq;
    } catch {
      return Math.min(seq, seqOfKey(key));
    }
  }

  /**
   * One record's payload, verified against its CRC; undefined when the record has none or retention
   * dropped it (ERETAINED when the record itself was dropped).
   */
  async readPayload(seq: number): Promise<Buffer | undefined> {
    this.checkOpen();
    const { frame, i } = await this.retainedFrameOf(seq);
    if (frame === undefined || frame.records[i][0] === 0) return undefined;
    return this.framePayloads(frame, i, i, this.retention.payloadsThrough)[i];
  }

  /**
   * Write the payload of record `seq` back in place, durably: repair after damage to the payload log
   * (`recover --force` rebuilds a payload from the layer blocks that still hold it). Only the exact
   * bytes the frame recorded are accepted (its length and CRC32C), so this can mend a payload, never
   * change one. For a journal at rest: nothing else may be appending.
   */
  async rewritePayload(seq: number, payload: Buffer): Promise<void> {
    this.checkOpen();
    const place = await this.payloadPlaceOf(seq);
    if ('obstacle' in place) throw place.obstacle;
    const { frame, i } = place;
    const [length, crc] = frame.records[i];
    if (payload.length !== length || crc32c(payload) !== crc) {
      throw new JournalError('EINVAL', `${payload.length} bytes with CRC ${hex(crc32c(payload))} are not the payload of record seq ${seq} (${length} bytes, CRC ${hex(crc)})`);
    }
    let offset = frame.payloadOffset;
    for (let j = 0; j < i; j++) offset += frame.records[j][0];
    await this.payloadLog.rewrite(frame.payloadSegment, offset, payload);
  }

  /**
   * Why `rewritePayload(seq, …)` could not write record `seq`'s payload back whatever the bytes, if it
   * could not: no payload, dropped by retention, or its payload segment removed by hand while the
   * newest. A caller can tell before rebuilding the bytes.
   */
  async payloadRewriteObstacle(seq: number): Promise<string | undefined> {
    this.checkOpen();
    const place = await this.payloadPlaceOf(seq);
    if ('obstacle' in place) return place.obstacle.message;
    return this.payloadLog.rewriteObstacle(place.frame.payloadSegment);
  }

  /**
   * The frame holding record `seq`'s retained payload and the record's index in it, or why there is
   * none to write back (dropped by retention, or a record without a payload).
   */
  private async payloadPlaceOf(seq: number): Promise<{ frame: DecodedFrame; i: number } | { obstacle: JournalError }> {
    let found: Awaited<ReturnType<Journal['retainedFrameOf']>>;
    try {
      found = await this.retainedFrameOf(seq);
    } catch (err) {
      if (err instanceof JournalError && err.code === 'ERETAINED') return { obstacle: err };
      throw err;
    }
    const { frame, i } = found;
    if (frame === undefined) return { obstacle: new JournalError('ERETAINED', `the payload of record seq ${seq} was dropped by retention`) };
    if (frame.records[i][0] === 0) return { obstacle: new JournalError('EINVAL', `record seq ${seq} has no payload`) };
    return { frame, i };
  }

  /**
   * The frame holding record `seq` and the record's index in it; no frame when retention dropped the
   * record's payload (ERETAINED when it dropped the record itself).
   */
  private async retainedFrameOf(seq: number): Promise<{ frame: DecodedFrame | undefined; i: number }> {
    if (!Number.isSafeInteger(seq) || seq < 1 || seq > this.lastSeq) throw new JournalError('EINVAL', `seq ${seq} is not a committed seq (last is ${this.lastSeq})`);
    if (seq < this.retention.firstSeq) throw new JournalError('ERETAINED', `record seq ${seq} was dropped by retention (the journal starts at seq ${this.retention.firstSeq})`);
    if (seq <= this.retention.payloadsThrough) return { frame: undefined, i: 0 };
    const key = await this.frameKeyAtOrBefore(seq);
    const value = await this.db.get(key);
    if (value === undefined) throw new JournalCorruptionError(seq, 'gap', `no frame holds seq ${seq}`);
    const frame = decodeFrame(seqOfKey(key), value, undefined, false);
    const i = seq - frame.firstSeq;
    if (i < 0 || i >= frame.count) throw new JournalCorruptionError(seq, 'gap', `no frame holds seq ${seq}`);
    return { frame, i };
  }

  /** Key of the frame holding `seq`: the last frame key at or before it (or the first key, if none). */
  private async frameKeyAtOrBefore(seq: number): Promise<Buffer> {
    const keys = await this.db.keys({ gte: recordRange.gte, lte: recordKey(seq), reverse: true, limit: 1 }).all();
    return keys[0] ?? recordRange.gte;
  }

  /** Walk the whole retained log with every check on, then every checkpoint. Never throws on damage. */
  async verify(): Promise<VerifyReport> {
    const problems: VerifyProblem[] = [];
    let recordsChecked = 0;
    let payloadsChecked = 0;
    let lastSeen = this.retention.firstSeq - 1;
    for (let from: number | undefined = this.retention.firstSeq; from !== undefined; ) {
      try {
        for await (const chunk of this.replayChunks(from, maxSeq, { payloads: true, fullCheck: true }, () => false)) {
          recordsChecked += chunk.length;
          for (const r of chunk) if (r.payload !== undefined) payloadsChecked++;
          lastSeen = chunk[chunk.length - 1].seq;
        }
        from = undefined;
      } catch (err) {
        if (!(err instanceof JournalCorruptionError)) throw err;
        // Go on, so that every damaged frame, gap and payload is named, not just the first: at the next
        // record after a payload that fails its CRC (its frame is whole), else at the next frame.
        if (err.kind === 'payload-crc' && err.seq < this.lastSeq) from = err.seq + 1;
        else {
          const [next] = await this.db.keys({ gt: recordKey(err.frameSeq ?? err.seq), lt: recordRange.lt, limit: 1 }).all();
          from = next === undefined ? undefined : seqOfKey(next);
        }
        const skipsRecords = err.kind === 'gap' || err.frameSeq !== undefined;
        const skipped = { fromSeq: err.frameSeq ?? err.seq, toSeq: from === undefined ? Math.max(err.seq, this.lastSeq) : from - 1 };
        problems.push({ seq: err.seq, kind: err.kind, message: err.message, ...(skipsRecords ? skipped : {}), ...(err instanceof JournalTornTailError ? { tornTail: true } : {}) });
      }
    }
    for (const key of await this.db.keys(checkpointRange).all()) {
      const seq = seqOfKey(key);
      try {
        const value = await this.db.get(key);
        if (value !== undefined) decodeCheckpoint(seq, value);
        if (seq > this.lastSeq) throw new JournalCorruptionError(seq, 'checkpoint', `checkpoint at seq ${seq} is past the end of the log (seq ${this.lastSeq})`);
      } catch (err) {
        if (!(err instanceof JournalCorruptionError)) throw err;
        problems.push({ seq: err.seq, kind: err.kind, message: err.message });
      }
    }
    return {
      ok: problems.length === 0,
      recordsChecked,
      payloadsChecked,
      firstSeq: this.retention.firstSeq,
      lastSeq: lastSeen,
      problems,
    };
  }

  /**
   * Flush the payload log to disk without holding up commits, so the next synced batch (a checkpoint's,
   * say) has little left to flush. Batches go on committing while it runs.
   */
  flushPayloads(): Promise<void> {
    this.checkOpen();
    return this.payloadLog.sync();
  }

  /** Store a checkpoint blob for `seq` atomically and durably. */
  async putCheckpoint(seq: number, blob: Uint8Array): Promise<void> {
    this.checkOpen();
    if (!Number.isSafeInteger(seq) || seq < 0 || seq > this.lastSeq) {
      throw new JournalError('EINVAL', `checkpoint seq ${seq} is not a committed seq (last is ${this.lastSeq})`);
    }
    await this.sync();
    await this.db.put(checkpointKey(seq), encodeCheckpoint(seq, Date.now(), blob), { sync: true });
  }

  /** The newest checkpoint, verified; undefined when there is none. */
  async latestCheckpoint(): Promise<Checkpoint | undefined> {
    this.checkOpen();
    const [key, value] = await Journal.lastEntry(this.db, checkpointRange);
    if (key === undefined || value === undefined) return undefined;
    return decodeCheckpoint(seqOfKey(key), value);
  }

  /** One checkpoint by seq, verified; undefined when there is none at that seq. */
  async getCheckpoint(seq: number): Promise<Checkpoint | undefined> {
    this.checkOpen();
    const value = await this.db.get(checkpointKey(seq));
    return value === undefined ? undefined : decodeCheckpoint(seq, value);
  }

  async checkpointSeqs(): Promise<number[]> {
    this.checkOpen();
    return (await this.db.keys(checkpointRange).all()).map(seqOfKey);
  }

  async deleteCheckpoint(seq: number): Promise<void> {
    this.checkOpen();
    await this.db.del(checkpointKey(seq), { sync: true });
  }

  /** Delete all but the newest `keep` checkpoints. */
  async pruneCheckpoints(keep: number): Promise<number> {
    this.checkOpen();
    if (!Number.isInteger(keep) || keep < 1) throw new JournalError('EINVAL', `pruneCheckpoints keeps at least one checkpoint, not ${keep}`);
    const seqs = await this.checkpointSeqs();
    const doomed = seqs.slice(0, Math.max(0, seqs.length - keep));
    if (doomed.length > 0) await this.db.batch(doomed.map((s) => ({ type: 'del' as const, key: checkpointKey(s) })), { sync: true });
    return doomed.length;
  }

  /**
   * Retention: drop the payloads of records up to `throughSeq`. Records, their payload CRCs and the
   * chain stay, so the log still verifies; replay returns those records without payloads.
   */
  async dropPayloads(throughSeq: number): Promise<void> {
    this.checkOpen();
    throughSeq = Math.min(throughSeq, this.lastSeq);
    if (throughSeq <= this.retention.payloadsThrough) return;
    this.retention = { ...this.retention, payloadsThrough: throughSeq };
    await this.db.put(metaKey('retention'), metaPackr.pack(this.retention), { sync: true });
    await this.payloadLog.dropThrough(throughSeq);
  }

  /**
   * The seq through which payloads may be dropped to keep at most `maxBytes` of them (whole payload-log
   * segments, oldest first), never past `notAfterSeq`.
   */
  payloadSeqWithinBytes(maxBytes: number, notAfterSeq: number): number {
    return this.payloadLog.seqToKeepWithin(maxBytes, notAfterSeq);
  }

  /** The last seq committed at or before `timeMs` (0 if none), found by a metadata scan from `fromSeq`. */
  async lastSeqAtOrBefore(timeMs: number, fromSeq = this.retention.firstSeq): Promise<number> {
    let seq = 0;
    for await (const chunk of this.replayChunks(Math.max(fromSeq, this.retention.firstSeq), maxSeq, { payloads: false }, () => false)) {
      for (const record of chunk) {
        if (record.timeMs > timeMs) return seq;
        seq = record.seq;
      }
    }
    return seq;
  }

  /**
   * Retention: drop whole records up to `throughSeq` (whole frames only, so the first retained seq
   * may be lower). The chain stays verifiable from the first retained record. Returns that seq.
   */
  async dropRecords(throughSeq: number): Promise<number> {
    this.checkOpen();
    throughSeq = Math.min(throughSeq, this.lastSeq);
    let firstKept: { seq: number; prevChain: number } | undefined;
    const doomed: Buffer[] = [];
    for await (const [key, value] of this.db.iterator({ ...recordRange })) {
      const frame = decodeFrame(seqOfKey(key), value, undefined, false);
      if (frame.firstSeq + frame.count - 1 > throughSeq) {
        firstKept = { seq: frame.firstSeq, prevChain: frame.prevChain };
        break;
      }
      doomed.push(key);
    }
    if (doomed.length === 0) return this.retention.firstSeq;
    const firstSeq = firstKept?.seq ?? this.nextSeq;
    const chainBefore = firstKept?.prevChain ?? this.lastChain;
    this.retention = { firstSeq, chainBefore, payloadsThrough: Math.max(this.retention.payloadsThrough, firstSeq - 1) };
    await this.db.put(metaKey('retention'), metaPackr.pack(this.retention), { sync: true });
    await this.db.batch(doomed.map((key) => ({ type: 'del' as const, key })));
    await this.payloadLog.dropThrough(firstSeq - 1);
    return firstSeq;
  }

  async stats(): Promise<JournalStats> {
    this.checkOpen();
    const first = this.retention.firstSeq;
    const last = this.lastSeq;
    let diskBytes = this.payloadLog.diskBytes();
    for (const name of await readdir(this.path)) {
      const st = await stat(join(this.path, name));
      if (st.isFile()) diskBytes += st.size;
    }
    return {
      records: Math.max(0, last - first + 1),
      firstSeq: first,
      lastSeq: last,
      payloadsDroppedThroughSeq: this.retention.payloadsThrough,
      diskBytes,
      spareBytes: this.payloadLog.spareBytes(),
      sealError: this.sealFailure?.message,
      checkpointSeqs: await this.checkpointSeqs(),
    };
  }

  /** Caller metadata beside the log (kept apart from the journal's own). */
  async getMeta<T>(name: string): Promise<T | undefined> {
    this.checkOpen();
    const raw = await this.db.get(metaKey(`user:${name}`));
    return raw === undefined ? undefined : (metaPackr.unpack(raw) as T);
  }

  async putMeta(name: string, value: unknown): Promise<void> {
    this.checkOpen();
    await this.db.put(metaKey(`user:${name}`), metaPackr.pack(value), { sync: true });
  }

  /** Commit whatever is queued, then close the database. Later calls fail with ECLOSED. */
  async close(): Promise<void> {
    if (this.closed) return;
    // The flush loop may still be writing after the last sync resolved (carrying the durable mark):
    // LevelDB must not close under a write.
    const flushesSettled = async (): Promise<void> => {
      while (this.flushActive || this.flushScheduled) await (this.flushScheduled ? new Promise((r) => setImmediate(r)) : this.flushDone);
    };
    await flushesSettled();
    if (this.broken === undefined && this.durableSeq < this.lastSeq) await this.sync();
    await flushesSettled();
    if (this.broken === undefined && this.markedDurableSeq < this.durableSeq) {
      await this.writeBatch([durableMarkOp(this.durableSeq)], true);
      this.marked(this.durableSeq);
    }
    // The mark an idle journal carried was not synced: the seal's flush keeps it past an OS crash.
    if (this.broken === undefined) {
      try {
        await this.seal.sync();
      } catch (err) {
        this.sealFailure ??= err as Error;
      }
    }
    this.closed = true;
    this.batches$.complete();
    this.records$.complete();
    this.payloadLog.close();
    this.seal.close();
    await this.db.close();
  }

  private checkOpen(): void {
    if (this.closed) throw new JournalError('ECLOSED', `journal ${this.path} is closed`);
  }
}

/**
 * An error LevelDB raised, with where it happened: its own message ("Corruption: bad block
 * contents") names neither the store nor what was being read.
 */
function levelDamage(path: string, err: unknown, doing: string): JournalError {
  const message = (err as { cause?: Error }).cause?.message ?? (err as Error).message;
  const corrupt = /corrupt/i.test(message) || (err as { code?: string }).code === 'LEVEL_CORRUPTION';
  return new JournalError(corrupt ? 'ECORRUPT' : 'EIO', `journal ${path}: LevelDB reports ${corrupt ? 'damaged files (its .ldb tables or .log)' : 'an error'} while ${doing}: ${message}`, { cause: err });
}

/** A short hex dump of a damaged metadata record, for error messages. */
function describeRecord(raw: Buffer): string {
  const shown = raw.subarray(0, 32).toString('hex');
  return `${raw.length} bytes, ${shown}${raw.length > 32 ? '…' : ''}`;
}
