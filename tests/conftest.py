import gc
import os

import jax
import pytest

# The command line keeps compiled programs in the user's cache folder; tests that
# call it (in this process or in subprocesses) must leave that folder alone.
os.environ['PQJAX_NO_COMPILE_CACHE'] = '1'


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
