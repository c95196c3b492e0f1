/**
 * The layer workflow through the command line, text and --json: init (zero base, external base,
 * imported base, block size and volume name), ls (tree and JSON), import/export round trips with
 * sparse output, and on a store written by real clients: snapshot (named, snap-N, --delete), clone,
 * map (every extent against the writes that made it), diff, commit and flatten (the data read back
 * with `cowstack export` is unchanged by each), and check at the end. A model image in memory is
 * what every export is compared with.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { readFileSync, statSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { assertSameBytes, cow, cowJson, cowOk, pseudoRandom, qemuIo, Server, tempDir } from './helpers.js';

const KiB = 1024;
const MiB = 1024 * KiB;
const blockBytes = 4096;

interface MapExtent {
  offset: number;
  length: number;
  kind: 'data' | 'zero' | 'hole';
  layerId: number | null;
  depth: number;
}

interface Ls {
  store: string;
  blockSizeBytes: number;
  lastSeq: number;
  volumes: Array<{ name: string; sizeBytes: number; topLayerId: number; stack: number[]; snapshots: string[] }>;
  snapshots: Array<{ volume: string; name: string; layerId: number }>;
  layers: Array<{ id: number; parent: number | null; kind: string; frozen: boolean; sizeBytes: number; dataBytes: number; zeroBytes: number; children: number[]; names: string[]; volume: string | null; source: string | null }>;
}

/** `cowstack export` into a file and return its bytes and the JSON result. */
async function exportBytes(store: string, ref: string): Promise<Buffer> {
  const file = join(tempDir('export'), 'out.raw');
  const r = await cowJson<{ ref: string; path: string; sizeBytes: number; dataBytes: number }>(['export', store, ref, file]);
  assert.is(r.path, file);
  assert.is(r.ref, ref);
  const bytes = readFileSync(file);
  assert.is(bytes.length, r.sizeBytes, `export of ${ref}: file size`);
  return bytes;
}

/** Extents must tile [0, size) in order, with no empty or adjacent same-kind-and-layer pieces. */
function assertTiles(extents: MapExtent[], sizeBytes: number, what: string): void {
  let at = 0;
  for (const e of extents) {
    assert.is(e.offset, at, `${what}: extent at ${at}`);
    assert.ok(e.length > 0, `${what}: empty extent at ${at}`);
    assert.ok(e.kind === 'hole' ? e.layerId === null && e.depth === 0 : e.layerId !== null && e.depth >= 1, `${what}: extent at ${at} names its layer`);
    at += e.length;
  }
  assert.is(at, sizeBytes, `${what}: extents cover the volume`);
}

/** An image with random data, a zero-filled block inside a data run, and holes. */
function sparseImage(sizeBytes: number): Buffer {
  const image = Buffer.alloc(sizeBytes);
  pseudoRandom(3 * MiB, 7).copy(image, 0);
  image.fill(0, MiB, MiB + 2 * blockBytes);
  pseudoRandom(128 * KiB, 8).copy(image, 6 * MiB + 3 * blockBytes);
  pseudoRandom(4000, 9).copy(image, sizeBytes - 4000);
  return image;
}

function nonZeroBlocks(image: Buffer): number {
  let n = 0;
  for (let at = 0; at < image.length; at += blockBytes) {
    if (image.subarray(at, at + blockBytes).some((b) => b !== 0)) n++;
  }
  return n;
}

test('init with a zero base: text, --json, block size and volume name, and ls as a tree and as JSON', async () => {
  const dir = tempDir();
  const store = join(dir, 'store');
  const text = await cowOk(['init', store, '--size', '8M']);
  assert.is(text.stdout, `created store ${store}: volume default, 8 MiB, block size 4096, base zeros\n`);
  assert.is(text.stderr, '');

  const small = join(dir, 'small');
  const info = await cowJson<{ store: string; blockSizeBytes: number; volumes: Ls['volumes']; layers: Ls['layers'] }>(['init', small, '--size', '1G', '--block-size', '512', '--volume', 'boot']);
  assert.is(info.store, small);
  assert.is(info.blockSizeBytes, 512);
  assert.equal(
    info.volumes.map((v) => [v.name, v.sizeBytes, v.stack.length]),
    [['boot', 1024 * MiB, 2]],
  );
  assert.equal(
    info.layers.map((l) => [l.kind, l.frozen, l.parent === null]),
    [
      ['zero', true, true],
      ['cow', false, false],
    ],
  );

  const ls = await cowJson<Ls>(['ls', store]);
  assert.is(ls.store, store);
  assert.is(ls.blockSizeBytes, 4096);
  assert.ok(ls.lastSeq >= 3, 'store creation is journaled');
  assert.equal(ls.snapshots, []);
  const [base, top] = ls.layers;
  assert.equal([base.parent, base.kind, base.frozen, base.sizeBytes, base.children, base.volume], [null, 'zero', true, 8 * MiB, [top.id], null]);
  assert.equal([top.parent, top.kind, top.frozen, top.dataBytes, top.volume], [base.id, 'cow', false, 0, 'default']);
  assert.equal(ls.volumes, [{ name: 'default', sizeBytes: 8 * MiB, topLayerId: top.id, stack: [base.id, top.id], snapshots: [] }]);
  const tree = await cowOk(['ls', store]);
  assert.is(
    tree.stdout,
    [
      `store ${store}: 1 volume(s), 0 snapshot(s), 2 layer(s), block size 4096, journal seq ${ls.lastSeq}`,
      `layer ${base.id}: base (zero), 8 MiB, 0 B data`,
      `└─ layer ${top.id}: writable, 0 B data  <- volume default`,
      '',
    ].join('\n'),
  );
  const volumes = await cowOk(['volume', 'ls', store]);
  assert.match(volumes.stdout, /^VOLUME\s+SIZE\s+LAYERS\s+TOP\s+SNAPSHOTS\ndefault\s+8 MiB\s+2\s+\d+\s+-\n$/);
  assert.equal(await exportBytes(store, 'default'), Buffer.alloc(8 * MiB), 'a fresh zero-base volume reads as zeroes');
});

test('init --import and --base take size and data from an image; import/export round trip; export is sparse', async () => {
  const dir = tempDir();
  const imageBytes = 8 * MiB + 1000;
  const image = sparseImage(imageBytes);
  const imagePath = join(dir, 'image.raw');
  writeFileSync(imagePath, image);
  const imageMtimeMs = statSync(imagePath).mtimeMs;

  const imported = join(dir, 'imported');
  const importedText = await cowOk(['init', imported, '--import', imagePath]);
  assert.match(importedText.stdout, `created store ${imported}: volume default, 8.00 MiB, block size 4096, base imported from ${imagePath}`);
  const external = join(dir, 'external');
  const ext = await cowJson<{ volumes: Ls['volumes']; layers: Ls['layers'] }>(['init', external, '--base', imagePath]);
  assert.is(ext.volumes[0].sizeBytes, imageBytes, 'the size comes from the image');
  assert.equal([ext.layers[0].kind, ext.layers[0].source], ['external', imagePath]);
  const extTree = await cowOk(['ls', external]);
  assert.match(extTree.stdout, `base (external ${imagePath}), 8.00 MiB, 8.00 MiB data`);
  const mismatch = await cow(['init', join(dir, 'mismatch'), '--base', imagePath, '--size', '1M']);
  assert.is(mismatch.code, 1);
  assert.match(mismatch.stderr, `does not match the base image's ${imageBytes} bytes`);

  assertSameBytes(await exportBytes(imported, 'default'), image, 'export of an --import store');
  assertSameBytes(await exportBytes(external, 'default'), image, 'export of an --base store');

  // import into an existing store, then export: the same bytes, and only the non-zero blocks stored.
  const importText = await cowOk(['import', external, imagePath, '--volume', 'copy']);
  assert.is(importText.stdout, `imported ${imagePath} as volume copy (8.00 MiB)\n`);
  assert.is(importText.stderr, '', 'no progress bar when stderr is not a terminal');
  const ls = await cowJson<Ls>(['ls', external]);
  const copy = ls.volumes.find((v) => v.name === 'copy')!;
  const copyBase = ls.layers.find((l) => l.id === copy.stack[0])!;
  assert.is(copyBase.kind, 'imported');
  assert.is(copyBase.dataBytes, nonZeroBlocks(image) * blockBytes, 'zero blocks of an imported image are not stored');

  const out = join(dir, 'out.raw');
  const exportText = await cowOk(['export', external, 'copy', out]);
  assert.match(exportText.stdout, new RegExp(`^exported copy to ${out} \\(8\\.00 MiB, 3\\.1\\d MiB data\\)\n$`));
  assert.is(exportText.stderr, '');
  assertSameBytes(readFileSync(out), image, 'import/export round trip');
  // Holes stay holes: the file allocates about what the data needs, far less than its size.
  const allocatedBytes = statSync(out).blocks * 512;
  assert.ok(allocatedBytes <= copyBase.dataBytes + 64 * KiB, `exported file allocates ${allocatedBytes} bytes for ${copyBase.dataBytes} bytes of data`);
  assert.ok(allocatedBytes < imageBytes / 2, `exported file is sparse (${allocatedBytes} of ${imageBytes} bytes allocated)`);
  const map = await cowJson<MapExtent[]>(['map', external, 'copy']);
  assertTiles(map, imageBytes, 'map of an imported volume');
  for (const e of map) {
    const bytes = image.subarray(e.offset, e.offset + e.length);
    if (e.kind === 'hole') assert.ok(bytes.every((b) => b === 0), `hole at ${e.offset} reads as zeroes in the image`);
    else assert.is(e.kind, 'data');
  }
  // The image ends inside a block: the layer stores the whole block, the map stops at the end.
  assert.is(
    map.filter((e) => e.kind === 'data').reduce((n, e) => n + e.length, 0),
    copyBase.dataBytes - (blockBytes - (imageBytes % blockBytes)),
  );
  assert.is(statSync(imagePath).mtimeMs, imageMtimeMs, 'the base image is never written');
});

test('snapshot, clone, map, diff, commit and flatten on a store written by real clients', async () => {
  const dir = tempDir();
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '8M']);
  const golden = Buffer.alloc(8 * MiB);
  const server = await Server.start(store);
  let snap: { volume: string; name: string; layerId: number };
  try {
    await qemuIo(server.uri('default'), ['write -P 0x11 0 1M', 'write -P 0x22 4M 64k', 'write -z 6M 64k']);
    golden.fill(0x11, 0, MiB).fill(0x22, 4 * MiB, 4 * MiB + 64 * KiB);
    snap = await cowJson(['snapshot', store, 'default', '--name', 'golden']);
    // An unaligned write (copy-up from the snapshot), write-zeroes on a hole, a trim over data.
    await qemuIo(server.uri('default'), ['write -P 0x33 516k 100', 'write -z 2M 4k', 'discard 4M 4k']);
  } finally {
    assert.is(await server.stop(), 0, 'serve stops cleanly on SIGINT');
  }
  assert.equal([snap.volume, snap.name], ['default', 'golden']);
  const current = Buffer.from(golden);
  current.fill(0x33, 516 * KiB, 516 * KiB + 100).fill(0, 4 * MiB, 4 * MiB + 4 * KiB);

  const ls = await cowJson<Ls>(['ls', store]);
  const vol = ls.volumes[0];
  const [baseId, goldenId, topId] = vol.stack;
  assert.is(goldenId, snap.layerId, 'the snapshot froze the old top');
  assert.equal(vol.snapshots, ['golden']);
  assert.equal(ls.snapshots, [{ volume: 'default', name: 'golden', layerId: goldenId }]);
  const goldenLayer = ls.layers.find((l) => l.id === goldenId)!;
  assert.equal([goldenLayer.frozen, goldenLayer.names, goldenLayer.dataBytes, goldenLayer.zeroBytes], [true, ['default@golden'], MiB + 64 * KiB, 64 * KiB]);
  const topLayer = ls.layers.find((l) => l.id === topId)!;
  assert.equal([topLayer.frozen, topLayer.dataBytes, topLayer.zeroBytes], [false, 4 * KiB, 8 * KiB]);
  const tree = await cowOk(['ls', store]);
  assert.match(tree.stdout, `└─ layer ${goldenId}: frozen, 1.06 MiB data, 64 KiB zeroed  <- snapshot default@golden\n   └─ layer ${topId}: writable, 4 KiB data, 8 KiB zeroed  <- volume default`);

  assertSameBytes(await exportBytes(store, 'default@golden'), golden, 'export of the snapshot');
  assertSameBytes(await exportBytes(store, 'default'), current, 'export of the volume');

  // map: each extent names the layer holding it and its depth in the volume's stack.
  const map = await cowJson<MapExtent[]>(['map', store, 'default']);
  assertTiles(map, 8 * MiB, 'map default');
  const d = (offset: number, length: number, layerId: number, depth: number): MapExtent => ({ offset, length, kind: 'data', layerId, depth });
  const z = (offset: number, length: number, layerId: number, depth: number): MapExtent => ({ offset, length, kind: 'zero', layerId, depth });
  const h = (offset: number, length: number): MapExtent => ({ offset, length, kind: 'hole', layerId: null, depth: 0 });
  assert.equal(map, [
    d(0, 516 * KiB, goldenId, 2),
    d(516 * KiB, 4 * KiB, topId, 1),
    d(520 * KiB, 504 * KiB, goldenId, 2),
    h(MiB, MiB),
    z(2 * MiB, 4 * KiB, topId, 1),
    h(2 * MiB + 4 * KiB, 2 * MiB - 4 * KiB),
    z(4 * MiB, 4 * KiB, topId, 1),
    d(4 * MiB + 4 * KiB, 60 * KiB, goldenId, 2),
    h(4 * MiB + 64 * KiB, 2 * MiB - 64 * KiB),
    z(6 * MiB, 64 * KiB, goldenId, 2),
    h(6 * MiB + 64 * KiB, 2 * MiB - 64 * KiB),
  ]);
  const mapText = await cowOk(['map', store, 'default']);
  const rows = mapText.stdout.trimEnd().split('\n');
  assert.match(rows[0], /^\s*OFFSET\s+LENGTH\s+SIZE\s+KIND\s+LAYER\s+DEPTH$/);
  assert.is(rows.length, map.length + 1);
  assert.match(rows[2], new RegExp(`^\\s*0x81000\\s+0x1000\\s+4 KiB\\s+data\\s+${topId}\\s+1$`));
  assert.match(rows[4], /^\s*0x100000\s+0x100000\s+1 MiB\s+hole\s+-\s+0$/);
  assert.match(rows[5], new RegExp(`^\\s*0x200000\\s+0x1000\\s+4 KiB\\s+zero\\s+${topId}\\s+1$`));
  const snapMap = await cowJson<MapExtent[]>(['map', store, 'default@golden']);
  assert.equal(snapMap[0], d(0, MiB, goldenId, 1), 'a snapshot maps from its own layer down');

  // diff: covers every byte that differs, and nothing the two share.
  const diff = await cowJson<Array<{ offset: number; length: number }>>(['diff', store, 'default@golden', 'default']);
  for (let at = 0; at < golden.length; at++) {
    if (golden[at] !== current[at]) assert.ok(diff.some((e) => e.offset <= at && at < e.offset + e.length), `diff covers changed byte ${at}`);
  }
  for (const e of diff) {
    const covered = map.filter((m) => m.layerId === topId && m.offset < e.offset + e.length && e.offset < m.offset + m.length);
    assert.is(covered.reduce((n, m) => n + Math.min(m.offset + m.length, e.offset + e.length) - Math.max(m.offset, e.offset), 0), e.length, `diff extent at ${e.offset} lies in the top layer`);
  }
  const diffText = await cowOk(['diff', store, 'default@golden', 'default']);
  assert.match(diffText.stdout, /^\s*OFFSET\s+LENGTH\s+SIZE\n/);
  assert.match(diffText.stdout, /0x81000\s+0x1000\s+4 KiB/);
  assert.match(diffText.stdout, /0x400000\s+0x1000\s+4 KiB/);

  // clone: a new volume on the snapshot, reading what it holds; no difference until written.
  const clone = await cowJson<{ name: string; stack: number[]; topLayerId: number }>(['clone', store, 'default@golden', 'vm1']);
  assert.equal([clone.name, clone.stack], ['vm1', [baseId, goldenId, clone.topLayerId]]);
  assert.is((await cowOk(['clone', store, 'default@golden', 'vm2'])).stdout, 'created volume vm2 from default@golden\n');
  assertSameBytes(await exportBytes(store, 'vm1'), golden, 'export of a clone');
  assert.equal(await cowJson(['diff', store, 'default@golden', 'vm1']), []);
  assert.is((await cowOk(['diff', store, 'default@golden', 'vm1'])).stdout, 'default@golden and vm1 do not differ\n');

  const again = await cow(['snapshot', store, 'default', '--name', 'golden']);
  assert.is(again.code, 1);
  assert.match(again.stderr, 'snapshot default@golden already exists');

  // commit: refused while the layer below is a named snapshot that clones use; the data stays.
  const refused = await cow(['commit', store, 'default']);
  assert.is(refused.code, 1);
  assert.is(refused.stderr, `cowstack: error: the layer below default (layer ${goldenId}) is shared by 3 layers; committing would change what the others see\n`);
  assertSameBytes(await exportBytes(store, 'default'), current, 'export after a refused commit');

  // flatten the clones: each becomes independent of every layer below its top, same bytes.
  const flat = await cowJson<{ bytesCopied: number }>(['flatten', store, 'vm1']);
  assert.is(flat.bytesCopied, MiB + 64 * KiB, 'flatten copies the data it reads from below');
  assertSameBytes(await exportBytes(store, 'vm1'), golden, 'export of vm1 after flatten');
  const vm1Map = await cowJson<MapExtent[]>(['map', store, 'vm1']);
  assert.ok(vm1Map.every((e) => e.kind === 'hole' || e.depth === 1), 'after flatten the top layer holds everything');
  const flatText = await cowOk(['flatten', store, 'vm2']);
  assert.is(flatText.stdout, 'flattened vm2 (1.06 MiB copied)\n');
  assert.is(flatText.stderr, '');
  const afterFlatten = await cowJson<Ls>(['ls', store]);
  for (const name of ['vm1', 'vm2']) {
    const v = afterFlatten.volumes.find((x) => x.name === name)!;
    assert.equal(v.stack, [v.topLayerId], `${name} is one layer after flatten`);
  }
  assert.equal(afterFlatten.layers.find((l) => l.id === goldenId)!.children, [topId], 'the clones no longer use the snapshot');

  // commit once the snapshot name is gone too: the top merges into the layer below, same bytes.
  const stillNamed = await cow(['commit', store, 'default']);
  assert.is(stillNamed.code, 1);
  assert.match(stillNamed.stderr, `the layer below default (layer ${goldenId}) is snapshot default@golden; delete that snapshot first`);
  assert.equal(await cowJson(['snapshot', store, 'default@golden', '--delete']), { deleted: 'default@golden' });
  const commit = await cowOk(['commit', store, 'default']);
  assert.is(commit.stdout, `committed layer ${topId} into layer ${goldenId} (4 KiB copied)\n`);
  assert.is(commit.stderr, '', 'no progress bar when stderr is not a terminal');
  assertSameBytes(await exportBytes(store, 'default'), current, 'export after commit');
  const afterCommit = await cowJson<Ls>(['ls', store]);
  assert.equal(afterCommit.volumes.find((v) => v.name === 'default')!.stack, [baseId, goldenId]);
  const committedMap = await cowJson<MapExtent[]>(['map', store, 'default']);
  assert.ok(
    committedMap.every((e) => e.kind === 'hole' || (e.layerId === goldenId && e.depth === 1)),
    'after commit one layer holds everything',
  );

  // snapshot without --name: snap-N. commit VOLUME@SNAPSHOT merges a snapshot into its parent once
  // that parent is no longer a named snapshot, and keeps its name and data. This part runs online,
  // through the control socket of a serving store.
  const online = await Server.start(store);
  try {
    assert.is((await cowOk(['snapshot', store, 'default'])).stdout, `snapshot default@snap-1 (layer ${goldenId})\n`);
    await qemuIo(online.uri('default'), ['write -P 0x44 7M 8k']);
    current.fill(0x44, 7 * MiB, 7 * MiB + 8 * KiB);
    const snap2 = await cowJson<{ volume: string; name: string; layerId: number }>(['snapshot', store, 'default']);
    assert.equal([snap2.volume, snap2.name], ['default', 'snap-2']);
    const blocked = await cow(['commit', store, 'default@snap-2']);
    assert.is(blocked.code, 1);
    assert.match(blocked.stderr, 'is snapshot default@snap-1; delete that snapshot first');
    assert.is((await cowOk(['snapshot', store, 'default@snap-1', '--delete'])).stdout, 'deleted snapshot default@snap-1\n');
    const merged = await cowJson<{ layerId: number; parentId: number; bytesCopied: number }>(['commit', store, 'default@snap-2']);
    assert.equal([merged.layerId, merged.parentId, merged.bytesCopied], [snap2.layerId, goldenId, 8 * KiB]);
    assertSameBytes(await exportBytes(store, 'default@snap-2'), current, 'export of a committed snapshot');
    assertSameBytes(await exportBytes(store, 'default'), current, 'export of the volume above a committed snapshot');
    const afterMerge = await cowJson<Ls>(['ls', store]);
    assert.equal(afterMerge.snapshots, [{ volume: 'default', name: 'snap-2', layerId: goldenId }]);
  } finally {
    assert.is(await online.stop(), 0);
  }

  const check = await cowJson<{ ok: boolean; problems: unknown[] }>(['check', store]);
  assert.equal([check.ok, check.problems], [true, []]);
});

test.run();
