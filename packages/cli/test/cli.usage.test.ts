/**
 * The command line's contract with scripts: --help on every command and subcommand (exit 0, with an
 * example), usage errors (unknown command or option, missing argument, bad size, block size or seq)
 * exit 2 with a usage message, reported problems exit 1 with one clear line (and a JSON error object
 * with --json), never a stack trace. The command list is read from `cowstack --help`, so a new
 * command without help or an example fails here.
 */
import { test } from 'uvu';
import * as assert from 'uvu/assert';
import { cpSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { assertNoStack, cow, cowOk, type RunResult, tempDir } from './helpers.js';

/** Every command path, as `cowstack --help` and the group helps list them. */
const expectedCommands = [
  'init',
  'serve',
  'recover',
  'check',
  'ls',
  'volume',
  'volume create',
  'volume delete',
  'volume ls',
  'snapshot',
  'clone',
  'commit',
  'flatten',
  'import',
  'export',
  'map',
  'diff',
  'blame',
  'retain',
  'import-dmcow',
  'table',
  'journal',
  'journal stats',
  'journal inspect',
  'journal tail',
  'journal verify',
];

/** Subcommand names in a commander help text's "Commands:" section (without `help`). */
function commandsIn(help: string): string[] {
  const section = help.split(/^Commands:$/m)[1] ?? '';
  return [...section.matchAll(/^ {2}(\w[\w-]*)/gm)].map((m) => m[1]).filter((c) => c !== 'help');
}

test('--help of every command and subcommand exits 0, shows usage and an example', async () => {
  const root = await cowOk(['--help']);
  const helps = new Map<string, RunResult>();
  const helpOf = async (path: string[]): Promise<void> => {
    const r = await cow([...path, '--help']);
    helps.set(path.join(' '), r);
    await Promise.all(commandsIn(r.stdout).map((sub) => helpOf([...path, sub])));
  };
  await Promise.all(commandsIn(root.stdout).map((c) => helpOf([c])));
  assert.equal([...helps.keys()].sort(), [...expectedCommands].sort(), 'the commands cowstack --help lists');
  for (const [c, r] of helps) {
    assert.is(r.code, 0, `cowstack ${c} --help exits 0`);
    assert.match(r.stdout, `Usage: cowstack ${c}`, `cowstack ${c} --help shows usage`);
    assert.match(r.stdout, /^Examples?:$/m, `cowstack ${c} --help has an example`);
    assert.match(r.stdout, /\$ .*cowstack /, `cowstack ${c} --help example is a command line`);
    assert.is(r.stderr, '', `cowstack ${c} --help writes nothing to stderr`);
  }
  const [viaHelp, version] = await Promise.all([cow(['help', 'journal']), cow(['--version'])]);
  assert.is(viaHelp.code, 0);
  assert.match(viaHelp.stdout, 'Usage: cowstack journal');
  assert.is(version.code, 0);
  assert.match(version.stdout, /^\d+\.\d+\.\d+/);
});

test('usage errors exit 2 with a message and a pointer to --help', async () => {
  const dir = tempDir();
  const store = join(dir, 'store');
  const cases: Array<{ args: string[]; message: RegExp | string }> = [
    { args: [], message: 'Usage: cowstack' },
    { args: ['volume'], message: 'Usage: cowstack volume' },
    { args: ['journal'], message: 'Usage: cowstack journal' },
    { args: ['frobnicate', store], message: "unknown command 'frobnicate'" },
    { args: ['ls', store, '--frobnicate'], message: "unknown option '--frobnicate'" },
    { args: ['volume', 'resize', store, 'x'], message: "unknown command 'resize'" },
    { args: ['ls'], message: "missing required argument 'store'" },
    { args: ['clone', store, 'default@golden'], message: "missing required argument 'name'" },
    { args: ['ls', store, 'extra'], message: 'too many arguments' },
    { args: ['init', store, '--size', '16Q'], message: '"16Q" is not a size' },
    { args: ['init', store, '--size', 'ten'], message: '"ten" is not a size' },
    { args: ['init', store, '--size', '0'], message: '"0" is not a whole, positive number of bytes' },
    { args: ['init', store, '--size', '1.5'], message: 'is not a whole, positive number of bytes' },
    { args: ['init', store, '--size', '1M', '--block-size', '1000'], message: '1000 is not a power of two from 512 to 65536' },
    { args: ['init', store, '--size', '1M', '--block-size', '256'], message: '256 is not a power of two from 512 to 65536' },
    { args: ['init', store, '--size', '1M', '--block-size', '131072'], message: '131072 is not a power of two from 512 to 65536' },
    { args: ['init', store, '--size', '1M', '--block-size', '4k'], message: '"4k" is not a whole number' },
    { args: ['init', store, '--base', '/dev/null', '--import', '/dev/null'], message: "cannot be used with option '--import" },
    { args: ['volume', 'create', store, 'v'], message: "required option '--size <size>' not specified" },
    { args: ['volume', 'create', store, 'v', '--size', 'big'], message: '"big" is not a size' },
    { args: ['import', store, '/dev/null'], message: "required option '--volume <name>' not specified" },
    { args: ['journal', 'inspect', store, '--from', 'abc'], message: '"abc" is not a whole number' },
    { args: ['journal', 'inspect', store, '--to', '-1'], message: '"-1" is not a whole number' },
    { args: ['journal', 'tail', store, '-n', 'x'], message: '"x" is not a whole number' },
    { args: ['journal', 'tail', store, '-n', ''], message: '"" is not a whole number' },
    { args: ['journal', 'inspect', store, '--from', '0x10'], message: '"0x10" is not a whole number' },
    { args: ['journal', 'inspect', store, '--from', '1e3'], message: '"1e3" is not a whole number' },
    { args: ['journal', 'inspect', store, '--type', 'Wrte'], message: '"Wrte" is not an event type (one of StoreCreated, LayerCreated' },
    { args: ['serve', store, '--port', 'http'], message: '"http" is not a whole number' },
    { args: ['serve', store, '--port', '99999'], message: '99999 is not a TCP port (0 to 65535)' },
    { args: ['serve', store, '--max-connections', '0'], message: '0 is not allowed here: give 1 or more' },
    { args: ['serve', store, '--checkpoint-every', '0'], message: '"0" is not a whole, positive number of bytes' },
    { args: ['serve', store, '--checkpoint-every', 'often'], message: '"often" is not a size' },
    { args: ['serve', store, '--socket', 's', '--socket-mode', 'rw'], message: '"rw" is not an octal mode' },
    { args: ['serve', store, '--socket', 's', '--socket-mode', '999'], message: '"999" is not an octal mode' },
    { args: ['serve', store, '--metrics', 'localhost'], message: '"localhost" is not ADDR:PORT' },
    { args: ['serve', store, '--metrics', '127.0.0.1:70000'], message: '"127.0.0.1:70000" is not ADDR:PORT' },
  ];
  const results = await Promise.all(cases.map(async (c) => ({ c, r: await cow(c.args) })));
  for (const { c, r } of results) {
    const what = `cowstack ${c.args.join(' ')}`;
    assert.is(r.code, 2, `${what} exits 2 (got ${r.code}: ${r.stderr})`);
    assert.match(r.stderr, c.message, `${what} says why`);
    assert.is(r.stdout, '', `${what} prints nothing on stdout`);
    assertNoStack(r.stderr, what);
  }
  // A bare `cowstack`, `cowstack volume` or `cowstack journal` shows the help itself instead.
  for (const { r } of results.filter(({ c }) => c.args.length > 1)) {
    assert.match(r.stderr, '(add --help for usage)');
  }
  assert.not.ok(existsSync(store), 'no usage error created the store');
});

test('reported problems exit 1 with one clear line, and a JSON error object with --json', async () => {
  const dir = tempDir();
  const template = join(dir, 'template');
  await cowOk(['init', template, '--size', '1M']);
  let copies = 0;
  /** A private copy of the store, so commands can run in parallel without contending for its lock. */
  const copy = (): string => {
    const to = join(dir, `store-${copies++}`);
    cpSync(template, to, { recursive: true });
    return to;
  };
  const cases: Array<{ args: (store: string) => string[]; code: string; message: (store: string) => string }> = [
    { args: () => ['ls', join(dir, 'nowhere')], code: 'ENOENT', message: () => `no cowstack store at ${join(dir, 'nowhere')}` },
    { args: () => ['ls', dir], code: 'ENOENT', message: () => `no cowstack store at ${dir}` },
    { args: (s) => ['init', s, '--size', '1M'], code: 'EEXIST', message: (s) => `${s} already holds a cowstack store` },
    { args: () => ['init', join(dir, 'other')], code: 'EINVAL', message: () => 'init needs --size' },
    { args: () => ['init', join(dir, 'other'), '--base', join(dir, 'missing.raw')], code: 'ENOENT', message: () => `cannot open base image ${join(dir, 'missing.raw')}` },
    { args: (s) => ['volume', 'create', s, 'default', '--size', '1M'], code: 'EEXIST', message: () => 'volume default already exists' },
    { args: (s) => ['volume', 'create', s, 'bad name', '--size', '1M'], code: 'EINVAL', message: () => 'volume name "bad name" is not valid' },
    { args: (s) => ['volume', 'delete', s, 'ghost'], code: 'ENOENT', message: () => 'no volume ghost' },
    { args: (s) => ['snapshot', s, 'ghost'], code: 'ENOENT', message: () => 'no volume ghost' },
    { args: (s) => ['snapshot', s, 'default@ghost', '--delete'], code: 'ENOENT', message: () => 'no snapshot default@ghost' },
    { args: (s) => ['clone', s, 'default@ghost', 'vm1'], code: 'ENOENT', message: () => 'no snapshot default@ghost' },
    { args: (s) => ['commit', s, 'ghost'], code: 'ENOENT', message: () => 'no volume ghost' },
    { args: (s) => ['flatten', s, 'ghost'], code: 'ENOENT', message: () => 'no volume ghost' },
    { args: (s) => ['map', s, 'ghost'], code: 'ENOENT', message: () => 'no volume ghost' },
    { args: (s) => ['diff', s, 'default', 'ghost'], code: 'ENOENT', message: () => 'no volume ghost' },
    { args: (s) => ['export', s, 'ghost', join(dir, 'out.raw')], code: 'ENOENT', message: () => 'no volume ghost' },
    { args: (s) => ['import', s, join(dir, 'missing.raw'), '--volume', 'imp'], code: 'ENOENT', message: () => `cannot open base image ${join(dir, 'missing.raw')}` },
  ];
  const results = await Promise.all(
    cases.map(async (c) => {
      const [a, b] = [copy(), copy()];
      return { c, a, b, text: await cow(c.args(a)), json: await cow([...c.args(b), '--json']) };
    }),
  );
  for (const { c, a, b, text, json } of results) {
    const what = `cowstack ${c.args(a).join(' ')}`;
    assert.is(text.code, 1, `${what} exits 1 (got ${text.code}: ${text.stderr})`);
    assert.is(text.stdout, '', `${what} prints nothing on stdout`);
    assert.match(text.stderr, `cowstack: error: ${c.message(a)}`, `${what} says what is wrong`);
    assert.is(text.stderr.trim().split('\n').length, 1, `${what} prints one line: ${text.stderr}`);
    assertNoStack(text.stderr, what);
    assert.is(json.code, 1, `${what} --json exits 1`);
    const parsed = JSON.parse(json.stdout) as { error: { code: string; message: string } };
    assert.is(parsed.error.code, c.code, `${what} --json error code`);
    assert.match(parsed.error.message, c.message(b));
  }
  assert.not.ok(existsSync(join(dir, 'other')), 'a failed init leaves no store behind');
});

test.run();
