/**
 * The seal: a tiny file beside the payload log (`payloads/seal`) saying how far the journal got, so
 * records LevelDB loses without a word can be noticed. LevelDB recovers a damaged write-ahead log by
 * dropping the damaged records, and when they are the last ones nothing else shows they existed.
 *
 * After every committed batch the seal is rewritten in place (one 40-byte pwrite, page cache) with
 * the last committed seq, the last durable seq and the boot id of the running kernel; it is
 * fdatasynced together with the payload log whenever a batch is synced. On open:
 *   - LevelDB ends before the seal's durable seq: records that were made durable are gone: damage.
 *   - LevelDB ends before the seal's committed seq and the machine has not rebooted since the seal
 *     was written: a process crash keeps the page cache, so those records should be there: damage.
 *   - LevelDB ends before the committed seq after a reboot: unsynced records lost to an OS crash,
 *     which nothing promised to keep: not damage.
 * The seal is written only after LevelDB has the records it names (and their payloads are flushed,
 * for the durable seq), so it never claims too much. Its durable seq also stands in for LevelDB's
 * durable mark, which trails a synced batch by one batch (journal.ts, markedDurableSeq).
 */
import { closeSync, constants, fdatasync, openSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { crc32c } from '@node-rs/crc32';

const sealBytes = 40;
const magic = 0x4c414553; // "SEAL"
const version = 1;

export interface SealState {
  readonly committedSeq: number;
  readonly durableSeq: number;
  readonly bootId: string;
}

/** The running kernel's boot id (Linux); empty when unknown, which never counts as "same boot". */
export function currentBootId(): string {
  try {
    return readFileSync('/proc/sys/kernel/random/boot_id', 'utf8').trim().replace(/-/g, '').slice(0, 32);
  } catch {
    return '';
  }
}

export class Seal {
  private readonly fd: number;
  private readonly bootId = currentBootId();
  private readonly buffer = Buffer.alloc(sealBytes);

  constructor(payloadDir: string) {
    this.fd = openSync(join(payloadDir, 'seal'), constants.O_RDWR | constants.O_CREAT, 0o600);
  }

  /**
   * What the seal says: its state, `absent` for an empty file (no batch committed since it was
   * created), or `damaged` with the reason (short, wrong magic or version, failing its CRC).
   */
  read(): { kind: 'ok'; state: SealState } | { kind: 'absent' } | { kind: 'damaged'; reason: string } {
    const buf = Buffer.alloc(sealBytes);
    const got = readSync(this.fd, buf, 0, sealBytes, 0);
    if (got === 0) return { kind: 'absent' };
    if (got !== sealBytes) return { kind: 'damaged', reason: `${got} bytes long, not ${sealBytes}` };
    if (buf.readUInt32LE(0) !== magic) return { kind: 'damaged', reason: 'its magic number is wrong' };
    if (buf[4] !== version) return { kind: 'damaged', reason: `its version is ${buf[4]}, not ${version}` };
    if (crc32c(buf.subarray(0, sealBytes - 4)) !== buf.readUInt32LE(sealBytes - 4)) return { kind: 'damaged', reason: 'it fails its CRC32C' };
    const u64 = (at: number): number => buf.readUInt32LE(at) * 0x1_0000_0000 + buf.readUInt32LE(at + 4);
    return { kind: 'ok', state: { committedSeq: u64(8), durableSeq: u64(16), bootId: buf.subarray(24, 36).toString('hex') } };
  }

  /** Record how far the journal got (page cache; made durable by the next `sync`). */
  write(committedSeq: number, durableSeq: number): void {
    const buf = this.buffer;
    buf.writeUInt32LE(magic, 0);
    buf[4] = version;
    const u64 = (value: number, at: number): void => {
      buf.writeUInt32LE(Math.floor(value / 0x1_0000_0000), at);
      buf.writeUInt32LE(value >>> 0, at + 4);
    };
    u64(committedSeq, 8);
    u64(durableSeq, 16);
    buf.fill(0, 24, 36);
    buf.write(this.bootId.slice(0, 24), 24, 'hex');
    buf.writeUInt32LE(crc32c(buf.subarray(0, sealBytes - 4)), sealBytes - 4);
    writeSync(this.fd, buf, 0, sealBytes, 0);
  }

  sync(): Promise<void> {
    return new Promise((resolve, reject) => fdatasync(this.fd, (err) => (err ? reject(err) : resolve())));
  }

  /** Whether `state` was written during the current boot (the page cache has been kept since). */
  sameBoot(state: SealState): boolean {
    return this.bootId !== '' && state.bootId === this.bootId.slice(0, 24);
  }

  close(): void {
    closeSync(this.fd);
  }
}
