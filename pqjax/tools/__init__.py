"""Applications built on the public API: the CLI, the demo, reports, the bundled model."""
