"""pqjax for Flax NNX models: quantized module objects that run wherever called.

``model_q, alphas = pqjax.nnx.quantize(model, bits=4)`` gives a model whose
parameters are :class:`pqjax.QArray` and whose modules run on them directly, under
``nnx.jit``, and after ``nnx.split``/``nnx.merge`` inside any ``jax.jit`` (samplers,
trainers): see :mod:`pqjax._src.modules`.
"""

from pqjax._src.modules import dequantize as dequantize
from pqjax._src.modules import load_params as load_params
from pqjax._src.modules import params as params
from pqjax._src.modules import quantize as quantize

__all__ = ['dequantize', 'load_params', 'params', 'quantize']
