"""onnxruntime sessions set up for serving, on the execution provider that really runs.

Two traps this module exists for:

- ``onnxruntime-gpu`` asked for ``CUDAExecutionProvider`` on a host whose CUDA libraries do
  not load raises nothing: it prints an error to stderr and runs on the CPU.
  ``get_available_providers()`` lists what was compiled in, not what can load, so the only
  truth is ``session.get_providers()[0]`` after the session exists.
- onnxruntime's intra-op threads spin while waiting for work by default. Behind a server the
  spinning threads compete with the event loop and the decoders for the same cores; turning
  it off doubled served throughput in a measurement on a 2-core host
  (``../shared/reference/anchors.md``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import onnxruntime as ort
import structlog

from gateway.errors import ProviderUnavailable

__all__ = [
    "CPU",
    "CUDA",
    "ProviderChoice",
    "ProviderUnavailable",
    "create_session",
    "physical_cores",
]

_log = structlog.get_logger(__name__)

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

ProviderChoice = Literal["auto", "cpu", "cuda"]


def physical_cores() -> int:
    """Physical cores this process may use (hyper-threads and other CPUs not counted).

    onnxruntime's own default counts physical cores of the whole machine; in a container
    limited by an affinity mask that oversubscribes, so the mask caps the count too.
    """
    try:
        usable = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = os.cpu_count() or 1
    cores: set[tuple[str, str]] = set()
    try:
        physical = core = ""
        for line in Path("/proc/cpuinfo").read_text(encoding="ascii").splitlines():
            name, _, value = line.partition(":")
            name = name.strip()
            if name == "physical id":
                physical = value.strip()
            elif name == "core id":
                core = value.strip()
                cores.add((physical, core))
    except (OSError, UnicodeDecodeError):
        pass
    return max(1, min(len(cores) or usable, usable))


def _session_options(intra_op_threads: int | None) -> Any:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Sequential: the detector is one chain of layers, parallel branches would gain nothing.
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = intra_op_threads or physical_cores()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def create_session(
    model: Path | bytes,
    *,
    providers: ProviderChoice = "auto",
    intra_op_threads: int | None = None,
) -> tuple[Any, str]:
    """Create an ``onnxruntime.InferenceSession`` for serving; return it and its provider.

    ``model`` is a path or, better, the bytes already checked against the manifest (so the
    file cannot change between the check and the load). ``providers``: ``"cpu"``;
    ``"cuda"`` (fail with :class:`ProviderUnavailable` unless CUDA really runs); ``"auto"``
    (CUDA when onnxruntime has it and it loads, the CPU otherwise). ``intra_op_threads``
    defaults to the physical cores. The provider returned is the one really in use; it is
    logged once here.
    """
    if providers not in ("auto", "cpu", "cuda"):
        raise ValueError(f"providers must be 'auto', 'cpu' or 'cuda', got {providers!r}")
    if intra_op_threads is not None and intra_op_threads < 1:
        raise ValueError(f"intra_op_threads must be at least 1, got {intra_op_threads}")
    compiled = ort.get_available_providers()
    wanted = [CPU]
    if providers != "cpu" and CUDA in compiled:
        wanted = [CUDA, CPU]
    elif providers == "cuda":
        raise ProviderUnavailable(
            f"providers='cuda' but this onnxruntime {ort.__version__} has no CUDA "
            f"(it offers {', '.join(compiled)}); install the gateway-gpu extra "
            "(onnxruntime-gpu) instead of onnxruntime"
        )
    source = str(model) if isinstance(model, Path) else model
    options = _session_options(intra_op_threads)
    session = ort.InferenceSession(source, sess_options=options, providers=wanted)
    in_use = str(session.get_providers()[0])
    if providers == "cuda" and in_use != CUDA:
        raise ProviderUnavailable(
            "providers='cuda' but CUDA did not load (onnxruntime fell back to the CPU; "
            "its error on stderr names the missing library, e.g. libcublasLt or libcudnn)"
        )
    log = _log.warning if CUDA in wanted and in_use != CUDA else _log.info
    log(
        "inference provider",
        provider=in_use,
        requested=providers,
        compiled=compiled,
        intra_op_threads=options.intra_op_num_threads,
        onnxruntime=ort.__version__,
    )
    return session, in_use
