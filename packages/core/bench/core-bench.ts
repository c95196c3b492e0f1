/**
 * Core benchmark (not a test). Run: `pnpm bench` in packages/core.
 *  1. 4 KiB random reads through the engine (no protocol) from a volume whose 64 MiB of data is
 *     spread evenly over 1, 16 and 256 layers: read cost must not grow with depth.
 *  2. Memory: RSS (and heap) of a process holding a 1 TiB volume with 10 000 scattered 4 KiB writes,
 *     and one with a fully written 1 GiB range, each measured in a fresh child process after reopen.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Store } from '@cowstack/core';

const mib = 1024 * 1024;
const dataBytes = 64 * mib;
const readPhaseMs = Number(process.env.BENCH_PHASE_MS ?? 2000);
const rounds = 5;

async function buildStack(dir: string, depth: number): Promise<Store> {
  const store = await Store.create(dir, { sizeBytes: dataBytes });
  const blocks = dataBytes / 4096;
  for (let layer = 0; layer < depth; layer++) {
    const pending: Promise<void>[] = [];
    for (let b = layer; b < blocks; b += depth) {
      pending.push(store.writeVolume('default', b * 4096, Buffer.alloc(4096, (b % 251) + 1), false));
      if (pending.length >= 256) await Promise.all(pending.splice(0));
    }
    await Promise.all(pending);
    if (layer < depth - 1) await store.snapshot('default');
  }
  return store;
}

function randomReads(store: Store): number {
  const blocks = dataBytes / 4096;
  let x = 12345;
  let n = 0;
  const start = performance.now();
  while (performance.now() - start < readPhaseMs) {
    for (let i = 0; i < 1000; i++) {
      x = (x * 1103515245 + 12345) >>> 0;
      const b = x % blocks;
      const data = store.readVolume('default', b * 4096, 4096) as Buffer;
      if (data[0] !== (b % 251) + 1) throw new Error(`block ${b} read back wrong`);
    }
    n += 1000;
  }
  return (n / (performance.now() - start)) * 1000;
}

function median(xs: number[]): number {
  const s = [...xs].sort((a, b) => a - b);
  return s[Math.floor(s.length / 2)];
}

async function readBench(): Promise<Array<{ depth: number; readsPerSecond: number }>> {
  const out: Array<{ depth: number; readsPerSecond: number }> = [];
  const stores: Array<{ depth: number; store: Store; dir: string }> = [];
  for (const depth of [1, 16, 256]) {
    const dir = mkdtempSync(join(tmpdir(), 'cowstack-core-bench-'));
    stores.push({ depth, store: await buildStack(dir, depth), dir });
  }
  // Interleave rounds so machine noise hits every depth alike.
  const samples = new Map<number, number[]>(stores.map((s) => [s.depth, []]));
  for (let r = 0; r < rounds; r++) for (const s of stores) samples.get(s.depth)!.push(randomReads(s.store));
  for (const s of stores) {
    out.push({ depth: s.depth, readsPerSecond: median(samples.get(s.depth)!) });
    await s.store.close();
    rmSync(s.dir, { recursive: true, force: true });
  }
  return out;
}

/** Child mode: build a scenario, reopen, report memory. */
async function memoryChild(scenario: string): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'cowstack-core-mem-'));
  let store = await Store.create(dir, { sizeBytes: 2 ** 40 });
  if (scenario === 'scattered') {
    let x = 99;
    const pending: Promise<void>[] = [];
    for (let i = 0; i < 10_000; i++) {
      // xorshift32: well spread over all 2^28 blocks of the volume
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      pending.push(store.writeVolume('default', (x >>> 4) * 4096, Buffer.alloc(4096, 1), false));
      if (pending.length >= 256) await Promise.all(pending.splice(0));
    }
    await Promise.all(pending);
  } else {
    const chunk = Buffer.alloc(mib, 1);
    for (let at = 0; at < 1024 * mib; at += 8 * mib) {
      await Promise.all(Array.from({ length: 8 }, (_, i) => store.writeVolume('default', 512 * 1024 * mib + at + i * mib, chunk, false)));
    }
  }
  const dirPath = store.dir;
  await store.close();
  global.gc?.();
  const baseline = process.memoryUsage();
  store = await Store.open(dirPath);
  global.gc?.();
  const loaded = process.memoryUsage();
  const index = store.projection.volumes.get('default')!.view.index;
  console.log(
    JSON.stringify({
      scenario,
      rssMiB: loaded.rss / mib,
      heapUsedMiB: loaded.heapUsed / mib,
      heapDeltaKiB: (loaded.heapUsed - baseline.heapUsed) / 1024,
      indexChunks: index.chunkCount,
      indexKiB: index.approximateBytes() / 1024,
    }),
  );
  await store.close();
  rmSync(dirPath, { recursive: true, force: true });
}

async function main(): Promise<void> {
  if (process.argv[2] === '--memory-child') return memoryChild(process.argv[3]);
  const reads = await readBench();
  const base = reads[0].readsPerSecond;
  console.log('4 KiB random reads through the engine (64 MiB of data spread over N layers), median of', rounds);
  for (const r of reads) console.log(`  depth ${String(r.depth).padStart(3)}: ${Math.round(r.readsPerSecond).toLocaleString('en-US').padStart(10)} reads/s  (${((r.readsPerSecond / base) * 100).toFixed(1)}% of depth 1)`);
  console.log('Memory of a 1 TiB volume after reopen (fresh process each):');
  for (const scenario of ['scattered', 'range']) {
    const child = spawnSync(process.execPath, ['--expose-gc', '--import', 'tsx', import.meta.filename, '--memory-child', scenario], { encoding: 'utf8' });
    if (child.status !== 0) throw new Error(child.stderr);
    const m = JSON.parse(child.stdout.trim().split('\n').pop()!);
    const label = scenario === 'scattered' ? '10 000 scattered 4 KiB writes' : 'one fully written 1 GiB range';
    console.log(`  ${label.padEnd(32)} RSS ${m.rssMiB.toFixed(1)} MiB, heap ${m.heapUsedMiB.toFixed(1)} MiB (+${m.heapDeltaKiB.toFixed(0)} KiB for the store), index ${m.indexChunks} chunks ≈ ${m.indexKiB.toFixed(0)} KiB`);
  }
}

await main();
