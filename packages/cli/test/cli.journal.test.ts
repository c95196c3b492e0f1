/**
 * Journal inspection and damage reports on a store with a known history (created, written by
 * qemu-io, snapshotted, cloned, a volume created and deleted): `journal inspect` lists every event
 * with its seq, time, type, volume/layer, range and CRC (text, and JSON lines with --json), and its
 * --from/--to/--volume/--type filters select exactly the matching events; `journal tail -n`;
 * `journal stats` and `journal verify` (text and JSON). Then a byte flipped in a layer data file:
 * `check` exits 1 and names volume, layer, block and seq of every damaged block, in text and JSON.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { closeSync, constants, openSync, readdirSync, readFileSync, readSync, writeSync } from 'node:fs';
import { join } from 'node:path';
import { blockCrcs, EventType, type StoreEvent } from '@cowstack/core';
import { Journal } from '@cowstack/journal';
import { cow, cowJson, cowOk, jsonLines, qemuIo, Server, tempDir } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;

interface EventLine {
  seq: number;
  time: string;
  type: string;
  volume: string | null;
  layer: number | null;
  offset: number | null;
  length: number | null;
  crc: string;
  detail: string;
}

const history = [
  'StoreCreated',
  'LayerCreated',
  'VolumeCreated',
  'Write',
  'Write',
  'Frozen',
  'Cloned',
  'Write',
  'Zero',
  'LayerCreated',
  'VolumeCreated',
  'VolumeDeleted',
];

let built: Promise<{ store: string; goldenLayer: number; vm1Layer: number }> | undefined;

/** The store with the known history (built once, shared by the tests below). */
function knownStore(): Promise<{ store: string; goldenLayer: number; vm1Layer: number }> {
  built ??= (async () => {
    const store = join(tempDir('journal'), 'store');
    await cowOk(['init', store, '--size', '8M']);
    const server = await Server.start(store);
    try {
      await qemuIo(server.uri('default'), ['write -P 0x01 0 64k', 'write -P 0x02 1M 8k']);
      await cowOk(['snapshot', store, 'default', '--name', 'golden']);
      await cowOk(['clone', store, 'default@golden', 'vm1']);
      await qemuIo(server.uri('vm1'), ['write -P 0x03 2M 4k', 'write -z 3M 8k']);
      await cowOk(['volume', 'create', store, 'extra', '--size', '1M']);
      await cowOk(['volume', 'delete', store, 'extra']);
    } finally {
      assert.is(await server.stop(), 0);
    }
    const ls = await cowJson<{ snapshots: Array<{ layerId: number }>; volumes: Array<{ name: string; topLayerId: number }> }>(['ls', store]);
    return { store, goldenLayer: ls.snapshots[0].layerId, vm1Layer: ls.volumes.find((v) => v.name === 'vm1')!.topLayerId };
  })();
  return built;
}

async function inspect(args: string[]): Promise<EventLine[]> {
  const r = await cowOk(['journal', 'inspect', ...args, '--json']);
  assert.is(r.stderr, '');
  return jsonLines<EventLine>(r.stdout);
}

test('journal inspect: every event, in text and as JSON lines', async () => {
  const { store, goldenLayer, vm1Layer } = await knownStore();
  const events = await inspect([store]);
  assert.equal(
    events.map((e) => e.seq),
    history.map((_, i) => i + 1),
  );
  assert.equal(
    events.map((e) => e.type),
    history,
  );
  let lastTime = 0;
  for (const e of events) {
    assert.equal(Object.keys(e).sort(), ['crc', 'detail', 'layer', 'length', 'offset', 'seq', 'time', 'type', 'volume']);
    assert.match(e.crc, /^[0-9a-f]{8}$/);
    const t = Date.parse(e.time);
    assert.ok(t >= lastTime && new Date(t).toISOString() === e.time, `seq ${e.seq} time ${e.time}`);
    lastTime = t;
  }
  const pick = (e: EventLine) => [e.volume, e.layer, e.offset, e.length];
  assert.equal(pick(events[3]), ['default', goldenLayer, 0, 64 * KiB]);
  assert.equal(pick(events[4]), ['default', goldenLayer, MiB, 8 * KiB]);
  assert.equal(pick(events[7]), ['vm1', vm1Layer, 2 * MiB, 4 * KiB]);
  assert.equal(pick(events[8]), ['vm1', vm1Layer, 3 * MiB, 8 * KiB]);
  assert.match(events[3].detail, /^data crc [0-9a-f]{8}$/);
  assert.equal([events[5].volume, events[5].layer], ['default', goldenLayer]);
  assert.match(events[5].detail, /^snapshot default@golden, new top layer \d+$/);
  assert.equal([events[6].volume, events[6].layer, events[6].detail], ['vm1', vm1Layer, `clone of layer ${goldenLayer}`]);
  assert.equal([events[11].volume, events[11].layer], ['extra', null]);
  assert.equal([events[0].volume, events[0].layer, events[0].detail], [null, null, 'block size 4096, format 1']);

  const text = await cowOk(['journal', 'inspect', store]);
  assert.is(text.stderr, '');
  const lines = text.stdout.trimEnd().split('\n');
  assert.is(lines.length, history.length);
  assert.match(lines[3], new RegExp(`^\\s+4  \\S+Z  Write\\s+default/L${goldenLayer}\\s+off 0 len 65536\\s+crc ${events[3].crc}  data crc [0-9a-f]{8}$`));
  assert.match(lines[8], new RegExp(`^\\s+9  \\S+Z  Zero\\s+vm1/L${vm1Layer}\\s+off 3145728 len 8192\\s+crc ${events[8].crc}$`));
  assert.match(lines[1], /^\s+2 {2}\S+Z {2}LayerCreated\s+L\d+\s+size 8388608\s+crc [0-9a-f]{8} {2}zero base$/);
});

test('journal inspect filters: --from, --to, --volume, --type (any case), combined, and past the end', async () => {
  const { store } = await knownStore();
  const seqs = async (args: string[]): Promise<number[]> => (await inspect([store, ...args])).map((e) => e.seq);
  assert.equal(await seqs(['--from', '4', '--to', '6']), [4, 5, 6]);
  assert.equal(await seqs(['--from', '10']), [10, 11, 12]);
  assert.equal(await seqs(['--to', '2']), [1, 2]);
  assert.equal(await seqs(['--volume', 'vm1']), [7, 8, 9]);
  assert.equal(await seqs(['--type', 'write']), [4, 5, 8]);
  assert.equal(await seqs(['--type', 'Write', '--volume', 'default']), [4, 5]);
  assert.equal(await seqs(['--type', 'ZERO', '--from', '1', '--to', '12']), [9]);
  assert.equal(await seqs(['--volume', 'nobody']), []);
  assert.equal(await seqs(['--from', '100']), []);
  const text = await cowOk(['journal', 'inspect', store, '--volume', 'vm1', '--type', 'Cloned']);
  assert.match(text.stdout, /^\s+7 {2}\S+Z {2}Cloned\s+vm1\/L\d+\s+crc [0-9a-f]{8} {2}clone of layer \d+\n$/);
});

test('journal tail: the last events, -n, text and JSON lines', async () => {
  const { store } = await knownStore();
  const all = jsonLines<EventLine>((await cowOk(['journal', 'tail', store, '--json'])).stdout);
  assert.equal(
    all.map((e) => e.seq),
    [3, 4, 5, 6, 7, 8, 9, 10, 11, 12],
    'ten by default',
  );
  const three = jsonLines<EventLine>((await cowOk(['journal', 'tail', store, '-n', '3', '--json'])).stdout);
  assert.equal(
    three.map((e) => [e.seq, e.type]),
    [
      [10, 'LayerCreated'],
      [11, 'VolumeCreated'],
      [12, 'VolumeDeleted'],
    ],
  );
  const one = await cowOk(['journal', 'tail', store, '--lines', '1']);
  assert.match(one.stdout, /^\s+12 {2}\S+Z {2}VolumeDeleted\s+extra\s+crc [0-9a-f]{8}\n$/);
  assert.is(one.stderr, '');
  const more = jsonLines((await cowOk(['journal', 'tail', store, '-n', '100', '--json'])).stdout);
  assert.is(more.length, 12, '-n larger than the journal gives all of it');
});

test('journal stats and journal verify, text and JSON', async () => {
  const { store } = await knownStore();
  const stats = await cowJson<{
    records: number;
    firstSeq: number;
    lastSeq: number;
    diskBytes: number;
    spareBytes: number;
    checkpointSeqs: number[];
    eventsByType: Record<string, number>;
    retainedPayloadBytes: number;
    payloadsRetainedFromSeq: number; payloadsRetainedFromTime: string;
  }>(['journal', 'stats', store]);
  assert.equal([stats.records, stats.firstSeq, stats.lastSeq], [12, 1, 12]);
  assert.ok(stats.diskBytes > 0);
  assert.is(stats.spareBytes, 0, 'no payload segment was retired, so none is kept as a spare');
  assert.ok(stats.checkpointSeqs.length > 0 && stats.checkpointSeqs.every((s) => s >= 1 && s <= 12));
  assert.equal(stats.eventsByType, { StoreCreated: 1, LayerCreated: 2, VolumeCreated: 2, Write: 3, Frozen: 1, Cloned: 1, Zero: 1, VolumeDeleted: 1 });
  assert.is(stats.retainedPayloadBytes, 64 * KiB + 8 * KiB + 4 * KiB, 'every write payload is still kept');
  assert.ok(stats.payloadsRetainedFromSeq <= 4, `payloads kept from seq ${stats.payloadsRetainedFromSeq}: the first write is seq 4`);
  const text = await cowOk(['journal', 'stats', store]);
  const lines = text.stdout.trimEnd().split('\n');
  assert.is(lines[0], `journal of ${store}`);
  assert.is(lines[1], '  records          12 (seq 1..12)');
  assert.match(lines[2], /^ {2}on disk {10}[\d.]+ (B|KiB|MiB)$/);
  assert.is(lines[3], `  checkpoints      ${stats.checkpointSeqs.map((s) => `seq ${s}`).join(', ')}`);
  assert.is(lines[4], `  write payloads   kept from seq ${stats.payloadsRetainedFromSeq} (${stats.payloadsRetainedFromTime}), 76 KiB: time travel reaches back that far`);
  assert.is(lines[5], '  retention        checkpoint (only what crash recovery needs)');
  assert.is(lines[6], '  events by type   StoreCreated 1, LayerCreated 2, VolumeCreated 2, Write 3, Frozen 1, Cloned 1, Zero 1, VolumeDeleted 1');

  const verify = await cowJson<{ ok: boolean; recordsChecked: number; payloadsChecked: number; firstSeq: number; lastSeq: number; problems: unknown[] }>(['journal', 'verify', store]);
  assert.equal(verify, { ok: true, recordsChecked: 12, payloadsChecked: 3, firstSeq: 1, lastSeq: 12, problems: [] });
  const verifyText = await cowOk(['journal', 'verify', store]);
  assert.is(verifyText.stdout, 'journal ok: 12 records (seq 1..12), 3 payloads verified\n');
});

/** Flip one byte of a layer's data file at a volume offset (layer files map blocks 1:1). */
function flipByte(store: string, layerId: number, offset: number): void {
  flipAt(join(store, 'layers', `${layerId}.data`), offset);
}

function flipAt(path: string, offset: number): void {
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, offset);
    b[0] ^= 0x40;
    writeSync(fd, b, 0, 1, offset);
  } finally {
    closeSync(fd);
  }
}

test('check names volume, layer, block and seq of each damaged block (text and JSON), exit 1', async () => {
  const { store, goldenLayer, vm1Layer } = await knownStore();
  const clean = await cowOk(['check', store]);
  assert.match(clean.stdout, new RegExp(`^check ${store}: ok \\(12 events, 19 data blocks verified in \\d+\\.\\d\\d s\\)\\n$`));

  flipByte(store, vm1Layer, 2 * MiB + 100);
  const one = await cow(['check', store]);
  assert.is(one.code, 1, 'damage found: exit 1');
  assert.is(one.stderr, '');
  assert.match(
    one.stdout,
    new RegExp(
      `^check ${store}: 1 problem found\\n  data: volume vm1, layer ${vm1Layer}, block 512 \\(offset 2097152\\): data CRC 0x[0-9a-f]{8} does not match CRC 0x[0-9a-f]{8} of its last write, seq 8\\n$`,
    ),
  );

  // The snapshot layer is shared: its damage concerns both volumes that read it.
  flipByte(store, goldenLayer, MiB + 4 * KiB + 7);
  const r = await cow(['check', store, '--json']);
  assert.is(r.code, 1);
  assert.is(r.stderr, '');
  const report = JSON.parse(r.stdout) as { ok: boolean; problems: Array<{ kind: string; layerId: number; volumes: string[]; block: number; seq: number; message: string }> };
  assert.is(report.ok, false);
  const found = report.problems.map((p) => [p.kind, p.layerId, [...p.volumes].sort(), p.block, p.seq]);
  assert.equal(
    found.sort((a, b) => (a[3] as number) - (b[3] as number)),
    [
      ['data', goldenLayer, ['default', 'vm1'], 257, 5],
      ['data', vm1Layer, ['vm1'], 512, 8],
    ],
  );
  for (const p of report.problems) assert.match(p.message, `block ${p.block} `);
  const text = await cow(['check', store]);
  assert.is(text.code, 1);
  assert.match(text.stdout, `check ${store}: 2 problems found\n`);
  assert.match(text.stdout, /data: volumes? (default, vm1|vm1, default), layer \d+, block 257 \(offset 1052672\)/);

  // The journal itself is intact.
  const verify = await cowOk(['journal', 'verify', store]);
  assert.match(verify.stdout, /^journal ok/);
});

/**
 * A new 8 MiB store with a durable one-block write of `data` to each of `blocks` of its top layer
 * after its last checkpoint, one batch each, as a crash leaves them (journaled, not yet in the layer
 * file). Returns the store, the top layer, the last seq and its one payload segment.
 */
async function storeWithWrites(blocks: readonly number[], data: Buffer): Promise<{ store: string; top: number; lastSeq: number; segment: string }> {
  const store = join(tempDir(), 'store');
  await cowOk(['init', store, '--size', '8M']);
  const top = (await cowJson<{ volumes: Array<{ name: string; topLayerId: number }> }>(['ls', store])).volumes[0].topLayerId;
  const journal = await Journal.open<StoreEvent>(join(store, 'journal'));
  for (const block of blocks) await journal.append([EventType.Write, top, block, 1, blockCrcs(data, 4096)], { payload: data, sync: true });
  const lastSeq = journal.lastSeq;
  await journal.close();
  const payloads = join(store, 'journal', 'payloads');
  const segments = readdirSync(payloads).filter((f) => f.endsWith('.seg'));
  assert.is(segments.length, 1);
  return { store, top, lastSeq, segment: join(payloads, segments[0]) };
}

test('journal verify names a damaged record by seq and exits 1, also when the damage keeps the store from opening', async () => {
  // Five durable writes after the last checkpoint, then a byte of the third one's data flipped in
  // the payload log.
  const { store, lastSeq, segment } = await storeWithWrites([0, 1, 2, 3, 4], Buffer.alloc(4096, 0x42));
  const damaged = lastSeq - 2;
  flipAt(segment, 2 * 4096 + 100);

  const text = await cow(['journal', 'verify', store]);
  assert.is(text.code, 1, `exit 1 on damage: ${text.stdout}${text.stderr}`);
  assert.match(text.stdout, new RegExp(`^journal damaged:\n {2}seq ${damaged}: `));
  const json = await cow(['journal', 'verify', store, '--json']);
  assert.is(json.code, 1);
  const report = JSON.parse(json.stdout) as { ok: boolean; problems: Array<{ seq: number; kind: string }> };
  assert.is(report.ok, false);
  assert.is(report.problems[0].seq, damaged);
  // The store itself refuses to open, naming the same seq.
  const check = await cow(['check', store]);
  assert.is(check.code, 1);
  assert.match(check.stdout + check.stderr, `seq ${damaged}`);
});

test('a damaged payload: recover and serve refuse and say what to run; recover --force writes it back from the layer file', async () => {
  // A durable write after the last checkpoint whose data had reached the layer file before a crash,
  // then a byte of it flipped in the payload log.
  const data = Buffer.alloc(4096, 0x42);
  const { store, top, lastSeq: damaged, segment } = await storeWithWrites([3], data);
  const layer = openSync(join(store, 'layers', `${top}.data`), constants.O_RDWR | constants.O_CREAT, 0o600);
  writeSync(layer, data, 0, data.length, 3 * 4096);
  closeSync(layer);
  flipAt(segment, readFileSync(segment).lastIndexOf(data) + 100);

  const hint = /\ncowstack: hint: `cowstack check STORE` lists all the damage; `cowstack recover --force STORE` mends or salvages it/;
  const refused = await cow(['recover', store]);
  assert.is(refused.code, 1);
  assert.match(refused.stderr, new RegExp(`^cowstack: error: store ${store}: journal record seq ${damaged} is corrupt \\(payload-crc\\)`));
  assert.match(refused.stderr, hint);
  const serve = await cow(['serve', store, '--socket', join(tempDir(), 'nbd.sock')]);
  assert.is(serve.code, 1, 'serve refuses the damaged store');
  assert.match(serve.stderr, hint);
  const forced = await cow(['recover', store, '--force']);
  assert.is(forced.code, 0, forced.stderr);
  assert.match(forced.stdout, `\n  PAYLOAD REPAIRED    seq ${damaged}: written back from layer ${top} (blocks 3..3), nothing lost\n`);
  assert.not.match(forced.stdout + forced.stderr, /SALVAGED|hint/);
  const check = await cow(['check', store]);
  assert.is(check.code, 0, check.stdout);
  const server = await Server.start(store);
  try {
    await qemuIo(server.uri('default'), ['read -P 0x42 12k 4k']);
  } finally {
    assert.is(await server.stop(), 0);
  }
});

test.run();
