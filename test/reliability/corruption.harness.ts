/**
 * Corruption: damage a stopped store in the ways disks and operators damage files, and require that
 * cowstack names the damage and never serves silently wrong data.
 *
 * Fixtures (built once with the CLI, `cowstack serve` and libnbd, then copied per scenario): a 4 MiB
 * store, block size 4096, with 48 numbered 64 KiB writes of unique random content at block-aligned
 * slots (some slots written more than once) over three serving sessions:
 *   session 1: W0..W11 on default, flush; snapshot default@snap1 and clone vm1 (online); W12..W19 on
 *              default and vm1, flush; SIGTERM (checkpoint C1);
 *   session 2: W20..W31, flush; SIGTERM (checkpoint C2)            -> the `clean` fixture;
 *   session 3: W32..W41, flush (durable; W38 rewrites W26's slot); W42..W47 acknowledged, never
 *              flushed; SIGKILL
 *                                                                  -> the `crashed` fixture (a journal
 *                                                                     tail after the last checkpoint).
 * The seq of every write, the snapshot and the clone come from `cowstack journal inspect --json`, so
 * the expected content of every volume and snapshot "as of seq S" is known.
 *
 * Each scenario damages a copy, then runs `cowstack check --json` on one copy and `cowstack recover
 * --json` on another (check itself recovers, so they do not share a store), serves what recover left
 * if it succeeded, reads every export block by block (EIO blocks noted), and compares: wrong bytes
 * that nothing reported are a failure. Then, where recover refused, `cowstack recover --force` (if
 * this build has it) must name the cut and leave a store that checks clean and holds exactly the
 * writes before the cut.
 *
 * Scenarios: random byte flips in the LevelDB .ldb/.log/MANIFEST files; a flipped payload byte in a
 * payload-log segment (a durable record after the last checkpoint, and an unsynced one); a truncated
 * layer data file; a flipped byte in a layer data file (a volume's top and a shared snapshot layer);
 * the newest checkpoint deleted, or corrupted, or both checkpoints gone; a frame deleted from the
 * middle of the journal (after and before the last checkpoint); a flipped byte inside a frame value;
 * a byte flipped in LevelDB's write-ahead log inside a synced frame, and table damage LevelDB itself
 * detects; the journal's retention record damaged; the payload log's seal damaged.
 *
 * Run: node --conditions=source --import tsx test/reliability/corruption.harness.ts [--full]
 *        [--flips N] [--seed S]
 * Without --full: the fixed scenarios and 12 random LevelDB flips; --full: 200 random flips. Prints
 * one line per scenario with what check and recover said, then `N passed, M failed`.
 */
import { closeSync, cpSync, existsSync, lstatSync, mkdtempSync, openSync, readdirSync, readFileSync, readSync, rmSync, statSync, truncateSync, writeFileSync, writeSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Level } from '../../packages/journal/node_modules/level/index.js';
import { salvageTable } from '../../packages/journal/src/level-tables.js';
import { cowstack, cowstackOk, KiB, MiB, pattern, pythonOk, type Served, startServe, tempDir } from '../harness.js';
import { Rng } from './torture-lib.js';

const volumeBytes = 4 * MiB;
const blockBytes = 4096;
const writeBytes = 64 * KiB;
const slots = volumeBytes / writeBytes;

type Vol = 'default' | 'vm1';

interface FixtureWrite {
  readonly index: number;
  readonly volume: Vol;
  readonly offset: number;
  readonly data: Buffer;
  seq: number;
  /** Written in session 3 after its last flush: acknowledged, never synced. */
  readonly unsynced: boolean;
}

export interface Fixture {
  readonly store: string;
  readonly writes: FixtureWrite[];
  readonly frozenSeq: number;
  readonly clonedSeq: number;
  readonly checkpoints: number[];
  readonly lastSeq: number;
  readonly layers: { defaultTop: number; vm1Top: number; snap1: number };
}

interface InspectLine {
  seq: number;
  type: string;
  volume: string | null;
  layer: number | null;
  offset: number | null;
  length: number | null;
}

// ---------------------------------------------------------------------------------------------
// building the fixtures

const writerScript = String.raw`
import json, nbd, sys
socket, ops = sys.argv[1], json.load(open(sys.argv[2]))
handles = {}
def h(name):
    if name not in handles:
        x = nbd.NBD()
        x.set_export_name(name)
        x.connect_unix(socket)
        handles[name] = x
    return handles[name]
for op in ops:
    if op['kind'] == 'write':
        h(op['export']).pwrite(open(op['file'], 'rb').read(), op['offset'])
    else:
        h(op['export']).flush()
# no shutdown: leave the unsynced writes unsynced
`;

type WriterOp = { kind: 'write'; export: Vol; offset: number; file: string } | { kind: 'flush'; export: Vol };

async function runWriter(served: Served, ops: WriterOp[]): Promise<void> {
  const file = join(tempDir('corrupt-ops'), 'ops.json');
  writeFileSync(file, JSON.stringify(ops));
  await pythonOk(writerScript, [served.socket, file], { timeoutMs: 60_000 });
}

async function inspect(store: string): Promise<InspectLine[]> {
  const r = await cowstackOk(['journal', 'inspect', store, '--json'], { timeoutMs: 60_000 });
  return r.stdout
    .split('\n')
    .filter((l) => l.length > 0)
    .map((l) => JSON.parse(l) as InspectLine);
}

function copyStore(from: string, label: string): string {
  const dir = mkdtempSync(join(tmpdir(), `cowstack-corrupt-${label}-`));
  const store = join(dir, 'store');
  cpSync(from, store, { recursive: true, filter: (src) => !lstatSync(src).isSocket() });
  return store;
}

function dropCopy(store: string): void {
  rmSync(resolve(store, '..'), { recursive: true, force: true });
}

export async function buildFixtures(seed: number): Promise<{ clean: Fixture; crashed: Fixture }> {
  const rng = new Rng(seed);
  const work = tempDir('corrupt-fixture');
  const store = join(work, 'store');
  await cowstackOk(['init', store, '--size', String(volumeBytes), '--block-size', String(blockBytes)]);
  const writes: FixtureWrite[] = [];
  const dataDir = tempDir('corrupt-data');
  const mkWrite = (volume: Vol, unsynced = false): WriterOp => {
    const index = writes.length;
    // W38 (session 3, durable) overwrites W26's slot (session 2, between the two checkpoints), both
    // on default's top: a cut before W38 must give W26's content back.
    const offset = index === 38 ? writes[26].offset : rng.int(0, slots - 1) * writeBytes;
    const data = pattern(writeBytes, 0x1000 + index + seed * 64);
    const file = join(dataDir, `w${index}.bin`);
    writeFileSync(file, data);
    writes.push({ index, volume, offset, data, seq: 0, unsynced });
    return { kind: 'write', export: volume, offset, file };
  };
  const vols = (n: number, only?: Vol): WriterOp[] => Array.from({ length: n }, (_, i) => mkWrite(only ?? (i % 2 === 0 ? 'default' : 'vm1')));

  // Session 1
  let served = await startServe(store);
  await runWriter(served, [...vols(12, 'default'), { kind: 'flush', export: 'default' }]);
  await cowstackOk(['snapshot', store, 'default', '--name', 'snap1']);
  await cowstackOk(['clone', store, 'default@snap1', 'vm1']);
  await runWriter(served, [...vols(8), { kind: 'flush', export: 'default' }, { kind: 'flush', export: 'vm1' }]);
  await served.stop();
  // Session 2
  served = await startServe(store);
  await runWriter(served, [...vols(12), { kind: 'flush', export: 'default' }, { kind: 'flush', export: 'vm1' }]);
  await served.stop();
  const cleanEvents = await inspect(store);
  const cleanStats = JSON.parse((await cowstackOk(['journal', 'stats', store, '--json'])).stdout) as { checkpointSeqs: number[]; lastSeq: number };
  const cleanCopy = copyStore(store, 'fixture-clean');
  // Session 3: a durable part, then an unsynced part, then SIGKILL. The journal is read online first.
  served = await startServe(store);
  await runWriter(served, [...vols(10), { kind: 'flush', export: 'default' }, { kind: 'flush', export: 'vm1' }]);
  await runWriter(served, Array.from({ length: 6 }, (_, i) => mkWrite(i % 2 === 0 ? 'default' : 'vm1', true)));
  const crashedEvents = await inspect(store);
  await served.kill();
  const crashedCopy = copyStore(store, 'fixture-crashed');

  // Map writes to seqs: the writer is sequential, so Write events come in write order.
  const writeEvents = crashedEvents.filter((e) => e.type === 'Write');
  if (writeEvents.length !== writes.length) throw new Error(`fixture: ${writeEvents.length} Write events for ${writes.length} writes`);
  for (const [i, e] of writeEvents.entries()) {
    const w = writes[i];
    if (e.offset !== w.offset || e.length !== writeBytes || e.volume !== w.volume) throw new Error(`fixture: Write event seq ${e.seq} (${e.volume} ${e.offset}+${e.length}) is not W${i} (${w.volume} ${w.offset})`);
    w.seq = e.seq;
  }
  const frozen = crashedEvents.find((e) => e.type === 'Frozen' && e.volume === 'default')!;
  const cloned = crashedEvents.find((e) => e.type === 'Cloned')!;
  const ls = JSON.parse((await cowstackOk(['ls', cleanCopy, '--json'])).stdout) as { volumes: Array<{ name: string; topLayerId: number }>; snapshots: Array<{ name: string; layerId: number }> };
  const layers = {
    defaultTop: ls.volumes.find((v) => v.name === 'default')!.topLayerId,
    vm1Top: ls.volumes.find((v) => v.name === 'vm1')!.topLayerId,
    snap1: ls.snapshots.find((s) => s.name === 'snap1')!.layerId,
  };
  const cleanWrites = writes.filter((w) => w.seq <= cleanStats.lastSeq);
  if (cleanEvents.filter((e) => e.type === 'Write').length !== cleanWrites.length) throw new Error('fixture: the clean store does not hold sessions 1 and 2');
  const common = { frozenSeq: frozen.seq, clonedSeq: cloned.seq, layers };
  return {
    clean: { store: cleanCopy, writes: cleanWrites, checkpoints: cleanStats.checkpointSeqs, lastSeq: cleanStats.lastSeq, ...common },
    crashed: { store: crashedCopy, writes, checkpoints: cleanStats.checkpointSeqs, lastSeq: crashedEvents[crashedEvents.length - 1].seq, ...common },
  };
}

/** Content of a view as of the writes with seq < `cut` (Infinity: all). */
function expected(fx: Fixture, view: 'default' | 'vm1' | 'default@snap1', cut = Infinity): Buffer {
  const image = Buffer.alloc(volumeBytes);
  const apply = (pred: (w: FixtureWrite) => boolean): void => {
    for (const w of fx.writes) if (w.seq < cut && pred(w)) w.data.copy(image, w.offset);
  };
  if (view === 'default') apply((w) => w.volume === 'default');
  else if (view === 'default@snap1') {
    if (fx.frozenSeq < cut) apply((w) => w.volume === 'default' && w.seq < fx.frozenSeq);
  } else if (fx.clonedSeq < cut) {
    apply((w) => w.volume === 'default' && w.seq < fx.frozenSeq);
    apply((w) => w.volume === 'vm1');
  }
  return image;
}

// ---------------------------------------------------------------------------------------------
// damage tools

function flipFileByte(path: string, at: number, xor: number): void {
  const fd = openSync(path, 'r+');
  try {
    const b = Buffer.alloc(1);
    readSync(fd, b, 0, 1, at);
    b[0] ^= xor;
    writeSync(fd, b, 0, 1, at);
  } finally {
    closeSync(fd);
  }
}

function recordKey(seq: number): Buffer {
  const k = Buffer.alloc(9);
  k.write('r', 0);
  k.writeUInt32BE(Math.floor(seq / 2 ** 32), 1);
  k.writeUInt32BE(seq >>> 0, 5);
  return k;
}

function checkpointKey(seq: number): Buffer {
  const k = recordKey(seq);
  k.write('c', 0);
  return k;
}

async function withLevel<T>(store: string, body: (db: Level<Buffer, Buffer>) => Promise<T>): Promise<T> {
  const db = new Level<Buffer, Buffer>(join(store, 'journal'), { keyEncoding: 'buffer', valueEncoding: 'buffer' });
  await db.open();
  try {
    return await body(db);
  } finally {
    await db.close();
  }
}

/** The key of the frame holding `seq` (the last record key at or before it). */
async function frameKeyOf(db: Level<Buffer, Buffer>, seq: number): Promise<Buffer> {
  const keys = await db.keys({ gte: recordKey(0), lte: recordKey(seq), reverse: true, limit: 1 }).all();
  if (keys.length === 0) throw new Error(`no frame holds seq ${seq}`);
  return keys[0];
}

function frameSeq(key: Buffer): number {
  return key.readUInt32BE(1) * 2 ** 32 + key.readUInt32BE(5);
}

function segmentFiles(store: string): string[] {
  const dir = join(store, 'journal', 'payloads');
  return readdirSync(dir)
    .filter((f) => f.endsWith('.seg'))
    .sort()
    .map((f) => join(dir, f));
}

/** Flip one byte of write `w`'s payload in the payload log; returns the file and offset. */
function flipPayload(store: string, w: FixtureWrite): { file: string; at: number } {
  for (const file of segmentFiles(store)) {
    const bytes = readFileSync(file);
    const at = bytes.indexOf(w.data);
    if (at !== -1) {
      flipFileByte(file, at + 1234, 0x5a);
      return { file, at: at + 1234 };
    }
  }
  throw new Error(`the payload of W${w.index} (seq ${w.seq}) is in no payload segment`);
}

/**
 * The first byte of a LevelDB table (.ldb) whose flip makes LevelDB itself fail a full read of the
 * database (a corruption error from LevelDB, not a value cowstack would reject). Each try works on a
 * throwaway copy of the LevelDB files.
 */
async function findLevelDbDetectedDamage(store: string): Promise<{ file: string; at: number; message: string } | undefined> {
  const journalDir = join(store, 'journal');
  const tables = readdirSync(journalDir).filter((n) => n.endsWith('.ldb')).sort();
  const scratch = tempDir('ldb-search');
  for (const file of tables) {
    const size = statSync(join(journalDir, file)).size;
    for (let at = 0; at < Math.min(size, 2000); at += 5) {
      const dir = join(scratch, `try-${file}-${at}`);
      cpSync(journalDir, dir, { recursive: true, filter: (src) => !src.includes('payloads') });
      flipFileByte(join(dir, file), at, 0xff);
      const db = new Level<Buffer, Buffer>(dir, { keyEncoding: 'buffer', valueEncoding: 'buffer' });
      let message: string | undefined;
      try {
        await db.open();
        await db.iterator().all();
      } catch (err) {
        const cause = (err as { cause?: Error }).cause;
        message = `${(err as Error).message}${cause ? ` (${cause.message})` : ''}`;
      } finally {
        await db.close().catch(() => undefined);
        rmSync(dir, { recursive: true, force: true });
      }
      // Open failures (MANIFEST-level) are a different case; this one is a table LevelDB opens but cannot read.
      if (message !== undefined && /Corruption/.test(message) && !/open/i.test(message)) return { file, at, message };
    }
  }
  return undefined;
}

// ---------------------------------------------------------------------------------------------
// observing the damaged store

interface CheckOutcome {
  readonly code: number | null;
  readonly ok: boolean;
  readonly problems: Array<{ kind: string; message: string; seq?: number; layerId?: number; volumes?: string[]; block?: number }>;
  /** stderr (or the JSON error) when check did not produce a report. */
  readonly error: string;
  /** What opening the store did before the checks (the report's `open`). */
  readonly open?: { tailCut?: { fromSeq: number; records: number }; sealDamage?: string };
  /** Accepted losses check met (the report's `notes`). */
  readonly notes?: string[];
}

async function runCheck(store: string): Promise<CheckOutcome> {
  const r = await cowstack(['check', store, '--json'], { timeoutMs: 120_000 });
  try {
    const report = JSON.parse(r.stdout) as { ok?: boolean; problems?: CheckOutcome['problems']; error?: { message: string }; open?: CheckOutcome['open']; notes?: string[] };
    if (report.error !== undefined) return { code: r.code, ok: false, problems: [], error: report.error.message };
    return { code: r.code, ok: report.ok === true, problems: report.problems ?? [], error: r.stderr.trim(), open: report.open ?? undefined, notes: report.notes ?? [] };
  } catch {
    return { code: r.code, ok: false, problems: [], error: (r.stderr || r.stdout).trim() };
  }
}

interface RecoverOutcome {
  readonly code: number | null;
  readonly report: Record<string, unknown> | undefined;
  readonly error: string;
}

/** `check --json` on a copy of a store (opening recovers it, and the copy keeps the store as it was). */
async function checkCopy(store: string, label: string): Promise<CheckOutcome> {
  const copy = copyStore(store, label);
  try {
    return await runCheck(copy);
  } finally {
    dropCopy(copy);
  }
}

/** `check`'s text output, on a copy (opening recovers the store). */
async function checkText(store: string): Promise<string> {
  const copy = copyStore(store, 'checktext');
  const r = await cowstack(['check', copy], { timeoutMs: 120_000 });
  dropCopy(copy);
  return r.stdout.split(copy).join('S');
}

async function runRecover(store: string, force = false): Promise<RecoverOutcome> {
  const args = ['recover', store, '--json', ...(force ? ['--force'] : [])];
  const r = await cowstack(args, { timeoutMs: 120_000 });
  let parsed: Record<string, unknown> | undefined;
  try {
    parsed = JSON.parse(r.stdout) as Record<string, unknown>;
  } catch {
    parsed = undefined;
  }
  if (parsed !== undefined && 'error' in parsed) return { code: r.code, report: undefined, error: (parsed.error as { message: string }).message };
  return { code: r.code, report: r.code === 0 ? parsed : undefined, error: r.code === 0 ? '' : (r.stderr || r.stdout).trim() };
}

const blockReaderScript = String.raw`
import json, nbd, sys
socket, out = sys.argv[1], sys.argv[2]
names = sys.argv[3:]
res = {}
for i, name in enumerate(names):
    h = nbd.NBD()
    h.set_export_name(name)
    h.connect_unix(socket)
    size = h.get_size()
    buf = bytearray(size)
    bad = []
    for off in range(0, size, 65536):
        n = min(65536, size - off)
        try:
            buf[off:off + n] = h.pread(n, off)
        except nbd.Error:
            for b in range(off, off + n, 4096):
                m = min(4096, off + n - b)
                try:
                    buf[b:b + m] = h.pread(m, b)
                except nbd.Error as e:
                    bad.append([b, str(e.string)])
    with open(out + '.' + str(i), 'wb') as f:
        f.write(buf)
    res[name] = bad
    h.shutdown()
print(json.dumps(res))
`;

interface ServedView {
  readonly bytes: Buffer;
  /** Offsets of blocks whose read failed, with libnbd's message. */
  readonly eio: Array<[number, string]>;
}

/** Serve the store and read every view block by block; EIO blocks are recorded, not fatal. */
async function serveAndRead(store: string, views: readonly string[]): Promise<{ views: Map<string, ServedView> } | { error: string }> {
  let served: Served;
  try {
    served = await startServe(store);
  } catch (err) {
    return { error: (err as Error).message };
  }
  try {
    const dir = tempDir('corrupt-read');
    const out = join(dir, 'view');
    const r = await pythonOk(blockReaderScript, [served.socket, out, ...views], { timeoutMs: 120_000 });
    const eio = JSON.parse(r.stdout) as Record<string, Array<[number, string]>>;
    const result = new Map<string, ServedView>();
    views.forEach((v, i) => result.set(v, { bytes: readFileSync(`${out}.${i}`), eio: eio[v] }));
    rmSync(dir, { recursive: true, force: true });
    await served.stop();
    return { views: result };
  } catch (err) {
    await served.kill();
    return { error: (err as Error).message };
  }
}

const allViews = ['default', 'vm1', 'default@snap1'] as const;

/** Where served bytes differ from the expected ones, outside blocks that returned EIO. */
function wrongBlocks(view: ServedView, want: Buffer): number[] {
  const bad = new Set(view.eio.map(([o]) => Math.floor(o / blockBytes)));
  const out: number[] = [];
  for (let b = 0; b < volumeBytes / blockBytes; b++) {
    if (bad.has(b)) continue;
    const at = b * blockBytes;
    if (!view.bytes.subarray(at, at + blockBytes).equals(want.subarray(at, at + blockBytes))) out.push(b);
  }
  return out;
}

// ---------------------------------------------------------------------------------------------
// scenarios

export interface ScenarioResult {
  readonly name: string;
  readonly ok: boolean;
  /** What cowstack said, for RELIABILITY.md. */
  readonly observed: string[];
  readonly failures: string[];
  /** For random flips: refused | flagged | harmless. */
  readonly outcome?: string;
}

class Scenario {
  readonly observed: string[] = [];
  readonly failures: string[] = [];
  constructor(readonly name: string) {}
  note(line: string): void {
    this.observed.push(line);
  }
  expect(cond: boolean, message: string): void {
    if (!cond) this.failures.push(message);
  }
  result(outcome?: string): ScenarioResult {
    return { name: this.name, ok: this.failures.length === 0, observed: this.observed, failures: this.failures, outcome };
  }
}

function checkSummary(c: CheckOutcome): string {
  if (c.ok) return `check: exit ${c.code}, ok`;
  if (c.problems.length === 0) return `check: exit ${c.code}, error: ${c.error}`;
  return `check: exit ${c.code}, ${c.problems.length} problem(s): ${c.problems
    .slice(0, 4)
    .map((p) => `[${p.kind}] ${p.message}`)
    .join(' | ')}${c.problems.length > 4 ? ` | … (${c.problems.length - 4} more)` : ''}`;
}

function recoverSummary(r: RecoverOutcome): string {
  if (r.code !== 0) return `recover: exit ${r.code}, error: ${r.error}`;
  const rep = r.report!;
  const parts = [`checkpoint seq ${rep.checkpointSeq}`, `replayed ${rep.eventsReplayed}`];
  const skipped = rep.checkpointsSkipped as Array<{ seq: number; reason: string }>;
  if (skipped.length > 0) parts.push(`skipped checkpoints ${skipped.map((s) => `${s.seq} (${s.reason})`).join(', ')}`);
  if (rep.tailCut) parts.push(`tail cut ${JSON.stringify(rep.tailCut)}`);
  const repaired = (rep.payloadsRepaired ?? []) as Array<{ seq: number; layerId: number }>;
  if (repaired.length > 0) parts.push(`payloads repaired ${repaired.map((p) => `seq ${p.seq} from layer ${p.layerId}`).join(', ')}`);
  const unrepaired = (rep.payloadsUnrepaired ?? []) as Array<{ seq: number; reason: string }>;
  if (unrepaired.length > 0) parts.push(`payloads not repairable ${unrepaired.map((p) => `seq ${p.seq} (${p.reason})`).join(', ')}`);
  if (rep.salvage) parts.push(`salvage ${JSON.stringify(rep.salvage)}`);
  return `recover: exit 0, ${parts.join(', ')}`;
}

let forceAvailable: boolean | undefined;
async function hasForce(): Promise<boolean> {
  if (forceAvailable === undefined) {
    const r = await cowstack(['recover', '--help']);
    forceAvailable = /--force/.test(r.stdout + r.stderr);
  }
  return forceAvailable;
}

/**
 * The common observation: check on a copy, recover on the store; then serve and compare. Returns
 * whether wrong data was served without any report.
 */
async function observe(
  s: Scenario,
  store: string,
  fx: Fixture,
  want: { cut?: (recover: RecoverOutcome) => number | undefined } = {},
): Promise<{ check: CheckOutcome; recover: RecoverOutcome; postCheck?: CheckOutcome; served?: Map<string, ServedView>; serveError?: string; wrong: Map<string, number[]> }> {
  const check = await checkCopy(store, 'check');
  s.note(checkSummary(check));
  s.expect(check.code === 0 || check.code === 1, `check exited ${check.code} (expected 0 or 1): ${check.error}`);
  if (!check.ok) s.expect(check.problems.length > 0 || check.error.length > 0, 'check failed without saying why');
  for (const p of check.problems) s.expect(typeof p.message === 'string' && p.message.length > 10 && !/undefined|NaN|\[object/.test(p.message), `check problem message is unclear: ${JSON.stringify(p)}`);
  if (check.problems.length === 0 && !check.ok) s.expect(saysWhere(check.error), `check fails with a message that does not say which store or journal, or what is damaged: ${JSON.stringify(check.error)}`);
  const recover = await runRecover(store);
  s.note(recoverSummary(recover));
  s.expect(recover.code === 0 || recover.code === 1, `recover exited ${recover.code}`);
  if (recover.code !== 0) s.expect(saysWhere(recover.error) && !/\n\s+at /.test(recover.error), `recover refuses with a message that does not say which store or journal, or what is damaged: ${JSON.stringify(recover.error)}`);
  const wrong = new Map<string, number[]>();
  if (recover.code !== 0) {
    // The server must refuse the store too (it recovers on open), not serve it.
    const attempt = await serveAndRead(store, []);
    s.expect('error' in attempt, 'recover refuses the store, but cowstack serve serves it');
    if ('error' in attempt) s.note(`serve: refuses to start: ${/cowstack: error: (.*)/.exec(attempt.error)?.[1] ?? attempt.error.split('\n')[0]}`);
    return { check, recover, wrong };
  }
  const postCheck = await checkCopy(store, 'postcheck');
  s.note(`after recover, ${checkSummary(postCheck)}`);
  const cut = want.cut?.(recover) ?? Infinity;
  const read = await serveAndRead(store, allViews);
  if ('error' in read) {
    s.note(`serve: refused: ${read.error.split('\n')[0]}`);
    return { check, recover, postCheck, serveError: read.error, wrong };
  }
  for (const view of allViews) {
    const got = read.views.get(view)!;
    const bad = wrongBlocks(got, expected(fx, view, cut));
    if (bad.length > 0) wrong.set(view, bad);
    if (got.eio.length > 0) s.note(`serve: ${view}: EIO on ${got.eio.length} block(s) from offset ${got.eio[0][0]}`);
    if (bad.length > 0) s.note(`serve: ${view}: ${bad.length} block(s) differ from the acknowledged content, first block ${bad[0]}`);
  }
  // Every block served wrong must be accounted for: damage reported at the store level (journal,
  // checkpoint, open, or a recover warning), or that very block named by check.
  const storeLevel = [...check.problems, ...postCheck.problems].some((p) => p.kind !== 'data') || (!check.ok && check.problems.length === 0) || hasWarning(recover);
  const named = new Set([...check.problems, ...postCheck.problems].filter((p) => p.kind === 'data' && p.block !== undefined).map((p) => p.block!));
  for (const [view, blocks] of wrong) {
    const silent = storeLevel ? [] : blocks.filter((b) => !named.has(b));
    s.expect(
      silent.length === 0,
      `SILENT WRONG DATA: ${view} serves ${silent.length} block(s) that differ from what was acknowledged (first ${silent.slice(0, 8).join(', ')}), and neither check nor recover reported anything about them${named.size > 0 ? ` (check named ${named.size} other block(s))` : ''}`,
    );
  }
  return { check, recover, postCheck, served: read.views, wrong };
}

/**
 * A refusal is clear when it says where (the store or its journal) and what (a seq, a checkpoint, a
 * file, the format): a bare "Corruption: bad block contents" from LevelDB or a decoder's "Unexpected end of
 * MessagePack data" leaves the operator with nothing to act on.
 */
function saysWhere(message: string): boolean {
  return /journal|store/i.test(message) && /seq \d+|checkpoint|\.ldb|\.log|MANIFEST|format|cannot open|retention|metadata|seal/.test(message);
}

function hasWarning(r: RecoverOutcome): boolean {
  const rep = r.report;
  return rep !== undefined && ((rep.checkpointsSkipped as unknown[]).length > 0 || rep.tailCut !== undefined || rep.salvage !== undefined);
}

/** The layer a fixture write went to. */
function layerOf(fx: Fixture, w: FixtureWrite): number {
  if (w.volume === 'vm1') return fx.layers.vm1Top;
  return w.seq < fx.frozenSeq ? fx.layers.snap1 : fx.layers.defaultTop;
}

/**
 * "layer:block" of blocks that a write at or after `cut` overwrote and whose last write before `cut`
 * is at or below `droppedThrough` (its payload is gone, so salvage cannot put it back).
 */
function unrestorableBlocks(fx: Fixture, cut: number, droppedThrough: number): Set<string> {
  const out = new Set<string>();
  const perBlock = writeBytes / blockBytes;
  for (const d of fx.writes.filter((w) => w.seq >= cut)) {
    const layer = layerOf(fx, d);
    const kept = fx.writes.filter((w) => w.seq < cut && layerOf(fx, w) === layer && w.offset === d.offset);
    const last = kept[kept.length - 1];
    if (last !== undefined && last.seq <= droppedThrough) for (let i = 0; i < perBlock; i++) out.add(`${layer}:${d.offset / blockBytes + i}`);
  }
  return out;
}

/** For a failure message: which writes touched a block of a view, kept and discarded. */
function describeBlocks(fx: Fixture, view: string, block: number | undefined, cut: number): string {
  if (block === undefined) return '';
  const offset = Math.floor((block * blockBytes) / writeBytes) * writeBytes;
  const touching = fx.writes.filter((w) => w.offset === offset && (view === 'vm1' || w.volume === 'default'));
  return `; block ${block} was written by ${touching.map((w) => `W${w.index} (seq ${w.seq}, ${w.volume}, layer ${layerOf(fx, w)}${w.seq >= cut ? ', discarded' : ''})`).join(', ')}; payloads are retained after seq ${fx.checkpoints[0]}`;
}

/**
 * recover --force where recover refused: the cut is named, and the store keeps exactly the writes
 * before it. `expectFrom`: the seq the cut must start at; 'reported' takes the cut salvage reports
 * (where the damage decides it, as in a LevelDB table) and checks the store against that.
 */
async function tryForce(s: Scenario, store: string, fx: Fixture, expectFrom: number | 'reported' | undefined): Promise<void> {
  if (!(await hasForce())) {
    s.note('recover --force: not in this build');
    return;
  }
  const r = await runRecover(store, true);
  s.note(`recover --force: ${recoverSummary(r)}`);
  if (expectFrom === undefined) return;
  if (r.code !== 0 && expectFrom === 'reported') {
    // Where the damage took what salvage needs (every checkpoint, say), a refusal is right if it says so.
    s.expect(r.code === 1 && saysWhere(r.error) && !/\n\s+at /.test(r.error), `recover --force fails without saying where and what: ${JSON.stringify(r.error)}`);
    return;
  }
  if (r.code !== 0) {
    s.expect(false, `recover --force failed: ${r.error}`);
    return;
  }
  const salvage = r.report!.salvage as { fromSeq: number; recordsDiscarded: number; reason: string; tables?: { resumedAfterCheckpoint?: { throughSeq: number } } } | undefined;
  s.expect(salvage !== undefined, 'recover --force salvaged without reporting a cut');
  if (salvage === undefined) return;
  if (expectFrom !== 'reported') s.expect(salvage.fromSeq === expectFrom, `recover --force cut from seq ${salvage.fromSeq}, expected ${expectFrom}`);
  s.expect(salvage.recordsDiscarded === fx.lastSeq - salvage.fromSeq + 1, `recover --force discarded ${salvage.recordsDiscarded} records, expected ${fx.lastSeq - salvage.fromSeq + 1} (seqs ${salvage.fromSeq}..${fx.lastSeq})`);
  const post = await checkCopy(store, 'postcheck');
  s.note(`after --force, ${checkSummary(post)}`);
  // Blocks a discarded write overwrote whose last kept write's payload retention had already
  // dropped (at or below the oldest checkpoint) cannot be restored: check must name them. Every
  // other block must hold exactly the writes before the cut.
  const unrestorable = unrestorableBlocks(fx, salvage.fromSeq, fx.checkpoints[0]);
  const named = new Set(post.problems.filter((p) => p.kind === 'data' && p.layerId !== undefined && p.block !== undefined).map((p) => `${p.layerId}:${p.block}`));
  // Salvage that resumed the journal after a checkpoint (the frames before it lost) reports it and
  // records the loss; check then notes that the history before it is gone, instead of failing.
  const resumed = salvage.tables?.resumedAfterCheckpoint;
  if (resumed !== undefined) {
    s.expect((post.notes ?? []).some((n) => n.startsWith(`records seq 1..${resumed.throughSeq} are lost, accepted by recover --force`)), `salvage resumed the journal after seq ${resumed.throughSeq}, but check does not note that the history before it is gone: ${JSON.stringify(post.notes)}`);
  }
  // Records lost with a damaged LevelDB table that the checkpoint the store opened from covers are
  // gaps recover --force records as accepted: check notes them by seq instead of failing.
  const unexpected = post.problems.filter((p) => !(p.kind === 'data' && unrestorable.has(`${p.layerId}:${p.block}`)));
  s.expect(
    unexpected.length === 0,
    `check after recover --force reports ${unexpected.length} problem(s) that salvage should have repaired (the last kept write's payload was retained when salvage started), e.g. ${unexpected
      .slice(0, 2)
      .map((p) => `[${p.kind}] ${p.message}`)
      .join(' | ')}`,
  );
  const read = await serveAndRead(store, allViews);
  if ('error' in read) {
    s.expect(false, `serve after recover --force: ${read.error}`);
    return;
  }
  for (const view of allViews) {
    const got = read.views.get(view)!;
    const bad = wrongBlocks(got, expected(fx, view, salvage.fromSeq));
    s.expect(got.eio.length === 0, `after --force, ${view} returns EIO at ${got.eio.map(([o]) => o).slice(0, 4).join(', ')}`);
    const stack = stackOf(fx, view);
    const excused = bad.filter((b) => stack.some((l) => unrestorable.has(`${l}:${b}`) && named.has(`${l}:${b}`)));
    const unexcused = bad.filter((b) => !excused.includes(b));
    if (excused.length > 0) s.note(`after --force, ${view}: ${excused.length} block(s) hold data of discarded writes and cannot be restored (their last kept payload was dropped by retention); check names each`);
    s.expect(unexcused.length === 0, `after --force, ${view} does not hold exactly the writes before seq ${salvage.fromSeq}: blocks ${unexcused.slice(0, 8).join(', ')}${unexcused.length > 8 ? ` (${unexcused.length} in all)` : ''} differ${describeBlocks(fx, view, unexcused[0], salvage.fromSeq)}`);
  }
  const lost = fx.writes.filter((w) => w.seq >= salvage.fromSeq).map((w) => `W${w.index}`);
  s.note(`recover --force: writes lost (reported as seqs ${salvage.fromSeq}..${fx.lastSeq}): ${lost.join(' ')}`);
}

/**
 * A frame between the last two checkpoints of the clean store deleted, or a byte of it flipped: the
 * newest checkpoint holds the state its records made, so recover works and serves the acknowledged
 * data, and check names the damage; recover --force records it as an accepted loss, after which
 * check passes noting it and journal verify marks it accepted.
 */
async function coveredFrameDamage(fx: { clean: Fixture }, rng: Rng, damage: 'deleted' | 'flipped'): Promise<ScenarioResult> {
  const s = new Scenario(damage === 'deleted' ? 'frame-delete-covered' : 'frame-flip-covered');
  const f = fx.clean;
  const store = copyStore(f.store, damage === 'deleted' ? 'framedel2' : 'frameflip2');
  const [older, newest] = f.checkpoints.slice(-2);
  const w = rng.pick(f.writes.filter((x) => x.seq > older && x.seq < newest));
  const first = await withLevel(store, async (db) => {
    const key = await frameKeyOf(db, w.seq);
    if (damage === 'deleted') await db.del(key);
    else {
      const value = (await db.get(key))!;
      value[rng.int(0, value.length - 1)] ^= rng.int(1, 255);
      await db.put(key, value);
    }
    return frameSeq(key);
  });
  s.note(`damage: frame r${first} (holding W${w.index}, seq ${w.seq}, between checkpoints ${older} and ${newest}) ${damage === 'deleted' ? 'deleted' : 'with one byte flipped'}`);
  const { check, wrong } = await observe(s, store, f);
  const named = (p: { seq?: number }): boolean => p.seq !== undefined && p.seq >= first && p.seq <= w.seq;
  s.expect(!check.ok && check.problems.some((p) => p.kind === 'journal' && named(p)), `check does not report the damage at seq ${first}: ${checkSummary(check)}`);
  s.expect(wrong.size === 0, `data differs although the newest checkpoint covers the ${damage} frame`);
  const forced = await runRecover(store, true);
  s.note(`recover --force: ${recoverSummary(forced)}`);
  const recorded = (forced.report?.lossesRecorded ?? []) as Array<{ fromSeq: number; toSeq: number }>;
  s.expect(forced.code === 0 && recorded.some((l) => l.fromSeq === first && l.toSeq >= w.seq), `recover --force does not record the frame at seq ${first} as an accepted loss: ${recoverSummary(forced)}`);
  const post = await checkCopy(store, 'postcheck');
  s.note(`after --force, ${checkSummary(post)}; notes: ${(post.notes ?? []).join(' | ')}`);
  s.expect(post.ok && (post.notes ?? []).some((n) => n.startsWith(`records seq ${first}..`)), `after recover --force, check does not pass noting the loss at seq ${first}: ${checkSummary(post)}`);
  const verify = await cowstack(['journal', 'verify', store, '--json']);
  const verified = JSON.parse(verify.stdout) as { ok: boolean; problems: Array<{ seq: number; accepted?: unknown }> };
  s.expect(verify.code === 0 && verified.ok && verified.problems.some((p) => named(p) && p.accepted !== undefined), `after recover --force, journal verify does not mark the damage at seq ${first} accepted: exit ${verify.code} ${verify.stdout}`);
  const read = await serveAndRead(store, allViews);
  if ('error' in read) s.expect(false, `serve after recover --force: ${read.error}`);
  else for (const view of allViews) s.expect(wrongBlocks(read.views.get(view)!, expected(f, view, Infinity)).length === 0, `after recover --force, ${view} does not hold the acknowledged writes`);
  dropCopy(store);
  return s.result();
}

/** The layers a view reads, top first. */
function stackOf(fx: Fixture, view: string): number[] {
  return view === 'default' ? [fx.layers.defaultTop, fx.layers.snap1] : view === 'vm1' ? [fx.layers.vm1Top, fx.layers.snap1] : [fx.layers.snap1];
}

/** A damaged LevelDB table: recover refuses naming it, and recover --force sets it aside and salvages (or refuses clearly). */
async function refusedThenSetAside(s: Scenario, store: string, fx: Fixture, table: string): Promise<void> {
  const { recover } = await observe(s, store, fx);
  s.expect(recover.code === 1 && recover.error.includes(table), `recover does not refuse naming ${table}: ${recoverSummary(recover)}`);
  if (recover.code !== 1) return;
  await tryForce(s, store, fx, 'reported');
  s.expect(existsSync(join(store, 'journal', 'damaged', table)), `recover --force did not set ${table} aside in journal/damaged/`);
}

/** The layer a write after the snapshot went to: its volume's top. */
function topLayerOf(fx: Fixture, w: FixtureWrite): number {
  return w.volume === 'default' ? fx.layers.defaultTop : fx.layers.vm1Top;
}

/**
 * Whether a store's copy of the layer file of a write after the snapshot still holds the write: not
 * when a later write overwrote it, or the kill came before it got there.
 */
function layerHolds(store: string, fx: Fixture, w: FixtureWrite): boolean {
  return readFileSync(join(store, 'layers', `${topLayerOf(fx, w)}.data`)).subarray(w.offset, w.offset + writeBytes).equals(w.data);
}

/**
 * recover --force on a store whose only damage is a write's payload that its layer file still holds:
 * it must write the payload back and discard nothing, and every view must hold every write.
 */
async function tryMend(s: Scenario, store: string, fx: Fixture, w: FixtureWrite): Promise<void> {
  const r = await runRecover(store, true);
  s.note(`recover --force: ${recoverSummary(r)}`);
  if (r.code !== 0) {
    s.expect(false, `recover --force failed: ${r.error}`);
    return;
  }
  const repaired = (r.report!.payloadsRepaired ?? []) as Array<{ seq: number }>;
  s.expect(repaired.some((p) => p.seq === w.seq), `recover --force did not write the payload of seq ${w.seq} back from the layer file that holds it`);
  s.expect(r.report!.salvage === undefined, 'recover --force cut the journal, though the damaged payload could be mended');
  const post = await checkCopy(store, 'postcheck');
  s.note(`after --force, ${checkSummary(post)}`);
  s.expect(post.ok, `check after recover --force: ${checkSummary(post)}`);
  const read = await serveAndRead(store, allViews);
  if ('error' in read) {
    s.expect(false, `serve after recover --force: ${read.error}`);
    return;
  }
  for (const view of allViews) {
    const got = read.views.get(view)!;
    const bad = wrongBlocks(got, expected(fx, view));
    s.expect(got.eio.length === 0 && bad.length === 0, `after --force, ${view} does not hold every write: EIO at ${got.eio.length} block(s), blocks ${bad.slice(0, 8).join(', ')} differ`);
  }
}

function writeInTail(fx: Fixture, unsynced: boolean, rng: Rng): FixtureWrite {
  const after = fx.checkpoints[fx.checkpoints.length - 1];
  const candidates = fx.writes.filter((w) => w.seq > after && w.unsynced === unsynced);
  return rng.pick(candidates);
}

type ScenarioFn = (fx: { clean: Fixture; crashed: Fixture }, rng: Rng) => Promise<ScenarioResult>;

export const scenarios: Record<string, ScenarioFn> = {
  async 'payload-log: flipped byte in a durable record after the last checkpoint'(fx, rng) {
    const s = new Scenario('payload-flip-durable');
    const f = fx.crashed;
    const store = copyStore(f.store, 'payload');
    const w = writeInTail(f, false, rng);
    const { file, at } = flipPayload(store, w);
    // Half the time the write's data in its layer file is damaged too: recover --force cannot mend the
    // payload from it then, and must cut the journal there.
    const layer = topLayerOf(f, w);
    const layerToo = rng.chance(0.5);
    if (layerToo) flipFileByte(join(store, 'layers', `${layer}.data`), w.offset + 99, 0xa5);
    const mendable = layerHolds(store, f, w);
    s.note(`damage: byte ${at} of ${file.slice(store.length + 1)} (payload of W${w.index}, seq ${w.seq})${layerToo ? `, and byte ${w.offset + 99} of layers/${layer}.data (its data there)` : ''}; the layer file ${mendable ? 'holds' : 'does not hold'} the write`);
    const { check, recover } = await observe(s, store, f);
    s.expect(!check.ok && check.problems.some((p) => new RegExp(`seq ${w.seq}\\b`).test(p.message)), `check does not name seq ${w.seq}: ${checkSummary(check)}`);
    s.expect(recover.code === 1 && new RegExp(`seq ${w.seq}\\b`).test(recover.error) && /payload/.test(recover.error), `recover does not refuse naming seq ${w.seq} and the payload: ${recoverSummary(recover)}`);
    if (recover.code === 1 && mendable) await tryMend(s, store, f, w);
    else if (recover.code === 1) await tryForce(s, store, f, w.seq);
    dropCopy(store);
    return s.result();
  },

  async 'payload-log: flipped byte in a payload the newest checkpoint covers'(fx, rng) {
    const s = new Scenario('payload-flip-covered');
    const f = fx.clean;
    const store = copyStore(f.store, 'payload-covered');
    const newest = f.checkpoints[f.checkpoints.length - 1];
    const w = rng.pick(f.writes.filter((x) => x.seq > f.checkpoints[0] && x.seq <= newest));
    const { file, at } = flipPayload(store, w);
    const mendable = layerHolds(store, f, w);
    s.note(`damage: byte ${at} of ${file.slice(store.length + 1)} (payload of W${w.index}, seq ${w.seq}, before the checkpoint at seq ${newest}); the layer file ${mendable ? 'holds' : 'does not hold'} the write`);
    const { check, recover, wrong } = await observe(s, store, f);
    const named = check.problems.find((p) => p.seq === w.seq);
    const remedy = mendable ? /; recover --force can write it back from layer \d+'s data file$/ : /; it cannot be rebuilt: /;
    s.expect(named !== undefined && remedy.test(named.message), `check does not name seq ${w.seq} with what recover --force can do about it: ${checkSummary(check)}`);
    s.expect(recover.code === 0, 'recover refuses a store whose only damage is a payload the checkpoint covers');
    s.expect(wrong.size === 0, `serve returns data other than the acknowledged writes in ${[...wrong.keys()].join(', ')}`);
    const forced = await runRecover(store, true);
    s.note(`recover --force: ${recoverSummary(forced)}`);
    const repaired = ((forced.report?.payloadsRepaired ?? []) as Array<{ seq: number }>).some((p) => p.seq === w.seq);
    const recordedLost = ((forced.report?.lossesRecorded ?? []) as Array<{ fromSeq: number; payloadOnly?: boolean }>).some((l) => l.fromSeq === w.seq && l.payloadOnly === true);
    s.expect(
      forced.code === 0 && repaired === mendable && recordedLost === !mendable && forced.report!.salvage === undefined,
      `recover --force should ${mendable ? 'write the payload back' : 'record the payload as lost (the checkpoint holds its state)'} and cut nothing: ${recoverSummary(forced)}`,
    );
    const post = await checkCopy(store, 'forcecheck');
    s.note(`after --force, ${checkSummary(post)}; notes: ${(post.notes ?? []).join(' | ')}`);
    const noted = (post.notes ?? []).some((n) => n.startsWith(`the payload of write seq ${w.seq} is lost, accepted by recover --force`));
    s.expect(post.ok && noted === !mendable, `after recover --force, check should pass${mendable ? '' : ' noting the lost payload'}: ${checkSummary(post)}`);
    dropCopy(store);
    return s.result();
  },

  async 'payload-log: flipped byte in an unsynced record (torn tail)'(fx, rng) {
    const s = new Scenario('payload-flip-unsynced');
    const f = fx.crashed;
    const store = copyStore(f.store, 'payload-tail');
    const w = writeInTail(f, true, rng);
    const { file, at } = flipPayload(store, w);
    s.note(`damage: byte ${at} of ${file.slice(store.length + 1)} (payload of W${w.index}, seq ${w.seq}, acknowledged but never synced)`);
    const text = await checkText(store);
    const { check, recover, postCheck, wrong } = await observe(s, store, f, { cut: (r) => (r.report?.tailCut as { fromSeq: number } | undefined)?.fromSeq });
    const named = (text: string): boolean => new RegExp(`seq ${w.seq}\\b`).test(text);
    const checkCut = check.open?.tailCut;
    if (checkCut !== undefined) {
      s.expect(new RegExp(`torn tail cut: ${checkCut.records} unsynced record\\(s\\) from seq ${checkCut.fromSeq}\\b`).test(text), `check's text does not say what opening cut (${JSON.stringify(checkCut)}): ${text}`);
    }
    if (recover.code === 0) {
      const cut = recover.report!.tailCut as { fromSeq: number; records: number } | undefined;
      s.expect(cut !== undefined && cut.fromSeq <= w.seq, `recover neither refused nor reported a cut tail at seq ${w.seq}: ${recoverSummary(recover)}`);
      if (cut !== undefined) {
        // The cut writes had reached the layer files (the process crashed, the page cache stayed):
        // their blocks get their last kept content back, except where retention dropped it; check
        // names those, and only those.
        const unrestorable = unrestorableBlocks(f, cut.fromSeq, f.checkpoints[0]);
        const unexpected = (postCheck?.problems ?? []).filter((p) => !(p.kind === 'data' && unrestorable.has(`${p.layerId}:${p.block}`)));
        s.expect(unexpected.length === 0, `after the cut, check reports ${unexpected.length} problem(s) besides blocks retention left unrestorable: ${unexpected.slice(0, 2).map((p) => `[${p.kind}] ${p.message}`).join(' | ')}`);
        for (const [view, bad] of wrong) {
          const unexcused = bad.filter((b) => !stackOf(f, view).some((l) => unrestorable.has(`${l}:${b}`)));
          s.expect(unexcused.length === 0, `after the cut, ${view} does not hold exactly the writes before seq ${cut.fromSeq}: blocks ${unexcused.slice(0, 8).join(', ')} differ${describeBlocks(f, view, unexcused[0], cut.fromSeq)}`);
        }
      }
    } else s.expect(named(recover.error), `recover refuses without naming seq ${w.seq}: ${recover.error}`);
    dropCopy(store);
    return s.result();
  },

  async 'layer file: truncated'(fx, rng) {
    const s = new Scenario('layer-truncate');
    const f = fx.clean;
    const store = copyStore(f.store, 'truncate');
    const layer = f.layers.defaultTop;
    const path = join(store, 'layers', `${layer}.data`);
    const size = statSync(path).size;
    const newSize = rng.chance(0.5) ? Math.floor(size / 2 / blockBytes) * blockBytes + rng.int(1, blockBytes - 1) : Math.floor(size / 2);
    truncateSync(path, newSize);
    s.note(`damage: layers/${layer}.data (default's top) truncated from ${size} to ${newSize} bytes`);
    const { check, recover, served } = await observe(s, store, f);
    const cutBlock = Math.floor(newSize / blockBytes);
    s.expect(
      check.problems.some((p) => p.kind === 'data' && p.layerId === layer && (p.volumes ?? []).includes('default') && p.block !== undefined && p.block >= cutBlock - 0 && /data file ends at byte/.test(p.message)),
      `check does not name layer ${layer}, volume default and a block at or past ${cutBlock}: ${checkSummary(check)}`,
    );
    if (served !== undefined) {
      const lost = f.writes.filter((w) => w.volume === 'default' && w.seq > f.frozenSeq && w.offset + writeBytes > newSize);
      s.expect(served.get('default')!.eio.length > 0 || lost.length === 0, 'serving default returned no EIO for the truncated blocks');
    }
    s.note(`recover: ${recover.code === 0 ? 'does not read layer files, so it does not notice' : 'refused'}`);
    dropCopy(store);
    return s.result();
  },

  async 'layer file: flipped byte in a volume top and in a shared snapshot layer'(fx, rng) {
    const s = new Scenario('layer-flip');
    const f = fx.clean;
    const store = copyStore(f.store, 'layerflip');
    // The newest write to default (its top) and one before the snapshot (layer snap1, shared by vm1).
    const top = [...f.writes].reverse().find((w) => w.volume === 'default' && w.seq > f.frozenSeq)!;
    const shared = f.writes.filter((w) => w.volume === 'default' && w.seq < f.frozenSeq && !f.writes.some((o) => o.volume === 'default' && o.seq > w.seq && o.seq < f.frozenSeq && o.offset === w.offset));
    const low = rng.pick(shared);
    const topAt = top.offset + rng.int(0, writeBytes - 1);
    const lowAt = low.offset + rng.int(0, writeBytes - 1);
    flipFileByte(join(store, 'layers', `${f.layers.defaultTop}.data`), topAt, 0x01);
    flipFileByte(join(store, 'layers', `${f.layers.snap1}.data`), lowAt, 0x80);
    const topBlock = Math.floor(topAt / blockBytes);
    const lowBlock = Math.floor(lowAt / blockBytes);
    s.note(`damage: byte ${topAt} of layers/${f.layers.defaultTop}.data (default's top, block ${topBlock}, last written by seq ${top.seq}); byte ${lowAt} of layers/${f.layers.snap1}.data (snapshot default@snap1, block ${lowBlock}, seq ${low.seq})`);
    const { check, served } = await observe(s, store, f);
    const names = (layer: number, block: number, seq: number, volume: string): boolean =>
      check.problems.some((p) => p.kind === 'data' && p.layerId === layer && p.block === block && p.seq === seq && (p.volumes ?? []).includes(volume) && new RegExp(`block ${block}\\b.*seq ${seq}\\b`).test(p.message));
    s.expect(names(f.layers.defaultTop, topBlock, top.seq, 'default'), `check does not name default, layer ${f.layers.defaultTop}, block ${topBlock}, seq ${top.seq}: ${checkSummary(check)}`);
    s.expect(names(f.layers.snap1, lowBlock, low.seq, 'default') || names(f.layers.snap1, lowBlock, low.seq, 'vm1'), `check does not name layer ${f.layers.snap1}, block ${lowBlock}, seq ${low.seq}: ${checkSummary(check)}`);
    if (served !== undefined) {
      const wrongDefault = wrongBlocks(served.get('default')!, expected(f, 'default'));
      s.note(`serve: reads do not verify block CRCs: default serves the flipped block ${wrongDefault.includes(topBlock) ? 'as is' : 'correctly'}; check is what finds it`);
    }
    dropCopy(store);
    return s.result();
  },

  async 'checkpoint: newest deleted'(fx) {
    const s = new Scenario('checkpoint-delete');
    const f = fx.clean;
    const store = copyStore(f.store, 'ckdel');
    const [older, newest] = f.checkpoints.slice(-2);
    await withLevel(store, (db) => db.del(checkpointKey(newest)));
    s.note(`damage: checkpoint key c${newest} deleted (checkpoints were ${f.checkpoints.join(', ')})`);
    const { check, recover, wrong } = await observe(s, store, f);
    s.expect(recover.code === 0 && recover.report!.checkpointSeq === older && Number(recover.report!.eventsReplayed) === newest - older, `recover does not fall back to checkpoint ${older} and replay ${newest - older} events: ${recoverSummary(recover)}`);
    s.expect(wrong.size === 0, 'data differs after falling back to the older checkpoint');
    s.note(`check: ${check.ok ? 'a missing checkpoint leaves no trace to report (the older one plus replay is complete)' : 'reports it'}`);
    dropCopy(store);
    return s.result();
  },

  async 'checkpoint: newest corrupted'(fx, rng) {
    const s = new Scenario('checkpoint-corrupt');
    const f = fx.clean;
    const store = copyStore(f.store, 'ckbad');
    const [older, newest] = f.checkpoints.slice(-2);
    await withLevel(store, async (db) => {
      const value = (await db.get(checkpointKey(newest)))!;
      const at = 24 + rng.int(0, value.length - 25);
      value[at] ^= 0x10;
      await db.put(checkpointKey(newest), value);
      s.note(`damage: byte ${at} of checkpoint value c${newest} (${value.length} bytes) flipped`);
    });
    const { check, recover, wrong } = await observe(s, store, f);
    const skipped = (recover.report?.checkpointsSkipped ?? []) as Array<{ seq: number; reason: string }>;
    s.expect(recover.code === 0 && recover.report!.checkpointSeq === older && skipped.some((k) => k.seq === newest), `recover does not skip checkpoint ${newest} and use ${older}: ${recoverSummary(recover)}`);
    s.expect(check.problems.some((p) => p.kind === 'checkpoint' && p.seq === newest), `check does not report checkpoint ${newest}: ${checkSummary(check)}`);
    s.expect(wrong.size === 0, 'data differs after falling back to the older checkpoint');
    dropCopy(store);
    return s.result();
  },

  async 'checkpoint: every checkpoint gone'(fx) {
    const s = new Scenario('checkpoint-all-gone');
    const f = fx.clean;
    const store = copyStore(f.store, 'cknone');
    await withLevel(store, async (db) => {
      for (const c of f.checkpoints) await db.del(checkpointKey(c));
    });
    s.note(`damage: checkpoints ${f.checkpoints.join(', ')} deleted`);
    const { check, recover } = await observe(s, store, f);
    s.expect(
      recover.code === 1 && /no usable checkpoint \(it holds no checkpoint\), and retention dropped the write payloads through seq \d+/.test(recover.error),
      `recover should refuse, saying the checkpoints are gone and how far retention dropped payloads: ${recoverSummary(recover)}`,
    );
    s.expect(!check.ok, `check passes with every checkpoint gone: ${checkSummary(check)}`);
    await tryForce(s, store, f, undefined);
    dropCopy(store);
    return s.result();
  },

  async 'journal: frame deleted after the last checkpoint'(fx) {
    const s = new Scenario('frame-delete-tail');
    const f = fx.crashed;
    const store = copyStore(f.store, 'framedel');
    // W34: two records after the last checkpoint, before W38 (which overwrote W26's slot).
    const w = f.writes[34];
    const first = await withLevel(store, async (db) => {
      const key = await frameKeyOf(db, w.seq);
      await db.del(key);
      return frameSeq(key);
    });
    s.note(`damage: frame r${first} (holding W${w.index}, seq ${w.seq}) deleted from LevelDB`);
    const { check, recover } = await observe(s, store, f);
    s.expect(recover.code === 1 && new RegExp(`seq ${first}\\b`).test(recover.error) && /missing|gap/.test(recover.error), `recover does not refuse naming missing seq ${first}: ${recoverSummary(recover)}`);
    s.expect(!check.ok && check.problems.some((p) => new RegExp(`seq ${first}\\b`).test(p.message)), `check does not name seq ${first}: ${checkSummary(check)}`);
    if (recover.code === 1) await tryForce(s, store, f, first);
    dropCopy(store);
    return s.result();
  },

  async 'journal: frame deleted before the last checkpoint'(fx, rng) {
    return coveredFrameDamage(fx, rng, 'deleted');
  },

  async 'journal: frame damaged before the last checkpoint'(fx, rng) {
    return coveredFrameDamage(fx, rng, 'flipped');
  },

  async "LevelDB write-ahead log: flipped byte in a durable frame of the crashed store's .log"(fx) {
    const s = new Scenario('leveldb-log-flip');
    const f = fx.crashed;
    const store = copyStore(f.store, 'walflip');
    // W35's frame (durable: a flush followed it) is in LevelDB's log, not yet in a table.
    const w = f.writes[35];
    const journalDir = join(store, 'journal');
    let damaged: string | undefined;
    for (const name of readdirSync(journalDir).filter((n) => n.endsWith('.log'))) {
      const bytes = readFileSync(join(journalDir, name));
      const at = bytes.indexOf(recordKey(w.seq));
      if (at !== -1) {
        flipFileByte(join(journalDir, name), at + 9 + 60, 0x20);
        damaged = `byte ${at + 69} of journal/${name} (${bytes.length} bytes), inside the batch holding frame r${w.seq} (W${w.index}, synced)`;
      }
    }
    if (damaged === undefined) {
      s.note(`frame r${w.seq} is not in a LevelDB .log file in this fixture (LevelDB already compacted it); nothing to test`);
      dropCopy(store);
      return s.result('skipped');
    }
    s.note(`damage: ${damaged}`);
    const { check, recover, wrong } = await observe(s, store, f);
    const lostAcked = recover.code === 0 ? f.lastSeq - Number(recover.report!.lastSeq) : 0;
    if (recover.code === 0 && lostAcked > 0) s.note(`recover: the journal now ends at seq ${String(recover.report!.lastSeq)}; ${lostAcked} acknowledged record(s) (seq ${Number(recover.report!.lastSeq) + 1}..${f.lastSeq}) are gone without a word`);
    s.expect(
      recover.code !== 0 || hasWarning(recover) || check.problems.some((p) => p.kind !== 'data') || lostAcked === 0,
      `acknowledged, synced writes from seq ${w.seq} on vanished from the journal; neither recover nor check reports lost journal records${wrong.size > 0 ? ` (the volumes serve old data in ${[...wrong.values()].reduce((n, b) => n + b.length, 0)} block(s))` : ''}`,
    );
    if (recover.code !== 0) {
      s.expect(new RegExp(`seq ${w.seq}\\b`).test(recover.error), `recover refuses without naming the first lost seq ${w.seq}: ${recover.error}`);
      await tryForce(s, store, f, w.seq);
    }
    dropCopy(store);
    return s.result();
  },

  async 'LevelDB table: damage that LevelDB itself detects'(fx) {
    const s = new Scenario('leveldb-table-detected');
    const f = fx.clean;
    const found = await findLevelDbDetectedDamage(f.store);
    if (found === undefined) {
      s.note('no single-byte flip in the first 2000 bytes of any table makes LevelDB report corruption in this fixture');
      return s.result('skipped');
    }
    const store = copyStore(f.store, 'ldbdetected');
    flipFileByte(join(store, 'journal', found.file), found.at, 0xff);
    s.note(`damage: byte ${found.at} of journal/${found.file} (LevelDB reading the copy says: ${found.message})`);
    await refusedThenSetAside(s, store, f, found.file);
    dropCopy(store);
    return s.result();
  },

  async 'LevelDB table: a damaged block of frames the newest checkpoint covers'(fx) {
    const s = new Scenario('leveldb-table-frames');
    const f = fx.clean;
    const store = copyStore(f.store, 'ldbframes');
    const journalDir = join(store, 'journal');
    const tables = readdirSync(journalDir).filter((n) => n.endsWith('.ldb'));
    const file = tables.sort((a, b) => statSync(join(journalDir, b)).size - statSync(join(journalDir, a)).size)[0];
    const original = file === undefined ? undefined : readFileSync(join(journalDir, file));
    // The last data block (the table's highest keys, its newest frames): the first byte from the end
    // whose flip costs exactly one data block.
    let at: number | undefined;
    for (let i = (original?.length ?? 0) - 49; original !== undefined && i >= 0 && at === undefined; i -= 16) {
      const damaged = Buffer.from(original);
      damaged[i] ^= 0xff;
      const found = salvageTable(file, damaged);
      if (found.unreadable === undefined && found.lostBlocks.length === 1) at = i;
    }
    if (file === undefined || at === undefined) {
      s.note('no table with a block of frames in this fixture');
      dropCopy(store);
      return s.result('skipped');
    }
    flipFileByte(join(journalDir, file), at, 0xff);
    s.note(`damage: byte ${at} of journal/${file} (its last data block, which holds frames)`);
    await refusedThenSetAside(s, store, f, file);
    dropCopy(store);
    return s.result();
  },

  async 'journal metadata: the retention record damaged'(fx) {
    const s = new Scenario('meta-retention');
    const f = fx.clean;
    const store = copyStore(f.store, 'metaret');
    const key = Buffer.from('mretention');
    const found = await withLevel(store, async (db) => {
      const value = await db.get(key);
      if (value === undefined) return false;
      await db.put(key, Buffer.concat([value, Buffer.of(0x00)]));
      return true;
    });
    if (!found) {
      s.note('this fixture has no retention record');
      dropCopy(store);
      return s.result('skipped');
    }
    s.note("damage: one byte appended to the journal's retention record (LevelDB key 'mretention')");
    const { recover } = await observe(s, store, f);
    if (recover.code !== 0) await tryForce(s, store, f, undefined);
    dropCopy(store);
    return s.result();
  },

  async "payload log: the journal's seal damaged"(fx) {
    const s = new Scenario('seal');
    const f = fx.crashed;
    const store = copyStore(f.store, 'seal');
    const seal = join(store, 'journal', 'payloads', 'seal');
    if (!existsSync(seal)) {
      s.note('this build has no seal');
      dropCopy(store);
      return s.result('skipped');
    }
    flipFileByte(seal, 10, 0x01);
    s.note('damage: byte 10 of journal/payloads/seal (its committed seq) flipped');
    const text = await checkText(store);
    const serveCopy = copyStore(store, 'sealserve');
    const served = await startServe(serveCopy);
    const logged = served.stderr();
    await served.stop();
    dropCopy(serveCopy);
    s.expect(/cowstack: recovered: seal rewritten: journal\/payloads\/seal was damaged \(it fails its CRC32C\)/.test(logged), `serve does not log the damaged seal: ${logged}`);
    const { check, recover, postCheck } = await observe(s, store, f);
    // The seal is a witness only: its damage loses nothing, so check stays ok, but every report says
    // it was damaged and written anew, and once written anew it is whole again.
    s.expect(check.ok && check.open?.sealDamage === 'it fails its CRC32C', `check does not report the damaged seal and stay ok: ${checkSummary(check)} ${JSON.stringify(check.open)}`);
    s.expect(/note: seal rewritten: journal\/payloads\/seal was damaged \(it fails its CRC32C\)/.test(text), `check's text does not report the damaged seal: ${text}`);
    s.expect(recover.code === 0 && recover.report?.sealDamage === 'it fails its CRC32C', `recover does not report the damaged seal: ${recoverSummary(recover)}`);
    s.expect(postCheck !== undefined && postCheck.ok && postCheck.open?.sealDamage === undefined, `after recover the seal is still reported damaged: ${postCheck === undefined ? 'no check' : JSON.stringify(postCheck.open)}`);
    dropCopy(store);
    return s.result();
  },

  async 'journal: flipped byte inside a frame value'(fx, rng) {
    const s = new Scenario('frame-flip');
    const f = fx.crashed;
    const store = copyStore(f.store, 'frameflip');
    const w = writeInTail(f, false, rng);
    const first = await withLevel(store, async (db) => {
      const key = await frameKeyOf(db, w.seq);
      const value = (await db.get(key))!;
      value[50] ^= 0x04; // inside the first record of the frame (the records region starts at 48)
      await db.put(key, value);
      return frameSeq(key);
    });
    s.note(`damage: byte 50 of frame r${first} (first record seq ${first}) flipped through LevelDB`);
    const { check, recover } = await observe(s, store, f);
    s.expect(recover.code === 1 && new RegExp(`seq ${first}\\b`).test(recover.error), `recover does not refuse naming seq ${first}: ${recoverSummary(recover)}`);
    s.expect(!check.ok && check.problems.some((p) => new RegExp(`seq ${first}\\b`).test(p.message)), `check does not name seq ${first}: ${checkSummary(check)}`);
    if (recover.code === 1) await tryForce(s, store, f, first);
    dropCopy(store);
    return s.result();
  },
};

/** One random flip (1 to 4 bytes) in one of the journal's LevelDB files. */
export async function randomLevelFlip(fx: { clean: Fixture; crashed: Fixture }, rng: Rng, n: number): Promise<ScenarioResult> {
  const f = rng.chance(0.5) ? fx.clean : fx.crashed;
  const s = new Scenario(`leveldb-flip-${n} (${f === fx.clean ? 'clean' : 'crashed'})`);
  const store = copyStore(f.store, 'ldbflip');
  const journalDir = join(store, 'journal');
  const files = readdirSync(journalDir).filter((name) => /\.(ldb|log)$/.test(name) || (rng.chance(0.15) && /^MANIFEST-/.test(name)));
  const candidates = files.filter((name) => statSync(join(journalDir, name)).size > 0);
  if (candidates.length === 0) {
    s.note('no non-empty LevelDB file to damage');
    dropCopy(store);
    return s.result('skipped');
  }
  const file = rng.pick(candidates);
  const size = statSync(join(journalDir, file)).size;
  const count = rng.int(1, 4);
  const at: number[] = [];
  for (let i = 0; i < count; i++) {
    const offset = rng.int(0, size - 1);
    flipFileByte(join(journalDir, file), offset, rng.int(1, 255));
    at.push(offset);
  }
  s.note(`damage: ${count} byte(s) of journal/${file} (${size} bytes) at ${at.join(', ')}`);
  const { check, recover, wrong, serveError, postCheck } = await observe(s, store, f);
  let outcome: string;
  if (recover.code !== 0) {
    // Salvage must leave the store holding exactly the writes before the cut it reports.
    const failuresBefore = s.failures.length;
    await tryForce(s, store, f, 'reported');
    outcome = s.failures.length === failuresBefore ? 'recover refused, --force salvaged' : 'recover refused, --force failed';
  }
  else if (serveError !== undefined) outcome = 'serve refused';
  else if (!check.ok || !(postCheck?.ok ?? true) || hasWarning(recover)) {
    outcome = wrong.size > 0 ? 'flagged (wrong data served, reported)' : 'flagged';
    // Journal damage the checkpoint covers: recover --force records it as an accepted loss, and
    // check then passes noting it. Whatever else is flagged, --force must not make it worse.
    if (postCheck !== undefined && postCheck.problems.some((p) => p.kind === 'journal')) {
      const forced = await runRecover(store, true);
      s.note(`recover --force: ${recoverSummary(forced)}`);
      const after = await checkCopy(store, 'forcecheck');
      s.note(`after --force, ${checkSummary(after)}`);
      s.expect(forced.code === 0 && after.problems.length <= postCheck.problems.length, `recover --force on a store that recovers made check worse: ${recoverSummary(forced)}; ${checkSummary(after)}`);
      if (after.ok) outcome += ', --force accepted the loss';
    }
  } else outcome = 'harmless (no effect found)';
  if (recover.code === 0 && wrong.size > 0) s.note(`wrong data: ${[...wrong.keys()].join(', ')}`);
  dropCopy(store);
  return s.result(outcome);
}

// ---------------------------------------------------------------------------------------------
// the run

export interface CorruptionOptions {
  readonly seed: number;
  readonly flips: number;
  readonly only?: RegExp;
  readonly log?: (line: string) => void;
}

export interface CorruptionResult {
  readonly passed: number;
  readonly failed: number;
  readonly results: ScenarioResult[];
  readonly flipOutcomes: Record<string, number>;
}

export async function runCorruption(opts: CorruptionOptions): Promise<CorruptionResult> {
  const log = opts.log ?? ((line: string) => console.log(line));
  const rng = new Rng(opts.seed);
  const fx = await buildFixtures(opts.seed % 1000);
  log(`fixtures: clean store seq 1..${fx.clean.lastSeq} (checkpoints ${fx.clean.checkpoints.join(', ')}), crashed store seq 1..${fx.crashed.lastSeq} (tail after ${fx.crashed.checkpoints.at(-1)}; W42..W47 unsynced)`);
  const results: ScenarioResult[] = [];
  const report = (r: ScenarioResult): void => {
    results.push(r);
    log(`${r.ok ? 'ok    ' : 'FAILED'} ${r.name}${r.outcome ? ` -> ${r.outcome}` : ''}`);
    for (const line of r.observed) log(`         ${line}`);
    for (const line of r.failures) log(`   FAIL: ${line}`);
  };
  for (const [name, fn] of Object.entries(scenarios)) {
    if (opts.only !== undefined && !opts.only.test(name)) continue;
    try {
      report(await fn(fx, rng));
    } catch (err) {
      report({ name, ok: false, observed: [], failures: [`harness error: ${(err as Error).stack ?? String(err)}`] });
    }
  }
  const flipOutcomes: Record<string, number> = {};
  for (let i = 0; i < opts.flips; i++) {
    try {
      const r = await randomLevelFlip(fx, rng, i + 1);
      flipOutcomes[r.outcome ?? '?'] = (flipOutcomes[r.outcome ?? '?'] ?? 0) + 1;
      report(r);
    } catch (err) {
      report({ name: `leveldb-flip-${i + 1}`, ok: false, observed: [], failures: [`harness error: ${(err as Error).stack ?? String(err)}`] });
    }
  }
  for (const f of [fx.clean, fx.crashed]) if (existsSync(f.store)) dropCopy(f.store);
  const passed = results.filter((r) => r.ok).length;
  return { passed, failed: results.length - passed, results, flipOutcomes };
}

function argValue(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  return i === -1 ? undefined : args[i + 1];
}

export async function main(argv: string[] = process.argv.slice(2)): Promise<number> {
  const full = argv.includes('--full');
  const flips = Number(argValue(argv, '--flips') ?? (full ? 200 : 12));
  const seed = Number(argValue(argv, '--seed') ?? Math.floor(Math.random() * 2 ** 31));
  const only = argValue(argv, '--only');
  console.log(`corruption: fixed scenarios + ${flips} random LevelDB flips, seed ${seed}`);
  const started = Date.now();
  const result = await runCorruption({ seed, flips, only: only !== undefined ? new RegExp(only) : undefined });
  console.log(`random LevelDB flips: ${Object.entries(result.flipOutcomes).map(([k, v]) => `${v} ${k}`).join(', ') || 'none'}`);
  console.log(`time: ${((Date.now() - started) / 1000).toFixed(0)} s`);
  console.log(`${result.passed} passed, ${result.failed} failed`);
  return result.failed === 0 ? 0 : 1;
}

if (process.argv[1] !== undefined && resolve(process.argv[1]) === fileURLToPath(import.meta.url)) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err);
      process.exit(2);
    },
  );
}
