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


# Each unit of pqjax/_src (a subpackage or a module) imports only lower layers and
# itself: docs/layout.md's layout, from what a quantized array is up to the pipelines.
LAYERS = {
  'version': 0,
  'core': 0,
  'search': 1,
  'io': 1,
  'runtime': 1,
  'budget': 1,
  'encoding': 2,
  'options': 2,
  'summary': 2,
  'sharding': 3,
  'stages': 4,
  'scale_storage': 5,
  'widths': 6,
  'quantize': 7,
  'streaming': 8,
  'lora': 8,
  'modules': 8,
}


def _modules() -> dict[str, Path]:
  out = {}
  for path in sorted((PACKAGE / '_src').rglob('*.py')):
    parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
    name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
    out[name] = path
  return out


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
  """Each _src module's imports of other _src modules (a name resolved to the
  longest module it names; importing a package counts as importing its
  ``__init__``, which is empty)."""
  graph = {}
  for name, path in modules.items():
    found = set()
    for m in _imports(path):
      while m and m not in modules:
        m = m.rpartition('.')[0]
      if m and m != name and modules[m].name != '__init__.py':
        found.add(m)
    graph[name] = found
  return graph


def _unit(module: str) -> str:
  return module.split('.')[2]


def _upward(graph: dict[str, set[str]]) -> list[str]:
  return [
    f'{a} imports {b}'
    for a, targets in graph.items()
    for b in targets
    if _unit(a) != _unit(b) and LAYERS[_unit(b)] >= LAYERS[_unit(a)]
  ]


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  out = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      part = []
      while True:
        w = stack.pop()
        part.append(w)
        if w == v:
          break
      if len(part) > 1:
        out.append(sorted(part))

  for v in graph:
    if v not in index:
      visit(v)
  return out


def test_library_layers_import_only_downwards_without_cycles():
  modules = _modules()
  graph = _graph(modules)
  assert {_unit(m) for m in modules if m.count('.') >= 2} <= set(LAYERS)
  assert not _upward(graph)
  assert not _cycles(graph)
  top = [
    f'{n} imports {m}'
    for n, p in modules.items()
    for m in _imports(p)
    if m == 'pqjax' or (m.startswith('pqjax.') and not m.startswith('pqjax._src'))
  ]
  assert not top, top


def test_the_cycle_and_upward_checks_can_fail():
  a, b, c = 'pqjax._src.core.a', 'pqjax._src.core.b', 'pqjax._src.quantize'
  assert _cycles({a: {b}, b: {a}, c: set()}) == [[a, b]]
  assert _upward({a: {c}, b: set(), c: {a}}) == [f'{a} imports {c}']
