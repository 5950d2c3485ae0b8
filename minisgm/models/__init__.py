"""Score networks: time / noise embeddings, MLPs for vector data, a small U-Net for 8x8 images,
noise-conditional classifiers for guidance, and the NCSN++/DDPM++ U-Nets for CIFAR-10.
Book: :ref:`sec-score-networks`.

Every score network is called as ``model(x, t)`` (plus ``y`` when class-conditional) and
fits the package-wide score signature ``score(x [B, ...], t [B]) -> tensor like x``.
"""

from .classifier import TimeConditionedClassifier
from .embeddings import ClassEmbedding, GaussianFourierProjection, SinusoidalEmbedding, TimeEmbedding
from .mlp import MLP, ScoreMLP
from .ncsnpp import (NCSNpp, NCSNppConfig, ddpmpp_cifar10, ddpmpp_deep_cifar10, ddpmpp_small, ncsnpp_cifar10,
                     ncsnpp_deep_cifar10, ncsnpp_small)
from .unet import SmallUNet

__all__ = ["GaussianFourierProjection", "SinusoidalEmbedding", "TimeEmbedding", "ClassEmbedding",
           "MLP", "ScoreMLP", "SmallUNet", "TimeConditionedClassifier", "NCSNpp", "NCSNppConfig",
           "ncsnpp_cifar10", "ddpmpp_cifar10", "ncsnpp_deep_cifar10", "ddpmpp_deep_cifar10",
           "ncsnpp_small", "ddpmpp_small"]
