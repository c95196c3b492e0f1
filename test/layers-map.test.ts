/**
 * A 4-deep stack, checked against qemu's own answer for the same history. The same qemu-io commands
 * build (a) a cowstack volume with a snapshot after each of the first three rounds and (b) a qcow2
 * chain l1 ← l2 ← l3 ← l4 whose cluster size is the store's block size (512 B, 4 KiB and 64 KiB). Then, for the volume and each
 * snapshot against the matching qcow2 served by `qemu-nbd -A`:
 *
 * - the bytes are the same (`qemu-img compare`);
 * - `nbdinfo --map` (base:allocation) and `nbdinfo --map=qemu:allocation-depth` print the same extents;
 * - `qemu-img map --output=json` prints the same. Over NBD qemu's client reports only what
 *   base:allocation says (every extent "present", depth 0, data/zero from the hole/zero bits); with
 *   `x-dirty-bitmap=qemu:allocation-depth` it reads the depth context instead, which is how qemu's
 *   own iotests look at allocation depth through NBD, so that output is compared too;
 * - allocation depth at chosen offsets is what the history says: 1 = the top layer, N = the Nth layer
 *   down, 0 = no layer; `cowstack map --json` agrees.
 */
import { strict as assert } from 'node:assert';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { cowstackJson, cowstackOk, initStore, killAll, KiB, MiB, nbdUri, run, runOk, sleep, spawnTracked, startServe, tempDir } from './harness.js';

const sizeBytes = 16 * MiB;

/** qemu-io commands per round, oldest first: the history of the stack. */
const rounds: string[][] = [
  ['write -P 0x11 0 1M', 'write -P 0x11 8M 1M', 'write -P 0x12 12M 4096'],
  ['write -P 0x22 512K 1M', 'write -z 8M 256K', 'write -P 0x23 1000 10000'],
  ['write -P 0x33 4M 64K', `discard ${8 * MiB + 512 * KiB} 64K`, `write -P 0x34 ${12 * MiB + 2048} 100`],
  ['write -P 0x44 1M 64K', 'discard 8M 128K', `write -z ${4 * MiB + 4096} 4096`],
];

/** Expected allocation depth of the top volume at some offsets. */
const expectedDepth: Array<[offset: number, depth: number]> = [
  [0, 3], // round 2's unaligned write copied blocks 0..2 up into l2
  [12287, 3],
  [12288, 4], // round 1
  [512 * KiB, 3],
  [MiB, 1], // round 4
  [MiB + 64 * KiB, 3],
  [1536 * KiB, 0],
  [4 * MiB, 2], // round 3
  [4 * MiB + 4096, 1], // write-zeroes in the top
  [4 * MiB + 8192, 2],
  [8 * MiB, 1], // discard in the top
  [8 * MiB + 128 * KiB, 3], // round 2's write-zeroes
  [8 * MiB + 256 * KiB, 4],
  [8 * MiB + 512 * KiB, 2], // round 3's discard
  [8 * MiB + 576 * KiB, 4],
  [9 * MiB, 0],
  [12 * MiB, 2], // round 3's 100-byte write copied block 12M up
  [12 * MiB + 4096, 0],
  [sizeBytes - 1, 0],
];

test.after.each(killAll);

async function qemuIo(args: string[], commands: string[]): Promise<void> {
  const r = await runOk('qemu-io', [...commands.flatMap((c) => ['-c', c]), ...args]);
  assert.doesNotMatch(r.stdout + r.stderr, /failed|error/i, r.stdout + r.stderr);
}

/** `qemu-nbd -A -r` serving one qcow2 (with its backing chain) on a unix socket, as export "x". */
async function qemuNbd(file: string, socket: string): Promise<void> {
  const child = spawnTracked('qemu-nbd', ['-r', '-A', '--persistent', '-f', 'qcow2', '-x', 'x', '-k', socket, file]);
  const deadline = Date.now() + 10_000;
  while (!existsSync(socket)) {
    if (child.exitCode !== null) throw new Error(`qemu-nbd exited ${child.exitCode} for ${file}`);
    if (Date.now() > deadline) throw new Error(`qemu-nbd did not create ${socket}`);
    await sleep(20);
  }
}

async function stdoutOf(cmd: string, args: string[]): Promise<string> {
  return (await runOk(cmd, args)).stdout;
}

function imageOpts(socket: string, exportName: string, extra = ''): string {
  return `driver=nbd,server.type=unix,server.path=${socket},export=${exportName}${extra}`;
}

interface NbdinfoExtent {
  offset: number;
  length: number;
  type: number;
  description?: string;
}

/** Merge adjacent extents of the same type (servers may split where they like). */
function merged(extents: NbdinfoExtent[]): Array<[number, number, number]> {
  const out: Array<[number, number, number]> = [];
  for (const e of extents) {
    const prev = out[out.length - 1];
    if (prev !== undefined && prev[2] === e.type && prev[0] + prev[1] === e.offset) prev[1] += e.length;
    else out.push([e.offset, e.length, e.type]);
  }
  return out;
}

async function mapOf(uri: string, context: string): Promise<Array<[number, number, number]>> {
  return merged(JSON.parse(await stdoutOf('nbdinfo', ['--json', `--map=${context}`, uri])) as NbdinfoExtent[]);
}

function depthAt(extents: Array<[number, number, number]>, offset: number): number {
  const e = extents.find(([o, l]) => offset >= o && offset < o + l);
  if (e === undefined) throw new Error(`no extent covers ${offset}`);
  return e[2];
}

for (const bs of [4096, 512, 65536]) test(`4-deep stack, block size ${bs}: maps and bytes agree with qemu-nbd on the same qcow2 chain`, async () => {
  const dir = tempDir('layers');

  // (b) the qcow2 chain
  const qcow = [1, 2, 3, 4].map((n) => join(dir, `l${n}.qcow2`));
  await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${bs}`, qcow[0], String(sizeBytes)]);
  for (let i = 0; i < 4; i++) {
    if (i > 0) await runOk('qemu-img', ['create', '-q', '-f', 'qcow2', '-o', `cluster_size=${bs}`, '-b', qcow[i - 1], '-F', 'qcow2', qcow[i]]);
    await qemuIo(['-f', 'qcow2', qcow[i]], rounds[i]);
  }

  // (a) the cowstack volume
  const store = await initStore({ size: '16M', blockSize: bs });
  const server = await startServe(store);
  for (let i = 0; i < 4; i++) {
    await qemuIo(['-f', 'raw', server.uri('default')], rounds[i]);
    if (i < 3) await cowstackOk(['snapshot', store, 'default', '--name', `s${i + 1}`]);
  }
  const volumes = await cowstackJson<Array<{ name: string; stack: number[] }>>(['volume', 'ls', store]);
  assert.equal(volumes.find((v) => v.name === 'default')?.stack.length, 5, 'zero base + 3 snapshots + top');

  const pairs: Array<{ cow: string; qemu: string; socket: string; label: string }> = [];
  for (let i = 0; i < 4; i++) {
    const socket = join(dir, `q${i + 1}.sock`);
    await qemuNbd(qcow[i], socket);
    pairs.push({ cow: i < 3 ? `default@s${i + 1}` : 'default', qemu: 'x', socket, label: i < 3 ? `snapshot s${i + 1} vs l${i + 1}.qcow2` : `volume vs l4.qcow2` });
  }

  for (const p of pairs) {
    const cowUri = server.uri(p.cow);
    const qemuUri = nbdUri(p.socket, p.qemu);

    const cmp = await run('qemu-img', ['compare', '-f', 'raw', '-F', 'raw', cowUri, qemuUri]);
    assert.equal(cmp.code, 0, `${p.label}: qemu-img compare: ${cmp.stdout}${cmp.stderr}`);

    for (const context of ['base:allocation', 'qemu:allocation-depth']) {
      assert.equal(
        await stdoutOf('nbdinfo', [`--map=${context}`, cowUri]),
        await stdoutOf('nbdinfo', [`--map=${context}`, qemuUri]),
        `${p.label}: nbdinfo --map=${context}`,
      );
    }

    assert.equal(
      await stdoutOf('qemu-img', ['map', '--output=json', '--image-opts', imageOpts(server.socket, p.cow)]),
      await stdoutOf('qemu-img', ['map', '--output=json', '--image-opts', imageOpts(p.socket, p.qemu)]),
      `${p.label}: qemu-img map --output=json`,
    );
    assert.equal(
      await stdoutOf('qemu-img', ['map', '--output=json', '--image-opts', imageOpts(server.socket, p.cow, ',x-dirty-bitmap=qemu:allocation-depth')]),
      await stdoutOf('qemu-img', ['map', '--output=json', '--image-opts', imageOpts(p.socket, p.qemu, ',x-dirty-bitmap=qemu:allocation-depth')]),
      `${p.label}: qemu-img map with x-dirty-bitmap=qemu:allocation-depth`,
    );
  }

  await server.stop();
  if (bs !== 4096) return;

  // The depths the history implies (at 4 KiB blocks), from nbdinfo and from `cowstack map`.
  const again = await startServe(store);
  const depth = await mapOf(again.uri('default'), 'qemu:allocation-depth');
  const cowMap = await cowstackJson<Array<{ offset: number; length: number; kind: string; depth: number }>>(['map', store, 'default']);
  for (const [offset, want] of expectedDepth) {
    assert.equal(depthAt(depth, offset), want, `allocation depth at ${offset}`);
    const e = cowMap.find((x) => offset >= x.offset && offset < x.offset + x.length);
    assert.equal(e?.depth, want, `cowstack map depth at ${offset}`);
  }
  // base:allocation: data (0) where a layer holds data, hole|zero (3) for recorded zeroes and holes.
  const alloc = await mapOf(again.uri('default'), 'base:allocation');
  for (const [offset, type] of [[0, 0], [MiB, 0], [4 * MiB + 4096, 3], [8 * MiB, 3], [8 * MiB + 256 * KiB, 0], [8 * MiB + 512 * KiB, 3], [9 * MiB, 3]] as const) {
    assert.equal(depthAt(alloc, offset), type, `base:allocation type at ${offset}`);
  }
  // The first snapshot's view: round 1 only, all at depth 1.
  const s1 = await mapOf(again.uri('default@s1'), 'qemu:allocation-depth');
  assert.deepEqual(s1, [
    [0, MiB, 1],
    [MiB, 7 * MiB, 0],
    [8 * MiB, MiB, 1],
    [9 * MiB, 3 * MiB, 0],
    [12 * MiB, 4096, 1],
    [12 * MiB + 4096, sizeBytes - 12 * MiB - 4096, 0],
  ]);

  await again.stop();
});

test.run();
