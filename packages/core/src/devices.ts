/**
 * BlockDevice adapters: a volume (read-write) or a frozen layer (read-only) of a store, presented
 * through the seam packages/nbd serves, and the ExportProvider that names them.
 *
 * Export names: a volume by its name (the empty name means "default"), a snapshot as
 * "VOLUME@SNAPSHOT" (read-only), and a volume as it was at a point in the journal as
 * "VOLUME@seq:N" or "VOLUME@time:ISO-8601" (read-only, built from the journal on first use). A device
 * looks its volume or layer up on every call, so a volume deleted while exported fails further
 * requests with ESHUTDOWN instead of reading freed state.
 *
 * Volumes also answer qemu-style dirty bitmaps, `qemu:dirty-bitmap:POINT` (POINT: a snapshot name,
 * seq:N or time:ISO): dirty = written since that point, computed from the journal once per
 * connection and context.
 */
import {
  BlockDeviceError,
  type BlockDevice,
  type ClientInfo,
  dirtyBitmapPrefix,
  type ExportInfo,
  type ExportProvider,
  type Extent,
  type ExtentContext,
  type ReadResult,
  type WriteFlags,
  type ZeroFlags,
} from './block-device.js';
import { StoreError } from './errors.js';
import { changedSince, type PointInTimeView, pointInTimeView, resolvePoint } from './history.js';
import type { DiffExtent, Store, WriteSource } from './store.js';

const extentContexts: readonly ExtentContext[] = ['base:allocation', 'qemu:allocation-depth'];
/** Point-in-time views kept built for reuse by later connections. */
const pointInTimeViewsKept = 4;

function toDeviceError(err: unknown): BlockDeviceError {
  return err instanceof BlockDeviceError ? err : new BlockDeviceError('EIO', (err as Error).message, { cause: err });
}

function guard<T>(body: () => T | Promise<T>): Promise<T> {
  try {
    const result = body();
    return result instanceof Promise ? result.catch((err: unknown) => Promise.reject(toDeviceError(err))) : Promise.resolve(result);
  } catch (err) {
    return Promise.reject(toDeviceError(err));
  }
}

/** What every read-only export shares: writes refused with EPERM, flush a no-op. */
abstract class ReadOnlyDevice {
  readonly readOnly = true;
  readonly canMultiConn = true;
  readonly canFastZero = false;
  readonly extentContexts = extentContexts;

  protected abstract readonly what: string;

  private refuse(): Promise<never> {
    return Promise.reject(new BlockDeviceError('EPERM', `${this.what} is read-only`));
  }

  write(): Promise<void> {
    return this.refuse();
  }

  zero(): Promise<void> {
    return this.refuse();
  }

  trim(): Promise<void> {
    return this.refuse();
  }

  flush(): Promise<void> {
    return Promise.resolve();
  }
}

export class VolumeDevice implements BlockDevice {
  readonly readOnly = false;
  readonly canMultiConn = true;
  readonly canFastZero = true;
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  private readonly dirtyBitmaps = new Map<string, Promise<DiffExtent[]>>();
  /** This volume, not a later one that takes its name. */
  private readonly source: WriteSource;

  constructor(
    private readonly store: Store,
    readonly volume: string,
    /** Recorded with every write (blame): which client wrote. */
    origin?: string,
  ) {
    this.sizeBytes = store.volumeInfo(volume).sizeBytes;
    this.blockSizeBytes = store.blockSizeBytes;
    this.source = { origin, createdSeq: store.volumeCreatedSeq(volume) };
  }

  private top(): number {
    if (this.store.volumeCreatedSeq(this.volume) !== this.source.createdSeq) {
      throw new BlockDeviceError('ESHUTDOWN', `volume ${this.volume} was deleted${this.store.hasVolume(this.volume) ? ' (a new volume has its name)' : ''}`);
    }
    return this.store.resolveView(this.volume).layerId;
  }

  read(offset: number, length: number): Promise<ReadResult> {
    return guard(() => this.store.readViewOf(this.top(), offset, length));
  }

  recycle(result: ReadResult): void {
    this.store.recycle(result);
  }

  write(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    return this.store.writeVolume(this.volume, offset, data, flags.fua, this.source);
  }

  /**
   * Whole blocks become zero records (no data I/O); partial blocks are written with zeroes. A fast
   * zero (NBD_CMD_FLAG_FAST_ZERO) that holds no whole block would be nothing but such writes, no
   * faster than the equivalent WRITE, so it fails with ENOTSUP as the spec requires. `mayTrim`
   * needs no handling: layer files are never deallocated, so no request creates a hole.
   */
  zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    const bs = this.blockSizeBytes;
    if (flags.fast && Math.floor((offset + length) / bs) <= Math.ceil(offset / bs)) {
      return Promise.reject(new BlockDeviceError('ENOTSUP', `a fast zero of ${length} bytes at ${offset} holds no whole ${bs}-byte block: it would be a data write`));
    }
    return this.store.zeroVolume(this.volume, offset, length, flags.fua, this.source);
  }

  trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    return this.store.trimVolume(this.volume, offset, length, flags.fua, this.source);
  }

  flush(): Promise<void> {
    return this.store.flush();
  }

  cache(offset: number, length: number): Promise<void> {
    return guard(() => {
      this.store.readLayer(this.top(), offset, length);
    });
  }

  /** Allocation, depth, and one dirty bitmap per snapshot of the volume. */
  get extentContexts(): readonly ExtentContext[] {
    const snapshots = this.store.hasVolume(this.volume) ? this.store.volumeInfo(this.volume).snapshots : [];
    return [...extentContexts, ...snapshots.map((s): ExtentContext => `${dirtyBitmapPrefix}${s}`)];
  }

  /**
   * A dirty bitmap named by a point that exists: seq:N up to the last seq, time:ISO-8601 (a valid
   * time), or a snapshot of this volume. Anything else is not selected (the client is told so).
   */
  acceptsContext(name: string): boolean {
    if (!name.startsWith(dirtyBitmapPrefix)) return false;
    const point = name.slice(dirtyBitmapPrefix.length);
    const seq = /^seq:(\d+)$/.exec(point);
    if (seq !== null) return Number(seq[1]) <= this.store.lastSeq;
    if (point.startsWith('time:')) return !Number.isNaN(Date.parse(point.slice(5)));
    return this.store.hasVolume(this.volume) && this.store.volumeInfo(this.volume).snapshots.includes(point);
  }

  extents(offset: number, length: number, context: ExtentContext): Promise<Extent[]> {
    if (context.startsWith(dirtyBitmapPrefix)) return guard(() => this.dirtyExtents(offset, length, context));
    return guard(() => this.store.extents(this.top(), offset, length, context));
  }

  private async dirtyExtents(offset: number, length: number, context: string): Promise<Extent[]> {
    this.top();
    let changed = this.dirtyBitmaps.get(context);
    if (changed === undefined) {
      const point = context.slice(dirtyBitmapPrefix.length);
      changed = resolvePoint(this.store, this.volume, point).then((seq) => changedSince(this.store, this.volume, seq, this.store.lastSeq));
      this.dirtyBitmaps.set(context, changed);
    }
    return dirtyExtentsOf(await changed, offset, length);
  }
}

/** Clean/dirty extents of [offset, offset + length) given the changed ranges (sorted, disjoint). */
function dirtyExtentsOf(changed: readonly DiffExtent[], offset: number, length: number): Extent[] {
  const out: Extent[] = [];
  const end = offset + length;
  let at = offset;
  const push = (to: number, dirty: boolean): void => {
    if (to > at) out.push({ length: to - at, hole: false, zero: false, depth: 0, dirty });
    at = Math.max(at, to);
  };
  for (const e of changed) {
    if (e.offset + e.length <= at) continue;
    if (e.offset >= end) break;
    push(Math.min(e.offset, end), false);
    push(Math.min(e.offset + e.length, end), true);
  }
  push(end, false);
  return out;
}

/**
 * A volume as it was at a point in the journal, read-only. The view is built (a fold of the journal
 * up to the point) on the first read or block status, not when a client merely looks at the export
 * (NBD_OPT_INFO, LIST), and shared through `views` by every connection to the same point.
 */
export class PointInTimeDevice extends ReadOnlyDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  protected readonly what: string;
  private readonly key: string;
  private readonly build: () => Promise<PointInTimeView>;

  constructor(
    store: Store,
    volume: string,
    point: string,
    private readonly views: PointInTimeViews,
  ) {
    super();
    this.sizeBytes = store.volumeInfo(volume).sizeBytes;
    this.blockSizeBytes = store.blockSizeBytes;
    this.key = `${volume}@${point}`;
    this.what = `point-in-time export ${this.key}`;
    this.build = () => resolvePoint(store, volume, point).then((seq) => pointInTimeView(store, volume, seq));
  }

  private get view(): Promise<PointInTimeView> {
    return this.views.get(this.key, this.build);
  }

  read(offset: number, length: number): Promise<ReadResult> {
    return guard(async () => (await this.view).read(offset, length));
  }

  cache(): Promise<void> {
    return guard(async () => {
      await this.view;
    });
  }

  extents(offset: number, length: number): Promise<Extent[]> {
    return guard(async () => (await this.view).extents(offset, length));
  }
}

/** A frozen layer (a snapshot) of a store, read-only. */
export class LayerDevice extends ReadOnlyDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  protected readonly what: string;

  constructor(
    private readonly store: Store,
    readonly layerId: number,
  ) {
    super();
    this.sizeBytes = store.sizeOfLayer(layerId);
    this.blockSizeBytes = store.blockSizeBytes;
    this.what = `layer ${layerId} (frozen)`;
  }

  read(offset: number, length: number): Promise<ReadResult> {
    return guard(() => this.store.readViewOf(this.layerId, offset, length));
  }

  recycle(result: ReadResult): void {
    this.store.recycle(result);
  }

  cache(offset: number, length: number): Promise<void> {
    return guard(() => {
      this.store.readLayer(this.layerId, offset, length);
    });
  }

  extents(offset: number, length: number, context: ExtentContext): Promise<Extent[]> {
    return guard(() => this.store.extents(this.layerId, offset, length, context));
  }
}

/** Point-in-time views shared by connections: the newest few, by "volume@point". */
export class PointInTimeViews {
  private readonly views = new Map<string, Promise<PointInTimeView>>();

  get(key: string, build: () => Promise<PointInTimeView>): Promise<PointInTimeView> {
    let view = this.views.get(key);
    if (view === undefined) {
      view = build();
      view.catch(() => this.views.delete(key));
      if (this.views.size >= pointInTimeViewsKept) this.views.delete(this.views.keys().next().value!);
    } else {
      this.views.delete(key);
    }
    this.views.set(key, view);
    return view;
  }
}

/** Every volume and snapshot of a store, looked up at each handshake. */
export class StoreExports implements ExportProvider {
  private readonly views = new PointInTimeViews();

  constructor(
    private readonly store: Store,
    private readonly defaultVolume = 'default',
  ) {}

  list(): readonly ExportInfo[] {
    const out: ExportInfo[] = [];
    for (const v of this.store.volumes()) {
      out.push({ name: v.name, description: `cowstack volume ${v.name} (${v.stack.length} layers, read-write)` });
      for (const s of v.snapshots) out.push({ name: `${v.name}@${s}`, description: `cowstack snapshot ${s} of ${v.name} (read-only)` });
    }
    for (const s of this.store.snapshots()) {
      if (!this.store.hasVolume(s.volume)) out.push({ name: `${s.volume}@${s.name}`, description: `cowstack snapshot ${s.name} of deleted volume ${s.volume} (read-only)` });
    }
    return out;
  }

  /**
   * Whether a point names a moment the journal has (checked at the handshake, without a fold): a seq
   * after the oldest retained record and not after the last, or a valid time not in the future. The
   * retention window itself needs the fold: a point outside it fails on the first read.
   */
  private pointExists(point: string): boolean {
    const journal = this.store.eventLog;
    const seq = /^seq:(\d+)$/.exec(point);
    if (seq !== null) {
      const n = Number(seq[1]);
      return n >= journal.firstSeq && n <= journal.lastSeq;
    }
    const timeMs = Date.parse(point.slice('time:'.length));
    return !Number.isNaN(timeMs) && timeMs <= Date.now();
  }

  open(name: string, client?: ClientInfo): BlockDevice | undefined {
    const ref = name === '' ? this.defaultVolume : name;
    try {
      const pit = /^(.+)@((?:seq|time):.+)$/.exec(ref);
      if (pit !== null) return this.store.hasVolume(pit[1]) && this.pointExists(pit[2]) ? new PointInTimeDevice(this.store, pit[1], pit[2], this.views) : undefined;
      if (ref.includes('@')) return new LayerDevice(this.store, this.store.snapshotLayer(ref));
      if (ref.startsWith('#')) return undefined;
      const origin = client === undefined ? undefined : `nbd#${client.id} ${client.peer}`;
      return this.store.hasVolume(ref) ? new VolumeDevice(this.store, ref, origin) : undefined;
    } catch (err) {
      if (err instanceof StoreError && (err.code === 'ENOENT' || err.code === 'EINVAL')) return undefined;
      throw err;
    }
  }
}
