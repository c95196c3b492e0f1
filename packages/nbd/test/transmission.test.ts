/**
 * The transmission phase over raw sockets: concurrency and out-of-order replies, FLUSH ordering, the
 * in-flight bound, simple and structured read replies (holes, DF), block status, DISC, bad magic,
 * oversized writes, device failures, and close() with requests in flight.
 */
import { strict as assert } from 'node:assert';
import { test } from 'uvu';
import { BlockDeviceError } from '@cowstack/core';
import * as P from '../src/protocol-constants.js';
import * as rc from '../src/reply-codec.js';
import { MapProvider, MemoryDevice } from './memory-device.js';
import { RawClient, gate, pattern, rawSession, readAnyReply, readSimpleReply, sendRequest, sleep, startServer } from './helpers.js';

function single(device: MemoryDevice) {
  return MapProvider.of({ disk: device }, 'disk');
}

test('requests run concurrently and replies come back in completion order', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  device.data.set(pattern(1 << 20, 5));
  device.allocated.fill(1);
  const n = 8;
  // read i resolves only after read i+1 has resolved: completion order is the reverse of request order
  const gates = Array.from({ length: n }, () => gate());
  device.hook = async (op, offset) => {
    if (op !== 'read') return;
    const i = offset / 4096;
    if (i < n - 1) await gates[i + 1].promise;
    setTimeout(() => gates[i].open(), 5);
  };
  const s = await startServer(single(device));
  try {
    const { client } = await rawSession(s.socketPath);
    for (let i = 0; i < n; i++) sendRequest(client, { type: P.NBD_CMD_READ, cookie: BigInt(100 + i), offset: i * 4096, length: 4096 });
    const order: bigint[] = [];
    for (let i = 0; i < n; i++) {
      const reply = await readSimpleReply(client, 4096);
      assert.equal(reply.errno, 0);
      const k = Number(reply.cookie) - 100;
      assert.ok(reply.data.equals(device.data.subarray(k * 4096, (k + 1) * 4096)), `data of read ${k}`);
      order.push(reply.cookie);
    }
    assert.deepEqual(order, Array.from({ length: n }, (_, i) => BigInt(100 + n - 1 - i)));
    client.destroy();
  } finally {
    await s.server.close();
  }
});

test('FLUSH waits for writes started before it, not for writes after it', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  const first = gate();
  const third = gate();
  device.hook = async (op, offset) => {
    if (op === 'write' && offset === 0) await first.promise;
    if (op === 'zero' && offset === 8192) await third.promise;
  };
  const s = await startServer(single(device));
  try {
    const { client } = await rawSession(s.socketPath);
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 1n, offset: 0 }, pattern(4096));
    sendRequest(client, { type: P.NBD_CMD_FLUSH, cookie: 2n });
    sendRequest(client, { type: P.NBD_CMD_WRITE_ZEROES, cookie: 3n, offset: 8192, length: 4096 });
    await sleep(100);
    assert.equal(device.log.filter((r) => r.op === 'flush').length, 0, 'flush not started while the earlier write runs');
    assert.equal(client.available, 0, 'nothing answered yet');
    first.open();
    const a = await readSimpleReply(client);
    const b = await readSimpleReply(client);
    assert.deepEqual([a.cookie, b.cookie], [1n, 2n], 'the write, then the flush, while the later zero is still blocked');
    const writeEnd = device.log.findIndex((r) => r.op === 'write' && r.phase === 'end');
    const flushStart = device.log.findIndex((r) => r.op === 'flush' && r.phase === 'start');
    assert.ok(writeEnd >= 0 && flushStart > writeEnd);
    third.open();
    assert.equal((await readSimpleReply(client)).cookie, 3n);
    assert.equal(device.flushes, 1);
    client.destroy();
  } finally {
    await s.server.close();
  }
});

test('in-flight requests are bounded per connection; parsing resumes when one completes', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  const release = gate();
  device.hook = async (op) => {
    if (op === 'read') await release.promise;
  };
  const s = await startServer(single(device), { maxInflightRequestsPerConnection: 4 });
  try {
    const { client } = await rawSession(s.socketPath);
    for (let i = 0; i < 20; i++) sendRequest(client, { type: P.NBD_CMD_READ, cookie: BigInt(i), offset: i * 512, length: 512 });
    await sleep(100);
    assert.equal(device.log.filter((r) => r.op === 'read' && r.phase === 'start').length, 4, 'only 4 reads reached the device');
    release.open();
    const cookies = new Set<bigint>();
    for (let i = 0; i < 20; i++) cookies.add((await readSimpleReply(client, 512)).cookie);
    assert.equal(cookies.size, 20);
    client.destroy();
  } finally {
    await s.server.close();
  }
});

test('simple replies fill holes with zeroes; structured replies send holes and data chunks; DF sends one chunk', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  device.data.fill(0x5a, 4096, 8192);
  device.allocated[1] = 1;
  const s = await startServer(single(device));
  try {
    const simple = await rawSession(s.socketPath);
    sendRequest(simple.client, { type: P.NBD_CMD_READ, cookie: 1n, offset: 100, length: 12000 });
    const r = await readSimpleReply(simple.client, 12000);
    assert.ok(r.data.equals(device.data.subarray(100, 12100)));
    simple.client.destroy();

    const structured = await rawSession(s.socketPath, { structured: true });
    sendRequest(structured.client, { type: P.NBD_CMD_READ, cookie: 2n, offset: 100, length: 12000 });
    const chunks: rc.Chunk[] = [];
    for (;;) {
      const reply = await readAnyReply(structured.client);
      assert.equal(reply.simple, false);
      if (reply.simple) break;
      chunks.push(reply.chunk);
      if (reply.chunk.flags & P.NBD_REPLY_FLAG_DONE) break;
    }
    assert.deepEqual(
      chunks.map((c) => [c.type, c.cookie]),
      [
        [P.NBD_REPLY_TYPE_OFFSET_HOLE, 2n],
        [P.NBD_REPLY_TYPE_OFFSET_DATA, 2n],
        [P.NBD_REPLY_TYPE_OFFSET_HOLE, 2n],
      ],
    );
    assert.deepEqual(rc.decodeOffsetHole(chunks[0].payload), { offset: 100, length: 3996 });
    const data = rc.decodeOffsetData(chunks[1].payload);
    assert.equal(data.offset, 4096);
    assert.ok(data.data.equals(Buffer.alloc(4096, 0x5a)));
    assert.deepEqual(rc.decodeOffsetHole(chunks[2].payload), { offset: 8192, length: 12100 - 8192 });
    assert.equal(chunks.filter((c) => c.flags & P.NBD_REPLY_FLAG_DONE).length, 1);

    sendRequest(structured.client, { type: P.NBD_CMD_READ, flags: P.NBD_CMD_FLAG_DF, cookie: 3n, offset: 100, length: 12000 });
    const df = await readAnyReply(structured.client);
    assert.ok(!df.simple && df.chunk.type === P.NBD_REPLY_TYPE_OFFSET_DATA && df.chunk.flags & P.NBD_REPLY_FLAG_DONE);
    assert.ok(!df.simple && rc.decodeOffsetData(df.chunk.payload).data.equals(device.data.subarray(100, 12100)));

    sendRequest(structured.client, { type: P.NBD_CMD_READ, cookie: 4n, offset: 65536, length: 8192 });
    const hole = await readAnyReply(structured.client);
    assert.ok(!hole.simple && hole.chunk.type === P.NBD_REPLY_TYPE_OFFSET_HOLE && hole.chunk.flags & P.NBD_REPLY_FLAG_DONE, 'an all-hole read is one hole chunk');

    sendRequest(structured.client, { type: P.NBD_CMD_READ, cookie: 5n, offset: (1 << 20) - 10, length: 20 });
    const err = await readAnyReply(structured.client);
    assert.ok(!err.simple && err.chunk.type === P.NBD_REPLY_TYPE_ERROR, 'errors on READ are structured too');
    assert.ok(!err.simple && rc.decodeErrorChunk(err.chunk.payload).errno === P.NBD_EINVAL);
    structured.client.destroy();
  } finally {
    await s.server.close();
  }
});

test('block status: one chunk per context, REQ_ONE, depth values', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  device.allocated.fill(1, 2, 4); // bytes 8192..16383 allocated
  const s = await startServer(single(device));
  try {
    const { client } = await rawSession(s.socketPath, { structured: true, contexts: ['base:allocation', 'qemu:allocation-depth'] });
    sendRequest(client, { type: P.NBD_CMD_BLOCK_STATUS, cookie: 9n, offset: 0, length: 32768 });
    const a = await readAnyReply(client);
    const b = await readAnyReply(client);
    assert.ok(!a.simple && !b.simple);
    assert.equal(a.chunk.flags & P.NBD_REPLY_FLAG_DONE, 0);
    assert.equal(b.chunk.flags & P.NBD_REPLY_FLAG_DONE, P.NBD_REPLY_FLAG_DONE);
    const base = rc.decodeBlockStatus(a.chunk.payload);
    const depth = rc.decodeBlockStatus(b.chunk.payload);
    assert.deepEqual(base.descriptors.slice(0, 2), [
      { length: 8192, status: 3 },
      { length: 8192, status: 0 },
    ]);
    assert.deepEqual(depth.descriptors.slice(0, 2), [
      { length: 8192, status: 0 },
      { length: 8192, status: 1 },
    ]);
    assert.notEqual(base.contextId, depth.contextId);
    sendRequest(client, { type: P.NBD_CMD_BLOCK_STATUS, flags: P.NBD_CMD_FLAG_REQ_ONE, cookie: 10n, offset: 100, length: 1000 });
    for (let i = 0; i < 2; i++) {
      const r = await readAnyReply(client);
      assert.ok(!r.simple);
      assert.deepEqual(rc.decodeBlockStatus(r.chunk.payload).descriptors.length, 1);
      assert.ok(rc.decodeBlockStatus(r.chunk.payload).descriptors[0].length <= 1000);
    }
    client.destroy();
  } finally {
    await s.server.close();
  }
});

test('DISC: requests in flight are answered, then the server closes', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  device.hook = (op) => (op === 'write' ? sleep(100) : undefined);
  const s = await startServer(single(device));
  try {
    const { client } = await rawSession(s.socketPath);
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 1n, offset: 0 }, pattern(8192));
    sendRequest(client, { type: P.NBD_CMD_DISC, cookie: 2n });
    const reply = await readSimpleReply(client);
    assert.equal(reply.cookie, 1n);
    assert.equal(await client.waitEnd(), true);
    assert.ok(device.data.subarray(0, 8192).equals(pattern(8192)), 'the write landed');
  } finally {
    await s.server.close();
  }
});

test('bad request magic: in-flight requests answered, then a clean disconnect', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  device.hook = (op) => (op === 'read' ? sleep(50) : undefined);
  const s = await startServer(single(device));
  try {
    const { client } = await rawSession(s.socketPath);
    sendRequest(client, { type: P.NBD_CMD_READ, cookie: 1n, offset: 0, length: 512 });
    client.write(Buffer.alloc(28, 0xee));
    assert.equal((await readSimpleReply(client, 512)).cookie, 1n);
    assert.equal(await client.waitEnd(), true);
    assert.ok(s.logs.some((l) => /bad request magic/.test(l)));
  } finally {
    await s.server.close();
  }
});

test('WRITE over maxPayloadBytes: EINVAL and the payload skipped; far over: disconnect', async () => {
  const device = new MemoryDevice({ sizeBytes: 8 << 20 });
  const s = await startServer(single(device), { maxPayloadBytes: 1 << 20 });
  try {
    const { client } = await rawSession(s.socketPath);
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 1n, offset: 0 }, pattern((1 << 20) + 1));
    assert.equal((await readSimpleReply(client)).errno, P.NBD_EINVAL);
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 2n, offset: 0 }, pattern(1 << 20));
    assert.deepEqual(await readSimpleReply(client), { errno: 0, cookie: 2n, data: Buffer.alloc(0) });
    assert.equal(device.log.filter((r) => r.op === 'write' && r.phase === 'start').length, 1, 'the oversized write never reached the device');
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 3n, offset: 0, length: 64 << 20 });
    assert.equal((await readSimpleReply(client)).errno, P.NBD_ENOSPC, 'the range is checked before the payload size');
    assert.equal(await client.waitEnd(), true, 'a payload beyond the discard cap ends the connection');
    // a write past the end is answered only after its payload is consumed, and the stream stays in step
    const again = await rawSession(s.socketPath);
    sendRequest(again.client, { type: P.NBD_CMD_WRITE, cookie: 4n, offset: (8 << 20) - 100 }, pattern(4096));
    sendRequest(again.client, { type: P.NBD_CMD_READ, cookie: 5n, offset: 0, length: 16 });
    assert.equal((await readSimpleReply(again.client)).errno, P.NBD_ENOSPC);
    assert.equal((await readSimpleReply(again.client, 16)).cookie, 5n);
    again.client.destroy();
  } finally {
    await s.server.close();
  }
});

test('device failures map through the errno table and never end the connection', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  device.hook = (op, offset) => {
    if (offset === 4096) throw new BlockDeviceError('ENOSPC', 'the store is full');
    if (offset === 8192) throw new TypeError('a bug in the engine');
    if (offset === 12288 && op === 'read') throw new BlockDeviceError('EIO', 'bad sector');
    return undefined;
  };
  const logs: string[] = [];
  const s = await startServer(single(device), { log: (m) => logs.push(m) });
  const sync = new MemoryDevice({ sizeBytes: 1 << 20 });
  sync.read = () => {
    throw new BlockDeviceError('EPERM', 'thrown synchronously');
  };
  const short = new MemoryDevice({ sizeBytes: 1 << 20 });
  short.read = async (_offset, length) => Buffer.alloc(length - 1);
  const plain = new MemoryDevice({ sizeBytes: 1 << 20 });
  plain.write = (() => undefined) as never; // breaks the seam: no promise
  const s2 = await startServer(MapProvider.of({ sync, short, plain }), {
    log: () => {
      throw new Error('a broken logger');
    },
  });
  try {
    const { client } = await rawSession(s.socketPath);
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 1n, offset: 4096 }, pattern(512));
    assert.equal((await readSimpleReply(client)).errno, P.NBD_ENOSPC);
    sendRequest(client, { type: P.NBD_CMD_TRIM, cookie: 2n, offset: 8192, length: 512 });
    assert.equal((await readSimpleReply(client)).errno, P.NBD_EIO);
    assert.ok(logs.some((l) => /a bug in the engine/.test(l)), 'unexpected errors are logged');
    sendRequest(client, { type: P.NBD_CMD_READ, cookie: 3n, offset: 12288, length: 512 });
    assert.equal((await readSimpleReply(client)).errno, P.NBD_EIO);
    sendRequest(client, { type: P.NBD_CMD_READ, cookie: 4n, offset: 0, length: 512 });
    assert.equal((await readSimpleReply(client, 512)).errno, 0, 'the connection goes on');
    client.destroy();

    const a = await rawSession(s2.socketPath, { name: 'sync' });
    sendRequest(a.client, { type: P.NBD_CMD_READ, cookie: 5n, offset: 0, length: 512 });
    assert.equal((await readSimpleReply(a.client)).errno, P.NBD_EPERM);
    a.client.destroy();
    const p = await rawSession(s2.socketPath, { name: 'plain' });
    sendRequest(p.client, { type: P.NBD_CMD_WRITE, cookie: 7n, offset: 0 }, pattern(512));
    sendRequest(p.client, { type: P.NBD_CMD_READ, cookie: 8n, offset: 0, length: 512 });
    assert.equal((await readSimpleReply(p.client)).errno, 0, 'a device answering without a promise still gets a reply');
    assert.equal((await readSimpleReply(p.client, 512)).errno, 0);
    p.client.destroy();
    const b = await rawSession(s2.socketPath, { name: 'short', structured: true });
    sendRequest(b.client, { type: P.NBD_CMD_READ, cookie: 6n, offset: 0, length: 512 });
    const r = await readAnyReply(b.client);
    assert.ok(!r.simple && rc.decodeErrorChunk(r.chunk.payload).errno === P.NBD_EIO, 'a read of the wrong length is EIO');
    b.client.destroy();
  } finally {
    await s.server.close();
    await s2.server.close();
  }
});

test('close(): requests in flight finish, new ones get ESHUTDOWN, then clients are disconnected', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  const slow = gate();
  device.hook = async (op) => {
    if (op === 'write') await slow.promise;
  };
  const requests: string[] = [];
  const s = await startServer(single(device), { onRequest: (cmd) => requests.push(cmd) });
  const { client } = await rawSession(s.socketPath);
  const idle = await rawSession(s.socketPath);
  sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 1n, offset: 0 }, pattern(4096));
  await sleep(50);
  let closed = false;
  const closing = s.server.close().then(() => (closed = true));
  assert.equal(await idle.client.waitEnd(), true, 'an idle client is disconnected at once');
  sendRequest(client, { type: P.NBD_CMD_READ, cookie: 2n, offset: 0, length: 512 });
  assert.equal((await readSimpleReply(client)).errno, P.NBD_ESHUTDOWN);
  assert.equal(closed, false, 'close() waits for the write in flight');
  slow.open();
  assert.deepEqual(await readSimpleReply(client), { errno: 0, cookie: 1n, data: Buffer.alloc(0) });
  assert.equal(await client.waitEnd(), true);
  client.destroy();
  await closing;
  assert.equal(s.server.connections, 0);
  assert.deepEqual(requests.sort(), ['READ', 'WRITE']);
});

test('a client that half-closes after pipelining still gets every reply, then the server ends', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  device.hook = (op) => (op === 'read' ? sleep(30) : undefined);
  const s = await startServer(single(device), { maxInflightRequestsPerConnection: 2 });
  try {
    const { client } = await rawSession(s.socketPath);
    for (let i = 0; i < 6; i++) sendRequest(client, { type: P.NBD_CMD_READ, cookie: BigInt(i), offset: i * 512, length: 512 });
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 99n, offset: 0, length: 4096 }, pattern(100)); // payload cut short
    client.socket.end();
    const cookies: bigint[] = [];
    for (let i = 0; i < 6; i++) cookies.push((await readSimpleReply(client, 512)).cookie);
    assert.deepEqual(cookies.sort(), [0n, 1n, 2n, 3n, 4n, 5n]);
    assert.equal(await client.waitEnd(), true);
    assert.equal(client.available, 0, 'the cut-short write is abandoned, not answered');
  } finally {
    await s.server.close();
  }
});

test('a client gone with a request in flight: the request finishes and the connection leaves no timer behind', async () => {
  // Regression: ending a connection whose socket was already destroyed (here by EPIPE when a reply
  // met the closed client) armed a 10 s reply-stall timer, which kept a stopping `cowstack serve`
  // alive for 10 s.
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  const slowRead = gate();
  const slowWrite = gate();
  device.hook = async (op) => {
    if (op === 'read') await slowRead.promise;
    if (op === 'write') await slowWrite.promise;
  };
  const timers = (): number => process.getActiveResourcesInfo().filter((r) => r === 'Timeout').length;
  const s = await startServer(single(device));
  try {
    const { client } = await rawSession(s.socketPath);
    sendRequest(client, { type: P.NBD_CMD_WRITE, cookie: 1n, offset: 0 }, pattern(4096));
    sendRequest(client, { type: P.NBD_CMD_READ, cookie: 2n, offset: 0, length: 65536 });
    await sleep(50);
    const before = timers();
    client.destroy();
    await sleep(50);
    slowRead.open(); // its reply meets the closed socket
    await sleep(50);
    slowWrite.open();
    await sleep(50);
    assert.equal(s.server.connections, 0);
    assert.equal(timers(), before, 'no timer is left armed for the closed connection');
    assert.ok(device.data.subarray(0, 4096).equals(pattern(4096)), 'the write in flight still completed');
  } finally {
    await s.server.close();
  }
});

test('a read result goes back to the device (recycle) once its reply has been sent, never before', async () => {
  const device = new MemoryDevice({ sizeBytes: 1 << 20 });
  await device.write(0, pattern(1 << 20, 9), { fua: false });
  const given: unknown[] = [];
  const recycled: unknown[] = [];
  const read = device.read.bind(device);
  device.read = async (offset, length) => {
    const result = await read(offset, length);
    given.push(result);
    return result;
  };
  (device as MemoryDevice & { recycle(result: unknown): void }).recycle = (result) => recycled.push(result);
  const s = await startServer(single(device));
  try {
    const { client } = await rawSession(s.socketPath);
    sendRequest(client, { type: P.NBD_CMD_READ, cookie: 1n, offset: 4096, length: 65536 });
    const reply = await readSimpleReply(client, 65536);
    assert.ok(reply.data.equals(pattern(1 << 20, 9).subarray(4096, 4096 + 65536)));
    await sleep(20);
    assert.equal(recycled.length, 1);
    assert.ok(recycled[0] === given[0], 'the very result the device returned');
    client.destroy();
  } finally {
    await s.server.close();
  }
});

test('maxConnections: connections over the limit are closed at once', async () => {
  const s = await startServer(single(new MemoryDevice({ sizeBytes: 4096 })), { maxConnections: 2 });
  try {
    const a = await rawSession(s.socketPath);
    const b = await rawSession(s.socketPath);
    const c = await RawClient.connect(s.socketPath);
    assert.equal(await c.waitEnd(), true);
    assert.equal(c.available, 0, 'not even a greeting');
    assert.equal(s.server.connections, 2);
    a.client.destroy();
    await a.client.closed;
    await sleep(20);
    const d = await rawSession(s.socketPath);
    sendRequest(d.client, { type: P.NBD_CMD_READ, cookie: 1n, offset: 0, length: 16 });
    assert.equal((await readSimpleReply(d.client, 16)).errno, 0);
    b.client.destroy();
    d.client.destroy();
  } finally {
    await s.server.close();
  }
});

test.run();
