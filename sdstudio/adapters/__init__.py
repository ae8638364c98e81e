"""Adapters applied to a loaded model as data: LoRA / LyCORIS networks merged into its weights.

Typical use::

    table = key_table(loaded.model)                      # once per model
    network = load_network("add_detail.safetensors", table)
    for warning in network.warnings: ...                 # what of the file was not used, and why
    patcher = WeightPatcher(loaded)                      # once per model, kept with it
    patcher.apply([NetworkUse(network, te=1.0, unet=0.8)])
    ...                                                  # generate
    patcher.restore()                                    # weights bit-identical to the loaded ones

or, for one block, ``with networks_applied(loaded, [(network, 1.0, 0.8)]): ...``.
``short_hash(network.path, network.metadata)`` is what AUTOMATIC1111 writes into ``Lora hashes``.

From requests: ``ModelNetworks(loaded, NetworkLibrary([lora_dir]))`` keeps one model's networks between
requests; ``.activate(request)`` merges what the request's tags and ``networks`` ask for (the engine's
``Pipeline`` does this). Hypernetworks: ``load_hypernetwork(path)``, ``prepare_hypernetworks(uses, device,
dtype)`` for the UNet's ``hypernetworks`` argument.
"""

from sdstudio.adapters.activate import ActiveNetworks, ModelNetworks
from sdstudio.adapters.deltas import LoHa, LoKr, LoRA
from sdstudio.adapters.hashes import network_hash, short_hash
from sdstudio.adapters.hypernetwork import (
    Hypernetwork,
    HypernetworkUse,
    load_hypernetwork,
    prepare_hypernetworks,
)
from sdstudio.adapters.keys import KeyTable, Target, key_table
from sdstudio.adapters.library import NetworkLibrary, NetworkNotFound
from sdstudio.adapters.network import ModuleDelta, Network, load_network, network_from_state_dict
from sdstudio.adapters.patch import NetworkUse, WeightPatcher, networks_applied

__all__ = [
    "ActiveNetworks",
    "Hypernetwork",
    "HypernetworkUse",
    "KeyTable",
    "LoHa",
    "LoKr",
    "LoRA",
    "ModelNetworks",
    "ModuleDelta",
    "Network",
    "NetworkLibrary",
    "NetworkNotFound",
    "NetworkUse",
    "Target",
    "WeightPatcher",
    "key_table",
    "load_hypernetwork",
    "load_network",
    "network_from_state_dict",
    "network_hash",
    "networks_applied",
    "prepare_hypernetworks",
    "short_hash",
]
