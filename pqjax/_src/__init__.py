"""The implementation of pqjax; the public API is the ``pqjax`` package."""
