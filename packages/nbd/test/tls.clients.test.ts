/**
 * TLS with the real clients (GnuTLS on their side): nbdinfo (libnbd URIs with tls-certificates,
 * tls-psk-file and a username), qemu-img and qemu-io (tls-creds-x509 and tls-creds-psk objects),
 * against MemoryDevice as the model. With require, a plaintext client is refused and lists nothing;
 * with on, plaintext and TLS clients are both served; a wrong PSK or client certificate is refused
 * while another client's I/O goes on.
 */
import { strict as assert } from 'node:assert';
import { test } from 'uvu';
import { x509CredentialsFromDir, type NbdServerOptions } from '../src/index.js';
import { MapProvider, MemoryDevice } from './memory-device.js';
import { pattern, run, runOk, startServer, type Started } from './helpers.js';
import { tlsFixtures } from './tls-fixtures.js';

const MiB = 1024 * 1024;
const fx = tlsFixtures();

function model() {
  const disk = new MemoryDevice({ sizeBytes: 16 * MiB });
  const golden = new MemoryDevice({ sizeBytes: 4 * MiB, readOnly: true });
  golden.data.set(pattern(MiB, 9), MiB);
  golden.allocated.fill(1);
  return { disk, golden, provider: MapProvider.of({ disk, golden }, 'disk', { disk: 'a writable disk' }) };
}

const certUri = (s: Started, name = '', dir = fx.clientDir) => `nbds+unix:///${name}?socket=${s.socketPath}&tls-certificates=${dir}`;
const pskUri = (s: Started, name = '', user = 'alice', file = fx.pskFile) => `nbds+unix://${user}@/${name}?socket=${s.socketPath}&tls-psk-file=${file}`;

/** qemu's --object and --image-opts for an export of `s` over TLS. */
function qemuTls(s: Started, creds: 'x509' | 'psk', exportName: string, dir?: string): string[] {
  const object = creds === 'x509' ? `tls-creds-x509,id=tls0,endpoint=client,dir=${dir ?? fx.clientDir}` : `tls-creds-psk,id=tls0,endpoint=client,dir=${dir ?? fx.pskDir},username=alice`;
  // over a unix socket qemu has no host name to check the certificate against: give it
  const hostname = creds === 'x509' ? ',tls-hostname=localhost' : '';
  return ['--object', object, '--image-opts', `driver=nbd,server.type=unix,server.path=${s.socketPath},export=${exportName},tls-creds=tls0${hostname}`];
}

const x509Require: NbdServerOptions['tls'] = { mode: 'require', credentials: x509CredentialsFromDir(fx.serverDir) };
const pskRequire: NbdServerOptions['tls'] = { mode: 'require', credentials: { kind: 'psk', pskFile: fx.pskFile } };

test('require + x509: nbdinfo --list over TLS; a plaintext nbdinfo fails with TLS required and lists nothing', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: x509Require });
  try {
    const info = JSON.parse((await runOk('nbdinfo', ['--list', '--json', certUri(s)])).stdout);
    assert.equal(info.TLS, true);
    assert.deepEqual(info.exports.map((e: { 'export-name': string }) => e['export-name']), ['disk', 'golden']);
    const plain = await run('nbdinfo', ['--list', `nbd+unix:///?socket=${s.socketPath}`], { env: { ...process.env, LIBNBD_DEBUG: '1' } });
    assert.notEqual(plain.code, 0);
    assert.equal(plain.stdout, '', 'nothing listed');
    assert.doesNotMatch(plain.stderr, /golden|a writable disk/, 'no export name or description leaked');
    assert.match(plain.stderr, /server error message: this server requires TLS/);
    assert.match(plain.stderr, /nbd_opt_list: server replied with error to list request/);
    const plainGo = await run('nbdinfo', [`nbd+unix:///disk?socket=${s.socketPath}`]);
    assert.notEqual(plainGo.code, 0, 'nor is an export served');
  } finally {
    await s.server.close();
  }
});

test('require + x509: qemu-img info and qemu-io write/read over TLS match the model', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: x509Require });
  try {
    const info = JSON.parse((await runOk('qemu-img', ['info', '--output=json', ...qemuTls(s, 'x509', 'disk')])).stdout);
    assert.equal(info['virtual-size'], 16 * MiB);
    const { stdout } = await runOk('qemu-io', [...qemuTls(s, 'x509', 'disk'), '-c', 'write -P 0x3c 1000 300000', '-c', 'read -P 0x3c 1000 300000', '-c', 'flush']);
    assert.doesNotMatch(stdout, /fail|error/i);
    assert.ok(m.disk.data.subarray(1000, 301000).every((b) => b === 0x3c), 'written over TLS');
    assert.ok(m.disk.data.subarray(0, 1000).every((b) => b === 0) && m.disk.data[301000] === 0, 'and nothing else');
    const golden = await runOk('qemu-io', ['-r', ...qemuTls(s, 'x509', 'golden'), '-c', `read -v ${MiB} 16`]);
    assert.match(golden.stdout, new RegExp(pattern(16, 9).toString('hex').slice(0, 8).replace(/(..)/g, '$1 ').trim()), 'read over TLS');
    const plain = await run('qemu-img', ['info', `nbd+unix:///disk?socket=${s.socketPath}`]);
    assert.notEqual(plain.code, 0, 'plaintext qemu-img is refused');
  } finally {
    await s.server.close();
  }
});

test('require + PSK: nbdinfo and qemu-io with the right key; a wrong key or unknown user is refused while a neighbour keeps going', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: pskRequire });
  try {
    const info = JSON.parse((await runOk('nbdinfo', ['--json', pskUri(s, 'disk')])).stdout);
    assert.equal(info.TLS, true);
    assert.equal(info.exports[0]['export-size'], 16 * MiB);
    // a long-running neighbour: qemu-io over TLS with many writes, while bad clients come and go
    const commands = Array.from({ length: 200 }, (_, i) => ['-c', `write -P ${(i % 250) + 1} ${i * 65536} 65536`]).flat();
    const neighbour = runOk('qemu-io', [...qemuTls(s, 'psk', 'disk'), ...commands]);
    const wrong = await run('nbdinfo', ['--list', pskUri(s, '', 'alice', fx.wrongPskFile)]);
    assert.notEqual(wrong.code, 0);
    assert.equal(wrong.stdout, '');
    assert.match(wrong.stderr, /gnutls_handshake|TLS/);
    const unknown = await run('nbdinfo', ['--list', pskUri(s, '', 'mallory', fx.pskFile)]);
    assert.notEqual(unknown.code, 0, 'a user missing from the PSK file');
    const plain = await run('nbdinfo', ['--list', `nbd+unix:///?socket=${s.socketPath}`]);
    assert.notEqual(plain.code, 0);
    await neighbour;
    for (let i = 0; i < 200; i++) assert.equal(m.disk.data[i * 65536 + 777], (i % 250) + 1, `block ${i} written by the neighbour`);
    assert.ok(s.logs.some((l) => /TLS handshake failed: PSK username 'alice'/.test(l)), s.logs.join('\n'));
    const after = JSON.parse((await runOk('nbdinfo', ['--list', '--json', pskUri(s, '', 'bob')])).stdout);
    assert.equal(after.exports.length, 2, 'the server still serves TLS clients (bob this time)');
  } finally {
    await s.server.close();
  }
});

test('on: plaintext and TLS clients are both served', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: { mode: 'on', credentials: x509CredentialsFromDir(fx.serverDir) } });
  try {
    const plain = JSON.parse((await runOk('nbdinfo', ['--list', '--json', `nbd+unix:///?socket=${s.socketPath}`])).stdout);
    assert.equal(plain.TLS, false);
    assert.equal(plain.exports.length, 2);
    const secure = JSON.parse((await runOk('nbdinfo', ['--list', '--json', certUri(s)])).stdout);
    assert.equal(secure.TLS, true);
    assert.equal(secure.exports.length, 2);
    await runOk('qemu-io', [...qemuTls(s, 'x509', 'disk'), '-c', 'write -P 0x61 0 4096']);
    await runOk('qemu-io', ['-f', 'raw', '-c', 'read -P 0x61 0 4096', '-c', 'write -P 0x62 4096 4096', `nbd+unix:///disk?socket=${s.socketPath}`]);
    await runOk('qemu-io', [...qemuTls(s, 'x509', 'disk'), '-c', 'read -P 0x62 4096 4096']);
  } finally {
    await s.server.close();
  }
});

test('verifyPeer: libnbd with a client certificate from the CA is served; one from another CA is refused', async () => {
  const m = model();
  const s = await startServer(m.provider, { tls: { mode: 'require', credentials: x509CredentialsFromDir(fx.serverDir, { verifyPeer: true }) } });
  try {
    const good = JSON.parse((await runOk('nbdinfo', ['--list', '--json', certUri(s)])).stdout);
    assert.equal(good.exports.length, 2);
    await runOk('qemu-io', [...qemuTls(s, 'x509', 'disk'), '-c', 'write -P 0x71 8192 4096']);
    assert.equal(m.disk.data[8192], 0x71);
    const rogue = await run('nbdinfo', ['--list', certUri(s, '', fx.rogueClientDir)]);
    assert.notEqual(rogue.code, 0);
    assert.equal(rogue.stdout, '');
    // GnuTLS sends only a certificate from a CA the server names, so the rogue one is not even sent
    assert.ok(s.logs.some((l) => /TLS handshake failed: (client certificate refused|no client certificate)/.test(l)), s.logs.join('\n'));
  } finally {
    await s.server.close();
  }
});

test.run();
