/**
 * The security defaults of `cowstack serve` (RELIABILITY.md, "Security"), with real clients:
 * TCP binds 127.0.0.1 unless told otherwise, and binding another address without TLS prints a
 * warning; the unix socket is created mode 0600 (`--socket-mode` changes it); the store, its control
 * socket and serve record are private to their owner; `--max-connections` refuses the connection
 * over the limit and only that one, while the connections already open keep working.
 */
import { strict as assert } from 'node:assert';
import { spawn } from 'node:child_process';
import { readdirSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { freePort } from './reliability/fuzz.harness.js';
import { initStore, killAll, run, sleep, startServe, tempDir } from './harness.js';

test.after.each(killAll);

const mode = (path: string): number => statSync(path).mode & 0o777;

test('TCP binds 127.0.0.1 by default; another address without TLS is served with a warning', async () => {
  const store = await initStore({ size: '4M' });
  const port = await freePort();
  const local = await startServe(store, { args: ['--port', String(port)] });
  assert.match(local.stderr(), new RegExp(`nbd://127\\.0\\.0\\.1:${port}`));
  assert.doesNotMatch(local.stderr(), /warning/);
  const list = await run('nbdinfo', ['--list', `nbd://127.0.0.1:${port}`]);
  assert.equal(list.code, 0, list.stderr);
  await local.stop();

  const anyPort = await freePort();
  const open = await startServe(store, { args: ['--port', String(anyPort), '--bind', '0.0.0.0'] });
  assert.match(open.stderr(), /warning: serving on 0\.0\.0\.0 without TLS: anyone who can reach this address can read and write every volume/);
  await open.stop();
});

test('the unix socket is 0600 unless --socket-mode says otherwise; store files are private', async () => {
  const store = await initStore({ size: '4M' });
  const server = await startServe(store);
  assert.equal(mode(server.socket).toString(8), '600');
  assert.equal(mode(store).toString(8), '700');
  assert.equal(mode(join(store, 'control.sock')).toString(8), '600');
  assert.equal(mode(join(store, 'serve.json')).toString(8), '600');
  for (const name of readdirSync(join(store, 'layers'))) assert.equal(mode(join(store, 'layers', name)) & 0o077, 0, `layers/${name} is not readable by others`);
  await server.stop();

  const shared = await startServe(store, { socket: join(tempDir('sock'), 'shared.sock'), args: ['--socket-mode', '0660'] });
  assert.equal(mode(shared.socket).toString(8), '660');
  await shared.stop();
});

// Holds `count` connections open (libnbd) until stdin closes, reading and writing on each first.
const holder = String.raw`
import nbd, sys
uri, count = sys.argv[1], int(sys.argv[2])
handles = []
for i in range(count):
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(bytes([i + 1]) * 4096, i * 4096)
    handles.append(h)
print('held', flush=True)
sys.stdin.read()
for i, h in enumerate(handles):
    assert h.pread(4096, i * 4096) == bytes([i + 1]) * 4096
    h.pwrite(bytes([i + 100]) * 4096, i * 4096)
    h.shutdown()
print('still served', flush=True)
`;

test('--max-connections: the connection over the limit is refused, the others keep working', async () => {
  const store = await initStore({ size: '4M' });
  const server = await startServe(store, { args: ['--max-connections', '2'] });
  const script = join(tempDir('py'), 'holder.py');
  writeFileSync(script, holder);
  const child = spawn('/usr/bin/python3', [script, server.uri('default'), '2'], { stdio: ['pipe', 'pipe', 'pipe'] });
  let out = '';
  let err = '';
  child.stdout.setEncoding('utf8').on('data', (d: string) => (out += d));
  child.stderr.setEncoding('utf8').on('data', (d: string) => (err += d));
  const exited = new Promise<number | null>((resolve) => child.once('exit', resolve));
  try {
    for (let i = 0; i < 400 && !out.includes('held'); i++) await sleep(25);
    assert.match(out, /held/, `the two connections did not open: ${err}`);
    const over = await run('nbdinfo', [server.uri('default')], { timeoutMs: 20_000 });
    assert.notEqual(over.code, 0, 'a third connection is refused');
    child.stdin.end();
    assert.equal(await exited, 0, err);
    assert.match(out, /still served/);
  } finally {
    if (child.exitCode === null) child.kill('SIGKILL');
  }
  const after = await run('nbdinfo', [server.uri('default')], { timeoutMs: 20_000 });
  assert.equal(after.code, 0, `with the holders gone a new client is served: ${after.stderr}`);
  await server.stop();
});

test.run();
