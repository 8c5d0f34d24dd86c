"""Training and evaluation data made offline: synthetic scenes, real handwritten digits, LLaVA-format files."""
