/**
 * Memory of the fleet case (not a test): one base volume with DATA_MIB MiB of data (default 1024),
 * a golden snapshot, CLONES clones (default 100) each with WRITES_PER_CLONE scattered 4 KiB writes
 * (default 1000), served by `cowstack serve`; reports the server's RSS after every clone has been
 * opened and read over NBD. Run: node --import tsx bench/clones-rss.ts
 */
import { spawn, spawnSync } from 'node:child_process';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Store } from '@cowstack/core';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const mib = 1024 * 1024;
const dataMiB = Number(process.env.DATA_MIB ?? 1024);
const clones = Number(process.env.CLONES ?? 100);
const writesPerClone = Number(process.env.WRITES_PER_CLONE ?? 1000);

function rssMiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+) kB/.exec(status)![1]) / 1024;
}

const dir = mkdtempSync(join(tmpdir(), 'cowstack-clones-'));
try {
  const store = await Store.create(dir, { sizeBytes: dataMiB * mib });
  const chunk = Buffer.alloc(mib, 0x42);
  for (let at = 0; at < dataMiB * mib; at += 8 * mib) {
    await Promise.all(Array.from({ length: 8 }, (_, i) => store.writeVolume('default', at + i * mib, chunk, false)));
  }
  await store.snapshot('default', 'golden');
  let x = 12345;
  for (let c = 0; c < clones; c++) {
    await store.clone('default@golden', `vm${c}`);
    const pending: Promise<void>[] = [];
    for (let w = 0; w < writesPerClone; w++) {
      x ^= x << 13;
      x ^= x >>> 17;
      x ^= x << 5;
      x >>>= 0;
      pending.push(store.writeVolume(`vm${c}`, (x % ((dataMiB * mib) / 4096)) * 4096, Buffer.alloc(4096, c & 0xff), false));
    }
    await Promise.all(pending);
  }
  await store.close();
  const socket = join(dir, 'nbd.sock');
  const server = spawn(process.execPath, [join(root, 'packages/cli/bin/cowstack.js'), 'serve', dir, '--socket', socket], { stdio: ['ignore', 'ignore', 'pipe'] });
  await new Promise<void>((resolve) => server.stderr!.on('data', (d: Buffer) => /serving/.test(String(d)) && resolve()));
  const idle = rssMiB(server.pid!);
  for (let c = 0; c < clones; c++) {
    const r = spawnSync('nbdinfo', ['--map', `nbd+unix:///vm${c}?socket=${socket}`], { encoding: 'utf8' });
    if (r.status !== 0) throw new Error(r.stderr);
  }
  const after = rssMiB(server.pid!);
  server.kill('SIGTERM');
  await new Promise((r) => server.on('exit', r));
  console.log(
    `${clones} clones of a ${dataMiB} MiB golden image, ${writesPerClone} scattered 4 KiB writes each: server RSS ${idle.toFixed(0)} MiB after open, ${after.toFixed(0)} MiB after mapping every clone over NBD`,
  );
} finally {
  rmSync(dir, { recursive: true, force: true });
}
