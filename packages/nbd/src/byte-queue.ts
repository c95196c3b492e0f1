/**
 * A FIFO of received bytes, kept as the chunks the socket delivered so nothing is copied until a
 * frame is taken. `take(n)` returns a view into one chunk when the frame lies inside it (the common
 * case for request headers and small writes) and concatenates only when a frame spans chunks (one
 * copy, unavoidable since the device wants one Buffer per write). `takeInto` moves bytes into a
 * caller's buffer as they arrive, so a large payload is copied while it is still in cache. Chunks handed in are never written
 * to, so views stay valid after they are taken. Pure: no I/O.
 */
import { assert } from './errors.js';

export class ByteQueue {
  private chunks: Buffer[] = [];
  /** Read position inside chunks[0]. */
  private head = 0;
  private total = 0;

  /** Bytes available. */
  get length(): number {
    return this.total;
  }

  push(chunk: Buffer): void {
    if (chunk.length === 0) return;
    this.chunks.push(chunk);
    this.total += chunk.length;
  }

  /** The next `n` bytes, removed from the queue. Requires n <= length. */
  take(n: number): Buffer {
    assert(n >= 0 && n <= this.total, `take(${n}) with ${this.total} bytes queued`);
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0];
    const available = first.length - this.head;
    if (n <= available) {
      const out = first.subarray(this.head, this.head + n);
      this.advance(n);
      return out;
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const chunk = this.chunks[0];
      const step = Math.min(n - filled, chunk.length - this.head);
      chunk.copy(out, filled, this.head, this.head + step);
      filled += step;
      this.advance(step);
    }
    return out;
  }

  /** Moves up to `n` bytes into `target` at `at`; returns how many were moved. */
  takeInto(target: Buffer, at: number, n: number): number {
    const moved = Math.min(n, this.total);
    assert(at + moved <= target.length, `takeInto past the end of the target`);
    let filled = 0;
    while (filled < moved) {
      const chunk = this.chunks[0];
      const step = Math.min(moved - filled, chunk.length - this.head);
      chunk.copy(target, at + filled, this.head, this.head + step);
      filled += step;
      this.advance(step);
    }
    return moved;
  }

  /** Drops up to `n` bytes; returns how many were dropped. */
  skip(n: number): number {
    const dropped = Math.min(n, this.total);
    let left = dropped;
    while (left > 0) {
      const step = Math.min(left, this.chunks[0].length - this.head);
      this.advance(step);
      left -= step;
    }
    return dropped;
  }

  /** Big-endian unsigned 32-bit integer at byte `at` from the front, without removing anything. */
  peekUint32(at: number): number {
    assert(at + 4 <= this.total, `peekUint32(${at}) with ${this.total} bytes queued`);
    const first = this.chunks[0];
    if (this.head + at + 4 <= first.length) return first.readUInt32BE(this.head + at);
    let value = 0;
    for (let i = 0; i < 4; i++) value = value * 256 + this.byteAt(at + i);
    return value;
  }

  private byteAt(at: number): number {
    let index = this.head + at;
    for (const chunk of this.chunks) {
      if (index < chunk.length) return chunk[index];
      index -= chunk.length;
    }
    assert(false, `byteAt(${at}) past the end`);
  }

  private advance(n: number): void {
    this.head += n;
    this.total -= n;
    while (this.chunks.length > 0 && this.head >= this.chunks[0].length) {
      this.head -= this.chunks[0].length;
      this.chunks.shift();
    }
    if (this.chunks.length === 0) this.head = 0;
  }
}
