"""Training methods beyond a task's own loss, one file each: a frozen teacher (distill.py: knowledge distillation and
learning without forgetting) and replay of earlier data (replay.py). Imported by the fine-tuning entry point; they
use tasks/, model/ and data/, and nothing there imports them."""
