"""How much memory a request will need, estimated from the model's shapes before any work, and the check
that refuses a request that cannot fit (or tiles the VAE where that makes it fit).

The estimate follows the tensors the pipeline allocates, layer by layer, as ``UNetModel.forward`` and the
VAE's ``decode`` / ``encode`` run them in inference mode, where a tensor is freed as soon as nothing holds
it: the skip connections the UNet keeps, each block's temporaries (a ResBlock holds about three maps of
its output width at once, a transformer block's GEGLU feed-forward four to eight times its width), and
the attention's scores as the attention policy computes them (:mod:`sdstudio.models.attention`):

- PyTorch's fused kernel (CPU with AMX, CUDA, fp32) keeps blocks of scores per thread, never the whole
  matrix, when the last dimension of q, k and v is contiguous. The VAE's single-head attention on an NCHW
  map (fp32 runs NCHW: ``sdstudio.engine.prefer_channels_last``) is not, so PyTorch falls back to its
  math path, which holds the whole [queries, keys] matrix in fp32 and its softmax: 9.1-9.3 bytes a score
  in fp32, 9.4-10.7 in bf16 (4096 and 16384 tokens; ``benchmarks/memory_estimate.py --attention``),
  counted as 10.
- the sliced path (CPUs without AMX, bf16) holds one slice of scores of ``SLICE_BYTES``, plus copies of
  q and v and its transposed output.

Everything else is counted from the config (channels, levels, blocks, heads), the batch (CFG runs the
prompt, every AND sub-prompt and the negative as one UNet batch), the sizes of both passes (the hires fix
included) and the dtype; no figure is measured per preset, so any architecture is estimated alike. Where
the UNet runs on oneDNN's packed weights (CPU, bf16; :mod:`sdstudio.models.prepacked`) their copy, as
large as the UNet's weights, is counted until it exists.

Where the process keeps freed memory in its heap (``sdstudio.host_memory``; asked of glibc), the passes'
growths add up and each is a measured multiple of its live peak (``KEPT_HEAP_*``); the first request of a
process also makes the libraries' kernels and caches (``RUNTIME``).

What a request needs on top of what the process already holds is then compared with what the machine
can give: ``MemAvailable``, bounded by the cgroup's limit where one is set (on CUDA the device's free
memory plus what PyTorch's caching allocator holds unused). The weights the process already holds are
not counted again, except those that are still pages of the memory-mapped checkpoint file: those are
page cache, which ``MemAvailable`` counts as free, and sampling needs them resident.
``benchmarks/memory_estimate.py`` measures the estimate against the peak resident memory of
``sdstudio generate``.
"""

from __future__ import annotations

import bisect
import ctypes
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sdstudio.errors import SdStudioError
from sdstudio.models.attention import SLICE_BYTES, prefer_sliced
from sdstudio.models.configs import ModelConfig, UNetConfig, VAEConfig
from sdstudio.models.loading import LoadedModel
from sdstudio.models.prepacked import Conv2d as PackedConv2d
from sdstudio.models.prepacked import Linear as PackedLinear
from sdstudio.models.prepacked import packable
from sdstudio.pipelines.hires import LATENT_UPSCALERS
from sdstudio.pipelines.sampling import Plan
from sdstudio.pipelines.vae_tiling import Tiling, decoder_context, encoder_context, should_tile
from sdstudio.prompt.parser import ParsedPrompt
from sdstudio.types import GenerationRequest

__all__ = [
    "MemoryCheck",
    "MemoryEstimate",
    "available_bytes",
    "check_memory",
    "device_available_bytes",
    "estimate",
    "guidance_rows",
    "heap_keeps_freed_memory",
    "resident_bytes",
]

log = logging.getLogger(__name__)

GiB = 2**30
MiB = 2**20
# What a request may need beyond the estimate: the estimate's own error (within 25 % of the measured
# peak: ``benchmarks/memory_estimate.py``), the heap's fragmentation when freed memory is kept
# (``sdstudio.host_memory``), oneDNN's and OpenMP's scratch, and the rest of the machine moving on.
MARGIN = 0.25
RESERVE = 512 * MiB
# Where the heap keeps freed blocks (``sdstudio.host_memory``, as ``sdstudio generate`` runs on the CPU),
# a pass grows the process by more than its live tensors: a freed block serves only a request that fits
# in it, and each level of the VAE asks for larger blocks than the one before. So the passes add up (the
# decode finds few of the sampling's holes large enough), and each grows the heap by a multiple of its
# live peak, which varies from run to run. Measured on sd15 with a fp16 file, 2 steps (``python
# benchmarks/memory_estimate.py --phases``, freed memory kept against handed back): the UNet's first
# steps, which make the packed weights between their activations (bf16), grew it by 1.4-1.6x (512x512),
# 3.3x (768x768; 512x512, batch 2), in fp32 (nothing packed) by 1.3-2.0x; the decode by 1.6-2.0x, in fp32
# 1.06-1.76x, tiled (1024x1024, tiles of several shapes) 2.3x. The heap settles after the second step.
KEPT_HEAP_UNET = 3.5
KEPT_HEAP_UNET_UNPACKED = 2.0
KEPT_HEAP_VAE = 2.0
KEPT_HEAP_VAE_TILED = 2.5
# Libraries' code pages, oneDNN's kernels and primitive cache, OpenMP's threads: made on first use by the
# first request of a process (84-90 MiB for sd15, ``--phases``; ~100 MiB for the embedded model), then
# reused.
RUNTIME = 100 * MiB
# Bytes the math attention path holds per score: the fp32 scores and their softmax, plus q and k copies.
MATH_BYTES_PER_SCORE = 10
TEXT_TOKENS = 77  # one CLIP chunk; cross-attention's keys (a longer prompt's few chunks change little)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a request holds at its peak, by part; on CUDA all but ``images`` are device memory.

    ``unet`` and ``vae`` are the largest of their passes (both passes of the hires fix, every VAE encode
    and decode). They do not overlap in time, so the peak holds the weights and the largest pass; where
    the process's heap keeps freed memory they are what all passes grow it by, and add up.
    """

    device: str  # "cpu" or "cuda"
    weights: int  # parameters and buffers of the three networks, as loaded
    weights_mapped: int  # the part of ``weights`` that is pages of the mapped checkpoint file
    packed: int  # oneDNN's packed copies of the UNet's weights (CPU, bf16)
    packed_made: int  # the part of ``packed`` that exists already (made by an earlier request)
    unet: int  # activations of the largest UNet pass, with the sampler's latents (kept heap: all passes)
    vae: int  # the largest VAE decode or encode, with its tiles' accumulators (kept heap: all of them)
    images: int  # the decoded images: float32 tensor, its 8-bit conversion and PIL copies (host memory)
    tiled: bool | None  # the VAE tiling this was estimated for (None: automatic, per pass)
    kept_heap: bool = False  # freed memory stays in the heap: the passes' growths add up
    runtime: int = RUNTIME  # libraries' kernels and caches made on first use

    @property
    def activations(self) -> int:
        """The passes' share of the peak on the request's device: the largest, or where the heap keeps
        freed memory all of them (``unet`` and ``vae`` are then sums over their passes too)."""
        passes = (self.unet, self.vae) if self.device == "cuda" else (self.unet, self.vae, self.images)
        return sum(passes) if self.kept_heap and self.device == "cpu" else max(passes)

    @property
    def peak(self) -> int:
        """The request's peak on its device."""
        return self.weights + self.packed + self.runtime + self.activations

    @property
    def needed(self) -> int:
        """What the request needs on its device beyond what the process holds already: the peak less the
        weights already resident in anonymous memory and the packed copies already made."""
        return self.peak - (self.weights - self.weights_mapped) - self.packed_made

    @property
    def host_needed(self) -> int:
        """On CUDA, host memory for the images; on the CPU 0 (counted in ``needed``)."""
        return self.images if self.device == "cuda" else 0

    def describe(self) -> str:
        """The parts in MiB, for the log."""
        parts = [f"weights {_mib(self.weights)}"]
        if self.weights_mapped:
            parts[0] += f" ({_mib(self.weights_mapped)} of them mapped from the file)"
        if self.packed:
            made = f", {_mib(self.packed_made)} of them made" if self.packed_made else ""
            parts.append(f"packed weights {_mib(self.packed)}{made}")
        parts += [f"UNet {_mib(self.unet)}", f"VAE {_mib(self.vae)}", f"images {_mib(self.images)}"]
        parts.append(f"runtime {_mib(self.runtime)}")
        if self.kept_heap and self.device == "cpu":
            parts.append("freed memory kept in the heap: the passes add up")
        return ", ".join(parts)


@dataclass(frozen=True)
class MemoryCheck:
    """What :func:`check_memory` decided: the VAE tiling to use, and why (``warnings``)."""

    tiled: bool | None  # the request's own setting, or True where tiling was turned on to fit
    estimate: MemoryEstimate
    available: int | None  # bytes the request may use on its device (None: unknown, not checked)
    warnings: tuple[str, ...] = ()


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{math.ceil(n / MiB)} MiB"


def _mib(n: float) -> str:
    return f"{n / MiB:.0f} MiB"


def resident_bytes(status: str | os.PathLike = "/proc/self/status") -> int | None:
    """This process's resident memory now (``VmRSS``); None where unknown."""
    try:
        for line in Path(status).read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def with_margin(needed: int) -> int:
    return int(needed * (1 + MARGIN)) + RESERVE


# ---------------------------------------------------------------------------------------------------
# What the machine can give


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None  # "max": no limit


def _stat_value(path: Path, keys: tuple[str, ...]) -> int:
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return 0
    values = dict(line.split()[:2] for line in lines if len(line.split()) >= 2)
    for key in keys:
        if key in values and values[key].isdigit():
            return int(values[key])
    return 0


def _ancestors(root: Path, group: str) -> Iterator[Path]:
    """``root/group`` and each folder above it up to ``root``: a limit set on any of them applies."""
    path = root / group.strip("/")
    while True:
        yield path
        if path == root or root not in path.parents:
            return
        path = path.parent


def _cgroup_headroom(proc_cgroup: Path, cgroup_root: Path) -> int | None:
    """The least room left under a memory limit of this process's cgroups (v2 ``memory.max``, v1
    ``memory.limit_in_bytes``), counting their inactive page cache as room (the kernel reclaims it before
    the OOM killer runs); None where no limit is set."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        return None
    room: list[int] = []
    for line in lines:
        hierarchy, controllers, group = (line.split(":", 2) + ["", ""])[:3]
        if hierarchy == "0" and controllers == "":  # cgroup v2
            files = ("memory.max", "memory.current", "memory.stat", ("inactive_file",))
            base = cgroup_root if (cgroup_root / "cgroup.controllers").exists() else cgroup_root / "unified"
        elif "memory" in controllers.split(","):  # cgroup v1
            files = (
                "memory.limit_in_bytes",
                "memory.usage_in_bytes",
                "memory.stat",
                ("total_inactive_file", "inactive_file"),
            )
            base = cgroup_root / "memory"
        else:
            continue
        limit_file, usage_file, stat_file, inactive_keys = files
        for folder in _ancestors(base, group):
            limit = _read_int(folder / limit_file)
            usage = _read_int(folder / usage_file)
            if limit is None or usage is None or limit >= 2**60:  # v1 writes "no limit" as ~2^63
                continue
            room.append(max(0, limit - usage + _stat_value(folder / stat_file, inactive_keys)))
    return min(room) if room else None


def available_bytes(
    meminfo: str | os.PathLike = "/proc/meminfo",
    proc_cgroup: str | os.PathLike = "/proc/self/cgroup",
    cgroup_root: str | os.PathLike = "/sys/fs/cgroup",
) -> int | None:
    """Bytes of host memory this process can still get without swapping or the OOM killer: Linux's
    ``MemAvailable`` (free memory plus reclaimable page cache), bounded by the room left under the
    process's cgroup memory limits. None where there is no ``/proc/meminfo`` (not Linux)."""
    available = _meminfo_available(Path(meminfo))
    room = _cgroup_headroom(Path(proc_cgroup), Path(cgroup_root))
    if available is None:
        return room
    return available if room is None else min(available, room)


class _MallInfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")
    ]  # fmt: skip


def heap_keeps_freed_memory() -> bool:
    """Whether this process's C heap keeps freed blocks (``sdstudio.host_memory.keep_freed_memory``:
    glibc's ``M_MMAP_MAX`` 0). Asked of glibc itself: a 64 MiB block, above the largest threshold at which
    glibc's default maps a block of its own (32 MiB), is allocated and freed untouched (no page of it
    becomes resident), and ``mallinfo2`` tells whether it was mapped apart. True where this cannot be
    told (not glibc, or before 2.33): the estimate then counts the heap's growth, the larger figure."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallinfo2, malloc, free = libc.mallinfo2, libc.malloc, libc.free
    except (OSError, AttributeError):
        return True
    mallinfo2.restype = _MallInfo2
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.restype, free.argtypes = None, [ctypes.c_void_p]
    before = mallinfo2().hblks
    block = malloc(64 * MiB)
    if not block:
        return True
    mapped = mallinfo2().hblks > before
    free(block)
    return not mapped


def device_available_bytes(device: torch.device) -> int:
    """A CUDA device's free memory plus what PyTorch's caching allocator holds there unused."""
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)


# ---------------------------------------------------------------------------------------------------
# The weights as the process holds them


def _file_mappings(maps: str | os.PathLike = "/proc/self/maps") -> list[tuple[int, int]]:
    """Sorted (start, end) address ranges of this process's mappings of regular files."""
    ranges = []
    try:
        text = Path(maps).read_text()
    except OSError:
        return []
    for line in text.splitlines():
        fields = line.split(maxsplit=5)
        if (
            len(fields) < 6
            or fields[4] == "0"
            or not fields[5].startswith("/")
            or fields[5].startswith("/dev/")
        ):
            continue
        start, end = fields[0].split("-")
        ranges.append((int(start, 16), int(end, 16)))
    return sorted(ranges)


def _tensors(module: nn.Module) -> dict[tuple[int, int], int]:
    """(data pointer, bytes) of each distinct parameter and buffer of the module (tied ones once)."""
    found = {}
    for t in (*module.parameters(), *module.buffers()):
        if not t.is_meta:
            found[(t.data_ptr(), t.numel() * t.element_size())] = t.numel() * t.element_size()
    return found


def weight_bytes(module: nn.Module, maps: str | os.PathLike = "/proc/self/maps") -> tuple[int, int]:
    """(all, mapped): bytes of the module's parameters and buffers, and of those that are views of a mapped
    file (a ``.safetensors`` loaded in its own dtype, read from the disk when first used)."""
    tensors = _tensors(module)
    total = sum(tensors.values())
    if next(iter(module.parameters())).device.type != "cpu":
        return total, 0
    ranges = _file_mappings(maps)
    starts = [start for start, _ in ranges]
    mapped = 0
    for ptr, nbytes in tensors:
        i = bisect.bisect_right(starts, ptr) - 1
        if i >= 0 and ptr + nbytes <= ranges[i][1]:
            mapped += nbytes
    return total, mapped


def _packed_layers(unet: nn.Module, channels_last: bool) -> Iterator[tuple[nn.Module, bool]]:
    """(layer, packed) for the UNet's packable layers: whether inference will run it on a packed weight."""
    for layer in unet.modules():
        if isinstance(layer, PackedLinear):
            probe = torch.empty((), dtype=layer.weight.dtype).expand(1, layer.in_features)
            yield layer, layer.weight.device.type == "cpu" and packable(probe, layer)
        elif isinstance(layer, PackedConv2d):
            # packed on channels-last inputs only; the first conv gets the sampler's NCHW latents
            probe = torch.empty((), dtype=layer.weight.dtype).expand(1, layer.in_channels, 1, 1)
            first = layer.in_channels == unet.config.in_channels
            yield (
                layer,
                channels_last and not first and layer.weight.device.type == "cpu" and packable(probe, layer),
            )


def packed_bytes(unet: nn.Module, channels_last: bool) -> tuple[int, int]:
    """(all, made): bytes of the packed weight copies the UNet's inference will use, and of those that
    exist already (they are kept between requests)."""
    total = made = 0
    for layer, packed in _packed_layers(unet, channels_last):
        if not packed:
            continue
        total += layer.weight.numel() * layer.weight.element_size()
        for name in layer._caches:
            cached = getattr(layer, name).weight
            for t in cached if isinstance(cached, tuple) else (cached,) if cached is not None else ():
                made += t.numel() * t.element_size()
    return total, min(made, total)


def _is_channels_last(module: nn.Module) -> bool:
    """Whether the module's 3x3 convolutions hold channels-last weights (``Pipeline.from_file``)."""
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d) and layer.weight.dim() == 4 and layer.weight.shape[-1] > 1:
            w = layer.weight
            return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()
    return False


# ---------------------------------------------------------------------------------------------------
# Activations, layer by layer


class _Tracker:
    """Live bytes and their high-water mark, as allocations and frees happen in the network's order."""

    def __init__(self) -> None:
        self.live = 0
        self.peak = 0

    def alloc(self, n: float) -> float:
        self.live += n
        self.peak = max(self.peak, self.live)
        return n

    def free(self, *sizes: float) -> None:
        self.live -= sum(sizes)

    def scratch(self, n: float) -> None:
        """A transient: held and freed within one operation."""
        self.alloc(n)
        self.free(n)


@dataclass(frozen=True)
class _Policy:
    """How the networks will run: device, dtype, memory format, attention."""

    device: str
    dtype: torch.dtype
    channels_last: bool  # the network's maps (and so the attention's q, k, v last dimension)
    threads: int
    kept_heap: bool = False  # the process's heap keeps freed blocks (``sdstudio.host_memory``)

    def heap(self, activations: int, growth: float) -> int:
        """What a pass's live ``activations`` grow the process by: as much where freed memory goes back to
        the system, ``growth`` times as much where the heap keeps it (see ``KEPT_HEAP_UNET``)."""
        return math.ceil(activations * growth) if self.kept_heap else activations

    @property
    def elem(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def attention(
        self, batch: int, heads: int, queries: int, keys: int, head_dim: int, contiguous: bool
    ) -> int:
        """Bytes the attention call holds beyond q, k, v and its output."""
        e = self.elem
        if self.device == "cpu":
            probe_q = torch.empty((), dtype=self.dtype).expand(1, heads, queries, head_dim)
            probe_k = torch.empty((), dtype=self.dtype).expand(1, heads, keys, head_dim)
            if prefer_sliced(probe_q, probe_k, probe_k):
                rows = max(16, min(queries, SLICE_BYTES // (keys * e)))
                # scaled q, transposed v, the transposed output's copy; one slice of scores and its softmax
                return batch * heads * (2 * queries + keys) * head_dim * e + 2 * rows * keys * e
        if not contiguous:  # PyTorch's math path: the whole score matrix
            return batch * heads * queries * keys * MATH_BYTES_PER_SCORE
        # fused kernel: log-sum-exp per query, and per thread a block of scores and one of outputs
        # (PyTorch's CPU flash attention: 256 queries x 512 keys in fp32)
        return batch * heads * queries * 4 + self.threads * (256 * 512 * 4 * 2 + 256 * head_dim * 4)

    def conv(self, t: _Tracker, n_in: float, n_out: float) -> float:
        """A convolution's output; oneDNN reorders an NCHW input (and in bf16/fp16 the output) into its
        blocked layout, channels-last maps in place (measured per call)."""
        out = t.alloc(n_out)
        if not self.channels_last:
            t.scratch(n_in + (n_out if self.dtype != torch.float32 else 0))
        return out

    def group_norm(self, t: _Tracker, n: float) -> None:
        """GroupNorm32's fp32 round trip in fp16 (bf16 and fp32 run natively)."""
        if self.dtype == torch.float16:
            t.scratch(n * 4)


def _resblock(t: _Tracker, p: _Policy, cin: float, cout: float, group_norm32: bool = True) -> float:
    """UNet ``ResBlock`` / VAE ``ResnetBlock`` over an input of ``cin`` bytes (held by the caller); its
    output's bytes (``cout``). norm -> SiLU -> conv, (+ emb), norm -> SiLU -> conv, + skip."""
    a = t.alloc(cin)  # norm
    if group_norm32:
        p.group_norm(t, cin)
    b = t.alloc(cin)  # SiLU
    t.free(a)
    c = p.conv(t, b, cout)
    t.free(b)
    d = t.alloc(cout)  # + emb (UNet); the VAE's norm2 input is held alike
    t.free(c)
    e = t.alloc(cout)
    f = t.alloc(cout)
    t.free(e)
    g = p.conv(t, f, cout)
    t.free(f, d)
    s = p.conv(t, cin, cout) if cin != cout else 0  # 1x1 conv skip
    out = t.alloc(cout)
    t.free(g, s)
    return out


def _unet_transformer(
    t: _Tracker,
    p: _Policy,
    u: UNetConfig,
    x: float,
    channels: int,
    tokens: int,
    batch: int,
    fused_ff: bool,
    depth: int = 1,
) -> float:
    """``SpatialTransformer`` over ``x`` bytes ([batch, channels, tokens] maps, held by the caller)."""
    heads, head_dim = u.heads_at(channels)
    inner = heads * head_dim
    unit = batch * tokens * p.elem  # bytes of one [batch, tokens, 1] slice
    ctx = batch * TEXT_TOKENS * inner * p.elem
    n = t.alloc(x)  # norm
    p.group_norm(t, x)
    h = p.conv(t, n, inner * unit) if not u.use_linear_in_transformer else t.alloc(inner * unit)  # proj_in
    t.free(n)
    for _ in range(depth):
        # attn1: norm1, q, k, v, attention, output, to_out
        n1, qkv = t.alloc(inner * unit), t.alloc(3 * inner * unit)
        t.scratch(p.attention(batch, heads, tokens, tokens, head_dim, contiguous=True))
        a = t.alloc(inner * unit)
        o = t.alloc(inner * unit)
        t.free(n1, qkv, a)
        x1 = t.alloc(inner * unit)
        t.free(o)
        # attn2 over the text: q and output at the map's size, k and v at the text's
        n2, q, kv = t.alloc(inner * unit), t.alloc(inner * unit), t.alloc(2 * ctx)
        t.scratch(p.attention(batch, heads, tokens, TEXT_TOKENS, head_dim, contiguous=True))
        a = t.alloc(inner * unit)
        o = t.alloc(inner * unit)
        t.free(n2, q, kv, a)
        x2 = t.alloc(inner * unit)
        t.free(o, x1)
        # GEGLU feed-forward: fused, gate and product of 4x the width; plain, the 8x projection too
        n3 = t.alloc(inner * unit)
        if fused_ff:
            gate = t.alloc(4 * inner * unit)
            prod = t.alloc(4 * inner * unit)
            t.free(gate)
        else:
            proj = t.alloc(8 * inner * unit)
            gelu = t.alloc(4 * inner * unit)
            prod = t.alloc(4 * inner * unit)
            t.free(proj, gelu)
        o = t.alloc(inner * unit)
        t.free(n3, prod)
        x3 = t.alloc(inner * unit)
        t.free(o, x2, h)
        h = x3
    back = t.alloc(inner * unit) if not p.channels_last else 0  # back to NCHW: a copy
    o = p.conv(t, inner * unit, x) if not u.use_linear_in_transformer else t.alloc(x)  # proj_out
    t.free(back, h)
    out = t.alloc(x)  # + residual
    t.free(o)
    return out


def unet_activations(u: UNetConfig, batch: int, height: int, width: int, p: _Policy, fused_ff: bool) -> int:
    """Peak bytes of one ``UNetModel.forward`` on [batch, in_channels, height, width] latents."""
    t = _Tracker()
    e = p.elem
    mc = u.model_channels
    h, w = height, width

    def size(channels: int) -> float:
        return batch * channels * h * w * e

    x = t.alloc(size(u.in_channels))  # the input in the network's dtype
    cur = p.conv(t, x, size(mc))  # conv_in
    skips = [(cur, mc)]
    ch = mc
    ds = 1
    levels = len(u.channel_mult)
    for level, mult in enumerate(u.channel_mult):
        for _ in range(u.num_res_blocks):
            out = _resblock(t, p, cur, size(mult * mc))
            ch = mult * mc
            if ds in u.attention_resolutions:
                res = out
                out = _unet_transformer(t, p, u, res, ch, h * w, batch, fused_ff, u.depth_at(level))
                t.free(res)
            cur = out
            skips.append((cur, ch))
        if level != levels - 1:
            before = size(ch)
            h, w = (h + 1) // 2, (w + 1) // 2
            cur = p.conv(t, before, size(ch))  # downsample
            skips.append((cur, ch))
            ds *= 2
    # middle block
    out = _resblock(t, p, cur, size(ch))
    res = out
    out = _unet_transformer(t, p, u, res, ch, h * w, batch, fused_ff, u.middle_depth)
    t.free(res)
    res = out
    cur = _resblock(t, p, res, size(ch))
    t.free(res)
    for level, mult in reversed(list(enumerate(u.channel_mult))):
        for i in range(u.num_res_blocks + 1):
            skip, skip_ch = skips.pop()
            cat = t.alloc(size(ch + skip_ch))
            t.free(cur, skip)
            out = _resblock(t, p, cat, size(mc * mult))  # the block's input is held until it returns
            ch = mc * mult
            if ds in u.attention_resolutions:
                res = out
                out = _unet_transformer(t, p, u, res, ch, h * w, batch, fused_ff, u.depth_at(level))
                t.free(res)
            if level and i == u.num_res_blocks:
                before = out
                h, w = h * 2, w * 2
                up = t.alloc(size(ch))  # nearest 2x
                out = p.conv(t, up, size(ch))
                t.free(before, up)
                ds //= 2
            t.free(cat)
            cur = out
    a = t.alloc(size(ch))  # out: norm, SiLU, conv
    b = t.alloc(size(ch))
    t.free(a)
    p.conv(t, b, size(u.out_channels))
    t.free(b)
    return math.ceil(t.peak)


def _vae_attention(t: _Tracker, p: _Policy, x: float, channels: int, tokens: int, batch: int) -> float:
    """The VAE mid block's single-head ``AttnBlock`` over ``x`` bytes (held by the caller)."""
    n = t.alloc(x)  # norm
    qkv = p.conv(t, n, x) + p.conv(t, n, x) + p.conv(t, n, x)
    t.scratch(p.attention(batch, 1, tokens, tokens, channels, contiguous=p.channels_last))
    a = t.alloc(x)
    t.free(n, qkv)
    o = p.conv(t, a, x)  # proj_out
    t.free(a)
    out = t.alloc(x)
    t.free(o)
    return out


def _vae_mid(t: _Tracker, p: _Policy, cur: float, channels: int, tokens: int, batch: int) -> float:
    a = _resblock(t, p, cur, cur, group_norm32=False)
    b = _vae_attention(t, p, a, channels, tokens, batch)
    t.free(a)
    c = _resblock(t, p, b, b, group_norm32=False)
    t.free(b)
    return c


def decoder_activations(v: VAEConfig, batch: int, height: int, width: int, p: _Policy) -> int:
    """Peak bytes of one untiled ``AutoencoderKL.decode`` of [batch, z, height, width] latents, with its
    float32 output (``vae_tiling.decode``); the fp32 latents it starts from are the caller's."""
    t = _Tracker()
    e = p.elem
    h, w = height, width

    def size(channels: int) -> float:
        return batch * channels * h * w * e

    z = t.alloc(size(v.z_channels) * 2)  # in the network's dtype; post_quant_conv
    ch = v.ch * v.ch_mult[-1]
    cur = p.conv(t, z / 2, size(ch))  # conv_in
    t.free(z)
    out = _vae_mid(t, p, cur, ch, h * w, batch)
    t.free(cur)
    cur = out
    for i in reversed(range(len(v.ch_mult))):
        level_input = cur  # held by ``Decoder.forward`` until the level returns
        for k in range(v.num_res_blocks + 1):
            out = _resblock(t, p, cur, size(v.ch * v.ch_mult[i]), group_norm32=False)
            t.free(cur if k else 0)
            cur = out
            ch = v.ch * v.ch_mult[i]
        if i != 0:
            h, w = h * 2, w * 2
            up = t.alloc(size(ch))  # nearest 2x
            out = p.conv(t, up, size(ch))
            t.free(up, cur)
            cur = out
        t.free(level_input)
    a = t.alloc(size(ch))  # norm_out, SiLU, conv_out
    b = t.alloc(size(ch))
    t.free(a)
    img = p.conv(t, b, size(v.out_ch))
    t.free(b, cur)
    if p.dtype != torch.float32:
        t.alloc(batch * v.out_ch * h * w * 4)  # .float()
        t.free(img)
    return math.ceil(t.peak)


def encoder_activations(v: VAEConfig, batch: int, height: int, width: int, p: _Policy) -> int:
    """Peak bytes of one untiled ``AutoencoderKL.encode`` of [batch, 3, height, width] images (pixels),
    with the image in the network's dtype; the float32 image it starts from is the caller's."""
    t = _Tracker()
    e = p.elem
    h, w = height, width

    def size(channels: int) -> float:
        return batch * channels * h * w * e

    x = t.alloc(size(v.in_channels))  # held until the encoder returns
    cur = p.conv(t, x, size(v.ch))  # conv_in
    ch = v.ch
    for i, mult in enumerate(v.ch_mult):
        level_input = cur  # held by ``Encoder.forward`` until the level returns
        for k in range(v.num_res_blocks):
            out = _resblock(t, p, cur, size(v.ch * mult), group_norm32=False)
            t.free(cur if k else 0)
            cur = out
            ch = v.ch * mult
        if i != len(v.ch_mult) - 1:
            pad = t.alloc(batch * ch * (h + 1) * (w + 1) * e)  # LDM's one-sided pad
            h, w = h // 2, w // 2
            out = p.conv(t, pad, size(ch))
            t.free(pad, cur if v.num_res_blocks else 0)
            cur = out
        t.free(level_input)
    out = _vae_mid(t, p, cur, ch, h * w, batch)
    t.free(cur)
    a = t.alloc(size(ch))  # norm_out, SiLU, conv_out, quant_conv
    b = t.alloc(size(ch))
    t.free(a)
    p.conv(t, b, size(2 * v.z_channels))
    t.alloc(size(2 * v.z_channels))
    t.free(b, out, x)
    return math.ceil(t.peak)


def _tile_extent(length: int, tiling: Tiling, context: int) -> int:
    """Latent pixels along one side of the largest tile run with its context."""
    return min(length, min(tiling.tile, length) + 2 * context)


def decode_bytes(v: VAEConfig, batch: int, lh: int, lw: int, p: _Policy, tiled: bool | None) -> int:
    """Peak of ``vae_tiling.decode`` of [batch, z, lh, lw] latents (tiled as ``tiled`` decides), with the
    float32 image it returns and the fp32 latents it starts from."""
    f = v.downsample
    pixels = batch * v.out_ch * lh * f * lw * f * 4
    latents = batch * v.z_channels * lh * lw * 4 * 2  # the latents, divided by the scale factor
    if not should_tile(lh, lw, tiled):
        return latents + p.heap(decoder_activations(v, batch, lh, lw, p), KEPT_HEAP_VAE)
    ctx, tiling = decoder_context(v), Tiling()
    th, tw = _tile_extent(lh, tiling, ctx), _tile_extent(lw, tiling, ctx)
    tile = p.heap(decoder_activations(v, batch, th, tw, p), KEPT_HEAP_VAE_TILED)
    weight = lh * f * lw * f * 4
    # out and weight accumulate; a tile's float copy, its blended core; at the end out / weight
    core = batch * v.out_ch * min(tiling.tile, lh) * f * min(tiling.tile, lw) * f * 4
    return latents + max(pixels + weight + tile + 2 * core, 2 * pixels + weight)


def encode_bytes(v: VAEConfig, batch: int, height: int, width: int, p: _Policy, tiled: bool | None) -> int:
    """Peak of ``vae_tiling.encode_mean`` of [batch, 3, height, width] float32 images, with them."""
    f = v.downsample
    image = batch * v.in_channels * height * width * 4
    lh, lw = height // f, width // f
    latent = batch * v.embed_dim * lh * lw * 4
    if not should_tile(lh, lw, tiled):
        return image + p.heap(encoder_activations(v, batch, height, width, p), KEPT_HEAP_VAE) + latent
    ctx, tiling = encoder_context(v), Tiling()
    th, tw = _tile_extent(lh, tiling, ctx), _tile_extent(lw, tiling, ctx)
    tile = p.heap(encoder_activations(v, batch, th * f, tw * f, p), KEPT_HEAP_VAE_TILED)
    return image + tile + 3 * latent + lh * lw * 4


def _with_fp32_retry(p: _Policy, vae_params: int, fn: Callable[[_Policy], int], output: int) -> int:
    """``decode_checked`` decodes again in float32 on a float32 copy of the VAE where fp16 overflows."""
    first = fn(p)
    if p.dtype != torch.float16:
        return first
    fp32 = dataclasses.replace(p, dtype=torch.float32, channels_last=False)
    return max(first, output + vae_params * 2 + fn(fp32))


def image_bytes(batch: int, height: int, width: int) -> int:
    """``to_pil`` of [batch, 3, height, width] float32: the tensor, two float temporaries of its size, then
    the 8-bit array and the PIL images (4 bytes a pixel for RGB)."""
    pixels = batch * height * width
    return pixels * 12 + max(pixels * 24, pixels * (3 + 4))


# ---------------------------------------------------------------------------------------------------
# The request


def guidance_rows(request: GenerationRequest, prompt: ParsedPrompt | None = None) -> int:
    """How many prompt rows go through the UNet in one batch at the worst step: every AND sub-prompt and
    the negative with CFG, one row without."""
    subprompts = len(prompt.subprompts) if prompt is not None else 1
    weights = [s.weight for s in prompt.subprompts] if prompt is not None else [1.0]
    if subprompts == 1 and request.cfg_scale == 1.0 and weights[0] == 1.0:
        return 1
    return subprompts + 1


@dataclass(frozen=True)
class _ModelFacts:
    """What the estimate needs to know of the loaded model, read once per check."""

    config: ModelConfig
    unet: _Policy
    vae: _Policy
    fused_ff: bool
    vae_params: int
    weights: int
    weights_mapped: int
    packed: int
    packed_made: int


def _policy(device: str, module: nn.Module, kept_heap: bool) -> _Policy:
    dtype = next(module.parameters()).dtype
    return _Policy(
        device, dtype, _is_channels_last(module), torch.get_num_threads(), kept_heap and device == "cpu"
    )


def _model_facts(model: LoadedModel, maps: str | os.PathLike, kept_heap: bool | None) -> _ModelFacts:
    sd = model.model
    device = "cuda" if model.device.type == "cuda" else "cpu"
    kept = heap_keeps_freed_memory() if kept_heap is None else kept_heap
    unet = _policy(device, sd.unet, kept)
    layers = list(_packed_layers(sd.unet, unet.channels_last))
    packed, packed_made = packed_bytes(sd.unet, unet.channels_last)
    weights, mapped = weight_bytes(sd, maps)
    return _ModelFacts(
        config=model.config,
        unet=unet,
        vae=_policy(device, sd.vae, kept),
        # GEGLU runs fused into the packed products (``Linear.gelu_gated``)
        fused_ff=any(
            is_packed and isinstance(layer, PackedLinear) and layer.fuse_gelu for layer, is_packed in layers
        ),
        vae_params=sum(p.numel() for p in sd.vae.parameters()),
        weights=weights,
        weights_mapped=mapped,
        packed=packed,
        packed_made=packed_made,
    )


def estimate(
    model: LoadedModel,
    plan: Plan,
    request: GenerationRequest,
    tiled: bool | None,
    *,
    rows: int | None = None,
    kept_heap: bool | None = None,
    maps: str | os.PathLike = "/proc/self/maps",
) -> MemoryEstimate:
    """The request's peak memory by part, for VAE tiling ``tiled`` (None: automatic, per pass).

    ``rows``: prompt rows per UNet batch (:func:`guidance_rows`; default: the prompt and the negative
    when CFG is on). ``kept_heap``: whether the process keeps freed memory in its heap (None: as
    :func:`heap_keeps_freed_memory` finds). ``maps``: the process's memory map, to tell mapped weights
    apart."""
    rows = rows if rows is not None else guidance_rows(request)
    return _estimate(_model_facts(model, maps, kept_heap), plan, request, tiled, rows)


def _estimate(
    m: _ModelFacts, plan: Plan, request: GenerationRequest, tiled: bool | None, rows: int
) -> MemoryEstimate:
    config = m.config
    vae = config.vae
    batch = len(plan.seeds)
    f = vae.downsample
    sizes = [(plan.width, plan.height)] + ([plan.hires_size] if plan.hires_size else [])
    # the UNet packs its weights for each new input shape, between its activations (see KEPT_HEAP_UNET)
    unet_growth = KEPT_HEAP_UNET if m.packed else KEPT_HEAP_UNET_UNPACKED
    unet_passes = {}
    for width, height in sizes:
        lh, lw = height // f, width // f
        latent = batch * config.unet.out_channels * lh * lw * 4
        sampler = (10 + 4 * rows) * latent  # the sampler's state, the CFG batch in and out, fp32
        activations = unet_activations(config.unet, rows * batch, lh, lw, m.unet, m.fused_ff)
        unet_passes[(width, height)] = sampler + m.unet.heap(activations, unet_growth)

    def decode(width: int, height: int) -> int:
        output = batch * vae.out_ch * width * height * 4
        return _with_fp32_retry(
            m.vae, m.vae_params, lambda p: decode_bytes(vae, batch, height // f, width // f, p, tiled), output
        )

    def encode(width: int, height: int, images: int) -> int:
        return encode_bytes(vae, images, height, width, m.vae, tiled)

    final_w, final_h = sizes[-1]
    vae_passes = {("decode", final_w, final_h): decode(final_w, final_h)}
    images = image_bytes(batch, final_h, final_w)
    if request.init is not None:  # the init image, and for inpainting models the masked one
        vae_passes[("encode", plan.width, plan.height)] = encode(plan.width, plan.height, 1)
    for width, height in sizes if config.is_inpainting else ():  # the grey image's latents
        vae_passes[("encode", width, height)] = encode(width, height, 1)
    if request.hires is not None and request.hires.upscaler not in LATENT_UPSCALERS:
        # decoded at the first size, resized as images, encoded at the second
        vae_passes[("decode", plan.width, plan.height)] = decode(plan.width, plan.height)
        vae_passes[("encode", final_w, final_h)] = encode(final_w, final_h, batch)
        images = max(images, image_bytes(batch, plan.height, plan.width) + batch * final_w * final_h * 4)
    # a heap that keeps freed memory grows by every pass (each asks for blocks of its own sizes)
    total = sum if m.unet.kept_heap else max
    return MemoryEstimate(
        device=m.unet.device,
        weights=m.weights,
        weights_mapped=m.weights_mapped,
        packed=m.packed,
        packed_made=m.packed_made,
        unet=total(unet_passes.values()),
        vae=total(vae_passes.values()),
        images=images,
        tiled=tiled,
        kept_heap=m.unet.kept_heap,
    )


def _fits(e: MemoryEstimate, available: int, host_available: int | None) -> bool:
    if with_margin(e.needed) > available:
        return False
    return host_available is None or e.host_needed == 0 or with_margin(e.host_needed) <= host_available


def _largest_fitting_size(
    m: _ModelFacts, plan: Plan, request: GenerationRequest, tiled: bool | None, rows: int,
    available: int, host_available: int | None,
) -> tuple[int, int] | None:  # fmt: skip
    """The largest size of the request's aspect (multiples of 8) that fits, by bisection on the scale;
    None where even the smallest does not."""

    def side(n: int, scale: float) -> int:
        return max(8, int(n * scale) // 8 * 8)

    def at(scale: float) -> Plan:
        hires = plan.hires_size
        if hires is not None:
            hires = (side(hires[0], scale), side(hires[1], scale))
        return dataclasses.replace(
            plan, width=side(plan.width, scale), height=side(plan.height, scale), hires_size=hires
        )

    def fits(p: Plan) -> bool:
        return _fits(_estimate(m, p, request, tiled, rows), available, host_available)

    low, high = 0.0, 1.0
    if not fits(at(low)):
        return None
    for _ in range(24):
        mid = (low + high) / 2
        low, high = (mid, high) if fits(at(mid)) else (low, mid)
    best = at(low)
    return (best.width, best.height) if (best.width, best.height) != (plan.width, plan.height) else None


def check_memory(
    model: LoadedModel,
    plan: Plan,
    request: GenerationRequest,
    *,
    rows: int | None = None,
    available: int | None = None,
    host_available: int | None = None,
    kept_heap: bool | None = None,
    maps: str | os.PathLike = "/proc/self/maps",
) -> MemoryCheck:
    """Whether the request fits in the memory this process can still get; raise ``SdStudioError`` if not.

    With automatic VAE tiling (``request.vae_tiling`` None) tiling is turned on, with a warning, where the
    untiled VAE would not fit and the tiled one does. An explicit ``off`` is kept and the error suggests
    ``--vae-tiling on``. ``available`` / ``host_available``: bytes free for this request on its device and,
    for CUDA, on the host (None: measured now). ``kept_heap``: as for :func:`estimate`. A request fits
    when its estimate, plus ``MARGIN`` and ``RESERVE``, does.
    """
    rows = rows if rows is not None else guidance_rows(request)
    m = _model_facts(model, maps, kept_heap)
    tiled = request.vae_tiling
    e = _estimate(m, plan, request, tiled, rows)
    if available is None:
        available = device_available_bytes(model.device) if e.device == "cuda" else available_bytes()
    if host_available is None and e.device == "cuda":
        host_available = available_bytes()
    resident = resident_bytes() if e.device == "cpu" else torch.cuda.memory_allocated(model.device)
    log.info(
        "memory: the request needs %s more (%s); the process holds %s, so it peaks at about %s; "
        "%s available, %s needed with the margin",
        _mib(e.needed), e.describe(), _mib(resident or 0), _mib((resident or 0) + e.needed),
        "unknown" if available is None else _mib(available), _mib(with_margin(e.needed)),
    )  # fmt: skip
    if available is None:  # not Linux: nothing to compare with
        return MemoryCheck(tiled, e, None)
    if _fits(e, available, host_available):
        return MemoryCheck(tiled, e, available)
    on = _estimate(m, plan, request, True, rows) if tiled is not True else e
    fits_tiled = tiled is not True and _fits(on, available, host_available)
    if fits_tiled and tiled is None:
        warning = (
            f"VAE tiling turned on: untiled, this request needs about {_gib(with_margin(e.needed))}, "
            f"{_gib(available)} available"
        )
        return MemoryCheck(True, on, available, (warning,))
    # Each tip is judged with the VAE tiled (automatic tiling turns it on where needed); where the request
    # turned tiling off and tiling would lower the need, tiling is the first tip.
    tips = ["--vae-tiling on"] if tiled is False and on.needed < e.needed else []
    size = _largest_fitting_size(m, plan, request, True, rows, available, host_available)
    if size is not None:
        tips.append(
            f"a smaller size (up to about {size[0]}x{size[1]}{' tiled' if tips and not fits_tiled else ''})"
        )
    if len(plan.seeds) > 1:
        one = dataclasses.replace(
            plan, seeds=plan.seeds[:1], subseeds=plan.subseeds[:1] if plan.subseeds else None
        )
        if _fits(_estimate(m, one, request, True, rows), available, host_available):
            tips.append("a smaller batch")
    if plan.hires_size is not None:
        no_hires = dataclasses.replace(plan, hires_size=None)
        if _fits(
            _estimate(m, no_hires, dataclasses.replace(request, hires=None), True, rows),
            available,
            host_available,
        ):
            tips.append("a smaller --hires-scale")
    if tips == ["--vae-tiling on"] and not fits_tiled:  # tiling lowers the need, but not enough
        tips = []
    if e.device == "cuda" and with_margin(e.needed) > available:
        needed, where = e.needed, f"{_gib(available)} free on {model.device}"
    elif e.device == "cuda":
        needed, where = e.host_needed, f"{_gib(host_available or 0)} of host memory available"
    else:
        needed, where = e.needed, f"{_gib(available)} available"
    advice = f"; try {' / '.join(tips)}" if tips else "; free some memory or use a machine with more"
    raise SdStudioError(f"this request needs about {_gib(with_margin(needed))}, {where}{advice}")
