/**
 * SIGKILL crash test, one level above the journal's: a child process writes through the engine from
 * several concurrent writers and is killed at a random moment; the store is reopened (recovery) and
 * every acknowledged write must read back. For each writer, the region holds exactly its acknowledged
 * ops, or those plus the one op it had in flight (committed but not yet acknowledged). Each trial
 * resumes the same store, and `check` must pass at the end.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { checkStore, Store } from '../src/index.js';
import { applyOps, regionBytes, writers } from './fixtures/writer-ops.js';
import { flat, tempDir } from './helpers.js';

const trials = Number(process.env.COWSTACK_CRASH_TRIALS ?? 12);
const child = join(import.meta.dirname, 'fixtures/writer-child.ts');

async function runAndKill(dir: string, resume: number[], killAfterMs: number): Promise<{ acked: number[]; started: number[] }> {
  const proc = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', child, dir, resume.join(',')], { stdio: ['ignore', 'pipe', 'inherit'] });
  const acked = resume.map((r) => r - 1);
  const started = resume.map((r) => r - 1);
  let buffered = '';
  let ready!: () => void;
  const isReady = new Promise<void>((r) => (ready = r));
  proc.stdout.setEncoding('utf8');
  proc.stdout.on('data', (text: string) => {
    buffered += text;
    const lines = buffered.split('\n');
    buffered = lines.pop() ?? '';
    for (const line of lines) {
      const [what, w, i] = line.split(' ');
      if (what === 'ready') ready();
      else if (what === 'start') started[Number(w)] = Math.max(started[Number(w)], Number(i));
      else if (what === 'ack') acked[Number(w)] = Math.max(acked[Number(w)], Number(i));
    }
  });
  const exited = new Promise<void>((r) => proc.on('exit', () => r()));
  await Promise.race([isReady, exited]);
  await new Promise((r) => setTimeout(r, killAfterMs));
  proc.kill('SIGKILL');
  await exited;
  return { acked, started };
}

test(`no acknowledged write is lost when the writer is SIGKILLed (${trials} trials)`, async () => {
  const dir = tempDir('core-crash');
  await (await Store.create(dir, { sizeBytes: writers * regionBytes })).close();
  let resume = new Array(writers).fill(0);
  let totalAcked = 0;
  for (let trial = 0; trial < trials; trial++) {
    const { acked, started } = await runAndKill(dir, resume, 50 + Math.floor(Math.random() * 500));
    const store = await Store.open(dir);
    try {
      const volume = flat(store.readVolume('default', 0, writers * regionBytes));
      for (let w = 0; w < writers; w++) {
        const region = volume.subarray(w * regionBytes, (w + 1) * regionBytes);
        const withAcked = Buffer.alloc(writers * regionBytes);
        applyOps(withAcked, w, acked[w] + 1);
        const ok = region.equals(withAcked.subarray(w * regionBytes, (w + 1) * regionBytes));
        let okWithInflight = false;
        if (!ok && started[w] > acked[w]) {
          const withInflight = Buffer.alloc(writers * regionBytes);
          applyOps(withInflight, w, started[w] + 1);
          okWithInflight = region.equals(withInflight.subarray(w * regionBytes, (w + 1) * regionBytes));
        }
        assert.ok(ok || okWithInflight, `trial ${trial}, writer ${w}: region is neither its ${acked[w] + 1} acknowledged ops nor those plus the one in flight`);
        // Continue after the op in flight if it made it, else after the acknowledged ones.
        resume[w] = ok ? acked[w] + 1 : started[w] + 1;
        totalAcked += acked[w] + 1;
      }
    } finally {
      await store.close();
    }
    resume = [...resume];
  }
  assert.ok(totalAcked > trials * writers, 'the children acknowledged writes');
  const report = await checkStore(dir);
  assert.ok(report.ok, JSON.stringify(report.problems));
});

test.run();
