"""Quantizing a sharded 124M-parameter tree: per-device bytes and time, 1 vs 8 devices.

The tree has GPT-2 small's shapes (``speed.GPT2_SMALL``, Gaussian weights), cut
Megatron-style over a mesh of 8 CPU devices: embeddings, the QKV and MLP-in kernels
on their output axis, the attention and MLP-out projections on their input axis.
Each configuration runs in a fresh process (``XLA_FLAGS`` sets the device count).
Run:

    .venv/bin/python benchmarks/sharding.py

Prints a table and writes benchmarks/results/sharding.md.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

from common import publish
from speed import GPT2_SMALL

_CHILD = r"""
import hashlib, json, sys, time
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import pqjax

shapes, devices = json.loads(sys.argv[1]), int(sys.argv[2])
mesh = Mesh(np.array(jax.devices()[:devices]), ('d',))
rng = np.random.default_rng(0)


def spec(i, shape):
  # Embeddings and every kernel whose output is wider than its input: outputs cut.
  if devices == 1:
    return P()
  return P(None, 'd') if i < 2 or shape[1] > shape[0] else P('d', None)


params = {f'w{i:02d}': jax.device_put(rng.standard_normal(s, np.float32) * 0.02,
                                      NamedSharding(mesh, spec(i, s)))
          for i, s in enumerate(shapes)}
jax.block_until_ready(params)


def per_device(tree):
  out = {d: 0 for d in mesh.devices.flat}
  for x in jax.tree_util.tree_leaves(tree):
    for s in x.addressable_shards:
      out[s.device] += s.data.nbytes
  return max(out.values()), sum(out.values())


times = []
for _ in range(3):
  t = time.perf_counter()
  params_q, alphas = pqjax.quantize(params, 4)
  jax.block_until_ready(params_q)
  times.append(time.perf_counter() - t)
h = hashlib.sha256()
for name in sorted(params_q):
  q = params_q[name]
  for f in ('codes', 'scale', 'alpha'):
    h.update(np.asarray(getattr(q, f)).tobytes())
before, total_before = per_device(params)
after, total_after = per_device(params_q)
print(json.dumps({'params': sum(x.size for x in params.values()), 'cold': times[0],
                  'warm': min(times[1:]), 'before': before, 'after': after,
                  'total_before': total_before, 'total_after': total_after,
                  'digest': h.hexdigest()[:16]}))
"""


def _run(devices: int) -> dict:
  env = {
    **os.environ,
    'TF_CPP_MIN_LOG_LEVEL': '3',
    'JAX_PLATFORMS': 'cpu',
    'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
  }
  out = subprocess.run(
    [sys.executable, '-c', _CHILD, json.dumps(GPT2_SMALL), str(devices)],
    capture_output=True,
    text=True,
    check=True,
    env=env,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  import jax

  rows = [(d, _run(d)) for d in (1, 8)]
  mb = 1e6
  lines = [
    '# quantize on a device mesh (4 bits, per channel, exponent per layer)',
    '',
    f'Machine: {platform.platform()}, {os.cpu_count()} CPUs,'
    f' Python {platform.python_version()}, jax {jax.__version__}, CPU backend;'
    ' 8 devices are simulated on these CPUs'
    ' (`--xla_force_host_platform_device_count`).',
    f'Tree: GPT-2 small shapes, {rows[0][1]["params"] / 1e6:.1f}M parameters;'
    ' 8 devices: a mesh of 8, embeddings, QKV and MLP-in kernels cut on their'
    ' outputs, the two projections on their inputs. Cold: first call in a fresh'
    ' process (compilation included); warm: best of two later calls.',
    '',
    '| devices | float MB / device | quantized MB / device | float MB, all devices |'
    ' quantized MB, all devices | cold s | warm s | codes, scales, exponents digest |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for d, r in rows:
    lines.append(
      f'| {d} | {r["before"] / mb:.1f} | {r["after"] / mb:.1f} |'
      f' {r["total_before"] / mb:.1f} | {r["total_after"] / mb:.1f} |'
      f' {r["cold"]:.2f} | {r["warm"]:.2f} | `{r["digest"]}` |'
    )
  same = rows[0][1]['digest'] == rows[1][1]['digest']
  lines += [
    '',
    'The sharded run gives the same codes, scales and exponents as one'
    f' device: {"yes (equal digests)" if same else "NO"}. Quantized bytes per'
    ' device include the replicated exponent and decoding table of every leaf.'
    ' With 8 simulated devices sharing the CPUs, the time shows the cost of the'
    ' sharded programs, not a speed-up; on 8 real devices each one does an'
    ' eighth of the passes over the weights.',
  ]
  publish('sharding', lines)


if __name__ == '__main__':
  main()
