"""Models: BERT presets, HF checkpoints, the pretraining head on masked positions only, task heads."""
