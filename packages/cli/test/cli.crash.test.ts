/**
 * kill -9 of `cowstack serve` under client load, then `cowstack recover`, `cowstack check` and a
 * fresh `serve`: nothing acknowledged is lost. Two libnbd clients write distinct regions of two
 * volumes (one a clone of a snapshot) with 16 writes in flight each, some with FUA, while a snapshot
 * is taken through the control socket; the server is killed mid-stream. The crashed store is copied
 * three ways: `recover --json` and `recover` (text) must report the same replay (checkpoint seq,
 * events replayed, writes re-applied, seconds, events/s), and a third copy is served directly and
 * recovers on its own (and reports the replay as metrics). Every acknowledged region must read back; every other region must hold
 * either its old or its new content, never a mix.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { cpSync, lstatSync } from 'node:fs';
import { join } from 'node:path';
import { assertSameBytes, cowJson, cowOk, qemuIo, readExport, Server, start, stopAll, tempDir, waitFor } from './helpers.js';

const MiB = 1024 * 1024;
const volumeBytes = 32 * MiB;
const regionBytes = 16 * 1024;
const regions = volumeBytes / regionBytes;
/** Acknowledged writes per client before the kill; the kill comes with many more in flight. */
const ackedBeforeKill = 300;
/** The base pattern written before the snapshot the clone is made from. */
const basePatternBytes = MiB;
const writerScript = join(import.meta.dirname, 'fixtures', 'region-writer.py');
/** Writes each client keeps in flight. */
const writerDepth = 16;

function regionContent(tag: number, r: number): Buffer {
  const data = Buffer.alloc(regionBytes, ((tag * 31 + r) % 251) + 1);
  data.writeUInt32LE(r, 0);
  return data;
}

interface Writer {
  readonly volume: string;
  readonly tag: number;
  readonly acked: Set<number>;
  readonly exited: Promise<void>;
}

function startWriter(server: Server, volume: string, tag: number): Writer {
  const child = start('/usr/bin/python3', [writerScript, server.uri(volume), String(tag), String(regions), String(regionBytes), String(writerDepth)]);
  child.stdin!.end();
  const acked = new Set<number>();
  let buffered = '';
  child.stdout!.setEncoding('utf8').on('data', (text: string) => {
    buffered += text;
    const lines = buffered.split('\n');
    buffered = lines.pop()!;
    for (const line of lines) if (line.startsWith('ack ')) acked.add(Number(line.slice(4)));
  });
  let stderr = '';
  child.stderr!.setEncoding('utf8').on('data', (t: string) => (stderr += t));
  // 'close', not 'exit': every ack line the writer printed has been read by then.
  const exited = new Promise<void>((resolve, reject) =>
    child.on('close', (code) => (code === 0 ? resolve() : reject(new Error(`writer for ${volume} exited ${code}: ${stderr}`)))),
  );
  return { volume, tag, acked, exited };
}

/** Every acknowledged region holds its new content; every other one its old or its new, whole. */
function verifyRegions(bytes: Buffer, writer: Writer, old: (r: number) => Buffer, what: string): { newer: number } {
  assert.is(bytes.length, volumeBytes, `${what}: size`);
  let newer = 0;
  for (let r = 0; r < regions; r++) {
    const got = bytes.subarray(r * regionBytes, (r + 1) * regionBytes);
    const expected = regionContent(writer.tag, r);
    if (writer.acked.has(r)) assertSameBytes(got, expected, `${what}: acknowledged region ${r}`);
    else if (got.equals(expected)) newer++;
    else assertSameBytes(got, old(r), `${what}: unacknowledged region ${r} (neither old nor new content)`);
  }
  return { newer };
}

test('kill -9 under load, recover (text and --json), check, serve again: every acknowledged write reads back', async () => {
  const dir = tempDir('crash');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', `${volumeBytes}`]);
  let server = await Server.start(store);
  let writers: Writer[] = [];
  let loadSnapshot = { name: '' };
  try {
    await qemuIo(server.uri('default'), [`write -P 0xee 0 ${basePatternBytes}`]);
    await cowOk(['snapshot', server.store, 'default', '--name', 'base']);
    await cowOk(['clone', server.store, 'default@base', 'vm1']);
    writers = [startWriter(server, 'default', 1), startWriter(server, 'vm1', 2)];
    await waitFor('the writers to be acknowledged a first time', () => writers.every((w) => w.acked.size >= 20), 30_000, 10);
    loadSnapshot = await cowJson(['snapshot', store, 'default', '--name', 'under-load']);
    await waitFor(`${ackedBeforeKill} acknowledged writes per writer`, () => writers.every((w) => w.acked.size >= ackedBeforeKill), 60_000, 5);
    await server.crash();
    await Promise.all(writers.map((w) => w.exited));
  } finally {
    await stopAll([server]);
  }
  for (const w of writers) assert.ok(w.acked.size < regions, `the ${w.volume} writer was still writing when the server died (${w.acked.size} of ${regions})`);
  const copies = [join(dir, 'text'), join(dir, 'served')];
  // The crash left serve.json and the control socket behind; sockets cannot be copied.
  for (const c of copies) cpSync(store, c, { recursive: true, filter: (src) => !lstatSync(src).isSocket() });

  interface Report {
    checkpointSeq: number;
    checkpointsSkipped: unknown[];
    lastSeq: number;
    eventsReplayed: number;
    writesReapplied: number;
    durationMs: number;
    eventsPerSecond: number;
    checkpointWritten: boolean;
  }
  const report = await cowJson<Report>(['recover', store]);
  assert.ok(report.eventsReplayed > 0, 'the crash left events after the last checkpoint');
  assert.ok(report.checkpointSeq < report.lastSeq);
  assert.ok(report.eventsReplayed <= report.lastSeq - report.checkpointSeq, 'replay starts after the checkpoint');
  assert.ok(report.writesReapplied > 0 && report.writesReapplied <= report.eventsReplayed, `writes re-applied: ${report.writesReapplied}`);
  assert.ok(report.writesReapplied >= writers.reduce((n, w) => n + w.acked.size, 0) / 2, 'most acknowledged writes came after the checkpoint');
  assert.ok(report.durationMs > 0);
  assert.ok(Math.abs(report.eventsPerSecond - (report.eventsReplayed / report.durationMs) * 1000) < 1, 'events/s is events over seconds');
  assert.equal([report.checkpointWritten, report.checkpointsSkipped], [true, []]);

  const text = await cowOk(['recover', copies[0]]);
  assert.is(text.stderr, '', 'no progress bar when stderr is not a terminal');
  const lines = text.stdout.trimEnd().split('\n');
  assert.is(lines[0], `recovered ${copies[0]}`);
  assert.is(lines[1], `  checkpoint used     seq ${report.checkpointSeq}`);
  assert.is(lines[2], `  events replayed     ${report.eventsReplayed} (to seq ${report.lastSeq})`);
  assert.is(lines[3], `  writes re-applied   ${report.writesReapplied}`);
  assert.match(lines[4], /^ {2}orphan files {8}\d+ removed$/);
  assert.match(lines[5], /^ {2}time {16}\d+\.\d{3} s \([\d,]+ events\/s\)$/);
  assert.is(lines[6], `  checkpoint written  yes, seq ${report.lastSeq}`);

  const again = await cowJson<Report>(['recover', store]);
  assert.equal([again.eventsReplayed, again.writesReapplied, again.checkpointSeq, again.checkpointWritten], [0, 0, report.lastSeq, false], 'a second recover has nothing to do');
  const checkText = await cowOk(['check', store]);
  assert.match(checkText.stdout, new RegExp(`^check ${store}: ok \\(${report.lastSeq} events, \\d+ data blocks verified in \\d+\\.\\d\\d s\\)\\n$`));
  const check = await cowJson<{ ok: boolean; problems: unknown[]; eventsChecked: number; dataBlocksChecked: number }>(['check', copies[0]]);
  assert.equal([check.ok, check.problems, check.eventsChecked], [true, [], report.lastSeq]);
  assert.ok(check.dataBlocksChecked >= (writers.reduce((n, w) => n + w.acked.size, 0) * regionBytes) / 4096);

  const ls = await cowJson<{ snapshots: Array<{ volume: string; name: string }> }>(['ls', store]);
  assert.equal(
    ls.snapshots.map((s) => `${s.volume}@${s.name}`).sort(),
    ['default@base', `default@${loadSnapshot.name}`],
    'the snapshot taken under load survived',
  );

  // Both volumes start from the snapshot holding the base pattern.
  const old = (r: number): Buffer => Buffer.alloc(regionBytes, r * regionBytes < basePatternBytes ? 0xee : 0);
  let served: Server | undefined;
  try {
    server = await Server.start(store);
    served = await Server.start(copies[1], ['--metrics', '127.0.0.1:0']);
    const replayed = /recovered: replayed (\d+) events after checkpoint seq (\d+), re-applied (\d+) writes/.exec(served.stderr);
    assert.ok(replayed, `serve recovers a crashed store by itself: ${served.stderr}`);
    assert.equal(replayed!.slice(1).map(Number), [report.eventsReplayed, report.checkpointSeq, report.writesReapplied], 'serve replays what recover replayed');
    const metrics = await (await fetch(served.metricsUrl)).text();
    assert.match(metrics, `\ncowstack_replay_events ${report.eventsReplayed}\n`, 'replay progress is a metric');
    assert.match(metrics, `\ncowstack_replay_events_total_to_replay ${report.eventsReplayed}\n`);
    for (const w of writers) {
      const [a, b] = await Promise.all([readExport(server.uri(w.volume)), readExport(served.uri(w.volume))]);
      verifyRegions(a, w, old, `${w.volume} after recover`);
      verifyRegions(b, w, old, `${w.volume} after serve's own recovery`);
    }
  } finally {
    await stopAll([server, served]);
  }
  const final = await cowJson<{ ok: boolean }>(['check', copies[1]]);
  assert.ok(final.ok);
});

test.run();
