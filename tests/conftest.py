import atexit
import gc
import os
import shutil
import tempfile

# The command line keeps compiled programs in the user's cache folder; tests that
# call it (in this process or in subprocesses) must leave that folder alone.
os.environ['PQJAX_NO_COMPILE_CACHE'] = '1'

# One persistent compilation cache for the session, in a folder of its own: the
# worker processes and the programs the tests start (examples, the command line,
# fresh-process checks) inherit it, so a program compiled by one is loaded by the
# others. Compiling is half of the suite's time; where the same programs recur in
# other processes the cache halves a test (the second MiniLM demo: 31.5 -> 3.9 s).
if 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  _cache = tempfile.mkdtemp(prefix='pqjax-tests-cache-')
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _cache
  os.environ['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'

import jax  # noqa: E402  (after the cache settings it reads)
import pytest  # noqa: E402

# Worker-seconds of the longest modules (the suite on 2 workers, quiet machine).
# The two workers take whole modules (``--dist loadfile``) in collection order:
# the longest first, each worker then takes the next as it finishes, and the two
# end within a short module of each other. xdist's own order (most tests first)
# puts the examples, a module of 9 tests and 176 s, among the last.
_SECONDS = {
  'tests/tools/test_examples.py': 176,
  'tests/io/test_streaming.py': 145,
  'tests/test_budget.py': 116,
  'tests/test_lora.py': 91,
  'tests/tools/test_report.py': 86,
  'tests/test_mesh.py': 80,
  'tests/test_sharding.py': 77,
  'tests/search/test_compiles.py': 76,
  'tests/search/test_search.py': 76,
  'tests/test_quantize.py': 73,
  'tests/test_layer_axes.py': 72,
  'tests/runtime/test_rewrite.py': 70,
  'tests/runtime/test_activations.py': 65,
  'tests/test_scales.py': 53,
  'tests/io/test_checkpoint.py': 50,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  """Puts the longest modules first, each module's tests in their own order."""
  items.sort(key=lambda item: -_SECONDS.get(item.nodeid.split('::')[0], 0))


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
  """Runs in this process when debugging: the project's ``-n 2`` cannot take ``--pdb``."""
  if config.getoption('usepdb', False) or config.getoption('trace', False):
    config.option.numprocesses = 0


@pytest.fixture(autouse=True, scope='module')
def _free_compiled_programs():
  """Drops every compiled program after each test module.

  One process compiles thousands of programs over the suite; XLA:CPU keeps each
  one's code mapped, and past the kernel's limit on memory maps (65530 by default)
  a compilation aborts.
  """
  yield
  jax.clear_caches()
  gc.collect()
