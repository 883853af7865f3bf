"""Every private Ray / vLLM name ray_app uses lives in ``ray_app.serve.internals``; an upgrade that moves,
renames or reshapes one fails here, by name, instead of inside a replica."""

from __future__ import annotations

import inspect

from ray_app.serve import internals


def test_every_internal_name_still_exists_with_the_shape_we_use():
    for name in internals.__all__:
        assert getattr(internals, name) is not None, name
    assert list(inspect.signature(internals.sanitize_chat_request).parameters) == ["request"]
    assert len(inspect.signature(internals.normalize_engine_kwargs).parameters) == 1
    assert hasattr(internals.LoraModelLoader, "load_model")
    assert {"model_id", "local_path"} <= set(internals.DiskMultiplexConfig.model_fields)
    assert "error" in internals.EngineErrorResponse.model_fields
    assert callable(internals.global_id_manager.next)


def test_the_engine_kwargs_normalisation_refuses_a_bad_nested_config():
    import pytest

    assert internals.normalize_engine_kwargs({"dtype": "float32"})["dtype"] == "float32"
    with pytest.raises(ValueError):
        internals.normalize_engine_kwargs({"structured_outputs_config": {"disable_any_whitespace": True}})
