/**
 * @cowstack/core: the copy-on-write engine. Stores, volumes, snapshots, clones, the reducer and its
 * projection, recovery and check, and the BlockDevice seam that protocol servers serve.
 */
export { BlockDeviceError, dirtyBitmapPrefix } from './block-device.js';
export type {
  BlockDevice,
  BlockDeviceErrorCode,
  ClientInfo,
  ExportInfo,
  ExportProvider,
  Extent,
  ExtentContext,
  ReadPiece,
  ReadResult,
  WriteFlags,
  ZeroFlags,
} from './block-device.js';
export { LayerDevice, PointInTimeDevice, StoreExports, VolumeDevice } from './devices.js';
export { StoreError } from './errors.js';
export type { StoreErrorCode } from './errors.js';
export { EventType, eventTypeCode, eventTypeName, eventTypeNames } from './events.js';
export type { ExternalSource, LayerKind, StoreConfig, StoreEvent } from './events.js';
export { ExtentMap } from './extent-map.js';
export { type InflightEntry, InflightList } from './inflight-list.js';
export * as limits from './limits.js';
export { applyEvent, emptyProjection, ProjectionError } from './projection.js';
export type { Projection } from './projection.js';
export { decodeProjection, diffProjections, encodeProjection } from './projection-codec.js';
export { blockCrcs } from './block-crcs.js';
export { parseSnapshotRef, Store } from './store.js';
export type {
  BaseSpec,
  CheckpointWritten,
  CreateOptions,
  DiffExtent,
  LayerInfo,
  MapExtent,
  OpenOptions,
  OpenReport,
  ProgressCallback,
  SnapshotInfo,
  VolumeInfo,
  WriteSource,
} from './store.js';
export { checkStore, recoverStore, verifyStoreJournal } from './maintenance.js';
export type { AcceptedLoss, CheckProblem, CheckProblemKind, CheckReport, RecoverReport, StoreJournalReport, VerifiedProblem } from './maintenance.js';
export type { PayloadRepair, PayloadUnrepaired } from './payload-repair.js';
export { blame, changedSince, PointInTimeView, pointInTimeView, resolvePoint } from './history.js';
export type { BlameExtent } from './history.js';
export { describeRetention, parseRetention } from './retention.js';
export type { RetentionPolicy } from './retention.js';
export { buildDmCowBitmap, dmCowBitmapSectors, dmCowMagic, dmCowMagicOffset, dmCowTable, importDmCow, readDmCowBitmap } from './dmcow.js';
export type { DmCowImportOptions, DmCowImportReport, DmCowTable } from './dmcow.js';
