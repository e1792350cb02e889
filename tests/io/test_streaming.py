"""quantize_checkpoint: streamed from files, bit for bit what in-memory quantize gives."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import pqjax
from pqjax._src.core.qarray import is_qarray
from pqjax._src.search import tiles

FIELDS = ('codes', 'scale', 'column_scale', 'alpha', 'table')


def _tensors(seed: int = 0) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  bf16 = ml_dtypes.bfloat16
  return {
    'a.kernel': rng.standard_t(3, (300, 130)).astype(bf16),
    'b.kernel': rng.standard_t(3, (256, 96)).astype(bf16),
    'c.kernel': rng.standard_t(4, (64, 40)).astype(bf16),
    'c.bias': rng.standard_normal(40).astype(bf16),
    'stack.kernel': rng.standard_t(3, (3, 128, 64)).astype(bf16),
  }


def _write_shards(folder: Path, tensors: dict[str, np.ndarray], split: int = 2) -> None:
  """A Hugging Face style sharded folder: shards and model.safetensors.index.json."""
  folder.mkdir(parents=True, exist_ok=True)
  names = sorted(tensors)
  weight_map = {}
  for i in range(split):
    file = f'model-{i + 1:05d}-of-{split:05d}.safetensors'
    part = names[i::split]
    save_file({n: tensors[n] for n in part}, folder / file)
    weight_map.update({n: file for n in part})
  index = {'metadata': {'total_size': 0}, 'weight_map': weight_map}
  (folder / 'model.safetensors.index.json').write_text(json.dumps(index))


def _tree(tensors: dict[str, np.ndarray]) -> dict:
  tree: dict = {}
  for name, value in tensors.items():
    a, b = name.split('.')
    tree.setdefault(a, {})[b] = jnp.asarray(value)
  return tree


def _assert_identical(got, want) -> None:
  got_leaves = jax.tree_util.tree_leaves_with_path(got, is_leaf=is_qarray)
  want_leaves = jax.tree_util.tree_leaves_with_path(want, is_leaf=is_qarray)
  assert [p for p, _ in got_leaves] == [p for p, _ in want_leaves]
  for (path, x), (_, y) in zip(got_leaves, want_leaves):
    where = jax.tree_util.keystr(path)
    assert type(x) is type(y), where
    if is_qarray(y):
      assert (x.bits, x.shape, x.dtype, x.layer_axes, x.transposed) == (
        y.bits,
        y.shape,
        y.dtype,
        y.layer_axes,
        y.transposed,
      ), where
      for f in FIELDS:
        a, b = getattr(x, f), getattr(y, f)
        assert (a is None) == (b is None), (where, f)
        if b is not None:
          a, b = np.asarray(a), np.asarray(b)
          assert a.dtype == b.dtype and np.array_equal(a, b), (where, f)
    else:
      assert np.asarray(x).dtype == np.asarray(y).dtype, where
      assert np.array_equal(np.asarray(x), np.asarray(y)), where


def _stack_axes(path, leaf):
  return 1 if path.startswith('stack') else 0


CASES = {
  'bits 4': dict(bits=4),
  'groups of 32, 3 bits': dict(bits=3, granularity=32),
  'budget 3.5': dict(bits=(3, 5), bits_per_weight=3.5),  # few widths to compile
  'layer_axes': dict(bits=4, layer_axes=_stack_axes),
  'block clip': dict(bits=4, clip='block'),
  'tensor scales, global exponent': dict(bits=2, granularity='tensor', exponent='global'),
}


@pytest.fixture(scope='module')
def folder(tmp_path_factory) -> tuple[Path, dict]:
  path = tmp_path_factory.mktemp('src') / 'model'
  tensors = _tensors()
  _write_shards(path, tensors)
  return path, _tree(tensors)


@pytest.mark.parametrize('case', list(CASES))
@pytest.mark.parametrize('working_set', [1 << 30, 1 << 12], ids=['whole', 'tiled'])
def test_sharded_bf16_folder_is_bit_identical(folder, tmp_path, case, working_set):
  src, tree = folder
  options = CASES[case]
  want, _ = pqjax.quantize(tree, **options)
  out = tmp_path / 'out'
  pqjax.quantize_checkpoint(src, out, working_set=working_set, **options)
  _assert_identical(pqjax.load(out), want)


def test_bounded_tiles_are_bit_identical(tmp_path, monkeypatch):
  # A shape of its own (compiled programs are cached by shape) in more than the
  # 8 x 8 tiles a layer had before tiles were bounded: read and summed one at a time.
  monkeypatch.setattr(tiles, 'TILE_WEIGHTS', 256)
  assert tiles.counts(320, 136) == (32, 8)  # tiles of 10 x 17 weights
  rng = np.random.default_rng(5)
  tensors = {'w.kernel': rng.standard_t(3, (320, 136)).astype(ml_dtypes.bfloat16)}
  _write_shards(tmp_path / 'src', tensors, split=1)
  for options in (dict(bits=4), dict(bits=3, granularity=8)):
    want, _ = pqjax.quantize(_tree(tensors), **options)
    out = tmp_path / f'out{len(options)}'
    pqjax.quantize_checkpoint(tmp_path / 'src', out, working_set=1 << 12, **options)
    _assert_identical(pqjax.load(out), want)


def test_output_is_sharded_with_an_index_under_the_cap(folder, tmp_path):
  src, tree = folder
  out = tmp_path / 'out'
  pqjax.quantize_checkpoint(src, out, bits=4, shard_bytes=20_000)
  index = json.loads((out / 'model.safetensors.index.json').read_text())
  files = sorted({f for f in index['weight_map'].values()})
  assert len(files) > 1
  assert sorted(p.name for p in out.glob('*.safetensors')) == files
  for f in files:
    # A shard may exceed the cap only by holding one tensor larger than it.
    names = [n for n, g in index['weight_map'].items() if g == f]
    size = (out / f).stat().st_size
    assert size <= 20_000 + 8 + 4096 or len(names) == 1, (f, size)
  assert index['metadata']['total_size'] == sum(
    (out / f).stat().st_size for f in files
  ) - sum(8 + int.from_bytes((out / f).read_bytes()[:8], 'little') for f in files)
  _assert_identical(pqjax.load(out), pqjax.quantize(tree, bits=4)[0])
  # load_float reads the sharded float source, tensor by tensor.
  flat = pqjax.load_float(src)
  assert jax.tree_util.tree_structure(flat) == jax.tree_util.tree_structure(tree)
  for x, y in zip(jax.tree_util.tree_leaves(flat), jax.tree_util.tree_leaves(tree)):
    assert np.asarray(x).dtype == np.asarray(y).dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_single_file_source_and_output(tmp_path):
  tensors = _tensors(1)
  save_file(tensors, tmp_path / 'in.safetensors')
  out = tmp_path / 'out.safetensors'
  pqjax.quantize_checkpoint(tmp_path / 'in.safetensors', out, bits=4)
  _assert_identical(pqjax.load(out), pqjax.quantize(_tree(tensors), bits=4)[0])


def test_float32_and_float16_sources(tmp_path):
  rng = np.random.default_rng(2)
  tensors = {
    'x.kernel': rng.standard_t(3, (96, 64)).astype(np.float32),
    'y.kernel': rng.standard_t(3, (64, 48)).astype(np.float16),
  }
  _write_shards(tmp_path / 'src', tensors)
  pqjax.quantize_checkpoint(tmp_path / 'src', tmp_path / 'out', bits=5)
  _assert_identical(
    pqjax.load(tmp_path / 'out'), pqjax.quantize(_tree(tensors), bits=5)[0]
  )


# --- corrupt inputs: an error naming the file and the tensor, nothing written ---------


def _corrupt_truncated(src: Path) -> tuple[str, ...]:
  shard = sorted(src.glob('*.safetensors'))[0]
  data = shard.read_bytes()
  shard.write_bytes(data[:-100])
  return shard.name, 'truncated'


def _corrupt_missing(src: Path) -> tuple[str, ...]:
  shard = sorted(src.glob('*.safetensors'))[1]
  shard.unlink()
  return shard.name, 'missing'


def _corrupt_index(src: Path) -> tuple[str, ...]:
  index = json.loads((src / 'model.safetensors.index.json').read_text())
  index['weight_map']['ghost.kernel'] = 'model-00001-of-00002.safetensors'
  (src / 'model.safetensors.index.json').write_text(json.dumps(index))
  return 'ghost.kernel', 'model-00001-of-00002.safetensors'


def _corrupt_dtype(src: Path) -> tuple[str, ...]:
  shard = sorted(src.glob('*.safetensors'))[0]
  data = shard.read_bytes()
  n = int.from_bytes(data[:8], 'little')
  head = json.loads(data[8 : 8 + n])
  name = next(k for k in head if k != '__metadata__')
  head[name]['dtype'] = 'F6_E2M3'
  text = json.dumps(head, separators=(',', ':')).encode().ljust(n)
  assert len(text) == n
  shard.write_bytes(data[:8] + text + data[8 + n :])
  return shard.name, name, 'F6_E2M3'


def _corrupt_index_json(src: Path) -> tuple[str, ...]:
  (src / 'model.safetensors.index.json').write_text('{"weight_map": ')
  return 'model.safetensors.index.json', 'not a safetensors index'


@pytest.mark.parametrize(
  'corrupt',
  [
    _corrupt_truncated,
    _corrupt_missing,
    _corrupt_index,
    _corrupt_dtype,
    _corrupt_index_json,
  ],
  ids=['truncated shard', 'missing shard', 'absent tensor', 'dtype', 'bad index'],
)
def test_corrupt_inputs_name_the_file_and_tensor(tmp_path, corrupt):
  src = tmp_path / 'src'
  _write_shards(src, _tensors())
  words = corrupt(src)
  before = {p.name: p.read_bytes() for p in src.iterdir()}
  out = tmp_path / 'out'
  with pytest.raises(pqjax.CheckpointError) as e:
    pqjax.quantize_checkpoint(src, out, bits=4)
  for word in words:
    assert word in str(e.value)
  assert not out.exists()
  assert sorted(os.listdir(tmp_path)) == ['src']
  assert {p.name: p.read_bytes() for p in src.iterdir()} == before


def test_an_already_quantized_checkpoint_is_refused(folder, tmp_path):
  src, _ = folder
  pqjax.quantize_checkpoint(src, tmp_path / 'q.safetensors', bits=4)
  with pytest.raises(pqjax.CheckpointError, match='already quantized'):
    pqjax.quantize_checkpoint(tmp_path / 'q.safetensors', tmp_path / 'again', bits=4)


@pytest.mark.parametrize('kind', ['orbax', 'pqjax orbax'])
def test_orbax_float_checkpoints_stream(folder, tmp_path, kind):
  """An Orbax float checkpoint (saved by Orbax, or by pqjax.save) streams to what
  in-memory quantize gives, read whole or a tile at a time; a quantized one is
  refused."""
  import orbax.checkpoint as ocp

  _, tree = folder
  src = tmp_path / 'src'
  if kind == 'orbax':
    ocp.PyTreeCheckpointer().save(src, tree)
  else:
    pqjax.save(src, tree, format='orbax')
  want = pqjax.quantize(tree, bits=3, granularity=32)[0]
  for working_set in (1 << 30, 1 << 12):
    out = tmp_path / f'out-{working_set}'
    pqjax.quantize_checkpoint(src, out, bits=3, granularity=32, working_set=working_set)
    _assert_identical(pqjax.load(out), want)
  from pqjax.tools.cli import main

  argv = ['quantize', str(src), str(tmp_path / 'cli'), '--bits', '3']
  assert main([*argv, '--format', 'shards', '--granularity', '32']) == 0
  _assert_identical(pqjax.load(tmp_path / 'cli'), want)
  pqjax.save(tmp_path / 'q', want, format='orbax')
  with pytest.raises(pqjax.CheckpointError, match='already quantized'):
    pqjax.quantize_checkpoint(tmp_path / 'q', tmp_path / 'again', bits=4)


def test_nan_names_the_tensor(tmp_path):
  tensors = _tensors()
  tensors['b.kernel'][3, 4] = np.nan
  _write_shards(tmp_path / 'src', tensors)
  with pytest.raises(ValueError, match='b/kernel'):
    pqjax.quantize_checkpoint(tmp_path / 'src', tmp_path / 'out', bits=4)
  assert not (tmp_path / 'out').exists()


# --- a killed process, and memory, in fresh processes ---------------------------------

_CHILD = textwrap.dedent(
  """
  import json, os, sys, time
  import numpy as np, ml_dtypes
  from pathlib import Path
  from safetensors.numpy import save_file
  import pqjax

  src, out, mode = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
  rows, cols, count = 2048, 2048, 8
  if not src.exists():
    src.mkdir()
    rng = np.random.default_rng(0)
    for i in range(count):
      w = rng.standard_t(4, (rows, cols)).astype(ml_dtypes.bfloat16)
      save_file({f'layer{i}.kernel': w}, src / f'part-{i}.safetensors')
  ws = 4 << 20
  if mode == 'memory':
    # Compile with a first run, then measure the peak of a second one only.
    pqjax.quantize_checkpoint(src, out / 'warm', bits=4, working_set=ws)
    def rss(field):
      for line in open('/proc/self/status'):
        if line.startswith(field):
          return int(line.split()[1]) << 10
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')  # resets the peak (VmHWM) to the current RSS
    base = rss('VmRSS')
    pqjax.quantize_checkpoint(src, out / 'measured', bits=4, working_set=ws)
    print(json.dumps({'base': base, 'peak': rss('VmHWM'),
                      'model': rows * cols * count * 2}))
  else:
    print('started', flush=True)
    pqjax.quantize_checkpoint(src, out, bits=4, working_set=ws)
  """
)


def _child(tmp_path: Path, *args: str, **kwargs) -> subprocess.Popen:
  script = tmp_path / 'child.py'
  script.write_text(_CHILD)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  return subprocess.Popen(
    [sys.executable, str(script), *args], env=env, text=True, **kwargs
  )


def _digest(folder: Path) -> dict[str, str]:
  return {
    p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())
  }


@pytest.mark.slow
def test_a_killed_run_leaves_no_valid_output(tmp_path):
  src, out = tmp_path / 'src', tmp_path / 'out'
  # A first run writes the source folder (and a valid output, removed).
  first = _child(tmp_path, str(src), str(out), 'kill', stdout=subprocess.PIPE)
  assert first.wait(timeout=600) == 0
  digest = _digest(src)
  for p in out.iterdir():
    p.unlink()
  out.rmdir()
  child = _child(tmp_path, str(src), str(out), 'kill', stdout=subprocess.PIPE)
  # Killed once it is writing: its shard is in a temporary folder next to out.
  deadline = time.monotonic() + 600
  while not any(tmp_path.glob('.out.*.tmp/out/*.safetensors')):
    assert child.poll() is None, 'finished before it could be killed'
    assert time.monotonic() < deadline
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait(timeout=60)
  assert not out.exists()
  with pytest.raises((pqjax.CheckpointError, FileNotFoundError)):
    pqjax.load(out)
  # What it left is a hidden temporary folder that does not load as a checkpoint.
  (left,) = tmp_path.glob('.out.*.tmp/out')
  with pytest.raises(pqjax.CheckpointError):
    pqjax.load(left)
  assert _digest(src) == digest


@pytest.mark.slow
def test_streaming_memory_is_bounded_by_the_working_set(tmp_path):
  child = _child(
    tmp_path, str(tmp_path / 'src'), str(tmp_path), 'memory', stdout=subprocess.PIPE
  )
  stdout, _ = child.communicate(timeout=900)
  assert child.returncode == 0
  m = json.loads(stdout.strip().splitlines()[-1])
  grown = m['peak'] - m['base']
  # The model is 64 MiB of bfloat16 (128 MiB as float32) in 8 tensors, with a 4 MiB
  # working set; in memory, quantize holds the whole tree and more.
  assert grown < m['model'] / 4, m


# --- a real Hugging Face folder -------------------------------------------------------


@pytest.mark.slow
def test_minilm_folder_by_the_command_line_runs_in_flax_bert(tmp_path):
  from pqjax.tools import cli, minilm

  out = tmp_path / 'minilm-4bit'
  assert cli.main(['quantize', str(minilm.model_dir()), str(out), '--bits', '4']) == 0
  assert (out / 'model.safetensors.index.json').exists()
  model = minilm.load()
  want, _ = pqjax.quantize(model.params, bits=4)
  got = pqjax.load(out)
  _assert_identical(got, want)
  # One scale per output feature: the (384, 1536) kernel from the stored (1536, 384).
  kernel = got['encoder']['layer']['0']['intermediate']['dense']['kernel']
  assert kernel.shape == (384, 1536) and kernel.scale.shape[-1] == 1536
  text = minilm.tokenize(model.tokenizer, ['A quantized model.', 'Streamed from disk.'])
  embed = minilm.embed_fn(pqjax.wrap(model.module.apply))
  np.testing.assert_array_equal(
    minilm.embed_all(embed, got, text), minilm.embed_all(embed, want, text)
  )


def _torch_state(cls, config, seed: int) -> dict[str, np.ndarray]:
  """A PyTorch-layout state dict for ``cls``: its Flax params renamed back
  (``kernel`` -> transposed ``weight``, ``embedding``/``scale`` -> ``weight``)."""
  import flax

  model = cls(config, _do_init=False)
  rng = np.random.default_rng(seed)
  out: dict[str, np.ndarray] = {}
  for path, shape in flax.traverse_util.flatten_dict(model.params_shape_tree).items():
    *parents, last = path
    value = (0.02 * rng.standard_t(4, shape.shape)).astype(ml_dtypes.bfloat16)
    if last == 'kernel':
      value = value.T
    last = {'kernel': 'weight', 'embedding': 'weight', 'scale': 'weight'}.get(last, last)
    out['.'.join((*parents, last))] = np.ascontiguousarray(value)
  if config.tie_word_embeddings and 'lm_head.weight' in out:
    out['lm_head.weight'] = out['model.embed_tokens.weight'].copy()
  return out


def _configs():
  import transformers as tf

  small = dict(vocab_size=512, max_position_embeddings=64)
  llama = dict(
    hidden_size=64,
    intermediate_size=176,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    **small,
  )
  return {
    'Llama': (tf.LlamaConfig(**llama, tie_word_embeddings=False), 'LlamaForCausalLM'),
    'Llama, tied': (
      tf.LlamaConfig(**llama, tie_word_embeddings=True),
      'LlamaForCausalLM',
    ),
    'Mistral': (
      tf.MistralConfig(**llama, tie_word_embeddings=False),
      'MistralForCausalLM',
    ),
    'Gemma': (tf.GemmaConfig(**llama, head_dim=16), 'GemmaForCausalLM'),
    'BERT': (
      tf.BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        **small,
      ),
      'BertModel',
    ),
    'GPT-2': (
      tf.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=64, vocab_size=512),
      'GPT2LMHeadModel',
    ),
  }


@pytest.mark.slow
@pytest.mark.parametrize(
  'arch', ['Llama', 'Llama, tied', 'Mistral', 'Gemma', 'BERT', 'GPT-2']
)
def test_hugging_face_layouts_follow_transformers(tmp_path, arch):
  """A sharded PyTorch-layout folder streams into the tree that transformers' own
  conversion (``from_pretrained(from_pt=True)`` of the same weights in one file) gives,
  quantized as in memory."""
  import transformers as tf

  config, name = _configs()[arch]
  config.architectures = [name]
  cls = getattr(tf, f'Flax{name}')
  state = _torch_state(cls, config, seed=3)
  sharded, single = tmp_path / 'sharded', tmp_path / 'single'
  single.mkdir()
  save_file(state, single / 'model.safetensors', metadata={'format': 'pt'})
  if config.tie_word_embeddings and 'lm_head.weight' in state:
    # Saved tied, as transformers does: the head is the embedding (Flax's Llama has
    # a head of its own, which the reference gets from the embedding).
    np.testing.assert_array_equal(
      state.pop('lm_head.weight'), state['model.embed_tokens.weight']
    )
  _write_shards(sharded, state, split=3)
  for folder in (sharded, single):
    config.save_pretrained(folder)
  reference = cls.from_pretrained(single, from_pt=True).params
  want = pqjax.quantize(reference, bits=4, output_axis=_gpt2_output_axis)[0]
  pqjax.quantize_checkpoint(sharded, tmp_path / 'out', bits=4)
  got = pqjax.load(tmp_path / 'out')
  _assert_identical(got, want)
  if arch == 'GPT-2':
    # Conv1D kernels are (out, in): one scale per output feature, and the model
    # runs them through the products that read codes.
    q = got['transformer']['h']['0']['attn']['c_attn']['kernel']
    assert q.transposed and q.shape == (192, 64) and q.scale.shape == (1, 192)
    model = cls(config, _do_init=False)
    ids = jnp.arange(12).reshape(2, 6) % config.vocab_size
    mask, positions = jnp.ones_like(ids), jnp.broadcast_to(jnp.arange(6), ids.shape)
    run = lambda p: model.module.apply({'params': p}, ids, mask, positions).logits
    y = jax.jit(pqjax.wrap(run, products='fused'))(got)
    np.testing.assert_allclose(y, run(pqjax.dequantize(got)), rtol=1e-4, atol=1e-4)
    paths = {p.weight: p.path for p in pqjax.quantized_products(run, got)}
    assert paths['0/transformer/h/0/attn/c_attn/kernel'] != 'decode'
    assert paths['0/transformer/h/0/mlp/c_proj/kernel'] != 'decode'
    np.testing.assert_allclose(jax.jit(pqjax.wrap(run))(got), y, rtol=1e-4, atol=1e-4)
  if arch.startswith('Llama'):
    # Transposed kernels read in parts: stored rows, codes written by columns.
    pqjax.quantize_checkpoint(sharded, tmp_path / 'parts', bits=4, working_set=1 << 12)
    _assert_identical(pqjax.load(tmp_path / 'parts'), want)


def _gpt2_output_axis(path, leaf):
  """GPT-2's Conv1D kernels hold their output features first."""
  module, name = path.split('/')[-2:]
  return -2 if name == 'kernel' and module in ('c_attn', 'c_proj', 'c_fc') else -1


def test_a_folder_without_flax_rules_is_a_clear_error(tmp_path):
  _write_shards(tmp_path / 'src', _tensors())
  (tmp_path / 'src' / 'config.json').write_text(
    json.dumps({'architectures': ['NoSuchModel'], 'model_type': 'nosuch'})
  )
  match = 'no Flax class for.*layout="none" or "torch"'
  with pytest.raises(pqjax.CheckpointError, match=match):
    pqjax.quantize_checkpoint(tmp_path / 'src', tmp_path / 'out', bits=4)
  # Its own layout still works.
  pqjax.quantize_checkpoint(tmp_path / 'src', tmp_path / 'out', bits=4, layout='none')
  _assert_identical(
    pqjax.load(tmp_path / 'out'), pqjax.quantize(_tree(_tensors()), bits=4)[0]
  )
