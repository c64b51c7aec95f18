"""Code used by more than one stage: configuration, storage, backbones, images, label sets."""

__version__ = "0.1.0"
