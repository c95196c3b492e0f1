/**
 * Journal space cost per GiB written (not a test): writes 1 GiB through the engine with 4 KiB writes
 * and with 1 MiB writes into stores that keep every payload (retain all), then reports the bytes of
 * the journal's LevelDB files and of its payload log. Run: node --import tsx bench/journal-space.ts
 */
import { randomBytes } from 'node:crypto';
import { mkdtempSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { Store } from '@cowstack/core';

const gib = 1024 ** 3;

function bytesUnder(dir: string): number {
  let total = 0;
  for (const name of readdirSync(dir)) {
    const path = join(dir, name);
    const st = statSync(path);
    total += st.isDirectory() ? bytesUnder(path) : st.size;
  }
  return total;
}

for (const writeBytes of [4096, 1024 * 1024]) {
  const dir = mkdtempSync(join(tmpdir(), 'cowstack-space-'));
  const store = await Store.create(dir, { sizeBytes: 2 * gib, retain: { kind: 'all' } });
  // Random data, so block CRCs differ and LevelDB's compression does not flatter the figure.
  const pool = randomBytes(64 * 1024 * 1024);
  const pending: Promise<void>[] = [];
  for (let at = 0; at < gib; at += writeBytes) {
    const from = at % (pool.length - writeBytes);
    pending.push(store.writeVolume('default', at, Buffer.from(pool.subarray(from, from + writeBytes)), false));
    if (pending.length >= 64) await Promise.all(pending.splice(0));
  }
  await Promise.all(pending);
  await store.close();
  const payloads = bytesUnder(join(dir, 'journal', 'payloads'));
  const leveldb = bytesUnder(join(dir, 'journal')) - payloads;
  console.log(
    `${writeBytes >= 1024 * 1024 ? '1 MiB' : '4 KiB'} writes: payload log ${(payloads / gib).toFixed(3)} GiB, LevelDB (events, checkpoints) ${(leveldb / 1024 ** 2).toFixed(1)} MiB per GiB written`,
  );
  rmSync(dir, { recursive: true, force: true });
}
