"""Checkpoints: safetensors weights with a JSON model card, loaded without unpickling.

Format
------
One ``.safetensors`` file. The tensors are the model's ``state_dict``; the
card is stored as JSON in the safetensors header metadata under the key
``"histoscope.card"``. A single file was chosen over a directory or a
weights/card pair because it cannot be separated from its card, is written
atomically (temporary name, then rename) and is read by any safetensors tool.
The card's ``sha256`` is a hash of the tensors (names, dtypes, shapes, bytes),
so it identifies the weights whatever the card says and is checked on load.

Loading parses the 8-byte header length and the JSON header by hand, checks
the file is complete, and only then lets :mod:`safetensors` map the tensors;
the model itself is built by the family builder registered in this package
(the file only names the family and gives plain-data configuration). Files
written by ``torch.save`` (zip or legacy pickles) are refused; convert one with
:func:`convert_torch_checkpoint`, which reads it with ``weights_only=True``.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from histoscope.atomic import atomic_path
from histoscope.errors import CheckpointError

if TYPE_CHECKING:
    from torch import Tensor, nn

CARD_KEY = "histoscope.card"
FORMAT_KEY = "format"
FORMAT = "histoscope-checkpoint-1"

Builder = Callable[[Mapping[str, Any]], "nn.Module"]

#: family -> builder; families register themselves, or are named here lazily
#: as ``"module:attribute"`` so that loading imports only our own code.
_FAMILIES: dict[str, Builder | str] = {
    "backbone": "histoscope.models.backbones:build_backbone_from_config",
    "tile_classifier": "histoscope.models.tile_classifier:TileClassifier.from_config",
    "isight": "histoscope.models.isight:ISight.from_config",
    "clam": "histoscope.models.clam:build_mil",
    "nuclass": "histoscope.models.nuclass:NuClass.from_config",
    "histgen": "histoscope.models.histgen:HistGen.from_config",
    "expression": "histoscope.models.expression:ExpressionModel.from_config",
    "ihc_detector": "histoscope.models.ihc_detector:IHCCentreNet.from_config",
}


def register_family(name: str, builder: Builder | str) -> None:
    """Map a model family to ``builder(config) -> nn.Module``.

    Parameters
    ----------
    name
        Family name written in the card (``"nuclass"``, ``"clam"``, ...).
    builder
        Callable, or ``"package.module:attr"`` imported on first use.
    """
    _FAMILIES[name] = builder


def families() -> list[str]:
    """Registered family names."""
    return sorted(_FAMILIES)


def _builder(family: str) -> Builder:
    entry = _FAMILIES[family]
    if isinstance(entry, str):
        mod, _, attr = entry.partition(":")
        obj: Any = importlib.import_module(mod)
        for part in attr.split("."):
            obj = getattr(obj, part)
        entry = _FAMILIES[family] = obj
    return entry


@dataclass(frozen=True)
class ModelCard:
    """What a checkpoint says about itself.

    Attributes
    ----------
    family
        Model family; selects the builder (see :func:`register_family`).
    config
        Plain-data architecture configuration passed to the builder.
    classes
        Class names of the output, in logit order (empty if not a classifier).
    input_spec
        ``{"tile_size", "mpp", "mean", "std"}`` the model expects.
    recipe, data, metrics
        Training recipe, data description and held-out metrics.
    software
        ``{"histoscope": version, "torch": version}`` at save time.
    sha256
        Hash of the tensors (filled in by :func:`save_checkpoint`).
    """

    family: str
    config: dict[str, Any]
    classes: tuple[str, ...] = ()
    input_spec: dict[str, Any] = field(default_factory=dict)
    recipe: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    software: dict[str, str] = field(default_factory=dict)
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["classes"] = list(self.classes)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelCard:
        """Build from a mapping; unknown keys are an error."""
        d = dict(d)
        d["classes"] = tuple(d.get("classes", ()))
        return cls(**d)


# ---------------------------------------------------------------------- hashing
def tensor_hash(state: Mapping[str, Tensor]) -> str:
    """sha256 over sorted tensor names, dtypes, shapes and bytes."""
    import torch

    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ------------------------------------------------------------------------- save
def save_checkpoint(
    path: str | os.PathLike, model: nn.Module, card: ModelCard | Mapping[str, Any]
) -> Path:
    """Write ``model``'s weights and ``card`` to one ``.safetensors`` file.

    Parameters
    ----------
    path
        Output file (``.safetensors`` is appended if missing).
    model
        The module whose ``state_dict`` is saved.
    card
        :class:`ModelCard` or a mapping with at least ``family`` and ``config``.
        ``software`` and ``sha256`` are filled in here.

    Returns
    -------
    pathlib.Path
        The written file.
    """
    import torch
    from safetensors.torch import save_file

    import histoscope

    card = card if isinstance(card, ModelCard) else ModelCard.from_dict(card)
    if card.family not in _FAMILIES:
        raise ValueError(f"unknown family {card.family!r}; known: {families()}")
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    card = replace(
        card,
        software={"histoscope": histoscope.__version__, "torch": torch.__version__},
        sha256=tensor_hash(state),
    )
    text = json.dumps(card.to_dict(), sort_keys=True)  # raises on non-JSON values
    path = Path(path)
    if path.suffix != ".safetensors":
        path = path.with_name(path.name + ".safetensors")
    with atomic_path(path, suffix=".safetensors") as tmp:
        save_file(state, str(tmp), metadata={FORMAT_KEY: FORMAT, CARD_KEY: text})
    return path


# ------------------------------------------------------------------------- load
_ZIP = b"PK\x03\x04"


def _looks_pickled(head: bytes) -> bool:
    return head.startswith(_ZIP) or (len(head) > 1 and head[0] == 0x80 and head[1] <= 5)


def _find_file(path: Path) -> Path:
    if path.is_dir():
        found = sorted(path.glob("*.safetensors"))
        if len(found) != 1:
            raise CheckpointError(
                f"{path}: expected one .safetensors checkpoint in the directory, found {len(found)}"
            )
        return found[0]
    if not path.exists():
        raise CheckpointError(f"{path}: checkpoint file does not exist")
    return path


def read_card(path: str | os.PathLike) -> ModelCard:
    """Read and validate only the card (no tensors are loaded).

    Raises
    ------
    CheckpointError
        Missing file, a torch pickle, a truncated file, or a malformed card.
    """
    return _read_header(_find_file(Path(path)))[0]


def _read_header(path: Path) -> tuple[ModelCard, dict[str, Any]]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if _looks_pickled(head):
            raise CheckpointError(
                f"{path}: is a torch pickle (torch.save), which can run code when loaded; "
                "refused. Convert it with histoscope.checkpoints.convert_torch_checkpoint"
            )
        if len(head) < 8:
            raise CheckpointError(f"{path}: truncated ({size} bytes), not a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8:
            raise CheckpointError(
                f"{path}: truncated or not safetensors (header says {n} bytes, file has {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except ValueError as exc:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is not a JSON object")
    meta = header.pop("__metadata__", None) or {}
    try:
        end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise CheckpointError(
            f"{path}: safetensors header entries lack valid data_offsets"
        ) from None
    if 8 + n + end > size:
        raise CheckpointError(
            f"{path}: truncated: tensors need {8 + n + end} bytes, file has {size}"
        )
    if CARD_KEY not in meta:
        raise CheckpointError(f"{path}: safetensors file without a HistoScope card")
    try:
        card = ModelCard.from_dict(json.loads(meta[CARD_KEY]))
    except (ValueError, TypeError) as exc:
        raise CheckpointError(f"{path}: malformed card JSON ({exc})") from exc
    return card, header


def load_checkpoint(
    path: str | os.PathLike,
    family: str | None = None,
    *,
    device: str = "cpu",
    verify_hash: bool = True,
) -> tuple[nn.Module, ModelCard]:
    """Build the model a checkpoint describes and load its weights.

    Parameters
    ----------
    path
        A checkpoint file, or a directory holding exactly one.
    family
        Expected family; a checkpoint of another family is refused.
    device
        Where to put the model.
    verify_hash
        Check the tensors against the card's ``sha256``.

    Returns
    -------
    model, card
        The model in eval mode, and its :class:`ModelCard`.

    Raises
    ------
    CheckpointError
        Naming the file and the reason: missing, a pickle, truncated, malformed
        card, another family, unknown family, a missing/unexpected tensor, a
        wrong shape, or a hash mismatch.
    """
    file = _find_file(Path(path))
    card, header = _read_header(file)
    if family is not None and card.family != family:
        raise CheckpointError(f"{file}: checkpoint for family {card.family!r}, expected {family!r}")
    if card.family not in _FAMILIES:
        raise CheckpointError(f"{file}: unknown family {card.family!r}; known: {families()}")
    try:
        model = _builder(card.family)(card.config)
    except Exception as exc:
        raise CheckpointError(
            f"{file}: cannot build a {card.family!r} model from the card's config ({exc})"
        ) from exc
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in header:
            raise CheckpointError(f"{file}: missing tensor {name!r}")
        shape = tuple(header[name]["shape"])
        if shape != tuple(t.shape):
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {shape}, the model expects {tuple(t.shape)}"
            )
    extra = sorted(set(header) - set(expected))
    if extra:
        raise CheckpointError(f"{file}: unexpected tensor(s) {extra[:3]} for {card.family!r}")
    try:
        from safetensors.torch import load_file

        state = load_file(str(file))
    except Exception as exc:
        raise CheckpointError(f"{file}: cannot read tensors ({exc})") from exc
    if verify_hash and card.sha256 and tensor_hash(state) != card.sha256:
        raise CheckpointError(f"{file}: tensors do not match the card's sha256 (file modified?)")
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), card


def convert_torch_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    card: ModelCard | Mapping[str, Any],
) -> Path:
    """Turn a ``torch.save`` state dict into a checkpoint, never running its code.

    ``src`` is read with ``torch.load(weights_only=True)``; the family builder
    makes the model from ``card``'s config and the state dict must fit it.
    """
    from histoscope.models.backbones import read_state_dict

    card = card if isinstance(card, ModelCard) else ModelCard.from_dict(card)
    state = read_state_dict(src, strip_prefixes=False)
    model = _builder(card.family)(card.config)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{src}: does not fit a {card.family!r} model ({exc})") from exc
    return save_checkpoint(dst, model, card)


def describe_card(card: ModelCard) -> str:
    """One line on what a checkpoint is and what it was trained on (for panels and logs)."""
    arch = (card.config or {}).get("backbone") or (card.config or {}).get("name") or ""
    what = f"{card.family}" + (f" ({arch})" if arch else "")
    if card.classes:
        n = len(card.classes)
        what += f": {', '.join(card.classes)}" if n <= 4 else f": {n} outputs"
    data = (card.recipe or {}).get("data") or {}
    gen = data.get("generate") or (card.data or {}).get("generate")
    if isinstance(gen, dict) and gen.get("count"):
        size = gen.get("size")
        px = (
            f" of {size[0]} x {size[1]} px"
            if isinstance(size, list | tuple) and len(size) == 2
            else ""
        )
        slides = (card.data or {}).get("slides")
        if isinstance(slides, dict) and isinstance(slides.get("train"), list):
            # the slides it learnt from, as listed, not the count the recipe asked for
            what += f"; trained on {len(slides['train'])} synthetic slides{px} (not real tissue)"
        else:
            what += f"; trained on {gen['count']} synthetic slides{px} (not real tissue)"
    elif isinstance((card.data or {}).get("trained_on"), str):
        what += f"; trained on {card.data['trained_on']}"
    elif data.get("path") or (card.data or {}).get("path"):
        what += f"; trained on {data.get('path') or card.data.get('path')}"
    return what
