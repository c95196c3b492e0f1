/**
 * Named limits and format constants of the journal. Units are the last word of each name.
 */

/**
 * The on-disk format this build writes and the only one it reads. Version 2 keeps write payloads in
 * the payload log beside LevelDB (version 1, never released, kept them in LevelDB).
 */
export const journalFormatVersion = 2;
/** Version of the batch frame layout inside a record value. */
export const batchFrameVersion = 1;
/** A group-commit batch is split into several LevelDB values (one atomic LevelDB batch) above this. */
export const maxBatchValueBytes = 8 * 1024 * 1024;
/**
 * Unsynced group-commit batches written to LevelDB at once (a synced batch is always alone): the next
 * batch is built while the one before waits in the threadpool. Three measured no better than two.
 */
export const maxBatchesInFlight = 2;
/** Largest payload one record may carry. */
export const maxPayloadBytes = 64 * 1024 * 1024;
/** Values fetched per `nextv` call while replaying. */
export const replayChunkValues = 256;
/** Bytes a replay iterator may hold in memory per `nextv` call. */
export const replayChunkBytes = 16 * 1024 * 1024;
/** Largest sequence number: seqs are JavaScript numbers, exact below 2^53. */
export const maxSeq = Number.MAX_SAFE_INTEGER;
/** A payload log segment is closed once it holds this much (a batch never spans two). */
export const payloadSegmentBytes = 256 * 1024 * 1024;
/**
 * Retired payload segments kept as spares for reuse (each up to payloadSegmentBytes on disk): at the
 * default checkpoint interval, 4 KiB writes fill about three segments between checkpoints, so four
 * spares let steady-state writes land in recycled files only.
 */
export const payloadSpareSegments = 4;
