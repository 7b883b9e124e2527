"""The format layer: pure parsers of TensorBundle bytes (FORMAT.md sections 0-6). No file I/O here
except reading the small ``.index``/``checkpoint`` files whole; data shards are the host layer's."""
