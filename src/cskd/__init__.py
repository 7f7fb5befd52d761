"""cskd: Cumulative Spatial Knowledge Distillation for Vision Transformers."""
