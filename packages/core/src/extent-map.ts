/**
 * ExtentMap: a map from block index to a small integer, sized by its extents, not by the device.
 *
 * It backs both per-layer bitmaps (absent / data / zero) and each volume's merged index (block →
 * stack position, or zero, or absent). Blocks are grouped in chunks of `chunkBlocks`; a chunk is
 * either missing (every block has the map's default value), a uniform number, a short run list, or,
 * once it fragments past `maxRunsPerChunk`, a dense array of the narrowest type its values fit:
 * Uint8Array (a layer bitmap's 0/1/2, or the index of a stack up to 127 deep: 1 byte per block),
 * widened to Uint16Array or Int32Array when a larger value is set. A 1 TiB volume with a handful of
 * writes therefore costs a handful of small chunks.
 *
 * `cloneShared()` is O(chunks) and copy-on-write: both maps share chunk objects until one of them
 * writes to a chunk, which then gets its own copy. That is how snapshots and clones of a volume's
 * index stay cheap.
 *
 * Pure code, no I/O.
 */

export const chunkBlocks = 1024;
export const maxRunsPerChunk = 32;
/** Dense ranges up to this many blocks are set in a loop rather than with TypedArray fill. */
const shortFillBlocks = 16;

/** A fragmented chunk: runs [starts[i], starts[i+1]) hold values[i]; starts[0] is 0. */
class RunChunk {
  constructor(
    public starts: number[],
    public values: number[],
    public shared: boolean,
  ) {}

  get(offset: number): number {
    return this.values[this.find(offset)];
  }

  /** Index of the run holding `offset`. */
  private find(offset: number): number {
    const starts = this.starts;
    let lo = 0;
    let hi = starts.length - 1;
    while (lo < hi) {
      const mid = (lo + hi + 1) >> 1;
      if (starts[mid] <= offset) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }

  /** Set [lo, hi) to value in place, merging equal neighbours. */
  set(lo: number, hi: number, value: number): void {
    const { starts, values } = this;
    const i = this.find(lo);
    const j = hi < chunkBlocks ? this.find(hi) : starts.length;
    // Runs i..j-1 are cut; run j (if any) resumes at hi with its own value.
    const tailValue = j < starts.length ? values[j] : -1;
    const keepHead = starts[i] < lo;
    const first = keepHead ? i + 1 : i;
    const insertStarts: number[] = [lo];
    const insertValues: number[] = [value];
    const resumeTail = hi < chunkBlocks && (j >= starts.length || starts[j] < hi);
    if (resumeTail) {
      insertStarts.push(hi);
      insertValues.push(j < starts.length ? tailValue : values[j - 1]);
    }
    const removeEnd = resumeTail ? j + 1 : j;
    starts.splice(first, Math.max(0, Math.min(removeEnd, starts.length) - first), ...insertStarts);
    values.splice(first, Math.max(0, Math.min(removeEnd, values.length) - first), ...insertValues);
    // Merge equal neighbours around the edit.
    for (let k = Math.min(first + insertStarts.length, starts.length - 1); k >= Math.max(1, first); k--) {
      if (values[k] === values[k - 1]) {
        starts.splice(k, 1);
        values.splice(k, 1);
      }
    }
  }

  toDense(): DenseChunk {
    let dense: DenseValues = new Uint8Array(chunkBlocks);
    for (const value of this.values) dense = fitting(dense, value);
    for (let i = 0; i < this.starts.length; i++) {
      dense.fill(this.values[i], this.starts[i], i + 1 < this.starts.length ? this.starts[i + 1] : chunkBlocks);
    }
    return new DenseChunk(dense, false);
  }
}

type DenseValues = Uint8Array | Uint16Array | Int32Array;

/** `values`, or a wider copy of it when `value` does not fit its type (values are 32-bit integers). */
function fitting(values: DenseValues, value: number): DenseValues {
  if (values instanceof Uint8Array && value >= 0 && value <= 0xff) return values;
  if (values instanceof Uint16Array && value >= 0 && value <= 0xffff) return values;
  if (values instanceof Int32Array) return values;
  const wider = value >= 0 && value <= 0xffff ? new Uint16Array(chunkBlocks) : new Int32Array(chunkBlocks);
  wider.set(values);
  return wider;
}

/** The largest value each dense type holds (Int32Array: any value, the maps hold 32-bit integers). */
function limitOf(values: DenseValues): number {
  return values instanceof Uint8Array ? 0xff : values instanceof Uint16Array ? 0xffff : Infinity;
}

class DenseChunk {
  /** The largest value `values` holds without widening; kept with `values` (see `widen`). */
  limit: number;

  constructor(
    public values: DenseValues,
    public shared: boolean,
  ) {
    this.limit = limitOf(values);
  }

  /** Make `values` wide enough for `value`. */
  widen(value: number): DenseValues {
    if (value >= 0 && value <= this.limit) return this.values;
    this.values = fitting(this.values, value);
    this.limit = limitOf(this.values);
    return this.values;
  }
}

type Chunk = number | RunChunk | DenseChunk;

export type RunCallback = (start: number, length: number, value: number) => void;

export class ExtentMap {
  private chunks: Map<number, Chunk>;

  /** `defaultValue` is what every block holds until set (e.g. "data" for an external base image). */
  constructor(
    readonly defaultValue = 0,
    chunks?: Map<number, Chunk>,
  ) {
    this.chunks = chunks ?? new Map();
  }

  get(block: number): number {
    const chunk = this.chunks.get(Math.floor(block / chunkBlocks));
    if (chunk === undefined) return this.defaultValue;
    if (typeof chunk === 'number') return chunk;
    const offset = block % chunkBlocks;
    return chunk instanceof DenseChunk ? chunk.values[offset] : chunk.get(offset);
  }

  set(first: number, count: number, value: number): void {
    if (count === 1) {
      // The common case (a 4 KiB write, a replayed one-block event): one block of an unshared dense
      // chunk is one store (after widening, which a value its type holds skips).
      const index = Math.floor(first / chunkBlocks);
      const chunk = this.chunks.get(index);
      const offset = first - index * chunkBlocks;
      if (chunk instanceof DenseChunk && !chunk.shared) chunk.widen(value)[offset] = value;
      else this.setWithin(index, offset, offset + 1, value);
      return;
    }
    let block = first;
    const end = first + count;
    while (block < end) {
      const index = Math.floor(block / chunkBlocks);
      const chunkStart = index * chunkBlocks;
      const lo = block - chunkStart;
      const hi = Math.min(end - chunkStart, chunkBlocks);
      if (lo === 0 && hi === chunkBlocks) {
        if (value === this.defaultValue) this.chunks.delete(index);
        else this.chunks.set(index, value);
      } else {
        this.setWithin(index, lo, hi, value);
      }
      block = chunkStart + hi;
    }
  }

  private setWithin(index: number, lo: number, hi: number, value: number): void {
    const chunk = this.chunks.get(index) ?? this.defaultValue;
    if (typeof chunk === 'number') {
      if (chunk === value) return;
      const runs = new RunChunk([0], [chunk], false);
      runs.set(lo, hi, value);
      this.chunks.set(index, runs);
      return;
    }
    if (chunk instanceof DenseChunk) {
      const dense = chunk.shared ? new DenseChunk(chunk.values.slice(), false) : chunk;
      const values = dense.widen(value);
      // A loop for short ranges: TypedArray fill is a call into the runtime, which costs more than the
      // store for the one block a 4 KiB write sets (measured in BENCHMARKS.md).
      if (hi - lo <= shortFillBlocks) for (let i = lo; i < hi; i++) values[i] = value;
      else values.fill(value, lo, hi);
      if (dense !== chunk) this.chunks.set(index, dense);
      return;
    }
    const runs = chunk.shared ? new RunChunk(chunk.starts.slice(), chunk.values.slice(), false) : chunk;
    runs.set(lo, hi, value);
    if (runs.starts.length === 1) {
      if (runs.values[0] === this.defaultValue) this.chunks.delete(index);
      else this.chunks.set(index, runs.values[0]);
    } else if (runs.starts.length > maxRunsPerChunk) {
      this.chunks.set(index, runs.toDense());
    } else if (runs !== chunk) {
      this.chunks.set(index, runs);
    }
  }

  /**
   * Calls `fn` for each maximal run of equal values in [first, first + count), in order; runs that
   * continue across chunk boundaries are reported once.
   */
  forEachRun(first: number, count: number, fn: RunCallback): void {
    let runStart = first;
    let runValue = NaN;
    let block = first;
    const end = first + count;
    const emit = (start: number, value: number): void => {
      if (value === runValue) return;
      if (start > runStart) fn(runStart, start - runStart, runValue);
      runStart = start;
      runValue = value;
    };
    while (block < end) {
      const index = Math.floor(block / chunkBlocks);
      const chunkStart = index * chunkBlocks;
      const lo = block - chunkStart;
      const hi = Math.min(end - chunkStart, chunkBlocks);
      const chunk = this.chunks.get(index) ?? this.defaultValue;
      if (typeof chunk === 'number') {
        emit(block, chunk);
      } else if (chunk instanceof DenseChunk) {
        const values = chunk.values;
        for (let i = lo; i < hi; i++) if (values[i] !== runValue) emit(chunkStart + i, values[i]);
      } else {
        const { starts, values } = chunk;
        for (let i = 0; i < starts.length; i++) {
          const s = starts[i];
          const e = i + 1 < starts.length ? starts[i + 1] : chunkBlocks;
          if (e <= lo || s >= hi) continue;
          emit(chunkStart + Math.max(s, lo), values[i]);
        }
      }
      block = chunkStart + hi;
    }
    if (end > runStart) fn(runStart, end - runStart, runValue);
  }

  /**
   * Calls `fn` for each maximal run whose value is not the default, over the whole map, in order.
   * Cost is O(chunks set), whatever the device size.
   */
  forEachSetRun(fn: RunCallback): void {
    const indexes = [...this.chunks.keys()].sort((a, b) => a - b);
    let pendingStart = -1;
    let pendingLength = 0;
    let pendingValue = this.defaultValue;
    const push = (start: number, length: number, value: number): void => {
      if (pendingLength > 0 && value === pendingValue && pendingStart + pendingLength === start) {
        pendingLength += length;
        return;
      }
      if (pendingLength > 0 && pendingValue !== this.defaultValue) fn(pendingStart, pendingLength, pendingValue);
      pendingStart = start;
      pendingLength = length;
      pendingValue = value;
    };
    for (const index of indexes) this.forEachRun(index * chunkBlocks, chunkBlocks, push);
    if (pendingLength > 0 && pendingValue !== this.defaultValue) fn(pendingStart, pendingLength, pendingValue);
  }

  /** Runs of non-default values as a flat [start, length, value, ...] array (for checkpoints). */
  toRuns(): number[] {
    const runs: number[] = [];
    this.forEachSetRun((start, length, value) => runs.push(start, length, value));
    return runs;
  }

  static fromRuns(defaultValue: number, runs: readonly number[]): ExtentMap {
    const map = new ExtentMap(defaultValue);
    for (let i = 0; i < runs.length; i += 3) map.set(runs[i], runs[i + 1], runs[i + 2]);
    return map;
  }

  /** A copy that shares chunks with this map until either side writes to them. */
  cloneShared(): ExtentMap {
    for (const chunk of this.chunks.values()) if (typeof chunk !== 'number') chunk.shared = true;
    return new ExtentMap(this.defaultValue, new Map(this.chunks));
  }

  /** Number of chunks held (a proxy for memory). */
  get chunkCount(): number {
    return this.chunks.size;
  }

  /** Approximate bytes of memory held by chunk contents. */
  approximateBytes(): number {
    let bytes = 0;
    for (const chunk of this.chunks.values()) {
      bytes += 48;
      if (chunk instanceof DenseChunk) bytes += chunk.values.byteLength;
      else if (chunk instanceof RunChunk) bytes += 16 * chunk.starts.length;
    }
    return bytes;
  }
}
