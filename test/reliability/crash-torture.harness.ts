/**
 * Crash torture: SIGKILL `cowstack serve` under real client load, recover, and check every volume
 * and every snapshot against what the clients were told.
 *
 * One trial:
 *   1. copy a template store (volumes default and vm1, a clone of default@base, both on a 16 MiB
 *      random base; vol2 with 16 MiB of its own data in its top layer) and serve it;
 *   2. 3 or 4 load clients (torture-client.py: libnbd aio, 8 to 32 commands in flight) on 2 or 3 of
 *      the volumes write, FUA-write, write-zeroes, trim and flush their own regions of the first
 *      4 MiB (neighbouring regions belong to different connections and may share blocks), printing
 *      every issue and acknowledgement with its time;
 *   3. meanwhile a driver takes snapshots through the CLI (online, control socket) and clones some;
 *   4. at a random moment the server gets SIGKILL. Variants: `recover-crash` SIGKILLs `cowstack
 *      recover` itself 1 to 3 times at random moments first; `commit` / `flatten` start that command
 *      online and kill the server while it copies (watching the target layer file grow);
 *   5. `cowstack recover --json` (no skipped checkpoint, and no torn tail but the two a kill can
 *      leave, both unacknowledged: a batch LevelDB got without the one before it, and the newest
 *      batch's frames without its payloads), `cowstack check --json` (ok);
 *   6. serve again, read every volume and snapshot with libnbd and check them against the model in
 *      torture-lib.ts: each region holds its last acknowledged state or, whole, the state of the one
 *      command in flight on it; each snapshot holds per region a state that includes everything
 *      acknowledged before its command started and nothing issued after it returned; a clone equals
 *      its snapshot; the unwritten rest of each volume is unchanged; no volume or snapshot appears
 *      that no command created, and none a successful command created is missing;
 *   7. commit/flatten variants: run the command again (it must complete), read the volume again, and
 *      `cowstack check` once more.
 *
 * Run: node --conditions=source --import tsx test/reliability/crash-torture.harness.ts [--full]
 *        [--trials N] [--seed S] [--kinds load,recover-crash,commit,flatten]
 * Without --full: 20 trials (COWSTACK_CRASH_TRIALS overrides); --full: 200. Prints `N passed, M
 * failed`; a failed trial keeps its store directory and prints its path.
 */
import { cpSync, lstatSync, mkdtempSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { fileURLToPath } from 'node:url';
import { cliPath, cowstack, cowstackOk, describe, MiB, pattern, type Served, sleep, startServe, tempDir, within, writeExport } from '../harness.js';
import {
  allocatedBytes,
  type ClientConfig,
  type ClientRun,
  killChildren,
  lockHolder,
  layoutRegions,
  matchRegion,
  type OpRecord,
  readExports,
  type Region,
  Rng,
  spawnChild,
  startClient,
} from './torture-lib.js';

export const volumeBytes = 16 * MiB;
/** Load clients write only here; the rest of every volume must stay as the template left it. */
export const hotBytes = 4 * MiB;
const regionSizes = [1000, 4096, 13_288, 65_539] as const;
const modelVolumes = ['default', 'vol2', 'vm1'] as const;
type ModelVolume = (typeof modelVolumes)[number];
const snapshotsPerTrialMax = 3;
const clientMaxSeconds = 60;
const commandTimeoutMs = 60_000;

export type TrialKind = 'load' | 'recover-crash' | 'commit' | 'flatten';
export const allKinds: readonly TrialKind[] = ['load', 'recover-crash', 'commit', 'flatten'];

export interface TortureOptions {
  readonly trials: number;
  readonly seed: number;
  /** Load phase before the kill, ms (uniform in [min, max]). */
  readonly loadMs: readonly [number, number];
  readonly kinds?: readonly TrialKind[];
  readonly log?: (line: string) => void;
}

export interface TrialResult {
  readonly index: number;
  readonly kind: TrialKind;
  readonly seed: number;
  readonly ok: boolean;
  readonly error?: string;
  readonly dir?: string;
  readonly stats: Record<string, number | string>;
  readonly ms: number;
}

export interface TortureResult {
  readonly passed: number;
  readonly failed: number;
  readonly trials: TrialResult[];
  readonly totals: Record<string, number>;
}

// ---------------------------------------------------------------------------------------------
// template stores

interface Template {
  readonly store: string;
  readonly blockSize: number;
  readonly initial: Record<ModelVolume, Buffer>;
  /** The layer file commit fills (vol2's base) and the one flatten fills (vm1's top). */
  readonly commitTargetLayer: number;
  readonly flattenTargetLayer: number;
}

const templates = new Map<number, Promise<Template>>();

function template(blockSize: number): Promise<Template> {
  let t = templates.get(blockSize);
  if (t === undefined) {
    t = makeTemplate(blockSize);
    templates.set(blockSize, t);
  }
  return t;
}

async function makeTemplate(blockSize: number): Promise<Template> {
  const store = join(tempDir('torture-template'), 'store');
  await cowstackOk(['init', store, '--size', String(volumeBytes), '--block-size', String(blockSize)]);
  const base = pattern(volumeBytes, 0x5eed);
  const vol2 = pattern(volumeBytes, 0xb0b2);
  const served = await startServe(store);
  try {
    await cowstackOk(['volume', 'create', store, 'vol2', '--size', String(volumeBytes)]);
    await writeExport(served.uri('default'), 0, base);
    await cowstackOk(['snapshot', store, 'default', '--name', 'base']);
    await cowstackOk(['clone', store, 'default@base', 'vm1']);
    await writeExport(served.uri('vol2'), 0, vol2);
  } finally {
    await served.stop();
  }
  const ls = JSON.parse((await cowstackOk(['ls', store, '--json'])).stdout) as LsOutput;
  const vol = (name: string): LsOutput['volumes'][number] => ls.volumes.find((v) => v.name === name)!;
  return { store, blockSize, initial: { default: base, vm1: base, vol2 }, commitTargetLayer: vol('vol2').stack[0], flattenTargetLayer: vol('vm1').topLayerId };
}

interface LsOutput {
  volumes: Array<{ name: string; topLayerId: number; stack: number[]; snapshots: string[] }>;
  snapshots: Array<{ volume: string; name: string; layerId: number }>;
}

// ---------------------------------------------------------------------------------------------
// one trial

interface SnapshotRecord {
  readonly volume: ModelVolume;
  readonly name: string;
  readonly startMs: number;
  endMs?: number;
  outcome: 'running' | 'ok' | 'unknown';
}

interface CloneRecord {
  readonly name: string;
  readonly source: string;
  outcome: 'running' | 'ok' | 'unknown';
}

interface Recorder {
  readonly snapshots: SnapshotRecord[];
  readonly clones: CloneRecord[];
  readonly problems: string[];
}

class TrialFailure extends Error {}

function fail(message: string): never {
  throw new TrialFailure(message);
}

const nowMs = (): number => Date.now();

/** Snapshots and clones through the CLI while the server runs, until `stopped()`. */
async function driver(store: string, rng: Rng, trial: number, volumes: readonly ModelVolume[], rec: Recorder, stopped: () => boolean, killedAt: () => number | undefined): Promise<void> {
  if (volumes.length === 0) return;
  await sleep(rng.range(0, 250));
  for (let n = 0; n < snapshotsPerTrialMax && !stopped(); n++) {
    const volume = rng.pick(volumes);
    const snap: SnapshotRecord = { volume, name: `t${trial}-s${n}`, startMs: nowMs(), outcome: 'running' };
    if (stopped()) return;
    rec.snapshots.push(snap);
    const r = await cowstack(['snapshot', store, volume, '--name', snap.name, '--json'], { timeoutMs: commandTimeoutMs });
    snap.endMs = nowMs();
    const killed = killedAt();
    if (r.code === 0) snap.outcome = 'ok';
    else if (killed !== undefined && killed <= snap.endMs) snap.outcome = 'unknown';
    else rec.problems.push(`snapshot while serving failed: ${describe('cowstack', ['snapshot', store, volume, '--name', snap.name], r)}`);
    if (snap.outcome === 'ok' && rng.chance(0.5) && !stopped()) {
      const clone: CloneRecord = { name: `t${trial}-c${n}`, source: `${volume}@${snap.name}`, outcome: 'running' };
      rec.clones.push(clone);
      const c = await cowstack(['clone', store, clone.source, clone.name, '--json'], { timeoutMs: commandTimeoutMs });
      const k = killedAt();
      if (c.code === 0) clone.outcome = 'ok';
      else if (k !== undefined) clone.outcome = 'unknown';
      else rec.problems.push(`clone while serving failed: ${describe('cowstack', ['clone', store, clone.source, clone.name], c)}`);
    }
    await sleep(rng.range(0, 200));
  }
}

interface VolumeModel {
  readonly name: ModelVolume;
  readonly initial: Buffer;
  readonly regions: Region[];
  /** Per region id: its operations in issue order (flushes excluded). */
  readonly ops: Map<number, OpRecord[]>;
}

function buildModels(tpl: Template, regions: Region[], clients: Array<{ run: ClientRun; volume: ModelVolume }>): Map<ModelVolume, VolumeModel> {
  const models = new Map<ModelVolume, VolumeModel>();
  for (const name of modelVolumes) models.set(name, { name, initial: tpl.initial[name], regions, ops: new Map() });
  for (const { run, volume } of clients) {
    const model = models.get(volume)!;
    for (const op of run.ops.values()) {
      if (op.kind === 'f') continue;
      let list = model.ops.get(op.region);
      if (list === undefined) model.ops.set(op.region, (list = []));
      list.push(op);
    }
  }
  for (const model of models.values()) for (const list of model.ops.values()) list.sort((a, b) => a.issuedMs - b.issuedMs || a.op - b.op);
  return models;
}

/** Every region of a volume as it must be after the crash; also the untouched rest. */
function checkVolume(model: VolumeModel, bytes: Buffer, what: string, seed: number, blockSize: number): void {
  if (bytes.length !== volumeBytes) fail(`${what}: ${bytes.length} bytes, expected ${volumeBytes}`);
  if (!bytes.subarray(hotBytes).equals(model.initial.subarray(hotBytes))) {
    let i = hotBytes;
    while (bytes[i] === model.initial[i]) i++;
    fail(`${what}: byte ${i}, outside every client's regions, changed`);
  }
  for (const region of model.regions) {
    const ops = model.ops.get(region.id) ?? [];
    for (let i = 0; i + 1 < ops.length; i++) {
      if (ops[i].ackedMs === undefined) fail(`${what}: region ${region.id}: op ${ops[i].op} was not acknowledged but a later one was issued (the client broke its one-at-a-time rule)`);
    }
    const last = ops[ops.length - 1];
    const kMin = last === undefined || last.ackedMs !== undefined ? ops.length : ops.length - 1;
    const initial = model.initial.subarray(region.start, region.start + region.length);
    const actual = bytes.subarray(region.start, region.start + region.length);
    const r = matchRegion(initial, region, ops, kMin, ops.length, actual, seed, blockSize);
    if ('error' in r) fail(`${what}: ${r.error}`);
  }
}

/** A snapshot taken over [startMs, endMs] of a volume: per region, a state between the two bounds. */
function checkSnapshot(model: VolumeModel, snap: SnapshotRecord, bytes: Buffer, seed: number, blockSize: number): number {
  const what = `snapshot ${snap.volume}@${snap.name} (command ${snap.outcome === 'ok' ? 'returned' : 'killed'})`;
  if (bytes.length !== volumeBytes) fail(`${what}: ${bytes.length} bytes`);
  if (!bytes.subarray(hotBytes).equals(model.initial.subarray(hotBytes))) fail(`${what}: bytes outside every client's regions changed`);
  let fromLoad = 0;
  for (const region of model.regions) {
    const ops = model.ops.get(region.id) ?? [];
    // Acknowledged before the command started (the client's clock is read after the ack, ours before
    // the command), and issued at or before it returned (+1 ms: Date.now() truncates).
    const kMin = ops.filter((o) => o.ackedMs !== undefined && o.ackedMs < snap.startMs).length;
    const kMax = snap.endMs === undefined || snap.outcome !== 'ok' ? ops.length : ops.filter((o) => o.issuedMs <= snap.endMs! + 1).length;
    const initial = model.initial.subarray(region.start, region.start + region.length);
    const actual = bytes.subarray(region.start, region.start + region.length);
    const r = matchRegion(initial, region, ops, kMin, kMax, actual, seed, blockSize);
    if ('error' in r) fail(`${what}, window [${snap.startMs}, ${snap.endMs ?? 'killed'}]: ${r.error}`);
    if (r.k > 0) fromLoad++;
  }
  return fromLoad;
}

/** The torn tails a process kill can leave (see recoverJson): the trial's stat and the run's total for each. */
const killTails: ReadonlyMap<string, { readonly stat: string; readonly total: string }> = new Map([
  ['gap', { stat: 'gapCut', total: 'gapTailsCut' }],
  ['payload-missing', { stat: 'payloadMissingCut', total: 'payloadMissingTailsCut' }],
]);

async function recoverJson(store: string): Promise<Record<string, unknown>> {
  const r = await cowstack(['recover', store, '--json'], { timeoutMs: commandTimeoutMs });
  if (r.code !== 0) fail(`recover failed: ${describe('cowstack', ['recover', store, '--json'], r)}`);
  const report = JSON.parse(r.stdout) as Record<string, unknown>;
  // The torn tails a process kill can leave (the page cache keeps everything written): the journal
  // writes two unsynced batches to LevelDB at once, and the kill may keep the second without the
  // first (`gap`); and an unsynced batch writes its payloads while LevelDB writes its frames, so the
  // kill may keep the newest batch's frames without all of its payloads (`payload-missing`: a kill
  // during the payload log's writev, which for a commit's 1 MiB copies takes long; journal.pipeline's
  // crash test makes it happen on purpose). None of it was acknowledged (a batch commits only after
  // both writes and after the batch before it), which the region checks below verify. Any other
  // kind (a CRC mismatch, a broken chain) would be damage, not a kill's tail.
  const cut = report.tailCut as { kind?: string } | undefined | null;
  if (cut !== undefined && cut !== null && !killTails.has(cut.kind ?? '')) fail(`recover cut a torn tail a process kill cannot leave (acknowledged writes may be lost): ${r.stdout}`);
  if (!Array.isArray(report.checkpointsSkipped) || report.checkpointsSkipped.length > 0) fail(`recover skipped checkpoints after a process kill: ${r.stdout}`);
  return report;
}

async function checkOk(store: string, when: string): Promise<Record<string, unknown>> {
  const r = await cowstack(['check', store, '--json'], { timeoutMs: commandTimeoutMs });
  let report: { ok?: boolean; problems?: unknown[] } = {};
  try {
    report = JSON.parse(r.stdout) as typeof report;
  } catch {
    // reported below
  }
  if (r.code !== 0 || report.ok !== true) fail(`check ${when} found problems (exit ${r.code}): ${r.stdout}${r.stderr}`);
  return report as Record<string, unknown>;
}

/** Estimated wall time of one `cowstack recover` of a crashed trial store (updated as trials run). */
let recoverWallMs = 900;

async function runTrial(index: number, kind: TrialKind, seed: number, opts: TortureOptions): Promise<TrialResult> {
  const started = nowMs();
  const rng = new Rng(seed);
  const blockSize = rng.chance(0.25) ? 512 : 4096;
  const tpl = await template(blockSize);
  const dir = mkdtempSync(join(tmpdir(), `cowstack-torture-${index}-`));
  const store = join(dir, 'store');
  cpSync(tpl.store, store, { recursive: true, filter: (src) => !lstatSync(src).isSocket() });
  const stats: Record<string, number | string> = { blockSize };
  let served: Served | undefined;
  let served2: Served | undefined;
  const clients: Array<{ run: ClientRun; volume: ModelVolume }> = [];
  try {
    // The load: which volumes, how many clients, regions, depth.
    const volumes: ModelVolume[] =
      kind === 'commit' || kind === 'flatten' ? [...modelVolumes] : rng.shuffle([...modelVolumes]).slice(0, rng.int(2, 3));
    const nClients = rng.int(3, 4);
    const regionBytes = rng.pick(regionSizes);
    const regions = layoutRegions(hotBytes, regionBytes);
    const depth = rng.int(8, 32);
    const mix: ClientConfig['mix'] = [rng.int(30, 60), rng.int(5, 25), rng.int(5, 15), rng.int(5, 15), rng.int(2, 8)];
    Object.assign(stats, { volumes: volumes.join('+'), clients: nClients, regionBytes, depth });

    served = await startServe(store, { args: process.env.COWSTACK_TORTURE_VERBOSE ? ['-v'] : [] });
    const server = served;
    const clientsOf = new Map<ModelVolume, number[]>();
    for (let c = 0; c < nClients; c++) {
      const v = volumes[c % volumes.length];
      clientsOf.set(v, [...(clientsOf.get(v) ?? []), c]);
    }
    for (const [volume, ids] of clientsOf) {
      const shift = rng.int(0, ids.length - 1);
      for (const [k, c] of ids.entries()) {
        const owned = regions.filter((r) => (r.id + shift) % ids.length === k).map((r) => [r.id, r.start, r.length] as const);
        const run = startClient({ uri: server.uri(volume), client: c, regions: owned, depth, blockSize, seed: (seed ^ Math.imul(c + 1, 0x9e3779b1)) >>> 0, contentSeed: seed, mix, maxSeconds: clientMaxSeconds });
        clients.push({ run, volume });
      }
    }
    await Promise.all(clients.map((c) => c.run.connected));
    const loadStart = nowMs();

    // The driver: snapshots (and clones) online, on volumes commit/flatten do not touch.
    let killedAt: number | undefined;
    let stopDriver = false;
    const rec: Recorder = { snapshots: [], clones: [], problems: [] };
    const target: ModelVolume | undefined = kind === 'commit' ? 'vol2' : kind === 'flatten' ? 'vm1' : undefined;
    const driving = driver(store, rng, index, volumes.filter((v) => v !== target), rec, () => stopDriver, () => killedAt);

    // The kill. The lock holder takes the store's lock as the server dies, so recovery is left to
    // `cowstack recover` (a CLI command started just before the kill cannot open the store itself).
    const holder = await lockHolder(join(store, 'journal', 'LOCK'));
    const killServer = async (): Promise<void> => {
      if (killedAt !== undefined) return;
      stopDriver = true;
      killedAt = nowMs();
      holder.grab();
      await server.kill();
      if ((await within(holder.held, 10_000, 'timeout')) === 'timeout') fail('the lock holder did not get the store lock after the kill');
    };
    if (target === undefined) {
      await sleep(rng.range(opts.loadMs[0], opts.loadMs[1]));
    } else {
      await sleep(rng.range(200, 500));
      const layerFile = join(store, 'layers', `${kind === 'commit' ? tpl.commitTargetLayer : tpl.flattenTargetLayer}.data`);
      const before = allocatedBytes(layerFile);
      const copyBytes = volumeBytes - hotBytes;
      const fraction = rng.range(0.01, 0.7);
      const threshold = before + fraction * copyBytes;
      const args = kind === 'commit' ? ['commit', store, 'vol2'] : ['flatten', store, 'vm1'];
      let exited: number | null | undefined;
      const command = cowstack(args, { timeoutMs: commandTimeoutMs }).then((r) => {
        exited = r.code;
        return r;
      });
      const deadline = nowMs() + 30_000;
      while (allocatedBytes(layerFile) < threshold && exited === undefined && nowMs() < deadline) await sleep(1);
      if (exited === undefined) await sleep(rng.range(0, 3));
      const grown = allocatedBytes(layerFile) - before;
      stats.copiedAtKillMiB = Math.round((grown / MiB) * 10) / 10;
      stats.commandDoneBeforeKill = exited === undefined ? 'no' : `exit ${exited}`;
      const doneBeforeKill = exited !== undefined;
      await killServer();
      const r = await command;
      if (doneBeforeKill && r.code !== 0) fail(`${args[0]} failed while the server was up: ${describe('cowstack', args, r)}`);
    }
    await killServer();
    stats.loadMs = (killedAt ?? 0) - loadStart;
    const ends = await Promise.all(clients.map((c) => within(c.run.done, 30_000, undefined)));
    for (const [i, end] of ends.entries()) {
      if (end === undefined) fail(`client ${i} did not stop within 30 s of the kill`);
      if (end.end === 'deadline') fail(`client ${i} ran to its deadline: the kill did not reach it`);
    }
    await driving;
    await holder.release();
    if (rec.problems.length > 0) fail(rec.problems.join('\n'));
    // Every command that failed did so because the server died.
    const killMs = killedAt!;
    let acked = 0;
    let inflight = 0;
    for (const { run, volume } of clients) {
      for (const op of run.ops.values()) {
        if (op.ackedMs !== undefined) acked++;
        else inflight++;
        if (op.error !== undefined && op.error.atMs < killMs - 5) fail(`client ${run.config.client} op ${op.op} (${op.kind} [${op.offset}, +${op.length}]${op.fua ? ' FUA' : ''} on ${volume}) failed ${(killMs - op.error.atMs).toFixed(0)} ms before the kill: ${op.error.message}`);
      }
    }
    if (acked === 0) fail('no operation was acknowledged before the kill');
    Object.assign(stats, { acked, inflightAtKill: inflight });

    // Crash recovery itself.
    if (kind === 'recover-crash') {
      const rounds = rng.int(1, 3);
      let landed = 0;
      for (let i = 0; i < rounds; i++) {
        const child = spawnChild(process.execPath, [cliPath, 'recover', store]);
        let stderr = '';
        child.stderr!.setEncoding('utf8').on('data', (d: string) => (stderr += d));
        const exit = new Promise<number | string>((res) => child.once('exit', (code, signal) => res(code ?? signal ?? 'unknown')));
        const at = rng.range(0.25, 1.1) * recoverWallMs;
        const code = await within(exit, at, 'running');
        if (code === 'running') {
          child.kill('SIGKILL');
          await exit;
          landed++;
        } else if (code !== 0) fail(`recover (to be killed) failed on its own: exit ${code}: ${stderr}`);
      }
      stats.recoverKills = `${landed}/${rounds}`;
    }
    const t0 = nowMs();
    const report = await recoverJson(store);
    const wall = nowMs() - t0;
    recoverWallMs = recoverWallMs * 0.7 + wall * 0.3;
    stats.replayed = Number(report.eventsReplayed);
    const cut = report.tailCut as { records: number; kind: string } | null | undefined;
    if (cut !== undefined && cut !== null) stats[killTails.get(cut.kind)!.stat] = cut.records;
    await checkOk(store, 'after recover');
    if (target !== undefined) {
      // How far the copy had got: its Write events are the ones into the commit target (vol2's base,
      // which no client writes), or the 1 MiB copy chunks into vm1's top (client writes are < 70 KiB).
      const layer = kind === 'commit' ? tpl.commitTargetLayer : tpl.flattenTargetLayer;
      const lines = (await cowstackOk(['journal', 'inspect', store, '--type', 'Write', '--json'], { timeoutMs: commandTimeoutMs })).stdout.split('\n');
      let copyEvents = 0;
      for (const line of lines) {
        if (line.length === 0) continue;
        const e = JSON.parse(line) as { layer: number | null; length: number | null };
        if (e.layer === layer && (kind === 'commit' || (e.length ?? 0) > 128 * 1024)) copyEvents++;
      }
      stats.copyEventsAtKill = copyEvents;
    }

    // Read everything back through a fresh server.
    served2 = await startServe(store);
    const ls = JSON.parse((await cowstackOk(['ls', store, '--json'])).stdout) as LsOutput;
    const models = buildModels(tpl, regions, clients);
    const check = (model: VolumeModel, bytes: Buffer, what: string): void => checkVolume(model, bytes, what, seed, blockSize);

    const volumeNames = ls.volumes.map((v) => v.name).sort();
    const snapshotRefs = ls.snapshots.map((s) => `${s.volume}@${s.name}`).sort();
    const expectedVolumes = new Set<string>(modelVolumes);
    for (const c of rec.clones) if (c.outcome === 'ok') expectedVolumes.add(c.name);
    for (const v of expectedVolumes) if (!volumeNames.includes(v)) fail(`volume ${v} is missing after recovery (volumes: ${volumeNames.join(', ')})`);
    for (const v of volumeNames) if (!expectedVolumes.has(v) && !rec.clones.some((c) => c.name === v)) fail(`volume ${v} appeared from nowhere`);
    const expectedSnaps = new Set(['default@base', ...rec.snapshots.filter((s) => s.outcome === 'ok').map((s) => `${s.volume}@${s.name}`)]);
    for (const s of expectedSnaps) if (!snapshotRefs.includes(s)) fail(`snapshot ${s} is missing after recovery (snapshots: ${snapshotRefs.join(', ')})`);
    for (const s of snapshotRefs) if (!expectedSnaps.has(s) && !rec.snapshots.some((r) => `${r.volume}@${r.name}` === s)) fail(`snapshot ${s} appeared from nowhere`);

    const exports = await readExports(served2.socket, [...volumeNames, ...snapshotRefs]);
    for (const name of modelVolumes) check(models.get(name)!, exports.get(name)!, `volume ${name}`);
    if (!exports.get('default@base')!.equals(tpl.initial.default)) fail('snapshot default@base changed');
    let snapshotsChecked = 0;
    for (const snap of rec.snapshots) {
      const ref = `${snap.volume}@${snap.name}`;
      const bytes = exports.get(ref);
      if (bytes === undefined) continue; // a killed command that did not take effect
      checkSnapshot(models.get(snap.volume)!, snap, bytes, seed, blockSize);
      snapshotsChecked++;
    }
    for (const clone of rec.clones) {
      const bytes = exports.get(clone.name);
      if (bytes === undefined) continue;
      const source = exports.get(clone.source);
      if (source === undefined || !bytes.equals(source)) fail(`clone ${clone.name} does not equal its snapshot ${clone.source}`);
    }
    Object.assign(stats, { snapshots: snapshotsChecked, clones: rec.clones.filter((c) => exports.has(c.name)).length });

    // commit / flatten: the crash left the volume's content alone; now the command completes.
    if (target !== undefined) {
      const before = ls.volumes.find((v) => v.name === target)!.stack.length;
      stats.completedBeforeKill = before === 1 ? 'yes' : 'no';
      const args = kind === 'commit' ? ['commit', store, 'vol2', '--json'] : ['flatten', store, 'vm1', '--json'];
      const r = await cowstack(args, { timeoutMs: commandTimeoutMs });
      if (before === 1 && kind === 'commit') {
        if (r.code === 0) fail(`commit of vol2 after it completed should have nothing below it to commit into: ${r.stdout}`);
      } else if (r.code !== 0) fail(`${args[0]} after recovery failed: ${describe('cowstack', args, r)}`);
      const after = (JSON.parse((await cowstackOk(['ls', store, '--json'])).stdout) as LsOutput).volumes.find((v) => v.name === target)!;
      if (after.stack.length !== 1) fail(`${target} still has ${after.stack.length} layers after ${args[0]}: ${after.stack.join(', ')}`);
      const again = await readExports(served2.socket, [target, ...snapshotRefs.filter((s) => s.startsWith(`${target}@`) || s === 'default@base')]);
      check(models.get(target)!, again.get(target)!, `volume ${target} after ${args[0]} ran again`);
      if (!again.get('default@base')!.equals(tpl.initial.default)) fail(`snapshot default@base changed after ${args[0]}`);
      await served2.stop();
      served2 = undefined;
      await checkOk(store, `after ${args[0]} ran again`);
    } else {
      await served2.stop();
      served2 = undefined;
    }
    rmSync(dir, { recursive: true, force: true });
    return { index, kind, seed, ok: true, stats, ms: nowMs() - started };
  } catch (err) {
    let message = err instanceof TrialFailure ? err.message : `harness error: ${(err as Error).stack ?? String(err)}`;
    for (const [what, s] of [['server', served], ['second server', served2]] as const) {
      const lines = s?.stderr().trimEnd().split('\n') ?? [];
      if (lines.length > 0) message += `\n${what} stderr (last lines):\n    ${lines.slice(process.env.COWSTACK_TORTURE_VERBOSE ? -400 : -15).join('\n    ')}`;
    }
    return { index, kind, seed, ok: false, error: message, dir, stats, ms: nowMs() - started };
  } finally {
    await served?.kill().catch(() => undefined);
    await served2?.kill().catch(() => undefined);
    await killChildren();
  }
}

// ---------------------------------------------------------------------------------------------
// the run

export async function runCrashTorture(opts: TortureOptions): Promise<TortureResult> {
  const log = opts.log ?? ((line: string) => console.log(line));
  const kinds = opts.kinds ?? allKinds;
  const results: TrialResult[] = [];
  // The kind schedule: half plain load kills, then recover crashes, commit and flatten.
  const schedule: TrialKind[] = ['load', 'load', 'load', 'load', 'recover-crash', 'recover-crash', 'commit', 'flatten'].filter((k) => kinds.includes(k as TrialKind)) as TrialKind[];
  if (schedule.length === 0) throw new Error(`no trial kinds selected from ${kinds.join(', ')}`);
  for (let i = 0; i < opts.trials; i++) {
    const kind = schedule[i % schedule.length];
    const seed = (opts.seed + Math.imul(i + 1, 0x9e3779b1)) >>> 0;
    const r = await runTrial(i, kind, seed, opts);
    results.push(r);
    const stats = Object.entries(r.stats)
      .map(([k, v]) => `${k}=${v}`)
      .join(' ');
    log(`trial ${i + 1}/${opts.trials} ${kind} seed=${seed}: ${r.ok ? 'ok' : 'FAILED'} in ${(r.ms / 1000).toFixed(1)} s (${stats})`);
    if (!r.ok) log(`  ${r.error!.split('\n').join('\n  ')}\n  store kept at ${r.dir}`);
  }
  const passed = results.filter((r) => r.ok).length;
  const totals: Record<string, number> = {};
  for (const r of results) {
    totals[`trials:${r.kind}`] = (totals[`trials:${r.kind}`] ?? 0) + 1;
    for (const key of ['acked', 'inflightAtKill', 'snapshots', 'clones', 'replayed'] as const) {
      const v = r.stats[key];
      if (typeof v === 'number') totals[key] = (totals[key] ?? 0) + v;
    }
    for (const { stat, total } of killTails.values()) if (typeof r.stats[stat] === 'number') totals[total] = (totals[total] ?? 0) + 1;
    if (typeof r.stats.recoverKills === 'string') {
      const [landed, rounds] = r.stats.recoverKills.split('/').map(Number);
      totals.recoverKillsLanded = (totals.recoverKillsLanded ?? 0) + landed;
      totals.recoverKillRounds = (totals.recoverKillRounds ?? 0) + rounds;
    }
    if (r.stats.completedBeforeKill === 'no' && Number(r.stats.copyEventsAtKill) > 0) totals[`${r.kind}KilledWhileCopying`] = (totals[`${r.kind}KilledWhileCopying`] ?? 0) + 1;
    if (r.stats.completedBeforeKill === 'no' && Number(r.stats.copyEventsAtKill) === 0) totals[`${r.kind}KilledBeforeCopying`] = (totals[`${r.kind}KilledBeforeCopying`] ?? 0) + 1;
    if (r.stats.completedBeforeKill === 'yes') totals[`${r.kind}CompletedBeforeKill`] = (totals[`${r.kind}CompletedBeforeKill`] ?? 0) + 1;
  }
  return { passed, failed: results.length - passed, trials: results, totals };
}

function argValue(args: string[], name: string): string | undefined {
  const i = args.indexOf(name);
  return i === -1 ? undefined : args[i + 1];
}

export async function main(argv: string[] = process.argv.slice(2)): Promise<number> {
  const full = argv.includes('--full');
  const trials = Number(argValue(argv, '--trials') ?? (full ? 200 : (process.env.COWSTACK_CRASH_TRIALS ?? 20)));
  const seed = Number(argValue(argv, '--seed') ?? Math.floor(Math.random() * 2 ** 31));
  const kinds = argValue(argv, '--kinds')?.split(',') as TrialKind[] | undefined;
  console.log(`crash torture: ${trials} trials, seed ${seed}${kinds ? `, kinds ${kinds.join(',')}` : ''}`);
  const started = nowMs();
  const result = await runCrashTorture({ trials, seed, loadMs: [300, 1500], kinds });
  console.log(`totals: ${Object.entries(result.totals).map(([k, v]) => `${k}=${v}`).join(' ')}`);
  console.log(`time: ${((nowMs() - started) / 1000).toFixed(0)} s`);
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
