/**
 * One positioned read of a whole range from a file by path, for the cold paths that read a file
 * once (dm-cow import, payload repair); the served read path keeps its descriptors in LayerFiles.
 */
import { closeSync, openSync, readSync } from 'node:fs';

/** `length` bytes at `position` of the file at `path`; bytes past its end read as zeroes. */
export function readAt(path: string, position: number, length: number): Buffer {
  const fd = openSync(path, 'r');
  try {
    const out = Buffer.alloc(length);
    let done = 0;
    while (done < length) {
      const n = readSync(fd, out, done, length - done, position + done);
      if (n === 0) break;
      done += n;
    }
    return out;
  } finally {
    closeSync(fd);
  }
}
