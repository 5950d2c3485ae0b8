"""minisgm: a small, complete and checked library of score-based generative models.

Companion package of the minisgm book; modules follow its chapters: ``data`` (toy distributions
with exact scores, digits, CIFAR-10, your own images), ``ebm``, ``score_matching``, ``langevin``,
``sde``, ``samplers``, ``likelihood``, ``guidance``, ``models``, ``metrics``. Runs: ``config``
(presets and options), ``build`` (config -> objects), ``checkpoint``, ``images``, the command lines
``train``, ``sample``, ``evaluate`` and ``convert`` (imports score_sde_pytorch checkpoints); ``checks``:
the shared input checks (tensor values only with ``MINISGM_DEBUG=1``).
"""

__version__ = "0.1.0"
