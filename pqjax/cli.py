"""Command line: ``pqjax demo``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence


def _granularity(text: str) -> str | int:
  return int(text) if text.isdigit() else text


def _demo(args: argparse.Namespace) -> int:
  from pqjax import demo

  report = demo.run(bits=args.bits, granularity=args.granularity,
                    sentences=args.sentences)
  print(demo.format_report(report))
  return 0


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog='pqjax', description='Data-free power quantization of JAX models.')
  sub = parser.add_subparsers(dest='command', required=True)
  p = sub.add_parser('demo', help='quantize the bundled MiniLM and print a report')
  p.add_argument('--bits', type=int, default=4)
  p.add_argument('--granularity', type=_granularity, default='channel',
                 help='"channel", "tensor" or a group size')
  p.add_argument('--sentences', type=int, default=512)
  p.set_defaults(func=_demo)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  return args.func(args)


if __name__ == '__main__':
  sys.exit(main())
