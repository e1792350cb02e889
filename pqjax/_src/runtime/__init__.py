"""What runs inside the user's jitted program: decoding, products, kernels."""
