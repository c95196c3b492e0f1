/**
 * Page-cache advice for layer files: posix_fadvise(2), which Node's fs does not offer, called in the
 * C library through koffi's foreign-function interface (libc.ts).
 *
 * Why: on ext4 with large page-cache folios (Linux 6.x), a 4 KiB write into a folio that readahead
 * made large walks every buffer head of the folio. A random 4 KiB overwrite of a file read through
 * with readahead costs 18-28 µs; of one whose cache holds 4 KiB folios, 2 µs (BENCHMARKS.md). A
 * writable layer takes small writes all the time, so its file is read with readahead off
 * (`random`): a read then caches exactly the pages it reads, in small folios. Frozen layers are
 * never written by the live path and keep readahead (`normal`), which their sequential reads want.
 * The advice belongs to the open file description, so it covers the worker threads' reads on the same
 * descriptor too.
 *
 * Advice is a hint: where the C library cannot be loaded (not a glibc Linux), none is given, and
 * nothing but the page cache's folio sizes differs.
 */
import { libcFunction } from './libc.js';
import { assert } from './errors.js';

export type FileAccess = 'normal' | 'random';

/** POSIX_FADV_NORMAL and POSIX_FADV_RANDOM on Linux. */
const adviceCodes: Record<FileAccess, number> = { normal: 0, random: 1 };

type Fadvise = (fd: number, offset: number, length: number, advice: number) => number;

const fadvise = libcFunction<Fadvise>('int posix_fadvise(int fd, int64_t offset, int64_t len, int advice)');

/** Whether this platform takes advice (the tests check it where it must: on Linux). */
export const fileAdviceAvailable = fadvise !== undefined;

/** Advise how the whole file behind `fd` will be read. */
export function adviseFileAccess(fd: number, access: FileAccess): void {
  if (fadvise === undefined) return;
  // posix_fadvise returns the error number itself; every error it can give here (EBADF, EINVAL on
  // a pipe or a bad code) is a bug in the caller.
  const errno = fadvise(fd, 0, 0, adviceCodes[access]);
  assert(errno === 0, `posix_fadvise(${fd}, ${access}) failed with errno ${errno}`);
}
