/**
 * Time travel over the journal: because every write is an event, the store can say what a volume
 * held at any past seq, which blocks changed between two points, and who last wrote a block, with
 * nothing declared in advance (no dirty bitmap, no snapshot).
 *
 * All of it comes from one fold: replay the journal's metadata from seq 1 with the same reducer as
 * recovery, and beside it keep, per layer, a provenance map (block → seq of the last Write or Zero
 * event to that block in that layer; ExtentMap values seq * 2, plus 1 for zero). A view's provenance
 * at a block is the provenance of the layer the view reads it from.
 *
 * Data of the past: a block of a point-in-time view is read from the layer file when the bytes there
 * still have the CRC32C the writing event recorded for that block (the layer file holds the newest
 * data, which may be newer than the point), else from that event's payload in the journal; when
 * retention dropped the payload, the point is outside the retention window: building its view is
 * refused up front (ERANGE), and a read that finds data gone later fails with EIO naming the window.
 *
 * Points: "seq:N" (or a bare number), "time:ISO-8601" (the last event at or before that time), or a
 * snapshot name of the volume ("NAME" or "VOLUME@NAME"; the point is the event that froze it, so it
 * works for deleted snapshots too).
 */
import { closeSync, openSync, readSync } from 'node:fs';
import { crc32c } from '@node-rs/crc32';
import type { JournalRecord } from '@cowstack/journal';
import { lastValueFrom, tap } from 'rxjs';
import { BlockDeviceError } from './block-device.js';
import { StoreError } from './errors.js';
import { EventType, eventTypeName, type StoreEvent } from './events.js';
import { ExtentMap } from './extent-map.js';
import { applyEvent, emptyProjection, indexIsZero, indexPosition, type Projection, type View } from './projection.js';
import { describeRetention } from './retention.js';
import type { DiffExtent, Store } from './store.js';

/** Largest seq a provenance map can hold (values are seq * 2 + zero flag in an Int32Array). */
const maxProvenanceSeq = 2 ** 30 - 1;

/** Payloads kept in memory by one point-in-time view. */
const payloadCacheEntries = 64;
/** Write events (first block and block CRCs) kept in memory by one point-in-time view. */
const eventCacheEntries = 4096;

type Provenance = Map<number, ExtentMap>;

function track(prov: Provenance, record: JournalRecord<StoreEvent>): void {
  const e = record.meta;
  if (e[0] !== EventType.Write && e[0] !== EventType.Zero) return;
  if (record.seq > maxProvenanceSeq) throw new StoreError('EINVAL', `time travel covers seqs below ${maxProvenanceSeq}; seq ${record.seq} is beyond`);
  let map = prov.get(e[1]);
  if (map === undefined) prov.set(e[1], (map = new ExtentMap(0)));
  map.set(e[2], e[3], record.seq * 2 + (e[0] === EventType.Zero ? 1 : 0));
}

interface Capture {
  /** The volume's view at the captured seq. */
  readonly view: View;
  readonly sizeBytes: number;
  /** Provenance of the view's layers at the captured seq. */
  readonly prov: Provenance;
  /** External image paths of the view's layers, by layer id. */
  readonly external: Map<number, string>;
}

interface Folded {
  readonly state: Projection;
  readonly prov: Provenance;
  readonly capture: Capture | undefined;
}

function captureVolume(state: Projection, prov: Provenance, volume: string): Capture | undefined {
  const v = state.volumes.get(volume);
  if (v === undefined) return undefined;
  const captured: Provenance = new Map();
  const external = new Map<number, string>();
  for (const id of v.view.stack) {
    const map = prov.get(id);
    if (map !== undefined) captured.set(id, map.cloneShared());
    const layer = state.layers.get(id);
    if (layer?.kind === 'external' && layer.source !== null) external.set(id, layer.source.path);
  }
  return {
    view: { stack: [...v.view.stack], index: v.view.index.cloneShared() },
    sizeBytes: state.layers.get(v.top)!.sizeBytes,
    prov: captured,
    external,
  };
}

/**
 * The fold at the journal's head, kept per store and advanced by replaying only what was appended
 * since: questions about "now" (changed blocks, blame) cost the new events, not the whole journal,
 * however many connections ask. Advances are serialized.
 */
class HeadFold {
  private readonly state = emptyProjection();
  private readonly prov: Provenance = new Map();
  private queue: Promise<void> = Promise.resolve();

  constructor(private readonly store: Store) {}

  /** Fold the events appended since the last advance (up to the store's last seq now). */
  private async advance(): Promise<void> {
    const until = this.store.lastSeq;
    if (this.state.seq >= until) return;
    await lastValueFrom(
      this.store.eventLog.replayFrames(this.state.seq + 1, until, { payloads: false }).pipe(
        tap((records) => {
          for (const record of records) {
            track(this.prov, record);
            applyEvent(this.state, record.seq, record.meta);
          }
        }),
      ),
      { defaultValue: undefined },
    );
  }

  /** Advance to the journal head, then answer `question` there; one at a time, in call order. */
  private atHead<T>(question: () => T): Promise<T> {
    const run = this.queue.then(async () => {
      await this.advance();
      return question();
    });
    this.queue = run.then(
      () => undefined,
      () => undefined,
    );
    return run;
  }

  /** Capture `volume` at the journal head (the store's last seq when called). */
  capture(volume: string): Promise<Capture> {
    return this.atHead(() => {
      const capture = captureVolume(this.state, this.prov, volume);
      if (capture === undefined) throw new StoreError('ENOENT', `no volume ${volume}`);
      return capture;
    });
  }

  /**
   * At the journal head: the provenance of each of `layers` that still exists (a layer committed,
   * collected or otherwise gone has no entry; its file no longer holds anything of the past).
   */
  layersNow(layers: Iterable<number>): Promise<Provenance> {
    const wanted = [...layers];
    return this.atHead(() => {
      const out: Provenance = new Map();
      for (const id of wanted) {
        if (!this.state.layers.has(id)) continue;
        out.set(id, this.prov.get(id)?.cloneShared() ?? new ExtentMap(0));
      }
      return out;
    });
  }
}

const headFolds = new WeakMap<Store, HeadFold>();

function checkHistoryKept(store: Store): void {
  const journal = store.eventLog;
  if (journal.firstSeq !== 1) {
    throw new StoreError('EINVAL', `the journal no longer starts at seq 1 (retention dropped records up to ${journal.firstSeq - 1}); history before it is gone`);
  }
}

function headFold(store: Store): HeadFold {
  let head = headFolds.get(store);
  if (head === undefined) headFolds.set(store, (head = new HeadFold(store)));
  return head;
}

/** A volume as it is now, with its provenance: from the store's head fold. */
function captureNow(store: Store, volume: string): Promise<Capture> {
  checkHistoryKept(store);
  return headFold(store).capture(volume);
}

/** Fold the journal (metadata) from seq 1 to `untilSeq`, optionally capturing a volume at `captureAt`. */
async function fold(store: Store, untilSeq: number, captureAt?: { seq: number; volume: string }): Promise<Folded> {
  checkHistoryKept(store);
  const journal = store.eventLog;
  const state = emptyProjection();
  const prov: Provenance = new Map();
  let capture: Capture | undefined;
  const take = (): void => {
    if (captureAt !== undefined && capture === undefined && state.seq >= captureAt.seq) capture = captureVolume(state, prov, captureAt.volume) ?? capture;
  };
  await lastValueFrom(
    journal.replayFrames(1, untilSeq, { payloads: false }).pipe(
      tap((records) => {
        for (const record of records) {
          if (captureAt !== undefined && record.seq > captureAt.seq && capture === undefined) take();
          track(prov, record);
          applyEvent(state, record.seq, record.meta);
        }
      }),
    ),
    { defaultValue: undefined },
  );
  take();
  if (captureAt !== undefined && capture === undefined) {
    throw new StoreError('ENOENT', `volume ${captureAt.volume} did not exist at seq ${captureAt.seq}`);
  }
  return { state, prov, capture };
}

/** Turn a point ("seq:N", N, "time:ISO", snapshot name) into a seq. */
export async function resolvePoint(store: Store, volume: string, spec: string): Promise<number> {
  const journal = store.eventLog;
  const seqMatch = /^(?:seq:)?(\d+)$/.exec(spec);
  if (seqMatch !== null) {
    const seq = Number(seqMatch[1]);
    if (seq > journal.lastSeq) throw new StoreError('EINVAL', `seq ${seq} is in the future (the journal ends at seq ${journal.lastSeq})`);
    return seq;
  }
  const timeText = spec.startsWith('time:') ? spec.slice(5) : /^\d{4}-\d\d-\d\d/.test(spec) ? spec : undefined;
  if (timeText !== undefined) {
    const timeMs = Date.parse(timeText);
    if (Number.isNaN(timeMs)) throw new StoreError('EINVAL', `${JSON.stringify(timeText)} is not an ISO-8601 time`);
    let seq = 0;
    await lastValueFrom(
      journal.replayFrames(journal.firstSeq, undefined, { payloads: false }).pipe(
        tap((records) => {
          for (const r of records) if (r.timeMs <= timeMs) seq = r.seq;
        }),
      ),
      { defaultValue: undefined },
    );
    if (seq === 0 && journal.firstSeq > 1) throw new StoreError('EINVAL', `${new Date(timeMs).toISOString()} is before the journal's first retained record`);
    // Before the store's first event: seq 0, when nothing existed yet (everything changed since).
    return seq;
  }
  const name = spec.startsWith('snap:') ? spec.slice(5) : spec.includes('@') ? spec.slice(spec.indexOf('@') + 1) : spec;
  const owner = spec.includes('@') && !spec.startsWith('snap:') ? spec.slice(0, spec.indexOf('@')) : volume;
  let frozenAt = 0;
  await lastValueFrom(
    journal.replayFrames(journal.firstSeq, undefined, { payloads: false }).pipe(
      tap((records) => {
        for (const r of records) {
          const e = r.meta;
          if ((e[0] === EventType.Frozen && e[1] === owner && e[4] === name) || (e[0] === EventType.SnapshotNamed && e[1] === owner && e[2] === name)) frozenAt = r.seq;
        }
      }),
    ),
    { defaultValue: undefined },
  );
  if (frozenAt === 0) throw new StoreError('ENOENT', `${JSON.stringify(spec)} is not a seq, a time, or a snapshot of ${owner}`);
  return frozenAt;
}

/** Runs of a view's blocks with the provenance (seq * 2 + zero, 0 = none) of the layer each is read from. */
function forEachProvenance(view: View, prov: Provenance, blockCount: number, fn: (start: number, count: number, provenance: number, layer: number) => void): void {
  view.index.forEachRun(0, blockCount, (start, count, value) => {
    if (value === 0) return fn(start, count, 0, -1);
    const layer = view.stack[indexPosition(value)];
    const map = prov.get(layer);
    if (map === undefined) return fn(start, count, 0, layer);
    map.forEachRun(start, count, (s, n, p) => fn(s, n, p, layer));
  });
}

/**
 * Extents of a volume written (or zeroed) after seq `sinceSeq`, as it stood at `untilSeq`, in the
 * volume's lineage (what it was cloned from counts): the dirty bitmap between two points.
 */
export async function changedSince(store: Store, volume: string, sinceSeq: number, untilSeq: number): Promise<DiffExtent[]> {
  if (untilSeq < sinceSeq) throw new StoreError('EINVAL', `--until (seq ${untilSeq}) is before --since (seq ${sinceSeq})`);
  const { view, prov, sizeBytes } = untilSeq >= store.lastSeq ? await captureNow(store, volume) : (await fold(store, untilSeq, { seq: untilSeq, volume })).capture!;
  const bs = store.blockSizeBytes;
  const out: DiffExtent[] = [];
  forEachProvenance(view, prov, Math.ceil(sizeBytes / bs), (start, count, provenance) => {
    if (provenance === 0 || provenance >>> 1 <= sinceSeq) return;
    const offset = start * bs;
    const length = Math.min(count * bs, sizeBytes - offset);
    const last = out[out.length - 1];
    if (last !== undefined && last.offset + last.length === offset) out[out.length - 1] = { offset: last.offset, length: last.length + length };
    else out.push({ offset, length });
  });
  return out;
}

export interface BlameExtent {
  readonly offset: number;
  readonly length: number;
  /** The event that last wrote these bytes (null: never written; the base image's or zeroes). */
  readonly seq: number | null;
  readonly time: string | null;
  readonly type: string;
  readonly layerId: number | null;
  readonly origin: string | null;
}

/** Per extent of [offset, offset + length) of a volume: which event last wrote it. */
export async function blame(store: Store, volume: string, offset: number, length: number): Promise<BlameExtent[]> {
  const { view, prov, sizeBytes } = await captureNow(store, volume);
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > sizeBytes) {
    throw new StoreError('EINVAL', `range ${offset}+${length} is outside the ${sizeBytes}-byte volume`);
  }
  const bs = store.blockSizeBytes;
  const first = Math.floor(offset / bs);
  const last = Math.floor((offset + length - 1) / bs);
  const runs: Array<{ start: number; count: number; provenance: number; layer: number }> = [];
  view.index.forEachRun(first, last - first + 1, (start, count, value) => {
    if (value === 0) return runs.push({ start, count, provenance: 0, layer: -1 });
    const layer = view.stack[indexPosition(value)];
    const map = prov.get(layer);
    if (map === undefined) return runs.push({ start, count, provenance: 0, layer });
    map.forEachRun(start, count, (s, n, p) => runs.push({ start: s, count: n, provenance: p, layer }));
  });
  const details = new Map<number, JournalRecord<StoreEvent>>();
  for (const run of runs) {
    const seq = run.provenance >>> 1;
    if (seq === 0 || details.has(seq)) continue;
    const [record] = await recordsAt(store, seq);
    details.set(seq, record);
  }
  return runs.map((run) => {
    const from = Math.max(run.start * bs, offset);
    const to = Math.min((run.start + run.count) * bs, offset + length);
    const seq = run.provenance >>> 1;
    if (seq === 0) {
      return { offset: from, length: to - from, seq: null, time: null, type: run.layer === -1 ? 'never written' : 'base image', layerId: run.layer === -1 ? null : run.layer, origin: null };
    }
    const record = details.get(seq)!;
    const e = record.meta;
    const origin = e[0] === EventType.Write ? (e[5] ?? null) : e[0] === EventType.Zero ? (e[4] ?? null) : null;
    return { offset: from, length: to - from, seq, time: new Date(record.timeMs).toISOString(), type: eventTypeName(e), layerId: run.layer, origin };
  });
}

async function recordsAt(store: Store, seq: number): Promise<Array<JournalRecord<StoreEvent>>> {
  const out: Array<JournalRecord<StoreEvent>> = [];
  await lastValueFrom(store.eventLog.replay(seq, seq, { payloads: false }).pipe(tap((r) => out.push(r))), { defaultValue: undefined });
  if (out.length !== 1) throw new StoreError('ECORRUPT', `journal record seq ${seq} is missing`);
  return out;
}

/**
 * A volume as it was at a past seq, read-only. Build with `pointInTimeView`; reads come from layer
 * files where the layer still holds the same event, else from journal payloads.
 */
export class PointInTimeView {
  private readonly events = new Map<number, { first: number; crcs: Buffer }>();
  private readonly payloads = new Map<number, Buffer>();

  constructor(
    private readonly store: Store,
    readonly volume: string,
    readonly seq: number,
    readonly sizeBytes: number,
    private readonly view: View,
    private readonly provAt: Provenance,
    private readonly external: Map<number, string>,
  ) {}

  /** Read `length` bytes at `offset` as they were at `seq`. */
  async read(offset: number, length: number): Promise<Buffer> {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length <= 0 || offset + length > this.sizeBytes) {
      throw new BlockDeviceError('EINVAL', `range ${offset}+${length} is outside the ${this.sizeBytes}-byte device`);
    }
    const bs = this.store.blockSizeBytes;
    const out = Buffer.alloc(length);
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const block = Buffer.allocUnsafe(bs);
    for (let b = first; b <= last; b++) {
      const from = Math.max(b * bs, offset);
      const to = Math.min((b + 1) * bs, offset + length);
      if (!(await this.readBlock(b, block))) continue;
      block.copy(out, from - offset, from - b * bs, to - b * bs);
    }
    return out;
  }

  /** Fill `target` with block `b` as it was; false when it read as zeroes. */
  private async readBlock(b: number, target: Buffer): Promise<boolean> {
    const value = this.view.index.get(b);
    if (value === 0 || indexIsZero(value)) return false;
    const layer = this.view.stack[indexPosition(value)];
    const bs = this.store.blockSizeBytes;
    const provenance = this.provAt.get(layer)?.get(b) ?? 0;
    if (provenance === 0) {
      const path = this.external.get(layer);
      if (path === undefined) throw new BlockDeviceError('EIO', `block ${b} of layer ${layer} at seq ${this.seq} has data but no event`);
      readFileAt(path, target, b * bs);
      return true;
    }
    const seq = provenance >>> 1;
    if ((provenance & 1) === 1) return false;
    const event = await this.event(seq);
    const expected = event.crcs.readUInt32LE(4 * (b - event.first));
    if (this.store.projection.layers.has(layer)) {
      // The layer file holds the newest bytes of the block: still the event's, if the CRC says so.
      const bytes = this.store.readLayerFile(layer, b * bs, bs);
      if (crc32c(bytes) === expected) {
        bytes.copy(target);
        return true;
      }
    }
    const payload = await this.payload(seq);
    const at = (b - event.first) * bs;
    payload.copy(target, 0, at, at + bs);
    if (crc32c(target) !== expected) throw new BlockDeviceError('EIO', `journal payload of seq ${seq} fails its CRC at block ${b}`);
    return true;
  }

  /** The Write event at `seq`: its first block and per-block CRCs (cached). */
  private async event(seq: number): Promise<{ first: number; crcs: Buffer }> {
    const cached = this.events.get(seq);
    if (cached !== undefined) return cached;
    const [record] = await recordsAt(this.store, seq);
    const e = record.meta;
    if (e[0] !== EventType.Write) throw new BlockDeviceError('EIO', `journal record seq ${seq} is not a write`);
    const entry = { first: e[2], crcs: e[4] };
    if (this.events.size >= eventCacheEntries) this.events.delete(this.events.keys().next().value!);
    this.events.set(seq, entry);
    return entry;
  }

  private async payload(seq: number): Promise<Buffer> {
    const cached = this.payloads.get(seq);
    if (cached !== undefined) return cached;
    const data = await this.store.eventLog.readPayload(seq);
    if (data === undefined) {
      throw new BlockDeviceError('EIO', `the data written at seq ${seq} is outside the journal's retention window (payloads kept from seq ${this.store.eventLog.payloadsDroppedThroughSeq + 1})`);
    }
    if (this.payloads.size >= payloadCacheEntries) this.payloads.delete(this.payloads.keys().next().value!);
    this.payloads.set(seq, data);
    return data;
  }

  /** Extents at `seq`: data, zero or hole, like a device's block status. */
  extents(offset: number, length: number): Array<{ length: number; hole: boolean; zero: boolean; depth: number }> {
    const bs = this.store.blockSizeBytes;
    const first = Math.floor(offset / bs);
    const last = Math.floor((offset + length - 1) / bs);
    const out: Array<{ length: number; hole: boolean; zero: boolean; depth: number }> = [];
    this.view.index.forEachRun(first, last - first + 1, (start, count, value) => {
      const from = Math.max(start * bs, offset);
      const to = Math.min((start + count) * bs, offset + length);
      const data = value !== 0 && !indexIsZero(value);
      const depth = value === 0 ? 0 : this.view.stack.length - indexPosition(value);
      out.push({ length: to - from, hole: !data, zero: !data, depth });
    });
    return out;
  }
}

function readFileAt(path: string, target: Buffer, position: number): void {
  const fd = openSync(path, 'r');
  try {
    const n = readSync(fd, target, 0, target.length, position);
    target.fill(0, n);
  } finally {
    closeSync(fd);
  }
}

/**
 * A read-only view of `volume` as it was at seq `seq` (folds the journal up to that seq only).
 * Refused (ERANGE) when the point is outside the retention window: some block it needs held data
 * whose journal payload retention dropped and whose layer file no longer holds it (overwritten since,
 * or the layer is gone). Data that leaves the window later fails only the reads that need it (EIO).
 */
export async function pointInTimeView(store: Store, volume: string, seq: number): Promise<PointInTimeView> {
  const { capture } = await fold(store, seq, { seq, volume });
  const { view, prov, sizeBytes } = capture!;
  await checkWithinRetention(store, volume, seq, view, prov, Math.ceil(sizeBytes / store.blockSizeBytes));
  return new PointInTimeView(store, volume, seq, sizeBytes, view, prov, capture!.external);
}

async function checkWithinRetention(store: Store, volume: string, seq: number, view: View, prov: Provenance, blockCount: number): Promise<void> {
  const droppedThrough = store.eventLog.payloadsDroppedThroughSeq;
  if (droppedThrough === 0) return;
  const now = await headFold(store).layersNow(view.stack);
  let lost = 0;
  let firstLost = -1;
  let firstLostSeq = 0;
  const lose = (block: number, count: number, writtenAt: number): void => {
    if (firstLost === -1) [firstLost, firstLostSeq] = [block, writtenAt];
    lost += count;
  };
  forEachProvenance(view, prov, blockCount, (start, count, provenance, layer) => {
    if (provenance === 0 || (provenance & 1) === 1 || provenance >>> 1 > droppedThrough) return;
    const current = now.get(layer);
    if (current === undefined) return lose(start, count, provenance >>> 1);
    current.forEachRun(start, count, (s, n, p) => {
      if (p !== provenance) lose(s, n, provenance >>> 1);
    });
  });
  if (lost === 0) return;
  throw new StoreError(
    'ERANGE',
    `${volume} at seq ${seq} is outside the journal's retention window: ${lost} block(s) held data that is no longer kept ` +
      `(first: block ${firstLost}, written at seq ${firstLostSeq} and overwritten since; payloads are kept from seq ${droppedThrough + 1}, ` +
      `retention ${describeRetention(store.retentionPolicy)})`,
  );
}
