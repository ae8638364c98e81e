"""`sdstudio serve`'s flags -> ServerConfig."""

from __future__ import annotations

import pytest

from sdstudio.cli import build_parser, embedded_model_path
from sdstudio.errors import SdStudioError
from sdstudio.server.app import config_from_args


def test_serve_flags_make_the_config(tmp_path) -> None:
    models, hypernets = tmp_path / "models", tmp_path / "hn"
    models.mkdir()
    hypernets.mkdir()
    args = build_parser().parse_args([
        "serve", "--models-dir", str(models), "--model-cache-mb", "300", "--data-dir", str(tmp_path / "d"),
        "--cors-allow-origins", "http://a.test, http://b.test", "--hypernetwork-dir", str(hypernets),
    ])  # fmt: skip
    config, load = config_from_args(args, embedded_model_path())
    assert config.model == embedded_model_path() and config.models_dir == models
    assert config.cache_budget_bytes == 300 * 2**20
    assert config.cors_origins == ("http://a.test", "http://b.test")
    assert config.hypernetwork_dirs == (hypernets,)
    assert callable(load)
    plain, _ = config_from_args(
        build_parser().parse_args(["serve", "--data-dir", str(tmp_path)]), embedded_model_path()
    )
    assert plain.cors_origins == () and plain.models_dir is None and plain.cache_budget_bytes is None
    assert plain.ui and config.ui  # the web UI is on unless --no-ui
    api_only, _ = config_from_args(
        build_parser().parse_args(["serve", "--no-ui", "--data-dir", str(tmp_path)]), embedded_model_path()
    )
    assert not api_only.ui


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--models-dir", "/no/such/dir"], "/no/such/dir: folder does not exist"),
        (["--model-cache-mb", "0"], "--model-cache-mb must be positive"),
        (["--model", "/no/model.safetensors"], "/no/model.safetensors: no such file"),
    ],
)
def test_bad_serve_flags_are_refused(tmp_path, flags, message) -> None:
    args = build_parser().parse_args(["serve", "--data-dir", str(tmp_path), *flags])
    with pytest.raises(SdStudioError, match=message):
        config_from_args(args, embedded_model_path())
