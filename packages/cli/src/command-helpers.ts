/**
 * Shared pieces of the command definitions: exit codes, argument parsers that turn bad values into
 * usage errors, and the help-text example every command carries.
 */
import { limits, parseRetention, type RetentionPolicy } from '@cowstack/core';
import { type Command, InvalidArgumentError } from 'commander';
import { parseSize } from './sizes.js';

export const exitOk = 0;
export const exitProblem = 1;
export const exitUsage = 2;

/** Largest TCP port number. */
const maxPort = 65535;

/** Thrown by a command that finished but found problems (exit code 1, nothing more to print). */
export class ProblemsFound extends Error {
  constructor() {
    super('problems found');
  }
}

export function sizeArg(value: string): number {
  try {
    return parseSize(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

/** Decimal digits only: not "", "0x10" or "1e3", which Number() would take. */
export function intArg(value: string): number {
  const n = /^\d+$/.test(value) ? Number(value) : NaN;
  if (!Number.isSafeInteger(n)) throw new InvalidArgumentError(`${JSON.stringify(value)} is not a whole number`);
  return n;
}

export function blockSizeArg(value: string): number {
  const n = intArg(value);
  if (n < limits.minBlockSizeBytes || n > limits.maxBlockSizeBytes || (n & (n - 1)) !== 0) {
    throw new InvalidArgumentError(`${n} is not a power of two from ${limits.minBlockSizeBytes} to ${limits.maxBlockSizeBytes}`);
  }
  return n;
}

export function positiveIntArg(value: string): number {
  const n = intArg(value);
  if (n === 0) throw new InvalidArgumentError('0 is not allowed here: give 1 or more');
  return n;
}

export function portArg(value: string): number {
  const n = intArg(value);
  if (n > maxPort) throw new InvalidArgumentError(`${n} is not a TCP port (0 to ${maxPort})`);
  return n;
}

/** Unix permission bits in octal, as chmod takes them: 600, 0660. */
export function modeArg(value: string): number {
  if (!/^0?[0-7]{3}$/.test(value)) throw new InvalidArgumentError(`${JSON.stringify(value)} is not an octal mode (examples: 600, 0660)`);
  return parseInt(value, 8);
}

/** ADDR:PORT (ADDR may be empty for 127.0.0.1, or an IPv6 address in brackets). */
export function hostPortArg(value: string): { host: string; port: number } {
  const match = /^(.*):(\d+)$/.exec(value);
  const port = match === null ? NaN : Number(match[2]);
  if (match === null || port > maxPort) throw new InvalidArgumentError(`${JSON.stringify(value)} is not ADDR:PORT (example: 127.0.0.1:9100)`);
  return { host: match[1].replace(/^\[(.*)\]$/, '$1') || '127.0.0.1', port };
}

export function retentionArg(value: string): RetentionPolicy {
  try {
    return parseRetention(value);
  } catch (err) {
    throw new InvalidArgumentError((err as Error).message);
  }
}

export function example(command: Command, ...lines: string[]): Command {
  return command.addHelpText('after', `\nExample${lines.length > 1 ? 's' : ''}:\n${lines.map((l) => `  $ ${l}`).join('\n')}`);
}

