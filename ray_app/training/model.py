"""Loading the base model for a training method, and saving/restoring what training changes."""

from __future__ import annotations

from pathlib import Path

from ray_app.training.config import LoraSettings
from ray_app.training.data import DatasetError


def load_tokenizer(model_path: str, chat_template: str | None = None):
    """The model's tokenizer; with ``chat_template`` (a shipped name or a file) rendering with that one."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if chat_template is not None:
        from ray_app.templates import template_path

        tokenizer.chat_template = template_path(chat_template).read_text()
    if tokenizer.chat_template is None:
        raise DatasetError(f"{model_path}: the tokenizer has no chat template to render conversations with")
    return tokenizer


def load_for_training(model_path: str, method: str, lora: LoraSettings, device: str = "cpu"):
    """The model to train: base + PEFT adapter (lora, dora, qlora) or the full model (full)."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs: dict = {"dtype": torch.float32}
    if method == "qlora":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.float32)
        if device == "cpu":
            kwargs["device_map"] = {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(model_path, **kwargs)
    if method == "full":
        return model.to(device)
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    peft_config = LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        use_dora=method == "dora", task_type="CAUSAL_LM", bias="none")
    model = get_peft_model(model, peft_config)
    return model if method == "qlora" else model.to(device)


def trainable_state(model) -> dict:
    """What a checkpoint must hold: adapter weights for PEFT models, all weights otherwise."""
    from peft import PeftModel, get_peft_model_state_dict

    if isinstance(model, PeftModel):
        return get_peft_model_state_dict(model)
    return model.state_dict()


def load_trainable_state(model, state: dict) -> None:
    from peft import PeftModel, set_peft_model_state_dict

    if isinstance(model, PeftModel):
        set_peft_model_state_dict(model, state)
    else:
        model.load_state_dict(state)


def save_artifact(model, tokenizer, folder: Path) -> Path:
    """The deliverable: a PEFT adapter folder (adapter_config.json + safetensors) or a full model
    folder, with the tokenizer and chat template it was trained with."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def load_adapted(base_path: str, adapter_path: str | None):
    """Base model with an adapter applied (or the full fine-tuned model folder) for evaluation."""
    import torch
    from transformers import AutoModelForCausalLM

    if adapter_path is None:
        return AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    if (Path(adapter_path) / "adapter_config.json").is_file():
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
        return PeftModel.from_pretrained(base, adapter_path).eval()
    return AutoModelForCausalLM.from_pretrained(adapter_path, dtype=torch.float32).eval()
