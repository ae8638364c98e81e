"""LoRAs from prompts to weights: A1111's tag arguments, folders searched by name (stem and
``ss_output_name``), one ``ModelNetworks`` per model that merges a request's LoRAs and puts the loaded
weights back bit for bit, warnings or (strict) errors for what cannot be used, and the infotext's
``Lora hashes``."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from sdstudio.adapters import NetworkUse, WeightPatcher, key_table, network_from_state_dict, short_hash
from sdstudio.adapters.activate import ModelNetworks, infotext_names, requested_networks, spec_from_tag
from sdstudio.adapters.library import NetworkLibrary, NetworkNotFound
from sdstudio.errors import SdStudioError
from sdstudio.prompt.parser import ExtraNetworkTag, extract_extra_networks
from sdstudio.types import GenerationRequest, NetworkSpec
from tests.adapters.loras import loaded, lora_targets, random_kohya, tiny_model

pytest.importorskip("diffusers")  # lora_targets names the modules with diffusers' converters


def tag(text: str) -> ExtraNetworkTag:
    return extract_extra_networks(text)[1][0]


@pytest.mark.parametrize(
    ("text", "te", "unet"),
    [
        ("<lora:a>", 1.0, 1.0),
        ("<lora:a:0.5>", 0.5, 0.5),
        ("<lora:a:0.5:0.8>", 0.5, 0.8),
        ("<lora:a:te=0.3:unet=0.9>", 0.3, 0.9),
        ("<lora:a:0.5:unet=0>", 0.5, 0.0),
        ("<lora:a:0.2:0.4:te=0.7>", 0.7, 0.4),  # named beats positional, as in A1111
        ("<lyco:a:0.7>", 0.7, 0.7),
        ("<lora: a :-1>", -1.0, -1.0),
    ],
)
def test_tag_multipliers_follow_a1111(text, te, unet):
    spec, warnings = spec_from_tag(tag(text))
    assert spec is not None and (spec.name, spec.te, spec.unet_multiplier, spec.kind) == (
        "a",
        te,
        unet,
        "lora",
    )
    assert warnings == []


def test_hypernet_and_other_tags():
    spec, _ = spec_from_tag(tag("<hypernet:h:0.6>"))
    assert spec == NetworkSpec("h", 0.6, kind="hypernet")
    assert spec_from_tag(tag("<hypernet:h>"))[0] == NetworkSpec("h", 1.0, kind="hypernet")
    assert spec_from_tag(tag("<foo:bar>")) == (None, [])
    _, warnings = spec_from_tag(tag("<lora:a:1:1:dyn=16>"))
    assert warnings == ["<lora:a:1:1:dyn=16>: dyn=16 not supported; ignored"]
    with pytest.raises(
        SdStudioError, match=r"<lora:a:lots>: the text encoder multiplier 'lots' is not a number"
    ):
        spec_from_tag(tag("<lora:a:lots>"))
    with pytest.raises(SdStudioError, match="UNet multiplier 'nan'"):
        spec_from_tag(tag("<lora:a:1:nan>"))
    with pytest.raises(SdStudioError, match="no network name"):
        spec_from_tag(tag("<lora: :1>"))


def test_requested_networks_reads_both_prompts_then_the_request_field():
    extra = NetworkSpec("c", 0.5, 0.25)
    request = GenerationRequest("x <lora:a:0.5>, <hypernet:h:0.3>", "<lora:b:-1>", networks=(extra,))
    specs, _ = requested_networks(request)
    assert [(s.kind, s.name, s.te) for s in specs] == [("lora", "a", 0.5), ("hypernet", "h", 0.3),
                                                       ("lora", "b", -1.0), ("lora", "c", 0.5)]  # fmt: skip
    assert extra.tag() == "<lora:c:0.5:0.25>" and NetworkSpec("d", path="/x/e.pt").tag() == "<lora:e:1>"


def test_infotext_names():
    assert infotext_names("a: 0123456789ab, my lora: ffffffffffff") == [
        ("a", "0123456789ab"), ("my lora", "ffffffffffff")
    ]  # fmt: skip
    assert infotext_names("h1, h2") == [("h1", ""), ("h2", "")]


# --- folders -------------------------------------------------------------------------------------------


def write(path: Path, metadata: dict[str, str] | None = None, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    save_file({"x.lora_down.weight": torch.randn(2, 3, generator=gen)}, str(path), metadata=metadata)
    return path


def test_library_finds_stems_and_aliases_in_subfolders(tmp_path):
    a = write(tmp_path / "one" / "detail_v2.safetensors", {"ss_output_name": "add_detail"})
    b = write(tmp_path / "one" / "deep" / "style.safetensors", {"ss_output_name": "style"})
    c = write(tmp_path / "two" / "add_detail.safetensors")  # its stem wins over a's alias
    (tmp_path / "one" / "notes.txt").write_text("not a network")
    library = NetworkLibrary([tmp_path / "one", tmp_path / "two"])
    assert library.names == ["add_detail", "detail_v2", "style"]
    assert library.find("detail_v2").path == a and library.find("style").path == b
    assert library.find("add_detail").path == c

    with pytest.raises(NetworkNotFound) as missing:
        library.find("detial")
    message = str(missing.value)
    assert message.startswith("LoRA 'detial' not found in ")
    assert message.index("detail_v2") < message.index("style")  # closest first
    late = write(tmp_path / "two" / "late.safetensors")
    assert library.find("late").path == late  # a miss scans again

    write(tmp_path / "three" / "style.safetensors")
    twice = NetworkLibrary([tmp_path / "one", tmp_path / "three"])
    with pytest.raises(NetworkNotFound, match="'style' is ambiguous"):
        twice.find("style")
    with pytest.raises(NetworkNotFound, match=r"no LoRA folder given \(--lora-dir DIR\)"):
        NetworkLibrary().find("style")
    with pytest.raises(SdStudioError, match="does not exist or is not a folder"):
        NetworkLibrary([tmp_path / "nope"])


# --- a model's networks --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model():
    return tiny_model("tiny", seed=5)


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory, model):
    folder = tmp_path_factory.mktemp("loras")
    targets = lora_targets(model.config, {k: v.clone() for k, v in model.state_dict().items()})
    save_file(
        random_kohya(targets, seed=1), str(folder / "one.safetensors"), metadata={"ss_output_name": "first"}
    )
    save_file(random_kohya(targets, seed=2, rank=2), str(folder / "sub_two.safetensors"))
    nan = random_kohya(targets, seed=3)
    nan[next(iter(nan))][0] = float("nan")
    save_file(nan, str(folder / "broken.safetensors"))
    # the same module names at twice the widths: a LoRA made for a wider model of the family
    wider = {name: (key, (2 * shape[0], 2 * shape[1], *shape[2:])) for name, (key, shape) in targets.items()}
    save_file(random_kohya(wider, seed=4), str(folder / "for_wider.safetensors"),
              metadata={"ss_base_model_version": "sd_v2"})  # fmt: skip
    return folder


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(model, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def networks_for(model, lora_dir, **kw) -> ModelNetworks:
    return ModelNetworks(loaded(model), NetworkLibrary([lora_dir]), **kw)


def test_request_with_loras_then_without_leaves_weights_bit_identical(model, lora_dir):
    before = snapshot(model)
    networks = networks_for(model, lora_dir)
    active = networks.activate(GenerationRequest("a cat <lora:one:0.8> <lora:sub_two:0.5:1.5>"))
    assert active.warnings == () and len(active.loras) == 2
    assert not same(model, before)

    # the merged weights are the two networks' deltas, each with its own multipliers
    table = key_table(model)
    reference = tiny_model("tiny", seed=5)
    uses = [
        NetworkUse(
            network_from_state_dict(dict(load(lora_dir / "one.safetensors")), table, name="one"), 0.8, 0.8
        ),
        NetworkUse(
            network_from_state_dict(dict(load(lora_dir / "sub_two.safetensors")), table, name="t"), 0.5, 1.5
        ),
    ]
    WeightPatcher(reference).apply(uses)
    assert same(model, snapshot(reference))

    active = networks.activate(GenerationRequest("a cat"))
    assert active.loras == () and active.params == ()
    assert same(model, before)  # bit for bit


def load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_zero_multipliers_change_nothing_and_networks_are_read_once(model, lora_dir, monkeypatch):
    before = snapshot(model)
    networks = networks_for(model, lora_dir)
    active = networks.activate(GenerationRequest("<lora:first:0>"))  # by its ss_output_name
    assert len(active.loras) == 1 and same(model, before)
    assert networks.patcher.patched_keys == frozenset()

    from sdstudio.adapters import activate

    reads = []
    real = activate.load_network
    monkeypatch.setattr(activate, "load_network", lambda *a, **k: reads.append(a[0]) or real(*a, **k))
    networks.activate(GenerationRequest("<lora:first:1>"))
    networks.activate(GenerationRequest("<lora:sub_two:1>"))
    networks.activate(GenerationRequest("<lora:first:0.5>"))
    assert [p.name for p in reads] == ["sub_two.safetensors"]  # "one" was read by the first request
    path = lora_dir / "sub_two.safetensors"
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    networks.activate(GenerationRequest("<lora:sub_two:1>"))
    assert [p.name for p in reads] == ["sub_two.safetensors"] * 2  # a changed file is read again
    networks.restore()
    assert same(model, before)


def test_infotext_hashes_and_request_networks(model, lora_dir):
    networks = networks_for(model, lora_dir)
    path = lora_dir / "one.safetensors"
    active = networks.activate(
        GenerationRequest("<lora:first:1>", networks=(NetworkSpec("x", 0.5, path=str(path)),))
    )
    digest = short_hash(path, load_metadata(path))
    assert len(digest) == 12
    assert active.params == (("Lora hashes", f"first: {digest}, x: {digest}"),)
    assert active.tags == "<lora:one:0.5>"
    networks.restore()


def load_metadata(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.metadata() or {}


def test_bad_networks_warn_or_fail_when_strict(model, lora_dir):
    before = snapshot(model)
    networks = networks_for(model, lora_dir)
    active = networks.activate(GenerationRequest("<lora:one:1> <lora:onne:1> <lora:broken:1>"))
    assert len(active.loras) == 1  # the request goes on with what could be used
    missing, broken = active.warnings
    assert missing.startswith("LoRA 'onne' not found in ") and "closest names: one," in missing
    assert "broken.safetensors" in broken and "NaN" in broken
    assert [name for name, _ in infotext_names(dict(active.params)["Lora hashes"])] == ["one"]

    networks.activate(GenerationRequest("<lora:one:1>"))
    merged = snapshot(model)
    for prompt, message in (("<lora:onne:1>", "'onne' not found"), ("<lora:broken:1>", "NaN")):
        with pytest.raises(SdStudioError, match=message):
            networks.activate(GenerationRequest(f"<lora:sub_two:1> {prompt}"), strict=True)
        assert same(model, merged)  # nothing changed before the error
    networks.restore()
    assert same(model, before)


def test_a_lora_for_another_architecture_is_named(model, lora_dir):
    before = snapshot(model)
    networks = networks_for(model, lora_dir)
    active = networks.activate(GenerationRequest("<lora:for_wider:1>"))
    assert len(active.warnings) == 1 and "for_wider.safetensors" in active.warnings[0]
    assert "made for another architecture?; the file says ss_base_model_version=sd_v2" in active.warnings[0]
    assert same(model, before)
    with pytest.raises(SdStudioError, match=r"for_wider\.safetensors.*--strict-networks"):
        networks_for(model, lora_dir, strict=True).activate(GenerationRequest("<lora:for_wider:1>"))
