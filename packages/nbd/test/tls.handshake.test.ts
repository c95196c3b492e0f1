/**
 * The handshake state machine's TLS rules, without sockets: a Handshake fed from a ByteQueue, its
 * replies decoded from what it sends. NOTLS (off), SELECTIVETLS (on) and FORCEDTLS (require) as in
 * doc/proto.md, the state reset at STARTTLS, bytes pipelined behind STARTTLS, and that in require
 * mode nothing reaches the provider before TLS. Also the PSK file parser and the option checks.
 */
import { strict as assert } from 'node:assert';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import type { ExportProvider } from '@cowstack/core';
import { ByteQueue } from '../src/byte-queue.js';
import { Handshake, type HandshakeStep } from '../src/handshake.js';
import { NbdServer, NbdServerError, parsePskFile, x509CredentialsFromDir } from '../src/index.js';
import * as oc from '../src/option-codec.js';
import * as P from '../src/protocol-constants.js';
import type { TlsMode } from '../src/tls-config.js';
import { MapProvider, MemoryDevice } from './memory-device.js';
import { tempDir } from './helpers.js';
import { tlsFixtures } from './tls-fixtures.js';

const limits = { maxOptionsPerHandshake: 32, maxOptionBytes: 65536, maxPayloadBytes: 32 << 20 };

/** A provider that records every call, to prove require mode never reaches it before TLS. */
class SpyProvider implements ExportProvider {
  readonly calls: string[] = [];
  private readonly inner = MapProvider.of({ disk: new MemoryDevice({ sizeBytes: 1 << 20 }) }, 'disk', { disk: 'secret description' });
  list() {
    this.calls.push('list');
    return this.inner.list();
  }
  open(name: string) {
    this.calls.push(`open ${name}`);
    return this.inner.open(name);
  }
}

class Machine {
  readonly provider = new SpyProvider();
  readonly queue = new ByteQueue();
  readonly handshake: Handshake;
  private sent: Buffer[] = [];

  constructor(mode: TlsMode) {
    this.handshake = new Handshake(this.provider, limits, (b) => this.sent.push(Buffer.from(b)), () => {}, mode);
    this.feed(oc.encodeClientFlags(P.NBD_FLAG_C_FIXED_NEWSTYLE | P.NBD_FLAG_C_NO_ZEROES));
  }

  feed(...chunks: Buffer[]): HandshakeStep {
    for (const c of chunks) this.queue.push(c);
    return this.handshake.consume(this.queue);
  }

  /** Sends one option; returns the step and the decoded replies it produced. */
  option(opt: number, data?: Buffer, trailing?: Buffer): { step: HandshakeStep; replies: oc.OptionReply[] } {
    const step = this.feed(oc.encodeOption(opt, data), ...(trailing ? [trailing] : []));
    return { step, replies: this.replies() };
  }

  replies(): oc.OptionReply[] {
    let bytes = Buffer.concat(this.sent);
    this.sent = [];
    const out: oc.OptionReply[] = [];
    while (bytes.length > 0) {
      const decoded = oc.decodeOptionReply(bytes);
      assert.ok(decoded, 'a whole option reply');
      out.push(decoded.reply);
      bytes = bytes.subarray(decoded.bytes);
    }
    return out;
  }
}

const infoRequest = (name = '') => oc.encodeInfoRequest({ name, infos: [P.NBD_INFO_NAME, P.NBD_INFO_DESCRIPTION] });
const lastReply = (r: oc.OptionReply[]) => r[r.length - 1].reply;

test('off (NOTLS): STARTTLS gets ERR_POLICY, with data ERR_INVALID, never ERR_TLS_REQD; the session goes on', () => {
  const m = new Machine('off');
  let r = m.option(P.NBD_OPT_STARTTLS);
  assert.equal(r.step.kind, 'continue');
  assert.equal(r.replies[0].reply, P.NBD_REP_ERR_POLICY);
  assert.match(r.replies[0].payload.toString(), /TLS is not enabled/);
  assert.equal(m.option(P.NBD_OPT_STARTTLS, Buffer.from('x')).replies[0].reply, P.NBD_REP_ERR_INVALID);
  r = m.option(P.NBD_OPT_LIST);
  assert.equal(lastReply(r.replies), P.NBD_REP_ACK);
  r = m.option(P.NBD_OPT_GO, infoRequest());
  assert.equal(r.step.kind, 'transmission');
  assert.equal(r.step.kind === 'transmission' && r.step.negotiated.tls, false);
});

test('on: plaintext options work; STARTTLS gets ACK and the starttls step; nothing is consumed until tlsEstablished', () => {
  const m = new Machine('on');
  assert.equal(lastReply(m.option(P.NBD_OPT_LIST).replies), P.NBD_REP_ACK, 'plaintext LIST allowed');
  assert.equal(lastReply(m.option(P.NBD_OPT_INFO, infoRequest()).replies), P.NBD_REP_ACK, 'plaintext INFO allowed');
  const r = m.option(P.NBD_OPT_STARTTLS);
  assert.deepEqual(r.step, { kind: 'starttls' });
  assert.equal(r.replies.length, 1);
  assert.equal(r.replies[0].reply, P.NBD_REP_ACK);
  assert.equal(r.replies[0].payload.length, 0);
  assert.throws(() => m.handshake.consume(m.queue), /before the TLS upgrade finished/, 'the connection must not feed bytes during the upgrade');
  m.handshake.tlsEstablished();
  assert.throws(() => m.handshake.tlsEstablished(), /tlsEstablished\(\) in phase option-header/);
  const go = m.option(P.NBD_OPT_GO, infoRequest());
  assert.equal(go.step.kind, 'transmission');
  assert.equal(go.step.kind === 'transmission' && go.step.negotiated.tls, true);
});

test('on: plaintext EXPORT_NAME still enters transmission (no export is TLS-only)', () => {
  const m = new Machine('on');
  const step = m.feed(oc.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  assert.equal(step.kind, 'transmission');
});

test('STARTTLS forgets structured replies and meta contexts negotiated before it', () => {
  const m = new Machine('on');
  assert.equal(m.option(P.NBD_OPT_STRUCTURED_REPLY).replies[0].reply, P.NBD_REP_ACK);
  assert.equal(lastReply(m.option(P.NBD_OPT_SET_META_CONTEXT, oc.encodeMetaContextRequest({ name: 'disk', queries: ['base:allocation'] })).replies), P.NBD_REP_ACK);
  assert.deepEqual(m.option(P.NBD_OPT_STARTTLS).step, { kind: 'starttls' });
  m.handshake.tlsEstablished();
  // Without the reset this would be ERR_INVALID ("already negotiated"); SET_META_CONTEXT before it would work.
  assert.equal(m.option(P.NBD_OPT_SET_META_CONTEXT, oc.encodeMetaContextRequest({ name: 'disk', queries: ['base:allocation'] })).replies[0].reply, P.NBD_REP_ERR_INVALID, 'structured replies were forgotten');
  const go = m.option(P.NBD_OPT_GO, infoRequest('disk'));
  assert.equal(go.step.kind, 'transmission');
  if (go.step.kind !== 'transmission') return;
  assert.equal(go.step.negotiated.structuredReplies, false);
  assert.deepEqual(go.step.negotiated.metaContexts, []);
  assert.equal(go.step.negotiated.transmissionFlags & P.NBD_FLAG_SEND_DF, 0);
});

test('a second STARTTLS gets ERR_INVALID; STARTTLS with data gets ERR_INVALID and no upgrade', () => {
  const m = new Machine('require');
  assert.equal(m.option(P.NBD_OPT_STARTTLS, Buffer.from('x')).replies[0].reply, P.NBD_REP_ERR_INVALID);
  assert.deepEqual(m.option(P.NBD_OPT_STARTTLS).step, { kind: 'starttls' });
  m.handshake.tlsEstablished();
  const again = m.option(P.NBD_OPT_STARTTLS);
  assert.equal(again.step.kind, 'continue');
  assert.equal(again.replies[0].reply, P.NBD_REP_ERR_INVALID);
  assert.match(again.replies[0].payload.toString(), /already in use/);
});

test('bytes pipelined behind STARTTLS: closed without an ACK (they would be taken for the TLS handshake)', () => {
  for (const mode of ['on', 'require'] as const) {
    const m = new Machine(mode);
    const r = m.option(P.NBD_OPT_STARTTLS, undefined, Buffer.from([0x16, 0x03, 0x01]));
    assert.equal(r.step.kind, 'close');
    assert.equal(r.step.kind === 'close' && r.step.soft, false);
    assert.match(r.step.kind === 'close' ? r.step.reason : '', /3 bytes after NBD_OPT_STARTTLS/);
    assert.deepEqual(r.replies, [], 'no ACK');
  }
  // An option pipelined behind a refused STARTTLS is fine: the client may pipeline in NOTLS.
  const off = new Machine('off');
  const r = off.option(P.NBD_OPT_STARTTLS, undefined, oc.encodeOption(P.NBD_OPT_LIST));
  assert.equal(r.step.kind, 'continue');
  assert.deepEqual(r.replies.map((x) => x.reply).slice(0, 1), [P.NBD_REP_ERR_POLICY]);
  assert.equal(lastReply(r.replies), P.NBD_REP_ACK);
});

test('require (FORCEDTLS): every option but STARTTLS and ABORT gets ERR_TLS_REQD and the provider is never asked', () => {
  const m = new Machine('require');
  const options: [number, Buffer?][] = [
    [P.NBD_OPT_LIST],
    [P.NBD_OPT_INFO, infoRequest()],
    [P.NBD_OPT_GO, infoRequest('disk')],
    [P.NBD_OPT_STRUCTURED_REPLY],
    [P.NBD_OPT_LIST_META_CONTEXT, oc.encodeMetaContextRequest({ name: 'disk', queries: [] })],
    [P.NBD_OPT_SET_META_CONTEXT, oc.encodeMetaContextRequest({ name: 'disk', queries: [] })],
    [42, Buffer.from('unknown option')],
    [P.NBD_OPT_INFO, Buffer.from('malformed')],
  ];
  for (const [opt, data] of options) {
    const r = m.option(opt, data);
    assert.equal(r.step.kind, 'continue', P.optionName(opt));
    assert.equal(r.replies.length, 1, P.optionName(opt));
    assert.equal(r.replies[0].option, opt);
    assert.equal(r.replies[0].reply, P.NBD_REP_ERR_TLS_REQD, P.optionName(opt));
    assert.match(r.replies[0].payload.toString(), /requires TLS/);
  }
  // an option too long to parse is skipped and also gets ERR_TLS_REQD, not ERR_TOO_BIG
  const big = m.option(P.NBD_OPT_LIST, Buffer.alloc(limits.maxOptionBytes + 1));
  assert.equal(big.replies[0].reply, P.NBD_REP_ERR_TLS_REQD);
  assert.deepEqual(m.provider.calls, [], 'no export listed, opened or described before TLS');
  // after TLS, the same options are answered, and ERR_TLS_REQD is never sent again
  assert.deepEqual(m.option(P.NBD_OPT_STARTTLS).step, { kind: 'starttls' });
  m.handshake.tlsEstablished();
  const list = m.option(P.NBD_OPT_LIST).replies;
  assert.deepEqual(list.map((r) => r.reply), [P.NBD_REP_SERVER, P.NBD_REP_ACK]);
  assert.equal(m.option(42).replies[0].reply, P.NBD_REP_ERR_UNSUP);
  const go = m.option(P.NBD_OPT_GO, infoRequest('disk'));
  assert.equal(go.step.kind, 'transmission');
});

test('require: EXPORT_NAME before TLS closes (it cannot be answered with an error); ABORT is acknowledged', () => {
  const m = new Machine('require');
  const step = m.feed(oc.encodeOption(P.NBD_OPT_EXPORT_NAME, Buffer.from('disk')));
  assert.equal(step.kind, 'close');
  assert.equal(step.kind === 'close' && step.soft, false);
  assert.deepEqual(m.replies(), [], 'nothing about the export was sent');
  assert.deepEqual(m.provider.calls, []);
  const a = new Machine('require');
  const r = a.option(P.NBD_OPT_ABORT);
  assert.equal(r.step.kind, 'close');
  assert.equal(r.replies[0].reply, P.NBD_REP_ACK);
});

test('shutdown during the handshake: STARTTLS gets ERR_SHUTDOWN like every other option', () => {
  const m = new Machine('require');
  m.handshake.shutdown();
  assert.equal(m.option(P.NBD_OPT_STARTTLS).replies[0].reply, P.NBD_REP_ERR_SHUTDOWN);
});

test('parsePskFile: psktool lines, blank lines skipped; malformed lines named without their key', () => {
  const keys = parsePskFile('alice:00ff10\n\nbob:0123456789abcdef0123456789ABCDEF\r\n');
  assert.deepEqual([...keys.keys()], ['alice', 'bob']);
  assert.deepEqual(keys.get('alice'), Buffer.from([0, 0xff, 0x10]));
  const bad: [string, RegExp][] = [
    ['', /no username:hexkey line/],
    ['alice', /line 1 is not username:hexkey/],
    [':00ff', /line 1 is not username:hexkey/],
    ['alice:xyz1', /line 1: the key is not an even number of hex digits/],
    ['alice:abc', /not an even number/],
    ['alice:', /not an even number/],
    ['alice:00\nalice:01', /line 2: username 'alice' appears twice/],
    [`alice:${'00'.repeat(257)}`, /longer than 256 bytes/],
    [`${'u'.repeat(129)}:00`, /at most 128 bytes/],
  ];
  for (const [text, message] of bad) {
    assert.throws(() => parsePskFile(text), (e: unknown) => e instanceof NbdServerError && e.code === 'EINVAL' && message.test(e.message) && !/xyz1/.test(e.message), text);
  }
});

test('tls options are checked when the server is constructed', () => {
  const provider = MapProvider.of({ disk: new MemoryDevice({ sizeBytes: 65536 }) });
  const fx = tlsFixtures();
  const dir = tempDir('tlsopt');
  const invalid = (tls: unknown, message: RegExp) =>
    assert.throws(() => new NbdServer({ provider, tls: tls as never }), (e: unknown) => e instanceof NbdServerError && e.code === 'EINVAL' && message.test(e.message), JSON.stringify(tls));
  invalid({ mode: 'maybe' }, /tls.mode must be/);
  invalid({ mode: 'on' }, /needs credentials/);
  invalid({ mode: 'require', credentials: { kind: 'kerberos' } }, /kind must be/);
  invalid({ mode: 'on', credentials: { kind: 'x509', certFile: join(dir, 'missing.pem'), keyFile: join(dir, 'missing.pem') } }, /cannot read the certificate .*missing.pem/);
  invalid({ mode: 'on', credentials: { kind: 'x509', certFile: join(fx.serverDir, 'server-cert.pem') } }, /need a certificate and a private key/);
  invalid({ mode: 'on', credentials: { kind: 'x509', certFile: join(fx.serverDir, 'server-cert.pem'), keyFile: join(fx.serverDir, 'server-cert.pem') } }, /cannot be used/);
  invalid({ mode: 'on', credentials: { kind: 'x509', certFile: join(fx.serverDir, 'server-cert.pem'), keyFile: join(fx.serverDir, 'server-key.pem'), verifyPeer: true } }, /verifyPeer needs the CA/);
  invalid({ mode: 'on', credentials: { kind: 'x509', cert: 'x', certFile: 'y', keyFile: 'z' } }, /as a file or inline, not both/);
  invalid({ mode: 'on', credentials: { kind: 'psk', pskFile: join(dir, 'none.psk') } }, /cannot read the PSK file/);
  const bad = join(dir, 'bad.psk');
  writeFileSync(bad, 'alice:nothex\n');
  invalid({ mode: 'on', credentials: { kind: 'psk', pskFile: bad } }, /bad.psk line 1: the key/);
  // valid ones construct
  new NbdServer({ provider, tls: { mode: 'off' } });
  new NbdServer({ provider, tls: { mode: 'require', credentials: x509CredentialsFromDir(fx.serverDir, { verifyPeer: true }) } });
  new NbdServer({ provider, tls: { mode: 'on', credentials: { kind: 'psk', pskFile: fx.pskFile } } });
  assert.deepEqual(x509CredentialsFromDir('/etc/pki/x'), {
    kind: 'x509',
    certFile: '/etc/pki/x/server-cert.pem',
    keyFile: '/etc/pki/x/server-key.pem',
    caFile: '/etc/pki/x/ca-cert.pem',
    verifyPeer: false,
  });
});

test.run();
