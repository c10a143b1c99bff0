"""Tensor parallelism: the rank's process group and the post-load sharding transform."""
