/**
 * Store-level commands: init, serve, recover, check. recover and check need the store to themselves
 * (stop `cowstack serve` first); init creates a store with one volume.
 */
import { resolve } from 'node:path';
import { checkStore, limits, recoverStore, type RetentionPolicy, Store, StoreError, type BaseSpec } from '@cowstack/core';
import { x509CredentialsFromDir, type TlsOptions } from '@cowstack/nbd';
import { type Command, Option } from 'commander';
import { blockSizeArg, example, hostPortArg, modeArg, portArg, positiveIntArg, ProblemsFound, retentionArg, sizeArg } from '../command-helpers.js';
import { readServeRecord } from '../control.js';
import { describeSealDamage, describeTailCut, openNotes } from '../open-notes.js';
import { Output } from '../output.js';
import { progress } from '../progress.js';
import { serve } from '../serve.js';
import { formatSize } from '../sizes.js';

function lockedMessage(dir: string, what: string): StoreError {
  const record = readServeRecord(dir);
  const holder = record ? `cowstack serve (pid ${record.pid})` : 'another process';
  return new StoreError('ELOCKED', `store ${dir} is in use by ${holder}; stop it before running ${what}`);
}

/** The serve command's --tls* flags as NbdServer TLS options; a bad combination is a usage error (exit 2). */
function tlsOptions(command: Command, opts: { tls: 'off' | 'on' | 'require'; tlsCertificates?: string; tlsPsk?: string; tlsVerifyPeer?: boolean }): TlsOptions {
  const given = opts.tlsCertificates !== undefined ? '--tls-certificates' : opts.tlsPsk !== undefined ? '--tls-psk' : undefined;
  if (opts.tlsVerifyPeer === true && opts.tlsCertificates === undefined) command.error('error: --tls-verify-peer needs --tls-certificates', { exitCode: 2 });
  if (opts.tls === 'off') {
    if (given !== undefined) command.error(`error: ${given} needs --tls on or --tls require`, { exitCode: 2 });
    return { mode: 'off' };
  }
  if (opts.tlsPsk !== undefined) return { mode: opts.tls, credentials: { kind: 'psk', pskFile: resolve(opts.tlsPsk) } };
  if (opts.tlsCertificates !== undefined) return { mode: opts.tls, credentials: x509CredentialsFromDir(resolve(opts.tlsCertificates), { verifyPeer: opts.tlsVerifyPeer === true }) };
  return command.error(`error: --tls ${opts.tls} needs --tls-certificates DIR or --tls-psk FILE`, { exitCode: 2 });
}

export function registerStoreCommands(root: Command): void {
  example(
    root
      .command('init')
      .description('create a store with one volume named "default"')
      .argument('<store>', 'store directory to create')
      .option('--size <size>', 'volume size (e.g. 10G); taken from the image with --base/--import', sizeArg)
      .option('--block-size <bytes>', 'block size: a power of two from 512 to 65536', blockSizeArg, limits.defaultBlockSizeBytes)
      .addOption(new Option('--base <image>', 'raw image or block device to use read-only as the base').conflicts('import'))
      .option('--import <image>', 'raw image to copy into the store as the base')
      .option('--volume <name>', 'name of the volume to create', 'default')
      .option('--retain <policy>', 'write history kept in the journal: checkpoint (default), all, 24h, 10G, or seq:N (or just N)', retentionArg)
      .option('--json', 'print the result as JSON')
      .action(async (dirArg: string, opts: { size?: number; blockSize: number; base?: string; import?: string; volume: string; retain?: RetentionPolicy; json?: boolean }) => {
        const out = new Output(opts.json === true);
        const bar = progress(!out.json);
        const base: BaseSpec = opts.base ? { kind: 'external', path: opts.base } : opts.import ? { kind: 'import', path: opts.import } : { kind: 'zero' };
        if (base.kind === 'zero' && opts.size === undefined) throw new StoreError('EINVAL', 'init needs --size (or --base/--import to take the size from an image)');
        const store = await Store.create(resolve(dirArg), { sizeBytes: opts.size, blockSizeBytes: opts.blockSize, base, volume: opts.volume, retain: opts.retain, onProgress: bar.callback }).finally(() => bar.stop());
        const info = { store: store.dir, blockSizeBytes: store.blockSizeBytes, volumes: store.volumes(), layers: store.layers() };
        await store.close();
        const v = info.volumes[0];
        out.result(info, () => `created store ${info.store}: volume ${v.name}, ${formatSize(v.sizeBytes)}, block size ${info.blockSizeBytes}, base ${base.kind === 'zero' ? 'zeros' : base.kind === 'external' ? `image ${resolve(base.path)} (read-only)` : `imported from ${resolve(base.path)}`}`);
      }),
    'cowstack init /srv/cow --size 20G',
    'cowstack init /srv/cow --base /images/debian-12.raw',
  );

  example(
    root
      .command('serve')
      .description('serve every volume (read-write) and snapshot (read-only) over NBD until SIGINT/SIGTERM')
      .argument('<store>', 'store directory')
      .option('--socket <path>', 'listen on this unix socket (TCP then only with --port)')
      .option('--socket-mode <mode>', 'permissions of the unix socket, octal', modeArg, 0o600)
      .option('--port <port>', 'TCP port (default 10809 when no --socket is given)', portArg)
      .option('--bind <addr>', 'TCP address to listen on', '127.0.0.1')
      .option('--metrics <addr:port>', 'serve Prometheus metrics at http://ADDR:PORT/metrics', hostPortArg)
      .option('--max-connections <n>', 'most NBD connections at once', positiveIntArg)
      .addOption(new Option('--tls <mode>', 'TLS through NBD STARTTLS: off, on (clients choose) or require (no export is listed or served before TLS)').choices(['off', 'on', 'require']).default('off'))
      .option('--tls-certificates <dir>', 'x509 credentials: DIR holds ca-cert.pem, server-cert.pem, server-key.pem (and optionally ca-crl.pem), as for qemu and nbdkit')
      .addOption(new Option('--tls-psk <file>', 'pre-shared keys instead: psktool format, one username:hexkey line per client').conflicts('tlsCertificates'))
      .option('--tls-verify-peer', 'with --tls-certificates: require a client certificate signed by ca-cert.pem')
      .option('--retain <policy>', 'set the journal\'s write-history retention first (see `cowstack retain`)', retentionArg)
      .option('--checkpoint-every <size>', `write a checkpoint after this much write data (default ${formatSize(limits.checkpointEveryPayloadBytes)}): the journal keeps the writes of about two intervals, and crash recovery re-applies at most one`, sizeArg)
      .option('-v, --verbose', 'log every connection, protocol event and checkpoint')
      .action(async (dirArg: string, opts: { socket?: string; socketMode: number; port?: number; bind: string; metrics?: { host: string; port: number }; maxConnections?: number; tls: 'off' | 'on' | 'require'; tlsCertificates?: string; tlsPsk?: string; tlsVerifyPeer?: boolean; retain?: RetentionPolicy; checkpointEvery?: number; verbose?: boolean }, command: Command) => {
        const dir = resolve(dirArg);
        const tls = tlsOptions(command, opts);
        const stopSignal = new Promise<string>((resolveSignal) => {
          const stop = (signal: string): void => {
            resolveSignal(signal);
            process.once(signal as NodeJS.Signals, () => {
              process.stderr.write('cowstack: second signal, exiting without a checkpoint (the journal holds everything)\n');
              process.exit(130);
            });
          };
          process.once('SIGINT', () => stop('SIGINT'));
          process.once('SIGTERM', () => stop('SIGTERM'));
        });
        const bar = progress(true);
        try {
          await serve(dir, {
            socket: opts.socket !== undefined ? resolve(opts.socket) : undefined,
            socketMode: opts.socketMode,
            port: opts.port ?? (opts.socket === undefined ? 10809 : undefined),
            bind: opts.bind,
            metrics: opts.metrics,
            maxConnections: opts.maxConnections,
            tls,
            retain: opts.retain,
            checkpointEveryBytes: opts.checkpointEvery,
            verbose: opts.verbose === true,
            log: (line) => process.stderr.write(`cowstack: ${line}\n`),
            stopSignal,
            onProgress: bar.callback,
          });
        } catch (err) {
          if (err instanceof StoreError && err.code === 'ELOCKED') throw lockedMessage(dir, 'another serve');
          throw err;
        } finally {
          bar.stop();
        }
      }),
    'cowstack serve /srv/cow                         # nbd://127.0.0.1:10809/default',
    'cowstack serve /srv/cow --socket /run/cow.sock  # nbd+unix:///default?socket=/run/cow.sock',
    'cowstack serve /srv/cow --bind 0.0.0.0 --tls require --tls-certificates /etc/pki/cowstack  # nbds://HOST:10809/default',
  );

  example(
    root
      .command('recover')
      .description('replay the journal after a crash: re-apply journaled writes to the layer files and write a checkpoint')
      .argument('<store>', 'store directory')
      .option('--force', 'salvage a store whose journal is damaged: write damaged write payloads back from the layer files that still hold their blocks, set damaged LevelDB tables aside in journal/damaged/ and write back what they still hold, then cut the journal at the first damaged or missing record that no checkpoint before it covers (it and every later record are lost) and recover what comes before; records lost where a checkpoint holds their state (a missing or damaged frame) are recorded as accepted, and check then reports them as notes')
      .option('--json', 'print the report as JSON')
      .action(async (dirArg: string, opts: { force?: boolean; json?: boolean }) => {
        const dir = resolve(dirArg);
        const out = new Output(opts.json === true);
        const bar = progress(!out.json);
        const report = await recoverStore(dir, { onProgress: bar.callback, force: opts.force === true })
          .catch((err: unknown) => {
            throw err instanceof StoreError && err.code === 'ELOCKED' ? lockedMessage(dir, 'recover') : err;
          })
          .finally(() => bar.stop());
        out.result(report, () =>
          [
            `recovered ${dir}`,
            `  checkpoint used     seq ${report.checkpointSeq}${report.checkpointsSkipped.length > 0 ? ` (skipped damaged: ${report.checkpointsSkipped.map((s) => s.seq).join(', ')})` : ''}`,
            `  events replayed     ${report.eventsReplayed} (to seq ${report.lastSeq})`,
            `  writes re-applied   ${report.writesReapplied}`,
            `  orphan files        ${report.orphanFilesRemoved} removed`,
            `  time                ${(report.durationMs / 1000).toFixed(3)} s (${Math.round(report.eventsPerSecond).toLocaleString('en-US')} events/s)`,
            `  checkpoint written  ${report.checkpointWritten ? `yes, seq ${report.lastSeq}` : 'no (nothing to replay)'}`,
            ...(report.tailCut !== undefined ? [`  torn tail cut       ${describeTailCut(report.tailCut)}`] : []),
            ...(report.sealDamage !== undefined ? [`  seal rewritten      ${describeSealDamage(report.sealDamage)}`] : []),
            ...report.payloadsRepaired.map((r) => `  PAYLOAD REPAIRED    seq ${r.seq}: written back from layer ${r.layerId} (blocks ${r.firstBlock}..${r.firstBlock + r.blocks - 1}), nothing lost`),
            ...report.payloadsUnrepaired.map((u) => `  PAYLOAD DAMAGED     seq ${u.seq}: cannot be rebuilt: ${u.reason}`),
            ...report.lossesRecorded.map((l) => `  LOSS RECORDED       ${l.payloadOnly === true ? `the payload of write seq ${l.fromSeq}` : `records seq ${l.fromSeq}..${l.toSeq}`}: ${l.reason}; check reports it as a note from now on`),
            ...(report.salvage !== undefined
              ? [
                  report.salvage.recordsDiscarded === 0
                    ? `  SALVAGED            no record discarded (${report.salvage.reason})`
                    : `  SALVAGED            discarded ${report.salvage.recordsDiscarded} record(s) from seq ${report.salvage.fromSeq} (${report.salvage.reason}); re-applied ${report.salvage.writesReapplied} kept write(s)`,
                ]
              : []),
          ].join('\n'),
        );
      }),
    'cowstack recover /srv/cow',
    'cowstack recover /srv/cow --force   # after check named journal damage: keep everything before it',
  );

  example(
    root
      .command('check')
      .description('verify the journal chain, that replay equals the stored projection, and every data block against its CRC; exit 1 on damage')
      .argument('<store>', 'store directory')
      .option('--json', 'print the report as JSON')
      .action(async (dirArg: string, opts: { json?: boolean }) => {
        const dir = resolve(dirArg);
        const out = new Output(opts.json === true);
        const bar = progress(!out.json);
        const report = await checkStore(dir, { onProgress: bar.callback })
          .catch((err: unknown) => {
            throw err instanceof StoreError && err.code === 'ELOCKED' ? lockedMessage(dir, 'check') : err;
          })
          .finally(() => bar.stop());
        out.result(report, () => {
          const head = report.ok
            ? `check ${dir}: ok (${report.eventsChecked} events, ${report.dataBlocksChecked} data blocks verified in ${(report.durationMs / 1000).toFixed(2)} s)`
            : `check ${dir}: ${report.problems.length} problem${report.problems.length > 1 ? 's' : ''} found`;
          const notes = [...(report.open === undefined ? [] : openNotes(report.open)), ...report.notes];
          return [head, ...report.problems.map((p) => `  ${p.kind}: ${p.message}`), ...notes.map((n) => `  note: ${n}`)].join('\n');
        });
        if (!report.ok) throw new ProblemsFound();
      }),
    'cowstack check /srv/cow && echo healthy',
  );
}
