"""Data: the example sets, the on-disk shard format, streaming and collation. Never imports model/ or engine/."""

IGNORE = -100  # the label of a position no loss counts (padding, unmasked tokens): PyTorch's ignore_index, as HF
