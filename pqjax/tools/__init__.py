"""Tools built on pqjax: real sentences for fidelity checks."""
