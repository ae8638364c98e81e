"""``Lora hashes`` as AUTOMATIC1111 computes them: kohya's stored hash first, else the addnet hash of a
.safetensors file (the bytes after its header, so metadata edits keep it), else sha256 of the whole file."""

import hashlib

import torch
from safetensors.torch import save_file

from sdstudio.adapters.hashes import network_hash, short_hash


def test_hashes(tmp_path):
    tensors = {"lora_unet_x.lora_down.weight": torch.arange(6.0).reshape(2, 3)}
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    save_file(tensors, a, metadata={"ss_output_name": "a"})
    save_file(tensors, b, metadata={"ss_output_name": "a much longer name that changes the header"})
    data = a.read_bytes()
    header = int.from_bytes(data[:8], "little")
    expected = hashlib.sha256(data[8 + header :]).hexdigest()
    assert network_hash(a) == network_hash(b) == expected  # the header does not count
    assert short_hash(a) == expected[:12]
    assert network_hash(a, {"sshs_model_hash": "ABCDEF" + "0" * 58}) == "abcdef" + "0" * 58
    pt = tmp_path / "c.pt"
    torch.save(tensors, pt)
    assert network_hash(pt) == hashlib.sha256(pt.read_bytes()).hexdigest()
