/**
 * Layer data files: one sparse file per layer (`layers/<id>.data`), block b at byte b * blockSize,
 * opened on first use and kept open. An external base is its image file, opened read-only.
 *
 * Reads: small ones are synchronous (a 4 KiB page-cache pread costs far less than a trip through the
 * libuv threadpool, see DESIGN.md's measurements); the runs of a large one go to the reader thread
 * together (`readMany`, one message for the up to 16 preads of a 1 MiB read through a deep stack).
 *
 * Writes of the live path go through `writeBehind`, their blocks kept in memory until they are in
 * the file and every read laying those blocks over what it read from the file. Writes under
 * asyncWriteMinBytes start at the end of the event-loop turn, after the commit that queued them has
 * been acknowledged: after a synced commit as pwrites on the event loop, which waits for the disk
 * anyway; else together in the writer thread, off the loop (both measured in BENCHMARKS.md). Larger
 * ones go to the threadpool, so the event loop does not wait for the page cache to take a megabyte.
 * Writes touching the same bytes reach the file in order (a queued write waits while an overlapping
 * one is in flight, except behind the writer thread's own, which it keeps in order). Recovery writes
 * behind the same way, from a loop that stays off the event loop between frames: `settle` starts its
 * queued writes a writer batch at a time and holds it back while the backlog is full.
 *
 * A writable layer's file is read with readahead off, a frozen one's with it on (`refreshAdvice`,
 * file-advice.ts): small writes into page-cache folios that readahead made large cost ten times more.
 *
 * A layer removed while reads or writebacks are in flight keeps its descriptor until they finish, so
 * a reused descriptor number can never be read or written by mistake. Durability comes from the
 * journal; `syncAll` (before a checkpoint) drains the writebacks and fdatasyncs the files.
 */
import { closeSync, constants, fdatasync, fstatSync, openSync, readSync, unlinkSync, write, writeSync } from 'node:fs';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { BlockDeviceError } from './block-device.js';
import { assert } from './errors.js';
import { adviseFileAccess } from './file-advice.js';
import { FileWorker } from './file-worker.js';
import { type InflightEntry, InflightList } from './inflight-list.js';
import { asyncWriteMinBytes, maxWritebackBytes, recoveryBatchBytes, writebackConcurrency } from './limits.js';

const fdatasyncAsync = promisify(fdatasync);

interface Writeback {
  readonly layerId: number;
  readonly position: number;
  readonly length: number;
  /**
   * The bytes, dropped once they are in the file: dead hash tables of `pending` may still point at
   * the writeback until the next full collection, and must not keep the bytes (see inflight-list.ts).
   */
  data: Buffer | undefined;
  /** Small writes: `inline` (a pwrite on the event loop) or `writer` (the writer thread); large: `threadpool`. */
  readonly mode: 'inline' | 'writer' | 'threadpool';
  /** Its place in `inflightWrites` once started. */
  entry: InflightEntry<Writeback> | undefined;
}

/** The bytes of a writeback that has not reached the file. */
function bytesOf(item: Writeback): Buffer {
  assert(item.data !== undefined, 'a writeback keeps its bytes until they are in the file');
  return item.data;
}

export class LayerFiles {
  private readonly fds = new Map<number, number>();
  /** Layers whose open file is advised for random access (see refreshAdvice). */
  private readonly randomAccess = new Set<number>();
  private readonly dirty = new Set<number>();
  /** Async reads in flight per layer. */
  private readonly busy = new Map<number, number>();
  /** Descriptors of removed layers, closed when their last async read or writeback finishes. */
  private readonly closing = new Map<number, number>();
  /** Blocks written behind and not yet in the file: layer → block → the writeback holding its bytes. */
  private readonly pending = new Map<number, Map<number, Writeback>>();
  private readonly queue: Writeback[] = [];
  private readonly inflightWrites = new InflightList<Writeback>();
  /** Of inflightWrites, those in the writer thread (which keeps their order). */
  private writerWrites = 0;
  /** Large writebacks in the threadpool. */
  private running = 0;
  /** The threads that write small blocks behind and run large reads (see file-worker.ts). */
  private readonly writer = new FileWorker();
  private readonly reader = new FileWorker();
  /** Inside pump(): a nested call returns at once. */
  private pumping = false;
  /** A pump() is queued for the end of this event-loop turn (see pumpSoon). */
  private pumpScheduled = false;
  private writebackBytes = 0;
  /** Of writebackBytes, the bytes of writebacks started (in flight). */
  private startedBytes = 0;
  private writebackFailure: Error | undefined;
  private drainWaiters: Array<() => void> = [];
  private roomWaiters: Array<() => void> = [];

  constructor(
    private readonly dir: string,
    /** The store's block size (known once the store's first event is loaded). */
    private readonly blockSize: () => number,
    /** The external image path of a layer, or undefined for a store-held layer. */
    private readonly externalPath: (layerId: number) => string | undefined,
    /**
     * Whether a layer takes writes now (a volume's top; never an external image), so its file is read
     * without readahead.
     */
    private readonly writable: (layerId: number) => boolean,
  ) {}

  pathOf(layerId: number): string {
    return this.externalPath(layerId) ?? join(this.dir, `${layerId}.data`);
  }

  private fd(layerId: number): number {
    let fd = this.fds.get(layerId);
    if (fd === undefined) {
      const external = this.externalPath(layerId);
      fd = external !== undefined ? openSync(external, 'r') : openSync(join(this.dir, `${layerId}.data`), constants.O_RDWR | constants.O_CREAT, 0o600);
      this.fds.set(layerId, fd);
      this.advise(layerId, fd);
    }
    return fd;
  }

  /**
   * Give every open file the advice its layer's state asks for now. The store calls it when layers
   * freeze or thaw (snapshot, commit) and once a replay has settled them.
   */
  refreshAdvice(): void {
    for (const [layerId, fd] of this.fds) this.advise(layerId, fd);
  }

  private advise(layerId: number, fd: number): void {
    const random = this.writable(layerId);
    if (random === this.randomAccess.has(layerId)) return;
    adviseFileAccess(fd, random ? 'random' : 'normal');
    if (random) this.randomAccess.add(layerId);
    else this.randomAccess.delete(layerId);
  }

  /**
   * Read `length` bytes at `position` of a layer into `target` at `targetOffset`. Bytes past the end
   * of an external image read as zeroes (its last block may be partial); a store-held file that is
   * shorter than a block it holds is damage, reported as EIO.
   */
  read(layerId: number, target: Buffer, targetOffset: number, length: number, position: number): void {
    const fd = this.fd(layerId);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, target, targetOffset + done, length - done, position + done);
      if (n === 0) break;
      done += n;
    }
    this.complete(layerId, target, targetOffset, length, position, done);
  }

  /**
   * Several reads (the runs of one large request, each in some layer) into one `target`, in the
   * reader thread, all in one batch. The target must be a Buffer on an ArrayBuffer of its own
   * (ReadBuffers lends such buffers): its memory goes to the reader thread and comes back as a new
   * ArrayBuffer. The promise gives the target again as a view of that one, with the bytes read;
   * until then every view of the old memory, `target` too, is empty.
   */
  readMany(target: Buffer, reads: ReadonlyArray<{ layerId: number; targetOffset: number; length: number; position: number }>): Promise<Buffer> {
    // Blocks held now may reach the file (and leave memory) while the read is in flight, after it
    // read the old bytes: keep them to lay over the result.
    const held = reads.map((r) => this.heldBlocks(r.layerId, r.position, r.length));
    // Where the target lies in its memory, taken before the transfer empties it.
    const { byteOffset, length } = target;
    const ops = reads.map((r) => ({ fd: this.fd(r.layerId), position: r.position, length: r.length, targetOffset: r.targetOffset }));
    for (const r of reads) this.busy.set(r.layerId, (this.busy.get(r.layerId) ?? 0) + 1);
    return new Promise<Buffer>((resolve, reject) => {
      this.reader.read(target, ops, (errorOf, countOf, memory) => {
        const back = memory === undefined ? undefined : Buffer.from(memory, byteOffset, length);
        let failure: unknown;
        for (let i = 0; i < reads.length; i++) {
          const r = reads[i];
          try {
            const err = errorOf(i);
            if (err !== null) throw err;
            assert(back !== undefined, 'a read batch answered without an error brings its memory back');
            this.complete(r.layerId, back, r.targetOffset, r.length, r.position, countOf(i), held[i]);
          } catch (err) {
            failure ??= err;
          }
          this.release(r.layerId);
        }
        if (failure === undefined) resolve(back!);
        else reject(failure instanceof BlockDeviceError ? failure : new BlockDeviceError('EIO', (failure as Error).message, { cause: failure }));
      });
    });
  }

  /**
   * Finish a read that got `done` bytes from the file: lay blocks still written behind over it, and
   * past the end of the file accept only what those blocks cover (or, for an external image whose
   * last block is partial, zeroes); anything else is a damaged layer file: EIO.
   */
  private complete(layerId: number, target: Buffer, targetOffset: number, length: number, position: number, done: number, held?: Map<number, Buffer>): void {
    if (done < length) {
      target.fill(0, targetOffset + done, targetOffset + length);
      if (this.externalPath(layerId) === undefined && !this.coveredBehind(layerId, position + done, position + length, held)) {
        throw new BlockDeviceError('EIO', `layer ${layerId} data file ends at byte ${position + done}, before the ${length}-byte block read at ${position}`);
      }
    }
    if (held !== undefined) for (const [block, data] of held) this.copyBlock(data, block, target, targetOffset, length, position);
    this.overlay(layerId, target, targetOffset, length, position);
  }

  /** The blocks of [position, position + length) written behind and not yet in the file. */
  private heldBlocks(layerId: number, position: number, length: number): Map<number, Buffer> | undefined {
    const blocks = this.pending.get(layerId);
    if (blocks === undefined || blocks.size === 0) return undefined;
    const bs = this.blockSize();
    const held = new Map<number, Buffer>();
    for (let block = Math.floor(position / bs); block * bs < position + length; block++) {
      const item = blocks.get(block);
      if (item !== undefined) held.set(block, this.blockBytes(item, block));
    }
    return held.size > 0 ? held : undefined;
  }

  /** Whether blocks written behind (now, or when the read started) cover every byte of [from, to). */
  private coveredBehind(layerId: number, from: number, to: number, held?: Map<number, Buffer>): boolean {
    const blocks = this.pending.get(layerId);
    const bs = this.blockSize();
    for (let block = Math.floor(from / bs); block * bs < to; block++) if (blocks?.has(block) !== true && held?.has(block) !== true) return false;
    return true;
  }

  private release(layerId: number): void {
    const left = (this.busy.get(layerId) ?? 1) - 1;
    if (left > 0) {
      this.busy.set(layerId, left);
      return;
    }
    this.busy.delete(layerId);
    const fd = this.closing.get(layerId);
    if (fd !== undefined) {
      this.closing.delete(layerId);
      closeSync(fd);
    }
  }

  /**
   * Write whole blocks behind, the blocks kept in memory until they are in the file so reads (`read`,
   * `readMany`) see them at once. Small writes start at the end of the event-loop turn: with
   * `inline` as pwrites on the event loop (the caller knows the loop has time to spare), else in the
   * writer thread. Large ones go through the libuv threadpool. Writes to the same block reach
   * the file in order. Writers wait (`room`) while more than maxWritebackBytes is queued.
   */
  writeBehind(layerId: number, data: Buffer, position: number, inline: boolean): void {
    if (this.externalPath(layerId) !== undefined) throw new Error(`cowstack invariant violated: write to external layer ${layerId}`);
    const bs = this.blockSize();
    // A layer's map stays once made (until the layer is removed): no churn in `pending` itself.
    let blocks = this.pending.get(layerId);
    if (blocks === undefined) this.pending.set(layerId, (blocks = new Map()));
    const mode = data.length >= asyncWriteMinBytes ? 'threadpool' : inline ? 'inline' : 'writer';
    const item: Writeback = { layerId, position, length: data.length, data, mode, entry: undefined };
    const first = position / bs;
    const count = data.length / bs;
    for (let i = 0; i < count; i++) blocks.set(first + i, item);
    this.queue.push(item);
    this.writebackBytes += data.length;
    if (mode === 'threadpool') this.pump();
    else this.pumpSoon();
  }

  /**
   * Small writes wait for the end of the event-loop turn: the commit that queued them acknowledges
   * first (its replies leave on the next tick), and the pwrites run after, off the request's path.
   */
  private pumpSoon(): void {
    if (this.pumpScheduled) return;
    this.pumpScheduled = true;
    setImmediate(() => {
      this.pumpScheduled = false;
      this.pump();
    });
  }

  /**
   * Start queued writebacks in queue order: small inline ones at once, the other small ones together
   * as one batch for the writer thread, large ones in the threadpool (up to
   * `writebackConcurrency`). A write waits while it overlaps one in flight, except a writer-thread
   * write behind others: that thread keeps their order. A writeback finishing calls back here; that
   * call returns at once inside this loop, so a long queue never nests calls.
   */
  private pump(): void {
    if (this.pumping) return;
    this.pumping = true;
    let batch: Writeback[] | undefined;
    try {
      while (this.queue.length > 0) {
        const item = this.queue[0];
        if (this.collides(item)) break;
        if (item.mode === 'threadpool' && this.running >= writebackConcurrency) break;
        this.queue.shift();
        this.startedBytes += item.length;
        item.entry = this.inflightWrites.add(item);
        if (item.mode === 'writer') this.writerWrites++;
        this.busy.set(item.layerId, (this.busy.get(item.layerId) ?? 0) + 1);
        if (item.mode === 'writer') (batch ??= []).push(item);
        else if (item.mode === 'inline') this.writeInline(item);
        else this.startLarge(item);
      }
    } finally {
      this.pumping = false;
    }
    if (batch !== undefined) this.startBatch(batch);
  }

  private collides(item: Writeback): boolean {
    if (item.mode === 'writer' && this.writerWrites === this.inflightWrites.size) return false;
    const overlapping = (other: Writeback): boolean =>
      !(item.mode === 'writer' && other.mode === 'writer') && other.layerId === item.layerId && other.position < item.position + item.length && item.position < other.position + other.length;
    return this.inflightWrites.findNewest(overlapping) !== undefined;
  }

  private startBatch(batch: Writeback[]): void {
    const writes = batch.map((item) => ({ fd: this.fd(item.layerId), position: item.position, data: bytesOf(item) }));
    this.writer.write(writes, (errorOf) => {
      for (let i = 0; i < batch.length; i++) this.finishWriteback(batch[i], errorOf(i));
    });
  }

  private writeInline(item: Writeback): void {
    let error: NodeJS.ErrnoException | null = null;
    try {
      writeFully(this.fd(item.layerId), bytesOf(item), item.position);
    } catch (err) {
      error = err as NodeJS.ErrnoException;
    }
    this.finishWriteback(item, error);
  }

  private startLarge(item: Writeback): void {
    const fd = this.fd(item.layerId);
    const data = bytesOf(item);
    this.running++;
    let done = 0;
    const step = (): void =>
      write(fd, data, done, data.length - done, item.position + done, (err, n) => {
        if (err === null && (done += n) < data.length) return step();
        this.running--;
        this.finishWriteback(item, err);
      });
    step();
  }

  private finishWriteback(item: Writeback, err: NodeJS.ErrnoException | null): void {
    assert(item.entry !== undefined, 'a writeback finishes once, after it started');
    this.inflightWrites.remove(item.entry);
    item.entry = undefined;
    if (item.mode === 'writer') this.writerWrites--;
    this.writebackBytes -= item.length;
    this.startedBytes -= item.length;
    if (err !== null) {
      // The blocks stay in memory (reads stay right); the journal still holds them for recovery.
      this.writebackFailure ??= err;
    } else {
      this.dirty.add(item.layerId);
      const blocks = this.pending.get(item.layerId);
      if (blocks !== undefined) {
        const bs = this.blockSize();
        const first = item.position / bs;
        // A later write of a block may be queued: only this writeback's own blocks leave memory.
        for (let i = 0; i < item.length / bs; i++) if (blocks.get(first + i) === item) blocks.delete(first + i);
      }
      item.data = undefined;
    }
    this.release(item.layerId);
    this.pump();
    if (this.writebackBytes <= maxWritebackBytes) for (const resolve of this.roomWaiters.splice(0)) resolve();
    if (this.inflightWrites.size === 0 && this.queue.length === 0) for (const resolve of this.drainWaiters.splice(0)) resolve();
  }

  /** Whether more than maxWritebackBytes waits for writeback (writers should wait: `room`). */
  overBacklog(): boolean {
    return this.writebackBytes > maxWritebackBytes;
  }

  /** Resolves once the writeback backlog is under maxWritebackBytes (backpressure for writers). */
  room(): Promise<void> | undefined {
    if (!this.overBacklog()) return undefined;
    return new Promise<void>((resolve) => this.roomWaiters.push(resolve));
  }

  /**
   * For a producer that queues writes behind in a loop without returning to the event loop
   * (recovery): starts the queued writes once they make a batch of recoveryBatchBytes, and returns
   * `room()`.
   */
  settle(): Promise<void> | undefined {
    if (this.writebackBytes - this.startedBytes >= recoveryBatchBytes) this.pump();
    return this.room();
  }

  /** Resolves when every queued writeback has reached the file; throws the first writeback error. */
  async drain(): Promise<void> {
    if (this.inflightWrites.size > 0 || this.queue.length > 0) await new Promise<void>((resolve) => this.drainWaiters.push(resolve));
    if (this.writebackFailure !== undefined) throw this.writebackFailure;
  }

  /** The first failed writeback, if any (the store stops taking writes). */
  get failure(): Error | undefined {
    return this.writebackFailure;
  }

  /** Lay blocks still waiting for writeback over bytes just read from the file. */
  private overlay(layerId: number, target: Buffer, targetOffset: number, length: number, position: number): void {
    const blocks = this.pending.get(layerId);
    if (blocks === undefined || blocks.size === 0) return;
    const bs = this.blockSize();
    const first = Math.floor(position / bs);
    const last = Math.floor((position + length - 1) / bs);
    if (last - first + 1 > blocks.size) {
      for (const [block, item] of blocks) if (block >= first && block <= last) this.copyBlock(this.blockBytes(item, block), block, target, targetOffset, length, position);
    } else {
      for (let block = first; block <= last; block++) {
        const item = blocks.get(block);
        if (item !== undefined) this.copyBlock(this.blockBytes(item, block), block, target, targetOffset, length, position);
      }
    }
  }

  /** The bytes of one block of a writeback not yet in the file. */
  private blockBytes(item: Writeback, block: number): Buffer {
    const bs = this.blockSize();
    const at = block * bs - item.position;
    return bytesOf(item).subarray(at, at + bs);
  }

  private copyBlock(data: Buffer, block: number, target: Buffer, targetOffset: number, length: number, position: number): void {
    const bs = this.blockSize();
    const from = Math.max(block * bs, position);
    const to = Math.min((block + 1) * bs, position + length);
    data.copy(target, targetOffset + (from - position), from - block * bs, to - block * bs);
  }

  sizeOf(layerId: number): number {
    return fstatSync(this.fd(layerId)).size;
  }

  /** Finish every writeback, then fdatasync every file written since the last call. */
  async syncAll(): Promise<void> {
    await this.drain();
    const ids = [...this.dirty];
    this.dirty.clear();
    // One file at a time: a flush can take the better part of a second, and the threadpool threads it
    // holds are the ones LevelDB and large reads need meanwhile.
    for (const id of ids) {
      const fd = this.fds.get(id);
      if (fd !== undefined) await fdatasyncAsync(fd);
    }
  }

  /** Close a layer's file and, for a store-held layer, delete it (its writes behind are dropped). */
  remove(layerId: number): void {
    this.pending.delete(layerId);
    for (let i = this.queue.length - 1; i >= 0; i--) {
      if (this.queue[i].layerId === layerId) {
        this.writebackBytes -= this.queue[i].length;
        this.queue.splice(i, 1);
      }
    }
    this.close(layerId);
    if (this.externalPath(layerId) === undefined) {
      try {
        unlinkSync(join(this.dir, `${layerId}.data`));
      } catch (err) {
        if ((err as NodeJS.ErrnoException).code !== 'ENOENT') throw err;
      }
    }
  }

  close(layerId: number): void {
    const fd = this.fds.get(layerId);
    if (fd !== undefined) {
      this.fds.delete(layerId);
      this.randomAccess.delete(layerId);
      this.dirty.delete(layerId);
      if (this.busy.has(layerId)) this.closing.set(layerId, fd);
      else closeSync(fd);
    }
  }

  /** Close every file (each once its reads and writebacks are done) and stop the worker threads. */
  closeAll(): void {
    for (const id of [...this.fds.keys()]) this.close(id);
    this.writer.close();
    this.reader.close();
  }
}

/** pwrite all of `data` at `position` (a pwrite may write less than asked). */
function writeFully(fd: number, data: Buffer, position: number): void {
  for (let done = 0; done < data.length; ) done += writeSync(fd, data, done, data.length - done, position + done);
}
