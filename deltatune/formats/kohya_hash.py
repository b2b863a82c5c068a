"""The hashes kohya's sd-scripts records in a LoRA file's metadata (``sshs_model_hash``, ``sshs_legacy_hash``),
which sd-webui-additional-networks and civitai use to recognise a file.

Both are taken over the file the tensors make with only the ``ss_*`` metadata (so that editing other
metadata leaves them alone): ``sshs_model_hash`` is the SHA-256 of that file's bytes after its header
(the tensor data), ``sshs_legacy_hash`` the first 8 hex digits of the SHA-256 of its 64 KiB at offset
1 MiB (of nothing, for a file shorter than that). As in sd-scripts' ``precalculate_safetensors_hashes``.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["model_hashes", "with_hashes"]

_LEGACY_OFFSET, _LEGACY_LENGTH = 0x100000, 0x10000


def model_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) of a file holding ``tensors`` and ``metadata``."""
    from safetensors.torch import save

    kept = {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}
    data = save(tensors, kept or None)
    header = int.from_bytes(data[:8], "little")
    model_hash = hashlib.sha256(data[8 + header:]).hexdigest()
    legacy = hashlib.sha256(data[_LEGACY_OFFSET:_LEGACY_OFFSET + _LEGACY_LENGTH]).hexdigest()[:8]
    return model_hash, legacy


def with_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> dict[str, str] | None:
    """``metadata`` with the two hashes set for ``tensors`` where it holds sd-scripts' training metadata
    (``ss_*``) or hashes already (stale ones are replaced); other metadata is returned as it is."""
    if not metadata or not any(k.startswith(("ss_", "sshs_")) for k in metadata):
        return metadata
    model_hash, legacy = model_hashes(tensors, metadata)
    return {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy}
