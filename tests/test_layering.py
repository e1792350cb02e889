"""The package's layers: applications use the public API only; the API is explicit."""

import ast
from pathlib import Path

import pqjax

PACKAGE = Path(pqjax.__file__).parent


def _imports(path: Path) -> list[str]:
  """Every module a file imports, at any depth (functions included)."""
  names = []
  for node in ast.walk(ast.parse(path.read_text(), str(path))):
    if isinstance(node, ast.Import):
      names += [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.append(node.module)
      names += [f'{node.module}.{a.name}' for a in node.names]
  return names


def test_tools_use_only_the_public_api():
  tools = sorted((PACKAGE / 'tools').glob('*.py'))
  assert len(tools) >= 6
  for path in tools:
    private = [m for m in _imports(path) if m.startswith('pqjax._src')]
    assert not private, f'{path.name} imports {private}'


def test_library_does_not_import_the_tools():
  for path in sorted((PACKAGE / '_src').rglob('*.py')):
    tools = [m for m in _imports(path) if m.startswith('pqjax.tools')]
    assert not tools, f'{path.relative_to(PACKAGE)} imports {tools}'


def test_the_public_api_is_explicit():
  exported = set(pqjax.__all__)
  assert len(exported) == len(pqjax.__all__)
  assert all(hasattr(pqjax, name) for name in exported)
  public = {n for n in vars(pqjax) if not n.startswith('_')}
  # Only the listed names, the two subpackages and the version are reachable.
  assert public - exported <= {'tools'}, public - exported


def test_the_layer_check_can_fail(tmp_path):
  bad = tmp_path / 'bad.py'
  bad.write_text('def f():\n  from pqjax._src.core import grid\n')
  assert 'pqjax._src.core' in _imports(bad)
