/**
 * The events of a store: every change is one of these, appended to the journal before it takes
 * effect. Events are msgpack tuples whose first element is the type code: tuples decode several
 * times faster than maps, and replay speed is bounded by decoding.
 *
 * Write data travels as the journal record's payload (whole blocks), never inside the event; the
 * event carries one CRC32C per block so `check` can verify every data block against its last write.
 */

export const EventType = {
  StoreCreated: 1,
  LayerCreated: 2,
  VolumeCreated: 3,
  Frozen: 4,
  Cloned: 5,
  Write: 6,
  Zero: 7,
  SnapshotDeleted: 8,
  VolumeDeleted: 9,
  Committed: 10,
  Flattened: 11,
  SnapshotNamed: 12,
} as const;

export type LayerKind = 'zero' | 'external' | 'imported' | 'cow';

/** An external base image, referenced read-only and checked by size and fingerprint on open. */
export interface ExternalSource {
  readonly path: string;
  readonly sizeBytes: number;
  readonly fingerprint: string;
}

export interface StoreConfig {
  readonly formatVersion: number;
  readonly storeId: string;
  readonly blockSizeBytes: number;
  readonly createdMs: number;
}

/** The store's first event. */
export type StoreCreated = [typeof EventType.StoreCreated, StoreConfig];
/** A root layer (a base): empty zeros, an external image, or one to be filled by import. */
export type LayerCreated = [typeof EventType.LayerCreated, layerId: number, sizeBytes: number, kind: LayerKind, frozen: boolean, source: ExternalSource | null];
/** A new volume whose new writable top layer `topLayerId` sits on the frozen layer `parentLayerId`. */
export type VolumeCreated = [typeof EventType.VolumeCreated, volume: string, topLayerId: number, parentLayerId: number];
/**
 * Freeze a layer. With a volume: it is the volume's top, it becomes snapshot `name` of the volume and
 * a new empty writable top `newTopLayerId` is stacked on it. Without (volume ''), it seals a base.
 */
export type Frozen = [typeof EventType.Frozen, volume: string, layerId: number, newTopLayerId: number, name: string];
/** A new volume whose new writable top sits on the frozen layer `fromLayerId`. */
export type Cloned = [typeof EventType.Cloned, volume: string, fromLayerId: number, newTopLayerId: number];
/**
 * Whole blocks [firstBlock, firstBlock + blockCount) of a layer now hold the record's payload.
 * `origin` (optional) names who wrote it, e.g. "nbd#12 127.0.0.1:40312" (for blame).
 */
export type Write = [typeof EventType.Write, layerId: number, firstBlock: number, blockCount: number, blockCrcs: Buffer, origin?: string];
/** Whole blocks of a layer now read as zeroes (trim and write-zeroes). */
export type Zero = [typeof EventType.Zero, layerId: number, firstBlock: number, blockCount: number, origin?: string];
export type SnapshotDeleted = [typeof EventType.SnapshotDeleted, volume: string, name: string];
export type VolumeDeleted = [typeof EventType.VolumeDeleted, volume: string];
/**
 * A layer's blocks were copied into its parent (by Write/Zero events to the parent just before this
 * one); the layer leaves the tree and its children (or its volume) now sit on the parent.
 */
export type Committed = [typeof EventType.Committed, layerId: number, parentLayerId: number];
/** The volume's top layer now holds every block of its view (copied by earlier events); it has no parent. */
export type Flattened = [typeof EventType.Flattened, volume: string];
/** A frozen layer (built by a retroactive snapshot) becomes snapshot `name` of a volume. */
export type SnapshotNamed = [typeof EventType.SnapshotNamed, volume: string, name: string, layerId: number];

export type StoreEvent =
  | StoreCreated
  | LayerCreated
  | VolumeCreated
  | Frozen
  | Cloned
  | Write
  | Zero
  | SnapshotDeleted
  | VolumeDeleted
  | Committed
  | Flattened
  | SnapshotNamed;

const names: Record<number, string> = Object.fromEntries(Object.entries(EventType).map(([name, code]) => [code, name]));

export function eventTypeName(event: StoreEvent): string {
  return names[event[0]] ?? `Unknown(${String(event[0])})`;
}

export function eventTypeCode(name: string): number | undefined {
  return (EventType as Record<string, number>)[name];
}

export const eventTypeNames: readonly string[] = Object.keys(EventType);
