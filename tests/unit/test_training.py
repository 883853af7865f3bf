"""Training building blocks without Ray: data formats and label masking, metrics, the parity check,
the MLflow registry on sqlite (promote / refuse / roll back) and adapter resolution for serving."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from ray_app.serve.adapters import AdapterBaseMismatchError, AdapterCatalog, AdapterNotFoundError
from ray_app.serve.config import AdapterServeSettings
from ray_app.training.config import TrainConfig
from ray_app.training.data import (
    IGNORE,
    Conversation,
    DatasetError,
    pack,
    prepare,
    read_jsonl,
    render_prompt,
    tokenize_conversation,
)
from ray_app.training.evaluate import exact_match, parity_check, rouge_l
from ray_app.training.registry import AdapterRegistry, PromotionRefused, ensure_experiment

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    return AutoTokenizer.from_pretrained(data_dir.model("tiny-llama"))


def write_jsonl(path: Path, lines: list) -> Path:
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_both_formats_are_read_and_bad_lines_reported_with_their_numbers(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"instruction": "Translate", "input": "chat", "output": "cat"},
        "{not json",
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "wizard", "content": "x"}]},
        {"instruction": "", "output": "x"},
        {"prompt": "legacy", "completion": "format"},
        "",
    ])
    examples = read_jsonl(path)
    assert len(examples.conversations) == 2
    assert examples.conversations[1].messages == [{"role": "user", "content": "Translate\n\nchat"},
                                                  {"role": "assistant", "content": "cat"}]
    assert [(p.line, p.reason.split(":")[0]) for p in examples.problems] == [
        (3, "not JSON"), (4, "no assistant message to learn from"),
        (5, "messages[0].role must be one of ['assistant', 'developer', 'system', 'tool', 'user']"),
        (6, "`instruction` must be a non-empty string"), (7, "neither `messages` (chat format) nor `instruction`/`output` (instruction format)")]


def test_empty_or_all_invalid_data_fails_before_training(tmp_path, tokenizer):
    empty = write_jsonl(tmp_path / "empty.jsonl", [""])
    with pytest.raises(DatasetError, match="empty"):
        prepare(tokenizer, str(empty), None, 0.1, 128, False, 0)
    bad = write_jsonl(tmp_path / "bad.jsonl", ["{", {"foo": 1}])
    with pytest.raises(DatasetError, match=r"bad.jsonl:1: not JSON"):
        prepare(tokenizer, str(bad), None, 0.1, 128, False, 0)


def test_only_assistant_tokens_carry_labels(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"},
                {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "And Italy?"},
                {"role": "assistant", "content": "Rome."}]
    row = tokenize_conversation(tokenizer, Conversation(messages), max_seq_len=512)
    labelled = tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])
    assert "Paris." in labelled and "Rome." in labelled
    assert "France" not in labelled and "Be brief" not in labelled and "Italy" not in labelled
    # the prompt a served model sees is exactly the training prefix of the first answer
    prompt = render_prompt(tokenizer, messages[:2])
    assert row["input_ids"][: len(prompt)] == prompt and all(label == IGNORE for label in row["labels"][: len(prompt)])


@pytest.fixture(scope="module")
def tools_tokenizer(data_dir):
    from ray_app.training.model import load_tokenizer

    return load_tokenizer(str(data_dir.model("tiny-llama")), "smollm2-tools")


def labelled_text(tokenizer, row) -> str:
    return tokenizer.decode([t for t, label in zip(row["input_ids"], row["labels"]) if label != IGNORE])


def test_tool_calling_records_label_the_calls_and_answers_only(tools_tokenizer):
    examples = read_jsonl(ROOT / "configs/train/data/tools.jsonl")
    assert not examples.problems and len(examples.conversations) == 18
    round_trip = examples.conversations[0]
    assert [m["role"] for m in round_trip.messages] == ["system", "user", "assistant", "tool", "assistant"]
    # arguments arrive as JSON text (OpenAI's format) and are rendered as an object, as vLLM hands them
    assert round_trip.messages[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris", "unit": "celsius"}
    row = tokenize_conversation(tools_tokenizer, round_trip, max_seq_len=4096)
    full = tools_tokenizer.decode(row["input_ids"])
    labelled = labelled_text(tools_tokenizer, row)
    assert '<tools>' in full and '"name": "get_order_status"' in full  # the tools are in the prompt...
    assert "<tools>" not in labelled and "get_order_status" not in labelled  # ...and not learned
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>' in labelled
    assert "It is 10 degrees celsius and clear in Paris." in labelled
    assert "tool_response" not in labelled and '"sky": "clear"' not in labelled  # the tool's result is context
    assert "What's the weather" not in labelled
    # the prompt that precedes the call is what a served request with these tools renders
    prompt = render_prompt(tools_tokenizer, round_trip.messages[:2], round_trip.tools)
    assert row["input_ids"][: len(prompt)] == prompt
    parallel = next(c for c in examples.conversations if len(c.messages[-1].get("tool_calls") or []) == 2)
    assert labelled_text(tools_tokenizer, tokenize_conversation(tools_tokenizer, parallel, 4096)).count("<tool_call>") == 2
    assert "Lima" in parallel.answer and "get_weather" in parallel.answer


def test_a_weight_0_turn_is_context_and_bad_tool_records_are_reported(tmp_path, tools_tokenizer):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
    path = write_jsonl(tmp_path / "t.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "FIRST", "weight": 0},
                      {"role": "user", "content": "b"}, {"role": "assistant", "content": "SECOND"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [
            {"function": {"name": "f", "arguments": "{x"}}]}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {}}]}]},
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]},
                      {"role": "assistant", "content": "y"}]},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [call]}], "tools": "f"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "weight": 0}]},
    ])
    examples = read_jsonl(path)
    assert [(p.line, p.reason) for p in examples.problems] == [
        (2, "messages[1].tool_calls[0].function.arguments is not JSON"),
        (3, "messages[1].tool_calls[0]: needs function.name"),
        (4, "messages[0]: only text content parts can be trained on"),
        (5, '`tools` must be a list of {"type": "function", "function": {"name": ...}}'),
        (6, "no assistant message to learn from")]
    labelled = labelled_text(tools_tokenizer, tokenize_conversation(tools_tokenizer, examples.conversations[0], 512))
    assert "SECOND" in labelled and "FIRST" not in labelled


def test_uploads_are_checked_by_the_trainers_own_parser():
    from ray_app.fine_tuning.files import check_training_lines

    data = (ROOT / "configs/train/data/tools.jsonl").read_bytes()
    assert check_training_lines(data) == (18, [])
    bad = b'{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "[1]"}}]}]}\n'
    usable, problems = check_training_lines(data + bad)
    assert usable == 18 and [(p.line, p.problem) for p in problems] == [
        (19, "messages[1].tool_calls[0].function.arguments must be a JSON object")]


def test_packing_fills_blocks_and_split_holds_out(tmp_path, tokenizer):
    rows = [{"input_ids": list(range(n)), "labels": list(range(n))} for n in (5, 7, 9)]
    blocks = pack(rows, 8)
    assert [len(b["input_ids"]) for b in blocks] == [8, 8, 5]
    assert sum((b["input_ids"] for b in blocks), []) == list(range(5)) + list(range(7)) + list(range(9))
    data = prepare(tokenizer, str(ROOT / "configs/train/data/support.jsonl"), None, 0.15, 128, False, 0)
    assert len(data.validation) == 4 and len(data.train) == 20 and not data.problems
    assert len(data.sha256) == 64


def test_metrics():
    assert rouge_l("the cat sat on the mat", "the cat sat on the mat") == 1.0
    assert rouge_l("the cat", "a dog") == 0.0
    assert abs(rouge_l("the cat sat", "the cat sat on the mat") - 2 * 1 * 0.5 / 1.5) < 1e-9
    assert exact_match(" Paris ", "paris") == 1.0 and exact_match("Paris.", "Paris") == 0.0


def test_parity_check_catches_a_different_template(tokenizer, data_dir):
    same = parity_check(tokenizer, lambda m: render_prompt(tokenizer, m), ["What is Ray?"])
    assert same.passed
    other = AutoTokenizer.from_pretrained(data_dir.model("tiny-llama"))
    other.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"
    different = parity_check(tokenizer, lambda m: render_prompt(other, m), ["What is Ray?"])
    assert not different.passed and different.mismatches[0]["position"] == 0
    assert "FAILED" in different.summary()


def test_train_configs_validate():
    for path in sorted((ROOT / "configs/train").glob("*.yaml")):
        cls = TrainConfig
        if "distill" in path.name:
            from ray_app.training.config import DistillConfig as cls
        elif "tune" in path.name:
            from ray_app.training.config import TuneConfig as cls
        cls.load(path)
    with pytest.raises(Exception, match="qlora with deepspeed"):
        TrainConfig.load(ROOT / "configs/train/lora_tiny.yaml", {"method": "qlora", "deepspeed.stage": 2})


def test_training_workers_take_the_drivers_hub_setting(monkeypatch):
    from ray_app.cluster import worker_env_vars
    from ray_app.training.loop import worker_env

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = TrainConfig.load(ROOT / "configs/train/lora_tiny.yaml", {"deepspeed.stage": 2, "scaling.use_gpu": False})
    env = worker_env_vars(worker_env(config))
    assert (env["HF_HUB_OFFLINE"], env["TOKENIZERS_PARALLELISM"], env["DS_ACCELERATOR"]) == ("1", "false", "cpu")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # a driver allowed onto the hub lets its workers on too
    assert worker_env_vars(worker_env(TrainConfig.load(ROOT / "configs/train/lora_tiny.yaml"))) == {
        "HF_HUB_OFFLINE": "0", "TOKENIZERS_PARALLELISM": "false"}


@pytest.fixture
def registry(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    experiment = ensure_experiment(uri, "t", tmp_path / "artifacts")
    return AdapterRegistry(uri), experiment, tmp_path


def _version(registry, experiment, folder: Path, base="tiny-llama", parity="passed"):
    import mlflow

    adapter = folder / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": base}))
    client = mlflow.tracking.MlflowClient(registry.tracking_uri)
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(adapter), "adapter")
    client.set_terminated(run.info.run_id)
    return registry.register("support", run.info.run_id, f"{run.info.artifact_uri}/adapter",
                             {"base_serve_name": base, "parity": parity})


def test_registry_promote_refuse_and_rollback(registry):
    reg, experiment, tmp = registry
    v1 = _version(reg, experiment, tmp / "a")
    v2 = _version(reg, experiment, tmp / "b")
    bad = _version(reg, experiment, tmp / "c", parity="failed")
    assert (v1.version, v2.version, bad.version) == (1, 2, 3)
    reg.promote("support", 1)
    reg.promote("support", 2)
    assert reg.resolve("support").version == 2 and reg.resolve("support@champion").version == 2
    with pytest.raises(PromotionRefused, match="parity"):
        reg.promote("support", 3)
    assert reg.resolve("support").version == 2
    assert reg.rollback("support").version == 1 and reg.resolve("support").version == 1
    with pytest.raises(PromotionRefused, match="no earlier champion"):
        reg.rollback("support")
    reg.promote("support", 2, alias="challenger")
    assert reg.resolve("support@challenger").version == 2 and reg.resolve("support@1").version == 1
    downloaded = reg.download(reg.resolve("support"), tmp / "dl")
    assert (downloaded / "adapter_config.json").is_file()


def test_concurrent_promotions_keep_every_champion_in_the_history(registry):
    import threading

    reg, experiment, tmp = registry
    for i in range(5):
        _version(reg, experiment, tmp / f"v{i}")
    reg.promote("support", 1)
    # four writers promote at once; without the lock two read the same history and one write is lost
    threads = [threading.Thread(target=reg.promote, args=("support", v)) for v in (2, 3, 4, 5)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seen = [reg.resolve("support").version]
    while True:
        try:
            seen.append(reg.rollback("support").version)
        except PromotionRefused:
            break
    assert sorted(seen) == [1, 2, 3, 4, 5]  # every champion is reachable by rolling back


def test_adapter_catalog_resolves_pins_and_refuses(registry):
    reg, experiment, tmp = registry
    _version(reg, experiment, tmp / "a")
    other = _version(reg, experiment, tmp / "b", base="smollm2-135m-instruct")
    reg.promote("support", 1)
    settings = AdapterServeSettings(refresh_s=0, local={"mine": str(tmp / "a" / "adapter")})
    catalog = AdapterCatalog("tiny-llama", settings, reg.tracking_uri, tmp / "cache")
    assert catalog.resolve("support").model_id == "tiny-llama:support@1"
    assert catalog.resolve("mine").model_id == "tiny-llama:mine"
    with pytest.raises(AdapterNotFoundError):
        catalog.resolve("nope")
    with pytest.raises(AdapterBaseMismatchError, match="smollm2-135m-instruct"):
        catalog.resolve(f"support@{other.version}")
    assert catalog.model_ids() == ["tiny-llama:mine", "tiny-llama:support"]
    path = catalog.local_path("support@1")
    assert (path / "adapter_config.json").is_file() and catalog.local_path("support@1") == path
    # an alias move is seen once the cached lookup expires (refresh_s=0: at once)
    reg.promote("support", other.version, force=True)
    with pytest.raises(AdapterBaseMismatchError):
        catalog.resolve("support")


async def test_the_adapters_api_lists_promotes_and_rolls_back_for_admins_only(registry):
    import httpx
    from fastapi import FastAPI

    from ray_app.accounting.config import AuthConfig
    from ray_app.accounting.keys import KeyStore, Scopes
    from ray_app.accounting.limits import RateWindows
    from ray_app.serve.adapters_routes import adapters_router
    from ray_app.serve.auth import Auth, KeyAuth
    from ray_app.serve.errors import install_error_handlers

    reg, experiment, tmp = registry
    for folder, parity in (("a", "passed"), ("b", "passed"), ("c", "failed")):
        _version(reg, experiment, tmp / folder, parity=parity)
    keys = KeyStore(tmp / "ledger.sqlite")
    admin, reader = keys.create("admin", scopes=Scopes(admin=True)), keys.create("reader")
    app = FastAPI()
    install_error_handlers(app)
    app.include_router(adapters_router([lambda: reg]))
    app.add_middleware(KeyAuth, auth=Auth(AuthConfig(mode="keys"), keys, RateWindows(100, 10**6)))
    as_admin = {"authorization": f"Bearer {admin.secret}"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t",
                                 headers=as_admin) as http:
        as_reader = {"authorization": f"Bearer {reader.secret}"}
        denied = await http.post("/v1/adapters/support/promote", json={"version": 1}, headers=as_reader)
        assert denied.status_code == 403 and reg.versions("support")[0].aliases == ()
        assert (await http.get("/v1/adapters", headers={"authorization": "Bearer nope"})).status_code == 401
        (line,) = (await http.get("/v1/adapters", headers=as_reader)).json()["data"]
        assert line["name"] == "support" and line["champion"] is None and len(line["versions"]) == 3
        assert line["versions"][2]["tags"]["parity"] == "failed"
        promoted = (await http.post("/v1/adapters/support/promote", json={"version": 2})).json()
        assert promoted["champion"] == 2
        refused = await http.post("/v1/adapters/support/promote", json={"version": 3})
        assert refused.status_code == 409 and "parity" in refused.json()["error"]["message"]
        assert (await http.post("/v1/adapters/support/promote", json={"version": 3, "force": True})).json()["champion"] == 3
        assert (await http.post("/v1/adapters/support/rollback")).json()["champion"] == 2
        missing = await http.post("/v1/adapters/nope/rollback")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "adapter_not_found"
        assert (await http.post("/v1/adapters/support/promote", json={"version": 9})).status_code == 404
    assert reg.resolve("support").version == 2
