/**
 * The operations a command asks of a store, one table for both ways of reaching it: run here on a
 * store this process opened, or, when a `cowstack serve` holds the store, sent over its control
 * socket and run there by the same code (control.ts). Each takes JSON-able arguments and returns a
 * JSON-able result; streaming operations (journal inspect/tail) also emit items as they go.
 */
import { closeSync, ftruncateSync, openSync, writeSync } from 'node:fs';
import { resolve } from 'node:path';
import {
  applyEvent,
  blame,
  changedSince,
  describeRetention,
  dmCowTable,
  emptyProjection,
  EventType,
  eventTypeName,
  type Projection,
  importDmCow,
  verifyStoreJournal,
  parseRetention,
  type ProgressCallback,
  resolvePoint,
  Store,
  type StoreEvent,
} from '@cowstack/core';
import type { JournalRecord } from '@cowstack/journal';
import { lastValueFrom, scan, tap } from 'rxjs';

export interface OperationContext {
  readonly store: Store;
  readonly progress?: ProgressCallback;
  /** Streaming operations send items here. */
  readonly emit?: (item: unknown) => void;
  /** Aborted when the client goes away (ends a `tail --follow`). */
  readonly signal?: AbortSignal;
  /** True inside `cowstack serve`: the store takes writes, so there is something to follow. */
  readonly served?: boolean;
}

type Args = Record<string, unknown>;
type Operation = (ctx: OperationContext, args: Args) => Promise<unknown>;

const str = (args: Args, key: string): string => {
  const v = args[key];
  if (typeof v !== 'string') throw new Error(`operation argument ${key} must be a string`);
  return v;
};
const num = (args: Args, key: string): number | undefined => {
  const v = args[key];
  if (v === undefined || v === null) return undefined;
  if (typeof v !== 'number' || !Number.isFinite(v)) throw new Error(`operation argument ${key} must be a number`);
  return v;
};

/** One journal event as the inspection commands print it. */
export interface EventLine {
  readonly seq: number;
  readonly time: string;
  readonly type: string;
  readonly volume: string | null;
  readonly layer: number | null;
  readonly offset: number | null;
  readonly length: number | null;
  readonly crc: string;
  readonly detail: string;
}

function hex(n: number): string {
  return (n >>> 0).toString(16).padStart(8, '0');
}

/** Describe a record; `state` is the projection just before it (for layer → volume). */
export function describe(record: JournalRecord<StoreEvent>, state: Projection): EventLine {
  const e = record.meta;
  const bs = state.config?.blockSizeBytes ?? 0;
  const base = { seq: record.seq, time: new Date(record.timeMs).toISOString(), type: eventTypeName(e), crc: hex(record.crc) };
  const volumeOf = (layer: number): string | null => state.layers.get(layer)?.volume ?? null;
  switch (e[0]) {
    case EventType.Write:
      return { ...base, volume: volumeOf(e[1]), layer: e[1], offset: e[2] * bs, length: e[3] * bs, detail: `data crc ${hex(record.payloadCrc)}` };
    case EventType.Zero:
      return { ...base, volume: volumeOf(e[1]), layer: e[1], offset: e[2] * bs, length: e[3] * bs, detail: '' };
    case EventType.StoreCreated:
      return { ...base, volume: null, layer: null, offset: null, length: null, detail: `block size ${e[1].blockSizeBytes}, format ${e[1].formatVersion}` };
    case EventType.LayerCreated:
      return { ...base, volume: null, layer: e[1], offset: null, length: e[2], detail: `${e[3]} base${e[5] ? ` ${e[5].path}` : ''}` };
    case EventType.VolumeCreated:
      return { ...base, volume: e[1], layer: e[2], offset: null, length: null, detail: `on layer ${e[3]}` };
    case EventType.Frozen:
      return e[1] === ''
        ? { ...base, volume: null, layer: e[2], offset: null, length: null, detail: 'base sealed' }
        : { ...base, volume: e[1], layer: e[2], offset: null, length: null, detail: `snapshot ${e[1]}@${e[4]}, new top layer ${e[3]}` };
    case EventType.Cloned:
      return { ...base, volume: e[1], layer: e[3], offset: null, length: null, detail: `clone of layer ${e[2]}` };
    case EventType.SnapshotDeleted:
      return { ...base, volume: e[1], layer: null, offset: null, length: null, detail: `snapshot ${e[1]}@${e[2]} deleted` };
    case EventType.VolumeDeleted:
      return { ...base, volume: e[1], layer: null, offset: null, length: null, detail: '' };
    case EventType.Committed:
      return { ...base, volume: volumeOf(e[1]), layer: e[1], offset: null, length: null, detail: `merged into layer ${e[2]}` };
    case EventType.Flattened:
      return { ...base, volume: e[1], layer: null, offset: null, length: null, detail: '' };
    case EventType.SnapshotNamed:
      return { ...base, volume: e[1], layer: e[3], offset: null, length: null, detail: `snapshot ${e[1]}@${e[2]} (retroactive)` };
    default:
      return { ...base, volume: null, layer: null, offset: null, length: null, detail: 'unknown event' };
  }
}

/** Replay the journal from seq 1, folding state, and call `visit` for records in [from, to]. */
async function walkEvents(store: Store, from: number, to: number, visit: (line: EventLine) => void, signal?: AbortSignal): Promise<number> {
  let visited = 0;
  const journal = store.eventLog;
  await lastValueFrom(
    journal.replay(journal.firstSeq, to, { payloads: false }).pipe(
      scan((state, record) => {
        if (record.seq >= from && !signal?.aborted) {
          visit(describe(record, state));
          visited++;
        }
        return applyEvent(state, record.seq, record.meta);
      }, emptyProjection()),
    ),
    { defaultValue: undefined },
  );
  return visited;
}

function matches(line: EventLine, volume: string | undefined, type: string | undefined): boolean {
  if (volume !== undefined && line.volume !== volume) return false;
  if (type !== undefined && line.type.toLowerCase() !== type.toLowerCase()) return false;
  return true;
}

export const operations: Record<string, Operation> = {
  async ls({ store }) {
    return { store: store.dir, blockSizeBytes: store.blockSizeBytes, lastSeq: store.lastSeq, volumes: store.volumes(), snapshots: store.snapshots(), layers: store.layers() };
  },
  async 'volume.ls'({ store }) {
    return store.volumes();
  },
  async 'volume.create'({ store }, args) {
    return store.createVolume(str(args, 'name'), num(args, 'sizeBytes')!);
  },
  async 'volume.delete'({ store }, args) {
    await store.deleteVolume(str(args, 'name'));
    return { deleted: str(args, 'name') };
  },
  async snapshot({ store }, args) {
    return store.snapshot(str(args, 'volume'), typeof args.name === 'string' ? args.name : undefined);
  },
  async 'snapshot.delete'({ store }, args) {
    await store.deleteSnapshot(str(args, 'ref'));
    return { deleted: str(args, 'ref') };
  },
  async clone({ store }, args) {
    return store.clone(str(args, 'source'), str(args, 'name'));
  },
  async commit({ store, progress }, args) {
    return store.commit(str(args, 'target'), progress);
  },
  async flatten({ store, progress }, args) {
    return store.flatten(str(args, 'volume'), progress);
  },
  async map({ store }, args) {
    return store.map(str(args, 'ref'));
  },
  async diff({ store }, args) {
    return store.diff(str(args, 'a'), str(args, 'b'));
  },
  async import({ store, progress }, args) {
    return store.importVolume(str(args, 'name'), resolve(str(args, 'path')), progress);
  },
  async export({ store, progress }, args) {
    const ref = str(args, 'ref');
    const path = resolve(str(args, 'path'));
    const extents = store.map(ref);
    const size = extents.reduce((n, e) => n + e.length, 0);
    const { layerId } = store.resolveView(ref);
    const fd = openSync(path, 'w', 0o600);
    let dataBytes = 0;
    try {
      ftruncateSync(fd, size);
      let done = 0;
      for (const e of extents) {
        if (e.kind === 'data') {
          for (let at = e.offset; at < e.offset + e.length; at += 4 * 1024 * 1024) {
            const n = Math.min(4 * 1024 * 1024, e.offset + e.length - at);
            const data = store.readLayer(layerId, at, n);
            if (!Buffer.isBuffer(data)) throw new Error(`layer ${layerId} changed during export`);
            writeSync(fd, data, 0, n, at);
            dataBytes += n;
            progress?.('export', done + (at - e.offset) + n, size);
          }
        }
        done += e.length;
        progress?.('export', done, size);
      }
    } finally {
      closeSync(fd);
    }
    return { ref, path, sizeBytes: size, dataBytes };
  },
  async 'journal.stats'({ store }) {
    const journal = store.eventLog;
    const stats = await journal.stats();
    const byType: Record<string, number> = {};
    let payloadBytes = 0;
    await lastValueFrom(
      journal.replay(journal.firstSeq, undefined, { payloads: false }).pipe(
        tap((r) => {
          const t = eventTypeName(r.meta);
          byType[t] = (byType[t] ?? 0) + 1;
          if (r.seq > stats.payloadsDroppedThroughSeq) payloadBytes += r.payloadLength;
        }),
      ),
      { defaultValue: undefined },
    );
    const window = await payloadWindow(store, stats.payloadsDroppedThroughSeq + 1);
    return {
      ...stats,
      eventsByType: byType,
      retainedPayloadBytes: payloadBytes,
      payloadsRetainedFromSeq: stats.payloadsDroppedThroughSeq + 1,
      payloadsRetainedFromTime: window,
      retention: store.retentionPolicy,
      retentionDescription: describeRetention(store.retentionPolicy),
    };
  },
  async 'diff.since'({ store }, args) {
    const volume = str(args, 'volume');
    const since = await resolvePoint(store, volume, str(args, 'since'));
    const until = typeof args.until === 'string' ? await resolvePoint(store, volume, args.until) : store.lastSeq;
    return { volume, sinceSeq: since, untilSeq: until, extents: await changedSince(store, volume, since, until) };
  },
  async blame({ store }, args) {
    return blame(store, str(args, 'volume'), num(args, 'offset')!, num(args, 'length')!);
  },
  async 'snapshot.at'({ store, progress }, args) {
    const volume = str(args, 'volume');
    const seq = await resolvePoint(store, volume, str(args, 'at'));
    const snap = await store.snapshotAt(volume, seq, typeof args.name === 'string' ? args.name : undefined, progress);
    return { ...snap, seq };
  },
  async retain({ store }, args) {
    if (typeof args.policy === 'string') await store.setRetention(parseRetention(args.policy));
    return { policy: store.retentionPolicy, description: describeRetention(store.retentionPolicy) };
  },
  async 'import-dmcow'({ store }, args) {
    return importDmCow(store, str(args, 'name'), {
      dataPath: str(args, 'data'),
      bitmapPath: str(args, 'bitmap'),
      sizeBytes: num(args, 'sizeBytes'),
      below: typeof args.below === 'string' ? args.below : undefined,
    });
  },
  async table({ store }, args) {
    return dmCowTable(store, str(args, 'volume'), resolve(str(args, 'bitmaps')));
  },
  async 'journal.verify'({ store }) {
    return verifyStoreJournal(store.eventLog);
  },
  async 'journal.inspect'({ store, emit, signal }, args) {
    const from = num(args, 'from') ?? 1;
    const to = num(args, 'to') ?? Number.MAX_SAFE_INTEGER;
    const volume = typeof args.volume === 'string' ? args.volume : undefined;
    const type = typeof args.type === 'string' ? args.type : undefined;
    let shown = 0;
    const walked = await walkEvents(store, from, to, (line) => {
      if (matches(line, volume, type)) {
        emit?.(line);
        shown++;
      }
    }, signal);
    return { walked, shown };
  },
  async 'journal.tail'({ store, emit, signal, served }, args) {
    const lines = num(args, 'lines') ?? 10;
    const last = store.lastSeq;
    const from = Math.max(1, last - lines + 1);
    if (args.follow !== true || served !== true || signal === undefined) {
      await walkEvents(store, from, last, (line) => emit?.(line), signal);
      return { following: false };
    }
    // Follow: subscribe before walking the journal, so that events committed during the walk are
    // held back and sent after it, neither lost nor repeated. Live records arrive after the commit
    // hook applied them, so the layer → volume lookup is current.
    const heldBack: EventLine[] = [];
    let walking = true;
    let finished!: () => void;
    const ended = new Promise<void>((resolve) => (finished = resolve));
    const subscription = store.eventLog.records$.subscribe({
      next: (record) => {
        if (record.seq <= last) return;
        const line = describe(record, store.projection);
        if (walking) heldBack.push(line);
        else emit?.(line);
      },
      complete: () => finished(),
    });
    signal.addEventListener('abort', () => finished());
    try {
      await walkEvents(store, from, last, (line) => emit?.(line), signal);
      walking = false;
      for (const line of heldBack) emit?.(line);
      await ended;
    } finally {
      subscription.unsubscribe();
    }
    return { following: true };
  },
};

/** Commit time of the first record whose payload is still kept (null when none is). */
async function payloadWindow(store: Store, fromSeq: number): Promise<string | null> {
  if (fromSeq > store.lastSeq) return null;
  let time: string | null = null;
  await lastValueFrom(
    store.eventLog.replay(fromSeq, fromSeq, { payloads: false }).pipe(
      tap((r) => {
        time = new Date(r.timeMs).toISOString();
      }),
    ),
    { defaultValue: undefined },
  );
  return time;
}

export async function runOperation(name: string, ctx: OperationContext, args: Args): Promise<unknown> {
  const op = operations[name];
  if (op === undefined) throw new Error(`unknown operation ${name}`);
  return op(ctx, args);
}
