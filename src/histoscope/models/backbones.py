"""Backbone registry: feature extractors for tiles, in the manner of timm.

A backbone maps a normalised float batch ``(B, 3, H, W)`` to pooled features
``(B, D)``. Each comes with a frozen :class:`InputSpec` saying what it expects:
the tile edge in pixels, the µm/px the tiles are read at and the per-channel
mean/std used to normalise them.

Names resolve in this order:

1. names registered here with :func:`register_backbone` (our own small CNNs
   ``hs_cnn_*`` and the tiny ``test_*`` variants used by the tests);
2. ``open_clip:<model>`` when :mod:`open_clip` is importable (its visual tower);
3. ``hf-hub:<org>/<repo>`` only with ``online=True`` (downloads; never in tests);
4. any other timm architecture (``resnet18``, ``vit_base_patch16_224``,
   ``vit_large_patch14_clip_336``, ...), always built with ``pretrained=False``.

Weights only ever come from a local file or directory passed as ``weights``:
safetensors, or a torch file read with ``weights_only=True`` (never unpickled
as code).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoscope.errors import CheckpointError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

#: µm/px assumed for backbones that do not state one (a 20x scan).
DEFAULT_MPP = 0.5


@dataclass(frozen=True)
class InputSpec:
    """What a backbone expects as input.

    Attributes
    ----------
    tile_size
        Tile edge in pixels (tiles are square).
    mpp
        µm per pixel the tiles are read at.
    mean, std
        Per-channel normalisation applied to RGB scaled to [0, 1].
    """

    tile_size: int
    mpp: float
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {self.tile_size}")
        if not self.mpp > 0:
            raise ValueError(f"mpp must be positive, got {self.mpp}")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean/std must be 3 values with std > 0, got {self.mean}, {self.std}")
        object.__setattr__(self, "mean", tuple(float(v) for v in self.mean))
        object.__setattr__(self, "std", tuple(float(v) for v in self.std))

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (JSON-ready)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InputSpec:
        """Inverse of :meth:`to_dict`."""
        return cls(
            tile_size=int(d["tile_size"]),
            mpp=float(d["mpp"]),
            mean=tuple(d.get("mean", IMAGENET_MEAN)),
            std=tuple(d.get("std", IMAGENET_STD)),
        )


@dataclass
class Backbone:
    """A feature extractor with its output size and input spec.

    Attributes
    ----------
    name
        Registry name it was created from.
    module
        ``nn.Module`` mapping ``(B, 3, H, W)`` normalised floats to ``(B, feature_dim)``.
    feature_dim
        Size of the pooled feature vector.
    input_spec
        Tile size, µm/px and normalisation the module expects.
    config
        Keyword arguments that rebuild the same architecture with
        :func:`create_backbone` (stored in checkpoint cards).
    """

    name: str
    module: nn.Module
    feature_dim: int
    input_spec: InputSpec
    config: dict[str, Any] = field(default_factory=dict)


BackboneFn = Callable[..., Backbone]
_REGISTRY: dict[str, BackboneFn] = {}


def register_backbone(fn: BackboneFn | None = None, *, name: str | None = None):
    """Register a backbone factory ``fn(**kw) -> Backbone`` under ``name``.

    Usable bare (``@register_backbone``) or with a name
    (``@register_backbone(name="x")``); the function name is the default.
    """

    def deco(f: BackboneFn) -> BackboneFn:
        key = name or f.__name__
        if key in _REGISTRY and _REGISTRY[key] is not f:
            raise ValueError(f"backbone {key!r} is already registered")
        _REGISTRY[key] = f
        return f

    return deco(fn) if fn is not None else deco


def list_backbones(pattern: str = "*") -> list[str]:
    """Names registered here (timm and open_clip names are resolved on demand)."""
    import fnmatch

    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


# --------------------------------------------------------------- built-in CNNs
#: Global pooling of :class:`SimpleCNN`'s last feature map.
CNN_POOLS = ("avg", "avgmax")


class SimpleCNN(nn.Module):
    """Conv-BN-ReLU stages, each halving resolution, then global pooling.

    Parameters
    ----------
    widths
        Output channels of each stage.
    blocks
        Convolutions per stage (the first one strides by 2).
    pool
        ``"avg"``: global average pooling (``widths[-1]`` features).
        ``"avgmax"``: average and maximum side by side (twice as many), so a
        feature can report the strongest spot of a tile as well as its mean,
        e.g. the stain of the few positive cells in a mostly negative tile.
    """

    def __init__(
        self, widths: tuple[int, ...] = (32, 64, 128, 256), blocks: int = 1, pool: str = "avg"
    ) -> None:
        super().__init__()
        if pool not in CNN_POOLS:
            raise ValueError(f"pool must be one of {CNN_POOLS}, not {pool!r}")
        layers: list[nn.Module] = []
        cin = 3
        for cout in widths:
            for j in range(blocks):
                stride = 2 if j == 0 else 1
                layers += [
                    nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
                    nn.BatchNorm2d(cout),
                    nn.ReLU(inplace=True),
                ]
                cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = pool
        self.num_features = cin * (2 if pool == "avgmax" else 1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Feature map ``(B, C, h, w)`` of the last stage (the Grad-CAM target)."""
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fmap = self.forward_features(x)
        avg = fmap.mean(dim=(2, 3))
        if self.pool == "avg":
            return avg
        return torch.cat([avg, fmap.amax(dim=(2, 3))], dim=1)


def _cnn(
    name: str, widths: tuple[int, ...], blocks: int, tile: int, mpp: float, pool: str = "avg"
) -> Backbone:
    module = SimpleCNN(tuple(widths), blocks, pool)
    spec = InputSpec(tile_size=tile, mpp=mpp)
    cfg = {"widths": list(widths), "blocks": blocks, "tile_size": tile, "mpp": mpp}
    if pool != "avg":  # older cards have no key and mean average pooling
        cfg["pool"] = pool
    return Backbone(name, module, module.num_features, spec, cfg)


@register_backbone
def hs_cnn_small(
    widths: tuple[int, ...] = (32, 64, 128, 256),
    blocks: int = 2,
    tile_size: int = 224,
    mpp: float = DEFAULT_MPP,
    pool: str = "avg",
) -> Backbone:
    """The embedded default: a ~1.2 M-parameter CNN trained from scratch (256-d).

    ``pool="avgmax"`` doubles the features with global max pooling (see :class:`SimpleCNN`).
    """
    return _cnn("hs_cnn_small", widths, blocks, tile_size, mpp, pool)


@register_backbone
def test_cnn(
    widths: tuple[int, ...] = (8, 16),
    blocks: int = 1,
    tile_size: int = 32,
    mpp: float = 2.0,
    pool: str = "avg",
) -> Backbone:
    """Tiny CNN for tests (16-d features, 32 px tiles; 32 with ``pool="avgmax"``)."""
    return _cnn("test_cnn", widths, blocks, tile_size, mpp, pool)


def _timm_test(arch: str, default_tile: int) -> BackboneFn:
    def fn(tile_size: int = default_tile, mpp: float = 2.0, **kw: Any) -> Backbone:
        return _create_timm(arch, tile_size=tile_size, mpp=mpp, **kw)

    fn.__name__ = arch
    fn.__doc__ = f"timm's tiny ``{arch}`` (random weights) at {default_tile} px, for tests."
    return fn


register_backbone(_timm_test("test_resnet", 32))
register_backbone(_timm_test("test_vit", 32))


# ------------------------------------------------------------------------ timm
def _is_vit_like(arch: str) -> bool:
    return any(k in arch for k in ("vit", "deit", "eva", "beit", "swin"))


def _create_timm(
    arch: str,
    *,
    tile_size: int | None = None,
    mpp: float = DEFAULT_MPP,
    pretrained_hub: bool = False,
    **kw: Any,
) -> Backbone:
    import timm

    if not pretrained_hub and not timm.is_model(arch):
        raise ValueError(
            f"unknown backbone {arch!r}: not registered in histoscope "
            f"({', '.join(list_backbones())}) and not a timm architecture"
        )
    if tile_size is not None and _is_vit_like(arch):
        kw.setdefault("img_size", tile_size)
    module = timm.create_model(arch, pretrained=pretrained_hub, num_classes=0, **kw)
    cfg = getattr(module, "pretrained_cfg", {}) or {}
    size = tile_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    spec = InputSpec(
        tile_size=size,
        mpp=mpp,
        mean=tuple(cfg.get("mean", IMAGENET_MEAN)),
        std=tuple(cfg.get("std", IMAGENET_STD)),
    )
    extra = {k: v for k, v in kw.items() if not (k == "img_size" and tile_size is not None)}
    config = {"tile_size": size, "mpp": mpp, **extra}
    return Backbone(arch, module, int(module.num_features), spec, config)


def open_clip_model(model_name: str, what: str, **kw: Any):
    """``open_clip.create_model(model_name)`` with random weights, offline and quiet.

    ``what`` names the recipe key in the message when open_clip is missing.
    Weights come from a local file afterwards (or from a checkpoint), so
    open_clip's "no pretrained weights loaded" warning is held back.
    """
    import logging

    try:
        import open_clip
    except ImportError as exc:
        raise ImportError(
            f"{what} 'open_clip:{model_name}' needs open_clip: pip install open_clip_torch"
        ) from exc
    root = logging.getLogger()  # open_clip warns on the root logger
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        return open_clip.create_model(model_name, pretrained=None, pretrained_text=False, **kw)
    finally:
        root.setLevel(level)


def _create_open_clip(model_name: str, tile_size: int | None, mpp: float, **kw: Any) -> Backbone:
    if tile_size is not None:  # resize the ViT's position embedding to the tile
        kw.setdefault("force_image_size", int(tile_size))
    model = open_clip_model(model_name, "backbone", **kw)  # says what to install if missing
    import open_clip

    visual = model.visual
    size = visual.image_size
    size = tile_size or (size[0] if isinstance(size, tuple | list) else int(size))
    spec = InputSpec(
        tile_size=size,
        mpp=mpp,
        mean=tuple(getattr(visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN),
        std=tuple(getattr(visual, "image_std", None) or open_clip.OPENAI_DATASET_STD),
    )
    dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[1])
    return Backbone(f"open_clip:{model_name}", visual, dim, spec, {"tile_size": size, "mpp": mpp})


# --------------------------------------------------------------------- weights
def read_state_dict(
    path: str | os.PathLike, *, strip_prefixes: bool = True
) -> dict[str, torch.Tensor]:
    """Tensors from a local weights file without executing any code from it.

    Parameters
    ----------
    path
        ``.safetensors`` file, a torch file (``.pt``, ``.pth``, ``.bin``,
        ``.ckpt``; read with ``weights_only=True``), or a directory holding
        ``model.safetensors``, ``open_clip_model.safetensors``,
        ``pytorch_model.bin`` or ``open_clip_pytorch_model.bin``.

    strip_prefixes
        Drop wrapper prefixes (``module.``, ``model.``, ``backbone.``,
        ``visual.``) so a fine-tuned model's backbone tensors match. Where a
        name then occurs twice (a whole CLIP's image and text transformers),
        the image tower's (``visual.``) tensor is kept.

    Returns
    -------
    dict
        Name -> tensor; a ``state_dict``/``model`` entry of a training
        checkpoint is unwrapped.

    Raises
    ------
    CheckpointError
        The file is missing, unreadable, or holds something other than tensors.
    """
    p = Path(path)
    if p.is_dir():
        for cand in (
            "model.safetensors",
            "open_clip_model.safetensors",
            "pytorch_model.bin",
            "open_clip_pytorch_model.bin",
        ):
            if (p / cand).is_file():
                p = p / cand
                break
        else:
            raise CheckpointError(f"{path}: no weights file (model.safetensors, ...) in directory")
    if not p.is_file():
        raise CheckpointError(f"{p}: weights file does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            sd: Any = load_file(str(p))
        else:
            sd = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{p}: cannot read weights ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{p}: does not hold a mapping of tensor names to tensors")
    if not strip_prefixes:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    visual: set[str] = set()
    for k, v in sd.items():
        name, from_visual = k, False
        for prefix in ("module.", "model.", "backbone.", "visual."):
            if name.startswith(prefix):
                name = name[len(prefix) :]
                from_visual |= prefix == "visual."
        # a whole CLIP holds visual.transformer.* and the text tower's transformer.*:
        # the image tower's tensor wins the bare name
        if name in visual and not from_visual:
            continue
        out[name] = v
        if from_visual:
            visual.add(name)
    return out


def load_backbone_weights(module: nn.Module, path: str | os.PathLike) -> None:
    """Load local weights into ``module``, ignoring classifier-head tensors.

    Raises
    ------
    CheckpointError
        A backbone tensor is missing from the file or has the wrong shape.
    """
    load_matching(module, read_state_dict(path), path, "backbone")


def load_matching(
    module: nn.Module, tensors: Mapping[str, torch.Tensor], path: str | os.PathLike, what: str
) -> None:
    """Load every tensor of ``module`` from ``tensors`` (extra entries are ignored).

    Raises
    ------
    CheckpointError
        Naming ``path`` and the first missing or mis-shaped ``what`` tensor.
    """
    own = module.state_dict()
    missing = [k for k in own if k not in tensors]
    if missing:
        raise CheckpointError(
            f"{path}: {len(missing)} {what} tensor(s) missing, e.g. {missing[:3]}"
        )
    for k, v in own.items():
        if tuple(tensors[k].shape) != tuple(v.shape):
            raise CheckpointError(
                f"{path}: tensor {k!r} has shape {tuple(tensors[k].shape)}, "
                f"expected {tuple(v.shape)}"
            )
    module.load_state_dict({k: tensors[k] for k in own}, strict=True)


# ---------------------------------------------------------------------- create
def create_backbone(
    name: str,
    weights: str | os.PathLike | None = None,
    *,
    online: bool = False,
    **kw: Any,
) -> Backbone:
    """Build a backbone by name, optionally loading local weights.

    Parameters
    ----------
    name
        A registered name (``hs_cnn_small``, ``test_cnn``, ``test_resnet``,
        ``test_vit``), ``open_clip:<model>``, ``hf-hub:<repo>`` or a timm
        architecture name; ``arch.tag`` selects that pretrained config's input
        size and normalisation (``vit_large_patch14_clip_336.openai`` gets
        CLIP's mean/std) while still building with random weights.
    weights
        Local weights file or directory (see :func:`read_state_dict`).
    online
        Allow ``hf-hub:`` ids to download. Off by default; never used in tests.
    **kw
        Passed to the factory: ``tile_size``, ``mpp`` and architecture options.

    Returns
    -------
    Backbone
        The module in eval mode, its feature size, input spec and config.
    """
    if name in _REGISTRY:
        bb = _REGISTRY[name](**kw)
    elif name.startswith("open_clip:"):
        tile = kw.pop("tile_size", None)
        mpp = kw.pop("mpp", DEFAULT_MPP)
        bb = _create_open_clip(name.split(":", 1)[1], tile, mpp, **kw)
    elif name.startswith("hf-hub:"):
        if not online:
            raise ValueError(
                f"{name!r} is a hub id and would download weights; pass online=True where the "
                "network is available, or weights=<local file> with the architecture name"
            )
        if weights is not None:
            raise ValueError("give either a hub id or local weights, not both")
        bb = _create_timm(name, pretrained_hub=True, **kw)
    else:
        bb = _create_timm(name, **kw)
    bb.name = name
    if weights is not None:
        load_backbone_weights(bb.module, weights)
    bb.module.eval()
    return bb


def build_backbone_from_config(config: Mapping[str, Any]) -> nn.Module:
    """Family builder for plain backbone checkpoints: ``{"name": ..., **kw}``."""
    cfg = dict(config)
    name = cfg.pop("name")
    for key, val in cfg.items():
        if isinstance(val, list):
            cfg[key] = tuple(val)
    return create_backbone(name, **cfg).module
