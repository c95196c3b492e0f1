/**
 * Salvage of a journal whose LevelDB files are damaged (for `recover --force`): the part that works
 * on files while the database is closed.
 *
 * The journal refuses to open when a table fails its block checksums or the MANIFEST is damaged
 * (level-tables.ts): the LevelDB inside classic-level could abort the process reading such a table.
 * Salvage, in the caller's hands, goes:
 *   1. here: check every table file in the directory (not only the ones the MANIFEST names: LevelDB's
 *      repair takes them all). Each damaged one is read for what it still holds (the entries of its
 *      data blocks that pass their checksums, see `salvageTable`) and moved into `damaged/` beside
 *      the database, never deleted. The MANIFEST is checked too.
 *   2. LevelDB's own repair rebuilds the MANIFEST from the table and log files left. It reads only
 *      tables that passed the check here, so it cannot meet a block that makes it abort.
 *   3. the journal writes back what the damaged tables still held (`restorable`), and the caller's
 *      usual salvage takes over: a record that is still missing is a gap, named by its seq.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, renameSync } from 'node:fs';
import { join } from 'node:path';
import { checkpointPrefix, metaPrefix, recordPrefix, seqOfKey } from './keys.js';
import { LevelTableDamage, liveTableFiles, type LostBlock, salvageTable, type TableEntry, verifyTable } from './level-tables.js';

/** One damaged table, set aside: what was wrong, where it went, and what it still held. */
export interface SetAsideTable {
  /** The table's file name in the database directory. */
  readonly file: string;
  /** Where it is now, relative to the database directory. */
  readonly movedTo: string;
  /** What the check found wrong first. */
  readonly problem: string;
  readonly dataBlocks: number;
  readonly blocksLost: number;
  /** The key ranges of the lost blocks, in words (or why nothing could be read). */
  readonly lost: readonly string[];
  /** Entries its readable blocks held (before any is found to be needed). */
  readonly entries: readonly TableEntry[];
}

export interface SetAside {
  readonly tables: readonly SetAsideTable[];
  /** What was wrong with the MANIFEST (or CURRENT), if anything: LevelDB's repair rewrites it. */
  readonly manifestProblem: string | undefined;
}

/** The directory, inside the database's, where damaged tables are moved (LevelDB ignores it). */
const damagedDirName = 'damaged';

/** The index's separator after a table's last key may be the next key space's one-byte prefix. */
const spaceEnds: Record<number, string> = { [checkpointPrefix + 1]: 'the last checkpoint', [metaPrefix + 1]: 'the last metadata key', [recordPrefix + 1]: 'the last frame' };

/** A key in words: the journal's key spaces by name and seq (keys.ts), anything else in hex. */
function describeKey(key: Buffer): string {
  if (key.length === 1 && spaceEnds[key[0]] !== undefined) return spaceEnds[key[0]];
  if ((key[0] === recordPrefix || key[0] === checkpointPrefix) && key.length <= 9) {
    // A separator from the index may be a shortened key: the missing bytes read as zeros.
    const full = Buffer.alloc(9);
    key.copy(full);
    return `${key[0] === recordPrefix ? 'frame' : 'checkpoint'} seq ${seqOfKey(full)}`;
  }
  if (key[0] === metaPrefix) return `metadata '${key.subarray(1).toString('utf8')}'`;
  return `key 0x${key.toString('hex')}`;
}

function describeLost(block: LostBlock): string {
  const range = block.after === undefined ? `keys up to ${describeKey(block.through)}` : `keys after ${describeKey(block.after)} up to ${describeKey(block.through)}`;
  return `the ${block.sizeBytes}-byte block at byte ${block.offset} (${range})`;
}

/** What is wrong with the MANIFEST or a table it names, or undefined. */
function manifestProblem(dir: string): string | undefined {
  try {
    liveTableFiles(dir);
    return undefined;
  } catch (err) {
    if (err instanceof LevelTableDamage || (err as NodeJS.ErrnoException).code === 'ENOENT') return (err as Error).message;
    throw err;
  }
}

/**
 * Step 1: find damaged tables, read what they still hold, move them into `damaged/`. Undefined when
 * every table and the MANIFEST are sound (nothing is touched then).
 */
export function setAsideDamagedTables(dir: string): SetAside | undefined {
  const tables: SetAsideTable[] = [];
  for (const file of readdirSync(dir).filter((name) => /^\d+\.(ldb|sst)$/.test(name)).sort()) {
    const buf = readFileSync(join(dir, file));
    try {
      verifyTable(file, buf);
      continue;
    } catch (err) {
      if (!(err instanceof LevelTableDamage)) throw err;
      const found = salvageTable(file, buf);
      mkdirSync(join(dir, damagedDirName), { recursive: true });
      let movedTo = join(damagedDirName, file);
      for (let n = 1; existsSync(join(dir, movedTo)); n++) movedTo = join(damagedDirName, `${file}.${n}`);
      renameSync(join(dir, file), join(dir, movedTo));
      tables.push({
        file,
        movedTo,
        problem: err.message,
        dataBlocks: found.dataBlocks,
        blocksLost: found.unreadable === undefined ? found.lostBlocks.length : found.dataBlocks,
        lost: found.unreadable === undefined ? found.lostBlocks.map(describeLost) : [`every entry: ${found.unreadable}`],
        entries: found.entries,
      });
    }
  }
  // With tables moved away the MANIFEST names missing files: that is for the repair, not a problem.
  const problem = tables.length > 0 ? undefined : manifestProblem(dir);
  if (tables.length === 0 && problem === undefined) return undefined;
  return { tables, manifestProblem: problem };
}

/**
 * Step 3's choice: the newest entry of each key across the set-aside tables (by LevelDB's sequence
 * number), puts only: a key whose newest entry there is a delete stays deleted.
 */
export function restorable(setAside: SetAside): TableEntry[] {
  const newest = new Map<string, TableEntry>();
  for (const table of setAside.tables) {
    for (const entry of table.entries) {
      const id = entry.key.toString('latin1');
      const seen = newest.get(id);
      if (seen === undefined || entry.sequence > seen.sequence) newest.set(id, entry);
    }
  }
  return [...newest.values()].filter((e) => !e.deleted);
}

/**
 * How many entries each set-aside table gave back, in `setAside.tables`' order: an entry written
 * back (one of `restored`, taken from `restorable`) counts once, for the table it was read from. An
 * older version of the same key in another table, or in the same one, is not counted.
 */
export function entriesRestoredByTable(setAside: SetAside, restored: readonly TableEntry[]): number[] {
  const written = new Set(restored);
  return setAside.tables.map((table) => table.entries.filter((entry) => written.has(entry)).length);
}
