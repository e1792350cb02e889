"""Products, checkpoints and stacked layers on 8 CPU devices (``mesh_checks.py``)."""

from tests.test_sharding import run_on_8_devices


def test_mesh_checks_on_8_devices():
  run_on_8_devices('mesh_checks.py')
