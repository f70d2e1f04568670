"""The Keras models: ImageNet backbones, shared blocks, and one module per approach under ``approaches``."""
