"""``python -m sparse_kernels.info``: versions, build status, and the backends of every op.

``report()`` returns the same information as a dict (the CLI's ``info`` prints it too).
"""

from __future__ import annotations

import platform
import sys

import torch

from . import _extension
from .ops import _registry as R


def _version(mod: str) -> str | None:
    try:
        m = __import__(mod)
    except ImportError:
        return None
    return getattr(m, "__version__", "?")


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device="cpu") -> str:
    """Name of the machine a benchmark row ran on: the GPU's name for CUDA, else the CPU's."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    return cpu_name()


def devices() -> list[str]:
    out = ["cpu"]
    if torch.cuda.is_available():
        out.append("cuda")
    return out


def cuda_linear_kernels() -> list[str] | None:
    """The kernels of sparse_linear's cuda backend usable here (``sparse_linear_cuda_kernel``):
    gemv, gemm, splitk wherever the backend runs, wgmma where a tiny probe call is accepted (an
    sm_90 GPU and an sm_90a build); None without the cuda backend."""
    if "sparse_linear" not in R.OPS or R.why_unavailable("sparse_linear", "cuda", "cuda") is not None:
        return None
    out = ["gemv", "gemm", "splitk"]
    x = torch.zeros(1, 64, dtype=torch.float16, device="cuda")
    values = torch.zeros(16, 32, dtype=torch.float16, device="cuda")
    meta = torch.full((16, 4), 0x4444, dtype=torch.int16, device="cuda")
    try:
        torch.ops.sparse_kernels.sparse_linear_cuda_kernel(x, values, meta, None, None, "wgmma")
        out.append("wgmma")
    except ValueError:
        pass
    return out


def report() -> dict:
    st = _extension.load()
    ops = {}
    for name in R.OPS:
        ops[name] = {}
        for dev in ("cpu", "cuda"):
            ops[name][dev] = {b: (R.why_unavailable(name, b, dev) or "yes") for b in R.OPS[name].backends}
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": _version("triton"),
        "numpy": _version("numpy"),
        "gpu": gpu,
        "extension_loaded": st["loaded"],
        "extension_reason": st["reason"],
        "extension_built_for_torch": st["built_torch"],
        "extension_with_cuda": st["with_cuda"],
        "extension_with_openmp": st["with_openmp"],
        "cpu_threads": torch.get_num_threads(),
        "build": st["build"],
        "cuda_linear_kernels": cuda_linear_kernels(),
        "ops": ops,
    }


def format_report(rep: dict | None = None) -> str:
    rep = rep or report()
    lines = [
        f"python      {rep['python']}  ({rep['platform']})",
        f"torch       {rep['torch']}  (CUDA {rep['torch_cuda']})",
        f"triton      {rep['triton'] or 'not installed'}",
        f"gpu         {rep['gpu'] or 'none visible'}",
        f"_C loaded   {rep['extension_loaded']}"
        + (f"  built for torch {rep['extension_built_for_torch']}" if rep["extension_built_for_torch"] else ""),
        f"_C CUDA     {rep['extension_with_cuda']}",
        f"_C OpenMP   {rep['extension_with_openmp']}  (CPU kernels on {rep['cpu_threads']} threads"
        f"{'' if rep['extension_with_openmp'] or not rep['extension_loaded'] else '; built without OpenMP: 1'})",
    ]
    if rep["extension_reason"]:
        lines.append(f"_C note     {rep['extension_reason']}")
    if rep.get("cuda_linear_kernels"):
        lines.append(f"cuda sparse_linear kernels: {', '.join(rep['cuda_linear_kernels'])}")
    lines.append("")
    lines.append("backends per op and device ('yes', or why not):")
    for name, per_dev in rep["ops"].items():
        lines.append(f"  {name}")
        for dev, per_b in per_dev.items():
            ok = [b for b, v in per_b.items() if v == "yes"]
            lines.append(f"    {dev:5s} available: {', '.join(ok) or '-'}")
            for b, v in per_b.items():
                if v != "yes":
                    lines.append(f"          {b:10s} no: {v}")
    return "\n".join(lines)


def main() -> None:
    import sparse_kernels  # noqa: F401  (defines every op family)

    print(format_report())


if __name__ == "__main__":
    main()
