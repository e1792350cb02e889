"""Real English text with no download: first paragraphs of standard-library docstrings."""

from __future__ import annotations

import importlib
import inspect
import re

_MODULES = (
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


def _first_paragraph(doc: str) -> str:
  para = inspect.cleandoc(doc).split('\n\n')[0]
  return re.sub(r'\s+', ' ', para).strip()


def _usable(text: str) -> bool:
  # Keep prose: long enough to be a sentence, not a signature or a code example.
  return (
    40 <= len(text) <= 400
    and text[0].isupper()
    and ' ' in text
    and '>>>' not in text
    and not re.match(r'^[\w.]+\(', text)
  )


def stdlib_sentences(n: int = 512) -> list[str]:
  """``n`` distinct docstring paragraphs, in a fixed order, from the standard library."""
  seen: dict[str, None] = {}
  for modname in _MODULES:
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
        text = _first_paragraph(doc)
        if _usable(text):
          seen.setdefault(text)
      if len(seen) >= n:
        return list(seen)
  if len(seen) < n:
    raise RuntimeError(f'found only {len(seen)} docstring paragraphs, {n} asked')
  return list(seen)
