"""Config -> objects: the one place where a run's config becomes data, an SDE, a model, a score
function and samples; the command lines are thin layers on top, and imports run one way::

    {data, models, sde, samplers, config, checkpoint}  <-  build  <-  {train, sample, evaluate, convert}

Data sets are described once (:func:`dataset_info`, :func:`load_images`); :func:`to_model_space` /
:func:`to_unit_range` map ``[0, 1]`` images to the model's space and back. Book: :ref:`sec-scaling-up`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor, nn

from . import data as data_lib
from . import samplers
from . import sde as sde_lib
from .checkpoint import CheckpointError, load_checkpoint, load_state_dict_checked
from .config import TOY_DATASETS, Config, ConfigError, ModelConfig, config_from_dict

__all__ = ["DatasetInfo", "dataset_info", "to_model_space", "to_unit_range", "load_images",
           "TrainingData", "build_data", "build_sde", "build_model", "score_fn_of", "Run",
           "load_run", "open_run", "SAMPLERS", "SAMPLER_OPTIONS", "add_sampler_options", "sampler_options",
           "generate", "configure_threads", "resolve_device", "n_classes_of"]


# ----- Data sets: one table -------------------------------------------------------------------
class DatasetInfo(NamedTuple):
    """What the package needs to know about a data set without loading it."""

    shape: Tuple[int, ...]  # one example, as the model sees it
    levels: int  # grey levels of a pixel (17 for the digits, 256 for 8-bit images; 0: continuous)
    n_classes: int  # labels the data carries (0: none)

    @property
    def images(self) -> bool:
        return self.levels > 0


def dataset_info(data_cfg) -> DatasetInfo:
    """The :class:`DatasetInfo` of ``data_cfg.dataset``. For ``folder``/``npz`` the shape and
    class count are those recorded in the config when training started (:meth:`TrainingData`)."""
    name = data_cfg.dataset
    if name == "digits":
        return DatasetInfo((1, 8, 8), 17, 10)
    if name == "cifar10":
        return DatasetInfo((3, 32, 32), 256, 10)
    if name in TOY_DATASETS:
        return DatasetInfo((2,), 0, 0)
    if name in ("folder", "npz"):
        if not (data_cfg.image_size and data_cfg.channels):
            raise ConfigError(f"data.dataset={name}: the image size and channels are not known yet "
                              "(they are read from the data when training starts)")
        s = data_cfg.image_size
        return DatasetInfo((data_cfg.channels, s, s), 256, data_cfg.num_classes)
    raise ConfigError(f"unknown data.dataset {name!r}")


def n_classes_of(data_cfg) -> int:
    """Classes a model of this config is conditioned on (0 for unconditional runs)."""
    return dataset_info(data_cfg).n_classes if data_cfg.class_conditional else 0


def to_model_space(x01: Tensor, data_cfg) -> Tensor:
    """Images in ``[0, 1]`` -> the model's space: ``2 x - 1`` when ``data.centered``, else as is."""
    return x01 * 2 - 1 if data_cfg.centered else x01


def to_unit_range(x: Tensor, data_cfg) -> Tensor:
    """The model's space -> images in ``[0, 1]`` (not clipped)."""
    return (x + 1) / 2 if data_cfg.centered else x


def data_path(data_cfg) -> str:
    """``data.path``, or a ``ConfigError`` saying how to give it (minisgm never downloads data)."""
    if not data_cfg.path:
        raise ConfigError(f"this run's config has no data.path: name the {data_cfg.dataset} data with --data.path "
                          "(train, convert) or --data-path (evaluate); minisgm never downloads data")
    return data_cfg.path


def load_images(data_cfg, train: bool = True) -> Tuple[Tensor, Optional[Tensor]]:
    """The integer pixel levels ``[N, C, H, W]`` and labels (or ``None``) of an image data set;
    ``train=False``: the digits' test split (:func:`digits_split`), CIFAR-10's test batch (folders
    and array files have no held-out split: their training images)."""
    name = data_cfg.dataset
    if name in ("cifar10", "folder", "npz"):
        data_path(data_cfg)
    if name == "digits":
        from .digit_features import digits_split

        levels, labels = data_lib.load_digits(return_int=True)
        train_idx, test_idx = digits_split()
        if train and not data_cfg.holdout:
            return levels, labels
        idx = train_idx if train else test_idx
        return levels[idx], labels[idx]
    if name == "cifar10":
        images, labels = data_lib.load_cifar10(data_cfg.path, train=train)
        return images, torch.as_tensor(labels)
    if name == "folder":
        images, labels, _ = data_lib.load_image_folder(data_cfg.path, data_cfg.image_size, data_cfg.channels)
        return images, labels
    if name == "npz":
        return data_lib.load_npz(data_cfg.path)
    raise ConfigError(f"data.dataset={name} has no images to load")


def _mix(*ints: int) -> int:
    """A 63-bit seed from integers (splitmix64-style), so (seed, step, shard) seeds do not collide."""
    h = 0x9E3779B97F4A7C15
    for v in ints:
        h ^= (int(v) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)) & 0xFFFFFFFFFFFFFFFF
        h = (h * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class TrainingData:
    """A training set with a deterministic, resumable batch order.

    Finite data sets walk through one random permutation per epoch (seeded by ``(seed, epoch)``);
    the global batch of step ``s`` (0-based) covers positions ``s B ... s B + B - 1`` of that
    endless sequence. Toy data, flips and dequantisation use the shard's generator, so everything
    depends only on ``(seed, step, shard)``. For ``folder`` and ``npz`` data the image size,
    channels and class count found in the data are written into ``cfg.data``.
    """

    def __init__(self, data_cfg, seed: int, device: torch.device):
        self.cfg, self.seed, self.device = data_cfg, seed, device
        self.images: Optional[Tensor] = None
        self.labels: Optional[Tensor] = None
        self.toy: Optional[Callable] = None
        if data_cfg.dataset in TOY_DATASETS:
            self.toy = getattr(data_lib, data_cfg.dataset)
            self.info = dataset_info(data_cfg)
            return
        images, labels = load_images(data_cfg, train=True)
        if data_cfg.dataset in ("folder", "npz"):
            data_cfg.channels, data_cfg.image_size = int(images.shape[1]), int(images.shape[2])
            if images.shape[2] != images.shape[3]:
                raise ConfigError(f"the images are {images.shape[2]}x{images.shape[3]}: square images are needed; "
                                  "set --data.image_size N to centre-crop them to N x N")
            data_cfg.num_classes = 0 if labels is None else int(labels.max()) + 1
        if data_cfg.class_conditional and labels is None:
            raise ConfigError("data.class_conditional needs labels: put the images of each class in a sub-folder "
                              "(folder) or add a 'labels' array (npz)")
        self.info = dataset_info(data_cfg)
        self.images = images.to(device)
        self.labels = None if labels is None else labels.to(device)
        self._perm_epoch, self._perm = -1, None

    @property
    def shape(self) -> Tuple[int, ...]:
        """Shape of one example."""
        return self.info.shape

    def __len__(self) -> int:
        return 0 if self.images is None else self.images.shape[0]

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(_mix(self.seed, epoch, 0x5EED))
            self._perm = torch.randperm(len(self), generator=g).to(self.device)
            self._perm_epoch = epoch
        return self._perm

    def indices(self, step: int, batch_size: int) -> Tensor:
        """Dataset indices ``[batch_size]`` of the global batch of ``step`` (no tensor is read back)."""
        n, start = len(self), step * batch_size
        parts, pos = [], start
        while pos < start + batch_size:  # the batch may straddle an epoch boundary
            epoch, offset = divmod(pos, n)
            take = min(n - offset, start + batch_size - pos)
            parts.append(self._permutation(epoch)[offset : offset + take])
            pos += take
        return torch.cat(parts)

    def batch(self, step: int, shard: int, n_shards: int, batch_size: int,
              generator: torch.Generator) -> Tuple[Tensor, Optional[Tensor]]:
        """Shard ``shard`` of ``n_shards`` of step ``step``'s global batch: ``(x, y or None)``."""
        b = batch_size // n_shards
        if self.toy is not None:
            return self.toy(b, generator=generator, device=self.device).to(self.device, torch.float32), None
        idx = self.indices(step, batch_size)[shard * b : (shard + 1) * b]
        k = self.images[idx].to(torch.float32)
        levels = self.info.levels
        if self.cfg.uniform_dequantization:
            u = torch.rand(k.shape, generator=generator, device=generator.device).to(self.device)
            x01 = (k + u) / levels
        else:
            x01 = k / (levels - 1)
        if self.cfg.random_flip:
            flip = torch.rand(b, generator=generator, device=generator.device).to(self.device) < 0.5
            x01 = torch.where(flip[:, None, None, None], x01.flip(-1), x01)
        y = self.labels[idx] if self.cfg.class_conditional else None
        return to_model_space(x01, self.cfg), y


def build_data(cfg: Config, device: torch.device) -> TrainingData:
    """The training data of ``cfg.data`` (loaded once, kept on ``device``)."""
    try:
        return TrainingData(cfg.data, cfg.train.seed, device)
    except (FileNotFoundError, NotADirectoryError, ValueError) as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot load data.dataset={cfg.data.dataset} from {cfg.data.path!r}: {err}") from None


# ----- The SDE, the model, its score ----------------------------------------------------------
def build_sde(sde_cfg) -> sde_lib.SDE:
    """The SDE of ``cfg.sde``, with its ``eps`` (the smallest time of training, sampling and
    likelihoods) set from ``sde.eps`` when given."""
    if sde_cfg.kind == "ve":
        return sde_lib.VESDE(sde_cfg.sigma_min, sde_cfg.sigma_max, sde_cfg.exact_variance, eps=sde_cfg.eps)
    if sde_cfg.kind == "vp":
        return sde_lib.VPSDE(sde_cfg.beta_min, sde_cfg.beta_max, eps=sde_cfg.eps)
    if sde_cfg.kind == "subvp":
        return sde_lib.SubVPSDE(sde_cfg.beta_min, sde_cfg.beta_max, eps=sde_cfg.eps)
    raise ConfigError(f"sde.kind must be ve, vp or subvp, got {sde_cfg.kind!r}")


def build_model(cfg: Config, sde: Optional[sde_lib.SDE] = None) -> nn.Module:
    """The score network ``model(x, t[, y]) -> score`` of ``cfg.model`` for ``cfg.data``.

    Its output is divided by the marginal std ``sigma_t`` of ``sde`` (default ``build_sde(cfg.sde)``;
    Song & Ermon 2020, technique 3). NCSN++ takes ``centered``, classes, size and channels from
    ``cfg.data``.
    """
    sde = build_sde(cfg.sde) if sde is None else sde
    shape = dataset_info(cfg.data).shape
    num_classes = n_classes_of(cfg.data) or None
    m = cfg.model
    marginal_std = lambda t: sde.marginal_coeffs(t)[1]  # noqa: E731
    try:
        if isinstance(m, ModelConfig):
            from .models import ScoreMLP, SmallUNet

            if m.arch == "mlp":
                if len(shape) != 1:
                    raise ConfigError(f"model.arch=mlp needs flat (toy) data, got examples of shape {list(shape)}")
                return ScoreMLP(dim=shape[0], hidden=m.hidden, n_layers=m.n_layers, embed_dim=m.embed_dim,
                                embedding=m.embedding, marginal_std=marginal_std, num_classes=num_classes)
            if len(shape) != 3:
                raise ConfigError(f"model.arch=unet needs images [C, H, W], got examples of shape {list(shape)}")
            return SmallUNet(in_channels=shape[0], base_channels=m.nf, channel_mults=tuple(m.ch_mult),
                             num_res_blocks=m.num_res_blocks, embed_dim=m.embed_dim, num_classes=num_classes,
                             dropout=m.dropout, marginal_std=marginal_std, attention=m.attention,
                             embedding=m.embedding)
        from .models.ncsnpp import NCSNpp

        if len(shape) != 3 or shape[1] != shape[2]:
            raise ConfigError(f"NCSN++ needs square images [C, H, H], got examples of shape {list(shape)}")
        m = dataclasses.replace(m, centered=cfg.data.centered, num_classes=num_classes,
                                num_channels=shape[0], image_size=shape[1])
        return NCSNpp(m, sde)
    except ValueError as err:  # a model that cannot be built from these (valid-looking) numbers
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"cannot build the model of this config: {err}") from None


def score_fn_of(model: nn.Module, y: Optional[Tensor] = None, autocast: bool = False) -> Callable[[Tensor, Tensor], Tensor]:
    """``score_fn(x, t)`` of a model, with class labels ``y`` bound if given; float32 output.
    ``autocast`` runs the network in bfloat16 on the model's device."""
    device_type = next(model.parameters()).device.type
    ctx = (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if autocast else contextlib.nullcontext

    def score_fn(x: Tensor, t: Tensor) -> Tensor:
        with ctx():
            out = model(x, t) if y is None else model(x, t, y)
        return out.float()

    return score_fn


# ----- Runs -----------------------------------------------------------------------------------
class Run(NamedTuple):
    """A trained run, loaded: the model (eval mode, on its device), its config, SDE and step."""

    model: nn.Module
    cfg: Config
    sde: sde_lib.SDE
    step: int


def load_run(path: str | Path, device: torch.device | str = "cpu", use_ema: bool = True) -> Run:
    """Rebuild a :class:`Run` from a run folder or checkpoint file, with the EMA weights (or the raw ones);
    :class:`CheckpointError` if it is missing, corrupt, lacks the weights or does not fit its config."""
    state = load_checkpoint(path, map_location=device)
    try:
        cfg = config_from_dict(state["config"])
    except ConfigError as err:
        raise CheckpointError(f"the config stored in the checkpoint at {path} is invalid: {err}") from None
    sde = build_sde(cfg.sde)
    model = build_model(cfg, sde)
    key = "ema" if use_ema else "model"
    if key not in state:
        raise CheckpointError(f"the checkpoint at {path} holds no {key!r} weights"
                              + (" (use --no-ema for the raw weights)" if use_ema else ""))
    load_state_dict_checked(model, state[key], "EMA" if use_ema else "model")
    model.to(device).eval().requires_grad_(False)
    return Run(model, cfg, sde, int(state["step"]))


def open_run(args) -> Tuple[Run, torch.device]:
    """For the command lines: set the CPU threads (``args.threads``; a note is printed when the
    machine is busy) and load the run of ``args.ckpt`` on ``args.device`` (EMA weights unless
    ``args.no_ema``). Raises ``ValueError``/:class:`CheckpointError` with a one-line message."""
    device = resolve_device(args.device)
    note = configure_threads(args.threads, device_type=device.type)
    run = load_run(args.ckpt, device, use_ema=not args.no_ema)
    if note:  # after loading, so that a bad checkpoint is reported in one line
        print(note, file=sys.stderr)
    return run, device


# ----- Sampling -------------------------------------------------------------------------------
SAMPLERS: Dict[str, Callable[..., Tuple[Tensor, int]]] = {
    "em": samplers.euler_maruyama_sample,
    "pc": samplers.pc_sample,
    "ode": samplers.ode_sample,
    "heun": samplers.heun_sample,
    "ddim": samplers.ddim_sample,
    "dpm_solver": samplers.dpm_solver_sample,
    "edm": samplers.edm_sample,
}
"""The sampler names of the config and the command line -> the functions of :mod:`minisgm.samplers`
(all with the shared signature ``f(score_fn, sde, shape, n_steps, **options) -> (x, nfe)``)."""


SAMPLER_OPTIONS = {  # command-line option: (the one sampler it belongs to, its keyword there, its values, help)
    "snr": ("pc", "snr", "> 0", "the Langevin corrector's signal-to-noise ratio (default: the run's sample.snr)"),
    "corrector": ("dpm_solver", "corrector", "on|off", "UniPC's corrector (default: on from 15 steps); worth trying "
                  "on below 15 with a learned model"),
    "gaussian-std": ("dpm_solver", "gaussian_std", ">= 0", "the std of the Gaussian data whose ODE the solver's "
                     "linear part solves exactly (default: 0.1 from 15 steps, else 0: DPM-Solver++)"),
    "eta": ("ddim", "eta", ">= 0", "0: deterministic (default), 1: ancestral, between: interpolates"),
    "churn": ("edm", "S_churn", ">= 0", "EDM's stochastic sampler's S_churn (default 0: deterministic Heun)"),
}
"""Options of a single sampler on the command lines of ``minisgm.sample`` and ``minisgm.evaluate``;
values ``on|off`` (a bool), or a number ``> 0`` or ``>= 0``."""


def add_sampler_options(p) -> None:
    """Add the :data:`SAMPLER_OPTIONS` to an ``argparse`` parser (each ``None`` unless given)."""
    for name, (sampler, _, values, text) in SAMPLER_OPTIONS.items():
        if values == "on|off":
            p.add_argument(f"--{name}", choices=["on", "off"], default=None, help=f"{sampler} only: {text}")
        else:
            p.add_argument(f"--{name}", type=float, default=None, help=f"{sampler} only, {values}: {text}")


def sampler_options(p, args, sampler: str) -> Dict[str, Any]:
    """The keyword arguments for ``sampler`` from the parsed :data:`SAMPLER_OPTIONS`; an option of
    another sampler, or a value out of range, is a parser error (exit 2), not silently ignored."""
    options: Dict[str, Any] = {}
    for name, (owner, keyword, values, _) in SAMPLER_OPTIONS.items():
        value = getattr(args, name.replace("-", "_"), None)
        if value is None:
            continue
        if sampler != owner:
            p.error(f"--{name} is an option of --sampler {owner}, not {sampler}")
        if values == "on|off":
            value = value == "on"
        elif not (value > 0 if values == "> 0" else value >= 0):  # NaN fails both
            p.error(f"--{name} must be {values}, got {value}")
        options[keyword] = value
    return options


@torch.no_grad()
def generate(model: nn.Module, cfg: Config, sde: sde_lib.SDE, n: int, *, sampler: Optional[str] = None,
             n_steps: Optional[int] = None, generator: Optional[torch.Generator] = None,
             y: Optional[Tensor] = None, device: torch.device | str | None = None, batch_size: int = 0,
             autocast: bool = False, progress: Optional[Callable[[int], None]] = None,
             callback: Optional[Callable[[int, float, Tensor], None]] = None, **options) -> Tuple[Tensor, int]:
    """``n`` samples ``[n, *shape]`` in the model's space and their total NFE.

    ``sampler`` and ``n_steps`` default to the run's ``sample`` config; ``batch_size`` 0 draws all at
    once; ``y`` (``[n]`` labels) is for class-conditional models; ``options`` go to the sampler.
    ``progress(1)`` and the samplers' ``callback(i, t, x)`` are called after each step (no host sync).
    """
    sampler = sampler or cfg.sample.sampler
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    n_steps = n_steps or cfg.sample.n_steps
    options = {**({"snr": cfg.sample.snr} if sampler == "pc" else {}), **options}  # the config's PC snr
    shape = dataset_info(cfg.data).shape
    bs = n if batch_size <= 0 else min(batch_size, n)
    was_training = model.training
    model.eval()
    out, nfe_total = [], 0
    if progress is not None:
        user_callback = callback

        def callback(i: int, t: float, x: Tensor) -> None:
            progress(1)
            if user_callback is not None:
                user_callback(i, t, x)
    try:
        for i in range(0, n, bs):
            fn = score_fn_of(model, None if y is None else y[i : i + bs], autocast)
            x, nfe = SAMPLERS[sampler](fn, sde, (min(bs, n - i), *shape), n_steps, generator=generator,
                                       device=device, callback=callback, **options)
            out.append(x.float())
            nfe_total += nfe
    finally:
        model.train(was_training)
    return torch.cat(out), nfe_total


# ----- Process set-up shared by the command lines ---------------------------------------------
def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cpu``, ``cuda`` or ``cuda:N`` (``ValueError`` otherwise)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device {name!r}: minisgm runs on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r} but CUDA is not available here; use --device cpu")
    return device


def _progress_bar(total: Optional[int], desc: str, unit: str = "step"):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=0.5, file=sys.stderr)


def configure_threads(requested: int = 0, option: str = "--threads", device_type: str = "cpu") -> Optional[str]:
    """Set PyTorch's CPU threads; returns a note for the user when the choice is not the obvious one.

    ``requested > 0`` is used as is; ``0``: ``OMP_NUM_THREADS`` if set, else one thread per idle
    core (one-minute load average). PyTorch's one per core oversubscribes a busy machine: digits
    trained several times slower with 2 threads than with 1 on 2 cores next to other work.
    ``option`` is the command line's option for the thread count, named in the note; the note is
    only for work on the CPU (``device_type``): on a GPU the CPU threads hardly matter.
    """
    if requested > 0:
        torch.set_num_threads(requested)
        return None
    if os.environ.get("OMP_NUM_THREADS"):
        return None
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        return None
    idle = max(1, min(cores, int(cores - load + 0.5)))
    if idle < cores:
        torch.set_num_threads(idle)
        if device_type != "cpu":
            return None
        return (f"note: the machine is busy (load {load:.1f} on {cores} cores): using {idle} CPU thread"
                f"{'s' if idle > 1 else ''} (set {option} N or OMP_NUM_THREADS to choose)")
    return None
