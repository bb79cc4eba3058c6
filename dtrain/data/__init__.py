"""Data: the example sets, the on-disk shard format, streaming and collation. Never imports model/ or engine/."""
