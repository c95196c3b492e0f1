/**
 * External base images: referenced read-only by absolute path, identified by size and a fingerprint
 * (CRC32C over `fingerprintSamples` samples of `fingerprintSampleBytes` spread over the image, plus
 * the size), so a changed or replaced image is refused on open instead of silently serving other
 * data. Sampling keeps opening a multi-terabyte base cheap; it cannot see every byte, so the base
 * must be treated as read-only (cowstack never writes it).
 */
import { closeSync, fstatSync, openSync, readSync } from 'node:fs';
import { resolve } from 'node:path';
import { crc32c } from '@node-rs/crc32';
import { StoreError } from './errors.js';
import type { ExternalSource } from './events.js';
import { fingerprintSampleBytes, fingerprintSamples } from './limits.js';

/** Size of a regular file or block device. */
function sizeOf(fd: number, path: string): number {
  const st = fstatSync(fd);
  if (st.isFile()) return st.size;
  if (st.isBlockDevice()) {
    // fstat reports 0 for block devices; find the end by reading backwards from a bound.
    const probe = Buffer.alloc(1);
    let lo = 0;
    let hi = 2 ** 50;
    while (lo < hi) {
      const mid = Math.floor((lo + hi + 1) / 2);
      if (readSync(fd, probe, 0, 1, mid - 1) === 1) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  }
  throw new StoreError('EINVAL', `${path} is neither a regular file nor a block device`);
}

export function fingerprintImage(pathArg: string): ExternalSource {
  const path = resolve(pathArg);
  let fd: number;
  try {
    fd = openSync(path, 'r');
  } catch (err) {
    throw new StoreError('ENOENT', `cannot open base image ${path}: ${(err as Error).message}`, { cause: err });
  }
  try {
    const sizeBytes = sizeOf(fd, path);
    const sample = Buffer.alloc(fingerprintSampleBytes);
    let crc = crc32c(Buffer.from(String(sizeBytes)));
    for (let i = 0; i < fingerprintSamples; i++) {
      const at = Math.floor(((sizeBytes - Math.min(sizeBytes, fingerprintSampleBytes)) * i) / Math.max(1, fingerprintSamples - 1));
      const n = readSync(fd, sample, 0, Math.min(fingerprintSampleBytes, sizeBytes), at);
      crc = crc32c(sample.subarray(0, n), crc);
    }
    return { path, sizeBytes, fingerprint: `crc32c:${(crc >>> 0).toString(16).padStart(8, '0')}` };
  } finally {
    closeSync(fd);
  }
}

/** Refuse to use an external base that is gone, resized or rewritten since it was recorded. */
export function verifyImage(source: ExternalSource): void {
  const now = fingerprintImage(source.path);
  if (now.sizeBytes !== source.sizeBytes) {
    throw new StoreError('ECHANGED', `base image ${source.path} changed size: ${source.sizeBytes} bytes when the store was created, ${now.sizeBytes} now`);
  }
  if (now.fingerprint !== source.fingerprint) {
    throw new StoreError('ECHANGED', `base image ${source.path} changed content: fingerprint ${source.fingerprint} when the store was created, ${now.fingerprint} now`);
  }
}
