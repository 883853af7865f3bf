"""Request features: task heuristics, token estimates and the privacy signals."""

from __future__ import annotations

import pytest

from ray_app.router.features import detect_tasks, estimate_tokens, extract_features


@pytest.mark.parametrize("text, tasks", [
    ("What's a good name for a cat?", set()),
    ("Fix this:\n```python\nprint(x\n```", {"code"}),
    ("def add(a, b):\n    return a + b\nwhy does this fail?", {"code"}),
    ("int main() {\n  return 0;\n}", {"code"}),
    ("Traceback (most recent call last):\n  File \"x.py\"", {"code"}),
    ("Solve the equation x^2 - 4 = 0", {"math"}),
    ("What is \\frac{1}{2} of 10?", {"math"}),
    ("what is 17 * 23", {"math"}),
    ("The meeting on 05/01/2024 costs $5 and $10.", set()),
    ("Please summarize the following report.", {"summarize"}),
    ("tl;dr of this thread please", {"summarize"}),
    ("Bonjour, pouvez-vous m'aider avec une question sur les impôts et les taxes?", {"multilingual"}),
    ("Wie funktioniert das und ist es nicht zu teuer für mich?", {"multilingual"}),
    ("東京で一番おいしいラーメン屋はどこですか？", {"multilingual"}),
    ("I visited Paris and the café was très bon.", set()),
])
def test_detect_tasks(text, tasks):
    assert detect_tasks(text) == frozenset(tasks)


def test_token_estimate_errs_high_for_non_latin_scripts():
    assert estimate_tokens("a" * 400) == pytest.approx(101)
    assert estimate_tokens("語" * 400) >= 400


def test_extract_features_from_a_chat_request():
    request = {
        "model": "auto",
        "messages": [
            {"role": "system", "content": "You are helpful."},
            {"role": "user", "content": [{"type": "text", "text": "Summarize this"},
                                         {"type": "image_url", "image_url": {"url": "http://x"}}]},
        ],
        "max_tokens": 64,
        "stream": True,
    }
    features = extract_features(request)
    assert features.route == "auto"
    assert features.max_tokens == 64 and features.stream
    assert features.tasks == frozenset({"summarize"})
    assert 8 < features.prompt_tokens < 30
    assert not features.local_only


def test_defaults_when_the_request_sets_little():
    features = extract_features({"messages": [{"role": "user", "content": "hi"}]}, default_max_tokens=256)
    assert features.route is None and features.max_tokens == 256 and not features.stream


@pytest.mark.parametrize("kwargs, request_text, reason", [
    ({"headers": {"X-Confidential": "true"}}, "hello", "header"),
    ({"confidential_key": True}, "hello", "key is confidential"),
    ({"retrieved_sensitivities": ["public", "confidential"]}, "hello", "confidential chunk"),
    ({}, "my IBAN is DE89 3704 0044 0532 0130 00", "PII (iban)"),
])
def test_privacy_signals(kwargs, request_text, reason):
    features = extract_features({"messages": [{"role": "user", "content": request_text}]}, **kwargs)
    assert features.local_only
    assert any(reason in r for r in features.privacy_reasons())
    assert "DE89" not in " ".join(features.privacy_reasons())


def test_pii_in_a_system_or_assistant_turn_counts_too():
    features = extract_features({"messages": [{"role": "system", "content": "Customer: jane@corp.example"},
                                              {"role": "user", "content": "draft a reply"}]})
    assert features.pii == frozenset({"email"})


def test_non_confidential_signals_do_not_force_local():
    features = extract_features({"messages": [{"role": "user", "content": "hello"}]},
                                headers={"x-confidential": "0"}, retrieved_sensitivities=["internal", "public"])
    assert not features.local_only
