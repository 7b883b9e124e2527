"""The host layer: data shard files, byte reads, and turning bytes into numpy arrays."""
