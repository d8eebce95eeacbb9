"""attnjax: attention blocks for computer vision in JAX/Flax, and a system to train them.

from attnjax import blocks, models
block = blocks.create("seed")                       # a flax.linen.Module, NHWC -> NHWC
net = models.create("attention_net", num_classes=10, block="seed")
"""

from attnjax import blocks, models

__version__ = "0.1.0"
__all__ = ["blocks", "models", "__version__"]
