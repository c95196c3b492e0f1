/**
 * CI length of the crash torture (crash-torture.harness.ts): 20 trials (COWSTACK_CRASH_TRIALS
 * overrides) of SIGKILL under load from libnbd clients, snapshots and clones taken online, kills
 * inside `cowstack recover` and during online commit and flatten; after each, recover, check, and
 * every volume and snapshot read back against the clients' own record. `pnpm torture` runs 200.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { killAll } from '../harness.js';
import { runCrashTorture } from './crash-torture.harness.js';
import { killChildren } from './torture-lib.js';

test.after.each(async () => {
  await killChildren();
  await killAll();
});

test('crash torture: SIGKILL under load, recover, nothing acknowledged lost, nothing torn', async () => {
  const trials = Number(process.env.COWSTACK_CRASH_TRIALS ?? 20);
  const seed = Number(process.env.COWSTACK_TORTURE_SEED ?? Math.floor(Math.random() * 2 ** 31));
  const failures: string[] = [];
  const result = await runCrashTorture({
    trials,
    seed,
    loadMs: [300, 1200],
    log: (line) => {
      console.log(`  ${line}`);
      if (!/: ok in /.test(line)) failures.push(line);
    },
  });
  const summary = `crash torture (seed ${seed}): ${result.passed} passed, ${result.failed} failed`;
  console.log(summary);
  assert.is(result.failed, 0, `${summary}\n${failures.join('\n')}`);
  assert.is(result.passed, trials);
});

test.run();
