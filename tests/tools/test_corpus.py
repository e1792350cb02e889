"""The stored sentences: fixed whatever was imported, and what the script writes."""

from __future__ import annotations

import json
import platform
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqjax.tools import corpus

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / 'pqjax' / 'tools' / 'data' / 'stdlib_sentences.txt'
# json is imported after the call, so the plain process imports nothing before it.
CALL = 'from pqjax.tools import corpus; s = corpus.stdlib_sentences({n}); import json'
PRINT = CALL + '; print(json.dumps(s))'
# Modules that add attributes to others when imported: what changed the old walk.
HEAVY = 'import json, email, asyncio, xml.dom.minidom, unittest, jax, numpy'


def _fresh(code: str) -> list[str]:
  done = subprocess.run(
    [sys.executable, '-c', code], capture_output=True, text=True, timeout=300
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout)


def _file_lines() -> list[str]:
  return DATA.read_text(encoding='utf-8').split('\n')


def test_two_calls_give_the_same_list():
  first = corpus.stdlib_sentences(512)
  first.append('a caller may change its copy')
  assert corpus.stdlib_sentences(512) == first[:-1]
  assert corpus.stdlib_sentences(512) == corpus.stdlib_sentences()


def test_imports_before_the_first_call_change_nothing():
  n = corpus.available()
  plain = _fresh(PRINT.format(n=n))
  heavy = _fresh(f'{HEAVY}; {PRINT.format(n=n)}')
  assert plain == heavy
  assert plain == corpus.stdlib_sentences(n)


def test_the_file_is_read_as_written():
  lines = _file_lines()
  assert lines[0].startswith('# ') and 'scripts/make_corpus.py' in lines[0]
  assert lines[-1] == ''  # a final newline, nothing after it
  assert corpus.stdlib_sentences(corpus.available()) == lines[1:-1]


def test_sentences_are_distinct_one_line_prose():
  n = corpus.available()
  assert n >= 1024
  sentences = corpus.stdlib_sentences(n)
  assert len(set(sentences)) == n
  for text in sentences:
    assert text == text.strip() and 40 <= len(text) <= 400
    assert text.splitlines() == [text] and text[0].isupper()
  assert corpus.stdlib_sentences(100) == sentences[:100]


@pytest.mark.parametrize('n', [0, -1, 100_000])
def test_bad_counts_raise(n):
  with pytest.raises(ValueError, match='between 1 and'):
    corpus.stdlib_sentences(n)


@pytest.mark.parametrize('n', [2.0, '3', True])
def test_non_int_counts_raise(n):
  with pytest.raises(TypeError, match='must be an int'):
    corpus.stdlib_sentences(n)


def test_the_script_writes_the_shipped_file(tmp_path):
  made = re.search(r'on Python (\S+) \((\w+)\)', _file_lines()[0])
  assert made
  here = (platform.python_version(), platform.python_implementation())
  if (made[1], made[2]) != here:
    pytest.skip(f'the file was written on Python {made[1]}, this is {here[0]}')
  out = tmp_path / 'sentences.txt'
  done = subprocess.run(
    [sys.executable, str(ROOT / 'scripts' / 'make_corpus.py'), '--out', str(out)],
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert out.read_bytes() == DATA.read_bytes()
