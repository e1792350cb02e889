"""Command line: ``pqjax quantize``, ``pqjax info`` and ``pqjax demo``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

EXIT_ERROR = 1
EXIT_EXISTS = 2


def _granularity(text: str) -> str | int:
  return int(text) if text.isdigit() else text


def _exponent(text: str) -> str | float:
  if text in ('layer', 'global'):
    return text
  try:
    return float(text)
  except ValueError:
    raise argparse.ArgumentTypeError(
        f'must be "layer", "global" or a number, got {text!r}') from None


def _error(message: str, code: int = EXIT_ERROR) -> int:
  print(f'pqjax: error: {message}', file=sys.stderr)
  return code


def _demo(args: argparse.Namespace) -> int:
  from pqjax import demo

  report = demo.run(bits=args.bits, granularity=args.granularity,
                    sentences=args.sentences)
  print(demo.format_report(report))
  return 0


def _quantize(args: argparse.Namespace) -> int:
  import jax

  from pqjax import checkpoint, sizes
  from pqjax.quantize import quantize

  out = args.output
  fmt = args.format or ('safetensors' if out.endswith('.safetensors') else 'orbax')
  if os.path.lexists(out) and not args.force:
    return _error(f'{out} exists; pass --force to overwrite it', EXIT_EXISTS)
  params = checkpoint.load_float(args.input)
  start = time.perf_counter()
  params_q, _ = quantize(params, args.bits, granularity=args.granularity,
                         exponent=args.exponent)
  jax.block_until_ready(params_q)
  seconds = time.perf_counter() - start
  checkpoint.save(out, params_q, format=fmt, overwrite=args.force)
  print(sizes.summary(params_q))
  print(f'\nquantized in {seconds:.1f} s; wrote {out} ({fmt},'
        f' {checkpoint.disk_bytes(out):,} bytes on disk)')
  return 0


def _info(args: argparse.Namespace) -> int:
  from pqjax import checkpoint, sizes

  print(sizes.summary(checkpoint.load(args.checkpoint)))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='pqjax', description='Data-free power quantization of JAX models.')
  sub = parser.add_subparsers(dest='command', required=True)

  p = sub.add_parser(
      'quantize', help='quantize a float checkpoint and save it',
      description='Quantizes every floating leaf with two or more axes of a float'
      ' checkpoint (an Orbax directory, a flax .msgpack file or a .safetensors file,'
      ' Hugging Face ones included) and saves the quantized tree. Arrays keep their'
      ' layout: channels are the last axis, so a PyTorch Linear weight (out, in)'
      ' gets one scale per input feature. Other leaves pass through untouched.')
  p.add_argument('input', help='float checkpoint: Orbax directory, .msgpack or'
                 ' .safetensors')
  p.add_argument('output', help='where to write: a .safetensors file, else an Orbax'
                 ' directory')
  p.add_argument('--bits', type=int, default=4, choices=range(2, 9), metavar='{2..8}')
  p.add_argument('--granularity', type=_granularity, default='channel',
                 help='"channel", "tensor" or a group size (default: channel)')
  p.add_argument('--exponent', type=_exponent, default='layer',
                 help='"layer", "global" or a fixed exponent (default: layer)')
  p.add_argument('--format', choices=('safetensors', 'orbax'),
                 help='output format (default: from the output name)')
  p.add_argument('--force', action='store_true', help='overwrite an existing output')
  p.set_defaults(func=_quantize)

  p = sub.add_parser('info', help='print the summary of a quantized checkpoint')
  p.add_argument('checkpoint', help='a pqjax .safetensors file or Orbax directory')
  p.set_defaults(func=_info)

  p = sub.add_parser('demo', help='quantize the bundled MiniLM and print a report')
  p.add_argument('--bits', type=int, default=4)
  p.add_argument('--granularity', type=_granularity, default='channel',
                 help='"channel", "tensor" or a group size')
  p.add_argument('--sentences', type=int, default=512)
  p.set_defaults(func=_demo)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  try:
    return args.func(args)
  except (ValueError, TypeError, OSError) as e:
    # CheckpointError is a ValueError; OSError covers missing and unwritable paths.
    return _error(str(e))


if __name__ == '__main__':
  sys.exit(main())
