/**
 * Journal benchmark (not a test): appends/s unsynced (64-byte and 4 KiB events), durable appends/s
 * with 1, 16 and 64 concurrent writers, and replay records/s. Run: `pnpm bench` in packages/journal.
 * Uses the built package (dist), a fresh LevelDB in a temp dir, and prints a table (or --json).
 */
import { mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { count, lastValueFrom } from 'rxjs';
import { Journal } from '@cowstack/journal';

const phaseMs = Number(process.env.BENCH_PHASE_MS ?? 3000);
const replayRecords = Number(process.env.BENCH_REPLAY_RECORDS ?? 2_000_000);
const json = process.argv.includes('--json');

/** ~64 bytes once msgpack-encoded: a tuple like the core's write events. */
const smallEvent = (i: number): unknown[] => [1, 42, i * 4096, 4096, 0x12345678, 'vol-0001', [i, i + 1, i + 2], 'x'.repeat(20)];
const payload4k = Buffer.alloc(4096, 0xab);

async function timed(writers: number, body: (i: number) => Promise<unknown>): Promise<number> {
  const start = performance.now();
  const until = start + phaseMs;
  let done = 0;
  await Promise.all(
    Array.from({ length: writers }, async () => {
      while (performance.now() < until) {
        await body(done);
        done++;
      }
    }),
  );
  return (done / (performance.now() - start)) * 1000;
}

async function main(): Promise<void> {
  const dir = mkdtempSync(join(tmpdir(), 'cowstack-journal-bench-'));
  const results: Array<{ case: string; perSecond: number; unit: string }> = [];
  try {
    const journal = await Journal.open(dir, { create: true });
    results.push({ case: 'append 64-byte events, unsynced, 256 writers', perSecond: await timed(256, (i) => journal.append(smallEvent(i))), unit: 'records/s' });
    results.push({
      case: 'append 4 KiB events, unsynced, 64 writers',
      perSecond: await timed(64, (i) => journal.append(smallEvent(i), { payload: payload4k })),
      unit: 'records/s',
    });
    for (const writers of [1, 16, 64]) {
      results.push({
        case: `append 4 KiB events, sync, ${writers} writer${writers > 1 ? 's' : ''}`,
        perSecond: await timed(writers, (i) => journal.append(smallEvent(i), { payload: payload4k, sync: true })),
        unit: 'records/s',
      });
    }
    while (journal.lastSeq < replayRecords) {
      const batch: Promise<number>[] = [];
      for (let i = 0; i < 1000; i++) batch.push(journal.append(smallEvent(i)));
      await Promise.all(batch);
    }
    await journal.close();
    const reopened = await Journal.open(dir);
    let best = 0;
    for (let round = 0; round < 3; round++) {
      const start = performance.now();
      const n = await lastValueFrom(reopened.replay(1, undefined, { payloads: false }).pipe(count()));
      best = Math.max(best, (n / (performance.now() - start)) * 1000);
    }
    results.push({ case: `replay ${reopened.lastSeq} records (metadata, best of 3)`, perSecond: best, unit: 'records/s' });
    await reopened.close();
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
  if (json) {
    console.log(JSON.stringify(results, null, 2));
    return;
  }
  const width = Math.max(...results.map((r) => r.case.length));
  for (const r of results) console.log(`${r.case.padEnd(width)}  ${Math.round(r.perSecond).toLocaleString('en-US').padStart(12)} ${r.unit}`);
}

await main();
