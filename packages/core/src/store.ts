/**
 * The store: one directory holding a LevelDB journal (the source of truth), one sparse data file per
 * layer, and the in-memory projection folded from the journal.
 *
 *   STORE/journal/        LevelDB (packages/journal): events, checkpoints; its LOCK makes one
 *                         process the store's only writer
 *   STORE/layers/<id>.data
 *
 * Write path: build whole blocks (copy-up of partial blocks from the current view) → append a Write
 * event carrying the blocks as payload (group commit; FUA makes the batch synced) → in the journal's
 * commit hook, in seq order: pwrite the blocks into the layer file (page cache), apply the event to the
 * projection with the reducer → resolve. A crash after the commit and before the pwrite is repaired on
 * the next open, which replays everything after the newest checkpoint and re-applies its writes
 * (applying a write twice is harmless). A torn tail (unsynced records an OS crash left without their
 * data) is cut, and the blocks its writes had already put in the layer files get their newest kept
 * write from before the checkpoint back (restoreTornBlocks).
 *
 * Copy-up and concurrency: writes to one volume may be in flight together. A partial-block write reads
 * the rest of the block from the newest in-flight write covering it, else from the committed view, so
 * concurrent writes to different parts of one block all survive. Operations that change a volume's
 * stack (snapshot, delete, commit, flatten) raise a barrier: writes issued meanwhile wait for it.
 *
 * Checkpoints: on close and every `checkpointEveryEvents` events, `checkpointEveryPayloadBytes` bytes
 * of write data or `checkpointEveryMs`, the data files are fdatasynced and the projection is stored
 * with the seq it reflects; payloads older than the oldest kept checkpoint are then dropped from the
 * journal (their data is durable in the layer files).
 */
import { chmodSync, closeSync, existsSync, fstatSync, mkdirSync, openSync, readdirSync, readSync } from 'node:fs';
import { join, resolve } from 'node:path';
import { type CorruptionKind, Journal, JournalCorruptionError, JournalError, type JournalRecord, JournalTornTailError } from '@cowstack/journal';
import { firstValueFrom, lastValueFrom, type Observable, scan, Subject } from 'rxjs';
import { fingerprintImage, verifyImage } from './base-image.js';
import { BlockDeviceError, type Extent, type ExtentContext, type ReadPiece, type ReadResult } from './block-device.js';
import { blockCrcs, payloadCrcOf } from './block-crcs.js';
import { assert, StoreError } from './errors.js';
import { EventType, eventTypeName, type StoreEvent } from './events.js';
import { InflightList } from './inflight-list.js';
import { LayerFiles } from './layer-files.js';
import {
  checkpointEveryEvents,
  checkpointEveryPayloadBytes,
  checkpointEveryMs,
  checkpointsKept,
  asyncReadMinBytes,
  copyChunkBytes,
  copyWindowEvents,
  defaultBlockSizeBytes,
  maxBlockSizeBytes,
  maxDeviceSizeBytes,
  maxWriteBytes,
  minBlockSizeBytes,
  namePattern,
  storeFormatVersion,
} from './limits.js';
import type { ExtentMap } from './extent-map.js';
import { pointInTimeView } from './history.js';
import { ReadBuffers } from './read-buffers.js';
import type { RetentionPolicy } from './retention.js';
import { decodeProjection, encodeProjection } from './projection-codec.js';
import {
  applyEvent,
  BlockState,
  emptyProjection,
  finishDeferredViews,
  indexIsZero,
  indexPosition,
  type Projection,
  ProjectionError,
  snapshotKey,
  type View,
  viewOf,
} from './projection.js';

export type BaseSpec = { kind: 'zero' } | { kind: 'external'; path: string } | { kind: 'import'; path: string };

export interface CreateOptions {
  /** Size of the default volume; required for a zero base, taken from the image otherwise. */
  readonly sizeBytes?: number;
  readonly blockSizeBytes?: number;
  readonly base?: BaseSpec;
  /** Name of the volume created on the base (default "default"). */
  readonly volume?: string;
  readonly onProgress?: ProgressCallback;
  /** How much write-payload history to keep (default: what recovery needs). */
  readonly retain?: RetentionPolicy;
  /** See OpenOptions. */
  readonly checkpointEveryPayloadBytes?: number;
}

export interface OpenOptions {
  readonly onProgress?: ProgressCallback;
  /**
   * Salvage: re-apply the data of every write whose payload the journal still holds (not only those
   * after the checkpoint), so layer-file blocks that damage or discarded events changed get their
   * journaled content back.
   */
  readonly reapplyRetained?: boolean;
  /**
   * Checkpoint after this many bytes of write data since the last checkpoint (default
   * checkpointEveryPayloadBytes). With the default retention this bounds the payload log: it keeps
   * the writes since the older of the two newest checkpoints.
   */
  readonly checkpointEveryPayloadBytes?: number;
}

/** A checkpoint written: the seq it reflects, and how long it took from start to the stored state. */
export interface CheckpointWritten {
  readonly seq: number;
  readonly durationMs: number;
  /** Why it was taken: the event or write-data interval, the timer, or a caller (close, recovery). */
  readonly reason: 'events' | 'bytes' | 'timer' | 'request';
}

/** Long work reports (phase, done, total) in units the phase names (bytes, blocks, events). */
export type ProgressCallback = (phase: string, done: number, total: number) => void;

export interface OpenReport {
  /** Seq of the checkpoint loaded (0: none, replayed from the start). */
  readonly checkpointSeq: number;
  /** Checkpoints that could not be used (damaged), newest first. */
  readonly checkpointsSkipped: Array<{ seq: number; reason: string }>;
  readonly lastSeq: number;
  readonly eventsReplayed: number;
  readonly writesReapplied: number;
  readonly orphanFilesRemoved: number;
  readonly durationMs: number;
  /** A fresh checkpoint was written because events were replayed. */
  readonly checkpointWritten: boolean;
  /**
   * A torn tail cut: records from `fromSeq` on were never synced. `kind` says what was missing: a
   * payload that never reached the disk (`payload-crc`, `payload-missing`: after an OS crash; nothing
   * in it was acknowledged as durable), or a batch LevelDB never got while the batch written beside
   * it did (`gap`: after any crash; nothing from there on had been acknowledged at all).
   * `blocksRestored`: blocks the cut writes had already written to a layer file that got their
   * content from before the checkpoint back (see restoreTornBlocks).
   */
  readonly tailCut: { fromSeq: number; records: number; kind: CorruptionKind; blocksRestored: number } | undefined;
  /**
   * Why the journal's seal was unreadable, when it was: records LevelDB lost before then could not be
   * noticed. The seal has been written anew. Named by every open until one succeeds (this one did).
   */
  readonly sealDamage: string | undefined;
}

export interface VolumeInfo {
  readonly name: string;
  readonly sizeBytes: number;
  readonly topLayerId: number;
  /** Layer ids, bottom to top. */
  readonly stack: readonly number[];
  readonly snapshots: readonly string[];
}

export interface LayerInfo {
  readonly id: number;
  readonly parent: number | null;
  readonly kind: string;
  readonly frozen: boolean;
  readonly sizeBytes: number;
  /** Bytes held as data in this layer (blocks × block size). */
  readonly dataBytes: number;
  /** Bytes recorded as zeroes in this layer. */
  readonly zeroBytes: number;
  readonly children: readonly number[];
  readonly names: readonly string[];
  readonly volume: string | null;
  readonly source: string | null;
}

export interface SnapshotInfo {
  readonly volume: string;
  readonly name: string;
  readonly layerId: number;
}

/** One changed range between two views. */
export interface DiffExtent {
  readonly offset: number;
  readonly length: number;
}

/** One extent of a view, with the layer that holds it (for `map`). */
export interface MapExtent {
  readonly offset: number;
  readonly length: number;
  /** 'data', 'zero' (recorded zeroes) or 'hole' (no layer holds it; reads as zeroes). */
  readonly kind: 'data' | 'zero' | 'hole';
  readonly layerId: number | null;
  /** 1 = top of the view, N = Nth layer down, 0 = no layer. */
  readonly depth: number;
}

/** Who writes, and to which volume exactly. */
export interface WriteSource {
  /** Recorded with the events (blame), e.g. "nbd#12 127.0.0.1:40312". */
  readonly origin?: string;
  /** The volume's createdSeq when the writer opened it: refuse if the name now belongs to another. */
  readonly createdSeq?: number;
}

interface PendingBlocks {
  readonly first: number;
  readonly count: number;
  /** The blocks' new content, or undefined for zeroes. */
  readonly payload: Buffer | undefined;
}

interface VolumeRuntime {
  barrier: Promise<void> | undefined;
  readonly inflight: InflightList<PendingBlocks>;
  /** Writers waiting for writeback room (issued, not yet in `inflight`). */
  waiting: number;
  /** Resolves when nothing is in flight or waiting (created on demand by a barrier). */
  drained: { promise: Promise<void>; resolve: () => void } | undefined;
}

/** The checkpoint interval in payload bytes an option asks for, or the default. */
function checkCheckpointBytes(optionBytes: number | undefined): number {
  const bytes = optionBytes ?? checkpointEveryPayloadBytes;
  if (!Number.isSafeInteger(bytes) || bytes < 1) {
    throw new StoreError('EINVAL', `checkpointEveryPayloadBytes must be a positive integer, not ${bytes}`);
  }
  return bytes;
}

/** A journal or projection error as the StoreError an operator reads, naming the store. */
export function toStoreError(err: unknown, dir: string): unknown {
  if (err instanceof JournalError) {
    switch (err.code) {
      case 'ELOCKED':
        return new StoreError('ELOCKED', `store ${dir} is in use by another process (a cowstack serve, or another command, holds it)`, { cause: err });
      case 'ENOENT':
        return new StoreError('ENOENT', `no cowstack store at ${dir}`, { cause: err });
      case 'EFORMAT':
        return new StoreError('EFORMAT', `store ${dir}: ${err.message}`, { cause: err });
      case 'ECORRUPT':
        return new StoreError('ECORRUPT', `store ${dir}: ${err.message}`, { cause: err });
      default:
        return new StoreError('EIO', `store ${dir}: ${err.message}`, { cause: err });
    }
  }
  if (err instanceof ProjectionError) return new StoreError('ECORRUPT', `store ${dir}: the journal does not fit the store: ${err.message}`, { cause: err });
  return err;
}

function toDeviceError(err: unknown): BlockDeviceError {
  if (err instanceof BlockDeviceError) return err;
  const code = (err as NodeJS.ErrnoException).code;
  if (code === 'ENOSPC') return new BlockDeviceError('ENOSPC', (err as Error).message, { cause: err });
  return new BlockDeviceError('EIO', (err as Error).message, { cause: err });
}

export function parseSnapshotRef(ref: string): { volume: string; name: string } | undefined {
  const at = ref.indexOf('@');
  if (at <= 0 || at === ref.length - 1) return undefined;
  return { volume: ref.slice(0, at), name: ref.slice(at + 1) };
}

function checkName(kind: string, name: string): void {
  if (!namePattern.test(name)) {
    throw new StoreError('EINVAL', `${kind} name ${JSON.stringify(name)} is not valid: use 1 to 128 letters, digits, '.', '_', '+' or '-', starting with a letter or digit`);
  }
}

export class Store {
  readonly dir: string;
  /** What opening the store did (checkpoint loaded, events replayed, writes re-applied). */
  readonly openReport: OpenReport;
  private readonly journal: Journal<StoreEvent>;
  private readonly state: Projection;
  private readonly files: LayerFiles;
  private readonly readBuffers = new ReadBuffers();
  private readonly runtimes = new Map<string, VolumeRuntime>();
  private readonly blockSizeBytes_: number;
  private nextLayerId: number;
  private failure: Error | undefined;
  private eventsSinceCheckpoint = 0;
  private payloadBytesSinceCheckpoint = 0;
  private readonly checkpointEveryPayloadBytes: number;
  private checkpointRunning: Promise<number> | undefined;
  private readonly checkpointsWritten = new Subject<CheckpointWritten>();
  private lastCheckpointSeq: number;
  private readonly checkpointTimer: NodeJS.Timeout;
  private closed = false;
  /** close() has begun: new changes are refused while the ones in flight finish. */
  private closing = false;
  private retention: RetentionPolicy;

  private constructor(dir: string, journal: Journal<StoreEvent>, state: Projection, files: LayerFiles, report: OpenReport, retention: RetentionPolicy, checkpointEveryPayloadBytes: number) {
    this.dir = dir;
    this.checkpointEveryPayloadBytes = checkpointEveryPayloadBytes;
    this.journal = journal;
    this.state = state;
    this.files = files;
    this.openReport = report;
    this.retention = retention;
    this.blockSizeBytes_ = state.config!.blockSizeBytes;
    this.nextLayerId = state.nextLayerId;
    this.lastCheckpointSeq = report.checkpointWritten ? state.seq : report.checkpointSeq;
    journal.onCommit = (records, durable) => this.applyCommitted(records, durable);
    this.checkpointTimer = setInterval(() => {
      if (this.eventsSinceCheckpoint > 0) void this.checkpoint('timer').catch(() => undefined);
    }, checkpointEveryMs);
    this.checkpointTimer.unref();
  }

  // ---------------------------------------------------------------------------------------------
  // Lifecycle

  /** Create a store in `dir` (which must not hold one) with one volume on a new base. */
  static async create(dirArg: string, options: CreateOptions = {}): Promise<Store> {
    const dir = resolve(dirArg);
    const blockSizeBytes = options.blockSizeBytes ?? defaultBlockSizeBytes;
    if (!Number.isInteger(blockSizeBytes) || blockSizeBytes < minBlockSizeBytes || blockSizeBytes > maxBlockSizeBytes || (blockSizeBytes & (blockSizeBytes - 1)) !== 0) {
      throw new StoreError('EINVAL', `block size ${blockSizeBytes} is not a power of two from ${minBlockSizeBytes} to ${maxBlockSizeBytes}`);
    }
    checkCheckpointBytes(options.checkpointEveryPayloadBytes);
    const volume = options.volume ?? 'default';
    checkName('volume', volume);
    const base = options.base ?? { kind: 'zero' };
    const source = base.kind === 'external' || base.kind === 'import' ? fingerprintImage(base.path) : null;
    const sizeBytes = source?.sizeBytes ?? options.sizeBytes;
    if (sizeBytes === undefined) throw new StoreError('EINVAL', 'a size is needed for a store without a base image');
    checkSize(sizeBytes);
    if (options.sizeBytes !== undefined && source !== null && options.sizeBytes !== source.sizeBytes) {
      throw new StoreError('EINVAL', `--size ${options.sizeBytes} does not match the base image's ${source.sizeBytes} bytes`);
    }
    if (existsSync(join(dir, 'journal', 'CURRENT'))) throw new StoreError('EEXIST', `${dir} already holds a cowstack store`);
    // The store holds every volume's data: only its owner may enter it (files inside need no care).
    mkdirSync(join(dir, 'layers'), { recursive: true, mode: 0o700 });
    chmodSync(dir, 0o700);
    let journal: Journal<StoreEvent>;
    try {
      journal = await Journal.open<StoreEvent>(join(dir, 'journal'), { create: true });
    } catch (err) {
      throw toStoreError(err, dir);
    }
    const config = { formatVersion: storeFormatVersion, storeId: crypto.randomUUID(), blockSizeBytes, createdMs: Date.now() };
    const baseId = 1;
    const kind = base.kind === 'external' ? 'external' : base.kind === 'import' ? 'imported' : 'zero';
    await Promise.all([
      journal.append([EventType.StoreCreated, config]),
      journal.append([EventType.LayerCreated, baseId, sizeBytes, kind, base.kind !== 'import', kind === 'external' ? source : null], { sync: true }),
    ]);
    await journal.close();
    const store = await Store.open(dir, { checkpointEveryPayloadBytes: options.checkpointEveryPayloadBytes });
    if (options.retain !== undefined) await store.setRetention(options.retain);
    if (base.kind === 'import') {
      await store.importInto(baseId, base.path, options.onProgress);
      await store.append([EventType.Frozen, '', baseId, -1, ''], true);
    }
    await store.append([EventType.VolumeCreated, volume, store.allocateLayerId(), baseId], true);
    await store.checkpoint();
    return store;
  }

  /**
   * Open a store: load the newest usable checkpoint, replay every event after it (re-applying the
   * data of its writes to the layer files), verify external bases, and checkpoint if anything was
   * replayed. This is also crash recovery: it is always safe, and idempotent.
   */
  static async open(dirArg: string, options: OpenOptions = {}): Promise<Store> {
    const dir = resolve(dirArg);
    const checkpointBytes = checkCheckpointBytes(options.checkpointEveryPayloadBytes);
    let journal: Journal<StoreEvent> | undefined;
    let files: LayerFiles | undefined;
    try {
      const started = performance.now();
      journal = await Journal.open<StoreEvent>(join(dir, 'journal'));
      const openJournal = journal;
      let current: Projection | undefined;
      files = new LayerFiles(
        join(dir, 'layers'),
        () => current?.config?.blockSizeBytes ?? 0,
        (id) => current?.layers.get(id)?.source?.path,
        (id) => current?.layers.get(id)?.frozen === false,
      );
      const layerFiles = files;
      let tailCut: OpenReport['tailCut'];
      // Load the checkpoint and replay the rest; a torn tail (an OS crash cut unsynced payloads short)
      // is cut and the load starts again from the checkpoint.
      let blocksRestored = 0;
      const load = async (torn?: TornBlocks): Promise<{ state: Projection; checkpointSeq: number; skipped: OpenReport['checkpointsSkipped']; eventsReplayed: number; writesReapplied: number }> => {
        const { state, checkpointSeq, skipped } = await loadCheckpoint(openJournal);
        current = state;
        // Salvage re-applies every retained write anyway.
        if (torn !== undefined && options.reapplyRetained !== true) blocksRestored = await restoreTornBlocks(openJournal, state, layerFiles, torn);
        // Volume indexes are rebuilt once at the end instead of after every replayed write.
        state.deferViews = true;
        let eventsReplayed = 0;
        let writesReapplied = 0;
        const total = openJournal.lastSeq - state.seq;
        const onProgress = options.onProgress;
        const checkpointed = state.seq;
        // Salvage re-applies every retained write; the reducer only sees events after the checkpoint.
        const from = options.reapplyRetained === true ? Math.min(checkpointed + 1, Math.max(openJournal.firstSeq, openJournal.payloadsDroppedThroughSeq + 1)) : checkpointed + 1;
        // A frame's records at a time: one RxJS notification per record cost more than applying it.
        await lastValueFrom(
          openJournal.replayFrames(from, undefined, { pause: () => layerFiles.settle(), damagedPayloadsThrough: options.reapplyRetained === true ? checkpointed : 0 }).pipe(
            scan((s, records) => {
              for (const record of records) {
                // After the checkpoint every write is re-applied (a missing payload is damage);
                // before it (salvage only) those whose payloads are still kept and whole (a damaged
                // one is passed over like a dropped one: check names a block it leaves wrong).
                // Record by record, as the write must meet the layers of the records before it, not
                // of the whole frame.
                if (record.meta[0] === EventType.Write && (record.seq > checkpointed || record.payload !== undefined)) {
                  reapplyWrite(s, layerFiles, record);
                  writesReapplied++;
                }
                if (record.seq > checkpointed) {
                  applyEvent(s, record.seq, record.meta);
                  eventsReplayed++;
                  if (onProgress !== undefined && (eventsReplayed & 0xffff) === 0) onProgress('replay', eventsReplayed, total);
                }
              }
              return s;
            }, state),
          ),
          { defaultValue: state },
        );
        // The re-applied writes reach the layer files before the store serves or checkpoints.
        await layerFiles.drain();
        finishDeferredViews(state);
        onProgress?.('replay', eventsReplayed, total);
        return { state, checkpointSeq, skipped, eventsReplayed, writesReapplied };
      };
      let loaded;
      try {
        loaded = await load();
      } catch (err) {
        if (!(err instanceof JournalTornTailError)) throw err;
        // The cut records were applied before the crash: their blocks may be in the layer files.
        const torn = blocksWritten(await openJournal.recordsFrom(err.seq));
        const records = await openJournal.cutTail(err.seq);
        loaded = await load(torn);
        tailCut = { fromSeq: err.seq, records, kind: err.kind, blocksRestored };
      }
      const { state, checkpointSeq, skipped, eventsReplayed, writesReapplied } = loaded;
      if (state.config === undefined) throw new StoreError('ECORRUPT', `store ${dir} has no StoreCreated event`);
      if (state.config.formatVersion !== storeFormatVersion) {
        throw new StoreError('EFORMAT', `store ${dir} has format version ${state.config.formatVersion}; this build opens version ${storeFormatVersion}`);
      }
      for (const layer of state.layers.values()) if (layer.source !== null && layer.kind === 'external') verifyImage(layer.source);
      for (const id of state.collected) files.remove(id);
      state.collected = [];
      // Replay opened files of layers that later froze or thawed: advise them as they are now.
      files.refreshAdvice();
      const orphanFilesRemoved = removeOrphans(join(dir, 'layers'), state, files);
      const report: OpenReport = {
        checkpointSeq,
        checkpointsSkipped: skipped,
        lastSeq: state.seq,
        eventsReplayed,
        writesReapplied,
        orphanFilesRemoved,
        durationMs: performance.now() - started,
        checkpointWritten: eventsReplayed > 0,
        tailCut,
        sealDamage: journal.damagedSeal,
      };
      const retention = (await journal.getMeta<RetentionPolicy>(retentionMetaKey)) ?? { kind: 'checkpoint' };
      const store = new Store(dir, journal, state, files, report, retention, checkpointBytes);
      if (eventsReplayed > 0) await store.checkpoint();
      // The report names it from here on (recover, check, serve say so): later opens need not.
      await journal.acknowledgeSealDamage();
      return store;
    } catch (err) {
      // Writes re-applied before the failure are journaled data: they finish before the files close.
      await files?.drain().catch(() => undefined);
      files?.closeAll();
      await journal?.close().catch(() => undefined);
      throw toStoreError(err, dir);
    }
  }

  /** Commit what is queued, checkpoint, and close. The store can then be opened by another process. */
  async close(): Promise<void> {
    if (this.closed) return;
    clearInterval(this.checkpointTimer);
    // Refuse new changes, and let the block writes already issued commit first: a request still
    // running after its client left must land before the checkpoint, not after it.
    this.closing = true;
    for (const rt of this.runtimes.values()) await this.drain(rt);
    await this.journal.sync();
    if (this.failure === undefined && this.state.seq > this.lastCheckpointSeq) await this.checkpoint();
    else if (this.checkpointRunning !== undefined) await this.checkpointRunning.catch(() => undefined);
    this.closed = true;
    this.checkpointsWritten.complete();
    this.files.closeAll();
    await this.journal.close();
  }

  /** Every checkpoint this store writes from now on (completes when the store closes). */
  get checkpoints$(): Observable<CheckpointWritten> {
    return this.checkpointsWritten.asObservable();
  }

  /**
   * Store the projection as a checkpoint: fdatasync the layer files, then store the state with the seq
   * it reflects, keep the newest `checkpointsKept`, and drop payloads the oldest kept one covers.
   */
  checkpoint(reason: CheckpointWritten['reason'] = 'request'): Promise<number> {
    if (this.checkpointRunning !== undefined) return this.checkpointRunning.catch(() => undefined).then(() => this.checkpoint(reason));
    const run = (async (): Promise<number> => {
      const started = performance.now();
      const seq = this.state.seq;
      const blob = encodeProjection(this.state);
      this.eventsSinceCheckpoint = 0;
      this.payloadBytesSinceCheckpoint = 0;
      // The payload log is flushed while writes go on committing: the synced write that stores the
      // checkpoint would otherwise flush all of it and hold every write behind it meanwhile.
      await Promise.all([this.files.syncAll(), this.journal.flushPayloads()]);
      await this.journal.putCheckpoint(seq, blob);
      this.lastCheckpointSeq = seq;
      await this.journal.pruneCheckpoints(checkpointsKept);
      const kept = await this.journal.checkpointSeqs();
      if (kept.length > 0) await this.journal.dropPayloads(await this.payloadDropPoint(kept[0]));
      this.checkpointsWritten.next({ seq, durationMs: performance.now() - started, reason });
      return seq;
    })();
    this.checkpointRunning = run;
    return run.finally(() => {
      this.checkpointRunning = undefined;
    });
  }

  /**
   * The seq through which payloads go, given the oldest kept checkpoint (recovery needs nothing at
   * or below it) and the retention policy (which may keep more).
   */
  private async payloadDropPoint(oldestCheckpointSeq: number): Promise<number> {
    const policy = this.retention;
    switch (policy.kind) {
      case 'checkpoint':
        return oldestCheckpointSeq;
      case 'all':
        return 0;
      case 'seq':
        return Math.min(oldestCheckpointSeq, policy.seq - 1);
      case 'time':
        return Math.min(oldestCheckpointSeq, await this.journal.lastSeqAtOrBefore(Date.now() - policy.ms, this.journal.payloadsDroppedThroughSeq + 1));
      case 'bytes':
        return this.journal.payloadSeqWithinBytes(policy.bytes, oldestCheckpointSeq);
    }
  }

  /** The retention policy (how much payload history to keep); stored in the journal. */
  get retentionPolicy(): RetentionPolicy {
    return this.retention;
  }

  async setRetention(policy: RetentionPolicy): Promise<void> {
    await this.journal.putMeta(retentionMetaKey, policy);
    this.retention = policy;
  }

  /** Resolves when every acknowledged write is durable (the journal is synced). */
  async flush(): Promise<void> {
    this.checkHealthy();
    try {
      await this.journal.sync();
    } catch (err) {
      throw toDeviceError(err);
    }
  }

  get blockSizeBytes(): number {
    return this.blockSizeBytes_;
  }

  get lastSeq(): number {
    return this.state.seq;
  }

  /** The journal, for inspection tools (replay, stats, verify). Do not append to it directly. */
  get eventLog(): Journal<StoreEvent> {
    return this.journal;
  }

  /** Read-only access to the projection, for check and inspection. */
  get projection(): Projection {
    return this.state;
  }

  // ---------------------------------------------------------------------------------------------
  // The commit hook: the only place state changes on the live path.

  private applyCommitted(records: ReadonlyArray<JournalRecord<StoreEvent>>, durable: boolean): void {
    if (this.failure !== undefined) throw this.failure;
    let layersFrozeOrThawed = false;
    for (const record of records) {
      try {
        const event = record.meta;
        if (event[0] === EventType.Write) {
          assert(record.payload !== undefined, `write event ${record.seq} committed without its payload`);
          // After a durable batch the event loop has time to spare: the next batch waits for the disk too.
          this.files.writeBehind(event[1], record.payload, event[2] * this.blockSizeBytes_, durable);
        } else if (event[0] === EventType.Frozen || event[0] === EventType.Committed) {
          layersFrozeOrThawed = true;
        }
        applyEvent(this.state, record.seq, event);
        this.payloadBytesSinceCheckpoint += record.payloadLength;
      } catch (err) {
        // The event is in the journal but not applied: stop taking writes; reopening repairs it.
        this.failure = new Error(`store ${this.dir}: applying ${eventTypeName(record.meta)} event seq ${record.seq} failed (${(err as Error).message}); reopen the store to recover`, { cause: err });
        throw this.failure;
      }
    }
    if (this.state.collected.length > 0) {
      for (const id of this.state.collected) this.files.remove(id);
      this.state.collected = [];
    }
    if (layersFrozeOrThawed) this.files.refreshAdvice();
    this.eventsSinceCheckpoint += records.length;
    const due = this.eventsSinceCheckpoint >= checkpointEveryEvents ? 'events' : this.payloadBytesSinceCheckpoint >= this.checkpointEveryPayloadBytes ? 'bytes' : undefined;
    if (due !== undefined && this.checkpointRunning === undefined) {
      setImmediate(() => void this.checkpoint(due).catch(() => undefined));
    }
  }

  private checkHealthy(): void {
    if (this.closed || this.closing) throw new BlockDeviceError('ESHUTDOWN', `store ${this.dir} is ${this.closed ? 'closed' : 'closing'}`);
    if (this.failure !== undefined) throw new BlockDeviceError('EIO', this.failure.message);
    const writeback = this.files.failure;
    if (writeback !== undefined) {
      throw new BlockDeviceError('EIO', `store ${this.dir}: writing a layer file failed (${writeback.message}); the journal holds the data: reopen the store to recover`);
    }
  }

  /**
   * Writers wait here while too much written-behind data waits for its layer files. Call it after
   * the barrier check and only when `files.room()` says so: an await before the barrier check would
   * let a snapshot issued later overtake the write. A waiting writer counts as in flight for barriers.
   */
  private async waitForWritebackRoom(rt: VolumeRuntime, room: Promise<void>): Promise<void> {
    rt.waiting++;
    try {
      for (let r: Promise<void> | undefined = room; r !== undefined; r = this.files.room()) await r;
    } finally {
      rt.waiting--;
      this.settled(rt);
    }
  }

  /** Wake a barrier waiting for the volume's writes in flight once there are none. */
  private settled(rt: VolumeRuntime): void {
    if (rt.inflight.size === 0 && rt.waiting === 0 && rt.drained !== undefined) {
      rt.drained.resolve();
      rt.drained = undefined;
    }
  }

  private async append(event: StoreEvent, sync = false, payload?: Buffer): Promise<number> {
    if (this.closed || this.closing) throw new StoreError('EIO', `store ${this.dir} is ${this.closed ? 'closed' : 'closing'}`);
    if (this.failure !== undefined) throw new StoreError('EIO', this.failure.message);
    const payloadCrc = event[0] === EventType.Write ? payloadCrcOf(event[4], this.blockSizeBytes_) : undefined;
    return this.journal.append(event, { sync, payload, payloadCrc });
  }

  private allocateLayerId(): number {
    this.nextLayerId = Math.max(this.nextLayerId, this.state.nextLayerId);
    return this.nextLayerId++;
  }

  private runtime(volume: string): VolumeRuntime {
    let rt = this.runtimes.get(volume);
    if (rt === undefined) {
      rt = { barrier: undefined, inflight: new InflightList(), waiting: 0, drained: undefined };
      this.runtimes.set(volume, rt);
    }
    return rt;
  }

  /**
   * Run `body` with the volume's writes held back: new writes wait, and writes already issued are
   * committed and applied first (commit and flatten walk the applied state, so a write still in
   * flight would be missed and lost).
   */
  private async withBarrier<T>(volume: string, body: () => Promise<T>): Promise<T> {
    const rt = this.runtime(volume);
    while (rt.barrier !== undefined) await rt.barrier;
    let release!: () => void;
    rt.barrier = new Promise<void>((r) => (release = r));
    try {
      await this.drain(rt);
      return await body();
    } finally {
      rt.barrier = undefined;
      release();
    }
  }

  /** Resolves once none of the volume's writes is in flight or waiting for writeback room. */
  private async drain(rt: VolumeRuntime): Promise<void> {
    while (rt.inflight.size > 0 || rt.waiting > 0) {
      if (rt.drained === undefined) {
        let resolve!: () => void;
        const promise = new Promise<void>((r) => (resolve = r));
        rt.drained = { promise, resolve };
      }
      await rt.drained.promise;
    }
  }

  // ---------------------------------------------------------------------------------------------
  // Queries

  volumes(): VolumeInfo[] {
    return [...this.state.volumes.values()]
      .map((v) => ({
        name: v.name,
        sizeBytes: this.state.layers.get(v.top)!.sizeBytes,
        topLayerId: v.top,
        stack: [...v.view.stack],
        snapshots: [...this.state.snapshots.keys()].filter((k) => k.startsWith(`${v.name}@`)).map((k) => k.slice(v.name.length + 1)),
      }))
      .sort((a, b) => (a.name < b.name ? -1 : 1));
  }

  layers(): LayerInfo[] {
    const bs = this.blockSizeBytes_;
    return [...this.state.layers.values()]
      .sort((a, b) => a.id - b.id)
      .map((l) => {
        let dataBlocks = 0;
        let zeroBlocks = 0;
        if (l.kind === 'external') dataBlocks = l.blockCount;
        else
          l.bitmap.forEachSetRun((_s, n, v) => {
            if (v === BlockState.Data) dataBlocks += n;
            else zeroBlocks += n;
          });
        return {
          id: l.id,
          parent: l.parent === -1 ? null : l.parent,
          kind: l.kind,
          frozen: l.frozen,
          sizeBytes: l.sizeBytes,
          dataBytes: Math.min(dataBlocks * bs, l.kind === 'external' ? l.sizeBytes : Infinity),
          zeroBytes: zeroBlocks * bs,
          children: [...l.children].sort((a, b) => a - b),
          names: [...l.names].sort(),
          volume: l.volume ?? null,
          source: l.source?.path ?? null,
        };
      });
  }

  snapshots(): SnapshotInfo[] {
    return [...this.state.snapshots.entries()]
      .map(([key, layerId]) => {
        const ref = parseSnapshotRef(key)!;
        return { volume: ref.volume, name: ref.name, layerId };
      })
      .sort((a, b) => (a.volume === b.volume ? (a.name < b.name ? -1 : 1) : a.volume < b.volume ? -1 : 1));
  }

  hasVolume(name: string): boolean {
    return this.state.volumes.has(name);
  }

  /** The frozen layer a "volume@snapshot" reference names. */
  snapshotLayer(ref: string): number {
    const parsed = parseSnapshotRef(ref);
    if (parsed === undefined) throw new StoreError('EINVAL', `${JSON.stringify(ref)} is not a VOLUME@SNAPSHOT reference`);
    const id = this.state.snapshots.get(snapshotKey(parsed.volume, parsed.name));
    if (id === undefined) throw new StoreError('ENOENT', `no snapshot ${ref}`);
    return id;
  }

  /** Resolve a view reference: a volume name, "volume@snapshot", or "#<layer id>" (frozen layers). */
  resolveView(ref: string): { layerId: number; readOnly: boolean; volume: string | undefined } {
    if (ref.startsWith('#')) {
      const id = Number(ref.slice(1));
      const layer = this.state.layers.get(id);
      if (layer === undefined) throw new StoreError('ENOENT', `no layer ${ref}`);
      return { layerId: id, readOnly: layer.volume === undefined, volume: layer.volume };
    }
    if (ref.includes('@')) return { layerId: this.snapshotLayer(ref), readOnly: true, volume: undefined };
    const volume = this.state.volumes.get(ref);
    if (volume === undefined) throw new StoreError('ENOENT', `no volume ${ref}`);
    return { layerId: volume.top, readOnly: false, volume: ref };
  }

  sizeOfLayer(layerId: number): number {
    const layer = this.state.layers.get(layerId);
    if (layer === undefined) throw new BlockDeviceError('ESHUTDOWN', `layer ${layerId} no longer exists`);
    return layer.sizeBytes;
  }

  private view(layerId: number): View {
    if (!this.state.layers.has(layerId)) throw new BlockDeviceError('ESHUTDOWN', `layer ${layerId} no longer exists`);
    return viewOf(this.state, layerId);
  }

  /**
   * The view of a volume by name. `createdSeq` binds the call to one incarnation of the volume (a
   * device opened on it): a volume deleted (or re-created) since is ESHUTDOWN. Without it (a direct
   * engine call), a name that is no volume is ENOENT.
   */
  private volumeView(name: string, createdSeq?: number): { view: View; sizeBytes: number } {
    const volume = this.state.volumes.get(name);
    if (volume === undefined && createdSeq === undefined) throw new StoreError('ENOENT', `no volume ${name}`);
    if (volume === undefined || (createdSeq !== undefined && volume.createdSeq !== createdSeq)) {
      throw new BlockDeviceError('ESHUTDOWN', `volume ${name} no longer exists${volume !== undefined ? ' (a new volume has its name)' : ''}`);
    }
    return { view: volume.view, sizeBytes: this.state.layers.get(volume.top)!.sizeBytes };
  }

  // ---------------------------------------------------------------------------------------------
  // Block I/O

  /** Read from the view of a layer (a volume's top or any frozen layer). */
  readLayer(layerId: number, offset: number, length: number): ReadResult {
    this.checkHealthy();
    const sizeBytes = this.sizeOfLayer(layerId);
    checkRange(offset, length, sizeBytes, 'EINVAL');
    return this.readView(this.view(layerId), offset, length, false) as ReadResult;
  }

  readVolume(name: string, offset: number, length: number): ReadResult {
    this.checkHealthy();
    const { view, sizeBytes } = this.volumeView(name);
    checkRange(offset, length, sizeBytes, 'EINVAL');
    return this.readView(view, offset, length, false) as ReadResult;
  }

  /**
   * Read for a protocol server: small reads are synchronous page-cache reads; reads of at least
   * `asyncReadMinBytes` run their preads in the reader thread, in parallel with other work.
   */
  readViewOf(layerId: number, offset: number, length: number): ReadResult | Promise<ReadResult> {
    this.checkHealthy();
    const sizeBytes = this.sizeOfLayer(layerId);
    checkRange(offset, length, sizeBytes, 'EINVAL');
    return this.readView(this.view(layerId), offset, length, length >= asyncReadMinBytes);
  }

  /**
   * Read a range of a view: one Buffer when every byte is data, else data and zero pieces. Runs of
   * blocks held by one layer are read with one pread each, straight into the result. With `async`,
   * the preads go to the reader thread as one batch and a Promise is returned (large reads).
   */
  private readView(view: View, offset: number, length: number, async: boolean): ReadResult | Promise<ReadResult> {
    const bs = this.blockSizeBytes_;
    const end = offset + length;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    if (first === last && !async) {
      // The common case: one block, no run walk.
      const value = view.index.get(first);
      if (value === 0 || indexIsZero(value)) return [{ length, data: undefined }];
      const out = this.readBuffers.take(length);
      this.files.read(view.stack[indexPosition(value)], out, 0, length, offset);
      return out;
    }
    let out: Buffer | undefined;
    const pieces: ReadPiece[] = [];
    const runs: Array<{ layerId: number; targetOffset: number; length: number; position: number }> = [];
    let hasHole = false;
    view.index.forEachRun(first, last - first + 1, (start, count, value) => {
      const from = Math.max(start * bs, offset);
      const to = Math.min((start + count) * bs, end);
      if (value === 0 || indexIsZero(value)) {
        hasHole = true;
        const prev = pieces[pieces.length - 1];
        if (prev !== undefined && prev.data === undefined) pieces[pieces.length - 1] = { length: prev.length + to - from, data: undefined };
        else pieces.push({ length: to - from, data: undefined });
        return;
      }
      out ??= this.readBuffers.take(length);
      const layer = view.stack[indexPosition(value)];
      if (async) runs.push({ layerId: layer, targetOffset: from - offset, length: to - from, position: from });
      else this.files.read(layer, out, from - offset, to - from, from);
      const prev = pieces[pieces.length - 1];
      if (prev !== undefined && prev.data !== undefined) pieces[pieces.length - 1] = { length: prev.length + to - from, data: out.subarray(from - offset - prev.length, to - offset) };
      else pieces.push({ length: to - from, data: out.subarray(from - offset, to - offset) });
    });
    const result: ReadResult = hasHole ? pieces : out!;
    if (!async) return result;
    if (runs.length === 0) return Promise.resolve(result);
    // The reader thread gets the buffer's memory and sends it back as a new ArrayBuffer: the result
    // is made again of views of that one, at the same places (taken now: the transfer empties them).
    const dataAt = hasHole ? pieces.map((piece) => (piece.data === undefined ? undefined : piece.data.byteOffset - out!.byteOffset)) : undefined;
    return this.files.readMany(out!, runs).then((back): ReadResult => {
      this.readBuffers.returned(back);
      if (dataAt === undefined) return back;
      return pieces.map((piece, i) => {
        const at = dataAt[i];
        return at === undefined ? piece : { length: piece.length, data: back.subarray(at, at + piece.length) };
      });
    });
  }

  /** A read's result is no longer used by anyone: its buffer may serve the next read. */
  recycle(result: ReadResult): void {
    // The data pieces of a sparse result are views of one buffer: any of them gives it back.
    const data = Buffer.isBuffer(result) ? result : result.find((piece) => piece.data !== undefined)?.data;
    if (data !== undefined) this.readBuffers.give(data);
  }

  /** Raw bytes of a layer's own data file (not its view), for check and export of a layer. */
  readLayerFile(layerId: number, offset: number, length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    this.files.read(layerId, out, 0, length, offset);
    return out;
  }

  /** The current content of block `block` of a volume, as the next write must see it. */
  private blockContent(rt: VolumeRuntime, view: View, block: number, target: Buffer, at: number): void {
    const bs = this.blockSizeBytes_;
    const p = rt.inflight.findNewest((w) => block >= w.first && block < w.first + w.count);
    if (p !== undefined) {
      if (p.payload === undefined) target.fill(0, at, at + bs);
      else p.payload.copy(target, at, (block - p.first) * bs, (block - p.first + 1) * bs);
      return;
    }
    const value = view.index.get(block);
    if (value === 0 || indexIsZero(value)) target.fill(0, at, at + bs);
    else this.files.read(view.stack[indexPosition(value)], target, at, bs, block * bs);
  }

  /**
   * Write `data` at `offset` of a volume. The device owns `data` until the promise settles. With
   * `fua`, the write is durable when the promise resolves.
   */
  writeVolume(name: string, offset: number, data: Buffer, fua: boolean, source: WriteSource = {}): Promise<void> {
    if (data.length > maxWriteBytes) return Promise.reject(new BlockDeviceError('EINVAL', `write of ${data.length} bytes is over maxWriteBytes (${maxWriteBytes})`));
    return this.mutate(name, offset, data.length, source, (rt, view) => {
      const bs = this.blockSizeBytes_;
      const first = Math.floor(offset / bs);
      const count = Math.floor((offset + data.length - 1) / bs) - first + 1;
      let payload: Buffer;
      if (offset % bs === 0 && data.length % bs === 0) {
        payload = data;
      } else {
        payload = Buffer.allocUnsafe(count * bs);
        if (offset % bs !== 0) this.blockContent(rt, view, first, payload, 0);
        if ((offset + data.length) % bs !== 0 && (count > 1 || offset % bs === 0)) this.blockContent(rt, view, first + count - 1, payload, (count - 1) * bs);
        data.copy(payload, offset - first * bs);
      }
      return this.appendBlocks(rt, view, first, count, payload, fua, source.origin);
    });
  }

  /**
   * The one way into a volume's blocks: wait out a barrier and writeback backpressure, check the
   * store, the volume (this very one, see WriteSource) and the range, then run `body` in the same
   * turn: nothing may run between these checks and the body registering its write in flight, or a
   * snapshot could overtake it. With no barrier and no backpressure (the common case) the body runs
   * at once, in the caller's turn, without an async frame of its own.
   */
  private mutate(name: string, offset: number, length: number, source: WriteSource, body: (rt: VolumeRuntime, view: View) => Promise<void>): Promise<void> {
    try {
      const rt = this.runtime(name);
      if (rt.barrier === undefined && !this.files.overBacklog()) return this.mutateNow(rt, name, offset, length, source, body);
      return this.mutateLater(name, offset, length, source, body);
    } catch (err) {
      return Promise.reject(err);
    }
  }

  private async mutateLater(name: string, offset: number, length: number, source: WriteSource, body: (rt: VolumeRuntime, view: View) => Promise<void>): Promise<void> {
    let rt = this.runtime(name);
    while (rt.barrier !== undefined) {
      await rt.barrier;
      rt = this.runtime(name);
    }
    const room = this.files.room();
    if (room !== undefined) await this.waitForWritebackRoom(rt, room);
    return this.mutateNow(rt, name, offset, length, source, body);
  }

  private mutateNow(rt: VolumeRuntime, name: string, offset: number, length: number, source: WriteSource, body: (rt: VolumeRuntime, view: View) => Promise<void>): Promise<void> {
    this.checkHealthy();
    const { view, sizeBytes } = this.volumeView(name, source.createdSeq);
    checkRange(offset, length, sizeBytes, 'ENOSPC');
    return body(rt, view);
  }

  /** Append a Write (payload) or Zero (no payload) event for whole blocks of a volume's top. */
  private async appendBlocks(rt: VolumeRuntime, view: View, first: number, count: number, payload: Buffer | undefined, fua: boolean, origin: string | undefined): Promise<void> {
    const top = view.stack[view.stack.length - 1];
    const entry = rt.inflight.add({ first, count, payload });
    try {
      if (payload === undefined) {
        await this.journal.append(origin === undefined ? [EventType.Zero, top, first, count] : [EventType.Zero, top, first, count, origin], { sync: fua });
      } else {
        const crcs = blockCrcs(payload, this.blockSizeBytes_);
        // The payload's CRC comes from the block CRCs: the journal need not read the bytes again.
        const payloadCrc = payloadCrcOf(crcs, this.blockSizeBytes_);
        await this.journal.append(origin === undefined ? [EventType.Write, top, first, count, crcs] : [EventType.Write, top, first, count, crcs, origin], { payload, payloadCrc, sync: fua });
      }
    } catch (err) {
      throw toDeviceError(err);
    } finally {
      rt.inflight.remove(entry);
      this.settled(rt);
    }
  }

  /**
   * Make a range of a volume read as zeroes. Whole blocks become "zero" in the top layer (no data
   * written); partial blocks at the edges are written with zeroes.
   */
  async zeroVolume(name: string, offset: number, length: number, fua: boolean, source: WriteSource = {}): Promise<void> {
    return this.mutate(name, offset, length, source, async (rt, view) => {
      const bs = this.blockSizeBytes_;
      const end = offset + length;
      const wholeFirst = Math.ceil(offset / bs);
      const wholeEnd = Math.floor(end / bs);
      const work: Promise<void>[] = [];
      const edge = (block: number, from: number, to: number): void => {
        const payload = Buffer.allocUnsafe(bs);
        this.blockContent(rt, view, block, payload, 0);
        payload.fill(0, from - block * bs, to - block * bs);
        work.push(this.appendBlocks(rt, view, block, 1, payload, fua, source.origin));
      };
      if (wholeFirst > wholeEnd) {
        edge(Math.floor(offset / bs), offset, end);
      } else {
        if (offset % bs !== 0) edge(wholeFirst - 1, offset, wholeFirst * bs);
        if (wholeEnd > wholeFirst) work.push(this.appendBlocks(rt, view, wholeFirst, wholeEnd - wholeFirst, undefined, fua, source.origin));
        if (end % bs !== 0) edge(wholeEnd, wholeEnd * bs, end);
      }
      await Promise.all(work);
    });
  }

  /** Discard whole blocks of a range (they read as zeroes afterwards); partial blocks are left alone. */
  async trimVolume(name: string, offset: number, length: number, fua: boolean, source: WriteSource = {}): Promise<void> {
    return this.mutate(name, offset, length, source, async (rt, view) => {
      const bs = this.blockSizeBytes_;
      const first = Math.ceil(offset / bs);
      const end = Math.floor((offset + length) / bs);
      if (end > first) await this.appendBlocks(rt, view, first, end - first, undefined, fua, source.origin);
      else if (fua) await this.flush();
    });
  }

  /** Block status of a layer's view from `offset`, merged per context. */
  extents(layerId: number, offset: number, length: number, context: ExtentContext): Extent[] {
    this.checkHealthy();
    const sizeBytes = this.sizeOfLayer(layerId);
    checkRange(offset, length, sizeBytes, 'EINVAL');
    const view = this.view(layerId);
    const out: Extent[] = [];
    for (const e of this.mapView(view, offset, length)) {
      const hole = e.kind !== 'data';
      const zero = e.kind !== 'data';
      const prev = out[out.length - 1];
      const same = prev !== undefined && (context === 'base:allocation' ? prev.hole === hole && prev.zero === zero : prev.depth === e.depth);
      if (same) out[out.length - 1] = { ...prev, length: prev.length + e.length };
      else out.push({ length: e.length, hole, zero, depth: e.depth });
    }
    return out;
  }

  /** Extents of a view with the layer holding each (like `qemu-img map`). */
  map(ref: string, offset = 0, length?: number): MapExtent[] {
    const { layerId } = this.resolveView(ref);
    const sizeBytes = this.sizeOfLayer(layerId);
    const len = length ?? sizeBytes - offset;
    checkRange(offset, len, sizeBytes, 'EINVAL');
    return this.mapView(this.view(layerId), offset, len);
  }

  private mapView(view: View, offset: number, length: number): MapExtent[] {
    const bs = this.blockSizeBytes_;
    const end = offset + length;
    const first = Math.floor(offset / bs);
    const last = Math.floor((end - 1) / bs);
    const out: MapExtent[] = [];
    view.index.forEachRun(first, last - first + 1, (start, count, value) => {
      const from = Math.max(start * bs, offset);
      const to = Math.min((start + count) * bs, end);
      const kind = value === 0 ? 'hole' : indexIsZero(value) ? 'zero' : 'data';
      const pos = value === 0 ? -1 : indexPosition(value);
      out.push({ offset: from, length: to - from, kind, layerId: pos === -1 ? null : view.stack[pos], depth: pos === -1 ? 0 : view.stack.length - pos });
    });
    return out;
  }

  /**
   * Ranges where two views may differ: blocks whose content comes from different layers (or differs
   * in zero/absent). Blocks that come from the same layer are equal by construction.
   */
  diff(refA: string, refB: string): DiffExtent[] {
    const a = this.view(this.resolveView(refA).layerId);
    const b = this.view(this.resolveView(refB).layerId);
    const sizeA = this.sizeOfLayer(a.stack[a.stack.length - 1]);
    const sizeB = this.sizeOfLayer(b.stack[b.stack.length - 1]);
    const bs = this.blockSizeBytes_;
    const blocks = Math.ceil(Math.max(sizeA, sizeB) / bs);
    const identity = (view: View, value: number): string =>
      value === 0 ? 'z' : indexIsZero(value) ? 'z' : `d${view.stack[indexPosition(value)]}`;
    const runsA: Array<[number, number, string]> = [];
    const runsB: Array<[number, number, string]> = [];
    a.index.forEachRun(0, blocks, (s, n, v) => runsA.push([s, n, identity(a, v)]));
    b.index.forEachRun(0, blocks, (s, n, v) => runsB.push([s, n, identity(b, v)]));
    const out: DiffExtent[] = [];
    let i = 0;
    let j = 0;
    let at = 0;
    while (at < blocks && i < runsA.length && j < runsB.length) {
      const endA = runsA[i][0] + runsA[i][1];
      const endB = runsB[j][0] + runsB[j][1];
      const to = Math.min(endA, endB);
      if (runsA[i][2] !== runsB[j][2]) {
        const prev = out[out.length - 1];
        if (prev !== undefined && prev.offset + prev.length === at * bs) out[out.length - 1] = { offset: prev.offset, length: prev.length + (to - at) * bs };
        else out.push({ offset: at * bs, length: (to - at) * bs });
      }
      at = to;
      if (endA === to) i++;
      if (endB === to) j++;
    }
    const size = Math.max(sizeA, sizeB);
    return out.map((e) => ({ offset: e.offset, length: Math.min(e.length, size - e.offset) })).filter((e) => e.length > 0);
  }

  // ---------------------------------------------------------------------------------------------
  // Layer-tree operations

  /** Create a volume on a new zero base of `sizeBytes`. */
  async createVolume(name: string, sizeBytes: number): Promise<VolumeInfo> {
    checkName('volume', name);
    checkSize(sizeBytes);
    if (this.state.volumes.has(name)) throw new StoreError('EEXIST', `volume ${name} already exists`);
    const baseId = this.allocateLayerId();
    const topId = this.allocateLayerId();
    await Promise.all([this.append([EventType.LayerCreated, baseId, sizeBytes, 'zero', true, null]), this.append([EventType.VolumeCreated, name, topId, baseId], true)]);
    return this.volumeInfo(name);
  }

  /** Create a volume on a new base holding a copy of a raw image (zero blocks are not stored). */
  async importVolume(name: string, path: string, onProgress?: ProgressCallback): Promise<VolumeInfo> {
    checkName('volume', name);
    if (this.state.volumes.has(name)) throw new StoreError('EEXIST', `volume ${name} already exists`);
    const { sizeBytes } = fingerprintImage(path);
    checkSize(sizeBytes);
    const baseId = this.allocateLayerId();
    await this.append([EventType.LayerCreated, baseId, sizeBytes, 'imported', false, null], true);
    await this.importInto(baseId, path, onProgress);
    await this.append([EventType.Frozen, '', baseId, -1, ''], true);
    await this.append([EventType.VolumeCreated, name, this.allocateLayerId(), baseId], true);
    return this.volumeInfo(name);
  }

  /** Freeze a volume's top as snapshot `name` (default snap-N) and stack a new writable top. */
  async snapshot(volume: string, name?: string): Promise<SnapshotInfo> {
    if (!this.state.volumes.has(volume)) throw new StoreError('ENOENT', `no volume ${volume}`);
    let snapName = name;
    if (snapName === undefined) {
      let n = 1;
      while (this.state.snapshots.has(snapshotKey(volume, `snap-${n}`))) n++;
      snapName = `snap-${n}`;
    }
    checkName('snapshot', snapName);
    const chosen = snapName;
    return this.withBarrier(volume, async () => {
      const v = this.state.volumes.get(volume);
      if (v === undefined) throw new StoreError('ENOENT', `no volume ${volume}`);
      if (this.state.snapshots.has(snapshotKey(volume, chosen))) throw new StoreError('EEXIST', `snapshot ${volume}@${chosen} already exists`);
      const layerId = v.top;
      await this.append([EventType.Frozen, volume, layerId, this.allocateLayerId(), chosen], true);
      return { volume, name: chosen, layerId };
    });
  }

  /**
   * A retroactive snapshot: materialise `volume` as it was at journal seq `seq` into a new frozen
   * layer named `volume@name` (default at-SEQ), usable for clone. Its data is copied from the layer
   * files and the journal (needs the payloads of that time to be retained).
   */
  async snapshotAt(volume: string, seq: number, name: string = `at-${seq}`, onProgress?: ProgressCallback): Promise<SnapshotInfo> {
    checkName('snapshot', name);
    if (this.state.snapshots.has(snapshotKey(volume, name))) throw new StoreError('EEXIST', `snapshot ${volume}@${name} already exists`);
    const pit = await pointInTimeView(this, volume, seq);
    const layerId = this.allocateLayerId();
    const bs = this.blockSizeBytes_;
    await this.append([EventType.LayerCreated, layerId, pit.sizeBytes, 'cow', false, null], true);
    const extents = pit.extents(0, pit.sizeBytes);
    const total = extents.reduce((n, e) => n + (e.hole ? 0 : e.length), 0);
    const window = new CopyWindow();
    let at = 0;
    let done = 0;
    try {
      for (const e of extents) {
        if (!e.hole) {
          for (let from = at; from < at + e.length; from += copyChunkBytes) {
            const length = Math.min(copyChunkBytes, at + e.length - from);
            const payload = Buffer.alloc(Math.ceil(length / bs) * bs);
            (await pit.read(from, Math.min(payload.length, pit.sizeBytes - from))).copy(payload);
            await window.add(this.append([EventType.Write, layerId, from / bs, payload.length / bs, blockCrcs(payload, bs)], false, payload));
            done += length;
            onProgress?.('snapshot', done, total);
          }
        }
        at += e.length;
      }
      await window.drain();
    } catch (err) {
      // Data left the retention window during the copy (overwritten, or dropped by a checkpoint):
      // the half-built layer is sealed, named and deleted, which collects it.
      await window.drain().catch(() => undefined);
      try {
        await this.append([EventType.Frozen, '', layerId, -1, ''], false);
        await this.append([EventType.SnapshotNamed, volume, name, layerId], false);
        await this.append([EventType.SnapshotDeleted, volume, name], true);
      } catch {
        // The journal refuses appends (the store failed): the error below says why; the half-built
        // layer is in no view and no snapshot, and a later run of the command starts afresh.
      }
      throw err instanceof BlockDeviceError ? new StoreError('ERANGE', `snapshot ${volume}@${name} at seq ${seq} abandoned: ${err.message}`, { cause: err }) : err;
    }
    await this.append([EventType.Frozen, '', layerId, -1, ''], false);
    await this.append([EventType.SnapshotNamed, volume, name, layerId], true);
    return { volume, name, layerId };
  }

  async deleteSnapshot(ref: string): Promise<void> {
    const parsed = parseSnapshotRef(ref);
    this.snapshotLayer(ref);
    await this.append([EventType.SnapshotDeleted, parsed!.volume, parsed!.name], true);
  }

  /** A new volume on a frozen layer ("volume@snapshot" or "#id"). */
  async clone(sourceRef: string, name: string): Promise<VolumeInfo> {
    checkName('volume', name);
    if (this.state.volumes.has(name)) throw new StoreError('EEXIST', `volume ${name} already exists`);
    const { layerId } = this.resolveView(sourceRef);
    if (!this.state.layers.get(layerId)!.frozen) throw new StoreError('EINVAL', `${sourceRef} is not frozen; clone a snapshot (VOLUME@SNAPSHOT)`);
    await this.append([EventType.Cloned, name, layerId, this.allocateLayerId()], true);
    return this.volumeInfo(name);
  }

  async deleteVolume(name: string): Promise<void> {
    if (!this.state.volumes.has(name)) throw new StoreError('ENOENT', `no volume ${name}`);
    await this.withBarrier(name, async () => {
      if (!this.state.volumes.has(name)) throw new StoreError('ENOENT', `no volume ${name}`);
      await this.append([EventType.VolumeDeleted, name], true);
    });
    this.runtimes.delete(name);
  }

  /** The seq that created volume `name` (tells it from a later volume of the same name). */
  volumeCreatedSeq(name: string): number | undefined {
    return this.state.volumes.get(name)?.createdSeq;
  }

  volumeInfo(name: string): VolumeInfo {
    const info = this.volumes().find((v) => v.name === name);
    if (info === undefined) throw new StoreError('ENOENT', `no volume ${name}`);
    return info;
  }

  /**
   * Merge a layer into its parent: `target` is a volume (its top is merged into the layer below it,
   * which becomes the volume's top) or "volume@snapshot" (that frozen layer is merged into its
   * parent). The parent must have no other child and no snapshot name, and must not be an external
   * image: otherwise others would see their data change. Writes to the volume wait meanwhile.
   */
  async commit(target: string, onProgress?: ProgressCallback): Promise<{ layerId: number; parentId: number; bytesCopied: number }> {
    const { layerId, volume } = this.resolveView(target);
    const run = async (): Promise<{ layerId: number; parentId: number; bytesCopied: number }> => {
      const layer = this.state.layers.get(layerId);
      if (layer === undefined) throw new StoreError('ENOENT', `no layer for ${target}`);
      const parentId = layer.parent;
      if (parentId === -1) throw new StoreError('EINVAL', `${target} has no layer below it to commit into`);
      const parent = this.state.layers.get(parentId)!;
      if (parent.kind === 'external') throw new StoreError('EBUSY', `the layer below ${target} is the external image ${parent.source?.path}; cowstack never writes it`);
      if (parent.children.size !== 1) throw new StoreError('EBUSY', `the layer below ${target} (layer ${parentId}) is shared by ${parent.children.size} layers; committing would change what the others see`);
      if (parent.names.size !== 0) throw new StoreError('EBUSY', `the layer below ${target} (layer ${parentId}) is snapshot ${[...parent.names].join(', ')}; delete that snapshot first`);
      const bytesCopied = await this.copyBlocks(parentId, layer.bitmap, layer.blockCount, (b) => ({ state: layer.bitmap.get(b), layer: layer.id }), onProgress, 'commit');
      await this.append([EventType.Committed, layerId, parentId], true);
      return { layerId, parentId, bytesCopied };
    };
    return volume !== undefined ? this.withBarrier(volume, run) : run();
  }

  /** Make a volume independent of every layer below its top: copy what it reads from them into the top. */
  async flatten(name: string, onProgress?: ProgressCallback): Promise<{ bytesCopied: number }> {
    if (!this.state.volumes.has(name)) throw new StoreError('ENOENT', `no volume ${name}`);
    return this.withBarrier(name, async () => {
      const volume = this.state.volumes.get(name);
      if (volume === undefined) throw new StoreError('ENOENT', `no volume ${name}`);
      const top = this.state.layers.get(volume.top)!;
      const view = volume.view;
      const topPos = view.stack.length - 1;
      const bytesCopied = await this.copyBlocks(
        top.id,
        view.index,
        top.blockCount,
        (b) => {
          const v = view.index.get(b);
          if (v === 0 || indexPosition(v) === topPos) return { state: BlockState.Absent, layer: -1 };
          return { state: indexIsZero(v) ? BlockState.Zero : BlockState.Data, layer: view.stack[indexPosition(v)] };
        },
        onProgress,
        'flatten',
      );
      await this.append([EventType.Flattened, name], true);
      return { bytesCopied };
    });
  }

  /**
   * Copy blocks into layer `targetId` with journaled Write/Zero events, walking the non-default runs
   * of `walk`: each block `classify` calls Data is read from the layer it names, each it calls Zero
   * becomes a Zero event, others are skipped. Crash-safe: the events replay like any others, and the
   * structural event that follows (Committed, Flattened) is appended only after all of them.
   */
  private async copyBlocks(
    targetId: number,
    walk: ExtentMap,
    blockCount: number,
    classify: (block: number) => { state: number; layer: number },
    onProgress: ProgressCallback | undefined,
    phase: string,
  ): Promise<number> {
    const bs = this.blockSizeBytes_;
    const runs: Array<[number, number]> = [];
    let totalBlocks = 0;
    walk.forEachRun(0, blockCount, (start, count, value) => {
      if (value !== 0) {
        runs.push([start, count]);
        totalBlocks += count;
      }
    });
    const chunkBlocks = Math.max(1, Math.floor(copyChunkBytes / bs));
    const window = new CopyWindow();
    let doneBlocks = 0;
    let bytesCopied = 0;
    for (const [runStart, runCount] of runs) {
      let b = runStart;
      const runEnd = runStart + runCount;
      while (b < runEnd) {
        const head = classify(b);
        let n = 1;
        while (b + n < runEnd && n < chunkBlocks) {
          const next = classify(b + n);
          if (next.state !== head.state || (head.state === BlockState.Data && next.layer !== head.layer)) break;
          n++;
        }
        if (head.state === BlockState.Zero) {
          await window.add(this.append([EventType.Zero, targetId, b, n]));
        } else if (head.state === BlockState.Data) {
          const payload = Buffer.allocUnsafe(n * bs);
          this.files.read(head.layer, payload, 0, n * bs, b * bs);
          await window.add(this.append([EventType.Write, targetId, b, n, blockCrcs(payload, bs)], false, payload));
          bytesCopied += n * bs;
        }
        b += n;
        doneBlocks += n;
        onProgress?.(phase, doneBlocks, totalBlocks);
      }
    }
    await window.drain();
    await this.journal.sync();
    return bytesCopied;
  }

  /** Fill a writable root layer from a raw image (store creation with --import); zero blocks are skipped. */
  private async importInto(layerId: number, path: string, onProgress?: ProgressCallback): Promise<void> {
    const bs = this.blockSizeBytes_;
    const fd = openSync(path, 'r');
    try {
      const total = fstatSync(fd).size;
      const chunk = Math.max(bs, Math.floor(copyChunkBytes / bs) * bs);
      const window = new CopyWindow();
      for (let at = 0; at < total; at += chunk) {
        const want = Math.min(chunk, total - at);
        const buf = Buffer.alloc(Math.ceil(want / bs) * bs);
        let got = 0;
        while (got < want) {
          const n = readSync(fd, buf, got, want - got, at + got);
          if (n === 0) break;
          got += n;
        }
        // Write runs of non-zero blocks only: zero blocks stay absent (read as zeroes).
        const blocks = buf.length / bs;
        let i = 0;
        while (i < blocks) {
          if (isZero(buf, i * bs, bs)) {
            i++;
            continue;
          }
          let j = i + 1;
          while (j < blocks && !isZero(buf, j * bs, bs)) j++;
          const payload = buf.subarray(i * bs, j * bs);
          await window.add(this.append([EventType.Write, layerId, at / bs + i, j - i, blockCrcs(payload, bs)], false, payload));
          i = j;
        }
        onProgress?.('import', Math.min(at + chunk, total), total);
      }
      await window.drain();
      await this.journal.sync();
    } finally {
      closeSync(fd);
    }
  }
}

/** Keeps up to `copyWindowEvents` appends in flight; the first failure fails the copy. */
class CopyWindow {
  private readonly inflight = new Set<Promise<unknown>>();
  private failure: unknown;

  async add(append: Promise<unknown>): Promise<void> {
    const tracked = append.then(
      () => {
        this.inflight.delete(tracked);
      },
      (err: unknown) => {
        this.inflight.delete(tracked);
        this.failure ??= err;
      },
    );
    this.inflight.add(tracked);
    if (this.inflight.size >= copyWindowEvents) await Promise.race(this.inflight);
    if (this.failure !== undefined) throw this.failure;
  }

  async drain(): Promise<void> {
    await Promise.all(this.inflight);
    if (this.failure !== undefined) throw this.failure;
  }
}

/** Journal metadata key of the retention policy. */
const retentionMetaKey = 'retention-policy';

function isZero(buf: Buffer, at: number, length: number): boolean {
  for (let i = at; i < at + length; i += 8) if (buf.readBigUInt64LE(i) !== 0n) return false;
  return true;
}

function checkSize(sizeBytes: number): void {
  if (!Number.isSafeInteger(sizeBytes) || sizeBytes <= 0 || sizeBytes > maxDeviceSizeBytes) {
    throw new StoreError('EINVAL', `size ${sizeBytes} is not a whole number of bytes from 1 to ${maxDeviceSizeBytes}`);
  }
}

function checkRange(offset: number, length: number, sizeBytes: number, pastEnd: 'EINVAL' | 'ENOSPC'): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0) {
    throw new BlockDeviceError('EINVAL', `range ${offset}+${length} is not a positive byte range`);
  }
  if (offset + length > sizeBytes) {
    throw new BlockDeviceError(pastEnd, `range ${offset}+${length} is past the end of the ${sizeBytes}-byte device`);
  }
}

/** Load the newest checkpoint that decodes; fall back to older ones (their payloads are kept). */
async function loadCheckpoint(journal: Journal<StoreEvent>): Promise<{ state: Projection; checkpointSeq: number; skipped: Array<{ seq: number; reason: string }> }> {
  const skipped: Array<{ seq: number; reason: string }> = [];
  const seqs = (await journal.checkpointSeqs()).reverse();
  for (const seq of seqs) {
    try {
      const checkpoint = await journal.getCheckpoint(seq);
      if (checkpoint === undefined) continue;
      const state = decodeProjection(checkpoint.blob);
      if (seq < journal.firstSeq - 1) throw new Error(`its records were dropped from the journal`);
      if (seq < journal.payloadsDroppedThroughSeq) throw new Error(`write payloads after it were dropped from the journal`);
      return { state, checkpointSeq: seq, skipped };
    } catch (err) {
      if (!(err instanceof JournalCorruptionError) && !(err instanceof ProjectionError) && !(err instanceof Error)) throw err;
      skipped.push({ seq, reason: (err as Error).message });
    }
  }
  const why = skipped.length > 0 ? skipped.map((s) => `checkpoint ${s.seq}: ${s.reason}`).join('; ') : 'it holds no checkpoint';
  if (journal.firstSeq > 1) {
    throw new StoreError('ECORRUPT', `journal ${journal.path}: no usable checkpoint, and the journal no longer starts at seq 1 (${why}): the state before seq ${journal.firstSeq} is lost`);
  }
  if (journal.payloadsDroppedThroughSeq > 0) {
    // Retention drops payloads only behind a checkpoint, so one existed: without it, replay from
    // seq 1 would meet writes whose data is gone.
    throw new StoreError(
      'ECORRUPT',
      `journal ${journal.path}: no usable checkpoint (${why}), and retention dropped the write payloads through seq ${journal.payloadsDroppedThroughSeq} behind a checkpoint that is gone: replaying from seq 1 cannot rebuild the layer files`,
    );
  }
  return { state: emptyProjection(), checkpointSeq: 0, skipped };
}

/** Recovery: write a journaled Write's payload into its layer file again. */
function reapplyWrite(state: Projection, files: LayerFiles, record: JournalRecord<StoreEvent>): void {
  const event = record.meta;
  assert(event[0] === EventType.Write, 'reapplyWrite takes Write events');
  if (!state.layers.has(event[1])) return; // the reducer will refuse this event and name its seq
  if (record.payload === undefined) {
    throw new StoreError('ECORRUPT', `write event seq ${record.seq} after the checkpoint has no payload in the journal`);
  }
  files.writeBehind(event[1], record.payload, event[2] * state.config!.blockSizeBytes, false);
}

/** Blocks of layer files, by layer id. */
type TornBlocks = Map<number, Set<number>>;

/** The layer blocks the Write events among `records` wrote. */
function blocksWritten(records: ReadonlyArray<{ meta: StoreEvent }>): TornBlocks {
  const out: TornBlocks = new Map();
  for (const { meta } of records) {
    if (meta[0] !== EventType.Write) continue;
    let blocks = out.get(meta[1]);
    if (blocks === undefined) out.set(meta[1], (blocks = new Set()));
    for (let b = meta[2]; b < meta[2] + meta[3]; b++) blocks.add(b);
  }
  return out;
}

/**
 * After a torn tail is cut: give the blocks its writes had written their last content from before
 * the checkpoint back (replay re-applies every write after it). That content is the newest
 * retained Write of each block at or before the checkpoint; a block whose newest such write
 * retention dropped keeps what the cut write left, and `check` names it.
 */
async function restoreTornBlocks(journal: Journal<StoreEvent>, state: Projection, files: LayerFiles, torn: TornBlocks): Promise<number> {
  const from = Math.max(journal.firstSeq, journal.payloadsDroppedThroughSeq + 1);
  if (torn.size === 0 || from > state.seq) return 0;
  let newest: Map<number, Map<number, number>>;
  try {
    newest = await newestWrites(journal, from, state.seq, torn);
  } catch (err) {
    // Damage the checkpoint covers (a missing frame, say) hides which write came last: restore
    // nothing rather than guess; check names the blocks the cut writes left.
    if (err instanceof JournalCorruptionError) return 0;
    throw err;
  }
  const bs = state.config!.blockSizeBytes;
  let restored = 0;
  for (const [layerId, blocks] of newest) {
    if (!state.layers.has(layerId)) continue;
    const bySeq = new Map<number, number[]>();
    for (const [block, seq] of blocks) {
      const list = bySeq.get(seq);
      if (list === undefined) bySeq.set(seq, [block]);
      else list.push(block);
    }
    for (const [seq, list] of bySeq) {
      let record: JournalRecord<StoreEvent>;
      try {
        record = await firstValueFrom(journal.replay(seq, seq));
      } catch (err) {
        // A damaged payload before the checkpoint: those blocks keep what the cut writes left.
        if (err instanceof JournalCorruptionError) continue;
        throw err;
      }
      const { meta: event, payload } = record;
      assert(payload !== undefined && event[0] === EventType.Write && event[1] === layerId, `write seq ${seq} is retained with its payload`);
      for (const block of list) files.writeBehind(layerId, payload.subarray((block - event[2]) * bs, (block - event[2] + 1) * bs), block * bs, false);
      restored += list.length;
    }
  }
  return restored;
}

/** Layer and block -> the seq of the newest Write of it in seqs from..to, for the blocks in `torn`; from the records alone. */
async function newestWrites(journal: Journal<StoreEvent>, from: number, to: number, torn: TornBlocks): Promise<Map<number, Map<number, number>>> {
  const newest = new Map<number, Map<number, number>>();
  return lastValueFrom(
    journal.replayFrames(from, to, { payloads: false }).pipe(
      scan((found, records) => {
        for (const { seq, meta } of records) {
          if (meta[0] !== EventType.Write) continue;
          const blocks = torn.get(meta[1]);
          if (blocks === undefined) continue;
          for (let b = meta[2]; b < meta[2] + meta[3]; b++) {
            if (!blocks.has(b)) continue;
            let layer = found.get(meta[1]);
            if (layer === undefined) found.set(meta[1], (layer = new Map()));
            layer.set(b, seq);
          }
        }
        return found;
      }, newest),
    ),
    { defaultValue: newest },
  );
}

/** Delete layer files that belong to no layer (left by a crash between an event and its cleanup). */
function removeOrphans(layersDir: string, state: Projection, files: LayerFiles): number {
  let removed = 0;
  for (const name of readdirSync(layersDir)) {
    const match = /^(\d+)\.data$/.exec(name);
    if (match === null) continue;
    const id = Number(match[1]);
    if (!state.layers.has(id)) {
      files.remove(id);
      removed++;
    }
  }
  return removed;
}
