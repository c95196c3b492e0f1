/**
 * STARTTLS over real sockets with node:tls as the client: the upgrade in the middle of the option
 * haggling, transmission over TLS, FORCEDTLS refusals, client certificates (verifyPeer), PSK, and
 * the ways a TLS handshake can go wrong (pipelined bytes, a client that gives up, one that stalls,
 * a wrong key): each closes that connection only, with a log line, and a neighbour keeps working.
 */
import { strict as assert } from 'node:assert';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import type { ConnectionOptions } from 'node:tls';
import { test } from 'uvu';
import * as oc from '../src/option-codec.js';
import * as P from '../src/protocol-constants.js';
import { x509CredentialsFromDir, type NbdServerOptions } from '../src/index.js';
import { MapProvider, MemoryDevice } from './memory-device.js';
import { RawClient, option, pattern, readGreeting, readSimpleReply, sendRequest, sleep, startServer, type Started } from './helpers.js';
import { tlsFixtures } from './tls-fixtures.js';

const fx = tlsFixtures();

function model() {
  const disk = new MemoryDevice({ sizeBytes: 1 << 20 });
  return { disk, provider: MapProvider.of({ disk, other: new MemoryDevice({ sizeBytes: 65536 }) }, 'disk', { disk: 'the disk' }) };
}

const x509 = (verifyPeer = false): NbdServerOptions['tls'] => ({ mode: 'require', credentials: x509CredentialsFromDir(fx.serverDir, { verifyPeer }) });

/** What a client that trusts our CA passes to tls.connect (the server certificate names localhost). */
function trusting(dir = fx.clientDir, withCert = false): ConnectionOptions {
  return {
    ca: readFileSync(join(dir, 'ca-cert.pem')),
    servername: 'localhost',
    ...(withCert ? { cert: readFileSync(join(dir, 'client-cert.pem')), key: readFileSync(join(dir, 'client-key.pem')) } : {}),
  };
}

function psk(identity: string, hexKey: string): ConnectionOptions {
  return { pskCallback: () => ({ identity, psk: Buffer.from(hexKey, 'hex') }), checkServerIdentity: () => undefined, ciphers: 'TLS_AES_128_GCM_SHA256:PSK' };
}

async function connected(s: Started): Promise<RawClient> {
  const c = await RawClient.connect(s.socketPath);
  await readGreeting(c);
  c.write(oc.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
  return c;
}

/** STARTTLS, its ACK, and the client side of the TLS handshake. */
async function upgrade(c: RawClient, options: ConnectionOptions): Promise<void> {
  const [ack] = await option(c, P.NBD_OPT_STARTTLS);
  assert.equal(ack.reply, P.NBD_REP_ACK);
  await c.startTls(options);
}

/** GO over whatever the client speaks now, then a write and a read back. */
async function goAndUse(c: RawClient, disk: MemoryDevice, seed: number): Promise<void> {
  const go = await option(c, P.NBD_OPT_GO, oc.encodeInfoRequest({ name: 'disk', infos: [] }));
  assert.equal(go[go.length - 1].reply, P.NBD_REP_ACK);
  const data = pattern(70000, seed);
  sendRequest(c, { type: P.NBD_CMD_WRITE, cookie: 1n, offset: 4096 * seed }, data);
  assert.equal((await readSimpleReply(c)).errno, 0);
  assert.ok(disk.data.subarray(4096 * seed, 4096 * seed + data.length).equals(data), 'the device holds what was written over TLS');
  sendRequest(c, { type: P.NBD_CMD_READ, cookie: 2n, offset: 4096 * seed, length: data.length });
  const read = await readSimpleReply(c, data.length);
  assert.equal(read.errno, 0);
  assert.ok(read.data.equals(data), 'read back over TLS');
}

async function waitFor(s: Started, re: RegExp, timeoutMs = 3000): Promise<string> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const line = s.logs.find((l) => re.test(l));
    if (line !== undefined) return line;
    if (Date.now() > deadline) throw new Error(`no log line ${re} in:\n${s.logs.join('\n')}`);
    await sleep(20);
  }
}

test('on: plaintext LIST, then STARTTLS mid-haggling, LIST and GO over TLS, data round trip', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: { mode: 'on', credentials: x509CredentialsFromDir(fx.serverDir) } });
  try {
    const c = await connected(s);
    const plain = await option(c, P.NBD_OPT_LIST);
    assert.equal(plain[plain.length - 1].reply, P.NBD_REP_ACK, 'plaintext allowed with on');
    await upgrade(c, trusting());
    const list = await option(c, P.NBD_OPT_LIST);
    assert.deepEqual(list.filter((r) => r.reply === P.NBD_REP_SERVER).map((r) => oc.decodeServerPayload(r.payload)?.name), ['disk', 'other']);
    const again = await option(c, P.NBD_OPT_STARTTLS);
    assert.equal(again[0].reply, P.NBD_REP_ERR_INVALID, 'a second STARTTLS');
    await goAndUse(c, m.disk, 1);
    await waitFor(s, /TLS established \(TLSv1\.3/);
    await waitFor(s, /serving export 'disk' \(TLS: true/);
    // a plaintext client on the same server is served too
    const p = await connected(s);
    await goAndUse(p, m.disk, 2);
    c.destroy();
    p.destroy();
  } finally {
    await s.server.close();
  }
});

test('require: before STARTTLS, LIST/INFO/GO get ERR_TLS_REQD and list nothing; EXPORT_NAME disconnects', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: x509() });
  try {
    const c = await connected(s);
    for (const [opt, data] of [
      [P.NBD_OPT_LIST, undefined],
      [P.NBD_OPT_INFO, oc.encodeInfoRequest({ name: 'disk', infos: [P.NBD_INFO_DESCRIPTION] })],
      [P.NBD_OPT_GO, oc.encodeInfoRequest({ name: 'disk', infos: [] })],
      [P.NBD_OPT_STRUCTURED_REPLY, undefined],
    ] as const) {
      const replies = await option(c, opt, data);
      assert.equal(replies.length, 1, 'one error reply, no NBD_REP_SERVER or NBD_REP_INFO');
      assert.equal(replies[0].reply, P.NBD_REP_ERR_TLS_REQD);
    }
    await upgrade(c, trusting());
    await goAndUse(c, m.disk, 3);
    c.destroy();
    const e = await connected(s);
    e.write(oc.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
    assert.equal(await e.waitEnd(), true);
    assert.equal(e.available, 0, 'no size or flags were sent');
    assert.deepEqual(m.provider.opened.filter((n) => n === 'disk').length, 1, 'only the TLS client opened the export');
  } finally {
    await s.server.close();
  }
});

test('bytes pipelined behind STARTTLS: disconnect without an ACK, logged', async () => {
  const s = await startServer(model().provider, { tls: x509() });
  try {
    const c = await connected(s);
    c.write(Buffer.concat([oc.encodeOption(P.NBD_OPT_STARTTLS), oc.encodeOption(P.NBD_OPT_LIST)]));
    assert.equal(await c.waitEnd(), true);
    assert.equal(c.available, 0, 'no ACK');
    await waitFor(s, /bytes after NBD_OPT_STARTTLS without waiting for the reply/);
  } finally {
    await s.server.close();
  }
});

test('TLS handshake failures close that connection only, with a log line; a TLS neighbour keeps working', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: x509(), handshakeTimeoutMs: 5000 });
  try {
    const neighbour = await connected(s);
    await upgrade(neighbour, trusting());
    // a client that does not trust the server's certificate gives up
    const distrust = await connected(s);
    const [ack] = await option(distrust, P.NBD_OPT_STARTTLS);
    assert.equal(ack.reply, P.NBD_REP_ACK);
    await assert.rejects(distrust.startTls({ servername: 'localhost' }), /self-signed|unable to verify|certificate/);
    distrust.destroy();
    await waitFor(s, /TLS handshake failed/);
    // a client that closes its side during the TLS handshake: noticed at once, not at the timeout
    const quitter = await connected(s);
    await option(quitter, P.NBD_OPT_STARTTLS);
    const started = Date.now();
    quitter.socket.end();
    assert.equal(await quitter.waitEnd(3000), true);
    assert.ok(Date.now() - started < 2000, 'closed promptly');
    // plain bytes where the ClientHello should be
    const garbage = await connected(s);
    await option(garbage, P.NBD_OPT_STARTTLS);
    garbage.write(oc.encodeOption(P.NBD_OPT_LIST));
    assert.equal(await garbage.waitEnd(3000), true);
    assert.ok(s.logs.filter((l) => /TLS handshake failed/.test(l)).length >= 3, s.logs.join('\n'));
    await goAndUse(neighbour, m.disk, 4);
    neighbour.destroy();
  } finally {
    await s.server.close();
  }
});

test('a client that stalls after the ACK is disconnected by the handshake timeout', async () => {
  const s = await startServer(model().provider, { tls: x509(), handshakeTimeoutMs: 300 });
  try {
    const c = await connected(s);
    await option(c, P.NBD_OPT_STARTTLS);
    assert.equal(await c.waitEnd(3000), true);
    await waitFor(s, /no export chosen within 300 ms/);
  } finally {
    await s.server.close();
  }
});

test('verifyPeer: a client certificate from the CA is accepted; none, or one from another CA, is refused', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: x509(true) });
  try {
    const good = await connected(s);
    await upgrade(good, trusting(fx.clientDir, true));
    await goAndUse(good, m.disk, 5);
    await waitFor(s, /TLS established \(.*client certificate CN=test client\)/);
    good.destroy();
    for (const [label, options] of [
      ['no certificate', trusting(fx.clientDir, false)],
      ['another CA', trusting(fx.rogueClientDir, true)],
    ] as const) {
      const c = await connected(s);
      const [ack] = await option(c, P.NBD_OPT_STARTTLS);
      assert.equal(ack.reply, P.NBD_REP_ACK);
      // With TLS 1.3 the client may finish before the server has checked its certificate.
      const upgraded = await c.startTls(options).then(
        () => true,
        () => false,
      );
      if (upgraded) {
        c.write(oc.encodeOption(P.NBD_OPT_LIST));
        assert.equal(await c.waitEnd(3000), true, label);
        assert.equal(c.available, 0, `${label}: nothing listed`);
      }
      c.destroy();
    }
    await waitFor(s, /TLS handshake failed: client certificate refused: UNABLE_TO_VERIFY_LEAF_SIGNATURE/);
    await waitFor(s, /TLS handshake failed: no client certificate/);
    assert.equal(s.logs.filter((l) => /TLS handshake failed/.test(l)).length, 2, s.logs.join('\n'));
  } finally {
    await s.server.close();
  }
});

test('PSK: the right key works; a wrong key or an unknown username is refused; others keep working', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: { mode: 'require', credentials: { kind: 'psk', pskFile: fx.pskFile } } });
  try {
    const alice = await connected(s);
    await upgrade(alice, psk('alice', fx.keys.alice));
    await waitFor(s, /TLS established \(TLSv1\.3, .*PSK username 'alice'\)/);
    for (const [identity, key, log] of [
      ['alice', fx.keys.bob, /PSK username 'alice': .*wrong key|PSK username 'alice'/],
      ['mallory', fx.keys.alice, /unknown PSK username 'mallory'/],
    ] as const) {
      const c = await connected(s);
      const [ack] = await option(c, P.NBD_OPT_STARTTLS);
      assert.equal(ack.reply, P.NBD_REP_ACK);
      await assert.rejects(c.startTls(psk(identity, key)));
      c.destroy();
      await waitFor(s, log);
    }
    const bob = await connected(s);
    await upgrade(bob, psk('bob', fx.keys.bob));
    await goAndUse(alice, m.disk, 6);
    await goAndUse(bob, m.disk, 7);
    alice.destroy();
    bob.destroy();
  } finally {
    await s.server.close();
  }
});

test('close() with TLS connections handshaking and transmitting', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: x509() });
  const busy = await connected(s);
  await upgrade(busy, trusting());
  await goAndUse(busy, m.disk, 8);
  const haggling = await connected(s);
  await upgrade(haggling, trusting());
  const closing = s.server.close();
  const [shutdown] = await option(haggling, P.NBD_OPT_LIST);
  assert.equal(shutdown.reply, P.NBD_REP_ERR_SHUTDOWN, 'options over TLS get ERR_SHUTDOWN');
  haggling.write(oc.encodeOption(P.NBD_OPT_ABORT));
  await closing;
  assert.equal(s.server.connections, 0);
  assert.equal(await busy.waitEnd(), true);
});

test.run();
