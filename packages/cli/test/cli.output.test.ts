/**
 * What a command prints around its result: on a terminal (a pty from `script`) long work draws a
 * progress bar on stderr; with stdout and stderr not terminals, or with --json, nothing but the
 * result is printed (no bar, no escape codes), and --json output is exactly one JSON document. A
 * reader that closes the pipe early (`| head`) ends the command quietly with exit 0.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { blockCrcs, EventType, type StoreEvent } from '@cowstack/core';
import { Journal } from '@cowstack/journal';
import { assertNoStack, cowArgs, cowJson, cowOk, pseudoRandom, qemuIo, run, Server, tempDir } from './helpers.js';

const MiB = 1024 * 1024;

/** Run a cowstack command on a pseudo-terminal; returns what the terminal showed, with \r\n as \n. */
async function onTerminal(args: string[]): Promise<{ code: number | null; shown: string }> {
  const command = cowArgs(args)
    .map((a) => `'${a.replace(/'/g, "'\\''")}'`)
    .join(' ');
  const r = await run('script', ['-qec', command, '/dev/null'], { timeoutMs: 60_000 });
  return { code: r.code, shown: r.stdout.replace(/\r\n/g, '\n') };
}

// Escape sequences and carriage returns: the marks of a progress bar or cursor control.
const terminalControl = /\u001b\[|\r/;

test('long commands draw a progress bar on a terminal, and nothing when output is not a terminal or --json', async () => {
  const dir = tempDir('output');
  const image = join(dir, 'image.raw');
  writeFileSync(image, pseudoRandom(32 * MiB, 11));

  const tty = await onTerminal(['init', join(dir, 'tty'), '--import', image]);
  assert.is(tty.code, 0, tty.shown);
  assert.match(tty.shown, /importing\s+\[[^\]]+\] 100% \| 33554432\/33554432/, 'import draws a bar on a terminal');
  assert.match(tty.shown, `created store ${join(dir, 'tty')}`);
  const ttyExport = await onTerminal(['export', join(dir, 'tty'), 'default', join(dir, 'out.raw')]);
  assert.match(ttyExport.shown, /exporting\s+\[[^\]]+\] 100%/, 'export draws a bar on a terminal');

  const ttyJson = await onTerminal(['export', join(dir, 'tty'), 'default', join(dir, 'out2.raw'), '--json']);
  assert.is(ttyJson.code, 0);
  assert.not.match(ttyJson.shown, terminalControl, 'no bar with --json, even on a terminal');
  assert.is(JSON.parse(ttyJson.shown).sizeBytes, 32 * MiB);

  const piped = await Promise.all([
    cowOk(['init', join(dir, 'piped'), '--import', image]),
    cowOk(['export', join(dir, 'tty'), 'default', join(dir, 'out3.raw')]),
  ]);
  for (const r of piped) {
    assert.is(r.stderr, '', 'no bar when stderr is not a terminal');
    assert.not.match(r.stdout, terminalControl);
  }
  const checks = await Promise.all([cowOk(['check', join(dir, 'piped')]), cowOk(['recover', join(dir, 'tty')])]);
  for (const r of checks) {
    assert.is(r.stderr, '');
    assert.not.match(r.stdout, terminalControl);
  }
});

test('check, recover and flatten draw their progress bars on a terminal too', async () => {
  const dir = tempDir('output');
  const image = join(dir, 'image.raw');
  writeFileSync(image, pseudoRandom(8 * MiB, 12));
  const store = join(dir, 'store');
  await cowOk(['init', store, '--import', image]);
  await cowOk(['snapshot', store, 'default', '--name', 'golden']);
  await cowOk(['clone', store, 'default@golden', 'vm1']);

  const flatten = await onTerminal(['flatten', store, 'vm1']);
  assert.is(flatten.code, 0, flatten.shown);
  assert.match(flatten.shown, /flattening\s+\[[^\]]+\] 100%/);
  const check = await onTerminal(['check', store]);
  assert.is(check.code, 0, check.shown);
  assert.match(check.shown, /checking data\s+\[[^\]]+\] 100%/);

  // Events after the last checkpoint, as a crash leaves them: recover replays them.
  const top = (await cowJson<{ volumes: Array<{ name: string; topLayerId: number }> }>(['ls', store])).volumes.find((v) => v.name === 'vm1')!.topLayerId;
  const journal = await Journal.open<StoreEvent>(join(store, 'journal'));
  const data = Buffer.alloc(4096, 0x33);
  await Promise.all(Array.from({ length: 100 }, (_, block) => journal.append([EventType.Write, top, block, 1, blockCrcs(data, 4096)], { payload: data })));
  await journal.close();
  const recover = await onTerminal(['recover', store]);
  assert.is(recover.code, 0, recover.shown);
  assert.match(recover.shown, /replaying journal\s+\[[^\]]+\] 100% \| 100\/100/);
});

test('a reader that stops early (| head) ends the command quietly with exit 0', async () => {
  const dir = tempDir('output');
  const store = join(dir, 'store');
  await cowOk(['init', store, '--size', '4M']);
  const server = await Server.start(store);
  try {
    // Enough events that the listing outgrows a pipe's buffer.
    await qemuIo(
      server.uri('default'),
      Array.from({ length: 800 }, (_, i) => `write -P ${i % 250} ${(i % 1024) * 4096} 512`),
    );
  } finally {
    await server.stop();
  }
  const quoted = cowArgs(['journal', 'inspect', store]).join(' ');
  const r = await run('bash', ['-c', `set -o pipefail; ${quoted} | head -n 2`]);
  assert.is(r.code, 0, `exit status of cowstack in the pipeline: ${r.stderr}`);
  assert.is(r.stdout.split('\n').length, 3);
  assert.is(r.stderr, '');
  assertNoStack(r.stderr, 'journal inspect | head');
});

test.run();
