/**
 * The payload log: record payloads (write data) in append-only segment files beside the LevelDB
 * database (`<journal>/payloads/<first seq>.seg`), so LevelDB holds only small frames.
 *
 * Why: a 4 KiB or 1 MiB value in LevelDB is copied into its WAL, its memtable, an L0 table and every
 * compaction after that. Appending the bytes once to a sequential file and keeping (segment, offset)
 * in the frame costs one write. Measured in packages/journal/README.md.
 *
 * Ordering: a batch's payloads are written (page cache) before its frames are committed to LevelDB,
 * so a committed frame never points past what was written. For a synced batch, every segment written
 * since the last sync is fdatasynced first, then the frames are written with LevelDB's sync: a durable
 * frame always has durable payloads. After an OS crash, an unsynced frame may survive while its
 * payload bytes did not: replay reports that as a torn tail (see Journal.cutTail), never as silent
 * data. After a process crash (SIGKILL) the page cache keeps everything.
 *
 * Retention deletes whole segments whose records are all at or below the drop point.
 */
import { closeSync, constants, fdatasync, fstatSync, mkdirSync, openSync, readdirSync, readSync, writevSync } from 'node:fs';
import { unlink } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { payloadSegmentBytes } from './limits.js';

const fdatasyncAsync = promisify(fdatasync);

function segmentName(firstSeq: number): string {
  return `${String(firstSeq).padStart(16, '0')}.seg`;
}

export interface PayloadPlacement {
  readonly segment: number;
  readonly offset: number;
}

export class PayloadLog {
  readonly dir: string;
  /** Segment ids (the first seq written into each), ascending. */
  private segments: number[];
  private activeFd: number | undefined;
  private tailBytes = 0;
  private readonly dirty = new Set<number>();
  private readonly readFds = new Map<number, number>();
  /** The last flush started by `sync` (settled, never rejecting). */
  private flushing: Promise<void> = Promise.resolve();

  constructor(journalDir: string) {
    this.dir = join(journalDir, 'payloads');
    mkdirSync(this.dir, { recursive: true, mode: 0o700 });
    this.segments = readdirSync(this.dir)
      .map((name) => /^(\d{16})\.seg$/.exec(name))
      .filter((m): m is RegExpExecArray => m !== null)
      .map((m) => Number(m[1]))
      .sort((a, b) => a - b);
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
   * Append a batch's payloads contiguously (one writev) and return where they start. A batch never
   * spans segments: a new segment, named by `firstSeq`, starts when the active one would exceed
   * payloadSegmentBytes. The writev runs on the calling thread: measured against the threadpool in
   * BENCHMARKS.md.
   */
  append(firstSeq: number, payloads: readonly Buffer[], totalBytes: number): PayloadPlacement {
    if (this.activeFd === undefined || (this.tailBytes > 0 && this.tailBytes + totalBytes > payloadSegmentBytes)) {
      if (this.activeFd !== undefined) {
        // The full segment is only read (and fdatasynced) from now on, through a read descriptor.
        this.dirty.add(this.active!);
        closeSync(this.activeFd);
      }
      this.activeFd = openSync(join(this.dir, segmentName(firstSeq)), constants.O_RDWR | constants.O_CREAT | constants.O_EXCL, 0o600);
      this.segments.push(firstSeq);
      this.tailBytes = 0;
    }
    const segment = this.active!;
    const offset = this.tailBytes;
    try {
      let written = 0;
      while (written < totalBytes) {
        written += writevSync(this.activeFd, written === 0 ? (payloads as Buffer[]) : remainder(payloads, written), offset + written);
      }
    } catch (err) {
      // Whatever was written is garbage no frame points at; continue after it.
      this.tailBytes = fstatSync(this.activeFd).size;
      throw err;
    }
    this.tailBytes += totalBytes;
    this.dirty.add(segment);
    return { segment, offset };
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
    const previous = this.flushing;
    const flushing = (async () => {
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

  /**
   * Delete every segment all of whose payloads belong to records at or below `throughSeq`. The files
   * are unlinked in the threadpool: dropping a segment's cached pages takes the kernel long enough
   * (a 256 MiB segment: tens of milliseconds) to stall the event loop. Returns how many went.
   */
  async dropThrough(throughSeq: number): Promise<number> {
    const doomed: string[] = [];
    while (this.segments.length > 1 && this.segments[1] - 1 <= throughSeq) {
      const segment = this.segments.shift()!;
      const fd = this.readFds.get(segment);
      if (fd !== undefined) {
        closeSync(fd);
        this.readFds.delete(segment);
      }
      this.dirty.delete(segment);
      doomed.push(join(this.dir, segmentName(segment)));
    }
    await Promise.all(doomed.map((path) => unlink(path)));
    return doomed.length;
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

  /** Bytes held in segment files. */
  diskBytes(): number {
    let total = 0;
    for (const segment of this.segments) {
      try {
        total += fstatSync(this.readFd(segment)).size;
      } catch {
        // A segment removed by hand is reported by verify, not here.
      }
    }
    return total;
  }

  close(): void {
    for (const fd of this.readFds.values()) closeSync(fd);
    this.readFds.clear();
    if (this.activeFd !== undefined) closeSync(this.activeFd);
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
