/**
 * Recovery benchmark (not a test): time `cowstack recover` on a journal of RECOVERY_EVENTS events
 * (default 10 million) written after the store's last checkpoint, as after a crash: 99% single-block
 * Zero events scattered over a 4 GiB volume, 1% 4 KiB Write events whose data recovery re-applies.
 * The events are appended straight to the journal (in group-commit batches of 1000), which is how a
 * serving store would have left them had it been killed before checkpointing.
 */
import { spawnSync } from 'node:child_process';
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { blockCrcs, EventType, Store, type StoreEvent } from '@cowstack/core';
import { Journal } from '@cowstack/journal';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const events = Number(process.env.RECOVERY_EVENTS ?? 10_000_000);
const volumeBlocks = (4 * 1024 ** 3) / 4096;

export async function recoveryBench(): Promise<{ events: number; seconds: number; eventsPerSecond: number; writesReapplied: number; wallSeconds: number }> {
  const dir = mkdtempSync(join(tmpdir(), 'cowstack-recovery-bench-'));
  try {
    const store = await Store.create(dir, { sizeBytes: volumeBlocks * 4096 });
    const top = store.volumeInfo('default').topLayerId;
    await store.close();
    const journal = await Journal.open<StoreEvent>(join(dir, 'journal'));
    const payload = Buffer.alloc(4096, 0x5a);
    const crcs = blockCrcs(payload, 4096);
    let x = 2463534242;
    const started = performance.now();
    for (let done = 0; done < events; ) {
      const batch: Promise<number>[] = [];
      for (let i = 0; i < 1000 && done < events; i++, done++) {
        x ^= x << 13;
        x ^= x >>> 17;
        x ^= x << 5;
        x >>>= 0;
        const block = x % volumeBlocks;
        batch.push(done % 100 === 99 ? journal.append([EventType.Write, top, block, 1, crcs], { payload }) : journal.append([EventType.Zero, top, block, 1]));
      }
      await Promise.all(batch);
    }
    await journal.close();
    console.error(`recovery bench: wrote ${events} events in ${((performance.now() - started) / 1000).toFixed(1)} s; running cowstack recover`);
    const wallStart = performance.now();
    const r = spawnSync(process.execPath, [join(root, 'packages/cli/bin/cowstack.js'), 'recover', dir, '--json'], { encoding: 'utf8' });
    const wallSeconds = (performance.now() - wallStart) / 1000;
    if (r.status !== 0) throw new Error(`cowstack recover failed: ${r.stderr}`);
    const report = JSON.parse(r.stdout) as { eventsReplayed: number; durationMs: number; eventsPerSecond: number; writesReapplied: number };
    return { events: report.eventsReplayed, seconds: report.durationMs / 1000, eventsPerSecond: report.eventsPerSecond, writesReapplied: report.writesReapplied, wallSeconds };
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
}

if (import.meta.filename === process.argv[1]) {
  const r = await recoveryBench();
  console.log(
    `cowstack recover: ${r.events.toLocaleString('en-US')} events (${r.writesReapplied.toLocaleString('en-US')} writes re-applied) in ${r.seconds.toFixed(2)} s = ${Math.round(r.eventsPerSecond).toLocaleString('en-US')} events/s; command wall time ${r.wallSeconds.toFixed(2)} s`,
  );
}
