/**
 * Pure parts: frame codecs (unit tests and fast-check round trips), request validation, metadata
 * context queries, extent descriptors, the errno table and the byte queue.
 */
import { strict as assert } from 'node:assert';
import fc from 'fast-check';
import { test } from 'uvu';
import { BlockDeviceError } from '@cowstack/core';
import { ByteQueue } from '../src/byte-queue.js';
import { nbdErrnoFor } from '../src/errno-table.js';
import { extentsToDescriptors, maxDescriptorBytes } from '../src/extent-descriptors.js';
import { transmissionFlagsFor } from '../src/handshake.js';
import { listMetaContexts, selectMetaContexts } from '../src/meta-contexts.js';
import * as oc from '../src/option-codec.js';
import * as P from '../src/protocol-constants.js';
import * as rc from '../src/reply-codec.js';
import { decodeRequestHeader, encodeRequestHeader } from '../src/request-codec.js';
import { validateRequest, type ValidationContext } from '../src/request-validation.js';
import { MemoryDevice } from './memory-device.js';

const runs = Number(process.env.COWSTACK_PROPERTY_RUNS ?? 200);
const u16 = fc.integer({ min: 0, max: 0xffff });
const u32 = fc.integer({ min: 0, max: 0xffffffff });
const offsetArb = fc.oneof(fc.integer({ min: 0, max: 0xffffffff }), fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }));
const cookieArb = fc.bigInt({ min: 0n, max: (1n << 64n) - 1n });
const nameArb = fc.string({ maxLength: 40, unit: 'grapheme' }).filter((s) => !s.includes('\0'));

test('greeting: 18 bytes, NBDMAGIC IHAVEOPT, fixed newstyle + no zeroes', () => {
  const g = oc.encodeGreeting(P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  assert.equal(g.length, 18);
  assert.equal(g.subarray(0, 16).toString('latin1'), 'NBDMAGICIHAVEOPT');
  assert.equal(g.readUInt16BE(16), 3);
  const d = oc.decodeGreeting(g);
  assert.equal(d.nbdMagic, P.NBD_MAGIC);
  assert.equal(d.secondMagic, P.NBD_OPTS_MAGIC);
});

test('option header round trip and bad magic detection', () => {
  fc.assert(
    fc.property(u32, fc.uint8Array({ maxLength: 64 }), (option, data) => {
      const frame = oc.encodeOption(option, Buffer.from(data));
      const h = oc.decodeOptionHeader(frame);
      assert.deepEqual(h, { magicOk: true, option, length: data.length });
      assert.deepEqual(frame.subarray(16), Buffer.from(data));
    }),
    { numRuns: runs },
  );
  const bad = oc.encodeOption(1);
  bad[0] ^= 1;
  assert.equal(oc.decodeOptionHeader(bad).magicOk, false);
});

test('INFO/GO request round trip', () => {
  fc.assert(
    fc.property(nameArb, fc.array(u16, { maxLength: 8 }), (name, infos) => {
      const decoded = oc.decodeInfoRequest(oc.encodeInfoRequest({ name, infos }));
      if (!decoded.ok) throw new Error(decoded.reason);
      assert.deepEqual(decoded.value, { name, infos });
    }),
    { numRuns: runs },
  );
});

test('INFO/GO request: malformed payloads are rejected with a reason', () => {
  const good = oc.encodeInfoRequest({ name: 'disk', infos: [3] });
  for (const bad of [Buffer.alloc(5), good.subarray(0, good.length - 1), Buffer.concat([good, Buffer.alloc(1)])]) {
    const d = oc.decodeInfoRequest(bad);
    assert.equal(d.ok, false);
  }
  const huge = Buffer.from(good);
  huge.writeUInt32BE(1000, 0); // name longer than the data
  assert.equal(oc.decodeInfoRequest(huge).ok, false);
  const nul = oc.encodeInfoRequest({ name: 'a\0b', infos: [] });
  assert.equal(oc.decodeInfoRequest(nul).ok, false);
  const badUtf8 = oc.encodeInfoRequest({ name: 'ab', infos: [] });
  badUtf8[4] = 0xff;
  assert.equal(oc.decodeInfoRequest(badUtf8).ok, false);
  const long = oc.encodeInfoRequest({ name: 'x'.repeat(4097), infos: [] });
  assert.equal(oc.decodeInfoRequest(long).ok, false);
});

test('META_CONTEXT request round trip and malformed payloads', () => {
  fc.assert(
    fc.property(nameArb, fc.array(nameArb, { maxLength: 6 }), (name, queries) => {
      const decoded = oc.decodeMetaContextRequest(oc.encodeMetaContextRequest({ name, queries }));
      if (!decoded.ok) throw new Error(decoded.reason);
      assert.deepEqual(decoded.value, { name, queries });
    }),
    { numRuns: runs },
  );
  const good = oc.encodeMetaContextRequest({ name: 'disk', queries: ['base:allocation'] });
  assert.equal(oc.decodeMetaContextRequest(good.subarray(0, good.length - 1)).ok, false);
  assert.equal(oc.decodeMetaContextRequest(Buffer.concat([good, Buffer.alloc(2)])).ok, false);
  assert.equal(oc.decodeMetaContextRequest(Buffer.alloc(7)).ok, false);
  const tooMany = Buffer.from(good);
  tooMany.writeUInt32BE(2, 8); // claims two queries, has one
  assert.equal(oc.decodeMetaContextRequest(tooMany).ok, false);
});

test('option replies round trip (ACK, SERVER, INFO types, META_CONTEXT, errors with messages)', () => {
  fc.assert(
    fc.property(u32, u32, fc.uint8Array({ maxLength: 64 }), (option, reply, payload) => {
      const frame = oc.encodeOptionReply(option, reply, Buffer.from(payload));
      const d = oc.decodeOptionReply(Buffer.concat([frame, Buffer.from([1, 2, 3])]));
      assert.ok(d);
      assert.equal(d.bytes, frame.length);
      assert.equal(d.reply.magicOk, true);
      assert.equal(d.reply.option, option);
      assert.equal(d.reply.reply, reply);
      assert.deepEqual(d.reply.payload, Buffer.from(payload));
      assert.equal(oc.decodeOptionReply(frame.subarray(0, frame.length - 1)) === undefined, payload.length > 0 || true);
    }),
    { numRuns: runs },
  );
  fc.assert(
    fc.property(nameArb, nameArb, (name, description) => {
      assert.deepEqual(oc.decodeServerPayload(oc.encodeServerPayload(name, description)), { name, description });
      assert.deepEqual(oc.decodeMetaContext(oc.encodeMetaContext(7, name)), { id: 7, name });
      assert.deepEqual(oc.decodeInfo(oc.encodeInfoString(P.NBD_INFO_NAME, name)), { type: P.NBD_INFO_NAME, text: name });
    }),
    { numRuns: runs },
  );
  fc.assert(
    fc.property(fc.integer({ min: 0, max: Number.MAX_SAFE_INTEGER }), u16, (size, flags) => {
      assert.deepEqual(oc.decodeInfo(oc.encodeInfoExport(size, flags)), { type: P.NBD_INFO_EXPORT, sizeBytes: size, transmissionFlags: flags });
    }),
    { numRuns: runs },
  );
  assert.deepEqual(oc.decodeInfo(oc.encodeInfoBlockSize({ minimumBytes: 1, preferredBytes: 4096, maximumBytes: 1 << 25 })), {
    type: P.NBD_INFO_BLOCK_SIZE,
    minimumBytes: 1,
    preferredBytes: 4096,
    maximumBytes: 1 << 25,
  });
  const err = oc.decodeOptionReply(oc.encodeOptionError(P.NBD_OPT_STARTTLS, P.NBD_REP_ERR_POLICY, 'no TLS'));
  assert.equal(err?.reply.payload.toString(), 'no TLS');
  assert.ok(P.isErrorReply(P.NBD_REP_ERR_POLICY) && !P.isErrorReply(P.NBD_REP_ACK));
});

test('strings the server sends are cut to 4096 bytes at a character boundary, NULs dropped', () => {
  const long = 'é'.repeat(3000); // 6000 bytes
  const bytes = oc.encodeString(long);
  assert.ok(bytes.length <= 4096);
  assert.equal(bytes.length % 2, 0);
  assert.equal(oc.decodeString(bytes), 'é'.repeat(bytes.length / 2));
  assert.equal(oc.encodeString('a\0b').toString(), 'ab');
});

test('EXPORT_NAME reply: 134 bytes, or 10 with NO_ZEROES', () => {
  const full = oc.encodeExportNameReply(1 << 30, 0x1234, false);
  assert.equal(full.length, 134);
  assert.equal(full.readBigUInt64BE(0), 1n << 30n);
  assert.equal(full.readUInt16BE(8), 0x1234);
  assert.ok(full.subarray(10).every((b) => b === 0));
  assert.equal(oc.encodeExportNameReply(5, 1, true).length, 10);
});

test('request header round trip; offsets past 2^53 decode past every export', () => {
  fc.assert(
    fc.property(u16, u16, cookieArb, offsetArb, u32, (flags, type, cookie, offset, length) => {
      const bytes = encodeRequestHeader({ flags, type, cookie, offset, length });
      assert.equal(bytes.length, 28);
      assert.deepEqual(decodeRequestHeader(bytes), { magic: P.NBD_REQUEST_MAGIC, flags, type, cookie, offset, length });
    }),
    { numRuns: runs },
  );
  const huge = encodeRequestHeader({ flags: 0, type: 0, cookie: 1n, offset: 0, length: 1 });
  huge.writeUInt32BE(0xffffffff, 16);
  huge.writeUInt32BE(0xffffffff, 20);
  assert.ok(decodeRequestHeader(huge).offset >= 2 ** 53);
});

test('reply chunks round trip', () => {
  fc.assert(
    fc.property(cookieArb, u32, (cookie, errno) => {
      assert.deepEqual(rc.decodeSimpleReplyHeader(rc.encodeSimpleReply(cookie, errno)), { magic: P.NBD_SIMPLE_REPLY_MAGIC, errno, cookie });
    }),
    { numRuns: runs },
  );
  fc.assert(
    fc.property(cookieArb, fc.integer({ min: 0, max: 1 }), offsetArb, fc.uint8Array({ minLength: 1, maxLength: 64 }), (cookie, flags, offset, data) => {
      const frame = Buffer.concat([rc.encodeOffsetDataHeader(flags, cookie, offset, data.length), Buffer.from(data)]);
      const d = rc.decodeChunk(frame);
      assert.ok(d);
      assert.equal(d.bytes, frame.length);
      assert.equal(d.chunk.type, P.NBD_REPLY_TYPE_OFFSET_DATA);
      assert.equal(d.chunk.flags, flags);
      assert.equal(d.chunk.cookie, cookie);
      assert.deepEqual(rc.decodeOffsetData(d.chunk.payload), { offset, data: Buffer.from(data) });
    }),
    { numRuns: runs },
  );
  fc.assert(
    fc.property(cookieArb, offsetArb, fc.integer({ min: 1, max: 0xffffffff }), (cookie, offset, length) => {
      const d = rc.decodeChunk(rc.encodeOffsetHole(P.NBD_REPLY_FLAG_DONE, cookie, offset, length));
      assert.ok(d);
      assert.equal(d.chunk.type, P.NBD_REPLY_TYPE_OFFSET_HOLE);
      assert.deepEqual(rc.decodeOffsetHole(d.chunk.payload), { offset, length });
    }),
    { numRuns: runs },
  );
  fc.assert(
    fc.property(cookieArb, u32, fc.array(fc.record({ length: fc.integer({ min: 1, max: 0xffffffff }), status: u32 }, { noNullPrototype: true }), { minLength: 1, maxLength: 20 }), (cookie, id, descriptors) => {
      const d = rc.decodeChunk(rc.encodeBlockStatusChunk(P.NBD_REPLY_FLAG_DONE, cookie, id, descriptors));
      assert.ok(d);
      assert.equal(d.chunk.type, P.NBD_REPLY_TYPE_BLOCK_STATUS);
      assert.deepEqual(rc.decodeBlockStatus(d.chunk.payload), { contextId: id, descriptors });
    }),
    { numRuns: runs },
  );
  fc.assert(
    fc.property(cookieArb, fc.integer({ min: 1, max: 0xffffffff }), nameArb, (cookie, errno, message) => {
      const d = rc.decodeChunk(rc.encodeErrorChunk(P.NBD_REPLY_FLAG_DONE, cookie, errno, message));
      assert.ok(d);
      assert.equal(d.chunk.type, P.NBD_REPLY_TYPE_ERROR);
      assert.deepEqual(rc.decodeErrorChunk(d.chunk.payload), { errno, message });
    }),
    { numRuns: runs },
  );
  const none = rc.decodeChunk(rc.encodeNoneChunk(9n));
  assert.equal(none?.chunk.flags, P.NBD_REPLY_FLAG_DONE);
  assert.equal(none?.chunk.payload.length, 0);
});

// ---------------------------------------------------------------------------------------------

const ctx: ValidationContext = {
  sizeBytes: 1 << 20,
  readOnly: false,
  transmissionFlags: transmissionFlagsFor(new MemoryDevice({ sizeBytes: 1 << 20 }), true),
  structuredReplies: true,
  metaContextCount: 1,
  maxPayloadBytes: 1 << 16,
};

function check(type: number, flags: number, offset: number, length: number, over: Partial<ValidationContext> = {}): number {
  return validateRequest({ magic: P.NBD_REQUEST_MAGIC, type, flags, cookie: 1n, offset, length }, { ...ctx, ...over })?.errno ?? 0;
}

test('request validation: the errno for each kind of bad request', () => {
  const { NBD_EINVAL: EINVAL, NBD_ENOSPC: ENOSPC, NBD_EPERM: EPERM } = P;
  const size = ctx.sizeBytes;
  assert.equal(check(P.NBD_CMD_READ, 0, 0, 512), 0);
  assert.equal(check(P.NBD_CMD_READ, 0, size - 1, 1), 0);
  assert.equal(check(99, 0, 0, 512), EINVAL, 'unknown command');
  assert.equal(check(P.NBD_CMD_READ, 0, size - 1, 2), EINVAL, 'read past the end');
  assert.equal(check(P.NBD_CMD_TRIM, 0, size, 1), EINVAL, 'trim past the end');
  assert.equal(check(P.NBD_CMD_BLOCK_STATUS, 0, size, 1), EINVAL, 'block status past the end');
  assert.equal(check(P.NBD_CMD_CACHE, 0, size + 5, 1), EINVAL, 'cache past the end');
  assert.equal(check(P.NBD_CMD_WRITE, 0, size - 1, 2), ENOSPC, 'write past the end');
  assert.equal(check(P.NBD_CMD_WRITE_ZEROES, 0, size, 4096), ENOSPC, 'write zeroes past the end');
  assert.equal(check(P.NBD_CMD_WRITE, 0, 2 ** 60, 1), ENOSPC, 'huge offset');
  for (const type of [P.NBD_CMD_READ, P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_CACHE, P.NBD_CMD_BLOCK_STATUS]) {
    assert.equal(check(type, 0, 0, 0), EINVAL, `length 0 on ${P.commandName(type)}`);
  }
  assert.equal(check(P.NBD_CMD_FLUSH, 0, 0, 0), 0);
  assert.equal(check(P.NBD_CMD_FLUSH, 0, 1, 0), EINVAL, 'flush with offset');
  assert.equal(check(P.NBD_CMD_READ, 1 << 6, 0, 512), EINVAL, 'unknown flag');
  assert.equal(check(P.NBD_CMD_READ, P.NBD_CMD_FLAG_NO_HOLE, 0, 512), EINVAL, 'NO_HOLE on read');
  assert.equal(check(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_FAST_ZERO, 0, 512), EINVAL, 'FAST_ZERO on write');
  assert.equal(check(P.NBD_CMD_WRITE, P.NBD_CMD_FLAG_DF, 0, 512), EINVAL, 'DF on write');
  assert.equal(check(P.NBD_CMD_READ, P.NBD_CMD_FLAG_REQ_ONE, 0, 512), EINVAL, 'REQ_ONE on read');
  assert.equal(check(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 0, 512), 0, 'DF on read with structured replies');
  assert.equal(check(P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF, 0, 512, { transmissionFlags: ctx.transmissionFlags & ~P.NBD_FLAG_SEND_DF }), EINVAL, 'DF not advertised');
  assert.equal(check(P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_FAST_ZERO | P.NBD_CMD_FLAG_NO_HOLE | P.NBD_CMD_FLAG_FUA, 0, 512), 0);
  assert.equal(check(P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_FAST_ZERO, 0, 512, { transmissionFlags: ctx.transmissionFlags & ~P.NBD_FLAG_SEND_FAST_ZERO }), EINVAL, 'FAST_ZERO not advertised');
  assert.equal(check(P.NBD_CMD_READ, P.NBD_CMD_FLAG_FUA, 0, 512, { transmissionFlags: ctx.transmissionFlags & ~P.NBD_FLAG_SEND_FUA }), EINVAL, 'FUA not advertised');
  assert.equal(check(P.NBD_CMD_READ, P.NBD_CMD_FLAG_FUA, 0, 512), 0, 'FUA accepted on any command when advertised');
  for (const type of [P.NBD_CMD_WRITE, P.NBD_CMD_TRIM, P.NBD_CMD_WRITE_ZEROES]) {
    assert.equal(check(type, 0, 0, 512, { readOnly: true }), EPERM, `${P.commandName(type)} on read-only`);
    assert.equal(check(type, 0, size, 512, { readOnly: true }), EPERM, 'read-only is checked before the range');
  }
  assert.equal(check(P.NBD_CMD_READ, 0, 0, 512, { readOnly: true }), 0);
  assert.equal(check(P.NBD_CMD_READ, 0, 0, (1 << 16) + 1), EINVAL, 'read over the max payload');
  assert.equal(check(P.NBD_CMD_WRITE, 0, 0, (1 << 16) + 1), EINVAL, 'write over the max payload');
  assert.equal(check(P.NBD_CMD_TRIM, 0, 0, (1 << 16) + 1), 0, 'trim may exceed the max payload');
  assert.equal(check(P.NBD_CMD_BLOCK_STATUS, 0, 0, 512, { metaContextCount: 0 }), EINVAL, 'block status without contexts');
  assert.equal(check(P.NBD_CMD_BLOCK_STATUS, 0, 0, 512, { structuredReplies: false }), EINVAL, 'block status without structured replies');
});

test('transmission flags: what is advertised for each kind of device', () => {
  const rw = transmissionFlagsFor(new MemoryDevice({ sizeBytes: 4096, canFastZero: true, canMultiConn: true }), true);
  const want = P.NBD_FLAG_HAS_FLAGS | P.NBD_FLAG_SEND_FLUSH | P.NBD_FLAG_SEND_FUA | P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FAST_ZERO | P.NBD_FLAG_SEND_DF | P.NBD_FLAG_CAN_MULTI_CONN | P.NBD_FLAG_SEND_CACHE;
  assert.equal(rw, want);
  const simple = transmissionFlagsFor(new MemoryDevice({ sizeBytes: 4096, canFastZero: false, canMultiConn: false }), false);
  assert.equal(simple & (P.NBD_FLAG_SEND_DF | P.NBD_FLAG_SEND_FAST_ZERO | P.NBD_FLAG_CAN_MULTI_CONN), 0);
  const ro = transmissionFlagsFor(new MemoryDevice({ sizeBytes: 4096, readOnly: true }), true);
  assert.ok(ro & P.NBD_FLAG_READ_ONLY);
  assert.equal(ro & (P.NBD_FLAG_SEND_TRIM | P.NBD_FLAG_SEND_WRITE_ZEROES | P.NBD_FLAG_SEND_FUA), 0);
  for (const f of [rw, simple, ro]) assert.equal(f & (P.NBD_FLAG_ROTATIONAL | P.NBD_FLAG_SEND_RESIZE), 0);
});

test('metadata context queries: LIST wildcards, SET exact names only', () => {
  const both = ['base:allocation', 'qemu:allocation-depth'] as const;
  assert.deepEqual(listMetaContexts(both, []), [...both]);
  assert.deepEqual(listMetaContexts(['base:allocation'], []), ['base:allocation']);
  assert.deepEqual(listMetaContexts(both, ['base:']), ['base:allocation']);
  assert.deepEqual(listMetaContexts(both, ['qemu:']), ['qemu:allocation-depth']);
  assert.deepEqual(listMetaContexts(both, ['qemu:allocation-depth', 'base:allocation', 'base:allocation']), [...both]);
  assert.deepEqual(listMetaContexts(both, ['x-foo:', 'base:nothing', 'nocolon', ':']), []);
  assert.deepEqual(listMetaContexts(['base:allocation'], ['qemu:']), []);
  assert.deepEqual(selectMetaContexts(both, ['base:', 'qemu:']), []);
  assert.deepEqual(selectMetaContexts(both, ['qemu:allocation-depth']), ['qemu:allocation-depth']);
  assert.deepEqual(selectMetaContexts(['base:allocation'], ['qemu:allocation-depth', 'base:allocation']), ['base:allocation']);
  assert.deepEqual(selectMetaContexts(both, []), []);
});

test('metadata context queries: dirty bitmaps are listed, prefix-queried, and accepted by exact name', () => {
  const offered = ['qemu:dirty-bitmap:golden', 'base:allocation', 'qemu:allocation-depth'] as const;
  const accepts = (name: string): boolean => name.startsWith('qemu:dirty-bitmap:seq:');
  assert.deepEqual(listMetaContexts(offered, []), ['base:allocation', 'qemu:allocation-depth', 'qemu:dirty-bitmap:golden']);
  assert.deepEqual(listMetaContexts(offered, ['qemu:dirty-bitmap:']), ['qemu:dirty-bitmap:golden']);
  assert.deepEqual(listMetaContexts(offered, ['qemu:']), ['qemu:allocation-depth', 'qemu:dirty-bitmap:golden']);
  assert.deepEqual(listMetaContexts(offered, ['qemu:dirty-bitmap:seq:12'], accepts), ['qemu:dirty-bitmap:seq:12']);
  assert.deepEqual(listMetaContexts(offered, ['qemu:dirty-bitmap:other'], accepts), [], 'not offered and not accepted');
  assert.deepEqual(selectMetaContexts(offered, ['qemu:dirty-bitmap:seq:7', 'base:allocation'], accepts), ['base:allocation', 'qemu:dirty-bitmap:seq:7']);
  assert.deepEqual(selectMetaContexts(offered, ['qemu:dirty-bitmap:'], accepts), [], 'SET takes exact names only');
  const dirty = extentsToDescriptors(
    [
      { length: 4096, hole: false, zero: false, depth: 0, dirty: false },
      { length: 8192, hole: false, zero: false, depth: 0, dirty: true },
    ],
    { offset: 0, length: 12288, sizeBytes: 1 << 20, reqOne: false, context: 'qemu:dirty-bitmap:golden' },
  );
  assert.deepEqual(dirty, [
    { length: 4096, status: 0 },
    { length: 8192, status: 1 },
  ]);
});

test('extent descriptors: status, merging, REQ_ONE, clamping to the export', () => {
  const e = (length: number, hole: boolean, depth = hole ? 0 : 1) => ({ length, hole, zero: hole, depth });
  const req = { offset: 0, length: 8192, sizeBytes: 1 << 20, reqOne: false, context: 'base:allocation' as const };
  assert.deepEqual(extentsToDescriptors([e(4096, false), e(4096, true)], req), [
    { length: 4096, status: 0 },
    { length: 4096, status: 3 },
  ]);
  assert.deepEqual(extentsToDescriptors([e(1000, true), e(3096, true), e(4096, false)], req), [
    { length: 4096, status: 3 },
    { length: 4096, status: 0 },
  ], 'equal neighbours merge');
  assert.deepEqual(extentsToDescriptors([e(4096, false), e(4096, true)], { ...req, reqOne: true }), [{ length: 4096, status: 0 }]);
  assert.deepEqual(extentsToDescriptors([e(1 << 20, true)], { ...req, reqOne: true }), [{ length: 8192, status: 3 }], 'REQ_ONE never exceeds the request');
  assert.deepEqual(extentsToDescriptors([e(1 << 21, true)], req), [{ length: 1 << 20, status: 3 }], 'never past the end of the export');
  assert.deepEqual(extentsToDescriptors([e(4096, false), e(4096, true)], { ...req, context: 'qemu:allocation-depth' }), [
    { length: 4096, status: 1 },
    { length: 4096, status: 0 },
  ]);
  assert.deepEqual(extentsToDescriptors([e(4096, false), e(4096, false, 7)], { ...req, context: 'qemu:allocation-depth' }), [
    { length: 4096, status: 1 },
    { length: 4096, status: 7 },
  ]);
  const big = extentsToDescriptors([e(2 ** 33, true)], { ...req, length: 0xffffffff, sizeBytes: 2 ** 34 });
  assert.ok(big.every((d) => d.length <= maxDescriptorBytes && d.length > 0));
  assert.throws(() => extentsToDescriptors([], req));
  assert.throws(() => extentsToDescriptors([e(0, true)], req));
  assert.throws(() => extentsToDescriptors([e(4096, false, -1)], { ...req, context: 'qemu:allocation-depth' }));
});

test('extent descriptors property: cover a prefix of the export from the offset, lengths valid', () => {
  fc.assert(
    fc.property(
      fc.array(fc.record({ length: fc.integer({ min: 1, max: 10000 }), hole: fc.boolean() }, { noNullPrototype: true }), { minLength: 1, maxLength: 20 }),
      fc.integer({ min: 1, max: 50000 }),
      fc.boolean(),
      (raw, length, reqOne) => {
        const extents = raw.map((r) => ({ length: r.length, hole: r.hole, zero: r.hole, depth: r.hole ? 0 : 1 }));
        const sizeBytes = 60000;
        const out = extentsToDescriptors(extents, { offset: 0, length, sizeBytes, reqOne, context: 'base:allocation' });
        const total = out.reduce((n, d) => n + d.length, 0);
        assert.ok(out.length >= 1);
        assert.ok(total <= sizeBytes);
        if (reqOne) assert.ok(out.length === 1 && total <= length);
        for (let i = 1; i < out.length; i++) assert.notEqual(out[i].status, out[i - 1].status);
        // the status at every covered byte matches the extents
        let at = 0;
        for (const d of out) {
          let probe = 0;
          let covered = 0;
          for (const x of extents) {
            if (at < covered + x.length) {
              probe = x.hole ? 3 : 0;
              break;
            }
            covered += x.length;
          }
          assert.equal(d.status, probe);
          at += d.length;
        }
      },
    ),
    { numRuns: runs },
  );
});

test('errno table: device codes, request-dependent ENOTSUP/EOVERFLOW, unknown errors are EIO', () => {
  const e = (code: ConstructorParameters<typeof BlockDeviceError>[0]) => new BlockDeviceError(code, 'x');
  assert.equal(nbdErrnoFor(e('EIO'), P.NBD_CMD_READ, 0), 5);
  assert.equal(nbdErrnoFor(e('EPERM'), P.NBD_CMD_WRITE, 0), 1);
  assert.equal(nbdErrnoFor(e('EROFS'), P.NBD_CMD_WRITE, 0), 1);
  assert.equal(nbdErrnoFor(e('ENOSPC'), P.NBD_CMD_WRITE, 0), 28);
  assert.equal(nbdErrnoFor(e('EINVAL'), P.NBD_CMD_WRITE, 0), 22);
  assert.equal(nbdErrnoFor(e('ESHUTDOWN'), P.NBD_CMD_WRITE, 0), 108);
  assert.equal(nbdErrnoFor(e('ENOTSUP'), P.NBD_CMD_WRITE_ZEROES, P.NBD_CMD_FLAG_FAST_ZERO), 95);
  assert.equal(nbdErrnoFor(e('ENOTSUP'), P.NBD_CMD_WRITE_ZEROES, 0), 22);
  assert.equal(nbdErrnoFor(e('ENOTSUP'), P.NBD_CMD_TRIM, 0), 22);
  assert.equal(nbdErrnoFor(e('EOVERFLOW'), P.NBD_CMD_READ, P.NBD_CMD_FLAG_DF), 75);
  assert.equal(nbdErrnoFor(e('EOVERFLOW'), P.NBD_CMD_TRIM, 0), 75);
  assert.equal(nbdErrnoFor(e('EOVERFLOW'), P.NBD_CMD_READ, 0), 22);
  assert.equal(nbdErrnoFor(Object.assign(new Error('disk full'), { code: 'EDQUOT' }), P.NBD_CMD_WRITE, 0), 28);
  assert.equal(nbdErrnoFor(Object.assign(new Error('x'), { code: 'ENOENT' }), P.NBD_CMD_WRITE, 0), 5);
  assert.equal(nbdErrnoFor(new TypeError('bug'), P.NBD_CMD_READ, 0), 5);
  assert.equal(nbdErrnoFor('string', P.NBD_CMD_READ, 0), 5);
});

test('byte queue: views inside a chunk, copies across chunks, skip and peek', () => {
  const q = new ByteQueue();
  const a = Buffer.from([1, 2, 3, 4]);
  q.push(a);
  q.push(Buffer.from([5, 6]));
  q.push(Buffer.alloc(0));
  assert.equal(q.length, 6);
  assert.equal(q.peekUint32(1), 0x02030405);
  const first = q.take(2);
  assert.equal(first.buffer, a.buffer, 'a frame inside one chunk is a view');
  assert.deepEqual([...q.take(3)], [3, 4, 5]);
  assert.equal(q.skip(10), 1);
  assert.equal(q.length, 0);
  assert.throws(() => q.take(1));
  fc.assert(
    fc.property(fc.array(fc.uint8Array({ maxLength: 20 }), { maxLength: 10 }), fc.array(fc.integer({ min: 0, max: 15 }), { maxLength: 10 }), (chunks, takes) => {
      const queue = new ByteQueue();
      for (const c of chunks) queue.push(Buffer.from(c));
      const all = Buffer.concat(chunks.map((c) => Buffer.from(c)));
      let at = 0;
      for (const n of takes) {
        const k = Math.min(n, queue.length);
        if (n % 3 === 0) assert.equal(queue.skip(k), k);
        else assert.deepEqual(queue.take(k), all.subarray(at, at + k));
        at += k;
        assert.equal(queue.length, all.length - at);
      }
    }),
    { numRuns: runs },
  );
});

test.run();
