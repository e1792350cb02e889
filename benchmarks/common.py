"""What every benchmark shares: printing its table and keeping it in results/."""

from __future__ import annotations

from pathlib import Path


def publish(name: str, lines: list[str]) -> None:
  """Prints the report and writes it to ``benchmarks/results/<name>.md``."""
  text = '\n'.join(lines) + '\n'
  print(text)
  out = Path(__file__).parent / 'results' / f'{name}.md'
  out.parent.mkdir(exist_ok=True)
  out.write_text(text)
