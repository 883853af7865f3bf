"""Evaluation before promotion: held-out loss and perplexity, a task score on held-out answers (ROUGE-L
or exact match), base against adapter; and the train->serve parity check of prompt tokens."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

from ray_app.training.data import IGNORE, Conversation, collate, render_prompt


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F1 over whitespace tokens (lower-cased), via the longest common subsequence."""
    a, b = prediction.lower().split(), reference.lower().split()
    if not a or not b:
        return float(a == b)
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b, start=1):
            current.append(previous[j - 1] + 1 if x == y else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(a), lcs / len(b)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, reference: str) -> float:
    return float(" ".join(prediction.lower().split()) == " ".join(reference.lower().split()))


@dataclass
class EvalScores:
    loss: float
    perplexity: float
    task_score: float
    metric: str
    examples: int

    def as_metrics(self, prefix: str) -> dict[str, float]:
        return {f"{prefix}_{k}": v for k, v in asdict(self).items() if isinstance(v, (int, float))}


def heldout_loss(model, rows: list[dict], pad_id: int, batch_size: int = 8) -> float:
    import torch

    loss_sum = tokens = 0.0
    with torch.no_grad():
        for i in range(0, len(rows), batch_size):
            batch = collate(rows[i: i + batch_size], pad_id)
            n = int((batch["labels"][:, 1:] != IGNORE).sum())
            loss_sum += float(model(**batch).loss) * n
            tokens += n
    return loss_sum / tokens if tokens else float("nan")


def generate_answers(model, tokenizer, conversations: list[Conversation], max_new_tokens: int,
                     batch_size: int = 8) -> list[str]:
    """Greedy answers to each conversation's last learned turn, generated in left-padded batches (one
    forward pass per new token for the batch, not per example)."""
    import torch

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts = []
    for conversation in conversations:
        last = max(i for i in range(len(conversation.messages)) if conversation.learned(i))
        prompts.append(render_prompt(tokenizer, conversation.messages[:last], conversation.tools))
    answers = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start: start + batch_size]
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for i, prompt in enumerate(batch):
            ids[i, width - len(prompt):] = torch.tensor(prompt)
            mask[i, width - len(prompt):] = 1
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=pad_id)
        answers += [tokenizer.decode(row[width:], skip_special_tokens=True).strip() for row in out]
    return answers


def evaluate(model, tokenizer, rows: list[dict], conversations: list[Conversation], metric: str,
             max_examples: int, max_new_tokens: int) -> EvalScores:
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loss = heldout_loss(model, rows, pad_id)
    sample = conversations[:max_examples]
    references = [c.answer for c in sample]
    predictions = generate_answers(model, tokenizer, sample, max_new_tokens)
    score_fn = rouge_l if metric == "rouge_l" else exact_match
    score = sum(score_fn(p, r) for p, r in zip(predictions, references)) / max(len(sample), 1)
    return EvalScores(loss=round(loss, 5), perplexity=round(math.exp(min(loss, 50)), 4),
                      task_score=round(score, 4), metric=metric, examples=len(sample))


def base_against_adapter(base_path: str, artifact: str, tokenizer, rows: list[dict],
                         conversations: list[Conversation], metric: str, max_examples: int,
                         max_new_tokens: int) -> dict[str, float]:
    """The same held-out scores for the base model and the fine-tuned one, as ``base_*`` and
    ``adapter_*`` metrics. A PEFT adapter is loaded once over the base and switched off for the base's
    scores (one model in memory, one load)."""
    from peft import PeftModel

    from ray_app.training.model import load_adapted

    args = (tokenizer, rows, conversations, metric, max_examples, max_new_tokens)
    adapted = load_adapted(base_path, artifact)
    if isinstance(adapted, PeftModel):
        with adapted.disable_adapter():
            base = evaluate(adapted, *args)
    else:  # a full fine-tune: its own weights
        base = evaluate(load_adapted(base_path, None), *args)
    return base.as_metrics("base") | evaluate(adapted, *args).as_metrics("adapter")


# -- train -> serve parity ------------------------------------------------------------------------

ServingTokens = Callable[[list[dict]], Sequence[int]]


@dataclass
class ParityResult:
    passed: bool
    prompts: int
    mismatches: list[dict]

    def summary(self) -> str:
        if self.passed:
            return f"parity passed on {self.prompts} golden prompts"
        first = self.mismatches[0]
        return (f"parity FAILED on {len(self.mismatches)}/{self.prompts} golden prompts; first: {first['prompt']!r} "
                f"diverges at token {first['position']}")


def parity_check(training_tokenizer, serving_tokens: ServingTokens, prompts: list[str]) -> ParityResult:
    """Render each golden prompt as training does and as the serving path does; every token must match."""
    mismatches = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        trained = list(render_prompt(training_tokenizer, messages))
        served = list(serving_tokens(messages))
        if trained != served:
            position = next((i for i, (a, b) in enumerate(zip(trained, served)) if a != b), min(len(trained), len(served)))
            mismatches.append({"prompt": prompt, "position": position, "training": trained[:position + 3],
                               "serving": served[:position + 3]})
    return ParityResult(passed=not mismatches, prompts=len(prompts), mismatches=mismatches)


def tokenizer_tokens(serving_model_path: str, chat_template: str | None = None) -> ServingTokens:
    """The served base model's tokenizer and the chat template vLLM renders its chat requests with (its
    own, or the served model's ``tools.chat_template``)."""
    from ray_app.training.model import load_tokenizer

    tokenizer = load_tokenizer(serving_model_path, chat_template)
    return lambda messages: render_prompt(tokenizer, messages)


def endpoint_tokens(base_url: str, model: str, api_key: str = "unused") -> ServingTokens:
    """The live serving path: the prompt token ids the endpoint's engine reports (vLLM's
    ``return_token_ids``) for a one-token chat completion."""
    import httpx

    def tokens(messages: list[dict]) -> list[int]:
        response = httpx.post(f"{base_url.rstrip('/')}/chat/completions", timeout=120,
                              headers={"Authorization": f"Bearer {api_key}"},
                              json={"model": model, "messages": messages, "max_tokens": 1, "return_token_ids": True})
        response.raise_for_status()
        return response.json()["prompt_token_ids"]

    return tokens
