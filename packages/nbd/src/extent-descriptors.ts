/**
 * Turns a device's extents into the descriptors of one NBD_REPLY_TYPE_BLOCK_STATUS chunk, applying
 * the spec's rules (doc/proto.md, NBD_CMD_BLOCK_STATUS). Pure.
 * - Status: `base:allocation` → NBD_STATE_HOLE (1) | NBD_STATE_ZERO (2); `qemu:allocation-depth` →
 *   the depth (0 = unallocated in every layer, 1 = top layer, N = Nth layer down);
 *   `qemu:dirty-bitmap:*` → NBD_STATE_DIRTY (1) when changed since the bitmap's point.
 * - At least one descriptor; every length nonzero and at most 32 bits (cut to a 512-byte multiple).
 * - Never past the end of the export. Without REQ_ONE the last descriptor may reach past the request
 *   (the device saw it for free); with REQ_ONE there is exactly one, no longer than the request.
 * - Neighbours with equal status are merged (the spec's SHOULD), and at most 2^20 descriptors.
 * A device answer that breaks the seam (no extents, a non-positive length, a bad depth) throws, which
 * the caller reports as EIO.
 */
import type { Extent, ExtentContext } from '@cowstack/core';
import { maxBlockStatusDescriptors } from './limits.js';
import { NBD_STATE_DIRTY, NBD_STATE_HOLE, NBD_STATE_ZERO } from './protocol-constants.js';
import type { BlockDescriptor } from './reply-codec.js';

/** Largest descriptor length: 32 bits, rounded down to a multiple of 512. */
export const maxDescriptorBytes = 0xffffffff - 511;

export function extentStatus(extent: Extent, context: ExtentContext): number {
  if (context === 'base:allocation') return (extent.hole ? NBD_STATE_HOLE : 0) | (extent.zero ? NBD_STATE_ZERO : 0);
  if (context.startsWith('qemu:dirty-bitmap:')) return extent.dirty === true ? NBD_STATE_DIRTY : 0;
  if (!Number.isInteger(extent.depth) || extent.depth < 0 || extent.depth > 0xffffffff) throw new Error(`extent depth ${extent.depth} is not a 32-bit count`);
  return extent.depth;
}

export interface DescriptorRequest {
  readonly offset: number;
  readonly length: number;
  readonly sizeBytes: number;
  readonly reqOne: boolean;
  readonly context: ExtentContext;
}

export function extentsToDescriptors(extents: readonly Extent[], request: DescriptorRequest): BlockDescriptor[] {
  const { offset, length, sizeBytes, reqOne, context } = request;
  const limit = reqOne ? length : sizeBytes - offset; // bytes the reply may describe
  const out: { length: number; status: number }[] = [];
  let covered = 0;
  for (const extent of extents) {
    if (covered >= limit || covered >= length) break;
    if (!(extent.length > 0) || !Number.isSafeInteger(extent.length)) throw new Error(`device returned an extent of length ${extent.length}`);
    const status = extentStatus(extent, context);
    let left = Math.min(extent.length, limit - covered);
    while (left > 0) {
      const last = out[out.length - 1];
      if (last !== undefined && last.status === status && last.length < maxDescriptorBytes) {
        const step = Math.min(left, maxDescriptorBytes - last.length);
        last.length += step;
        left -= step;
        covered += step;
        continue;
      }
      if (reqOne && out.length === 1) return out;
      if (out.length >= maxBlockStatusDescriptors) return out;
      const step = Math.min(left, maxDescriptorBytes);
      out.push({ length: step, status });
      left -= step;
      covered += step;
      if (covered >= length) break;
    }
  }
  if (out.length === 0) throw new Error(`device returned no extents for offset ${offset} length ${length}`);
  return out;
}
