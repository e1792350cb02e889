"""pqjax internals."""
