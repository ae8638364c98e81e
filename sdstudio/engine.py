"""A loaded model with what generating needs: the Python API's entry point."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from sdstudio.adapters.activate import ModelNetworks
from sdstudio.adapters.library import NetworkLibrary
from sdstudio.control.apply import ResolvedControl
from sdstudio.cpu import cpu_flags
from sdstudio.diffusion.samplers import SamplerStep
from sdstudio.errors import SdStudioError
from sdstudio.models.cuda_graphs import CudaGraphRunner
from sdstudio.models.loading import DTYPES, LoadedModel, load_model
from sdstudio.models.tokenizer import ClipTokenizer
from sdstudio.pipelines.generate import check_refiner, check_refiner_fits, generate
from sdstudio.pipelines.validate import DEFAULT_LIMITS, Limits, check_request
from sdstudio.prompt.embeddings import EmbeddingDatabase, load_embeddings_for
from sdstudio.types import ControlSpec, GenerationRequest, GenerationResult
from sdstudio.upscale import Upscaler, find_upscaler, load_found, upscaler_library

CONTROLNET_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".pt")  # as the extension's models folder holds them

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
HYPERNETWORK_SUFFIXES = (".pt",)  # AUTOMATIC1111 lists models/hypernetworks/**/*.pt


def choose_dtype(precision: str, device: str = "cpu", flags: frozenset[str] | None = None) -> torch.dtype:
    """The compute dtype for ``precision``; ``auto`` picks what is fast on this machine.

    On CPUs, bf16 is only fast with native bf16 units (AVX-512 BF16 or AMX); without them PyTorch falls
    back to scalar code: on this project's AVX2-only EPYC, 50-130x slower than fp32
    (``benchmarks/precision.py``). On GPUs, fp16.
    """
    if precision not in PRECISIONS:
        raise SdStudioError(f"unknown precision {precision!r}; choose one of: {', '.join(PRECISIONS)}")
    if precision != "auto":
        return DTYPES[precision]
    if device.startswith("cuda"):
        return torch.float16
    flags = cpu_flags() if flags is None else flags
    return torch.bfloat16 if {"avx512_bf16", "amx_bf16"} & flags else torch.float32


def choose_device(device: str = "auto") -> str:
    """Where the model runs: ``auto`` takes the first CUDA GPU when PyTorch sees one, else the CPU."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return device
    kind, _, number = device.partition(":")
    if kind == "cuda" and (number.isdigit() or device == "cuda"):
        if not torch.cuda.is_available():
            build = f"CUDA {torch.version.cuda}" if torch.version.cuda else "a CPU-only build"
            raise SdStudioError(
                f"--device {device}: PyTorch sees no CUDA GPU here (torch {torch.__version__}, {build}); "
                "use --device cpu, or install a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if int(number or 0) >= torch.cuda.device_count():
            raise SdStudioError(
                f"--device {device}: no such GPU; this machine has {torch.cuda.device_count()} (cuda:0 ...)"
            )
        return device
    raise SdStudioError(f"unknown device {device!r}; choose auto, cpu, cuda or cuda:N")


def prefer_channels_last(dtype: torch.dtype, device: str = "cpu") -> bool:
    """Whether convolutions should run on NHWC (channels-last) weights and activations.

    On CPUs in bf16, oneDNN's convolutions are faster on NHWC: one sd15 CFG step at 512x512 takes 2.33 s
    instead of 2.71 s (``python benchmarks/levers.py --arch sd15 --latent 64``; the UNet's prepacked
    convolutions, ``sdstudio.models.prepacked``, run on NHWC inputs only). In fp32 NCHW is
    the faster one (channels-last is 5.6 % slower: ``--precision fp32 --latent 32``). On CUDA in fp16 /
    bf16, cuDNN's tensor-core convolutions want NHWC too: a sd15 512x512 image with CUDA graphs takes
    0.248 s instead of 0.300 s on an H200 (``python benchmarks/gpu.py``, sd15_levers).
    """
    if device.startswith("cuda"):
        return dtype in (torch.float16, torch.bfloat16)
    return device == "cpu" and dtype == torch.bfloat16


def unet_runner(unet: torch.nn.Module, *, compile: bool, cuda_graphs: bool) -> torch.nn.Module | None:
    """What sampling calls in place of ``unet``: compiled (inductor) and/or replayed from CUDA graphs;
    None for the UNet itself.

    Compiled with static shapes: each new shape (size, batch) compiles its own graph, as the CUDA graphs
    capture one per shape, instead of the second shape switching every later call to kernels generic in
    the batch and size (PyTorch's default); after 8 shapes dynamo runs the UNet uncompiled."""
    runner: torch.nn.Module | None = torch.compile(unet, dynamic=False) if compile else None  # type: ignore[assignment]
    if cuda_graphs:
        runner = CudaGraphRunner(runner if runner is not None else unet)
    return runner


class Pipeline:
    """``Pipeline.from_file(path)(GenerationRequest(prompt=...))`` -> ``GenerationResult``: txt2img, or
    img2img / inpainting / hires fix as the request's ``init`` / ``inpaint`` / ``hires`` ask, with the
    LoRAs and hypernetworks its prompt's tags and ``networks`` ask for.

    ``loras`` / ``hypernetworks``: the folders networks are found in by name (``--lora-dir``,
    ``--hypernetwork-dir``); ``strict_networks``: a network that cannot be found, read or fully used fails
    the request instead of giving a warning. LoRAs are merged into the weights for a request and replaced
    by the next request's (:class:`sdstudio.adapters.activate.ModelNetworks`); a request without any leaves
    the weights exactly as loaded.
    """

    def __init__(
        self,
        model: LoadedModel,
        embeddings: EmbeddingDatabase | None = None,
        tokenizer: ClipTokenizer | None = None,
        *,
        loras: NetworkLibrary | None = None,
        hypernetworks: NetworkLibrary | None = None,
        strict_networks: bool = False,
        refiner: LoadedModel | None = None,
        controlnets: NetworkLibrary | None = None,
        upscalers: NetworkLibrary | None = None,
    ) -> None:
        self.model = model
        self.refiner = refiner  # SDXL's refiner, for requests with refiner_switch_at
        self.controlnets = controlnets or NetworkLibrary(kind="ControlNet", flag="--controlnet-dir")
        # ControlNets loaded so far, by resolved path: this pipeline's own, kept while it lives
        self._loaded_controlnets: dict[Path, tuple[torch.nn.Module, str]] = {}
        # learned upscalers for the hires fix (--upscaler-dir), loaded on first use
        self.upscalers = upscalers or NetworkLibrary(kind="upscaler", flag="--upscaler-dir")
        self._loaded_upscalers: dict[Path, Upscaler] = {}
        self.tokenizer = tokenizer or ClipTokenizer()
        self.embeddings = embeddings
        self.networks = ModelNetworks(model, loras, hypernetworks, strict=strict_networks)

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike,
        *,
        dtype: torch.dtype = torch.float32,
        use_ema: bool = False,
        prediction: str | None = None,
        embeddings_dir: str | os.PathLike | None = None,
        skip_bad_embeddings: bool = False,
        device: str | torch.device = "cpu",
        compile: bool = False,
        cuda_graphs: bool | None = None,
        vae: str | os.PathLike | None = None,
        lora_dirs: Sequence[str | os.PathLike] = (),
        hypernetwork_dirs: Sequence[str | os.PathLike] = (),
        strict_networks: bool = False,
        refiner: str | os.PathLike | None = None,
        controlnet_dirs: Sequence[str | os.PathLike] = (),
        upscaler_dirs: Sequence[str | os.PathLike] = (),
    ) -> Pipeline:
        """Load a checkpoint onto ``device`` and, from ``embeddings_dir``, the textual inversion embeddings
        prompts may use; ``vae``: a VAE file to use instead of the checkpoint's (``--vae``); the network
        folders and ``strict_networks`` as in the class docstring (folders are checked before the load).

        ``compile``: run the UNet through ``torch.compile`` (inductor; the first image pays the compile).
        ``cuda_graphs`` (None: on for CUDA devices): replay the UNet from CUDA graphs, one capture per
        shape (:mod:`sdstudio.models.cuda_graphs`). A bad embedding file raises ``SdStudioError`` unless
        ``skip_bad_embeddings``; then it is left out and every result warns about it. ``refiner``: an SDXL
        refiner checkpoint loaded beside the model (``--refiner``), for requests with ``refiner_switch_at``.
        """
        device = choose_device(str(device))
        if cuda_graphs and not device.startswith("cuda"):
            raise SdStudioError(f"CUDA graphs need a CUDA device (got {device!r}); leave them off")
        loras = NetworkLibrary(lora_dirs, kind="LoRA", flag="--lora-dir")
        controlnets = NetworkLibrary(
            controlnet_dirs, kind="ControlNet", flag="--controlnet-dir", suffixes=CONTROLNET_SUFFIXES
        )
        upscalers = upscaler_library(upscaler_dirs)
        hypernets = NetworkLibrary(
            hypernetwork_dirs, kind="hypernetwork", flag="--hypernetwork-dir", suffixes=HYPERNETWORK_SUFFIXES
        )
        if vae is not None and not Path(vae).exists():
            raise SdStudioError(f"{vae}: no such VAE file or folder (--vae)")
        if refiner is not None and not Path(refiner).exists():
            raise SdStudioError(f"{refiner}: no such refiner checkpoint (--refiner)")
        model = load_model(path, dtype=dtype, use_ema=use_ema, prediction=prediction)
        refiner_model = None
        if refiner is not None:
            refiner_model = load_model(refiner, dtype=dtype)
            check_refiner_fits(model, refiner_model)
            if device != "cpu":
                refiner_model.model.to(device)
            if prefer_channels_last(dtype, device):
                refiner_model.model.unet.to(memory_format=torch.channels_last)
                refiner_model.model.vae.to(memory_format=torch.channels_last)
        if vae is not None:
            from sdstudio.models.vae_file import load_vae_into

            file = load_vae_into(model, vae)
            model = dataclasses.replace(model, vae_name=file.name, vae_hash=file.short_hash)
        if device != "cpu":
            model.model.to(device)
        if prefer_channels_last(dtype, device):
            model.model.unet.to(memory_format=torch.channels_last)
            model.model.vae.to(memory_format=torch.channels_last)
        graphs = cuda_graphs if cuda_graphs is not None else device.startswith("cuda")
        runner = unet_runner(model.model.unet, compile=compile, cuda_graphs=graphs)
        if runner is not None:
            model = dataclasses.replace(model, unet_runner=runner)
        tokenizer = ClipTokenizer()
        embeddings = None
        if embeddings_dir is not None:
            embeddings = load_embeddings_for(embeddings_dir, model.config, tokenizer, skip_bad=skip_bad_embeddings)
        return cls(
            model,
            embeddings,
            tokenizer,
            loras=loras,
            hypernetworks=hypernets,
            strict_networks=strict_networks,
            refiner=refiner_model,
            controlnets=controlnets,
            upscalers=upscalers,
        )

    def __call__(
        self,
        request: GenerationRequest,
        callback: Callable[[SamplerStep], None] | None = None,
        *,
        limits: Limits = DEFAULT_LIMITS,
    ) -> GenerationResult:
        """Generate; ``limits``: the caps a request is checked against (``--max-pixels`` and friends).

        The request is checked before its networks are merged, so that a refused request changes nothing."""
        upscaler = self.hires_upscaler(request)
        check_request(request, limits, () if upscaler is None else (request.hires.upscaler,))  # type: ignore[union-attr]
        check_refiner(self.model, self.refiner, request)
        controls = [self.controlnet(spec) for spec in request.controls]
        active = self.networks.activate(request)
        return generate(
            self.model, self.tokenizer, request, callback, self.embeddings, limits=limits, networks=active,
            refiner=self.refiner, controls=controls, upscaler=upscaler,
        )  # fmt: skip

    def hires_upscaler(self, request: GenerationRequest) -> Upscaler | None:
        """The learned upscaler the request's hires fix names (a file in ``--upscaler-dir``, a path or one of
        A1111's Real-ESRGAN names), loaded once per pipeline; None for the built-in ones (Latent, Lanczos...)."""
        from sdstudio.pipelines.hires import UPSCALERS

        hires = request.hires
        if hires is None or not isinstance(hires.upscaler, str) or hires.upscaler in UPSCALERS:
            return None
        ref = find_upscaler(hires.upscaler, self.upscalers)
        if ref.path is None:
            return None
        key = ref.path.resolve()
        if key not in self._loaded_upscalers:
            self._loaded_upscalers[key] = load_found(ref, self.model.device, self.model.dtype)
        return self._loaded_upscalers[key]

    def controlnet(self, spec: ControlSpec) -> ResolvedControl:
        """The unit's ControlNet, loaded once per pipeline onto the model's device and dtype: ``spec.model``
        names a file in the ControlNet folders, or is a path (file or diffusers folder)."""
        from sdstudio.models.controlnet import load_controlnet
        from sdstudio.models.loading import legacy_model_hash

        path = Path(spec.model)
        if not path.exists():
            path = self.controlnets.find(spec.model).path
        key = path.resolve()
        if key not in self._loaded_controlnets:
            network, _ = load_controlnet(path, base=self.model.config.unet, dtype=self.model.dtype)
            # the extension writes A1111's old model hash after a ControlNet's name
            digest = legacy_model_hash(path) if path.is_file() else ""
            self._loaded_controlnets[key] = (network.to(self.model.device).eval().requires_grad_(False), digest)
        network, digest = self._loaded_controlnets[key]
        return ResolvedControl(spec, network, path.stem if path.is_file() else path.name, digest)
