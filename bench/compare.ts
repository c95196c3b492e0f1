/**
 * Side-by-side NBD benchmark (not a test): the same fio jobs against cowstack and the reference
 * servers, each on a unix socket over the same data, in one run, so ratios compare like with like.
 *
 * Servers: nbdkit file; nbdkit --filter=cow file; qemu-nbd raw; qemu-nbd on a 4-deep qcow2 backing
 * chain; cowstack at stack depth 1, 4 and 16. The data: DATA_MIB MiB in 64 KiB chunks, chunk c filled
 * with byte (c % 251) + 1; in a stack of depth N, chunk c lives in layer c % N.
 *
 * Jobs (fio --ioengine=nbd, one connection): 4k randread qd16, 1M seqread qd8, 4k randwrite qd16, 1M
 * seqwrite qd8; plus durable 4k writes with FUA and 64 in flight (bench/durable-writes.py, because
 * fio's nbd engine cannot send FUA). Reads run before writes on every server; each write job runs on
 * a server of its own over a fresh copy. Each cell is the median of REPEATS runs of RUNTIME seconds;
 * the servers take turns, one run each per round, so all of them meet the machine's drift alike.
 * Results print as a table and go to bench/results/compare.json (with every run, not only medians).
 *
 * Environment: BENCH_DATA_MIB (1024), BENCH_RUNTIME_S (8), BENCH_REPEATS (3), BENCH_ONLY (comma list
 * of server names), BENCH_DIR (work directory, default .bench-data in the repository).
 */
import { type ChildProcess, spawn, spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, openSync, readFileSync, rmSync, writeFileSync, writeSync, closeSync } from 'node:fs';
import { dirname, join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { Store } from '@cowstack/core';

const root = join(dirname(fileURLToPath(import.meta.url)), '..');
const mib = 1024 * 1024;
const dataMiB = Number(process.env.BENCH_DATA_MIB ?? 1024);
const dataBytes = dataMiB * mib;
const runtimeS = Number(process.env.BENCH_RUNTIME_S ?? 8);
const repeats = Number(process.env.BENCH_REPEATS ?? 3);
const only = process.env.BENCH_ONLY?.split(',');
const work = process.env.BENCH_DIR ?? join(root, '.bench-data');
const chunkBytes = 64 * 1024;
const cli = join(root, 'packages/cli/bin/cowstack.js');

interface ServerSpec {
  readonly name: string;
  readonly start: (socket: string) => ChildProcess;
}

interface Job {
  readonly name: string;
  readonly rw: string;
  readonly bs: string;
  readonly iodepth: number;
  readonly kind: 'read' | 'write' | 'durable';
}

const jobs: Job[] = [
  { name: '4k randread qd16', rw: 'randread', bs: '4k', iodepth: 16, kind: 'read' },
  { name: '1M seqread qd8', rw: 'read', bs: '1M', iodepth: 8, kind: 'read' },
  { name: '4k randwrite qd16', rw: 'randwrite', bs: '4k', iodepth: 16, kind: 'write' },
  { name: '1M seqwrite qd8', rw: 'write', bs: '1M', iodepth: 8, kind: 'write' },
  { name: '4k FUA write qd64', rw: 'randwrite', bs: '4k', iodepth: 64, kind: 'durable' },
];

interface Cell {
  readonly iops: number;
  readonly mibPerSecond: number;
  readonly p99Ms: number;
}

function fillByte(chunk: number): number {
  return (chunk % 251) + 1;
}

function sh(cmd: string, args: string[], input?: string): string {
  const r = spawnSync(cmd, args, { input, encoding: 'utf8', maxBuffer: 64 * mib });
  if (r.status !== 0) throw new Error(`${cmd} ${args.join(' ')} failed: ${r.stderr}`);
  return r.stdout;
}

function prepareRaw(path: string): void {
  if (existsSync(path)) return;
  const fd = openSync(path, 'w');
  const piece = Buffer.allocUnsafe(64 * mib);
  for (let at = 0; at < dataBytes; at += piece.length) {
    for (let c = 0; c < piece.length / chunkBytes; c++) piece.fill(fillByte((at + c * chunkBytes) / chunkBytes), c * chunkBytes, (c + 1) * chunkBytes);
    writeSync(fd, piece, 0, Math.min(piece.length, dataBytes - at), at);
  }
  closeSync(fd);
}

function prepareQcow2Chain(dir: string): string {
  const files = [0, 1, 2, 3].map((k) => join(dir, `layer${k}.qcow2`));
  if (existsSync(files[3])) return files[3];
  sh('qemu-img', ['create', '-q', '-f', 'qcow2', files[0], String(dataBytes)]);
  for (let k = 1; k < 4; k++) sh('qemu-img', ['create', '-q', '-f', 'qcow2', '-b', files[k - 1], '-F', 'qcow2', files[k]]);
  for (let k = 0; k < 4; k++) {
    const commands: string[] = [];
    for (let c = k; c < dataBytes / chunkBytes; c += 4) commands.push(`write -q -P ${fillByte(c)} ${c * chunkBytes} ${chunkBytes}`);
    sh('qemu-io', ['-f', 'qcow2', files[k]], `${commands.join('\n')}\nquit\n`);
  }
  return files[3];
}

/** Written beside a prepared store once it is complete; a store without it (or an older one) is rebuilt. */
const preparedMark = 'settled after import, v2';

async function prepareCowstack(dir: string, depth: number): Promise<void> {
  const mark = `${dir}.prepared`;
  if (existsSync(mark) && readFileSync(mark, 'utf8') === preparedMark) return;
  rmSync(dir, { recursive: true, force: true });
  const store = await Store.create(dir, { sizeBytes: dataBytes });
  const chunks = dataBytes / chunkBytes;
  for (let layer = 0; layer < depth; layer++) {
    const pending: Promise<void>[] = [];
    for (let c = layer; c < chunks; c += depth) {
      pending.push(store.writeVolume('default', c * chunkBytes, Buffer.alloc(chunkBytes, fillByte(c)), false));
      if (pending.length >= 64) await Promise.all(pending.splice(0));
    }
    await Promise.all(pending);
    if (layer < depth - 1) await store.snapshot('default');
  }
  // Settle the store as one in service is: a checkpoint after the import, then the closing one, so
  // retention retires the import's payload segments and the store keeps them as spares (a store
  // fresh from an import has none until its second checkpoint). Two data-free events bound them.
  await store.createVolume('bench-settle', 4096);
  await store.checkpoint();
  await store.deleteVolume('bench-settle');
  await store.close();
  writeFileSync(mark, preparedMark);
}

function waitForSocket(path: string, proc: ChildProcess): Promise<void> {
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const poll = (): void => {
      if (existsSync(path)) return void setTimeout(resolve, 200);
      if (proc.exitCode !== null) return reject(new Error(`server exited with ${proc.exitCode}`));
      if (Date.now() - started > 60_000) return reject(new Error(`no socket ${path} after 60 s`));
      setTimeout(poll, 50);
    };
    poll();
  });
}

async function stop(proc: ChildProcess): Promise<void> {
  if (proc.exitCode !== null) return;
  const exited = new Promise<void>((r) => proc.once('exit', () => r()));
  proc.kill('SIGTERM');
  const timer = setTimeout(() => proc.kill('SIGKILL'), 30_000);
  await exited;
  clearTimeout(timer);
}

function runFio(uri: string, job: Job, outFile: string): Cell {
  sh('fio', [
    '--name=bench',
    '--ioengine=nbd',
    `--uri=${uri}`,
    `--rw=${job.rw}`,
    `--bs=${job.bs}`,
    `--iodepth=${job.iodepth}`,
    `--size=${dataBytes}`,
    '--time_based',
    `--runtime=${runtimeS}`,
    '--norandommap',
    '--randrepeat=0',
    '--output-format=json',
    `--output=${outFile}`,
  ]);
  const result = JSON.parse(readFileSync(outFile, 'utf8')) as { jobs: Array<Record<string, { iops: number; bw_bytes: number; clat_ns: { percentile?: Record<string, number> } }>> };
  const side = result.jobs[0][job.kind === 'read' ? 'read' : 'write'];
  return { iops: side.iops, mibPerSecond: side.bw_bytes / mib, p99Ms: (side.clat_ns.percentile?.['99.000000'] ?? 0) / 1e6 };
}

function runDurable(uri: string): Cell {
  const out = sh('/usr/bin/python3', [join(root, 'bench/durable-writes.py'), uri, String(runtimeS), '64', String(dataBytes)]);
  const r = JSON.parse(out.trim().split('\n').pop()!) as { iops: number; p99_ms: number };
  return { iops: r.iops, mibPerSecond: (r.iops * 4096) / mib, p99Ms: r.p99_ms };
}

function median(cells: Cell[]): Cell {
  const sorted = [...cells].sort((a, b) => a.iops - b.iops);
  return sorted[Math.floor(sorted.length / 2)];
}

/** Per server and job: the median cell, and every run in order (run r of each server in round r). */
export interface Compared {
  readonly medians: Record<string, Record<string, Cell>>;
  readonly runs: Record<string, Record<string, Cell[]>>;
}

export async function compare(): Promise<Compared> {
  mkdirSync(work, { recursive: true });
  const raw = join(work, 'data.raw');
  console.error(`bench: preparing ${dataMiB} MiB of data in ${work} (reused between runs)`);
  prepareRaw(raw);
  const qcow2Top = prepareQcow2Chain(work);
  for (const depth of [1, 4, 16]) await prepareCowstack(join(work, `cowstack-depth${depth}`), depth);

  // Write jobs change the data; every run starts servers on fresh copies of what they write to.
  const scratch = join(work, 'scratch');
  const fresh = (source: string): string => {
    rmSync(scratch, { recursive: true, force: true });
    mkdirSync(scratch, { recursive: true });
    const target = join(scratch, source.split('/').pop()!);
    sh('cp', ['-a', '--reflink=auto', source, target]);
    // Start every server with no copy still being written back: a gigabyte of dirty pages flushing
    // under a write job throttles whichever server runs next.
    sh('sync', []);
    return target;
  };
  const servers: ServerSpec[] = [
    { name: 'nbdkit file', start: (s: string) => spawn('nbdkit', ['-f', '-U', s, 'file', fresh(raw)], { stdio: 'ignore' }) },
    { name: 'nbdkit cow', start: (s: string) => spawn('nbdkit', ['-f', '-U', s, '--filter=cow', 'file', raw], { stdio: 'ignore' }) },
    { name: 'qemu-nbd raw', start: (s: string) => spawn('qemu-nbd', ['-k', s, '-f', 'raw', '-t', '--cache=writeback', '--aio=threads', fresh(raw)], { stdio: 'ignore' }) },
    {
      name: 'qemu-nbd qcow2 x4',
      // Writes go to the top overlay: serve a copy of it (its backing chain is only read).
      start: (s: string) => spawn('qemu-nbd', ['-k', s, '-f', 'qcow2', '-t', '--cache=writeback', '--aio=threads', fresh(qcow2Top)], { stdio: 'ignore' }),
    },
    ...[1, 4, 16].map((depth) => ({
      name: `cowstack depth ${depth}`,
      start: (s: string) => spawn(process.execPath, [cli, 'serve', fresh(join(work, `cowstack-depth${depth}`)), '--socket', s], { stdio: ['ignore', 'ignore', 'inherit'] }),
    })),
  ].filter((s) => only === undefined || only.includes(s.name));

  // Reads first (on the untouched data, one server start per repeat for all read jobs); then each
  // write job on its own server over a fresh copy, so no job pays for the writeback of the one
  // before it (a 1M seqwrite leaves gigabytes of dirty pages that slow the next job's fsyncs).
  // Within a phase the servers take turns, one run each per round: this shared machine's speed
  // drifts by ±20% over minutes, and every server then meets the same drift; run one server's
  // repeats back to back and a ratio between two servers measured minutes apart carries the drift.
  const phases: Job[][] = [jobs.filter((j) => j.kind === 'read'), ...jobs.filter((j) => j.kind !== 'read').map((j) => [j])];
  const samples = new Map<string, Map<string, Cell[]>>(servers.map((s) => [s.name, new Map(jobs.map((j) => [j.name, []]))]));
  for (const phase of phases) {
    for (let r = 0; r < repeats; r++) {
      for (const server of servers) {
        const socket = join(work, 'bench.sock');
        rmSync(socket, { force: true });
        const proc = server.start(socket);
        try {
          await waitForSocket(socket, proc);
          const uri = `nbd+unix:///?socket=${socket}`;
          for (const job of phase) {
            const cell = job.kind === 'durable' ? runDurable(uri) : runFio(uri, job, join(work, 'fio.json'));
            samples.get(server.name)!.get(job.name)!.push(cell);
            console.error(`bench: ${server.name.padEnd(18)} ${job.name.padEnd(18)} run ${r + 1}: ${Math.round(cell.iops)} IOPS, ${cell.mibPerSecond.toFixed(1)} MiB/s, p99 ${cell.p99Ms.toFixed(2)} ms`);
          }
        } finally {
          await stop(proc);
        }
      }
    }
  }
  const medians: Record<string, Record<string, Cell>> = {};
  const runs: Record<string, Record<string, Cell[]>> = {};
  for (const server of servers) {
    medians[server.name] = Object.fromEntries([...samples.get(server.name)!].map(([job, cells]) => [job, median(cells)]));
    runs[server.name] = Object.fromEntries(samples.get(server.name)!);
  }
  rmSync(scratch, { recursive: true, force: true });
  return { medians, runs };
}

export function formatCompare({ medians: results, runs }: Compared): string {
  const names = Object.keys(results);
  const lines: string[] = [];
  lines.push(`| job | ${names.join(' | ')} |`);
  lines.push(`| --- |${names.map(() => ' ---: |').join('')}`);
  for (const job of jobs) {
    const cells = names.map((n) => {
      const c = results[n][job.name];
      return c === undefined ? '-' : `${Math.round(c.iops).toLocaleString('en-US')} IOPS, ${c.mibPerSecond.toFixed(0)} MiB/s, p99 ${c.p99Ms.toFixed(2)} ms`;
    });
    lines.push(`| ${job.name} | ${cells.join(' | ')} |`);
  }
  const refs = names.filter((n) => !n.startsWith('cowstack'));
  const ours = names.filter((n) => n.startsWith('cowstack'));
  if (refs.length > 0 && ours.length > 0) {
    lines.push('');
    lines.push(`| cowstack ÷ reference (IOPS) | ${refs.join(' | ')} |`);
    lines.push(`| --- |${refs.map(() => ' ---: |').join('')}`);
    for (const o of ours) {
      for (const job of jobs) {
        const mine = results[o][job.name];
        const ratios = refs.map((r) => (mine && results[r][job.name] ? `${(mine.iops / results[r][job.name].iops).toFixed(2)}×` : '-'));
        lines.push(`| ${o}: ${job.name} | ${ratios.join(' | ')} |`);
      }
    }
  }
  const base = 'cowstack depth 1';
  const deeper = ours.filter((n) => n !== base);
  if (results[base] !== undefined && deeper.length > 0) {
    // Depth against depth 1: the ratio of the medians, and the runs of each round side by side.
    lines.push('');
    lines.push(`| job | ${deeper.map((n) => `${n.replace('cowstack ', '')} ÷ depth 1 (per round)`).join(' | ')} |`);
    lines.push(`| --- |${deeper.map(() => ' ---: |').join('')}`);
    for (const job of jobs) {
      const cells = deeper.map((n) => {
        const mine = results[n][job.name];
        const one = results[base][job.name];
        if (mine === undefined || one === undefined) return '-';
        const rounds = runs[n][job.name].map((c, r) => `${((100 * c.iops) / runs[base][job.name][r].iops).toFixed(0)}%`);
        return `${((100 * mine.iops) / one.iops).toFixed(1)}% (${rounds.join(', ')})`;
      });
      lines.push(`| ${job.name} | ${cells.join(' | ')} |`);
    }
  }
  return lines.join('\n');
}

if (import.meta.filename === process.argv[1]) {
  const compared = await compare();
  mkdirSync(join(root, 'bench/results'), { recursive: true });
  writeFileSync(join(root, 'bench/results/compare.json'), `${JSON.stringify({ date: new Date().toISOString(), dataMiB, runtimeS, repeats, results: compared.medians, runs: compared.runs }, null, 2)}\n`);
  console.log(formatCompare(compared));
}
