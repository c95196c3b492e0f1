/**
 * SIGKILL crash test: a child appends in a loop and is killed at a random moment; on reopen every
 * append whose promise resolved is present with its content, the log verifies, and appends continue
 * from the right seq. Each trial continues the same journal, so recovery is exercised repeatedly.
 * A crash may leave a torn tail (batches that never committed: frames without their payloads, or a
 * later batch without an earlier one); it is cut as the store cuts it on open, and must lie past
 * every acknowledged append.
 */
import { spawn } from 'node:child_process';
import { join } from 'node:path';
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { Journal, JournalTornTailError } from '../src/index.js';
import { payloadFor } from './fixtures/append-payload.js';
import { replayAll, replayError, tempDir } from './helpers.js';

const trials = Number(process.env.COWSTACK_CRASH_TRIALS ?? 12);
const child = join(import.meta.dirname, 'fixtures/append-child.ts');

async function runAndKill(dir: string, killAfterMs: number): Promise<Map<number, [number, number]>> {
  const proc = spawn(process.execPath, ['--conditions=source', '--import', 'tsx', child, dir, '8'], { stdio: ['ignore', 'pipe', 'inherit'] });
  const acked = new Map<number, [number, number]>();
  let buffered = '';
  let ready: () => void;
  const started = new Promise<void>((resolve) => (ready = resolve));
  proc.stdout.setEncoding('utf8');
  proc.stdout.on('data', (text: string) => {
    buffered += text;
    const lines = buffered.split('\n');
    buffered = lines.pop() ?? '';
    for (const line of lines) {
      if (line === 'ready') ready();
      else {
        const [seq, writer, index] = line.split(' ').map(Number);
        acked.set(seq, [writer, index]);
      }
    }
  });
  const exited = new Promise<void>((resolve) => proc.on('exit', () => resolve()));
  await started;
  await new Promise((r) => setTimeout(r, killAfterMs));
  proc.kill('SIGKILL');
  await exited;
  return acked;
}

test(`every acknowledged append survives SIGKILL (${trials} trials)`, async () => {
  const dir = tempDir('crash');
  let totalAcked = 0;
  let tornTails = 0;
  for (let trial = 0; trial < trials; trial++) {
    const acked = await runAndKill(dir, 30 + Math.floor(Math.random() * 400));
    totalAcked += acked.size;
    const journal = await Journal.open<[number, number, number]>(dir);
    try {
      const torn = await replayError(journal);
      if (torn !== undefined) {
        assert.ok(torn instanceof JournalTornTailError, `trial ${trial}: ${String(torn)}`);
        const lastAcked = Math.max(0, ...acked.keys());
        assert.ok(torn.seq > lastAcked, `trial ${trial}: the torn tail from seq ${torn.seq} holds acknowledged seq ${lastAcked}`);
        tornTails++;
        await journal.cutTail(torn.seq);
      }
      const report = await journal.verify();
      assert.ok(report.ok, `trial ${trial}: ${JSON.stringify(report.problems)}`);
      const records = new Map((await replayAll(journal)).map((r) => [r.seq, r]));
      for (const [seq, [writer, index]] of acked) {
        const record = records.get(seq);
        assert.ok(record, `trial ${trial}: acknowledged seq ${seq} is missing after the crash`);
        assert.equal(record.meta, [writer, index, payloadFor(writer, index)?.length ?? 0]);
        assert.equal(record.payload, payloadFor(writer, index));
      }
      const next = journal.lastSeq + 1;
      assert.is(await journal.append([99, trial, 0]), next, 'appends continue right after the last surviving record');
    } finally {
      await journal.close();
    }
  }
  assert.ok(totalAcked > trials, `the children acknowledged appends (${totalAcked}; torn tails cut: ${tornTails})`);
});

test.run();
