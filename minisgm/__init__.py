"""minisgm: a small, complete and checked library of score-based generative models.

Companion package of the minisgm book. Modules follow the book's chapters:
``data`` (toy distributions with exact scores, digits, CIFAR-10), ``ebm``, ``score_matching``,
``langevin``, ``sde``, ``samplers``, ``likelihood``, ``models``, ``metrics``, ``train``
(with ``sample``, ``evaluate`` and ``convert``, which imports score_sde_pytorch checkpoints).
"""

__version__ = "0.1.0"
