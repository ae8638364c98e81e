"""From a request to the networks it applies: tags and specs -> files -> loaded networks -> merged weights.

AUTOMATIC1111's rules (``extensions-builtin/Lora/extra_networks_lora.py``, ``modules/extra_networks.py``,
``extra_networks_hypernet.py``): a tag's arguments are split on ``:``; an argument ``key=value`` is named,
any other positional; the first positional is the name. LoRA (``<lora:...>``, and ``<lyco:...>`` for
files of the old LyCORIS extension): the text-encoder multiplier is the second positional or ``te=``
(default 1), the UNet's the third or ``unet=`` (default: the text encoder's). Hypernetwork
(``<hypernet:name:m>``): one multiplier, default 1. A tag naming no file is reported with the names that
exist; the request goes on without it unless networks are strict. Infotext: ``Lora hashes: "name: hash,
..."`` with the name as the tag wrote it (``:`` and ``,`` removed), A1111's hash (``hashes.short_hash``).

``ModelNetworks`` keeps, per loaded model, what stays between requests: the key table, the weight patcher
(the merged LoRAs, and the originals of the weights they changed) and the networks read so far, so that a
request with other LoRAs merges again without reading or reloading anything else.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdstudio.adapters.hashes import short_hash
from sdstudio.adapters.keys import KeyTable, key_table
from sdstudio.adapters.library import NetworkLibrary, header_metadata
from sdstudio.adapters.network import Network, load_network
from sdstudio.adapters.patch import NetworkUse, WeightPatcher
from sdstudio.errors import SdStudioError
from sdstudio.models.loading import LoadedModel
from sdstudio.prompt.parser import ExtraNetworkTag, extract_extra_networks
from sdstudio.types import GenerationRequest, NetworkSpec

if TYPE_CHECKING:
    from sdstudio.adapters.hypernetwork import HypernetworkUse

log = logging.getLogger(__name__)

__all__ = [
    "NETWORK_TAG_KINDS", "ActiveNetworks", "ModelNetworks", "check_replay", "file_hash", "infotext_names",
    "requested_networks", "spec_from_tag",
]  # fmt: skip

# tag kind -> NetworkSpec kind
NETWORK_TAG_KINDS = {"lora": "lora", "lyco": "lora", "hypernet": "hypernet"}
_KEEP_LOADED = 8  # networks kept read per model (an sd15 LoRA of rank 128 is 150 MB)


@dataclass(frozen=True)
class ActiveNetworks:
    """What one request applies: the LoRAs merged into the weights, the hypernetworks the UNet is to run,
    the infotext entries that record them, and what could not be used."""

    loras: tuple[NetworkUse, ...] = ()
    hypernetworks: tuple[HypernetworkUse, ...] = ()
    params: tuple[tuple[str, str], ...] = ()  # ("Lora hashes", "name: 0123456789ab"), in infotext order
    tags: str = ""  # tags for the request's ``networks`` (not in its prompt), for the infotext's prompt
    warnings: tuple[str, ...] = ()


def _multiplier(tag: ExtraNetworkTag, what: str, text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not math.isfinite(value):
        written = f"<{tag.kind}:{':'.join(tag.args)}>"
        raise SdStudioError(
            f"{written}: the {what} multiplier {text!r} is not a number (e.g. <{tag.kind}:name:0.8>)"
        )
    return value


def spec_from_tag(tag: ExtraNetworkTag) -> tuple[NetworkSpec | None, list[str]]:
    """The spec a LoRA / hypernetwork tag asks for (None for other kinds), and warnings about its arguments.

    Raises ``SdStudioError`` for a multiplier that is not a number or a tag without a name."""
    kind = NETWORK_TAG_KINDS.get(tag.kind)
    if kind is None:
        return None, []
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in tag.args:
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(item)
    written = f"<{tag.kind}:{':'.join(tag.args)}>"
    if not positional or not positional[0].strip():
        raise SdStudioError(f"{written}: no network name (write <{tag.kind}:NAME:MULTIPLIER>)")
    name = positional[0].strip()
    warnings: list[str] = []
    if kind == "hypernet":
        te = _multiplier(tag, "", positional[1]) if len(positional) > 1 else 1.0
        if len(positional) > 2 or named:
            warnings.append(f"{written}: a hypernetwork takes one multiplier; the rest is ignored")
        return NetworkSpec(name, te, kind="hypernet"), warnings
    te = _multiplier(tag, "text encoder", positional[1]) if len(positional) > 1 else 1.0
    te = _multiplier(tag, "text encoder", named.pop("te")) if "te" in named else te
    unet = _multiplier(tag, "UNet", positional[2]) if len(positional) > 2 else None
    unet = _multiplier(tag, "UNet", named.pop("unet")) if "unet" in named else unet
    extra = positional[3:] + [f"{k}={v}" for k, v in named.items()]
    if extra:  # A1111's dyn= (dynamic rank of DyLoRA files) and anything else
        warnings.append(f"{written}: {', '.join(extra)} not supported; ignored")
    return NetworkSpec(name, te, unet), warnings


def requested_networks(request: GenerationRequest) -> tuple[list[NetworkSpec], list[str]]:
    """The networks a request asks for: its prompt's and negative prompt's tags, then its ``networks``."""
    specs: list[NetworkSpec] = []
    warnings: list[str] = []
    for text in (request.prompt, request.negative_prompt):
        for tag in extract_extra_networks(text)[1]:
            spec, notes = spec_from_tag(tag)
            warnings += notes
            if spec is not None:
                specs.append(spec)
    return specs + list(request.networks), warnings


def _display_name(name: str) -> str:
    return name.replace(":", "").replace(",", "")


@dataclass(frozen=True)
class _Read:
    """A network file as read, with its identity on disk and its infotext hash."""

    stamp: tuple[int, int]  # (mtime_ns, size): re-read when the file changes
    network: Any  # Network or Hypernetwork
    hash: str


class ModelNetworks:
    """The networks of one loaded model: folders to find them in, the ones read, and the merged weights.

    Not thread-safe: one request at a time per model, as sampling on it is.
    """

    def __init__(
        self,
        loaded: LoadedModel,
        loras: NetworkLibrary | None = None,
        hypernetworks: NetworkLibrary | None = None,
        *,
        strict: bool = False,
    ) -> None:
        self.loaded = loaded
        self.loras = loras if loras is not None else NetworkLibrary(kind="LoRA", flag="--lora-dir")
        self.hypernetworks = hypernetworks if hypernetworks is not None else NetworkLibrary(
            kind="hypernetwork", flag="--hypernetwork-dir", suffixes=(".pt",)
        )  # fmt: skip
        self.strict = strict
        self.patcher = WeightPatcher(loaded)
        self._table: KeyTable | None = None
        self._read: OrderedDict[Path, _Read] = OrderedDict()

    @property
    def table(self) -> KeyTable:
        if self._table is None:
            self._table = key_table(self.loaded.model)
        return self._table

    def _path(self, spec: NetworkSpec) -> Path:
        if spec.path is not None:
            path = Path(spec.path)
            if not path.is_file():
                raise SdStudioError(
                    f"{path}: no such {'hypernetwork' if spec.kind == 'hypernet' else 'LoRA'} file"
                )
            return path
        library = self.hypernetworks if spec.kind == "hypernet" else self.loras
        return library.find(spec.name).path

    def _load(self, path: Path, kind: str) -> _Read:
        try:
            stat = path.stat()
        except OSError as e:
            raise SdStudioError(f"{path}: cannot read it ({e.strerror or e})") from None
        stamp = (stat.st_mtime_ns, stat.st_size)
        read = self._read.get(path)
        if read is not None and read.stamp == stamp:
            self._read.move_to_end(path)
            return read
        if kind == "hypernet":
            from sdstudio.adapters.hypernetwork import load_hypernetwork

            network: Any = load_hypernetwork(path)
            digest = file_hash(path, kind)
        else:
            network = load_network(path, self.table)
            digest = short_hash(path, network.metadata)
        read = self._read[path] = _Read(stamp, network, digest)
        while len(self._read) > _KEEP_LOADED:
            self._read.popitem(last=False)
        return read

    def activate(self, request: GenerationRequest, *, strict: bool | None = None) -> ActiveNetworks:
        """Merge the LoRAs ``request`` asks for into the weights (replacing those of the previous request;
        none: the loaded weights, bit for bit) and read its hypernetworks. ``strict`` (default: the
        object's): a network that cannot be found, read or fully used is an error, before any weight
        changes; otherwise a warning, and the request goes on without what could not be used."""
        strict = self.strict if strict is None else strict
        specs, warnings = requested_networks(request)
        loras: list[tuple[NetworkSpec, Network, str]] = []
        hypernets: list[tuple[NetworkSpec, Any, str]] = []
        for spec in specs:
            try:
                read = self._load(self._path(spec), spec.kind)
            except SdStudioError as e:
                if strict:
                    raise
                warnings.append(str(e))
                continue
            found = read.network.warnings
            if spec.kind == "hypernet":
                found = (*found, *self._width_warnings(read.network))
            if strict and found:
                raise SdStudioError(f"{found[0]} (--strict-networks)")
            warnings += found
            (hypernets if spec.kind == "hypernet" else loras).append((spec, read.network, read.hash))
        uses = tuple(NetworkUse(net, spec.te, spec.unet_multiplier) for spec, net, _ in loras)
        self.patcher.apply(uses)
        hyper_uses: tuple[HypernetworkUse, ...] = ()
        if hypernets:
            from sdstudio.adapters.hypernetwork import HypernetworkUse

            hyper_uses = tuple(HypernetworkUse(net, spec.te) for spec, net, _ in hypernets)
        params: list[tuple[str, str]] = []
        if loras:
            params.append(("Lora hashes", ", ".join(f"{_display_name(s.name)}: {h}" for s, _, h in loras)))
        if hypernets:
            params.append(("Hypernet", ", ".join(_display_name(s.name) for s, _, _ in hypernets)))
            params.append(("Hypernet hash", ", ".join(h for _, _, h in hypernets)))
            if any(s.te != 1 for s, _, _ in hypernets):
                params.append(("Hypernet strength", ", ".join(f"{s.te:g}" for s, _, _ in hypernets)))
        tags = " ".join(spec.tag() for spec in request.networks)
        return ActiveNetworks(uses, hyper_uses, tuple(params), tags, tuple(dict.fromkeys(warnings)))

    def _width_warnings(self, hypernetwork: Any) -> tuple[str, ...]:
        """A hypernetwork whose widths meet no attention layer of this model changes nothing: say so."""
        unet = self.loaded.config.unet
        attention = {unet.model_channels * m for level, m in enumerate(unet.channel_mult)
                     if 2**level in unet.attention_resolutions}  # fmt: skip
        widths = attention | {unet.context_dim}
        where = hypernetwork.path or hypernetwork.name
        ours = sorted(hypernetwork.widths)
        if not set(ours) & widths:
            problem = f"meet no attention layer of this model ({sorted(widths)})"
            effect = "It changes nothing"
        elif unet.context_dim not in ours:
            problem = f"have no pair for this model's text context width {unet.context_dim}"
            effect = "Only self-attention changes"
        else:
            return ()
        return (f"{where}: its widths {ours} {problem}: made for another architecture? {effect}",)

    def restore(self) -> None:
        """The loaded weights back, bit for bit."""
        self.patcher.restore()


def infotext_names(text: str) -> list[tuple[str, str]]:
    """``Lora hashes`` of an infotext (``"a: 0123456789ab, b: ..."``) -> ``[(name, hash), ...]``; a
    ``Hypernet`` list (``"a, b"``) -> ``[(name, ""), ...]``."""
    pairs = []
    for item in text.split(","):
        name, colon, digest = item.strip().rpartition(":")
        if not colon:
            name, digest = digest, ""
        if name.strip():
            pairs.append((name.strip(), digest.strip()))
    return pairs


def file_hash(path: Path, kind: str) -> str:
    """The hash the infotext records for a network file: A1111's LoRA hash (12 digits), or the
    hypernetwork's file sha256 (10 digits)."""
    if kind == "hypernet":
        from sdstudio.models.loading import file_sha256

        return file_sha256(path)[:10]
    return short_hash(path, header_metadata(path))


def check_replay(
    names: Sequence[tuple[str, str]], library: NetworkLibrary, kind: str, source: str
) -> list[str]:
    """For ``--from-png``: every network the PNG records must be found (``SdStudioError`` naming the first
    missing one and the names there are); a file whose hash differs gives a warning."""
    warnings = []
    for name, digest in names:
        try:
            file = library.find(name)
        except SdStudioError as e:
            raise SdStudioError(f"{source} was made with {library.kind} {name!r}: {e}") from None
        if digest and file_hash(file.path, kind) != digest:
            warnings.append(
                f"{source} was made with {library.kind} {name!r} of hash {digest}; {file.path} differs"
            )
    return warnings
