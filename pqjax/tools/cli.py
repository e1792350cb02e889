"""Command line: ``pqjax quantize``, ``info``, ``report`` and ``demo``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

EXIT_ERROR = 1
EXIT_EXISTS = 2
EXIT_USAGE = 2
DEFAULT_REPORT_DIR = 'pqjax-report'
COMMANDS = ('quantize', 'info', 'report', 'demo')
# Set (to anything but 0) to run without the persistent compilation cache.
NO_CACHE_ENV = 'PQJAX_NO_COMPILE_CACHE'


class _Parser(argparse.ArgumentParser):
  """Usage errors as one line on stderr, like every other error of the command."""

  def error(self, message: str) -> NoReturn:
    self.exit(EXIT_USAGE, f'pqjax: error: {message}; see `{self.prog} --help`\n')


def cache_dir() -> Path:
  """Where the command line keeps JAX's compiled programs between runs."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(Path.home(), '.cache')
  return Path(base) / 'pqjax' / 'jax'


def use_compile_cache(enabled: bool = True) -> Path | None:
  """Turns on JAX's persistent compilation cache in :func:`cache_dir`.

  Compiling costs a new process about 10 s on MiniLM for 0.4 s of work; with the
  cache, later runs load the programs instead. Off when ``enabled`` is False or
  ``PQJAX_NO_COMPILE_CACHE`` is set (not to 0), or when the folder cannot be made.

  Returns:
    The cache folder, or None when the cache stays off.
  """
  if not enabled or os.environ.get(NO_CACHE_ENV, '0') not in ('', '0'):
    return None
  path = cache_dir()
  try:
    path.mkdir(parents=True, exist_ok=True)
  except OSError:
    return None  # a speed-up only: run without it
  import jax

  jax.config.update('jax_compilation_cache_dir', str(path))
  # Every program: the many small ones add up to most of the compile time.
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  return path


def _granularity(text: str) -> str | int:
  return int(text) if text.isdigit() else text


def _exponent(text: str) -> str | float:
  if text in ('layer', 'global'):
    return text
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'must be "layer", "global" or a number, got {text!r}'
    ) from None


def _clip(text: str) -> bool | str | float:
  named: dict[str, bool | str] = {
    'layer': True,
    'on': True,
    'block': 'block',
    'off': False,
  }
  if text in named:
    return named[text]
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
      f'must be "layer", "block", "off" or a ratio, got {text!r}'
    ) from None


def _layer_axes(text: str) -> int:
  if text.isdigit():
    return int(text)
  raise argparse.ArgumentTypeError(f'must be a non-negative integer, got {text!r}')


def stacked(count: int) -> Callable[[str, Any], int]:
  """``layer_axes`` for ``--layer-axes``: ``count`` where a leaf has room, else 0.

  Leaves with fewer than ``count + 2`` axes (embeddings, a stack's biases) are
  quantized whole, as without the flag.
  """
  return lambda path, leaf: count if leaf.ndim >= count + 2 else 0


def _bits(text: str) -> int | tuple[int, int]:
  """A width ``N``, or a range ``LO..HI`` of widths for ``--bits-per-weight``."""
  lo, dots, hi = text.partition('..')
  try:
    widths = [int(lo), int(hi)] if dots else [int(text)]
  except ValueError:
    widths = []
  if not widths or not all(2 <= b <= 8 for b in widths):
    raise argparse.ArgumentTypeError(
      f'must be a width in 2..8 or a range LO..HI of them, got {text!r}'
    )
  return (widths[0], widths[-1]) if dots else widths[0]


def _budget(text: str) -> float:
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(f'must be a number, got {text!r}') from None


def _bits_list(text: str) -> tuple[int, ...]:
  try:
    bits = tuple(int(b) for b in text.split(','))
  except ValueError:
    bits = ()
  if not bits or not all(2 <= b <= 8 for b in bits):
    raise argparse.ArgumentTypeError(
      f'must be comma-separated bit widths in 2..8, got {text!r}'
    )
  return bits


def disk_bytes(path: str | os.PathLike) -> int:
  """Bytes a checkpoint takes on disk (a directory: all its files)."""
  p = Path(path)
  if p.is_file():
    return p.stat().st_size
  return sum(f.stat().st_size for f in p.rglob('*') if f.is_file())


def _error(message: str, code: int = EXIT_ERROR) -> int:
  print(f'pqjax: error: {message}', file=sys.stderr)
  return code


def _demo(args: argparse.Namespace) -> int:
  from pqjax.tools import demo, report

  out = args.out or (DEFAULT_REPORT_DIR if args.full else None)
  if out is not None:
    report.require_extras()
  result = demo.run(
    bits=args.bits,
    granularity=args.granularity,
    sentences=args.sentences,
    out=out,
    report_sentences=args.report_sentences,
    full=args.full,
    log=lambda line: print(line, file=sys.stderr, flush=True),
  )
  print(demo.format_report(result))
  return 0


def _report(args: argparse.Namespace) -> int:
  from pqjax.tools import report

  report.require_extras()
  if args.checkpoint is None:
    result = report.minilm_report(
      bits=args.bits,
      granularity=args.granularity,
      sentences=args.sentences,
      fidelity_bits=args.fidelity_bits,
      bits_per_weight=args.bits_per_weight,
    )
  else:
    result = report.checkpoint_report(
      args.checkpoint, float_path=args.float, fidelity_bits=args.fidelity_bits
    )
  page = report.write(result, args.out)
  report.print_table(result)
  print(f'wrote {page} and its plots')
  return 0


def _streams(path: str, out: str, fmt: str | None) -> bool:
  """Whether a checkpoint is read tensor by tensor: safetensors files and folders,
  and Orbax folders written to safetensors (an Orbax output is written whole)."""
  p = Path(path)
  if p.suffix == '.safetensors' and p.is_file():
    return True
  if not p.is_dir():
    return False
  if (p / '_METADATA').exists() or (p / 'pqjax.json').exists():
    named = fmt is None and out.endswith('.safetensors')
    return fmt in ('shards', 'safetensors') or named
  return (p / 'model.safetensors.index.json').exists() or any(p.glob('*.safetensors'))


def _quantize(args: argparse.Namespace) -> int:
  import jax

  import pqjax

  out = args.output
  stream = _streams(args.input, out, args.format) and args.format != 'orbax'
  default = 'shards' if stream else 'orbax'
  fmt = args.format or ('safetensors' if out.endswith('.safetensors') else default)
  # Refused before quantizing rather than after (pqjax.save refuses it too): a
  # .safetensors name is read back as one file, and these formats write folders.
  if fmt in ('orbax', 'shards') and Path(out).suffix == '.safetensors':
    return _error(
      f'{out}: a .safetensors name is read as a safetensors file, but --format'
      f' {fmt} writes a folder; name it without that suffix'
    )
  source, target = Path(args.input).resolve(), Path(out).resolve()
  if source == target or target in source.parents:
    # Even with --force: the input is never replaced by its own quantization.
    return _error(f'{out}: writing there would replace the input {args.input}')
  if os.path.lexists(out) and not args.force:
    return _error(f'{out} exists; pass --force to overwrite it', EXIT_EXISTS)
  if os.path.isdir(out) and not os.path.islink(out) and not _replaceable_dir(out):
    return _error(
      f'{out} is a folder that is not a pqjax checkpoint; --force replaces only'
      ' files and pqjax checkpoints',
      EXIT_EXISTS,
    )
  options = dict(
    bits_per_weight=args.bits_per_weight,
    granularity=args.granularity,
    exponent=args.exponent,
    grid=args.grid,
    clip=args.clip,
    scale_dtype=args.scale_dtype,
    layer_axes=stacked(args.layer_axes),
  )
  start = time.perf_counter()
  if stream:
    if fmt == 'safetensors' and not out.endswith('.safetensors'):
      return _error(f'{out}: a safetensors output is one file named *.safetensors')
    table = pqjax.quantize_checkpoint(
      args.input,
      out,
      args.bits,
      layout=args.layout,
      overwrite=args.force,
      progress=None,
      **options,
    )
    seconds = time.perf_counter() - start
  else:
    params = pqjax.load_float(args.input)
    params_q, _ = pqjax.quantize(params, args.bits, **options)
    jax.block_until_ready(params_q)
    seconds = time.perf_counter() - start
    pqjax.save(out, params_q, format=fmt, overwrite=args.force)
    table = pqjax.summary(params_q)
  print(table)
  print(
    f'\nquantized in {seconds:.1f} s; wrote {out} ({fmt},'
    f' {disk_bytes(out):,} bytes on disk)'
  )
  return 0


def _replaceable_dir(path: str) -> bool:
  """An empty folder, or a pqjax Orbax checkpoint (its ``pqjax.json``)."""
  return not os.listdir(path) or os.path.isfile(os.path.join(path, 'pqjax.json'))


def native_line() -> str:
  """How products run here: the native CPU kernels (and their level) or XLA."""
  import jax

  import pqjax

  status = pqjax.native_status()
  if status.loaded:
    where = '' if jax.default_backend() == 'cpu' else f' (not on {jax.default_backend()})'
    return (
      f'products: native CPU kernels, {status.level} (this CPU runs'
      f' {", ".join(status.levels)}){where}'
    )
  return f'products: XLA paths ({status.reason})'


def _info(args: argparse.Namespace) -> int:
  import pqjax

  if args.checkpoint is not None:
    print(pqjax.summary(pqjax.load(args.checkpoint)))
  print(native_line())
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(
    prog='pqjax',
    description='Data-free power quantization of JAX models. Compiled programs are'
    f' kept in {cache_dir()} to start faster next time (--no-compile-cache or'
    f' {NO_CACHE_ENV}=1 turn that off).',
  )
  sub = parser.add_subparsers(dest='command', required=True, metavar='COMMAND')
  common = _Parser(add_help=False)
  common.add_argument(
    '--no-compile-cache',
    action='store_true',
    help=f"don't keep compiled programs in {cache_dir()} (also: {NO_CACHE_ENV}=1)",
  )

  p = sub.add_parser(
    'quantize',
    parents=[common],
    help='quantize a float checkpoint and save it',
    description='Quantizes every floating leaf with two or more axes of a float'
    ' checkpoint and saves the quantized tree. A .safetensors file, a folder of'
    ' safetensors shards or a Hugging Face model folder is read tensor by tensor'
    ' (never whole in memory) and written as a folder of shards (or one'
    ' .safetensors file); a Hugging Face folder becomes the parameter tree of its'
    ' transformers Flax class (kernels transposed from PyTorch weights, one scale'
    ' per output feature) unless --layout none or --layout torch (names and'
    ' layouts as stored, 2-D weights as (out, in)). An Orbax directory is read'
    ' tensor by tensor too when written as safetensors (--format shards or a'
    ' .safetensors output), else whole, as a flax .msgpack file is. Other leaves'
    ' pass through untouched.',
  )
  p.add_argument(
    'input',
    help='float checkpoint: .safetensors file, folder of shards, Hugging Face'
    ' folder, Orbax directory or .msgpack',
  )
  p.add_argument(
    'output',
    help='where to write: a .safetensors file; else a folder of shards (safetensors'
    ' inputs) or an Orbax directory',
  )
  p.add_argument(
    '--layout',
    choices=('auto', 'none', 'torch'),
    default='auto',
    help="auto: a Hugging Face folder in its Flax model's layout; none: as stored,"
    ' output features last; torch: as stored, 2-D weights (out, in) with one scale'
    ' per output feature',
  )
  p.add_argument(
    '--bits',
    type=_bits,
    metavar='{2..8}',
    help='code width (default: 4); with --bits-per-weight, the range LO..HI the'
    ' widths are chosen from (default: 2..8)',
  )
  p.add_argument(
    '--bits-per-weight',
    type=_budget,
    metavar='B',
    help='a budget of stored bits per weight (codes, scales, exponents, tables):'
    ' each leaf gets the width that serves the model best within it',
  )
  p.add_argument(
    '--granularity',
    type=_granularity,
    default='channel',
    help='"channel", "tensor" or a group size (default: channel)',
  )
  p.add_argument(
    '--exponent',
    type=_exponent,
    default='layer',
    help='"layer", "global" or a fixed exponent (default: layer)',
  )
  p.add_argument(
    '--grid',
    choices=('full', 'symmetric'),
    default='full',
    help='"full" (all 2**bits codes) or "symmetric" (the paper\'s grid) (default: full)',
  )
  p.add_argument(
    '--clip',
    type=_clip,
    default=True,
    help='"layer" (a clip ratio searched per leaf), "block", "off" or a'
    ' fixed ratio in (0, 1] (default: layer)',
  )
  p.add_argument(
    '--scale-dtype',
    choices=('auto', 'float32', 'float16', 'uint8'),
    default='auto',
    help='storage of the block scales; "uint8": 255ths of a float32 scale per'
    ' column (default: auto, uint8 for groups of 5 or more blocks a column, float16'
    ' for other groups, float32 per channel)',
  )
  p.add_argument(
    '--layer-axes',
    type=_layer_axes,
    default=0,
    metavar='N',
    help='the first N axes of every leaf with at least N + 2 axes index stacked'
    ' layers (nn.scan), each quantized on its own; other leaves are quantized'
    ' whole (default: 0)',
  )
  p.add_argument(
    '--format',
    choices=('safetensors', 'shards', 'orbax'),
    help='output format (default: from the output name and the input)',
  )
  p.add_argument('--force', action='store_true', help='overwrite an existing output')
  p.set_defaults(func=_quantize)

  p = sub.add_parser(
    'info',
    parents=[common],
    help='print the summary of a quantized checkpoint, and how products run here',
  )
  p.add_argument(
    'checkpoint', nargs='?', help='a pqjax .safetensors file or Orbax directory'
  )
  p.set_defaults(func=_info)

  p = sub.add_parser(
    'demo', parents=[common], help='quantize the bundled MiniLM and print a report'
  )
  p.add_argument('--bits', type=int, default=4)
  p.add_argument(
    '--granularity',
    type=_granularity,
    default='channel',
    help='"channel", "tensor" or a group size',
  )
  p.add_argument(
    '--full',
    action='store_true',
    help="also the paper's grid, every method's embeddings and the report folder"
    ' with its fidelity against bits (several minutes)',
  )
  p.add_argument(
    '--sentences',
    type=int,
    help='sentences for the embedding cosines (default: 64, or 512 with --full)',
  )
  p.add_argument(
    '--out',
    help='folder for the report and plots (default: none, or'
    f' {DEFAULT_REPORT_DIR} with --full)',
  )
  p.add_argument(
    '--report-sentences',
    type=int,
    default=128,
    help="sentences for the report's fidelity against bits (default: 128)",
  )
  p.set_defaults(func=_demo)

  p = sub.add_parser(
    'report',
    parents=[common],
    help='write a report folder (Markdown and PNG plots) on a quantization',
    description='Writes report.md and PNG plots (error against the exponent,'
    ' weight histograms with the levels, exponent per layer, fidelity against'
    ' bits) and prints the per-layer table. With no checkpoint it reports on the'
    ' bundled MiniLM quantized with the default settings.',
  )
  p.add_argument(
    'checkpoint',
    nargs='?',
    help='a pqjax quantized checkpoint (.safetensors or Orbax directory);'
    ' default: the bundled MiniLM',
  )
  p.add_argument(
    '--float',
    metavar='PATH',
    help='the float checkpoint it was quantized from, for errors, error'
    ' curves and fidelity against bits',
  )
  p.add_argument(
    '--out',
    default=DEFAULT_REPORT_DIR,
    help=f'folder to write (default: {DEFAULT_REPORT_DIR})',
  )
  p.add_argument(
    '--bits',
    type=int,
    default=4,
    choices=range(2, 9),
    metavar='{2..8}',
    help='MiniLM: bits of the reported quantization (default: 4)',
  )
  p.add_argument(
    '--bits-per-weight',
    type=_budget,
    metavar='B',
    help='MiniLM: a budget of stored bits per weight instead of one width',
  )
  p.add_argument(
    '--granularity',
    type=_granularity,
    help='MiniLM: "channel", "tensor" or a group size (default: the library\'s)',
  )
  p.add_argument(
    '--sentences',
    type=int,
    default=32,
    help='MiniLM: real sentences for the embedding cosines (default: 32)',
  )
  p.add_argument(
    '--fidelity-bits',
    type=_bits_list,
    default=(2, 3, 4, 8),
    metavar='B,B,...',
    help='bit widths of the fidelity comparison (default: 2,3,4,8)',
  )
  p.set_defaults(func=_report)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  parser = build_parser()
  if not argv:
    parser.error(f'no command given; use one of {", ".join(COMMANDS)}')
  args = parser.parse_args(argv)
  use_compile_cache(not args.no_compile_cache)
  try:
    return args.func(args)
  except (ValueError, TypeError, OSError, ImportError) as e:
    # CheckpointError is a ValueError; OSError covers missing and unwritable paths;
    # ImportError a missing optional extra.
    return _error(str(e))


if __name__ == '__main__':
  sys.exit(main())
