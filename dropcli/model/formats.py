"""Detect a model file's format from its content, never from its extension."""

from __future__ import annotations

import io
import pickletools
import zipfile
from pathlib import Path

from dropcli.errors import DropcliError

ONNX = "onnx"
TORCHSCRIPT = "torchscript"
EXPORT = "export"  # torch.export program (.pt2)
PICKLE = "pickle"  # full pickled nn.Module
STATE_DICT = "state_dict"
HUB = "transformers"  # a Hugging Face checkpoint folder (save_pretrained): read, written as .pt2
SAFETENSORS = "safetensors"  # a state_dict in a safetensors file (with --arch): read, written as .pt2
ALL = (ONNX, TORCHSCRIPT, EXPORT, PICKLE, STATE_DICT)  # the formats dropcli writes (--format)
TORCH_FORMATS = (TORCHSCRIPT, EXPORT, PICKLE, STATE_DICT, HUB, SAFETENSORS)

# Globals that a plain state_dict pickle references. Anything else means a pickled object.
_SAFE_GLOBALS_PREFIXES = (
    "collections OrderedDict", "torch._utils _rebuild", "torch ", "builtins ", "_codecs encode",
    "numpy.core.multiarray _reconstruct", "numpy dtype", "numpy ndarray",
)


def _pickle_globals(data: bytes) -> list[str]:
    names: list[str] = []
    recent_strings: list[str] = []
    try:
        for op, arg, _ in pickletools.genops(io.BytesIO(data)):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE", "BINUNICODE8"):
                recent_strings.append(arg)
                recent_strings = recent_strings[-2:]
            elif op.name == "GLOBAL":
                names.append(arg)
            elif op.name == "STACK_GLOBAL" and len(recent_strings) == 2:
                names.append(f"{recent_strings[0]} {recent_strings[1]}")
    except Exception as e:  # noqa: BLE001
        raise DropcliError(f"the model file's pickle is corrupt ({e})", "re-save the model") from e
    return names


def pickle_classes(path: str | Path) -> list[str]:
    """Classes a torch.save archive references, read without unpickling anything."""
    with zipfile.ZipFile(path) as z:
        pkl = [n for n in z.namelist() if n.endswith("/data.pkl") or n == "data.pkl"]
        if not pkl:
            return []
        return _pickle_globals(z.read(pkl[0]))


_HUB_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def hub_folder(path: str | Path) -> Path | None:
    """The Hugging Face checkpoint folder ``path`` is (or holds the weights of): a folder with a
    ``config.json`` naming an architecture and a weights file; None otherwise."""
    path = Path(path)
    folder = path if path.is_dir() else path.parent
    cfg = folder / "config.json"
    if not cfg.is_file() or not any((folder / w).exists() for w in _HUB_WEIGHTS):
        return None
    if not path.is_dir() and path.name not in _HUB_WEIGHTS and not path.name.startswith("model-"):
        return None
    try:
        import json

        return folder if json.loads(cfg.read_text()).get("architectures") else None
    except (OSError, ValueError, AttributeError):
        return None


def is_safetensors(path: Path, head: bytes) -> bool:
    """A safetensors file: an 8-byte little-endian header length, then that many bytes of JSON."""
    if len(head) < 8:
        return False
    n = int.from_bytes(head, "little")
    if not 2 <= n <= path.stat().st_size - 8:
        return False
    with open(path, "rb") as f:
        f.seek(8)
        return f.read(1) == b"{"


def detect(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise DropcliError(f"model file {path} does not exist", "check the path")
    if path.is_dir():
        if hub_folder(path) is not None:
            return HUB
        raise DropcliError(f"model path {path} is a folder, not a model file",
                           "give the model file itself, or a Hugging Face checkpoint folder (config.json and its weights)")
    if path.stat().st_size == 0:
        raise DropcliError(f"model file {path} is empty", "re-save the model")
    with open(path, "rb") as f:
        head = f.read(8)
    if is_safetensors(path, head):
        return HUB if hub_folder(path) is not None else SAFETENSORS
    if head.startswith(b"PK\x03\x04") and path.name.startswith("pytorch_model") and hub_folder(path) is not None:
        return HUB  # the pickled weights of a checkpoint folder (read only with --trust-pickle)
    if head.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except zipfile.BadZipFile as e:
            raise DropcliError(f"model file {path} is a truncated or corrupt archive ({e})", "re-save the model") from e
        base = {n.split("/", 1)[1] if "/" in n else n for n in names}
        if "archive_format" in base or any(n.startswith("models/") for n in base):
            return EXPORT
        if "constants.pkl" in base or any(n.startswith("code/") for n in base):
            return TORCHSCRIPT
        if "data.pkl" in base:
            classes = pickle_classes(path)
            if any(not c.startswith(_SAFE_GLOBALS_PREFIXES) for c in classes):
                return PICKLE
            return STATE_DICT
        raise DropcliError(f"{path} is a zip archive but not a PyTorch model", "give an ONNX, TorchScript, .pt2 or torch.save file")
    if head[:2] in (b"\x80\x02", b"\x80\x04", b"\x80\x05") or head[:1] == b"\x8a":
        raise DropcliError(
            f"{path} is a legacy (non-zip) torch.save file", "re-save it with a current torch (torch.save uses zip since 1.6)"
        )
    return _check_onnx(path)


def _check_onnx(path: Path) -> str:
    import onnx

    try:
        onnx.load(str(path), load_external_data=False)
    except Exception as e:  # noqa: BLE001 - protobuf raises several types
        raise DropcliError(
            f"{path} is not a model dropcli can read (not ONNX, TorchScript, torch.export or torch.save): {type(e).__name__}",
            "check that the file is complete and is one of those formats",
        ) from e
    return ONNX
