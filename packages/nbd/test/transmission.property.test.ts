/**
 * Model-based property: any sequence of WRITE (with or without FUA), WRITE_ZEROES (with or without
 * NO_HOLE), TRIM, FLUSH and READ (plain or DF), at arbitrary unaligned offsets, sent over a raw
 * socket, leaves the export equal to a flat Buffer model, and every READ returns the model's bytes:
 * with simple replies, and with structured replies reassembled from data and hole chunks. Reads are
 * also pipelined so their replies arrive interleaved.
 */
import { strict as assert } from 'node:assert';
import fc from 'fast-check';
import { test } from 'uvu';
import type { BlockDevice } from '@cowstack/core';
import * as P from '../src/protocol-constants.js';
import * as rc from '../src/reply-codec.js';
import { MemoryDevice } from './memory-device.js';
import { pattern, rawSession, readAnyReply, sendRequest, startServer, type RawClient } from './helpers.js';

const runs = Number(process.env.COWSTACK_PROPERTY_RUNS ?? 40);
const size = 256 * 1024;

type Command =
  | { op: 'write'; offset: number; length: number; seed: number; fua: boolean }
  | { op: 'zero'; offset: number; length: number; noHole: boolean }
  | { op: 'trim'; offset: number; length: number }
  | { op: 'flush' }
  | { op: 'read'; offset: number; length: number; df: boolean }
  | { op: 'reads'; ranges: { offset: number; length: number }[] };

const range = fc
  .tuple(fc.integer({ min: 0, max: size - 1 }), fc.integer({ min: 1, max: 40000 }))
  .map(([offset, length]) => ({ offset, length: Math.min(length, size - offset) }));

const command: fc.Arbitrary<Command> = fc.oneof(
  fc.tuple(range, fc.integer({ min: 1, max: 1e6 }), fc.boolean()).map(([r, seed, fua]) => ({ op: 'write' as const, ...r, seed, fua })),
  fc.tuple(range, fc.boolean()).map(([r, noHole]) => ({ op: 'zero' as const, ...r, noHole })),
  range.map((r) => ({ op: 'trim' as const, ...r })),
  fc.constant({ op: 'flush' as const }),
  fc.tuple(range, fc.boolean()).map(([r, df]) => ({ op: 'read' as const, ...r, df })),
  fc.array(range, { minLength: 2, maxLength: 6 }).map((ranges) => ({ op: 'reads' as const, ranges })),
);

/** Reads one simple READ reply of `length` bytes. */
async function readSimpleRead(c: RawClient, length: number): Promise<{ cookie: bigint; data: Buffer }> {
  const head = await c.read(16);
  assert.equal(head.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
  assert.equal(head.readUInt32BE(4), 0, 'no error');
  return { cookie: head.readBigUInt64BE(8), data: await c.read(length) };
}

/** Reassembles structured READ replies for several requests that may interleave. */
async function readStructured(c: RawClient, pending: Map<bigint, { offset: number; length: number }>): Promise<Map<bigint, Buffer>> {
  const out = new Map<bigint, Buffer>();
  const seen = new Map<bigint, Uint8Array>();
  for (const [cookie, r] of pending) {
    out.set(cookie, Buffer.alloc(r.length, 0xee));
    seen.set(cookie, new Uint8Array(r.length));
  }
  let done = 0;
  while (done < pending.size) {
    const reply = await readAnyReply(c);
    assert.equal(reply.simple, false, 'READ replies are structured');
    if (reply.simple) break;
    const { chunk } = reply;
    const request = pending.get(chunk.cookie);
    assert.ok(request, `unexpected cookie ${chunk.cookie}`);
    const buffer = out.get(chunk.cookie) as Buffer;
    const covered = seen.get(chunk.cookie) as Uint8Array;
    const mark = (offset: number, length: number) => {
      assert.ok(offset >= request.offset && offset + length <= request.offset + request.length, 'chunk inside the request');
      for (let i = offset - request.offset; i < offset - request.offset + length; i++) {
        assert.equal(covered[i], 0, 'chunks never overlap');
        covered[i] = 1;
      }
    };
    if (chunk.type === P.NBD_REPLY_TYPE_OFFSET_DATA) {
      const d = rc.decodeOffsetData(chunk.payload);
      mark(d.offset, d.data.length);
      d.data.copy(buffer, d.offset - request.offset);
    } else if (chunk.type === P.NBD_REPLY_TYPE_OFFSET_HOLE) {
      const h = rc.decodeOffsetHole(chunk.payload);
      mark(h.offset, h.length);
      buffer.fill(0, h.offset - request.offset, h.offset - request.offset + h.length);
    } else assert.fail(`unexpected chunk type ${chunk.type}`);
    if (chunk.flags & P.NBD_REPLY_FLAG_DONE) {
      assert.ok(covered.every((b) => b === 1), 'the reply covers the whole request');
      done++;
    }
  }
  return out;
}

for (const structured of [false, true]) {
  test(`any command sequence matches a flat model (${structured ? 'structured' : 'simple'} replies)`, async () => {
    let device = new MemoryDevice({ sizeBytes: size, blockSizeBytes: 4096 });
    const s = await startServer({ list: () => [], open: (): BlockDevice => device });
    try {
      await fc.assert(
        fc.asyncProperty(fc.array(command, { minLength: 1, maxLength: 25 }), async (commands) => {
          device = new MemoryDevice({ sizeBytes: size, blockSizeBytes: 4096 });
          const model = Buffer.alloc(size);
          const { client } = await rawSession(s.socketPath, { structured });
          let cookie = 1n;
          const simpleOk = async () => {
            const head = await client.read(16);
            assert.equal(head.readUInt32BE(0), P.NBD_SIMPLE_REPLY_MAGIC);
            assert.equal(head.readUInt32BE(4), 0);
          };
          try {
            for (const c of commands) {
              switch (c.op) {
                case 'write': {
                  const data = pattern(c.length, c.seed);
                  sendRequest(client, { type: P.NBD_CMD_WRITE, flags: c.fua ? P.NBD_CMD_FLAG_FUA : 0, cookie: cookie++, offset: c.offset }, data);
                  data.copy(model, c.offset);
                  await simpleOk();
                  break;
                }
                case 'zero':
                  sendRequest(client, { type: P.NBD_CMD_WRITE_ZEROES, flags: c.noHole ? P.NBD_CMD_FLAG_NO_HOLE : 0, cookie: cookie++, offset: c.offset, length: c.length });
                  model.fill(0, c.offset, c.offset + c.length);
                  await simpleOk();
                  break;
                case 'trim':
                  sendRequest(client, { type: P.NBD_CMD_TRIM, cookie: cookie++, offset: c.offset, length: c.length });
                  model.fill(0, c.offset, c.offset + c.length); // the model device zeroes what it trims
                  await simpleOk();
                  break;
                case 'flush':
                  sendRequest(client, { type: P.NBD_CMD_FLUSH, cookie: cookie++ });
                  await simpleOk();
                  break;
                case 'read':
                case 'reads': {
                  const ranges = c.op === 'read' ? [c] : c.ranges;
                  const pending = new Map<bigint, { offset: number; length: number }>();
                  for (const r of ranges) {
                    const flags = c.op === 'read' && c.df && structured ? P.NBD_CMD_FLAG_DF : 0;
                    pending.set(cookie, r);
                    sendRequest(client, { type: P.NBD_CMD_READ, flags, cookie: cookie++, offset: r.offset, length: r.length });
                  }
                  const results = structured ? await readStructured(client, pending) : new Map<bigint, Buffer>();
                  if (!structured) {
                    for (let i = 0; i < pending.size; i++) {
                      // simple replies carry no length: this model device answers in request order
                      const [k, r] = Array.from(pending)[i];
                      const reply = await readSimpleRead(client, r.length);
                      assert.equal(reply.cookie, k);
                      results.set(k, reply.data);
                    }
                  }
                  for (const [k, r] of pending) assert.ok((results.get(k) as Buffer).equals(model.subarray(r.offset, r.offset + r.length)), `read ${r.offset}+${r.length}`);
                  break;
                }
              }
            }
            assert.ok(device.data.equals(model), 'the export equals the model');
          } finally {
            client.destroy();
            await client.closed;
          }
        }),
        { numRuns: runs },
      );
    } finally {
      await s.server.close();
    }
  });
}

test.run();
