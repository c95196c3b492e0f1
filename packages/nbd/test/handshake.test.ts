/**
 * The handshake over raw sockets: every option the server speaks, every kind of client misbehaviour
 * and limit, and that a connection in transmission keeps working correctly while other clients
 * misbehave next to it.
 */
import { strict as assert } from 'node:assert';
import { statSync, writeFileSync } from 'node:fs';
import { test } from 'uvu';
import * as oc from '../src/option-codec.js';
import * as P from '../src/protocol-constants.js';
import { NbdServer } from '../src/index.js';
import { MapProvider, MemoryDevice } from './memory-device.js';
import { RawClient, option, pattern, rawSession, readGreeting, readSimpleReply, sendRequest, sleep, startServer, type Started } from './helpers.js';

function provider() {
  return MapProvider.of(
    {
      disk: new MemoryDevice({ sizeBytes: 1 << 20, blockSizeBytes: 4096 }),
      small: new MemoryDevice({ sizeBytes: 65536, blockSizeBytes: 512, extentContexts: ['base:allocation'] }),
      ro: new MemoryDevice({ sizeBytes: 1 << 20, readOnly: true }),
    },
    'disk',
    { disk: 'the main disk', ro: 'read only' },
  );
}

async function connected(s: Started, flags = P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES): Promise<RawClient> {
  const c = await RawClient.connect(s.socketPath);
  const g = await readGreeting(c);
  assert.equal(g.nbdMagic, P.NBD_MAGIC);
  assert.equal(g.secondMagic, P.NBD_OPTS_MAGIC);
  assert.equal(g.handshakeFlags, P.NBD_FLAG_FIXED_NEWSTYLE | P.NBD_FLAG_NO_ZEROES);
  c.write(oc.encodeClientFlags(flags));
  return c;
}

test('a client without FIXED_NEWSTYLE (oldstyle or plain newstyle) is disconnected', async () => {
  const s = await startServer(provider());
  try {
    const c = await connected(s, 0);
    c.write(oc.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk'))); // what a plain newstyle client sends
    assert.equal(await c.waitEnd(), true, 'server closed');
    assert.equal(c.available, 0, 'no export data was sent');
    // an oldstyle client sends nothing and waits for size + flags: it gets only the newstyle greeting
    const old = await RawClient.connect(s.socketPath);
    const greeting = await old.read(18);
    assert.equal(greeting.readBigUInt64BE(8), P.NBD_OPTS_MAGIC, 'never the oldstyle cliserv magic');
    old.destroy();
  } finally {
    await s.server.close();
  }
});

test('unknown client flags: disconnect', async () => {
  const s = await startServer(provider());
  try {
    const c = await connected(s, P.NBD_FLAG_C_FIXED_NEWSTYLE | (1 << 2));
    assert.equal(await c.waitEnd(), true);
  } finally {
    await s.server.close();
  }
});

test('unknown option: NBD_REP_ERR_UNSUP, its data skipped, the next option works', async () => {
  const s = await startServer(provider());
  try {
    const c = await connected(s);
    for (const opt of [42, P.NBD_OPT_PEEK_EXPORT, P.NBD_OPT_EXTENDED_HEADERS]) {
      const [r] = await option(c, opt, Buffer.from('some data the server must skip'));
      assert.equal(r.option, opt);
      assert.equal(r.reply, P.NBD_REP_ERR_UNSUP);
    }
    const list = await option(c, P.NBD_OPT_LIST);
    assert.deepEqual(
      list.filter((r) => r.reply === P.NBD_REP_SERVER).map((r) => oc.decodeServerPayload(r.payload)),
      [
        { name: 'disk', description: 'the main disk' },
        { name: 'small', description: '' },
        { name: 'ro', description: 'read only' },
      ],
    );
    assert.equal(list[list.length - 1].reply, P.NBD_REP_ACK);
    assert.equal((await option(c, P.NBD_OPT_LIST, Buffer.from('x')))[0].reply, P.NBD_REP_ERR_INVALID, 'LIST with data');
    c.destroy();
  } finally {
    await s.server.close();
  }
});

test('STARTTLS without tls configured: NBD_REP_ERR_POLICY saying TLS is not enabled; with data: ERR_INVALID', async () => {
  const s = await startServer(provider());
  try {
    const c = await connected(s);
    const [r] = await option(c, P.NBD_OPT_STARTTLS);
    assert.equal(r.reply, P.NBD_REP_ERR_POLICY);
    assert.match(r.payload.toString(), /TLS is not enabled/);
    assert.equal((await option(c, P.NBD_OPT_STARTTLS, Buffer.from('x')))[0].reply, P.NBD_REP_ERR_INVALID);
    const go = await option(c, P.NBD_OPT_GO, oc.encodeInfoRequest({ name: '', infos: [] }));
    assert.equal(go[go.length - 1].reply, P.NBD_REP_ACK, 'the session continues without TLS');
    c.destroy();
  } finally {
    await s.server.close();
  }
});

test('ABORT: ACK, then the server closes', async () => {
  const s = await startServer(provider());
  try {
    const c = await connected(s);
    const [r] = await option(c, P.NBD_OPT_ABORT, Buffer.from('ignored'));
    assert.equal(r.reply, P.NBD_REP_ACK);
    assert.equal(await c.waitEnd(), true);
  } finally {
    await s.server.close();
  }
});

test('too many options: disconnect after maxOptionsPerHandshake', async () => {
  const s = await startServer(provider(), { maxOptionsPerHandshake: 5 });
  try {
    const c = await connected(s);
    for (let i = 0; i < 5; i++) assert.equal((await option(c, 99))[0].reply, P.NBD_REP_ERR_UNSUP);
    c.write(oc.encodeOption(99));
    assert.equal(await c.waitEnd(), true);
    assert.equal(c.available, 0, 'no reply to the option over the limit');
    assert.ok(s.logs.some((l) => /more than 5 options/.test(l)));
  } finally {
    await s.server.close();
  }
});

test('LIST grants extra options per listed export', async () => {
  const s = await startServer(provider(), { maxOptionsPerHandshake: 2 });
  try {
    const c = await connected(s);
    await option(c, P.NBD_OPT_LIST); // 3 exports listed: budget 2 + 3 × 4 = 14, LIST was the first
    for (let i = 0; i < 13; i++) assert.equal((await option(c, P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'ro', infos: [] })))[1].reply, P.NBD_REP_ACK);
    c.write(oc.encodeOption(99));
    assert.equal(await c.waitEnd(), true);
  } finally {
    await s.server.close();
  }
});

test('oversized option: ERR_TOO_BIG and skipped when small enough, otherwise disconnect', async () => {
  const s = await startServer(provider(), { maxOptionBytes: 8192 });
  try {
    const c = await connected(s);
    const [r] = await option(c, P.NBD_OPT_INFO, Buffer.alloc(9000, 1));
    assert.equal(r.reply, P.NBD_REP_ERR_TOO_BIG);
    const go = await option(c, P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'disk', infos: [] }));
    assert.equal(go[go.length - 1].reply, P.NBD_REP_ACK, 'stream still in step');
    c.write(oc.encodeOption(P.NBD_OPT_INFO, Buffer.alloc(2 * 1024 * 1024)));
    assert.equal(await c.waitEnd(), true, 'an option longer than the discard cap ends the connection');
    const d = await connected(s);
    d.write(oc.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.alloc(9000, 0x41)));
    assert.equal(await d.waitEnd(), true, 'an oversized EXPORT_NAME cannot be answered with an error');
  } finally {
    await s.server.close();
  }
});

test('bad option magic: disconnect', async () => {
  const s = await startServer(provider());
  try {
    const c = await connected(s);
    const bad = oc.encodeOption(P.NBD_OPT_LIST);
    bad.write('NOTAMAGI', 0, 'latin1');
    c.write(bad);
    assert.equal(await c.waitEnd(), true);
    assert.equal(c.available, 0);
  } finally {
    await s.server.close();
  }
});

test('handshake timeout: disconnect', async () => {
  const s = await startServer(provider(), { handshakeTimeoutMs: 200 });
  try {
    const c = await connected(s);
    const t0 = Date.now();
    assert.equal(await c.waitEnd(3000), true);
    assert.ok(Date.now() - t0 >= 150);
    assert.ok(s.logs.some((l) => /no export chosen within 200 ms/.test(l)));
    // a client that finishes in time is not affected by the timer
    const ok = await rawSession(s.socketPath);
    await sleep(400);
    sendRequest(ok.client, { type: P.NBD_CMD_READ, cookie: 1n, offset: 0, length: 512 });
    assert.equal((await readSimpleReply(ok.client, 512)).errno, 0);
    ok.client.destroy();
  } finally {
    await s.server.close();
  }
});

test('INFO/GO: export info, name, description and block size on request; unknown export; bad data', async () => {
  const s = await startServer(provider(), { maxPayloadBytes: 1 << 20 });
  try {
    const c = await connected(s);
    const infos = await option(c, P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'disk', infos: [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION, P.NBD_INFO_BLOCK_SIZE, 77, P.NBD_INFO_NAME] }));
    assert.equal(infos[infos.length - 1].reply, P.NBD_REP_ACK);
    const decoded = infos.slice(0, -1).map((r) => oc.decodeInfo(r.payload));
    assert.deepEqual(decoded, [
      { type: P.NBD_INFO_EXPORT, sizeBytes: 1 << 20, transmissionFlags: decoded[0] && 'transmissionFlags' in decoded[0] ? decoded[0].transmissionFlags : -1 },
      { type: P.NBD_INFO_NAME, text: 'disk' },
      { type: P.NBD_INFO_DESCRIPTION, text: 'the main disk' },
      { type: P.NBD_INFO_BLOCK_SIZE, minimumBytes: 1, preferredBytes: 4096, maximumBytes: 1 << 20 },
    ]);
    const small = await option(c, P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'small', infos: [P.NBD_INFO_BLOCK_SIZE] }));
    assert.deepEqual(oc.decodeInfo(small[1].payload), { type: P.NBD_INFO_BLOCK_SIZE, minimumBytes: 1, preferredBytes: 512, maximumBytes: 1 << 20 });
    const bare = await option(c, P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'disk', infos: [] }));
    assert.deepEqual(bare.map((r) => r.reply), [P.NBD_REP_INFO, P.NBD_REP_ACK], 'only NBD_INFO_EXPORT when nothing is asked');
    const unknown = await option(c, P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'nope', infos: [] }));
    assert.deepEqual(unknown.map((r) => r.reply), [P.NBD_REP_ERR_UNKNOWN]);
    assert.match(unknown[0].payload.toString(), /nope/);
    const malformed = await option(c, P.NBD_OPT_GO, Buffer.from([0, 0, 0, 9, 1]));
    assert.deepEqual(malformed.map((r) => r.reply), [P.NBD_REP_ERR_INVALID]);
    const goUnknown = await option(c, P.NBD_OPT_GO, oc.encodeInfoRequest({ name: 'nope', infos: [] }));
    assert.deepEqual(goUnknown.map((r) => r.reply), [P.NBD_REP_ERR_UNKNOWN], 'a failed GO leaves the client in the handshake');
    const go = await option(c, P.NBD_OPT_GO, oc.encodeInfoRequest({ name: '', infos: [] }));
    assert.equal(go[go.length - 1].reply, P.NBD_REP_ACK, 'the empty name is the default export');
    sendRequest(c, { type: P.NBD_CMD_READ, cookie: 5n, offset: 0, length: 4096 });
    const reply = await readSimpleReply(c, 4096);
    assert.equal(reply.cookie, 5n);
    c.destroy();
  } finally {
    await s.server.close();
  }
});

test('EXPORT_NAME: size and flags, 124 zeroes unless NO_ZEROES; unknown name disconnects', async () => {
  const s = await startServer(provider());
  try {
    for (const noZeroes of [true, false]) {
      const c = await connected(s, P.NBD_FLAG_C_FIXED_NEWSTYLE | (noZeroes ? P.NBD_FLAG_C_NO_ZEROES : 0));
      c.write(oc.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('ro')));
      const head = await c.read(10);
      assert.equal(head.readBigUInt64BE(0), 1n << 20n);
      const flags = head.readUInt16BE(8);
      assert.ok(flags & P.NBD_FLAG_HAS_FLAGS && flags & P.NBD_FLAG_READ_ONLY);
      if (!noZeroes) assert.ok((await c.read(124)).every((b) => b === 0));
      sendRequest(c, { type: P.NBD_CMD_READ, cookie: 77n, offset: 0, length: 100 });
      const reply = await readSimpleReply(c, 100);
      assert.equal(reply.errno, 0);
      assert.equal(reply.cookie, 77n, 'the first transmission bytes follow exactly');
      c.destroy();
    }
    const bad = await connected(s);
    bad.write(oc.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('nope')));
    assert.equal(await bad.waitEnd(), true);
    assert.equal(bad.available, 0);
  } finally {
    await s.server.close();
  }
});

test('STRUCTURED_REPLY once; meta contexts: list wildcards, set needs structured replies, unknown export', async () => {
  const s = await startServer(provider());
  try {
    const c = await connected(s);
    const req = (name: string, queries: string[]) => oc.encodeMetaContextRequest({ name, queries });
    assert.equal((await option(c, P.NBD_OPT_SET_META_CONTEXT, req('disk', ['base:allocation'])))[0].reply, P.NBD_REP_ERR_INVALID);
    assert.equal((await option(c, P.NBD_OPT_STRUCTURED_REPLY))[0].reply, P.NBD_REP_ACK);
    assert.equal((await option(c, P.NBD_OPT_STRUCTURED_REPLY))[0].reply, P.NBD_REP_ERR_INVALID);
    assert.equal((await option(c, P.NBD_OPT_STRUCTURED_REPLY, Buffer.from('x')))[0].reply, P.NBD_REP_ERR_INVALID);
    const names = (replies: oc.OptionReply[]) => replies.filter((r) => r.reply === P.NBD_REP_META_CONTEXT).map((r) => oc.decodeMetaContext(r.payload));
    assert.deepEqual(names(await option(c, P.NBD_OPT_LIST_META_CONTEXT, req('disk', []))), [
      { id: 0, name: 'base:allocation' },
      { id: 0, name: 'qemu:allocation-depth' },
    ]);
    assert.deepEqual(names(await option(c, P.NBD_OPT_LIST_META_CONTEXT, req('disk', ['qemu:']))), [{ id: 0, name: 'qemu:allocation-depth' }]);
    assert.deepEqual(names(await option(c, P.NBD_OPT_LIST_META_CONTEXT, req('small', ['qemu:', 'base:']))), [{ id: 0, name: 'base:allocation' }]);
    assert.deepEqual(names(await option(c, P.NBD_OPT_LIST_META_CONTEXT, req('disk', ['x-unknown:thing']))), []);
    assert.equal((await option(c, P.NBD_OPT_LIST_META_CONTEXT, req('nope', [])))[0].reply, P.NBD_REP_ERR_UNKNOWN);
    assert.equal((await option(c, P.NBD_OPT_LIST_META_CONTEXT, Buffer.from([0, 0, 0, 1])))[0].reply, P.NBD_REP_ERR_INVALID);
    const set = names(await option(c, P.NBD_OPT_SET_META_CONTEXT, req('disk', ['base:', 'qemu:allocation-depth', 'base:allocation'])));
    assert.deepEqual(set.map((x) => x?.name), ['base:allocation', 'qemu:allocation-depth']);
    assert.ok(set.every((x) => x !== undefined && x.id !== 0));
    assert.notEqual(set[0]?.id, set[1]?.id);
    c.destroy();
  } finally {
    await s.server.close();
  }
});

test('contexts set for one export do not carry over to another chosen with GO', async () => {
  const s = await startServer(provider());
  try {
    const same = await rawSession(s.socketPath, { name: 'disk', structured: true, contexts: ['base:allocation'] });
    sendRequest(same.client, { type: P.NBD_CMD_BLOCK_STATUS, cookie: 1n, offset: 0, length: 4096 });
    const ok = await same.client.read(20);
    assert.equal(ok.readUInt16BE(6), P.NBD_REPLY_TYPE_BLOCK_STATUS);
    same.client.destroy();

    const c = await connected(s);
    await option(c, P.NBD_OPT_STRUCTURED_REPLY);
    await option(c, P.NBD_OPT_SET_META_CONTEXT, oc.encodeMetaContextRequest({ name: 'small', queries: ['base:allocation'] }));
    const go = await option(c, P.NBD_OPT_GO, oc.encodeInfoRequest({ name: 'disk', infos: [] }));
    assert.equal(go[go.length - 1].reply, P.NBD_REP_ACK);
    sendRequest(c, { type: P.NBD_CMD_BLOCK_STATUS, cookie: 2n, offset: 0, length: 4096 });
    const head = await c.read(20);
    assert.equal(head.readUInt16BE(6), P.NBD_REPLY_TYPE_ERROR);
    const payload = await c.read(head.readUInt32BE(16));
    assert.equal(payload.readUInt32BE(0), P.NBD_EINVAL);
    c.destroy();
  } finally {
    await s.server.close();
  }
});

test('server close during the handshake: options get NBD_REP_ERR_SHUTDOWN, then the client is let go', async () => {
  const s = await startServer(provider());
  const c = await connected(s);
  assert.equal((await option(c, P.NBD_OPT_LIST)).at(-1)?.reply, P.NBD_REP_ACK);
  const closing = s.server.close();
  await sleep(50);
  const [r] = await option(c, P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'disk', infos: [] }));
  assert.equal(r.reply, P.NBD_REP_ERR_SHUTDOWN);
  assert.equal((await option(c, P.NBD_OPT_ABORT))[0].reply, P.NBD_REP_ACK);
  await closing;
  assert.equal(s.server.connections, 0);
  await assert.rejects(RawClient.connect(s.socketPath), 'no longer listening');
});

test('misbehaving clients never disturb a connection in transmission', async () => {
  const device = new MemoryDevice({ sizeBytes: 4 << 20 });
  const s = await startServer(MapProvider.of({ disk: device }, 'disk'), { handshakeTimeoutMs: 300, maxOptionsPerHandshake: 3, maxOptionBytes: 8192 });
  try {
    const good = await rawSession(s.socketPath, { structured: false });
    let stop = false;
    let rounds = 0;
    const worker = (async () => {
      while (!stop) {
        const data = pattern(65536 + 7, rounds + 1);
        const offset = (rounds * 65536 * 3 + 13) % ((4 << 20) - 200000);
        sendRequest(good.client, { type: P.NBD_CMD_WRITE, cookie: BigInt(rounds * 2), offset }, data);
        sendRequest(good.client, { type: P.NBD_CMD_READ, cookie: BigInt(rounds * 2 + 1), offset, length: data.length });
        const w = await readSimpleReply(good.client);
        assert.equal(w.errno, 0);
        const r = await readSimpleReply(good.client, data.length);
        assert.equal(r.cookie, BigInt(rounds * 2 + 1));
        assert.ok(r.data.equals(data), 'data read back intact');
        rounds++;
      }
    })();
    const abuse = async (fn: (c: RawClient) => void) => {
      const c = await RawClient.connect(s.socketPath);
      fn(c);
      await c.waitEnd(3000);
      c.destroy();
    };
    const garbage = pattern(100000, 99);
    await Promise.all([
      abuse((c) => c.write(garbage)),
      abuse((c) => c.write(oc.encodeClientFlags(0))),
      abuse((c) => c.write(oc.encodeClientFlags(0xffffffff))),
      abuse((c) => c.write(Buffer.concat([oc.encodeClientFlags(1), oc.encodeOption(1234), oc.encodeOption(1234), oc.encodeOption(1234), oc.encodeOption(1234)]))),
      abuse((c) => c.write(Buffer.concat([oc.encodeClientFlags(1), oc.encodeOption(P.NBD_OPT_GO, Buffer.alloc(3 << 20))]))),
      abuse(() => {}), // handshake timeout
      abuse((c) => {
        c.write(Buffer.concat([oc.encodeClientFlags(3), oc.encodeOption(P.NBD_OPT_GO, oc.encodeInfoRequest({ name: '', infos: [] }))]));
        setTimeout(() => c.write(garbage), 50); // bad request magic in transmission
      }),
      abuse((c) => {
        c.write(oc.encodeClientFlags(3));
        setTimeout(() => c.destroy(), 20); // vanishes mid-handshake
      }),
    ]);
    stop = true;
    await worker;
    assert.ok(rounds > 0);
    assert.equal(s.server.connections, 1, 'only the good connection is left');
    good.client.destroy();
  } finally {
    await s.server.close();
  }
});

test('constructor and listen validate their arguments', async () => {
  assert.throws(() => new NbdServer({} as never), /provider/);
  assert.throws(() => new NbdServer({ provider: provider(), maxPayloadBytes: 100 }), /maxPayloadBytes/);
  assert.throws(() => new NbdServer({ provider: provider(), maxInflightRequestsPerConnection: 0 }), /maxInflight/);
  const s = await startServer(provider());
  const other = new NbdServer({ provider: provider() });
  await assert.rejects(other.listen({ socketPath: s.socketPath }), /another server is listening/);
  await assert.rejects(s.server.listen({ socketPath: s.socketPath + '2' }), /already listening/);
  await s.server.close();
  const again = new NbdServer({ provider: provider() });
  await again.listen({ socketPath: s.socketPath, socketMode: 0o600 }); // the stale socket is gone or replaced
  assert.equal(statSync(s.socketPath).mode & 0o777, 0o600);
  await again.close();
  writeFileSync(s.socketPath, 'not a socket');
  await assert.rejects(new NbdServer({ provider: provider() }).listen({ socketPath: s.socketPath }), /not a socket/);
  const tcp = new NbdServer({ provider: provider() });
  const address = await tcp.listen({ port: 0, host: '127.0.0.1' });
  assert.ok('port' in address && address.port > 0 && address.host === '127.0.0.1');
  await tcp.close();
  await assert.rejects(tcp.listen({ port: 0, host: '127.0.0.1' }), /closed/);
});

test.run();
