"""The models shipped in the package, by name, and what ``[model] checkpoint`` means."""

from __future__ import annotations

from pathlib import Path

#: The model bundled with the package (issue 3); an empty ``[model] checkpoint`` means this.
BUNDLED_DIR = Path(__file__).resolve().parents[1] / "models"  # the weights shipped in the package
#: Every bundled triage model by name: ``[model] checkpoint = "bundled:v2"`` picks one that is not the default.
BUNDLED_MODELS = {"v2": BUNDLED_DIR / "cxr-densenet121.pt", "v5": BUNDLED_DIR / "cxr-densenet121-v5.pt"}
BUNDLED_CHECKPOINT = BUNDLED_MODELS["v2"]
BUNDLED_LUNG_CHECKPOINT = BUNDLED_DIR / "lung-unet.pt"


def checkpoint_setting(value: str, resolve, fail) -> Path:
    """``[model] checkpoint``: empty = the bundled default, ``bundled:NAME`` = a bundled model by name, else a path."""
    if not value:
        return BUNDLED_CHECKPOINT
    if value.startswith("bundled:"):
        name = value.split(":", 1)[1]
        if name not in BUNDLED_MODELS:
            raise fail("[model] checkpoint", f"no bundled model {name!r} (bundled: "
                       f"{', '.join('bundled:' + n for n in BUNDLED_MODELS)})")
        return BUNDLED_MODELS[name]
    return resolve(value)

