/**
 * Layer data files: one sparse file per layer (`layers/<id>.data`), block b at byte b * blockSize,
 * opened on first use and kept open. An external base is its image file, opened read-only. Writes
 * and small reads are synchronous: they hit the page cache, and a synchronous 4 KiB pread costs far
 * less than a trip through the libuv threadpool (see DESIGN.md's measurements). Large reads go
 * through the threadpool (`readAsync`), where several run at once on both cores; a layer removed
 * while such reads are in flight keeps its descriptor until they finish, so a reused descriptor
 * number can never be read by mistake. Durability comes from the journal; `syncAll` (before a
 * checkpoint) makes the files durable too.
 */
import { closeSync, constants, fdatasync, fstatSync, openSync, read, readSync, unlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { BlockDeviceError } from './block-device.js';

export class LayerFiles {
  private readonly fds = new Map<number, number>();
  private readonly dirty = new Set<number>();
  /** Async reads in flight per layer. */
  private readonly busy = new Map<number, number>();
  /** Descriptors of removed layers, closed when their last async read finishes. */
  private readonly closing = new Map<number, number>();

  constructor(
    private readonly dir: string,
    /** The external image path of a layer, or undefined for a store-held layer. */
    private readonly externalPath: (layerId: number) => string | undefined,
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
    }
    return fd;
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
    this.finishShortRead(layerId, target, targetOffset, length, position, done);
  }

  /** The same read through the libuv threadpool. */
  readAsync(layerId: number, target: Buffer, targetOffset: number, length: number, position: number): Promise<void> {
    const fd = this.fd(layerId);
    this.busy.set(layerId, (this.busy.get(layerId) ?? 0) + 1);
    return new Promise<void>((resolve, reject) => {
      let done = 0;
      const finish = (err?: unknown): void => {
        this.release(layerId);
        if (err !== undefined) reject(err instanceof BlockDeviceError ? err : new BlockDeviceError('EIO', (err as Error).message, { cause: err }));
        else resolve();
      };
      const step = (): void =>
        read(fd, target, targetOffset + done, length - done, position + done, (err, n) => {
          if (err) return finish(err);
          done += n;
          if (n > 0 && done < length) return step();
          try {
            this.finishShortRead(layerId, target, targetOffset, length, position, done);
            finish();
          } catch (short) {
            finish(short);
          }
        });
      step();
    });
  }

  private finishShortRead(layerId: number, target: Buffer, targetOffset: number, length: number, position: number, done: number): void {
    if (done >= length) return;
    if (this.externalPath(layerId) === undefined) {
      throw new BlockDeviceError('EIO', `layer ${layerId} data file ends at byte ${position + done}, before the ${length}-byte block read at ${position}`);
    }
    target.fill(0, targetOffset + done, targetOffset + length);
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

  /** Write bytes into a store-held layer file (never an external image). */
  write(layerId: number, data: Buffer, position: number): void {
    if (this.externalPath(layerId) !== undefined) throw new Error(`cowstack invariant violated: write to external layer ${layerId}`);
    const fd = this.fd(layerId);
    let done = 0;
    while (done < data.length) done += writeSync(fd, data, done, data.length - done, position + done);
    this.dirty.add(layerId);
  }

  sizeOf(layerId: number): number {
    return fstatSync(this.fd(layerId)).size;
  }

  /** fdatasync every file written since the last call. */
  async syncAll(): Promise<void> {
    const ids = [...this.dirty];
    this.dirty.clear();
    await Promise.all(
      ids.map(
        (id) =>
          new Promise<void>((resolve, reject) => {
            const fd = this.fds.get(id);
            if (fd === undefined) return resolve();
            fdatasync(fd, (err) => (err ? reject(err) : resolve()));
          }),
      ),
    );
  }

  /** Close a layer's file and, for a store-held layer, delete it. */
  remove(layerId: number): void {
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
      this.dirty.delete(layerId);
      if (this.busy.has(layerId)) this.closing.set(layerId, fd);
      else closeSync(fd);
    }
  }

  closeAll(): void {
    for (const id of [...this.fds.keys()]) this.close(id);
  }
}
