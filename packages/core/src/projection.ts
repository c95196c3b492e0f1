/**
 * The projection: the store's state as a fold of its events, and the one reducer that folds them.
 *
 * Both the live write path and every replay (startup, recover, check, inspection) call `applyEvent`,
 * so live state and replayed state cannot disagree. The reducer does no I/O: it updates layer bitmaps
 * (absent / data / zero per block), the layer tree, volumes, snapshot names and, per volume, the
 * merged index (block → highest layer holding it), and it lists the layers it garbage-collected so
 * the caller can remove their files. An event that does not fit the state (a write to an unknown
 * layer, a volume created twice) throws ProjectionError: a committed event the reducer refuses means
 * the journal and the code disagree, and recovery reports it by seq.
 *
 * Views. A view is a layer stack (ids, bottom to top) plus its merged index, whose values encode a
 * stack position and whether the block reads as zeroes (see indexValue). Positions count from the
 * bottom so stacking a new top never renumbers the index. Each volume keeps its view current; frozen
 * layers get theirs lazily (built from the parent's view, then cached: frozen layers never change).
 */
import { ExtentMap } from './extent-map.js';
import { EventType, type ExternalSource, type LayerKind, type StoreConfig, type StoreEvent } from './events.js';

/** Layer bitmap values. */
export const BlockState = { Absent: 0, Data: 1, Zero: 2 } as const;

/** Merged-index value for a block held at stack position `pos` (0 = bottom): data or zero. */
export function indexValue(pos: number, zero: boolean): number {
  return pos * 2 + (zero ? 2 : 1);
}
/** Stack position of a non-zero merged-index value. */
export function indexPosition(value: number): number {
  return (value - 1) >>> 1;
}
export function indexIsZero(value: number): boolean {
  return ((value - 1) & 1) === 1;
}

export interface View {
  /** Layer ids, bottom (root) to top. */
  readonly stack: number[];
  readonly index: ExtentMap;
}

export interface Layer {
  readonly id: number;
  parent: number;
  readonly sizeBytes: number;
  readonly blockCount: number;
  readonly kind: LayerKind;
  frozen: boolean;
  readonly source: ExternalSource | null;
  readonly bitmap: ExtentMap;
  readonly children: Set<number>;
  /** Snapshot keys ("volume@name") naming this layer. */
  readonly names: Set<string>;
  /** The volume whose writable top this layer is. */
  volume: string | undefined;
  /** Cached view of a frozen layer. */
  view: View | undefined;
}

export interface Volume {
  readonly name: string;
  /** Seq of the event that created the volume: tells a volume from a later one of the same name. */
  readonly createdSeq: number;
  top: number;
  view: View;
}

export interface Projection {
  /** Seq of the last event applied. */
  seq: number;
  config: StoreConfig | undefined;
  readonly layers: Map<number, Layer>;
  readonly volumes: Map<string, Volume>;
  /** "volume@name" → frozen layer id. */
  readonly snapshots: Map<string, number>;
  nextLayerId: number;
  /** Layers removed by the reducer whose files the caller has not deleted yet. */
  collected: number[];
  /**
   * Bulk replay: the reducer keeps bitmaps, stacks and the tree exact but lets volume indexes fall
   * behind (half the work per write event); `finishDeferredViews` rebuilds them. Views of frozen
   * layers are built from bitmaps when asked for, so they stay exact.
   */
  deferViews: boolean;
}

export class ProjectionError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'ProjectionError';
  }
}

/**
 * The reducer's invariant check; the message is built only on failure. The checks every write and
 * zero event makes (its seq, its layer, its blocks) throw directly instead: the closure per call cost
 * recovery 15% of its reducer time (BENCHMARKS.md).
 */
function check(condition: unknown, message: () => string): asserts condition {
  if (!condition) throw new ProjectionError(message());
}

export function emptyProjection(): Projection {
  return { seq: 0, config: undefined, layers: new Map(), volumes: new Map(), snapshots: new Map(), nextLayerId: 1, collected: [], deferViews: false };
}

export function snapshotKey(volume: string, name: string): string {
  return `${volume}@${name}`;
}

export function blockSize(state: Projection): number {
  check(state.config !== undefined, () => 'the store has no StoreCreated event');
  return state.config.blockSizeBytes;
}

function getLayer(state: Projection, id: number): Layer {
  const layer = state.layers.get(id);
  if (layer === undefined) throw new ProjectionError(`layer ${id} does not exist`);
  return layer;
}

function getVolume(state: Projection, name: string): Volume {
  const volume = state.volumes.get(name);
  check(volume !== undefined, () => `volume ${name} does not exist`);
  return volume;
}

export function newLayer(
  state: Projection,
  id: number,
  parent: number,
  sizeBytes: number,
  kind: LayerKind,
  frozen: boolean,
  source: ExternalSource | null,
): Layer {
  check(!state.layers.has(id), () => `layer ${id} already exists`);
  check(Number.isSafeInteger(id) && id > 0, () => `layer id ${id} is not a positive integer`);
  const bs = blockSize(state);
  const layer: Layer = {
    id,
    parent,
    sizeBytes,
    blockCount: Math.ceil(sizeBytes / bs),
    kind,
    frozen,
    source,
    bitmap: new ExtentMap(kind === 'external' ? BlockState.Data : BlockState.Absent),
    children: new Set(),
    names: new Set(),
    volume: undefined,
    view: undefined,
  };
  state.layers.set(id, layer);
  if (parent !== -1) getLayer(state, parent).children.add(id);
  state.nextLayerId = Math.max(state.nextLayerId, id + 1);
  return layer;
}

/** Lay `layer`'s bitmap over `index` at stack position `pos`. */
function overlay(index: ExtentMap, layer: Layer, pos: number): void {
  layer.bitmap.forEachSetRun((start, length, value) => index.set(start, length, indexValue(pos, value === BlockState.Zero)));
}

/** The view of a root layer. */
function rootView(layer: Layer): View {
  const index = new ExtentMap(layer.bitmap.defaultValue === BlockState.Data ? indexValue(0, false) : 0);
  overlay(index, layer, 0);
  return { stack: [layer.id], index };
}

/** The view of `layer` given its parent's view. */
function childView(parent: View, layer: Layer): View {
  const index = parent.index.cloneShared();
  overlay(index, layer, parent.stack.length);
  return { stack: [...parent.stack, layer.id], index };
}

/** The view a layer presents: a volume's live view for a volume top, else the (cached) frozen view. */
export function viewOf(state: Projection, layerId: number): View {
  const layer = getLayer(state, layerId);
  if (layer.volume !== undefined) return getVolume(state, layer.volume).view;
  if (layer.view !== undefined) return layer.view;
  const path: Layer[] = [];
  let at: Layer | undefined = layer;
  while (at !== undefined && at.view === undefined && at.volume === undefined) {
    path.push(at);
    at = at.parent === -1 ? undefined : getLayer(state, at.parent);
  }
  let view = at === undefined ? undefined : viewOf(state, at.id);
  for (let i = path.length - 1; i >= 0; i--) {
    const l = path[i];
    view = view === undefined ? rootView(l) : childView(view, l);
    if (l.frozen) l.view = view;
  }
  check(view !== undefined, () => `layer ${layerId} has no view`);
  return view;
}

/** End a bulk replay: rebuild every volume's index from the bitmaps. */
export function finishDeferredViews(state: Projection): void {
  state.deferViews = false;
  for (const name of state.volumes.keys()) refreshVolumeView(state, name);
}

/** Recompute a volume's view from its top layer and the (cached) view below it. */
export function refreshVolumeView(state: Projection, name: string): void {
  const volume = getVolume(state, name);
  const top = getLayer(state, volume.top);
  volume.view = top.parent === -1 ? rootView(top) : childView(viewOf(state, top.parent), top);
}

/** Recompute every view in the subtree of `rootId` (after the tree under it changed shape). */
function rebuildSubtree(state: Projection, rootId: number): void {
  const root = getLayer(state, rootId);
  const parentView = root.parent === -1 ? undefined : viewOf(state, root.parent);
  const visit = (layer: Layer, above: View | undefined): void => {
    layer.view = undefined;
    const view = above === undefined ? rootView(layer) : childView(above, layer);
    if (layer.volume !== undefined) getVolume(state, layer.volume).view = view;
    else if (layer.frozen) layer.view = view;
    for (const child of layer.children) visit(getLayer(state, child), view);
  };
  visit(root, parentView);
}

/** Remove unreachable frozen layers, walking up from `layerId`. */
function collect(state: Projection, layerId: number): void {
  let id = layerId;
  while (id !== -1) {
    const layer = state.layers.get(id);
    if (layer === undefined || !layer.frozen || layer.children.size > 0 || layer.names.size > 0 || layer.volume !== undefined) return;
    state.layers.delete(id);
    state.collected.push(id);
    if (layer.parent !== -1) getLayer(state, layer.parent).children.delete(id);
    id = layer.parent;
  }
}

function checkBlocks(layer: Layer, first: number, count: number): void {
  if (!(Number.isSafeInteger(first) && Number.isSafeInteger(count) && first >= 0 && count > 0 && first + count <= layer.blockCount)) {
    throw new ProjectionError(`blocks ${first}+${count} are outside layer ${layer.id} (${layer.blockCount} blocks)`);
  }
}

/** Blocks of a layer changed: the layer's bitmap, and its volume's index if it is a volume top. */
function setBlocks(state: Projection, layerId: number, first: number, count: number, value: number): void {
  const layer = getLayer(state, layerId);
  checkBlocks(layer, first, count);
  if (layer.frozen) {
    // Only commit writes into a frozen layer: its one child covers every block it changes.
    check(layer.children.size <= 1 && layer.names.size === 0, () => `layer ${layerId} is frozen and shared; it cannot change`);
    check(layer.kind !== 'external', () => `layer ${layerId} is an external image; it is never written`);
    layer.view = undefined;
  }
  layer.bitmap.set(first, count, value);
  if (layer.volume !== undefined && !state.deferViews) {
    const view = getVolume(state, layer.volume).view;
    view.index.set(first, count, indexValue(view.stack.length - 1, value === BlockState.Zero));
  }
}

/**
 * The reducer. Applies one committed event (seq must follow the last applied) to `state`, in place,
 * and returns it, so `replay(...).pipe(scan(applyRecord, state))` folds a journal.
 */
export function applyEvent(state: Projection, seq: number, event: StoreEvent): Projection {
  if (seq !== state.seq + 1) throw new ProjectionError(`event seq ${seq} does not follow the last applied seq ${state.seq}`);
  switch (event[0]) {
    case EventType.StoreCreated:
      check(state.config === undefined, () => 'the store was already created');
      state.config = event[1];
      break;
    case EventType.LayerCreated: {
      const [, id, sizeBytes, kind, frozen, source] = event;
      newLayer(state, id, -1, sizeBytes, kind, frozen, source);
      break;
    }
    case EventType.VolumeCreated: {
      const [, name, topId, parentId] = event;
      check(!state.volumes.has(name), () => `volume ${name} already exists`);
      const parent = getLayer(state, parentId);
      check(parent.frozen, () => `layer ${parentId} is not frozen; a volume cannot be stacked on it`);
      const top = newLayer(state, topId, parentId, parent.sizeBytes, 'cow', false, null);
      const below = viewOf(state, parentId);
      top.volume = name;
      state.volumes.set(name, { name, createdSeq: seq, top: topId, view: { stack: [...below.stack, topId], index: below.index.cloneShared() } });
      break;
    }
    case EventType.Frozen: {
      const [, volumeName, layerId, newTopId, name] = event;
      const layer = getLayer(state, layerId);
      check(!layer.frozen, () => `layer ${layerId} is already frozen`);
      if (volumeName === '') {
        check(layer.volume === undefined, () => `layer ${layerId} is the top of volume ${String(layer.volume)}`);
        layer.frozen = true;
        layer.view = undefined;
        break;
      }
      const volume = getVolume(state, volumeName);
      check(volume.top === layerId, () => `layer ${layerId} is not the top of volume ${volumeName}`);
      const key = snapshotKey(volumeName, name);
      check(!state.snapshots.has(key), () => `snapshot ${key} already exists`);
      layer.frozen = true;
      layer.volume = undefined;
      layer.view = state.deferViews ? undefined : { stack: volume.view.stack.slice(), index: volume.view.index.cloneShared() };
      layer.names.add(key);
      state.snapshots.set(key, layerId);
      const top = newLayer(state, newTopId, layerId, layer.sizeBytes, 'cow', false, null);
      top.volume = volumeName;
      volume.top = newTopId;
      volume.view.stack.push(newTopId);
      break;
    }
    case EventType.Cloned: {
      const [, name, fromId, newTopId] = event;
      check(!state.volumes.has(name), () => `volume ${name} already exists`);
      const from = getLayer(state, fromId);
      check(from.frozen, () => `layer ${fromId} is not frozen; it cannot be cloned`);
      const below = viewOf(state, fromId);
      const top = newLayer(state, newTopId, fromId, from.sizeBytes, 'cow', false, null);
      top.volume = name;
      state.volumes.set(name, { name, createdSeq: seq, top: newTopId, view: { stack: [...below.stack, newTopId], index: below.index.cloneShared() } });
      break;
    }
    case EventType.Write: {
      const [, layerId, first, count, crcs] = event;
      check(crcs.length === 4 * count, () => `write of ${count} blocks carries ${crcs.length / 4} block CRCs`);
      setBlocks(state, layerId, first, count, BlockState.Data);
      break;
    }
    case EventType.Zero: {
      const [, layerId, first, count] = event;
      setBlocks(state, layerId, first, count, BlockState.Zero);
      break;
    }
    case EventType.SnapshotDeleted: {
      const [, volumeName, name] = event;
      const key = snapshotKey(volumeName, name);
      const layerId = state.snapshots.get(key);
      check(layerId !== undefined, () => `snapshot ${key} does not exist`);
      state.snapshots.delete(key);
      getLayer(state, layerId).names.delete(key);
      collect(state, layerId);
      break;
    }
    case EventType.VolumeDeleted: {
      const [, name] = event;
      const volume = getVolume(state, name);
      const top = getLayer(state, volume.top);
      state.volumes.delete(name);
      top.volume = undefined;
      top.frozen = true;
      collect(state, top.id);
      break;
    }
    case EventType.Committed: {
      const [, layerId, parentId] = event;
      const layer = getLayer(state, layerId);
      const parent = getLayer(state, parentId);
      check(layer.parent === parentId, () => `layer ${parentId} is not the parent of layer ${layerId}`);
      check(parent.children.size === 1 && parent.names.size === 0, () => `layer ${parentId} is shared; layer ${layerId} cannot be committed into it`);
      check(parent.kind !== 'external', () => `layer ${parentId} is an external image; nothing is committed into it`);
      parent.children.clear();
      for (const childId of layer.children) {
        getLayer(state, childId).parent = parentId;
        parent.children.add(childId);
      }
      parent.frozen = layer.frozen;
      parent.volume = layer.volume;
      if (layer.volume !== undefined) getVolume(state, layer.volume).top = parentId;
      for (const key of layer.names) {
        parent.names.add(key);
        state.snapshots.set(key, parentId);
      }
      state.layers.delete(layerId);
      state.collected.push(layerId);
      rebuildSubtree(state, parentId);
      break;
    }
    case EventType.Flattened: {
      const [, name] = event;
      const volume = getVolume(state, name);
      const top = getLayer(state, volume.top);
      const parentId = top.parent;
      if (parentId !== -1) {
        top.parent = -1;
        getLayer(state, parentId).children.delete(top.id);
        collect(state, parentId);
      }
      rebuildSubtree(state, top.id);
      break;
    }
    case EventType.SnapshotNamed: {
      const [, volumeName, name, layerId] = event;
      const key = snapshotKey(volumeName, name);
      check(!state.snapshots.has(key), () => `snapshot ${key} already exists`);
      const layer = getLayer(state, layerId);
      check(layer.frozen, () => `layer ${layerId} is not frozen; it cannot be a snapshot`);
      layer.names.add(key);
      state.snapshots.set(key, layerId);
      break;
    }
    default:
      throw new ProjectionError(`unknown event type ${String((event as unknown[])[0])}`);
  }
  state.seq = seq;
  return state;
}

/** Layer ids from the root to `layerId`. */
export function ancestry(state: Projection, layerId: number): number[] {
  const path: number[] = [];
  for (let id = layerId; id !== -1; id = getLayer(state, id).parent) path.push(id);
  return path.reverse();
}

/** Volumes whose view includes `layerId`. */
export function volumesUsing(state: Projection, layerId: number): string[] {
  const out: string[] = [];
  for (const volume of state.volumes.values()) if (volume.view.stack.includes(layerId)) out.push(volume.name);
  return out;
}
