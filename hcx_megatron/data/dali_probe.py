"""Whether NVIDIA DALI is usable here, in a module with no project imports: config validation asks it before any
process starts, without importing the loaders (which import the datasets, which read the config)."""

from __future__ import annotations


def dali_import_error() -> str | None:
    """None when NVIDIA DALI imports, otherwise the import error's text."""
    try:
        import nvidia.dali  # noqa: F401
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any failure (missing wheel, missing CUDA libs) means unusable
        return f"{type(exc).__name__}: {exc}"
    return None


__all__ = ["dali_import_error"]
