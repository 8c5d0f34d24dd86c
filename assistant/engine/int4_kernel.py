"""int4-cpu's own matrix product on CPUs with AVX512-VNNI (``int4_kernel.cpp``), built on first use.

PyTorch's ``_weight_int4pack_mm_for_cpu`` is tuned for a few rows: eight rows took 3.5× one row's time on
the 2-core machines here, so continuous batching of eight conversations decoded little faster than four.
This kernel does what llama.cpp does for its Q4_1 weights: each row's groups of 32 inputs are rounded to
int8 in steps of max|x| / 127 (a row's rounding depends on that row only), and multiplied with the 4-bit
codes by AVX512-VNNI's ``vpdpbusd``, 64 products an instruction; each block of 16 outputs by 32 inputs is
unpacked once into registers and used for up to four rows. The groups' scales and zeros (the same bfloat16
values as PyTorch's layout) are applied in float32, the zero times the group's exact sum of inputs:
``sum_k w_k x_k = scale * step * sum_k code_k xq_k + (zero - 8 * scale) * sum_k x_k``. The rounding of
the inputs moves a product by about 1 % of its typical size (``tests/test_engine_int4_kernel.py``). Rows
never mix, so batched decoding equals unbatched decoding. Measured on a 2-core AMD EPYC against PyTorch's
kernel, the decoder's products (576 → 3072 inputs → outputs): 2.5× faster for one row, 3.8× for eight.

The same library holds ``assistant::decode_layers``: :class:`~assistant.engine.fast_decode.FastDecoder`'s layer
loop in one call for a model whose products are all this kernel's (the same ATen operations, attention written
out, as are the norms and the rotary embedding; the image adapter included), without the loop's per-operation
Python cost.

It is compiled with PyTorch's C++ extension builder (g++, ninja, OpenMP through PyTorch's own runtime) into
a cache directory (one per source, PyTorch version and Python environment) the first time a process asks for
it — ``bin/setup`` does it, about 15 seconds — and later processes load the built library. One process builds
at a time; a build that was killed holds nothing up (:func:`_build_lock`). Where it cannot be used (no
AVX512-VNNI, no compiler, the build fails, or ``ASSISTANT_INT4_KERNEL=0``), :func:`available` is false and
int4-cpu keeps PyTorch's kernel and layout;
:func:`describe` says which and why (``assistant doctor`` prints it).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("int4_kernel.cpp")
GROUP_SIZE = 32
TILE_ROWS = 16  # outputs per block: the kernel's layouts of several layers concatenate along outputs
BLOCK_BYTES = 320  # 256 bytes of codes, 16 bfloat16 scales, 16 bfloat16 zeros
ENV_SWITCH = "ASSISTANT_INT4_KERNEL"  # "0" keeps PyTorch's kernel (to compare them)

_lock = threading.Lock()
_loaded: bool | None = None
_why = "not tried yet"


def cache_dir() -> Path:
    """Where the built library lives: per PyTorch version, source and Python environment, so an upgrade of
    either rebuilds, and two environments (a checkout's and a clean clone's) do not rebuild it over each other's
    (the build's commands name the environment's paths, so each would find the other's build out of date)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256(SOURCE.read_bytes() + sys.prefix.encode()).hexdigest()[:16]
    return base / "assistant" / "kernels" / f"int4-torch{torch.__version__.replace('+', '-')}-{digest}"


def available() -> bool:
    """Whether the kernel is built (building it if needed) and runs on this CPU; false with a logged reason
    otherwise (:func:`describe`). Thread-safe; the answer is kept for the process."""
    global _loaded, _why
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is None:
            _loaded, _why = _load()
            if "could not" in _why:  # a machine that should have it: say so (doctor says it either way)
                log.warning("int4-cpu: %s", _why)
            else:
                log.debug("int4-cpu: %s", _why)
    return _loaded


def describe() -> str:
    """Which kernel int4-cpu multiplies with in this process, and why (builds the kernel if needed)."""
    available()
    return _why


def _load() -> tuple[bool, str]:
    if os.environ.get(ENV_SWITCH, "1") == "0":
        return False, f"PyTorch's int4 kernel ({ENV_SWITCH}=0)"
    if not _cpu_has_avx512_vnni():
        return False, "PyTorch's int4 kernel (this CPU lacks AVX512-VNNI)"
    try:
        from torch.utils import cpp_extension

        directory = cache_dir()
        directory.mkdir(parents=True, exist_ok=True)
        if not hasattr(torch.ops.assistant, "int4_mm"):
            # ninja from the environment's own bin (the ninja package) when the environment is not activated
            path = os.environ.get("PATH", "")
            os.environ["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), path])
            try:  # OpenMP: the library binds to the libgomp PyTorch has loaded (the same soname), one thread team
                with _build_lock(directory):
                    cpp_extension.load(name="assistant_int4", sources=[str(SOURCE)], build_directory=str(directory),
                                       extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                                       is_python_module=False, verbose=False)
            finally:
                os.environ["PATH"] = path
            # its output's shape and dtype, for torch.compile (bench/compiled_step.py traces through it)
            torch.library.register_fake("assistant::int4_mm")(
                lambda rows, packed: rows.new_empty((rows.shape[0], packed.shape[0] * TILE_ROWS)))
        supported = bool(torch.ops.assistant.int4_supported())
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, a failed build: PyTorch's kernel serves
        reason = str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__
        return False, f"PyTorch's int4 kernel, slower for batches (could not build the project's: {reason})"
    if not supported:
        return False, "PyTorch's int4 kernel (this CPU lacks AVX512-VNNI)"
    return True, f"the project's AVX512-VNNI kernel (built in {cache_dir()})"


@contextlib.contextmanager
def _build_lock(directory: Path) -> Iterator[None]:
    """One build (or load) in ``directory`` at a time across processes, without waiting on a dead one.

    PyTorch's builder locks with a file it deletes when done: a process killed while building (a server stopped
    during its first start) leaves the file, and every later load waited for it forever, the server "loading"
    for good. This lock is an ``flock``, which the system drops with the process that held it; whoever holds it
    is the only builder, so a PyTorch lock file found then is a dead build's and goes."""
    import fcntl  # POSIX only: elsewhere the build fails here and PyTorch's kernel serves

    with open(directory / "assistant-build.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            (directory / "lock").unlink(missing_ok=True)
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _cpu_has_avx512_vnni() -> bool:
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_vnni"} <= flags


def pack(codes: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
    """4-bit ``codes`` ``(out, in)`` (0..15) and ``scales_and_zeros`` ``(in / 32, out, 2)`` bfloat16 (the
    weight is ``(code - 8) * scale + zero``) → the kernel's blocks, uint8 ``(out / 16, in / 32, 320)``."""
    out_features, in_features = codes.shape
    tiles, groups = out_features // TILE_ROWS, in_features // GROUP_SIZE
    if out_features % TILE_ROWS or in_features % GROUP_SIZE:
        raise ValueError(f"int4 kernel: widths {in_features} → {out_features} are not multiples of "
                         f"{GROUP_SIZE} → {TILE_ROWS}")
    # input index within a group = 2 * (4 * chunk + j) + parity
    # chunk c of a block: byte b of lane n holds the codes of inputs 8c + b (low nibble) and 8c + 4 + b (high)
    q = codes.to(torch.uint8).reshape(tiles, TILE_ROWS, groups, 4, 2, 4)
    lanes = q[..., 0, :] | q[..., 1, :] << 4  # (tile, lane, group, chunk, byte)
    code_bytes = lanes.permute(0, 2, 3, 1, 4).reshape(tiles, groups, 256)
    scales = scales_and_zeros.to(torch.bfloat16).reshape(groups, tiles, TILE_ROWS, 2).permute(1, 0, 3, 2)
    scale_bytes = scales.contiguous().view(torch.uint8).reshape(tiles, groups, 64)
    return torch.cat([code_bytes, scale_bytes], dim=-1).contiguous()


def matmul(rows: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """``rows`` ``(N, in)`` times the weight in :func:`pack`'s blocks: ``(N, out)``, bfloat16 for bfloat16 rows
    and float32 for float32 rows (no casts around the product); other dtypes are computed as float32."""
    if rows.dtype not in (torch.bfloat16, torch.float32):
        rows = rows.float()
    return torch.ops.assistant.int4_mm(rows.contiguous(), packed)


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """``logits.argmax(-1)`` (the first index on ties, a NaN counted largest): ``(B, V)`` → ``(B,)``, ``(V,)`` → a
    0-d tensor. The kernel's own where this process has it loaded already (a model on int4-cpu) and the logits are
    float32 on the CPU: ATen's took 0.39 ms for eight rows of SmolLM2's 49,152 logits on a 2-core Intel Xeon, about
    a tenth of what a row adds to a decode step; elsewhere ATen's."""
    if _loaded and logits.dtype == torch.float32 and logits.device.type == "cpu" and logits.dim() in (1, 2):
        picks = torch.ops.assistant.argmax_rows(logits.reshape(-1, logits.shape[-1]))
        return picks.reshape(logits.shape[:-1])
    return logits.argmax(dim=-1)


if __name__ == "__main__":  # bin/setup: build it now rather than at the first model load
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    print(f"int4-cpu multiplies with {describe()}")
