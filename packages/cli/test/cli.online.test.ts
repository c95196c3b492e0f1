/**
 * Online mode: while `cowstack serve` holds a store, volume create/delete/ls, snapshot, clone, ls,
 * map and journal inspect go through its control socket and take effect at once (nbdinfo lists a new
 * export right away), without disturbing a client that stays connected throughout. recover, check and
 * a second serve refuse with a clear message naming the serving pid. `journal tail --follow` prints
 * events as the server commits them, misses none under load, and stops on SIGINT or when the server
 * stops. A stale serve.json and an over-long store path are handled. `serve --metrics` exposes the
 * metric families, and they move with the load. recover --force does not touch a damaged journal
 * another process holds.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import type { ChildProcess } from 'node:child_process';
import { cpSync, existsSync, readdirSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import {
  assertNoStack,
  assertSameBytes,
  cow,
  cowJson,
  cowOk,
  finish,
  jsonLines,
  listExports,
  qemuIo,
  readExport,
  Server,
  start,
  cowArgs,
  startPython,
  stopAll,
  tempDir,
  waitFor,
} from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

/** A client that connects once and stays: writes A, then on each stdin line reads A back and writes B. */
const heldClient = `
import sys, nbd
h = nbd.NBD()
h.connect_uri(sys.argv[1])
h.pwrite(b'\\x5a' * 65536, 0)
h.flush()
print('ready', flush=True)
for line in sys.stdin:
    assert h.pread(65536, 0) == b'\\x5a' * 65536
    h.pwrite(b'\\x5b' * 65536, 1048576)
    h.flush()
    print('ok', flush=True)
`;

test('volume, snapshot, clone, ls, map and journal inspect go through the control socket and take effect at once', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '16M']);
  const server = await Server.start(store);
  const client = startPython(heldClient, [server.uri('default')]);
  const clientOut: string[] = [];
  client.stdout!.setEncoding('utf8').on('data', (t: string) => clientOut.push(...t.split('\n').filter(Boolean)));
  const clientDone = finish(client, 'held NBD client');
  const names = Array.from({ length: 10 }, (_, i) => `vm${i}`);
  const expected = Buffer.alloc(16 * MiB);
  expected.fill(0x5a, 0, 64 * KiB);
  try {
    await waitFor('the held client to write', () => clientOut.includes('ready'));
    const record = JSON.parse(readFileSync(join(store, 'serve.json'), 'utf8')) as { pid: number; controlSocket: string };
    assert.is(record.pid, server.pid, 'serve.json names the serving pid');
    assert.ok(existsSync(record.controlSocket));
    assert.equal((await listExports(server)).map((e) => e.name), ['default']);

    const created = await cowOk(['volume', 'create', store, 'extra', '--size', '1M']);
    assert.is(created.stdout, 'created volume extra (1 MiB)\n');
    const afterCreate = await listExports(server);
    assert.equal(afterCreate.find((e) => e.name === 'extra'), { name: 'extra', readOnly: false, size: MiB }, 'a created volume is exported at once');

    const snap = await cowJson<{ volume: string; name: string; layerId: number }>(['snapshot', store, 'default', '--name', 'golden']);
    assert.equal([snap.volume, snap.name], ['default', 'golden']);
    assert.equal((await listExports(server)).find((e) => e.name === 'default@golden'), { name: 'default@golden', readOnly: true, size: 16 * MiB }, 'a snapshot is exported read-only at once');

    // Ten clones of one snapshot, all at once: the fleet case.
    const clones = await Promise.all(names.map((n) => cowJson<{ name: string; stack: number[] }>(['clone', store, 'default@golden', n])));
    assert.equal(clones.map((c) => c.name), names);
    for (const c of clones) assert.is(c.stack[c.stack.length - 2], snap.layerId, `${c.name} sits on the snapshot`);
    const exports = (await listExports(server)).map((e) => e.name);
    for (const n of names) assert.ok(exports.includes(n), `clone ${n} is exported at once`);
    assertSameBytes(await readExport(server.uri('vm3')), expected, 'a clone reads what the snapshot holds');
    await qemuIo(server.uri('vm3'), ['write -P 0x77 8M 4k']);
    assertSameBytes(await readExport(server.uri('vm4')), expected, 'a write to one clone does not show in another');

    const ls = await cowJson<{ volumes: Array<{ name: string }>; layers: Array<{ id: number; children: number[] }> }>(['ls', store]);
    assert.equal(ls.volumes.map((v) => v.name).sort(), ['default', 'extra', ...names].sort());
    assert.is(ls.layers.find((l) => l.id === snap.layerId)!.children.length, 11, 'the snapshot layer has the volume and ten clones above it');
    const tree = await cowOk(['ls', store]);
    assert.match(tree.stdout, `store ${store}: 12 volume(s), 1 snapshot(s)`);
    assert.match(tree.stdout, `layer ${snap.layerId}: frozen, 64 KiB data  <- snapshot default@golden`);
    const volumes = await cowOk(['volume', 'ls', store]);
    assert.match(volumes.stdout, /^vm9\s+16 MiB\s+3\s+\d+\s+-$/m);
    assert.match(volumes.stdout, /^default\s+16 MiB\s+3\s+\d+\s+golden$/m);
    const volumesJson = await cowJson<Array<{ name: string; sizeBytes: number; snapshots: string[]; stack: number[] }>>(['volume', 'ls', store]);
    assert.equal(volumesJson.find((v) => v.name === 'default')!.snapshots, ['golden']);
    assert.equal(volumesJson.find((v) => v.name === 'extra')!.stack.length, 2, 'volume create makes a volume on its own base');
    const map = await cowJson<Array<{ offset: number; length: number; kind: string; depth: number }>>(['map', store, 'vm3']);
    assert.equal(
      map.filter((e) => e.kind === 'data').map((e) => [e.offset, e.length, e.depth]),
      [
        [0, 64 * KiB, 2],
        [8 * MiB, 4 * KiB, 1],
      ],
    );
    const cloned = jsonLines<{ type: string; volume: string }>((await cowOk(['journal', 'inspect', store, '--type', 'Cloned', '--json'])).stdout);
    assert.equal(cloned.map((e) => e.volume).sort(), [...names].sort());

    const deleted = await cowJson(['volume', 'delete', store, 'extra']);
    assert.equal(deleted, { deleted: 'extra' });
    assert.is((await cowOk(['volume', 'delete', store, 'vm9'])).stdout, 'deleted volume vm9\n');
    const remaining = (await listExports(server)).map((e) => e.name);
    assert.not.ok(remaining.includes('extra') || remaining.includes('vm9'), 'deleted volumes are no longer exported');
    const missing = await cow(['volume', 'delete', store, 'extra']);
    assert.is(missing.code, 1);
    assert.is(missing.stderr, 'cowstack: error: no volume extra\n', 'an error from the server reads like a local one');

    client.stdin!.write('go\n');
    await waitFor('the held client to finish its second round', () => clientOut.includes('ok'));
    client.stdin!.end();
    const clientResult = await clientDone;
    assert.is(clientResult.code, 0, `the client connected throughout was not disturbed: ${clientResult.stderr}`);
  } finally {
    client.kill('SIGKILL');
    assert.is(await server.stop(), 0, 'serve exits 0 on SIGINT');
  }
  assert.not.ok(existsSync(join(store, 'serve.json')), 'serve.json is removed on a clean stop');
  const after = await cowJson<{ volumes: Array<{ name: string }> }>(['ls', store]);
  assert.equal(after.volumes.map((v) => v.name).sort(), ['default', ...names.slice(0, 9)].sort(), 'online changes were journaled');
  const defaultBytes = await exportBytesOf(store, 'default', dir);
  expected.fill(0x5b, MiB, MiB + 64 * KiB);
  assertSameBytes(defaultBytes, expected, 'the held client wrote after the snapshot and clones');
});

async function exportBytesOf(store: string, ref: string, dir: string): Promise<Buffer> {
  const file = join(dir, `${ref}.raw`);
  await cowOk(['export', store, ref, file]);
  return readFileSync(file);
}

test('recover, check and a second serve on a served store exit 1 naming the serving pid, never a stack trace', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '1M']);
  const server = await Server.start(store);
  try {
    const [recover, recoverJson, check, checkJson, second] = await Promise.all([
      cow(['recover', store]),
      cow(['recover', store, '--json']),
      cow(['check', store]),
      cow(['check', store, '--json']),
      cow(['serve', store, '--socket', join(dir, 'second.sock')]),
    ]);
    for (const [what, r] of Object.entries({ recover, check, second })) {
      assert.is(r.code, 1, `${what} on a served store exits 1`);
      assert.is(r.stdout, '');
      assertNoStack(r.stderr, what);
    }
    assert.is(recover.stderr, `cowstack: error: store ${store} is in use by cowstack serve (pid ${server.pid}); stop it before running recover\n`);
    assert.is(check.stderr, `cowstack: error: store ${store} is in use by cowstack serve (pid ${server.pid}); stop it before running check\n`);
    assert.is(second.stderr, `cowstack: error: store ${store} is in use by cowstack serve (pid ${server.pid}); stop it before running another serve\n`);
    for (const [what, r] of Object.entries({ recoverJson, checkJson })) {
      assert.is(r.code, 1);
      const parsed = JSON.parse(r.stdout) as { error: { code: string; message: string } };
      assert.is(parsed.error.code, 'ELOCKED', what);
      assert.match(parsed.error.message, `cowstack serve (pid ${server.pid})`);
    }
    assert.ok(existsSync(join(store, 'serve.json')), 'the refused commands left the server alone');
    assert.equal((await listExports(server)).map((e) => e.name), ['default'], 'the server still answers');
  } finally {
    assert.is(await server.stop(), 0);
  }
});

test('a store whose path is too long for a unix socket address still has a working control socket', async () => {
  const deep = join(tempDir('online'), 'a-directory-name-long-enough'.repeat(4));
  const store = join(deep, 'store');
  assert.ok(Buffer.byteLength(join(store, 'control.sock')) > 108, 'the control socket cannot live in the store');
  await cowOk(['init', store, '--size', '1M']);
  const server = await Server.start(store);
  try {
    const record = JSON.parse(readFileSync(join(store, 'serve.json'), 'utf8')) as { controlSocket: string };
    assert.ok(Buffer.byteLength(record.controlSocket) <= 100, `control socket ${record.controlSocket}`);
    assert.is((await cowOk(['volume', 'create', store, 'v2', '--size', '1M'])).stdout, 'created volume v2 (1 MiB)\n');
    assert.equal((await listExports(server)).map((e) => e.name).sort(), ['default', 'v2']);
  } finally {
    assert.is(await server.stop(), 0);
  }
});

/** Holds the store's journal lock (LevelDB takes a POSIX record lock on journal/LOCK) until stdin closes. */
const lockHolder = `
import fcntl, sys
f = open(sys.argv[1], 'r+')
fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
print('locked', flush=True)
sys.stdin.read()
`;

test('a serve.json left by a killed server does not misname who holds the store', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '1M']);
  const server = await Server.start(store);
  await server.crash();
  assert.ok(existsSync(join(store, 'serve.json')), 'kill -9 leaves serve.json behind');
  const holder = startPython(lockHolder, [join(store, 'journal', 'LOCK')]);
  let held = '';
  holder.stdout!.setEncoding('utf8').on('data', (t: string) => (held += t));
  const holderDone = finish(holder, 'lock holder');
  try {
    await waitFor('the lock to be held', () => held.includes('locked'));
    const [ls, recover] = await Promise.all([cow(['ls', store]), cow(['recover', store])]);
    assert.is(ls.code, 1);
    assert.is(ls.stderr, `cowstack: error: store ${store} is in use by another process that is not a cowstack serve (another command may be running on it); try again when it has finished\n`);
    assert.is(recover.code, 1);
    assert.is(recover.stderr, `cowstack: error: store ${store} is in use by another process; stop it before running recover\n`);
    for (const r of [ls, recover]) assert.not.match(r.stderr, String(server.pid), 'the dead server is not named');
  } finally {
    holder.stdin!.end();
    await holderDone;
  }
  const after = await cowJson<{ volumes: unknown[] }>(['ls', store]);
  assert.is(after.volumes.length, 1, 'with the lock released the store opens despite the stale serve.json');
});

test('recover --force leaves a damaged LevelDB table alone while another process holds the store, and sets it aside once free', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '4M']);
  const server = await Server.start(store);
  await qemuIo(server.uri('default'), ['write -P 0x5a 0 1M']);
  assert.is(await server.stop(), 0);
  await cowOk(['recover', store]); // LevelDB turns its log into a table on open
  const journalDir = join(store, 'journal');
  const table = readdirSync(journalDir).filter((n) => n.endsWith('.ldb')).sort((a, b) => statSync(join(journalDir, b)).size - statSync(join(journalDir, a)).size)[0];
  assert.ok(table !== undefined, 'the journal has a table');
  const bytes = readFileSync(join(journalDir, table));
  bytes[0] ^= 0xff;
  writeFileSync(join(journalDir, table), bytes);

  const holder = startPython(lockHolder, [join(journalDir, 'LOCK')]);
  let held = '';
  holder.stdout!.setEncoding('utf8').on('data', (t: string) => (held += t));
  const holderDone = finish(holder, 'lock holder');
  try {
    await waitFor('the lock to be held', () => held.includes('locked'));
    const refused = await cow(['recover', store, '--force']);
    assert.is(refused.code, 1);
    assert.is(refused.stderr, `cowstack: error: store ${store} is in use by another process; stop it before running recover\n`);
    assert.ok(existsSync(join(journalDir, table)) && !existsSync(join(journalDir, 'damaged')), 'nothing was moved');
    assert.equal(readFileSync(join(journalDir, table)), bytes, 'the table is untouched');
  } finally {
    holder.stdin!.end();
    await holderDone;
  }
  // The same salvage on a copy, reported as text.
  const copy = join(dir, 'copy');
  cpSync(store, copy, { recursive: true });
  const salvaged = await cow(['recover', store, '--force', '--json']);
  assertNoStack(salvaged.stderr, 'recover --force');
  assert.ok(existsSync(join(journalDir, 'damaged', table)) && !existsSync(join(journalDir, table)), 'the damaged table is set aside');
  const text = await cow(['recover', copy, '--force']);
  assert.is(text.code, salvaged.code, 'text and JSON runs end alike');
  const report = salvaged.code === 0 ? (JSON.parse(salvaged.stdout) as { salvage: { reason: string; tables: { tables: Array<{ file: string; movedTo: string }> } } }) : undefined;
  if (report !== undefined) {
    assert.equal(report.salvage.tables.tables.map((t) => [t.file, t.movedTo]), [[table, join('damaged', table)]]);
    assert.match(text.stdout, `  SALVAGED            `);
    assert.match(text.stdout, `LevelDB table ${table} was damaged`);
  } else {
    for (const r of [salvaged, text]) assert.match(r.stderr, `set damaged LevelDB files aside: LevelDB table ${table} was damaged`);
  }
});

test('journal tail --follow prints events as the server commits them and stops on SIGINT', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '4M']);
  const { lastSeq: initSeq } = await cowJson<{ lastSeq: number }>(['journal', 'stats', store]);
  const server = await Server.start(store);
  const [node, ...args] = cowArgs(['journal', 'tail', store, '--follow', '-n', '2', '--json']);
  const tail = start(node, args);
  tail.stdin!.end();
  const done = finish(tail, 'journal tail --follow');
  let seen = '';
  tail.stdout!.on('data', (t: string) => (seen += t));
  try {
    await waitFor('the last two events', () => jsonLines(seen).length >= 2);
    assert.equal(jsonLines<{ seq: number }>(seen).map((e) => e.seq), [initSeq - 1, initSeq]);
    await qemuIo(server.uri('default'), ['write -P 0x01 64k 8k']);
    await cowOk(['snapshot', store, 'default', '--name', 'live']);
    await waitFor('the write and the snapshot to be followed', () => jsonLines(seen).length >= 4, 10_000);
    const [write, frozen] = jsonLines<{ seq: number; type: string; volume: string; offset: number; length: number; detail: string }>(seen).slice(2);
    assert.equal([write.seq, write.type, write.volume, write.offset, write.length], [initSeq + 1, 'Write', 'default', 64 * KiB, 8 * KiB]);
    assert.equal([frozen.seq, frozen.type, frozen.volume], [initSeq + 2, 'Frozen', 'default']);
    assert.match(frozen.detail, 'snapshot default@live');
    tail.kill('SIGINT');
    const result = await done;
    assert.is(result.code, 0, `tail --follow exits 0 on SIGINT: ${result.stderr}`);
    assert.is(result.stderr, '');

    // A follower still running when the server stops ends too, with a note (exit 0).
    const [node2, ...args2] = cowArgs(['journal', 'tail', store, '--follow', '-n', '1']);
    const second = start(node2, args2);
    second.stdin!.end();
    const secondDone = finish(second, 'second journal tail --follow');
    let secondSeen = '';
    second.stdout!.on('data', (t: string) => (secondSeen += t));
    await waitFor('the second follower to start', () => secondSeen.includes('Frozen'));
    assert.is(await server.stop(), 0);
    const ended = await secondDone;
    assert.is(ended.code, 0, `a follow ended by the server stopping exits 0: ${ended.stderr}`);
    assert.is(ended.stderr, `cowstack: cowstack serve (pid ${server.pid}) is stopping; no more events to follow\n`);
  } finally {
    tail.kill('SIGKILL');
    await server.stop();
  }
  // Not served: the last events, then a note that there is nothing to follow.
  const offline = await cowOk(['journal', 'tail', store, '--follow', '-n', '1']);
  assert.match(offline.stdout, /^\s+\d+\s+\S+Z\s+Frozen\s+default\/L\d+\s+crc [0-9a-f]{8}\s+snapshot default@live/);
  assert.is(offline.stderr, 'cowstack: the store is not being served, so no new events can arrive; not following\n');
});

test('journal tail --follow under write load: no event is missed or repeated between the listing and the live part', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '64M']);
  const server = await Server.start(store);
  const writer = start('/usr/bin/python3', [join(import.meta.dirname, 'fixtures', 'region-writer.py'), server.uri('default'), '1', '4096', '16384', '16']);
  writer.stdin!.end();
  const writerDone = finish(writer, 'region writer');
  let tail: ChildProcess | undefined;
  try {
    // Start following once the journal is long enough that listing it takes a while, mid-load.
    await waitFor('a long journal', async () => (await cowJson<{ lastSeq: number }>(['journal', 'stats', store])).lastSeq > 1500, 30_000, 100);
    const [node, ...args] = cowArgs(['journal', 'tail', store, '--follow', '-n', '1000000', '--json']);
    tail = start(node, args);
    tail.stdin!.end();
    const done = finish(tail, 'journal tail --follow');
    let seen = '';
    tail.stdout!.on('data', (t: string) => (seen += t));
    const result = await writerDone;
    assert.is(result.code, 0, result.stderr);
    const { lastSeq } = await cowJson<{ lastSeq: number }>(['journal', 'stats', store]);
    await waitFor(`the follower to reach seq ${lastSeq}`, () => seen.includes(`"seq":${lastSeq},`), 20_000);
    tail.kill('SIGINT');
    assert.is((await done).code, 0);
    const seqs = jsonLines<{ seq: number }>(seen).map((e) => e.seq);
    assert.is(seqs.length, lastSeq, `every event once (got ${seqs.length} lines for ${lastSeq} events)`);
    seqs.forEach((seq, i) => assert.is(seq, i + 1, `line ${i} is seq ${i + 1}`));
  } finally {
    writer.kill('SIGKILL');
    tail?.kill('SIGKILL');
    await server.stop();
  }
});

/** Prometheus text format → sample name with labels → value. */
function samples(text: string): Map<string, number> {
  const out = new Map<string, number>();
  for (const line of text.split('\n')) {
    if (line === '' || line.startsWith('#')) continue;
    const at = line.lastIndexOf(' ');
    out.set(line.slice(0, at), Number(line.slice(at + 1)));
  }
  return out;
}

function types(text: string): Map<string, string> {
  return new Map([...text.matchAll(/^# TYPE (\S+) (\S+)$/gm)].map((m) => [m[1], m[2]]));
}

test('serve --metrics: the metric families exist and move with requests, journal appends and the layer tree', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '8M']);
  const server = await Server.start(store, ['--metrics', '127.0.0.1:0']);
  try {
    const url = server.metricsUrl;
    assert.match(url, /^http:\/\/127\.0\.0\.1:\d+\/metrics$/);
    const first = await fetch(url);
    assert.is(first.status, 200);
    assert.match(first.headers.get('content-type') ?? '', 'text/plain');
    const firstText = await first.text();
    const declared = types(firstText);
    for (const [name, type] of Object.entries({
      cowstack_nbd_requests_total: 'counter',
      cowstack_nbd_request_bytes_total: 'counter',
      cowstack_nbd_request_duration_seconds: 'histogram',
      cowstack_nbd_connections: 'gauge',
      cowstack_journal_appends_total: 'counter',
      cowstack_journal_batches_total: 'counter',
      cowstack_journal_batch_records: 'histogram',
      cowstack_journal_batch_duration_seconds: 'histogram',
      cowstack_checkpoints_total: 'counter',
      cowstack_checkpoint_duration_seconds: 'histogram',
      cowstack_replay_events: 'gauge',
      cowstack_volumes: 'gauge',
      cowstack_layers: 'gauge',
      cowstack_snapshots: 'gauge',
      cowstack_journal_last_seq: 'gauge',
    })) {
      assert.is(declared.get(name), type, `metric ${name} is a ${type}`);
    }
    const before = samples(firstText);
    assert.is(before.get('cowstack_volumes'), 1);
    assert.is(before.get('cowstack_layers'), 2);
    assert.is(before.get('cowstack_snapshots'), 0);
    const { lastSeq } = await cowJson<{ lastSeq: number }>(['journal', 'stats', store]);
    assert.is(before.get('cowstack_journal_last_seq'), lastSeq);

    // 32 writes in flight at once (group commit), a flush and a read.
    const writes = Array.from({ length: 32 }, (_, i) => `aio_write -P ${i + 1} ${i * 64 * KiB} 4k`);
    await qemuIo(server.uri('default'), [...writes, 'aio_flush', 'read 0 128k']);
    await cowOk(['snapshot', store, 'default', '--name', 'm']);
    await cowOk(['clone', store, 'default@m', 'vm1']);

    const after = samples(await (await fetch(url)).text());
    const get = (name: string): number => after.get(name) ?? 0;
    const grew = (name: string): number => get(name) - (before.get(name) ?? 0);
    assert.is(grew('cowstack_nbd_requests_total{command="WRITE"}'), 32);
    assert.ok(grew('cowstack_nbd_requests_total{command="READ"}') >= 1);
    assert.ok(grew('cowstack_nbd_requests_total{command="FLUSH"}') >= 1);
    assert.is(grew('cowstack_nbd_request_bytes_total{command="WRITE"}'), 32 * 4 * KiB);
    assert.is(get('cowstack_nbd_request_duration_seconds_count{command="WRITE"}'), 32, 'one latency observation per write');
    assert.is(get('cowstack_nbd_request_duration_seconds_bucket{le="+Inf",command="WRITE"}'), 32);
    assert.ok(get('cowstack_nbd_request_duration_seconds_sum{command="WRITE"}') > 0);
    assert.is(grew('cowstack_journal_appends_total'), 32 + 2, 'each write, the snapshot and the clone are appended');
    assert.is(get('cowstack_journal_batch_records_sum'), get('cowstack_journal_appends_total'), 'batch sizes add up to the appends');
    assert.ok(get('cowstack_journal_batch_records_count') < 32 + 2, 'concurrent writes shared group-commit batches');
    assert.ok(get('cowstack_journal_batches_total{sync="true"}') + get('cowstack_journal_batches_total{sync="false"}') === get('cowstack_journal_batch_records_count'));
    assert.is(get('cowstack_journal_batch_duration_seconds_count'), get('cowstack_journal_batch_records_count'));
    assert.is(get('cowstack_volumes'), 2);
    assert.is(get('cowstack_layers'), 4);
    assert.is(get('cowstack_snapshots'), 1);
    assert.is(get('cowstack_journal_last_seq'), lastSeq + 32 + 2);
    assert.is(get('cowstack_checkpoint_duration_seconds_count'), 0, 'a few small writes take no checkpoint');
    assert.ok(get('cowstack_process_resident_memory_bytes') > 0, 'process metrics are exported');

    const other = await fetch(url.replace('/metrics', '/other'));
    assert.is(other.status, 404);
  } finally {
    await stopAll([server]);
  }
});

test('serve --checkpoint-every: a checkpoint after each interval of write data, in the metrics and the -v log', async () => {
  const dir = tempDir('online');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '32M']);
  const writes = 16;
  const server = await Server.start(store, ['--metrics', '127.0.0.1:0', '--checkpoint-every', '4M', '-v']);
  try {
    const url = server.metricsUrl;
    // 16 MiB of write data against a 4 MiB interval, in 1 MiB writes: each fourth write makes a
    // checkpoint due, and the next 4 MiB wait until it is written (one coming due while another is
    // being written would wait for the next commit).
    const count = async (): Promise<Map<string, number>> => samples(await (await fetch(url)).text());
    for (let round = 1; round <= writes / 4; round++) {
      await qemuIo(
        server.uri('default'),
        Array.from({ length: 4 }, (_, j) => `write -P ${(round - 1) * 4 + j + 1} ${((round - 1) * 4 + j) * MiB} 1M`),
      );
      await waitFor(`checkpoint ${round}`, async () => ((await count()).get('cowstack_checkpoints_total{reason="bytes"}') ?? 0) >= round);
    }
    const metrics = await count();
    const taken = metrics.get('cowstack_checkpoints_total{reason="bytes"}');
    assert.is(taken, writes / 4, 'one checkpoint per 4 MiB');
    assert.is(metrics.get('cowstack_checkpoint_duration_seconds_count'), taken, 'one duration per checkpoint');
    assert.ok(metrics.get('cowstack_checkpoint_duration_seconds_sum')! > 0);
    const logged = [...server.stderr.matchAll(/checkpoint at seq (\d+) \(bytes\) in \d+ ms/g)].map((m) => Number(m[1]));
    assert.is(logged.length, taken, `each checkpoint is logged:\n${server.stderr}`);
    assert.ok(logged.every((seq, i) => i === 0 || seq === logged[i - 1] + 4), `four write events apart: ${logged.join(', ')}`);
    // The journal keeps the two newest checkpoints, both taken for write data.
    const { checkpointSeqs } = await cowJson<{ checkpointSeqs: number[] }>(['journal', 'stats', store]);
    assert.equal(checkpointSeqs, logged.slice(-2));
  } finally {
    await stopAll([server]);
  }
  const expected = Buffer.alloc(32 * MiB);
  for (let i = 0; i < writes; i++) expected.fill(i + 1, i * MiB, (i + 1) * MiB);
  const again = await Server.start(store);
  try {
    assertSameBytes(await readExport(again.uri('default')), expected, 'the volume after the checkpoints and a restart');
  } finally {
    await stopAll([again]);
  }
});

test.run();
