/**
 * Many connections at once on one volume: 8 writer processes (libnbd, 16 asynchronous writes in
 * flight each, chunks of random length in random order) own 8 disjoint regions whose boundaries fall
 * inside blocks, so neighbouring writers keep completing each other's blocks (copy-up across
 * connections); meanwhile a 9th connection reads the snapshot taken before, three times over, and a
 * 10th runs qemu-io on a clone. Afterwards every byte of the volume, the snapshot and the clone is what
 * it must be, also after a restart.
 */
import { strict as assert } from 'node:assert';
import { createHash } from 'node:crypto';
import { existsSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'uvu';
import { cowstackOk, initStore, killAll, MiB, pattern, python, readExport, run, sameBytes, sleep, startServe, tempDir, writeExport } from './harness.js';

const sizeBytes = 64 * MiB;
const writers = 8;

test.after.each(killAll);

const writerScript = String.raw`
import nbd, os, random, sys, time
uri, start, path, seed, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
data = open(path, 'rb').read()
rng = random.Random(seed)
chunks = []
at = 0
while at < len(data):
    n = min(len(data) - at, rng.choice([1, 511, 4096, 5000, 12345, 65536]))
    chunks.append((at, n))
    at += n
rng.shuffle(chunks)
h = nbd.NBD()
h.connect_uri(uri)
open(ready, 'w').close()
while not os.path.exists(go):   # all clients start together
    time.sleep(0.001)
began = time.time()
for i, (off, n) in enumerate(chunks):
    while h.aio_in_flight() >= 16:
        h.poll(-1)
    flags = nbd.CMD_FLAG_FUA if i % 97 == 0 else 0
    h.aio_pwrite(data[off:off + n], start + off, flags=flags)
while h.aio_in_flight() > 0:
    h.poll(-1)
h.flush()
print(began, time.time(), len(chunks))
h.shutdown()
`;

const readerScript = String.raw`
import hashlib, nbd, os, sys, time
uri, passes, ready, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
h = nbd.NBD()
h.connect_uri(uri)
open(ready, 'w').close()
while not os.path.exists(go):
    time.sleep(0.001)
size = h.get_size()
for p in range(passes):
    d = hashlib.sha256()
    off = 0
    while off < size:
        n = min(1 << 20, size - off)
        d.update(h.pread(n, off))
        off += n
    print(d.hexdigest(), flush=True)
h.shutdown()
`;

test('8 concurrent writers on disjoint regions + a snapshot reader + a clone writer', async () => {
  const dir = tempDir('many');
  const store = await initStore({ size: '64M' });
  const server = await startServe(store);

  // The snapshot the reader checks: old content everywhere.
  const old = pattern(sizeBytes, 61);
  await writeExport(server.uri('default'), 0, old);
  await cowstackOk(['snapshot', store, 'default', '--name', 'before']);
  await cowstackOk(['clone', store, 'default@before', 'side']);
  const oldHash = createHash('sha256').update(old).digest('hex');

  // Regions with unaligned boundaries: [bounds[i], bounds[i+1]).
  const bounds = Array.from({ length: writers + 1 }, (_, i) => (i === 0 ? 0 : i === writers ? sizeBytes : i * (sizeBytes / writers) + i * 1111));
  const expected = Buffer.from(old);
  // Every client connects, says so with a file, then waits for the go file: they really run at once.
  const go = join(dir, 'go');
  const ready = (name: string): string => join(dir, `ready-${name}`);
  const jobs: Promise<{ code: number | null; stdout: string; stderr: string }>[] = [];
  for (let i = 0; i < writers; i++) {
    const data = pattern(bounds[i + 1] - bounds[i], 100 + i);
    // Leave some of each region untouched, so old bytes must survive next to new ones.
    data.set(old.subarray(bounds[i] + 1000, bounds[i] + 3000), 1000);
    data.copy(expected, bounds[i]);
    const file = join(dir, `region-${i}.bin`);
    writeFileSync(file, data);
    jobs.push(python(writerScript, [server.uri('default'), String(bounds[i]), file, String(i), ready(`w${i}`), go], { timeoutMs: 120_000 }));
  }
  const reader = python(readerScript, [server.uri('default@before'), '3', ready('reader'), go], { timeoutMs: 120_000 });
  const names = [...Array.from({ length: writers }, (_, i) => `w${i}`), 'reader'];
  const deadline = Date.now() + 60_000;
  while (!names.every((n) => existsSync(ready(n)))) {
    if (Date.now() > deadline) throw new Error('the clients did not all connect within 60 s');
    await sleep(20);
  }
  writeFileSync(go, '');
  const sideWriter = run('qemu-io', ['-f', 'raw', '-c', 'aio_write -P 0x5e 0 4194303', '-c', 'aio_write -P 0x5f 4194303 4097', '-c', 'aio_flush', server.uri('side')], { timeoutMs: 120_000 });

  const results = await Promise.all(jobs);
  results.forEach((r, i) => assert.equal(r.code, 0, `writer ${i}: ${r.stderr}`));
  // The writers really overlapped in time (each started before any finished).
  const spans = results.map((r) => r.stdout.trim().split(' ').map(Number));
  const lastStart = Math.max(...spans.map((x) => x[0]));
  const firstEnd = Math.min(...spans.map((x) => x[1]));
  assert.ok(lastStart < firstEnd, `writers did not overlap: ${JSON.stringify(spans)}`);
  const read = await reader;
  assert.equal(read.code, 0, read.stderr);
  assert.deepEqual(read.stdout.trim().split('\n'), [oldHash, oldHash, oldHash], 'the snapshot must read the same while the volume is written');
  const side = await sideWriter;
  assert.equal(side.code, 0, side.stdout + side.stderr);
  assert.doesNotMatch(side.stdout + side.stderr, /failed/);

  sameBytes(await readExport(server.uri('default')), expected, 'volume after 8 concurrent writers');
  sameBytes(await readExport(server.uri('default@before')), old, 'snapshot after the writers');
  const sideExpected = Buffer.from(old);
  sideExpected.fill(0x5e, 0, 4 * MiB - 1);
  sideExpected.fill(0x5f, 4 * MiB - 1, 4 * MiB + 4096);
  sameBytes(await readExport(server.uri('side')), sideExpected, 'clone written by qemu-io alongside');

  await server.stop();
  const again = await startServe(store);
  sameBytes(await readExport(again.uri('default')), expected, 'volume after a restart');
  sameBytes(await readExport(again.uri('side')), sideExpected, 'clone after a restart');
  await again.stop();
});

test('multi-conn: a write acknowledged on one connection is read at once on the others', async () => {
  const store = await initStore({ size: '16M' });
  const server = await startServe(store);
  const r = await python(String.raw`
import nbd, random, sys
uri = sys.argv[1]
hs = []
for i in range(4):
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.can_multi_conn()
    hs.append(h)
rng = random.Random(5)
size = hs[0].get_size()
bad = 0
for i in range(1500):
    n = rng.choice([1, 100, 4095, 4096, 4097, 70000])
    off = rng.randrange(0, size - n)
    data = rng.randbytes(n)
    w = hs[i % 4]
    op = rng.random()
    if op < 0.15:
        w.zero(n, off)
        data = bytes(n)
    else:
        w.pwrite(data, off, nbd.CMD_FLAG_FUA if op > 0.9 else 0)
    for r in hs:
        if r is not w and r.pread(n, off) != data:
            bad += 1
print(bad)
`, [server.uri('default')], { timeoutMs: 120_000 });
  assert.equal(r.code, 0, r.stderr);
  assert.equal(r.stdout.trim(), '0', 'reads on other connections that missed an acknowledged write');
  await server.stop();
});

test.run();
