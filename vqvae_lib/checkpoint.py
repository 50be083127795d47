"""Save and load training checkpoints, treating every file read as untrusted input.

A checkpoint is a dict of plain values only (tensors, numbers, strings, None, lists, tuples, dicts) so that
``torch.load(..., weights_only=True)`` can read it without unpickling arbitrary objects, which could run code.
It always holds a format marker, the model config and train config as plain dicts, the model's state_dict, the
epoch and the training history, and says which kind of model it holds ("vqvae", "vae", "prior" or "features";
files without the key are VQ-VAE checkpoints); a run's last.pt adds optimizer, scheduler and RNG states for
resuming (an fp16 run's also its GradScaler's).

Files are written atomically (`fileio.atomic_write`), so an interrupted write leaves the previous file intact.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from .fileio import atomic_write
from .model import VQVAE, ModelConfig

FORMAT = "hipmri-vqvae/1"
REQUIRED_KEYS = ("format", "model_config", "train_config", "model_state", "epoch", "history")
_SCALARS = (bool, int, float, str, type(None))  # exact types: subclasses such as numpy.float64 are refused
TEXT_RECORD_FIELDS = ("precision",)  # the fields of a history record that hold a string; all others are numbers
# How a torch.save file begins: a zip archive, or (the format before 1.6) a pickled magic number.
_TORCH_HEADS = (b"PK\x03\x04", b"\x80\x02\x8a\x0a")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file and what is wrong with it."""


def _check_plain(value: Any, where: str) -> None:
    """Raise TypeError naming the first value that weights_only loading would refuse."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where} has a key of type {type(key).__name__}; use str or int keys")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif type(value) not in _SCALARS and not isinstance(value, torch.Tensor):
        raise TypeError(f"{where} is a {type(value).__module__}.{type(value).__name__}: a checkpoint may hold "
                        "only tensors, numbers, strings, None, lists, tuples and dicts")


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` (plain values only, with at least the REQUIRED_KEYS but "format") atomically to `path`.

    The format marker is added here. Raises ValueError for missing keys and TypeError for a value that
    ``torch.load(weights_only=True)`` would refuse, so an unloadable checkpoint is never written.
    """
    payload = {"format": FORMAT, **payload}
    if payload["format"] != FORMAT:
        raise ValueError(f"payload format must be {FORMAT!r}, got {payload['format']!r}")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise ValueError(f"checkpoint payload lacks {', '.join(missing)}")
    _check_plain(payload, "payload")
    atomic_write(path, lambda f: torch.save(payload, f))


def _weights_only_reason(error: Exception) -> str:
    match = re.search(r"WeightsUnpickler error:\s*(.+?)(?:\. Please| Please|\n\n|$)", str(error), re.S)
    return " ".join(match[1].split()) if match else str(error).splitlines()[0]


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", kind: str | None = None
                    ) -> dict[str, Any]:
    """Read a checkpoint with ``torch.load(weights_only=True)`` and check its format, keys and (if given) kind.

    Raises CheckpointError naming the file when it is missing, not a torch checkpoint, corrupt or truncated,
    holds objects other than plain values ("refusing to unpickle objects"), lacks the expected keys, or holds
    another kind of model than `kind`.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists()
                              else f"checkpoint {path} is not a file")
    with open(path, "rb") as f:
        head = f.read(4)
    if head not in _TORCH_HEADS:
        raise CheckpointError(f"{path} is not a checkpoint: it is not a file written by torch.save")
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # noise on non-torch pickles
            payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "Weights only load failed" in str(e):
            raise CheckpointError(
                f"refusing to unpickle objects in checkpoint {path}: a checkpoint may hold only tensors, numbers, "
                f"strings, lists and dicts (torch.load with weights_only=True: {_weights_only_reason(e)})") from e
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {e}") from e
    except Exception as e:  # torch raises KeyError, RuntimeError, EOFError, ... on malformed files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint (corrupt or truncated?): {reason}") from e
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path} holds a {type(payload).__name__}, not a {FORMAT} checkpoint dict")
    if payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a {FORMAT} checkpoint (format marker: {payload.get('format')!r})")
    missing = [key for key in REQUIRED_KEYS if key not in payload]
    if missing:
        raise CheckpointError(f"checkpoint {path} lacks the keys {', '.join(missing)}")
    for key, expected in (("model_config", dict), ("train_config", dict), ("model_state", dict), ("history", list)):
        if not isinstance(payload[key], expected):
            raise CheckpointError(f"checkpoint {path}: {key} is a {type(payload[key]).__name__}, "
                                  f"not a {expected.__name__}")
    _check_fields(payload, path)
    payload.setdefault("kind", "vqvae")
    if kind is not None and payload["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {payload['kind']} model, not a {kind} model")
    return payload


def _check_fields(payload: dict[str, Any], path: Path) -> None:
    """CheckpointError naming the first field of the standard keys that has the wrong type or value."""
    def bad(what: str) -> CheckpointError:
        return CheckpointError(f"checkpoint {path}: {what}")

    epoch = payload["epoch"]
    if type(epoch) is not int or epoch < 0:
        raise bad(f"epoch is {epoch!r}, not a whole number >= 0")
    if not isinstance(payload.get("kind", "vqvae"), str):
        raise bad(f"kind is {payload['kind']!r}, not a string")
    for i, record in enumerate(payload["history"]):
        if not isinstance(record, dict) or type(record.get("epoch")) is not int:
            raise bad(f"history[{i}] is not an epoch record (a dict with an integer epoch)")
        numbers = [key for key, value in record.items() if type(value) not in (int, float)
                   and not (key in TEXT_RECORD_FIELDS and type(value) is str)]
        if numbers:
            raise bad(f"history[{i}][{numbers[0]!r}] is {record[numbers[0]]!r}, not a number")
    if not all(isinstance(value, torch.Tensor) for value in payload["model_state"].values()):
        raise bad("model_state holds values that are not tensors")


def config_diff(saved: dict[str, Any], wanted: dict[str, Any], ignore: tuple[str, ...] = ()) -> list[str]:
    """Lines "field: checkpoint X, requested Y" for every field (outside `ignore`) whose values differ."""
    return [f"{key}: checkpoint {saved.get(key, '<missing>')!r}, requested {wanted.get(key, '<missing>')!r}"
            for key in sorted(set(saved) | set(wanted))
            if key not in ignore and saved.get(key, "<missing>") != wanted.get(key, "<missing>")]


def load_module(path: str | Path, kind: str, build: Callable[[dict[str, Any]], torch.nn.Module],
                map_location: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load a checkpoint of `kind`, build its model with build(model_config) and load the weights; return (model
    in eval mode, payload). CheckpointError when the stored config is invalid or the weights do not fit it."""
    payload = load_checkpoint(path, map_location, kind=kind)
    try:
        model = build(payload["model_config"])
    except CheckpointError:
        raise
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"checkpoint {path} has an invalid model config: {e}") from e
    try:
        model.load_state_dict(payload["model_state"])
    except (RuntimeError, KeyError, TypeError) as e:
        raise CheckpointError(f"the weights in checkpoint {path} do not fit the model of its own config: "
                              f"{' '.join(str(e).split())[:500]}") from e
    return model.to(map_location).eval(), payload


def load_model(path: str | Path, expect_config: ModelConfig | None = None,
               map_location: str | torch.device = "cpu") -> tuple[VQVAE, dict[str, Any]]:
    """Build the VQVAE a checkpoint describes and load its weights; return (model in eval mode, payload).

    Raises CheckpointError when the stored config is invalid, differs from `expect_config` (listing the fields),
    or the stored weights do not fit the model built from the checkpoint's own config.
    """
    def build(config: dict[str, Any]) -> VQVAE:
        config = ModelConfig.from_dict(config)
        if expect_config is not None:
            diff = config_diff(config.to_dict(), expect_config.to_dict())
            if diff:
                raise CheckpointError(f"checkpoint {path} was made with another model config: {'; '.join(diff)}")
        return VQVAE(config)

    return load_module(path, "vqvae", build, map_location)
