"""pqjax: data-free power quantization (PowerQuant) of JAX parameter pytrees."""

from pqjax.apply import wrap
from pqjax.qarray import QArray, dequantize
from pqjax.quantize import quantize
from pqjax.search import SearchConfig

__all__ = ['QArray', 'SearchConfig', 'dequantize', 'quantize', 'wrap']
__version__ = '0.1.0'
