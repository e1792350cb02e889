"""LoRA adapters on a frozen quantized base (QLoRA), trained with optax.

``params_l = pqjax.lora.init(params_q, rank=8, key=key)`` attaches an adapter to
each quantized leaf; ``pqjax.wrap(apply_fn)`` runs the model on ``params_l``;
``adapters, frozen = pqjax.lora.split(params_l)`` gives an optimiser the adapters
alone, ``pqjax.lora.merge(adapters, frozen)`` puts them back, and
``pqjax.lora.fold(params_l, bits=4)`` folds them into a plain quantized tree: see
:mod:`pqjax._src.lora`. For a model from :func:`pqjax.nnx.quantize`,
``pqjax.lora.init(pqjax.nnx.params(model_q), ...)`` and
``pqjax.nnx.load_params(model_q, params_l)`` put adapters into the model.
"""

from pqjax._src.core.qarray import LoraArray as LoraArray
from pqjax._src.lora import fold as fold
from pqjax._src.lora import init as init
from pqjax._src.lora import mask as mask
from pqjax._src.lora import merge as merge
from pqjax._src.lora import split as split

__all__ = ['LoraArray', 'fold', 'init', 'mask', 'merge', 'split']
