/**
 * CI length of the soak test (soak.harness.ts): 64 concurrent libnbd connections of mixed load
 * (reads, writes, FUA writes, flushes, trims, write-zeroes, block status; three volumes, a clone and
 * two snapshots) against one `cowstack serve --metrics` for 2 minutes (about 2.5 minutes in all). No
 * client error, every read and the final read-back correct (also after a restart), RSS flat after a
 * 30 s warm-up (≤ +25 %), p99 latency stable (last quarter ≤ max(2 × first quarter, first + 5 ms),
 * judged when the shared machine's load did not rise by half between the quarters) and the server's
 * CPU time per request stable (≤ ×1.5), exit 0 after SIGTERM, `cowstack check` clean. The full run
 * (30 minutes) is `pnpm torture soak`.
 */
import { strict as assert } from 'node:assert';
import { test } from 'uvu';
import { killAll } from '../harness.js';
import { ciSoakOptions, formatSoakReport, runSoak, soakProblems } from './soak.harness.js';

test.after.each(killAll);

test('soak: 64 connections of mixed load for 2 minutes; no errors, data verified, RSS flat, p99 stable', async () => {
  const options = { ...ciSoakOptions, log: (line: string) => process.env.COWSTACK_SOAK_VERBOSE && console.log(line) };
  const report = await runSoak(options);
  console.log(formatSoakReport(report));
  const problems = soakProblems(report, options);
  assert.deepEqual(problems, [], problems.join('\n'));
});

test.run();
