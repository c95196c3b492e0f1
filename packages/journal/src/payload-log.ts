/**
 * The payload log: record payloads (write data) in append-only segment files beside the LevelDB
 * database (`<journal>/payloads/<first seq>.seg`), so LevelDB holds only small frames.
 *
 * Why: a 4 KiB or 1 MiB value in LevelDB is copied into its WAL, its memtable, an L0 table and every
 * compaction after that. Appending the bytes once to a sequential file and keeping (segment, offset)
 * in the frame costs one write. Measured in packages/journal/README.md.
 *
 * Ordering: a batch `reserve`s its payloads' place first (its frames name it), and `write`s them
 * (page cache) before it commits: no committed frame points past what was written. For a synced
 * batch, the write and an fdatasync of every segment written since the last sync come before the
 * frames are written with LevelDB's sync: a durable frame always has durable payloads. An unsynced
 * batch writes its payloads while LevelDB writes its frames (measured in BENCHMARKS.md). A crash
 * in between can leave the frames of the newest batch, never acknowledged, without their payloads,
 * as can an OS crash for any unsynced frame: replay reports that as a torn tail (see
 * Journal.cutTail), never as silent data. Every batch before the newest one wrote its payloads
 * before the next one reserved its place.
 *
 * Retention drops whole segments whose records are all at or below the drop point. Up to
 * payloadSpareSegments of them are kept as spares (`<id>.spare`) and renamed into place as the next
 * segments, as PostgreSQL recycles WAL segments: a batch's payloads then overwrite pages that are
 * already cached and blocks that are already allocated, instead of growing a new file (new page-cache
 * pages, block allocation, and an ext4 journal commit on each fdatasync that grew it). Measured in
 * BENCHMARKS.md. Stale bytes in a recycled segment are never read as data: a frame names its payload's
 * length and CRC, so a frame whose payload never reached the segment reads as a torn tail. Because
 * a segment's size no longer says where its payloads end, `close` truncates the active segment to its
 * tail; after a crash, a recycled active segment counts as full and the next batch starts a new one.
 * A synced batch also fsyncs the directory after a segment appeared, so the name survives a power cut.
 */
import { closeSync, constants, fdatasync, fstatSync, fsync, ftruncateSync, mkdirSync, openSync, readdirSync, readSync, renameSync, statSync, writeSync, writevSync } from 'node:fs';
import { unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { assert, JournalError } from './errors.js';
import { payloadSpareSegments } from './limits.js';

const fdatasyncAsync = promisify(fdatasync);
const fsyncAsync = promisify(fsync);

function segmentName(firstSeq: number): string {
  return `${String(firstSeq).padStart(16, '0')}.seg`;
}

function spareName(id: number): string {
  return `${String(id).padStart(16, '0')}.spare`;
}

function idsNamed(names: readonly string[], pattern: RegExp): number[] {
  return names
    .map((name) => pattern.exec(name))
    .filter((m): m is RegExpExecArray => m !== null)
    .map((m) => Number(m[1]))
    .sort((a, b) => a - b);
}

/** Where a batch's payloads go: `totalBytes` from `offset` in segment `segment`. */
export interface PayloadReservation {
  readonly segment: number;
  readonly offset: number;
  readonly totalBytes: number;
}

export class PayloadLog {
  readonly dir: string;
  /** Segment ids (the first seq written into each), ascending. */
  private segments: number[];
  /** Retired segments kept for reuse, by their old id, oldest first (at most payloadSpareSegments). */
  private readonly spares: number[];
  private activeFd: number | undefined;
  private tailBytes = 0;
  private readonly dirty = new Set<number>();
  /** A segment was created or renamed into place since the directory was last fsynced. */
  private dirDirty = false;
  private readonly readFds = new Map<number, number>();
  /** The last flush started by `sync` (settled, never rejecting). */
  private flushing: Promise<void> = Promise.resolve();

  /** A segment is closed once the next batch would take it past this size. */
  private readonly segmentBytes: number;

  constructor(journalDir: string, segmentBytes: number) {
    if (!Number.isSafeInteger(segmentBytes) || segmentBytes < 1) throw new RangeError(`payload segment size must be a positive integer, not ${segmentBytes}`);
    this.segmentBytes = segmentBytes;
    this.dir = join(journalDir, 'payloads');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    const names = readdirSync(this.dir);
    this.segments = idsNamed(names, /^(\d{16})\.seg$/);
    this.spares = idsNamed(names, /^(\d{16})\.spare$/);
    const last = this.segments[this.segments.length - 1];
    if (last !== undefined) {
      this.activeFd = openSync(join(this.dir, segmentName(last)), constants.O_RDWR);
      this.tailBytes = fstatSync(this.activeFd).size;
    }
  }

  private get active(): number | undefined {
    return this.segments[this.segments.length - 1];
  }

  /**
   * Reserve the place of a batch's payloads, contiguous, for `write`. A batch never spans segments:
   * a new segment, named by `firstSeq`, starts when the active one would exceed segmentBytes; it is a
   * spare renamed into place when there is one. The next reservation follows this one, so `write`
   * must come before it.
   */
  reserve(firstSeq: number, totalBytes: number): PayloadReservation {
    if (this.activeFd !== undefined && this.active === firstSeq && this.tailBytes + totalBytes > this.segmentBytes) {
      // The active segment is named by this very seq, so it holds no committed record's payload (a
      // torn tail was cut back to here): rewrite it from the start rather than take a new name.
      this.tailBytes = 0;
    } else if (this.activeFd === undefined || (this.tailBytes > 0 && this.tailBytes + totalBytes > this.segmentBytes)) {
      if (this.activeFd !== undefined) {
        // The full segment is only read (and fdatasynced) from now on, through a read descriptor.
        this.dirty.add(this.active!);
        closeSync(this.activeFd);
        this.activeFd = undefined;
      }
      this.activeFd = this.createSegment(firstSeq);
      this.segments.push(firstSeq);
      this.tailBytes = 0;
      this.dirDirty = true;
    }
    const reservation = { segment: this.active!, offset: this.tailBytes, totalBytes };
    this.tailBytes += totalBytes;
    return reservation;
  }

  /**
   * Write a batch's payloads where `reserve` placed them (one writev, on the calling thread: measured
   * against the threadpool in BENCHMARKS.md). On failure the bytes written are garbage no committed
   * frame points at (the batch fails and its frames are taken back), and the next reservation starts
   * after them.
   */
  write(reservation: PayloadReservation, payloads: readonly Buffer[]): void {
    const { segment, offset, totalBytes } = reservation;
    assert(segment === this.active && this.activeFd !== undefined && offset + totalBytes === this.tailBytes, 'payloads are written where the newest reservation placed them');
    try {
      let written = 0;
      while (written < totalBytes) {
        written += writevSync(this.activeFd, written === 0 ? (payloads as Buffer[]) : remainder(payloads, written), offset + written);
      }
    } catch (err) {
      this.tailBytes = fstatSync(this.activeFd).size;
      throw err;
    }
    this.dirty.add(segment);
  }

  /**
   * Open a new segment file named by `firstSeq`: the oldest spare renamed, or a new file. A file of
   * that name that is no live segment is left over from a failed attempt and holds nothing a frame
   * points at, so it is replaced. (Rename, not link and unlink: a spare name left pointing at a live
   * segment would later be recycled over it.)
   */
  private createSegment(firstSeq: number): number {
    if (this.segments.includes(firstSeq)) throw new Error(`payload log invariant: segment ${firstSeq} is live`);
    const path = join(this.dir, segmentName(firstSeq));
    const spare = this.spares.shift();
    if (spare !== undefined) {
      renameSync(join(this.dir, spareName(spare)), path);
      return openSync(path, constants.O_RDWR);
    }
    return openSync(path, constants.O_RDWR | constants.O_CREAT | constants.O_TRUNC, 0o600);
  }

  /**
   * Make every payload written so far durable: fdatasync each segment written since the last call,
   * one at a time (so a flush of gigabytes never takes every threadpool thread from LevelDB), and
   * wait for any flush already running (it may hold bytes this call relies on). Appends may go on
   * meanwhile.
   */
  sync(): Promise<void> {
    const ids = [...this.dirty];
    this.dirty.clear();
    const dirDirty = this.dirDirty;
    this.dirDirty = false;
    const previous = this.flushing;
    const flushing = (async () => {
      if (dirDirty) {
        try {
          await this.syncDir();
        } catch (err) {
          this.dirDirty = true;
          for (const id of ids) this.dirty.add(id);
          throw err;
        }
      }
      for (let i = 0; i < ids.length; i++) {
        const fd = this.readFd(ids[i]);
        try {
          await fdatasyncAsync(fd);
        } catch (err) {
          // Not known to be durable: the next sync tries these segments again.
          for (const id of ids.slice(i)) this.dirty.add(id);
          throw err;
        }
      }
      await previous;
    })();
    this.flushing = flushing.catch(() => undefined);
    return flushing;
  }

  private async syncDir(): Promise<void> {
    const fd = openSync(this.dir, constants.O_RDONLY | constants.O_DIRECTORY);
    try {
      await fsyncAsync(fd);
    } finally {
      closeSync(fd);
    }
  }

  private readFd(segment: number): number {
    if (segment === this.active && this.activeFd !== undefined) return this.activeFd;
    let fd = this.readFds.get(segment);
    if (fd === undefined) {
      fd = openSync(join(this.dir, segmentName(segment)), constants.O_RDONLY);
      this.readFds.set(segment, fd);
    }
    return fd;
  }

  /** Read `length` bytes at `offset` of a segment; returns fewer when the segment is missing or short. */
  read(segment: number, offset: number, length: number): Buffer {
    const out = Buffer.allocUnsafe(length);
    let fd: number;
    try {
      fd = this.readFd(segment);
    } catch {
      return out.subarray(0, 0);
    }
    let done = 0;
    while (done < length) {
      const n = readSync(fd, out, done, length - done, offset + done);
      if (n === 0) break;
      done += n;
    }
    return out.subarray(0, done);
  }

  /** Why `rewrite` cannot write into `segment`, if it cannot: the segment is gone and was the newest. */
  rewriteObstacle(segment: number): string | undefined {
    if (this.segments.includes(segment) || (this.active !== undefined && segment <= this.active)) return undefined;
    return `payload segment ${segmentName(segment)} is gone from ${this.dir}, and it was the newest`;
  }

  /**
   * Write bytes back at `offset` of a segment and make them durable: a damaged payload's repair
   * (Journal.rewritePayload checked them against its frame). A segment file removed by hand is made
   * anew around the repaired payloads (the others it held stay missing), unless it would be newer
   * than the active segment, which the next batch appends to.
   */
  async rewrite(segment: number, offset: number, bytes: Buffer): Promise<void> {
    const obstacle = this.rewriteObstacle(segment);
    if (obstacle !== undefined) throw new JournalError('ENOENT', obstacle);
    const gone = !this.segments.includes(segment);
    const fd = openSync(join(this.dir, segmentName(segment)), gone ? constants.O_WRONLY | constants.O_CREAT : constants.O_WRONLY, 0o600);
    try {
      let done = 0;
      while (done < bytes.length) done += writeSync(fd, bytes, done, bytes.length - done, offset + done);
      await fdatasyncAsync(fd);
    } finally {
      closeSync(fd);
    }
    if (gone) {
      this.segments.push(segment);
      this.segments.sort((a, b) => a - b);
      await this.syncDir();
    }
    // A repair past the end of a short active segment: the next batch appends after it, and close keeps it.
    if (segment === this.active) this.tailBytes = Math.max(this.tailBytes, offset + bytes.length);
  }

  /**
   * Retire every segment all of whose payloads belong to records at or below `throughSeq`: the
   * newest become spares (up to payloadSpareSegments), the rest are deleted. Deleted files are
   * unlinked in the threadpool: dropping a segment's cached pages takes the kernel long enough (a
   * 256 MiB segment: tens of milliseconds) to stall the event loop. Returns how many went.
   */
  async dropThrough(throughSeq: number): Promise<number> {
    const retired: number[] = [];
    while (this.segments.length > 1 && this.segments[1] - 1 <= throughSeq) {
      const segment = this.segments.shift()!;
      const fd = this.readFds.get(segment);
      if (fd !== undefined) {
        closeSync(fd);
        this.readFds.delete(segment);
      }
      this.dirty.delete(segment);
      retired.push(segment);
    }
    const keep = Math.max(0, Math.min(retired.length, payloadSpareSegments - this.spares.length));
    const doomed = retired.slice(0, retired.length - keep);
    for (const segment of retired.slice(retired.length - keep)) {
      renameSync(join(this.dir, segmentName(segment)), join(this.dir, spareName(segment)));
      this.spares.push(segment);
    }
    await Promise.all(doomed.map((segment) => unlink(join(this.dir, segmentName(segment)))));
    return retired.length;
  }

  /**
   * The seq through which payloads can be dropped so that at most `maxBytes` stay in segment files,
   * dropping whole segments from the oldest, and never past `notAfterSeq`.
   */
  seqToKeepWithin(maxBytes: number, notAfterSeq: number): number {
    const sizes = this.segments.map((segment) => {
      try {
        return fstatSync(this.readFd(segment)).size;
      } catch {
        return 0;
      }
    });
    let total = sizes.reduce((a, b) => a + b, 0);
    let through = 0;
    for (let i = 0; i + 1 < this.segments.length && total > maxBytes; i++) {
      const lastSeqOfSegment = this.segments[i + 1] - 1;
      if (lastSeqOfSegment > notAfterSeq) break;
      through = lastSeqOfSegment;
      total -= sizes[i];
    }
    return through;
  }

  /** Bytes held in segment files, spares included. */
  diskBytes(): number {
    let total = this.spareBytes();
    for (const segment of this.segments) {
      try {
        total += fstatSync(this.readFd(segment)).size;
      } catch {
        // A segment removed by hand is reported by verify, not here.
      }
    }
    return total;
  }

  /** Bytes held in spare segment files. */
  spareBytes(): number {
    let total = 0;
    for (const spare of this.spares) {
      try {
        total += statSync(join(this.dir, spareName(spare))).size;
      } catch {
        // A spare removed by hand is only a spare less.
      }
    }
    return total;
  }

  /** Close every file; the active segment is first cut to its tail, so a reopen appends right after it. */
  close(): void {
    for (const fd of this.readFds.values()) closeSync(fd);
    this.readFds.clear();
    if (this.activeFd !== undefined) {
      try {
        if (fstatSync(this.activeFd).size > this.tailBytes) ftruncateSync(this.activeFd, this.tailBytes);
      } finally {
        closeSync(this.activeFd);
      }
    }
    this.activeFd = undefined;
  }
}

/** The buffers left after the first `skip` bytes of `payloads` (a short writev). */
function remainder(payloads: readonly Buffer[], skip: number): Buffer[] {
  const out: Buffer[] = [];
  let left = skip;
  for (const p of payloads) {
    if (left >= p.length) {
      left -= p.length;
      continue;
    }
    out.push(left > 0 ? p.subarray(left) : p);
    left = 0;
  }
  return out;
}
