"""Writes pqjax/tools/data/stdlib_sentences.txt: real English sentences, no download.

The sentences are the first paragraphs of Python standard-library docstrings, in a
fixed walk over a fixed list of modules. Walking in a process that has imported
other things gives other sentences (imports add attributes to modules already
walked), so the walk runs once, in a clean interpreter, and the file is shipped:

    python scripts/make_corpus.py [--out FILE]

The script re-runs itself as ``python -I -S`` (no environment variables, no user or
site packages, so no ``.pth`` file imports anything first) and imports nothing from
pqjax. The file's first line records the script and the Python version.
"""

from __future__ import annotations

import importlib
import inspect
import os
import platform
import re
import sys
import warnings
from pathlib import Path

COUNT = 1024  # sentences to store; at least MINIMUM if the walk finds fewer
MINIMUM = 512
OUT = Path(__file__).resolve().parent.parent / 'pqjax' / 'tools' / 'data'
FILE = 'stdlib_sentences.txt'

MODULES = (
  'abc argparse array ast asyncio base64 bisect calendar collections concurrent.futures'
  ' configparser contextlib copy csv dataclasses datetime decimal difflib email enum'
  ' filecmp fnmatch fractions ftplib functools gettext glob gzip hashlib heapq hmac'
  ' html http.client imaplib inspect io ipaddress itertools json logging lzma mailbox'
  ' mimetypes numbers operator optparse os pathlib pickle pkgutil platform plistlib'
  ' poplib pprint queue random re sched secrets selectors shelve shlex shutil signal'
  ' smtplib socket socketserver sqlite3 statistics string struct subprocess tarfile'
  ' tempfile textwrap threading timeit tokenize trace traceback turtle typing unittest'
  ' urllib.parse urllib.request uuid warnings weakref xml.dom.minidom zipfile zlib'
).split()


def first_paragraph(doc: str) -> str:
  """The docstring's first paragraph on one line, runs of whitespace made one space."""
  para = inspect.cleandoc(doc).split('\n\n')[0]
  return re.sub(r'\s+', ' ', para).strip()


def usable(text: str) -> bool:
  """Prose: long enough to be a sentence, not a signature or a code example."""
  return (
    40 <= len(text) <= 400
    and text[0].isupper()
    and ' ' in text
    and '>>>' not in text
    and not re.match(r'^[\w.]+\(', text)
  )


def walk(count: int) -> list[str]:
  """Up to ``count`` distinct paragraphs: each module, then its public names sorted."""
  seen: dict[str, None] = {}
  for modname in MODULES:
    try:
      module = importlib.import_module(modname)
    except ImportError:  # a module missing from a minimal Python build
      continue
    objs = [module] + [
      getattr(module, name) for name in sorted(vars(module)) if not name.startswith('_')
    ]
    for obj in objs:
      if not (inspect.ismodule(obj) or inspect.isclass(obj) or inspect.isroutine(obj)):
        continue
      doc = getattr(obj, '__doc__', None)
      if isinstance(doc, str):
        text = first_paragraph(doc)
        if usable(text):
          seen.setdefault(text)
      if len(seen) >= count:
        return list(seen)
  return list(seen)


def main() -> None:
  if not (sys.flags.isolated and sys.flags.no_site):
    # Only a fresh interpreter with nothing imported gives the documented walk.
    script = str(Path(__file__).resolve())
    os.execv(sys.executable, [sys.executable, '-I', '-S', script, *sys.argv[1:]])
  # sys.argv by hand: argparse would import modules before the walk.
  out = Path(sys.argv[2]).resolve() if sys.argv[1:2] == ['--out'] else OUT / FILE
  with warnings.catch_warnings():
    warnings.simplefilter('ignore')  # deprecated names (typing.io) warn when read
    sentences = walk(COUNT)
  if len(sentences) < MINIMUM:
    raise SystemExit(f'the walk found only {len(sentences)} sentences, {MINIMUM} needed')
  for text in sentences:
    # One sentence a line, whatever splits lines; '#' starts the header only.
    if len(text.splitlines()) != 1 or text != text.strip() or text.startswith('#'):
      raise SystemExit(f'cannot store on one line: {text!r}')
  header = (
    f'# {len(sentences)} sentences written by scripts/make_corpus.py on Python'
    f' {platform.python_version()} ({platform.python_implementation()}):'
    ' first paragraphs of standard-library docstrings, one a line.'
  )
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text('\n'.join([header, *sentences]) + '\n', encoding='utf-8', newline='\n')
  print(f'wrote {len(sentences)} sentences to {out}')


if __name__ == '__main__':
  main()
