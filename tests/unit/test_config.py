"""The typed serving config: the shipped serve_config.yaml, validation, and translation to ray.serve.llm."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ray_app.serve.app import model_cards, resolve_sources
from ray_app.serve.config import AppConfig, ConfigError, LLMConfigModel, load_serve_config
from ray_app.serve.llm import LLMDeployment, to_llm_config

ROOT = Path(__file__).resolve().parents[2]


def shipped_args() -> dict:
    return yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]["args"]


def test_shipped_serve_config_validates_and_resolves(data_dir):
    [(name, config)] = load_serve_config(ROOT / "serve_config.yaml")
    assert name == "ray_app"
    assert [m.name for m in config.llms] == ["smollm2-135m-instruct"]
    assert [e.name for e in config.embedders] == ["all-minilm-l6-v2"]
    sources = resolve_sources(config)
    assert Path(sources["smollm2-135m-instruct"], "config.json").is_file()
    cards = model_cards(config, sources)
    assert cards["smollm2-135m-instruct"].max_model_len == 2048


def test_the_readme_serves_with_the_environment_tests_and_benchmarks_start_ray_with():
    from ray_app.serve import SERVING_ENV

    first = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].splitlines()[0]
    assert "serve run serve_config.yaml" in first
    assert dict(w.split("=", 1) for w in first.split("&&")[1].split() if "=" in w) == SERVING_ENV


def test_shipped_serve_config_points_at_the_builder():
    document = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    assert document["applications"][0]["import_path"] == "ray_app.serve.app:build_app"


def test_every_problem_is_reported_at_once():
    args = shipped_args()
    args["gateway"]["max_request_bytes"] = -1
    args["llms"][0]["engine_kwargs"]["dtype"] = "bfloat16"
    args["embedders"][0]["max_batch_size"] = 0
    args["embedders"][0]["surprise"] = True
    with pytest.raises(ConfigError) as exc:
        AppConfig.load(args)
    problems = exc.value.problems
    assert len(problems) == 4, problems
    text = str(exc.value)
    for fragment in ("gateway.max_request_bytes", "bfloat16", "max_batch_size", "surprise"):
        assert fragment in text


def test_model_names_must_be_unique_and_present():
    args = shipped_args()
    args["embedders"][0]["name"] = args["llms"][0]["name"]
    with pytest.raises(ConfigError, match="unique"):
        AppConfig.load(args)
    with pytest.raises(ConfigError, match="at least one model"):
        AppConfig.load({"llms": [], "embedders": []})
    with pytest.raises(ConfigError, match="no ':'"):
        AppConfig.load({"llms": [{"name": "base:adapter", "source": "x"}]})


def test_the_gateway_runs_in_a_served_llm_or_in_a_deployment_of_its_own():
    assert AppConfig.load(shipped_args()).gateway.host_llm == "smollm2-135m-instruct"
    args = shipped_args()
    args["gateway"]["host_llm"] = "gpt-7"
    with pytest.raises(ConfigError, match="gateway.host_llm 'gpt-7' is not one of the configured llms"):
        AppConfig.load(args)
    args["gateway"] |= {"host_llm": "smollm2-135m-instruct", "replicas": {"num_replicas": 2}}
    with pytest.raises(ConfigError, match="gateway.replicas does not apply with gateway.host_llm"):
        AppConfig.load(args)
    del args["gateway"]["host_llm"]
    assert AppConfig.load(args).gateway.replicas.num_replicas == 2


def test_replicas_fixed_or_autoscaled_not_both():
    with pytest.raises(ConfigError, match="not both"):
        AppConfig.load({"llms": [{"name": "m", "source": "x",
                                  "replicas": {"num_replicas": 2, "autoscaling_config": {"max_replicas": 3}}}]})
    config = AppConfig.load({"llms": [{"name": "m", "source": "x",
                                       "replicas": {"autoscaling_config": {"min_replicas": 1, "max_replicas": 3}}}]})
    options = config.llms[0].replicas.serve_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 3}


def test_sources_and_engine_arguments_are_checked_before_start(data_dir, tmp_path):
    args = shipped_args()
    args["data_dir"] = str(data_dir.root)
    args["gateway"]["host_llm"] = "a"
    args["llms"] = [
        {"name": "a", "source": "tiny-llama", "engine_kwargs": {
            "dtype": "float32", "max_modle_len": 5,
            "structured_outputs_config": {"disable_any_whitespace": True}}},  # needs backend xgrammar
        {"name": "b", "source": str(tmp_path / "missing")},
        {"name": "c", "source": "someorg/not-cached-model"},
        {"name": "d", "source": str(tmp_path)},  # exists but is no model folder
    ]
    config = AppConfig.load(args)
    with pytest.raises(ConfigError) as exc:
        resolve_sources(config)
    problems = "\n".join(exc.value.problems)
    assert len(exc.value.problems) == 5, problems
    assert "max_modle_len" in problems
    assert "structured_outputs_config" in problems
    assert "neither a prepared model" in problems
    assert "offline" in problems and "someorg/not-cached-model" in problems
    assert "no config.json" in problems


def test_unprepared_catalog_model_says_how_to_prepare_it(tmp_path):
    config = AppConfig.load({"data_dir": str(tmp_path), "llms": [{"name": "m", "source": "smollm2-135m-instruct"}]})
    with pytest.raises(ConfigError, match="ray-app models prepare smollm2-135m-instruct"):
        resolve_sources(config)


def test_cpu_llm_translates_to_ray_serve_llm_config():
    model = LLMConfigModel(name="m", source="x", engine_cpus=1, cpu_kv_cache_gib=3,
                           engine_kwargs={"dtype": "float32", "enforce_eager": True},
                           replicas={"num_replicas": 2, "max_ongoing_requests": 8})
    llm_config = to_llm_config(model, "/models/x")
    assert llm_config.model_id == "m"
    assert llm_config.model_loading_config.model_source == "/models/x"
    env = llm_config.runtime_env["env_vars"]
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"
    options = LLMDeployment.get_deployment_options(llm_config)
    # the replica actor asks for no CPU of its own, so one engine fits a 2-core machine beside the gateway
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 0.0}]
    assert options["num_replicas"] == 2 and options["max_ongoing_requests"] == 8


def test_gpu_llm_asks_for_a_gpu_and_keeps_cpu_env_out():
    model = LLMConfigModel(name="m", source="x", accelerator="gpu", accelerator_type="L4",
                           engine_kwargs={"dtype": "bfloat16", "tensor_parallel_size": 1})
    llm_config = to_llm_config(model, "org/model")
    assert "VLLM_TARGET_DEVICE" not in llm_config.runtime_env["env_vars"]
    assert llm_config.accelerator_type == "L4"
    bundles = LLMDeployment.get_deployment_options(llm_config)["placement_group_bundles"]
    assert bundles[0]["GPU"] == 1


def test_a_replica_keeps_off_the_cores_of_its_cpu_engine_and_only_then():
    from ray_app.serve.llm import cores_off_engine

    assert cores_off_engine({0, 1}, {0}) == {1}  # vLLM bound its worker to core 0
    assert cores_off_engine({0, 1, 2, 3}, {1, 2}) == {0, 3}
    assert cores_off_engine({0, 1}, set()) is None  # no CPU worker (a GPU engine): nothing moves
    assert cores_off_engine({0, 1}, {0, 1}) is None  # nothing would be left
    assert cores_off_engine({0, 1}, {4}) is None  # the worker is elsewhere already


THREADED_SLEEPER = "import threading, time; threading.Thread(target=time.sleep, args=(60,)).start(); time.sleep(60)"


def test_set_niceness_reaches_every_thread_and_reports_a_refusal():
    import os
    import subprocess
    import sys
    import time

    import psutil

    from ray_app.serve.llm import set_niceness

    # a process started at Ray's worker niceness, with a second thread (niceness is per thread on Linux)
    child = subprocess.Popen([sys.executable, "-c", THREADED_SLEEPER], preexec_fn=lambda: os.nice(15))
    try:
        proc = psutil.Process(child.pid)
        deadline = time.monotonic() + 30
        while proc.num_threads() < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        threads = [t.id for t in proc.threads()]
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {15}
        assert set_niceness([proc], 19)  # raising it is always allowed
        assert {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {19}
        lowered = set_niceness([proc], 0)
        if os.geteuid() == 0:  # lowering it needs CAP_SYS_NICE
            assert lowered and {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {0}
        else:
            assert not lowered and {os.getpriority(os.PRIO_PROCESS, t) for t in threads} == {19}
    finally:
        child.kill()
        child.wait()
    assert set_niceness([proc], 5)  # a process that is gone is skipped


def test_config_is_not_mutated_by_translation():
    model = LLMConfigModel(name="m", source="x", engine_kwargs={"dtype": "float32"})
    before = copy.deepcopy(model.model_dump())
    to_llm_config(model, "/x")
    assert model.model_dump() == before


@pytest.mark.parametrize("path", sorted((ROOT / "configs" / "serve").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_serve_config_validates(path):
    apps = load_serve_config(path)
    assert apps and all(config.llms or config.embedders for _, config in apps)


def test_the_router_config_is_checked_against_the_served_models(monkeypatch, tmp_path):
    from ray_app.serve.app import load_router_config

    monkeypatch.chdir(ROOT)  # the shipped config names configs/router.yaml relative to the repo
    config = AppConfig.load(shipped_args() | {"data_dir": str(tmp_path)})
    router = load_router_config(config)
    assert set(router.routes) >= {"auto", "private"}
    assert config.auth.ledger_file(config.paths) == tmp_path.resolve() / "router" / "ledger.sqlite"

    document = yaml.safe_load((ROOT / "configs" / "router.yaml").read_text())
    document["targets"][0]["model"] = "not-served"
    document["routes"]["all-minilm-l6-v2"] = {"targets": ["openai-mini"]}
    broken = AppConfig.load(shipped_args() | {"router": {"config": document}})
    with pytest.raises(ConfigError) as exc:
        load_router_config(broken)
    assert len(exc.value.problems) == 2
    assert "'not-served' is not one of the served llms" in str(exc.value)
    assert "route 'all-minilm-l6-v2' has the name of a served model" in str(exc.value)


def test_the_shipped_app_fits_a_two_cpu_laptop_and_leaves_room_for_jobs():
    """Every replica's logical-CPU reservation plus each engine's bundle must fit `serve run` on 2 CPUs
    (one more reservation left the Gateway pending forever with no error), and leave a share for the
    jobs that run beside the server (ingest, dataset builds, fine-tuning fit their requests into it)."""
    config = AppConfig.load(shipped_args())
    gateway = [] if config.gateway.host_llm else [config.gateway]  # hosted: it runs in the LLM's replicas
    deployments = [*gateway, *config.embedders, config.ocr, config.knowledge, config.router]
    replica_cpus = sum(d.replicas.num_cpus * (d.replicas.num_replicas or 1) for d in deployments if d is not None)
    engine_cpus = sum((m.engine_cpus + m.replicas.num_cpus) * (m.replicas.num_replicas or 1) for m in config.llms)
    assert replica_cpus + engine_cpus <= 2.0 - 0.5, (replica_cpus, engine_cpus)


def test_tool_calling_maps_onto_vllm_and_is_checked_before_start(data_dir, tmp_path):
    tools = {"parser": "hermes", "chat_template": "smollm2-tools"}
    model = LLMConfigModel(name="m", source="x", tools=tools)
    kwargs = to_llm_config(model, "/x").engine_kwargs
    assert kwargs["tool_call_parser"] == "hermes" and kwargs["enable_auto_tool_choice"] is True
    assert kwargs["tool_strict_level"] == "parameter"  # named and required calls match the tool schema
    assert "<tool_call>" in kwargs["chat_template"]  # the template's text: no file needed on the replica's node
    args = shipped_args() | {"data_dir": str(data_dir.root)}
    args["gateway"]["host_llm"] = "a"
    args["llms"] = [{"name": "a", "source": "tiny-llama", "tools": {"parser": "hermez"}},
                    {"name": "b", "source": "tiny-llama", "tools": {"chat_template": str(tmp_path / "none.jinja")}}]
    with pytest.raises(ConfigError) as exc:
        resolve_sources(AppConfig.load(args))
    assert len(exc.value.problems) == 2
    assert "llms.0.tools.parser 'hermez' is not one of vLLM's" in exc.value.problems[0]
    assert "llms.1.tools.chat_template" in exc.value.problems[1] and "smollm2-tools" in exc.value.problems[1]
    cards = model_cards(AppConfig.load(shipped_args() | {"data_dir": str(data_dir.root)}), resolve_sources(
        AppConfig.load(shipped_args() | {"data_dir": str(data_dir.root)})))
    assert cards["smollm2-135m-instruct"].tool_calling == "auto"


def test_a_local_target_offering_tools_needs_a_model_that_has_them(monkeypatch, tmp_path):
    from ray_app.serve.app import load_router_config

    monkeypatch.chdir(ROOT)
    args = shipped_args() | {"data_dir": str(tmp_path)}
    args["llms"] = [{k: v for k, v in args["llms"][0].items() if k != "tools"}]
    with pytest.raises(ConfigError, match="lists the `tools` capability but model 'smollm2-135m-instruct'"):
        load_router_config(AppConfig.load(args))


def test_the_smollm2_tools_template_is_smollm2s_own_without_tools_and_hermes_with_them(data_dir):
    from transformers import AutoTokenizer

    from ray_app.serve.config import ToolCallingSettings

    tokenizer = AutoTokenizer.from_pretrained(data_dir.model("smollm2-135m-instruct"))
    template = ToolCallingSettings(chat_template="smollm2-tools").template_file().read_text()
    chats = [[{"role": "user", "content": "hi"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
              {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "bye"}]]
    for chat in chats:
        assert (tokenizer.apply_chat_template(chat, chat_template=template, tokenize=False, add_generation_prompt=True)
                == tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
    tool = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
    calls = [{"role": "user", "content": "time?"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"id": "c1", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
             {"role": "tool", "tool_call_id": "c1", "content": "12:00"}]
    text = tokenizer.apply_chat_template(calls, tools=[tool], chat_template=template, tokenize=False,
                                         add_generation_prompt=True)
    assert '<tools>\n{"name": "get_time"' in text
    assert '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>' in text
    assert "<|im_start|>tool\n<tool_response>\n12:00\n</tool_response><|im_end|>" in text
