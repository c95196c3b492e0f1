/**
 * @cowstack/journal: a generic durable ordered log on LevelDB. It knows nothing about blocks.
 */
export { Journal } from './journal.js';
export type {
  AppendOptions,
  BatchCommitted,
  JournalRecord,
  JournalStats,
  OpenOptions,
  ReplayOptions,
  TableSalvageReport,
  VerifyProblem,
  VerifyReport,
} from './journal.js';
export type { Checkpoint } from './checkpoint-codec.js';
export { JournalCorruptionError, JournalError, JournalTornTailError } from './errors.js';
export type { CorruptionKind, JournalErrorCode } from './errors.js';
export { journalFormatVersion, maxPayloadBytes } from './limits.js';
