/**
 * Read buffers that come back: a protocol server hands a read's result back (BlockDevice.recycle)
 * once its bytes have left through the socket, and the next read of the same length reuses the
 * memory. Without it every read of 4 KiB or more allocates its own ArrayBuffer (Node pools only
 * smaller ones), and at a gigabyte a second of 1 MiB reads the garbage collector took a fifth of the
 * event loop (measured in BENCHMARKS.md).
 *
 * Every buffer has an ArrayBuffer of its own: a large read transfers it to the reader thread, which
 * reads straight into it and transfers it back as a new ArrayBuffer (see file-worker.ts); `returned`
 * then makes that one the lent buffer.
 *
 * Only buffers this pool lent are taken back (a WeakSet of their ArrayBuffers, so a buffer nobody
 * returns is simply collected), each at most once, and only whole: the pool never hands out memory
 * that a caller may still hold. What is kept is bounded by maxFreeReadBuffersPerLength and
 * maxFreeReadBufferBytes.
 */
import { assert } from './errors.js';
import { maxFreeReadBufferBytes, maxFreeReadBuffersPerLength } from './limits.js';

export class ReadBuffers {
  private readonly free = new Map<number, Buffer[]>();
  private readonly lent = new WeakSet<ArrayBufferLike>();
  private freeBytes = 0;

  /** A buffer of exactly `length` bytes, contents undefined. */
  take(length: number): Buffer {
    const list = this.free.get(length);
    const reused = list?.pop();
    let buffer: Buffer;
    if (reused !== undefined) {
      this.freeBytes -= length;
      buffer = reused;
    } else {
      buffer = Buffer.allocUnsafeSlow(length);
    }
    this.lent.add(buffer.buffer);
    return buffer;
  }

  /**
   * A lent buffer's memory came back from a transfer as a new ArrayBuffer (`buffer` views all of it):
   * it is lent in the old one's place (which is empty now, and forgotten with it).
   */
  returned(buffer: Buffer): void {
    assert(buffer.byteOffset === 0 && buffer.length === buffer.buffer.byteLength, 'a returned buffer is all of its memory');
    this.lent.add(buffer.buffer);
  }

  /** The caller is done with `buffer` and every view of it; ignored unless this pool lent it. */
  give(buffer: Buffer): void {
    const memory = buffer.buffer;
    if (!this.lent.has(memory)) return;
    this.lent.delete(memory);
    const length = memory.byteLength;
    if (this.freeBytes + length > maxFreeReadBufferBytes) return;
    let list = this.free.get(length);
    if (list === undefined) this.free.set(length, (list = []));
    if (list.length >= maxFreeReadBuffersPerLength) return;
    list.push(Buffer.from(memory, 0, length));
    this.freeBytes += length;
  }
}
