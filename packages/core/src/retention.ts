/**
 * Retention: how much write-payload history the journal keeps beyond what crash recovery needs.
 * Recovery needs the payloads after the oldest kept checkpoint; time travel (point-in-time exports,
 * retroactive snapshots) needs older ones. The policy is stored in the journal's metadata so it
 * survives restarts; it is applied at every checkpoint.
 *
 *   checkpoint   keep only what recovery needs (the default)
 *   all          keep every payload
 *   24h, 30m     keep payloads of the last 24 hours / 30 minutes (s, m, h, d)
 *   10G, 512M    keep the newest 10 GiB / 512 MiB of payloads (whole payload-log segments)
 *   seq:N, N     keep payloads from seq N on
 */
import { StoreError } from './errors.js';

export type RetentionPolicy =
  | { readonly kind: 'checkpoint' }
  | { readonly kind: 'all' }
  | { readonly kind: 'time'; readonly ms: number }
  | { readonly kind: 'bytes'; readonly bytes: number }
  | { readonly kind: 'seq'; readonly seq: number };

const timeUnitsMs: Record<string, number> = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };
const byteUnits: Record<string, number> = { K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 };

export function parseRetention(text: string): RetentionPolicy {
  if (text === 'checkpoint' || text === 'all') return { kind: text };
  const time = /^(\d+)([smhd])$/.exec(text);
  if (time !== null) return { kind: 'time', ms: Number(time[1]) * timeUnitsMs[time[2]] };
  const bytes = /^(\d+)([KMGT])(?:i?B)?$/i.exec(text);
  if (bytes !== null) return { kind: 'bytes', bytes: Number(bytes[1]) * byteUnits[bytes[2].toUpperCase()] };
  const seq = /^(?:seq:)?(\d+)$/.exec(text);
  if (seq !== null) return { kind: 'seq', seq: Number(seq[1]) };
  throw new StoreError('EINVAL', `${JSON.stringify(text)} is not a retention policy (checkpoint, all, 24h, 10G, seq:N or N)`);
}

export function describeRetention(policy: RetentionPolicy): string {
  switch (policy.kind) {
    case 'checkpoint':
      return 'checkpoint (only what crash recovery needs)';
    case 'all':
      return 'all (every payload)';
    case 'time':
      return `payloads of the last ${policy.ms / 1000} s`;
    case 'bytes':
      return `the newest ${policy.bytes} bytes of payloads`;
    case 'seq':
      return `payloads from seq ${policy.seq}`;
  }
}
