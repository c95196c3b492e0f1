/**
 * Layer data files: one sparse file per layer (`layers/<id>.data`), block b at byte b * blockSize,
 * opened on first use and kept open. An external base is its image file, opened read-only. Reads
 * and writes are synchronous: they hit the page cache, and a synchronous 4 KiB pread costs far less
 * than a trip through the libuv threadpool (see DESIGN.md's measurements). Durability comes from the
 * journal; `syncAll` (before a checkpoint) makes the files durable too.
 */
import { closeSync, constants, fdatasync, fstatSync, openSync, readSync, unlinkSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { BlockDeviceError } from './block-device.js';

export class LayerFiles {
  private readonly fds = new Map<number, number>();
  private readonly dirty = new Set<number>();

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
    if (done < length) {
      if (this.externalPath(layerId) === undefined) {
        throw new BlockDeviceError('EIO', `layer ${layerId} data file ends at byte ${position + done}, before the ${length}-byte block read at ${position}`);
      }
      target.fill(0, targetOffset + done, targetOffset + length);
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
      closeSync(fd);
      this.fds.delete(layerId);
      this.dirty.delete(layerId);
    }
  }

  closeAll(): void {
    for (const id of [...this.fds.keys()]) this.close(id);
  }
}
