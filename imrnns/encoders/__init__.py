"""Frozen base encoders and the content-keyed embedding cache.

- :class:`Encoder`: a sentence-transformers model from a local folder (or a loaded
  ``SentenceTransformer``), encoding exactly as sentence-transformers does.
- :class:`FunctionEncoder`: any callable from a list of texts to an ``(N, n)`` array.
- :func:`resolve_encoder`: whichever of these (or a name/folder) a caller passed.
- :class:`EmbeddingCache`: embeddings on disk, keyed by encoder fingerprint and texts.

``folder.py`` reads what a model folder declares (modules, pooling, prompts, width) without
loading weights; ``base.py`` checks inputs and outputs and uses the cache; ``encoder.py``
(sentence-transformers) and ``function.py`` (callables) embed; ``cache.py`` stores.
"""

from imrnns.encoders.base import SIMILARITIES, BaseEncoder
from imrnns.encoders.cache import EmbeddingCache, default_cache_dir
from imrnns.encoders.encoder import Encoder, position_limit, resolve_encoder
from imrnns.encoders.folder import POOLING_MODES
from imrnns.encoders.function import FunctionEncoder

__all__ = [
    "POOLING_MODES",
    "SIMILARITIES",
    "BaseEncoder",
    "EmbeddingCache",
    "Encoder",
    "FunctionEncoder",
    "default_cache_dir",
    "position_limit",
    "resolve_encoder",
]
