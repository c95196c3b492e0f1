/**
 * Progress bars for long work (import, export, recover, check, commit, flatten), drawn with
 * cli-progress on stderr, only when stderr is a terminal and --json is not given.
 */
import cliProgress from 'cli-progress';
import type { ProgressCallback } from '@cowstack/core';

export interface Progress {
  readonly callback: ProgressCallback | undefined;
  stop(): void;
}

const phaseLabels: Record<string, string> = {
  replay: 'replaying journal',
  import: 'importing',
  export: 'exporting',
  commit: 'committing',
  flatten: 'flattening',
  'check-journal': 'checking journal',
  'check-data': 'checking data',
};

export function progress(enabled: boolean): Progress {
  if (!enabled || !process.stderr.isTTY) return { callback: undefined, stop: () => {} };
  let bar: cliProgress.SingleBar | undefined;
  let phase = '';
  const stop = (): void => {
    bar?.stop();
    bar = undefined;
  };
  return {
    callback: (p, done, total) => {
      if (p !== phase || bar === undefined) {
        stop();
        phase = p;
        bar = new cliProgress.SingleBar(
          { format: `${(phaseLabels[p] ?? p).padEnd(18)} [{bar}] {percentage}% | {value}/{total} | ETA {eta_formatted}`, stream: process.stderr, hideCursor: true, clearOnComplete: false },
          cliProgress.Presets.shades_classic,
        );
        bar.start(Math.max(total, 1), 0);
      }
      bar.setTotal(Math.max(total, 1));
      bar.update(Math.min(done, Math.max(total, 1)));
    },
    stop,
  };
}
