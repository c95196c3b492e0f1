/**
 * The journal's lock, taken without opening LevelDB. While a process has the database open, LevelDB
 * holds a POSIX record lock (fcntl F_SETLK, a write lock on the whole file) on `journal/LOCK`.
 * Salvage of damaged LevelDB files (`recover --force`) moves and rewrites them before anything may
 * open the database (LevelDB could abort reading a damaged table), so it takes the same lock first:
 * a store another process is serving is refused, never rewritten under it. Node's fs has no fcntl;
 * it is called in the C library through koffi (libc.ts), as file-advice.ts does for posix_fadvise.
 *
 * POSIX record locks belong to the process: LevelDB opening the database in this process while the
 * lock is held succeeds, and closing any descriptor of the file drops it. Hold it only while no
 * LevelDB handle opens and closes the database.
 */
import { closeSync, constants, openSync } from 'node:fs';
import { join } from 'node:path';
import { libcErrno, libcFunction } from './libc.js';
import { StoreError } from './errors.js';

/** Linux's fcntl command and lock type (the same on x86-64 and arm64). */
const fSetLock = 6;
const writeLock = 1;
/** struct flock on 64-bit Linux: l_type, l_whence (shorts), l_start, l_len (off_t), l_pid, padding. */
const flockBytes = 32;
/** The errnos F_SETLK gives when another process holds a conflicting lock. */
const heldElsewhere = new Set([11 /* EAGAIN */, 13 /* EACCES */]);

type Fcntl = (fd: number, cmd: number, ...args: unknown[]) => number;

const fcntl = libcFunction<Fcntl>('int fcntl(int fd, int cmd, ...)');

/**
 * Take the lock of the journal in store `dir`; returns its release. Throws ELOCKED when another
 * process holds the store.
 */
export function lockJournal(dir: string): () => void {
  if (fcntl === undefined) throw new StoreError('EIO', `store ${dir}: cannot take the journal's lock here (no C library fcntl to call)`);
  const fd = openSync(join(dir, 'journal', 'LOCK'), constants.O_RDWR | constants.O_CREAT, 0o644);
  const flock = Buffer.alloc(flockBytes);
  flock.writeInt16LE(writeLock, 0); // whence SEEK_SET, start 0, length 0: the whole file
  if (fcntl(fd, fSetLock, 'void *', flock) !== 0) {
    const errno = libcErrno();
    closeSync(fd);
    if (heldElsewhere.has(errno)) throw new StoreError('ELOCKED', `store ${dir} is in use by another process (a cowstack serve, or another command, holds it)`);
    throw new StoreError('EIO', `store ${dir}: cannot take the journal's lock (errno ${errno})`);
  }
  return () => closeSync(fd);
}
