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


def test_the_llm_server_parts_an_in_process_call_reaches_still_exist():
    from ray.llm._internal.serve.engines.vllm.vllm_engine import VLLMEngine
    from ray.serve.llm import LLMServer

    assert "self._load_model =" in inspect.getsource(LLMServer._init_multiplex_loader)
    assert inspect.iscoroutinefunction(VLLMEngine.resolve_lora)
    assert "self._engine_client" in inspect.getsource(VLLMEngine)


def test_serve_status_is_read_from_the_controllers_details():
    from ray.serve.schema import ApplicationStatus, DeploymentStatus, ReplicaState

    details = {"target_capacity": None, "proxies": {"n1": {"status": "HEALTHY"}}, "applications": {"app": {
        "status": "RUNNING", "message": "", "last_deployed_time_s": 12.5, "deployments": {"LLM:m": {
            "status": "HEALTHY", "status_trigger": "CONFIG_UPDATE_COMPLETED", "message": "",
            "replicas": [{"state": "RUNNING"}, {"state": "RUNNING"}, {"state": "STARTING"}]}}}}}
    status = internals.status_from_details(details)
    app = status.applications["app"]
    assert app.status == ApplicationStatus.RUNNING and app.last_deployed_time_s == 12.5
    deployment = app.deployments["LLM:m"]
    assert deployment.status == DeploymentStatus.HEALTHY
    assert deployment.replica_states == {ReplicaState.RUNNING: 2, ReplicaState.STARTING: 1}
