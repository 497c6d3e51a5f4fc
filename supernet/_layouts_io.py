"""Reading checkpoint files: safetensors, or torch files loaded weights-only; wrappers unwrapped."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Mapping

import torch

from search_spaces.errors import FileFormatError

__all__ = ["TORCH_SUFFIXES", "WRAPPER_KEYS", "read_checkpoint", "unwrap"]

logger = logging.getLogger(__name__)

#: Wrapper entries unwrapped by :func:`read_checkpoint`, in this order (mit: ``state_dict``, snap: ``model``).
WRAPPER_KEYS = ("state_dict", "model", "model_ema", "state_dict_ema")
TORCH_SUFFIXES = (".pth", ".pt", ".bin", ".tar")


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, unwrapped, on the CPU. Nothing but tensors is ever unpickled.

    ``.safetensors`` is read with safetensors; ``.pth``, ``.pt``, ``.bin`` and ``.tar`` only with
    ``torch.load(path, map_location="cpu", weights_only=True)``. A dict whose values are not all
    tensors is unwrapped through its first entry of :data:`WRAPPER_KEYS` that holds tensors, and a
    ``module.`` prefix on every key (DataParallel) is dropped.

    Raises:
        FileFormatError: missing file, unknown suffix, unreadable file, a pickle that holds
            Python objects other than tensors and plain containers, or no tensors inside.
    """
    path = Path(path)
    if not path.is_file():
        raise FileFormatError(f"checkpoint {str(path)!r} does not exist or is not a file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        try:
            obj: Any = load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise FileFormatError(f"checkpoint {str(path)!r} is not a readable safetensors file ({exc})") from None
    elif suffix in TORCH_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises pickle's UnpicklingError for refused globals
            if "WeightsUnpickler error" in str(exc):
                raise FileFormatError(
                    f"checkpoint {str(path)!r} was refused: weights-only loading accepts tensors and plain "
                    f"containers, and this file holds something else ({_unpickler_reason(exc)}); save a plain "
                    f"state_dict or a .safetensors file instead") from None
            raise FileFormatError(f"checkpoint {str(path)!r} is not a readable torch file ({exc})") from None
    else:
        raise FileFormatError(f"checkpoint {str(path)!r}: unknown file type {suffix!r}; expected .safetensors, "
                              f"or a torch file ({', '.join(TORCH_SUFFIXES)}) that is read weights-only")
    return unwrap(obj, str(path))


def _unpickler_reason(exc: Exception) -> str:
    """The one line of torch's weights-only refusal that names what was refused (not its advice)."""
    text = str(exc)
    _, _, tail = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in tail.splitlines() if line.strip()]
    reason = lines[0] if lines else type(exc).__name__
    return reason.split(" was not an allowed global")[0]


def unwrap(obj: Any, label: str) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping) and obj and not all(isinstance(v, torch.Tensor) for v in obj.values()):
        for key in WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                logger.debug("%s: using its %r entry", label, key)
                obj = inner
                break
        else:
            raise FileFormatError(f"checkpoint {label!r} holds no state dict: top-level entries "
                                  f"{sorted(map(str, obj))[:8]}, none of {list(WRAPPER_KEYS)} holds tensors only")
    if not isinstance(obj, Mapping) or not obj:
        raise FileFormatError(f"checkpoint {label!r} holds no tensors")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd
