/**
 * Projection checkpoints: the state encoded as one msgpack blob (layer table with run-length
 * bitmaps, volumes, snapshot names), versioned, and rebuilt into a live projection (views are
 * derived, so they are recomputed, not stored). Also the canonical form `check` uses to compare a
 * replayed projection with a loaded one. Pure code, no I/O.
 */
import { Packr } from 'msgpackr';
import { ExtentMap } from './extent-map.js';
import type { ExternalSource, LayerKind, StoreConfig } from './events.js';
import { emptyProjection, newLayer, type Projection, ProjectionError, refreshVolumeView } from './projection.js';

export const projectionFormatVersion = 1;

const packr = new Packr({ useRecords: false });

type LayerRow = [id: number, parent: number, sizeBytes: number, kind: LayerKind, frozen: boolean, source: ExternalSource | null, runs: number[]];

interface Encoded {
  v: number;
  seq: number;
  config: StoreConfig;
  nextLayerId: number;
  layers: LayerRow[];
  volumes: Array<[name: string, top: number, createdSeq: number]>;
  snapshots: Array<[key: string, layerId: number]>;
}

/** The canonical, order-independent content of a projection. */
function canonical(state: Projection): Encoded {
  if (state.config === undefined) throw new ProjectionError('cannot encode a projection before StoreCreated');
  const layers = [...state.layers.values()]
    .sort((a, b) => a.id - b.id)
    .map((l): LayerRow => [l.id, l.parent, l.sizeBytes, l.kind, l.frozen, l.source, l.bitmap.toRuns()]);
  return {
    v: projectionFormatVersion,
    seq: state.seq,
    config: state.config,
    nextLayerId: state.nextLayerId,
    layers,
    volumes: [...state.volumes.values()].map((v): [string, number, number] => [v.name, v.top, v.createdSeq]).sort((a, b) => (a[0] < b[0] ? -1 : 1)),
    snapshots: [...state.snapshots.entries()].sort((a, b) => (a[0] < b[0] ? -1 : 1)),
  };
}

export function encodeProjection(state: Projection): Buffer {
  return packr.pack(canonical(state));
}

export function decodeProjection(blob: Uint8Array): Projection {
  const data = packr.unpack(blob) as Encoded;
  if (data?.v !== projectionFormatVersion) {
    throw new ProjectionError(`checkpoint format version ${String(data?.v)} is not supported; this build reads version ${projectionFormatVersion}`);
  }
  const state = emptyProjection();
  state.config = data.config;
  // Parents first: ids grow over time, but commit can reparent a layer under a later one.
  const pending = new Map(data.layers.map((row) => [row[0], row]));
  const add = (row: LayerRow): void => {
    pending.delete(row[0]);
    if (row[1] !== -1 && !state.layers.has(row[1])) {
      const parentRow = pending.get(row[1]);
      if (parentRow === undefined) throw new ProjectionError(`checkpoint layer ${row[0]} has a missing parent ${row[1]}`);
      add(parentRow);
    }
    const layer = newLayer(state, row[0], row[1], row[2], row[3], row[4], row[5]);
    for (let i = 0; i < row[6].length; i += 3) layer.bitmap.set(row[6][i], row[6][i + 1], row[6][i + 2]);
  };
  for (const row of data.layers) if (pending.has(row[0])) add(row);
  for (const [key, layerId] of data.snapshots) {
    const layer = state.layers.get(layerId);
    if (layer === undefined) throw new ProjectionError(`checkpoint snapshot ${key} names a missing layer ${layerId}`);
    layer.names.add(key);
    state.snapshots.set(key, layerId);
  }
  for (const [name, top, createdSeq] of data.volumes) {
    const layer = state.layers.get(top);
    if (layer === undefined) throw new ProjectionError(`checkpoint volume ${name} has a missing top layer ${top}`);
    layer.volume = name;
    state.volumes.set(name, { name, createdSeq, top, view: { stack: [], index: new ExtentMap() } });
  }
  for (const name of state.volumes.keys()) refreshVolumeView(state, name);
  state.nextLayerId = data.nextLayerId;
  state.seq = data.seq;
  return state;
}

/**
 * Differences between two projections, each named by what differs (layer, volume, snapshot), for
 * `check`: empty when they are equal.
 */
export function diffProjections(expected: Projection, actual: Projection): string[] {
  const a = canonical(expected);
  const b = canonical(actual);
  const out: string[] = [];
  if (packr.pack(a.config).compare(packr.pack(b.config)) !== 0) out.push('store configuration differs');
  const rowsA = new Map(a.layers.map((r) => [r[0], r]));
  const rowsB = new Map(b.layers.map((r) => [r[0], r]));
  for (const [id, row] of rowsA) {
    const other = rowsB.get(id);
    if (other === undefined) out.push(`layer ${id} is missing`);
    else if (packr.pack(row).compare(packr.pack(other)) !== 0) {
      const what = row[6].join() !== other[6].join() ? 'block map' : 'attributes';
      out.push(`layer ${id} differs (${what})`);
    }
  }
  for (const id of rowsB.keys()) if (!rowsA.has(id)) out.push(`layer ${id} should not exist`);
  const volsA = new Map(a.volumes.map(([name, top, created]) => [name, { top, created }]));
  const volsB = new Map(b.volumes.map(([name, top, created]) => [name, { top, created }]));
  for (const [name, v] of volsA) {
    const other = volsB.get(name);
    if (other === undefined) out.push(`volume ${name} is missing`);
    else if (other.top !== v.top) out.push(`volume ${name} has top layer ${other.top}, expected ${v.top}`);
    else if (other.created !== v.created) out.push(`volume ${name} was created at seq ${other.created}, expected ${v.created}`);
  }
  for (const name of volsB.keys()) if (!volsA.has(name)) out.push(`volume ${name} should not exist`);
  const snapsA = new Map(a.snapshots);
  const snapsB = new Map(b.snapshots);
  for (const [key, id] of snapsA) if (snapsB.get(key) !== id) out.push(`snapshot ${key} differs`);
  for (const key of snapsB.keys()) if (!snapsA.has(key)) out.push(`snapshot ${key} should not exist`);
  return out;
}
