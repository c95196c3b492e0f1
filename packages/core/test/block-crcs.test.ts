/**
 * Block CRCs and the payload CRC combined from them: for any block size and any payload of whole
 * blocks, the combination equals the CRC32C of the bytes, which is what replay checks a payload
 * against.
 */
import { crc32c } from '@node-rs/crc32';
import fc from 'fast-check';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { blockCrcs, payloadCrcOf } from '../src/block-crcs.js';

const blockSizes = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536];

test('the payload CRC combined from block CRCs equals the CRC32C of the payload', () => {
  fc.assert(
    fc.property(fc.constantFrom(...blockSizes), fc.integer({ min: 1, max: 40 }), fc.integer(), (blockSizeBytes, count, seed) => {
      const payload = Buffer.allocUnsafe(blockSizeBytes * count);
      let x = seed >>> 0 || 1;
      for (let i = 0; i < payload.length; i++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        payload[i] = x & 0xff;
      }
      const crcs = blockCrcs(payload, blockSizeBytes);
      assert.is(crcs.length, 4 * count);
      for (let b = 0; b < count; b++) assert.is(crcs.readUInt32LE(4 * b), crc32c(payload.subarray(b * blockSizeBytes, (b + 1) * blockSizeBytes)));
      assert.is(payloadCrcOf(crcs, blockSizeBytes), crc32c(payload));
    }),
    { numRuns: 300 },
  );
});

test('uniform payloads (zeroes, ones) and one block combine to the payload CRC too', () => {
  for (const fill of [0x00, 0xff, 0x5a]) {
    for (const count of [1, 2, 256]) {
      const payload = Buffer.alloc(4096 * count, fill);
      assert.is(payloadCrcOf(blockCrcs(payload, 4096), 4096), crc32c(payload), `fill ${fill}, ${count} blocks`);
    }
  }
});

test('a payload that is not whole blocks, and empty CRCs, are refused', () => {
  assert.throws(() => blockCrcs(Buffer.alloc(4097), 4096), /not whole blocks/);
  assert.throws(() => payloadCrcOf(Buffer.alloc(0), 4096), /0 bytes of block CRCs/);
});

test.run();
