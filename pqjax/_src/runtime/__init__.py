"""Running models on quantized parameters: ``wrap``, activation quantization."""
