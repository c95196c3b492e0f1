/**
 * The `cowstack serve` TLS flags end to end: `--tls require --tls-psk FILE` on a fresh store, reached
 * with nbdinfo and qemu-io over TLS, a plaintext client refused; and the flag combinations that are
 * usage errors (exit 2).
 *
 * It drives the built CLI (packages/cli/bin/cowstack.js, so `npx tsc -b` first). It lives here, beside
 * the server's other TLS tests, only because packages/cli/test was being changed by someone else when
 * it was written; it belongs in packages/cli/test.
 */
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import { existsSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { test } from 'uvu';
import { run, runOk, tempDir } from './helpers.js';
import { tlsFixtures } from './tls-fixtures.js';

const repoRoot = join(dirname(fileURLToPath(import.meta.url)), '..', '..', '..');
const cli = join(repoRoot, 'packages', 'cli', 'bin', 'cowstack.js');
const fx = tlsFixtures();

if (!existsSync(join(repoRoot, 'packages', 'cli', 'dist', 'main.js'))) throw new Error('packages/cli/dist is missing: run `npx tsc -b` first');

test('cowstack serve --tls require --tls-psk: nbdinfo and qemu-io over TLS, plaintext refused, clean stop', async () => {
  const dir = tempDir('cli-tls');
  const store = join(dir, 'store');
  const socket = join(dir, 'nbd.sock');
  await runOk('node', [cli, 'init', store, '--size', '64M']);
  const serve = spawn('node', [cli, 'serve', store, '--socket', socket, '--tls', 'require', '--tls-psk', fx.pskFile], { stdio: ['ignore', 'ignore', 'pipe'] });
  let stderr = '';
  serve.stderr.setEncoding('utf8').on('data', (d: string) => (stderr += d));
  const exited = new Promise<number | null>((resolve) => serve.once('exit', (code) => resolve(code)));
  try {
    const deadline = Date.now() + 20000;
    while (!/serving .* on /.test(stderr)) {
      if (Date.now() > deadline || serve.exitCode !== null) throw new Error(`serve did not start:\n${stderr}`);
      await new Promise((r) => setTimeout(r, 50));
    }
    assert.match(stderr, /TLS require \(PSK from /);
    assert.match(stderr, new RegExp(`on nbds\\+unix:///\\?socket=${socket}`), 'the URI says TLS');
    const psk = `nbds+unix://alice@/?socket=${socket}&tls-psk-file=${fx.pskFile}`;
    const info = JSON.parse((await runOk('nbdinfo', ['--list', '--json', psk])).stdout);
    assert.equal(info.TLS, true);
    assert.deepEqual(info.exports.map((e: { 'export-name': string }) => e['export-name']), ['default']);
    assert.equal(info.exports[0]['export-size'], 64 * 1024 * 1024);
    const qemu = ['--object', `tls-creds-psk,id=tls0,endpoint=client,dir=${fx.pskDir},username=bob`, '--image-opts', `driver=nbd,server.type=unix,server.path=${socket},export=default,tls-creds=tls0`];
    const io = await runOk('qemu-io', [...qemu, '-c', 'write -P 0xa5 65536 1048576', '-c', 'flush', '-c', 'read -P 0xa5 65536 1048576', '-c', 'read -P 0 0 65536']);
    assert.doesNotMatch(io.stdout, /fail|error/i);
    const plain = await run('nbdinfo', ['--list', `nbd+unix:///?socket=${socket}`]);
    assert.notEqual(plain.code, 0, 'a plaintext client is refused');
    assert.equal(plain.stdout, '', 'and sees no export');
  } finally {
    serve.kill('SIGINT');
  }
  assert.equal(await exited, 0, stderr);
  // the data written over TLS is in the store: serve it again without TLS and read it back
  const again = spawn('node', [cli, 'serve', store, '--socket', socket], { stdio: ['ignore', 'ignore', 'pipe'] });
  let log = '';
  again.stderr.setEncoding('utf8').on('data', (d: string) => (log += d));
  const done = new Promise<number | null>((resolve) => again.once('exit', (code) => resolve(code)));
  try {
    while (!/serving .* on /.test(log)) {
      if (again.exitCode !== null) throw new Error(log);
      await new Promise((r) => setTimeout(r, 50));
    }
    await runOk('qemu-io', ['-f', 'raw', '-r', '-c', 'read -P 0xa5 65536 1048576', `nbd+unix:///default?socket=${socket}`]);
  } finally {
    again.kill('SIGINT');
  }
  assert.equal(await done, 0, log);
});

test('cowstack serve: TLS flag combinations that are usage errors exit 2', async () => {
  const dir = tempDir('cli-tls-usage');
  const store = join(dir, 'store');
  await runOk('node', [cli, 'init', store, '--size', '1M']);
  const socket = join(dir, 'nbd.sock');
  const cases: [string[], RegExp][] = [
    [['--tls', 'require'], /--tls require needs --tls-certificates DIR or --tls-psk FILE/],
    [['--tls', 'on'], /--tls on needs/],
    [['--tls-psk', fx.pskFile], /--tls-psk needs --tls on or --tls require/],
    [['--tls-certificates', fx.serverDir], /--tls-certificates needs --tls on/],
    [['--tls', 'on', '--tls-psk', fx.pskFile, '--tls-verify-peer'], /--tls-verify-peer needs --tls-certificates/],
    [['--tls', 'on', '--tls-psk', fx.pskFile, '--tls-certificates', fx.serverDir], /cannot be used with/],
    [['--tls', 'sometimes'], /Allowed choices are off, on, require/],
  ];
  for (const [flags, message] of cases) {
    const r = await run('node', [cli, 'serve', store, '--socket', socket, ...flags], { timeoutMs: 20000 });
    assert.equal(r.code, 2, `${flags.join(' ')}: ${r.stderr}`);
    assert.match(r.stderr, message);
  }
  const missing = await run('node', [cli, 'serve', store, '--socket', socket, '--tls', 'on', '--tls-certificates', join(dir, 'nope')], { timeoutMs: 20000 });
  assert.equal(missing.code, 1, 'unreadable credentials are an error, not a usage error');
  assert.match(missing.stderr, /cannot read the certificate .*nope\/server-cert.pem/);
});

test.run();
