"""pytest-benchmark configuration: the same cases as `rlfuse bench`, one test per variant."""
