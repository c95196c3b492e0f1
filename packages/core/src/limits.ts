/**
 * Named limits of the engine. Units are the last word of each name.
 */

/** The store layout this build creates and the only one it opens. */
export const storeFormatVersion = 1;
export const defaultBlockSizeBytes = 4096;
export const minBlockSizeBytes = 512;
export const maxBlockSizeBytes = 65536;
/** Devices are addressed with JavaScript numbers: exact below 2^53 bytes. */
export const maxDeviceSizeBytes = Number.MAX_SAFE_INTEGER - maxBlockSizeBytes;
/** Reads at least this large go to the reader thread instead of a synchronous pread. */
export const asyncReadMinBytes = 128 * 1024;
/** Layer-file writes queued behind the event loop at once (threadpool pwrites). */
export const writebackConcurrency = 4;
/** Read buffers kept for reuse, per length. */
export const maxFreeReadBuffersPerLength = 64;
/** Bytes of read buffers kept for reuse in all. */
export const maxFreeReadBufferBytes = 64 * 1024 * 1024;
/** Layer-file writes smaller than this stay off the threadpool: the writer thread takes them, or the event loop after a synced commit (a page-cache pwrite costs less than a threadpool round trip). */
export const asyncWriteMinBytes = 128 * 1024;
/** Bytes of written-behind blocks held in memory before writers wait for the backlog to shrink. */
export const maxWritebackBytes = 64 * 1024 * 1024;
/** Recovery hands its queued layer-file writes to the writer thread once they add up to this many bytes. */
export const recoveryBatchBytes = 1024 * 1024;
/** Largest single write the engine accepts (the NBD server caps requests lower). */
export const maxWriteBytes = 64 * 1024 * 1024;
/**
 * A checkpoint is written after this many bytes of write payload since the last one (the payload log
 * then holds about two such intervals, plus the spares: four segments, so a steady writer fills
 * recycled segments only; recovery re-applies at most about this much)...
 */
export const checkpointEveryPayloadBytes = 1024 * 1024 * 1024;
/**
 * ...or this many events: recovery replays them in about a fifth of a second, and re-applies at most
 * this many writes (about 4 s of one-block writes, at the 120 000 per second measured for 4 KiB)...
 */
export const checkpointEveryEvents = 500_000;
/** ...or after this long with any events since the last one. */
export const checkpointEveryMs = 60_000;
/** Checkpoints kept; write payloads are kept back to the oldest, so an older one can be used. */
export const checkpointsKept = 2;
/** Bytes copied per event by import, commit and flatten. */
export const copyChunkBytes = 1024 * 1024;
/** Copy events in flight at once during import, commit and flatten. */
export const copyWindowEvents = 16;
/** Bytes of an external base image sampled (at several offsets) for its fingerprint. */
export const fingerprintSampleBytes = 64 * 1024;
export const fingerprintSamples = 16;
/** Volume and snapshot names. */
export const namePattern = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$/;
