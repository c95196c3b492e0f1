/**
 * @cowstack/cli: the `cowstack` command. `main(argv)` runs it and returns the exit code.
 */
export { main } from './main.js';
export { formatSize, parseSize } from './sizes.js';
