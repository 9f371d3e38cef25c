"""Device and process statistics for the telemetry sample.

`DeviceProbe.read()` returns the device fields of DESIGN.md's sample (`gpu_memory_used_ratio`,
`gpu_util` in 0..1, `gpu_power_w`) plus the process's own `process_cpu_percent` (percent of one core, as
`top` shows it: 250 means two and a half cores busy) and `process_rss_bytes`.

Sources, first that works: NVML (`pynvml`, from the nvidia-ml-py package) on NVIDIA; `amdsmi` on ROCm
builds of torch (`torch.version.hip`); torch's own memory counters (`torch.cuda.mem_get_info`, memory
only) when a CUDA/HIP device exists; nothing on CPU. A field that cannot be read is None. A missing or
failing library never raises out of the probe: it falls back and says so once in the log.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

GPU_FIELDS = ("gpu_memory_used_ratio", "gpu_util", "gpu_power_w")
PROCESS_FIELDS = ("process_cpu_percent", "process_rss_bytes")


def _torch():
    try:
        import torch
    except Exception:   # torch is a dependency, but the probe must not be what breaks
        return None
    return torch


class _Backend:
    name = "none"

    def read(self) -> dict[str, float | None]:
        return dict.fromkeys(GPU_FIELDS)

    def close(self) -> None:
        pass


class _NVML(_Backend):
    name = "nvml"

    def __init__(self, index: int) -> None:
        import pynvml

        self.nvml = pynvml
        pynvml.nvmlInit()
        self.handle = self._handle(index)

    def _handle(self, index: int):
        # NVML numbers devices ignoring CUDA_VISIBLE_DEVICES; find torch's device by its UUID when we can.
        torch = _torch()
        try:
            uuid = str(torch.cuda.get_device_properties(index).uuid)
            return self.nvml.nvmlDeviceGetHandleByUUID(uuid if uuid.startswith("GPU-") else f"GPU-{uuid}")
        except Exception:
            return self.nvml.nvmlDeviceGetHandleByIndex(index)

    def read(self) -> dict[str, float | None]:
        n, h = self.nvml, self.handle
        return {
            "gpu_memory_used_ratio": _safe(lambda: _ratio(n.nvmlDeviceGetMemoryInfo(h).used,
                                                          n.nvmlDeviceGetMemoryInfo(h).total)),
            "gpu_util": _safe(lambda: n.nvmlDeviceGetUtilizationRates(h).gpu / 100.0),
            "gpu_power_w": _safe(lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0),  # milliwatts
        }

    def close(self) -> None:
        _safe(self.nvml.nvmlShutdown)


class _AMDSMI(_Backend):
    name = "amdsmi"

    def __init__(self, index: int) -> None:
        import amdsmi

        self.amd = amdsmi
        amdsmi.amdsmi_init()
        handles = amdsmi.amdsmi_get_processor_handles()
        if not handles:
            raise RuntimeError("amdsmi found no GPU")
        self.handle = handles[min(index, len(handles) - 1)]

    def read(self) -> dict[str, float | None]:
        a, h = self.amd, self.handle

        def memory() -> float | None:
            usage = a.amdsmi_get_gpu_vram_usage(h)          # MB
            return _ratio(usage["vram_used"], usage["vram_total"])

        def power() -> float | None:
            info = a.amdsmi_get_power_info(h)              # W; the key differs between GPU generations
            for key in ("current_socket_power", "average_socket_power", "socket_power"):
                value = info.get(key)
                if isinstance(value, int | float) and value > 0:
                    return float(value)
            return None

        return {
            "gpu_memory_used_ratio": _safe(memory),
            "gpu_util": _safe(lambda: a.amdsmi_get_gpu_activity(h)["gfx_activity"] / 100.0),
            "gpu_power_w": _safe(power),
        }

    def close(self) -> None:
        _safe(self.amd.amdsmi_shut_down)


class _TorchMemory(_Backend):
    name = "torch"

    def __init__(self, index: int) -> None:
        self.torch = _torch()
        self.index = index
        self.torch.cuda.mem_get_info(index)     # fails here, not on every read, when it cannot work

    def read(self) -> dict[str, float | None]:
        def memory() -> float | None:
            free, total = self.torch.cuda.mem_get_info(self.index)
            return _ratio(total - free, total)
        return {"gpu_memory_used_ratio": _safe(memory), "gpu_util": None, "gpu_power_w": None}


def _ratio(used: float, total: float) -> float | None:
    return float(used) / float(total) if total else None


def _safe(fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception:
        return None


def _gpu_backend(device_index: int | None) -> _Backend:
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        log.info("device stats: no GPU (CPU only), GPU fields will be empty")
        return _Backend()
    index = torch.cuda.current_device() if device_index is None else device_index
    hip = getattr(torch.version, "hip", None)
    tried: list[str] = []
    for cls in (_AMDSMI,) if hip else (_NVML,):
        try:
            backend = cls(index)
        except Exception as exc:   # ImportError, an NVML/amdsmi error, a missing driver library
            tried.append(f"{cls.name} unavailable ({type(exc).__name__}: {exc})")
            continue
        log.info("device stats: %s on device %d", cls.name, index)
        return backend
    try:
        backend = _TorchMemory(index)
    except Exception as exc:
        tried.append(f"torch memory counters unavailable ({type(exc).__name__}: {exc})")
        log.warning("device stats: %s; GPU fields will be empty", "; ".join(tried))
        return _Backend()
    log.warning("device stats: %s; falling back to torch memory counters (no utilization or power)",
                "; ".join(tried))
    return backend


class _Process:
    """CPU percent (from user+system CPU time over wall time between reads) and current RSS."""

    def __init__(self) -> None:
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._last = (time.monotonic(), self._cpu_s())

    @staticmethod
    def _cpu_s() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    def rss_bytes(self) -> float | None:
        try:
            with open("/proc/self/statm") as f:
                return float(int(f.read().split()[1]) * self._page)
        except (OSError, ValueError, IndexError):
            # No /proc (macOS): the peak RSS is the best there is; ru_maxrss is bytes on macOS.
            return _safe(lambda: float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))

    def read(self) -> dict[str, float | None]:
        now, cpu = time.monotonic(), self._cpu_s()
        last_t, last_cpu = self._last
        self._last = (now, cpu)
        percent = 100.0 * (cpu - last_cpu) / (now - last_t) if now > last_t else None
        return {"process_cpu_percent": percent, "process_rss_bytes": self.rss_bytes()}


class DeviceProbe:
    """Reads device and process statistics; see the module's doc for fields and sources.

    `device_index` is torch's CUDA device index (default: the current device). `gpu=False` skips the
    GPU entirely (the fields are None)."""

    def __init__(self, device_index: int | None = None, *, gpu: bool = True) -> None:
        self._gpu: _Backend = _gpu_backend(device_index) if gpu else _Backend()
        self._process = _Process()

    @property
    def backend(self) -> str:
        """Where the GPU fields come from: "nvml", "amdsmi", "torch" or "none"."""
        return self._gpu.name

    def read(self) -> dict[str, float | None]:
        try:
            out = self._gpu.read()
        except Exception:   # a backend bug must not stop telemetry
            log.exception("device stats: %s read failed", self._gpu.name)
            out = dict.fromkeys(GPU_FIELDS)
        try:
            out.update(self._process.read())
        except Exception:
            log.exception("device stats: process read failed")
            out.update(dict.fromkeys(PROCESS_FIELDS))
        return out

    def close(self) -> None:
        self._gpu.close()
