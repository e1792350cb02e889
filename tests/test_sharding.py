"""Sharded quantization on 8 CPU devices, checked in fresh interpreters.

JAX reads ``XLA_FLAGS`` once, when it starts, so the checks in
``sharding_checks.py`` (and ``mesh_checks.py``, run by ``test_mesh.py`` on the
other worker) run in a subprocess that asks for 8 host devices.
"""

import os
import subprocess
import sys
from pathlib import Path


def run_on_8_devices(checks: str) -> None:
  """Runs the tests of ``tests/<checks>`` in a subprocess with 8 CPU devices."""
  here = Path(__file__).parent
  env = {
    **os.environ,
    'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
    'JAX_PLATFORMS': 'cpu',
    'TF_CPP_MIN_LOG_LEVEL': '3',
  }
  out = subprocess.run(
    [sys.executable, '-m', 'pytest', '-q', '-x', '-n', '0', '-p', 'no:cacheprovider']
    + [str(here / checks)],
    cwd=here.parent,
    env=env,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-3000:]
  assert ' passed' in out.stdout and 'skipped' not in out.stdout, out.stdout[-2000:]


def test_sharding_checks_on_8_devices():
  run_on_8_devices('sharding_checks.py')
