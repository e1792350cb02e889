"""The exponent and clip search: binned statistics, the objective, the optimiser."""
