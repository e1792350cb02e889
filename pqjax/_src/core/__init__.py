"""The quantized array and its operator: the grid, packing, scale blocks, leaves."""
