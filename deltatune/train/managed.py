"""CUDA managed ("paged") memory for optimizer states, through the CUDA driver API (``libcuda``).

Managed memory (``cuMemAllocManaged``) is one address range that the driver migrates page by page
between host and GPU. The paged ``deltatune.train.optim.AdamW`` keeps its states there: prefetched to the
GPU for the optimizer step, paged back to the host after it, so the states hold no GPU memory while
the forward and backward run, and the update itself reads them at GPU speed.

Two rules keep this safe on a shared card:

* the total managed memory allocated here never exceeds what the GPU has free at allocation time
  (``MemoryError`` instead; oversubscribing managed memory can stall the whole GPU);
* the states' preferred location is the host, and they are prefetched to the GPU only when it has
  room for them at that moment; otherwise the kernels read them from host memory over the bus
  (``cuMemAdvise`` accessed-by), slower but never more GPU memory than is free.

PyTorch has no managed allocator, so the range is wrapped as a tensor through
``__cuda_array_interface__``; the tensor keeps its owner alive and the owner frees the range
(the owner holds no tensor, or the pair would be a cycle the garbage collector cannot see).
"""

from __future__ import annotations

import ctypes
import functools
import threading

import torch

__all__ = ["managed_empty", "managed_bytes", "prefetch", "is_managed", "RESERVE_BYTES"]

RESERVE_BYTES = 512 * 2 ** 20
"""GPU memory left free beyond the states themselves (cuBLAS workspaces, the allocator's next block)."""

_CU_MEM_ATTACH_GLOBAL = 1
_CU_POINTER_ATTRIBUTE_IS_MANAGED = 8
_CU_MEM_ADVISE_SET_PREFERRED_LOCATION = 3
_CU_MEM_ADVISE_SET_ACCESSED_BY = 5
_CU_DEVICE_CPU = -1
_CU_MEM_LOCATION_TYPE_DEVICE = 1
_CU_MEM_LOCATION_TYPE_HOST = 2

_lock = threading.Lock()
_allocated: dict[int, int] = {}  # device index -> managed bytes allocated here and not yet freed


class _Location(ctypes.Structure):  # CUmemLocation (CUDA >= 12.2)
    _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


@functools.lru_cache(maxsize=None)
def _driver():
    """The CUDA driver library with the prototypes used here (``_v2`` prefetch/advise where present)."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
    except OSError as e:
        raise RuntimeError(f"paged optimizer states need the CUDA driver (libcuda.so.1): {e}") from None
    ptr, size, u32, i32 = ctypes.c_uint64, ctypes.c_size_t, ctypes.c_uint, ctypes.c_int
    lib.cuMemAllocManaged.argtypes = [ctypes.POINTER(ptr), size, u32]
    lib.cuMemFree_v2.argtypes = [ptr]
    lib.cuPointerGetAttribute.argtypes = [ctypes.c_void_p, i32, ptr]
    lib.cuGetErrorString.argtypes = [i32, ctypes.POINTER(ctypes.c_char_p)]
    lib.v2 = hasattr(lib, "cuMemPrefetchAsync_v2") and hasattr(lib, "cuMemAdvise_v2")
    if lib.v2:
        lib.cuMemPrefetchAsync_v2.argtypes = [ptr, size, _Location, u32, ctypes.c_void_p]
        lib.cuMemAdvise_v2.argtypes = [ptr, size, i32, _Location]
    else:
        lib.cuMemPrefetchAsync.argtypes = [ptr, size, i32, ctypes.c_void_p]
        lib.cuMemAdvise.argtypes = [ptr, size, i32, i32]
    return lib


def _check(result: int, what: str) -> None:
    if result != 0:
        msg = ctypes.c_char_p()
        _driver().cuGetErrorString(result, ctypes.byref(msg))
        raise RuntimeError(f"{what} failed: CUDA error {result} ({(msg.value or b'?').decode()})")


def _location(device: int) -> _Location:
    return _Location(_CU_MEM_LOCATION_TYPE_HOST, 0) if device == _CU_DEVICE_CPU else _Location(_CU_MEM_LOCATION_TYPE_DEVICE, device)


def _advise(ptr: int, nbytes: int, advice: int, device: int) -> None:
    lib = _driver()
    if lib.v2:
        _check(lib.cuMemAdvise_v2(ptr, nbytes, advice, _location(device)), "cuMemAdvise")
    else:
        _check(lib.cuMemAdvise(ptr, nbytes, advice, device), "cuMemAdvise")


def managed_bytes(device: torch.device | int | None = None) -> int:
    """Managed bytes allocated through this module on ``device`` and not yet freed."""
    return _allocated.get(torch.cuda._utils._get_device_index(device, optional=True), 0)


class _Range:
    """Owner of one managed range: frees it when the last tensor over it is gone."""

    def __init__(self, ptr: int, nbytes: int, device: int):
        self.ptr, self.nbytes, self.device = ptr, nbytes, device

    @property
    def __cuda_array_interface__(self) -> dict:
        return {"shape": (self.nbytes,), "typestr": "|u1", "data": (self.ptr, False), "version": 3}

    def __del__(self):
        ptr, self.ptr = self.ptr, 0
        if ptr:
            try:
                _driver().cuMemFree_v2(ptr)  # synchronizes with the device's pending work
            finally:
                with _lock:
                    _allocated[self.device] -= self.nbytes


def managed_empty(nbytes: int, device: torch.device | int | None = None) -> torch.Tensor:
    """A uint8 CUDA tensor of ``nbytes`` over CUDA managed memory that prefers the host.

    The range is freed with the last tensor viewing it. Raises ``MemoryError`` (before allocating) if
    the GPU has less free memory than every managed byte allocated here plus this one plus
    ``RESERVE_BYTES``.
    """
    device = torch.cuda._utils._get_device_index(device, optional=True)
    nbytes = max(int(nbytes), 1)
    torch.cuda.init()
    with torch.cuda.device(device):
        torch.cuda.current_stream().synchronize()  # the primary context is current in this thread
        free, _ = torch.cuda.mem_get_info(device)
        with _lock:
            held = _allocated.get(device, 0)
            if held + nbytes + RESERVE_BYTES > free:
                raise MemoryError(
                    f"paged optimizer states need {nbytes / 2**20:.1f} MiB of CUDA managed memory "
                    f"({held / 2**20:.1f} MiB already held), but GPU {device} has only "
                    f"{free / 2**20:.1f} MiB free (keeping {RESERVE_BYTES / 2**20:.0f} MiB in reserve); "
                    "use state_device='cpu' (pinned host memory) instead")
            ptr = ctypes.c_uint64()
            _check(_driver().cuMemAllocManaged(ctypes.byref(ptr), nbytes, _CU_MEM_ATTACH_GLOBAL), "cuMemAllocManaged")
            _allocated[device] = held + nbytes
    owner = _Range(ptr.value, nbytes, device)
    _advise(owner.ptr, nbytes, _CU_MEM_ADVISE_SET_PREFERRED_LOCATION, _CU_DEVICE_CPU)
    _advise(owner.ptr, nbytes, _CU_MEM_ADVISE_SET_ACCESSED_BY, device)
    return torch.as_tensor(owner, device=f"cuda:{device}")  # the tensor's deleter holds the only reference


def prefetch(t: torch.Tensor, to: str | torch.device, stream: torch.cuda.Stream | None = None) -> None:
    """Migrate the managed pages of ``t`` to ``to`` ("cpu" or a CUDA device), ordered on ``stream``."""
    to = torch.device(to)
    device = _CU_DEVICE_CPU if to.type == "cpu" else torch.cuda._utils._get_device_index(to)
    stream = stream or torch.cuda.current_stream(t.device)
    nbytes = t.numel() * t.element_size()
    lib = _driver()
    if lib.v2:
        _check(lib.cuMemPrefetchAsync_v2(t.data_ptr(), nbytes, _location(device), 0, stream.cuda_stream),
               "cuMemPrefetchAsync")
    else:
        _check(lib.cuMemPrefetchAsync(t.data_ptr(), nbytes, device, stream.cuda_stream), "cuMemPrefetchAsync")


def is_managed(t: torch.Tensor) -> bool:
    """Whether ``t``'s memory is CUDA managed memory."""
    if not t.is_cuda:
        return False
    value = ctypes.c_uint64()
    result = _driver().cuPointerGetAttribute(ctypes.byref(value), _CU_POINTER_ATTRIBUTE_IS_MANAGED, t.data_ptr())
    _check(result, "cuPointerGetAttribute")
    return bool(value.value)
