/**
 * MemoryDevice: the reference model of a BlockDevice, a flat Buffer plus a per-block allocation map.
 * Reads of unallocated blocks come back as holes (zero pieces) so sparse reads are exercised; trim and
 * write-zeroes with mayTrim deallocate whole blocks; extents report allocation (base:allocation) and a
 * depth of 1 or 0 (qemu:allocation-depth). Hooks let tests delay or fail operations and observe the
 * order in which the device saw them.
 */
import type { BlockDevice, ExportInfo, ExportProvider, Extent, ExtentContext, ReadPiece, ReadResult, WriteFlags, ZeroFlags } from '@cowstack/core';
import { BlockDeviceError } from '@cowstack/core';

export interface MemoryDeviceOptions {
  readonly sizeBytes: number;
  readonly blockSizeBytes?: number;
  readonly readOnly?: boolean;
  readonly canFastZero?: boolean;
  readonly canMultiConn?: boolean;
  readonly extentContexts?: readonly ExtentContext[];
}

export type DeviceOp = 'read' | 'write' | 'zero' | 'trim' | 'flush' | 'cache' | 'extents';

export interface OpRecord {
  readonly op: DeviceOp;
  readonly offset: number;
  readonly length: number;
  readonly fua?: boolean;
  readonly mayTrim?: boolean;
  readonly fast?: boolean;
  readonly phase: 'start' | 'end';
}

export class MemoryDevice implements BlockDevice {
  readonly sizeBytes: number;
  readonly blockSizeBytes: number;
  readonly readOnly: boolean;
  readonly canFastZero: boolean;
  readonly canMultiConn: boolean;
  readonly extentContexts: readonly ExtentContext[];
  readonly data: Buffer;
  readonly allocated: Uint8Array;
  readonly log: OpRecord[] = [];
  /** Called before an operation takes effect; a returned promise delays it, a throw fails it. */
  hook: ((op: DeviceOp, offset: number, length: number) => Promise<void> | void) | undefined;
  flushes = 0;
  /** Bytes written since the last flush; FUA writes count as flushed. */
  dirtyBytes = 0;

  constructor(options: MemoryDeviceOptions) {
    this.sizeBytes = options.sizeBytes;
    this.blockSizeBytes = options.blockSizeBytes ?? 4096;
    this.readOnly = options.readOnly ?? false;
    this.canFastZero = options.canFastZero ?? true;
    this.canMultiConn = options.canMultiConn ?? true;
    this.extentContexts = options.extentContexts ?? ['base:allocation', 'qemu:allocation-depth'];
    this.data = Buffer.alloc(this.sizeBytes);
    this.allocated = new Uint8Array(Math.ceil(this.sizeBytes / this.blockSizeBytes));
  }

  private check(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > this.sizeBytes) {
      throw new BlockDeviceError('EINVAL', `range ${offset}+${length} outside device of ${this.sizeBytes}`);
    }
  }

  private async enter(op: DeviceOp, offset: number, length: number, extra: Partial<OpRecord> = {}): Promise<void> {
    this.log.push({ op, offset, length, phase: 'start', ...extra });
    if (this.hook) await this.hook(op, offset, length);
  }

  private leave(op: DeviceOp, offset: number, length: number): void {
    this.log.push({ op, offset, length, phase: 'end' });
  }

  async read(offset: number, length: number): Promise<ReadResult> {
    await this.enter('read', offset, length);
    this.check(offset, length);
    const pieces: ReadPiece[] = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const block = Math.floor(at / this.blockSizeBytes);
      const allocated = this.allocated[block] === 1;
      let runEnd = Math.min(end, (block + 1) * this.blockSizeBytes);
      while (runEnd < end && (this.allocated[Math.floor(runEnd / this.blockSizeBytes)] === 1) === allocated) runEnd = Math.min(end, runEnd + this.blockSizeBytes);
      pieces.push({ length: runEnd - at, data: allocated ? Buffer.from(this.data.subarray(at, runEnd)) : undefined });
      at = runEnd;
    }
    this.leave('read', offset, length);
    if (pieces.length === 1 && pieces[0].data !== undefined) return pieces[0].data;
    return pieces;
  }

  async write(offset: number, data: Buffer, flags: WriteFlags): Promise<void> {
    await this.enter('write', offset, data.length, { fua: flags.fua });
    if (this.readOnly) throw new BlockDeviceError('EROFS', 'read-only device');
    this.check(offset, data.length);
    data.copy(this.data, offset);
    this.markAllocated(offset, data.length, true);
    if (!flags.fua) this.dirtyBytes += data.length;
    this.leave('write', offset, data.length);
  }

  async zero(offset: number, length: number, flags: ZeroFlags): Promise<void> {
    await this.enter('zero', offset, length, { fua: flags.fua, mayTrim: flags.mayTrim, fast: flags.fast });
    if (this.readOnly) throw new BlockDeviceError('EROFS', 'read-only device');
    if (flags.fast && !this.canFastZero) throw new BlockDeviceError('ENOTSUP', 'this device cannot zero fast');
    this.check(offset, length);
    this.data.fill(0, offset, offset + length);
    if (flags.mayTrim) this.deallocateWhole(offset, length);
    else this.markAllocated(offset, length, true);
    if (!flags.fua) this.dirtyBytes += length;
    this.leave('zero', offset, length);
  }

  async trim(offset: number, length: number, flags: WriteFlags): Promise<void> {
    await this.enter('trim', offset, length, { fua: flags.fua });
    if (this.readOnly) throw new BlockDeviceError('EROFS', 'read-only device');
    this.check(offset, length);
    this.data.fill(0, offset, offset + length);
    this.deallocateWhole(offset, length);
    this.leave('trim', offset, length);
  }

  async flush(): Promise<void> {
    await this.enter('flush', 0, 0);
    this.flushes++;
    this.dirtyBytes = 0;
    this.leave('flush', 0, 0);
  }

  async cache(offset: number, length: number): Promise<void> {
    await this.enter('cache', offset, length);
    this.check(offset, length);
    this.leave('cache', offset, length);
  }

  async extents(offset: number, length: number, context: ExtentContext): Promise<Extent[]> {
    await this.enter('extents', offset, length);
    this.check(offset, length);
    if (!this.extentContexts.includes(context)) throw new BlockDeviceError('EINVAL', `context ${context} not offered`);
    const out: Extent[] = [];
    let at = offset;
    const end = offset + length;
    while (at < end) {
      const block = Math.floor(at / this.blockSizeBytes);
      const allocated = this.allocated[block] === 1;
      let runEnd = Math.min(this.sizeBytes, (block + 1) * this.blockSizeBytes);
      while (runEnd < end && (this.allocated[Math.floor(runEnd / this.blockSizeBytes)] === 1) === allocated) runEnd = Math.min(this.sizeBytes, runEnd + this.blockSizeBytes);
      out.push({ length: runEnd - at, hole: !allocated, zero: !allocated, depth: allocated ? 1 : 0 });
      at = runEnd;
    }
    this.leave('extents', offset, length);
    return out;
  }

  private markAllocated(offset: number, length: number, value: boolean): void {
    if (length === 0) return;
    const first = Math.floor(offset / this.blockSizeBytes);
    const last = Math.floor((offset + length - 1) / this.blockSizeBytes);
    this.allocated.fill(value ? 1 : 0, first, last + 1);
  }

  /** Deallocates blocks wholly inside the range (their bytes are already zero). */
  private deallocateWhole(offset: number, length: number): void {
    const first = Math.ceil(offset / this.blockSizeBytes);
    const endBlock = Math.floor((offset + length) / this.blockSizeBytes);
    const lastWhole = offset + length === this.sizeBytes ? this.allocated.length : endBlock;
    if (lastWhole > first) this.allocated.fill(0, first, lastWhole);
  }
}

/** A provider over a fixed map of exports; the default export ('') is `defaultName` if given. */
export class MapProvider implements ExportProvider {
  readonly opened: string[] = [];

  constructor(
    readonly exports: Map<string, { device: BlockDevice; description: string }>,
    readonly defaultName?: string,
  ) {}

  static of(entries: Record<string, BlockDevice>, defaultName?: string, descriptions: Record<string, string> = {}): MapProvider {
    return new MapProvider(new Map(Object.entries(entries).map(([name, device]) => [name, { device, description: descriptions[name] ?? '' }])), defaultName);
  }

  list(): readonly ExportInfo[] {
    return Array.from(this.exports, ([name, e]) => ({ name, description: e.description }));
  }

  open(name: string): BlockDevice | undefined {
    this.opened.push(name);
    const key = name === '' && this.defaultName !== undefined ? this.defaultName : name;
    return this.exports.get(key)?.device;
  }
}
