"""pqjax: data-free power quantization (PowerQuant) of JAX parameter pytrees."""

from pqjax.apply import wrap
from pqjax.checkpoint import (
  CheckpointError,
  load_orbax,
  load_safetensors,
  save_orbax,
  save_safetensors,
)
from pqjax.qarray import QArray, dequantize
from pqjax.quantize import quantize
from pqjax.search import SearchConfig
from pqjax.sizes import Summary, nbytes, summary

__all__ = ['CheckpointError', 'QArray', 'SearchConfig', 'Summary', 'dequantize',
           'load_orbax', 'load_safetensors', 'nbytes', 'quantize', 'save_orbax',
           'save_safetensors', 'summary', 'wrap']
__version__ = '0.1.0'
