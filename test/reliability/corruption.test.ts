/**
 * CI length of the corruption harness (corruption.harness.ts): every fixed damage scenario (payload
 * log, layer files, checkpoints, journal frames) as its own test, then 12 random byte flips in the
 * journal's LevelDB files (COWSTACK_CORRUPTION_FLIPS overrides). `pnpm torture` runs 200 flips.
 * A failing scenario prints what check and recover said and what was served.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { killAll } from '../harness.js';
import { buildFixtures, type Fixture, randomLevelFlip, type ScenarioResult, scenarios } from './corruption.harness.js';
import { Rng } from './torture-lib.js';

const seed = Number(process.env.COWSTACK_TORTURE_SEED ?? Math.floor(Math.random() * 2 ** 31));
const flips = Number(process.env.COWSTACK_CORRUPTION_FLIPS ?? 12);
const rng = new Rng(seed);
let fixtures: { clean: Fixture; crashed: Fixture } | undefined;

test.before(async () => {
  fixtures = await buildFixtures(seed % 1000);
});
test.after.each(killAll);

function verdict(r: ScenarioResult): void {
  const text = [`${r.name} (seed ${seed})${r.outcome ? ` -> ${r.outcome}` : ''}`, ...r.observed.map((l) => `  ${l}`), ...r.failures.map((l) => `  FAIL: ${l}`)].join('\n');
  assert.ok(r.ok, text);
}

for (const [name, scenario] of Object.entries(scenarios)) {
  test(name, async () => verdict(await scenario(fixtures!, rng)));
}

test(`${flips} random byte flips in the journal's LevelDB files: refused, flagged or harmless, never silent`, async () => {
  const outcomes: Record<string, number> = {};
  const failed: string[] = [];
  for (let i = 0; i < flips; i++) {
    const r = await randomLevelFlip(fixtures!, rng, i + 1);
    outcomes[r.outcome ?? '?'] = (outcomes[r.outcome ?? '?'] ?? 0) + 1;
    if (!r.ok) failed.push([r.name, ...r.observed.map((l) => `  ${l}`), ...r.failures.map((l) => `  FAIL: ${l}`)].join('\n'));
  }
  console.log(`LevelDB flips (seed ${seed}): ${Object.entries(outcomes).map(([k, v]) => `${v} ${k}`).join(', ')}`);
  assert.is(failed.length, 0, failed.join('\n'));
});

test.run();
