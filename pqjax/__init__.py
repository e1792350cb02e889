"""pqjax: data-free power quantization (PowerQuant) of JAX parameter pytrees."""

from pqjax import lora as lora
from pqjax import nnx as nnx
from pqjax._src.core.leaves import path_str as path_str
from pqjax._src.core.qarray import QArray as QArray
from pqjax._src.core.qarray import dequantize as dequantize
from pqjax._src.core.qarray import quantized_leaves as quantized_leaves
from pqjax._src.io.orbax import load as load_orbax
from pqjax._src.io.orbax import save as save_orbax
from pqjax._src.io.registry import load as load
from pqjax._src.io.registry import load_float as load_float
from pqjax._src.io.registry import save as save
from pqjax._src.io.safetensors import load as load_safetensors
from pqjax._src.io.safetensors import save as save_safetensors
from pqjax._src.io.treespec import CheckpointError as CheckpointError
from pqjax._src.options import QuantizeOptions as QuantizeOptions
from pqjax._src.quantize import quantize as quantize
from pqjax._src.runtime.native.library import NativeStatus as NativeStatus
from pqjax._src.runtime.native.library import status as native_status
from pqjax._src.runtime.products import Product as Product
from pqjax._src.runtime.wrap import quantized_products as quantized_products
from pqjax._src.runtime.wrap import wrap as wrap
from pqjax._src.search.config import SearchConfig as SearchConfig
from pqjax._src.streaming import quantize_checkpoint as quantize_checkpoint
from pqjax._src.summary import LeafSummary as LeafSummary
from pqjax._src.summary import Summary as Summary
from pqjax._src.summary import nbytes as nbytes
from pqjax._src.summary import relative_error as relative_error
from pqjax._src.summary import summary as summary
from pqjax._src.version import __version__ as __version__

__all__ = (
  'CheckpointError',
  'LeafSummary',
  'NativeStatus',
  'Product',
  'QArray',
  'QuantizeOptions',
  'SearchConfig',
  'Summary',
  'dequantize',
  'load',
  'load_float',
  'load_orbax',
  'load_safetensors',
  'lora',
  'native_status',
  'nbytes',
  'nnx',
  'path_str',
  'quantize',
  'quantize_checkpoint',
  'quantized_leaves',
  'quantized_products',
  'relative_error',
  'save',
  'save_orbax',
  'save_safetensors',
  'summary',
  'wrap',
)
