"""Text preprocessing and byte-level tokenization.

Two variants exist because the released weights were trained with different ones
(see docs/formats.md): ``nvidia`` (the suite's default) and ``openai`` (what OpenAI's weights need).
A checkpoint records the variant it was trained with; featurization reuses it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

import numpy as np

from .errors import UsageError

PREFIX, SUFFIX = "\n ", " "  # what both preprocessings put around the cleaned text
_TAG = re.compile(r"<[^>]*>")


def strip_tags(text: str) -> str:
    """Each ``<...>`` (from a ``<`` to the first ``>`` after it, newlines included) replaced by a space.

    The result of ``re.sub(r"<.*?>", " ", text, flags=re.DOTALL)`` in linear time: that regex tries
    every ``<`` up to the end of the text when no ``>`` follows, quadratic on a long run of ``<``. A
    ``<`` after the last ``>`` starts no tag, so only the text up to the last ``>`` is searched, and
    there every ``<`` is closed: each try succeeds at the first ``>``.
    """
    end = text.rfind(">") + 1
    return _TAG.sub(" ", text[:end]) + text[end:]


_NON_ASCII = re.compile(r"[^\x00-\x7f]+")


def transliterate(text: str) -> str:
    """``unidecode(text)``, applied to the runs of non-ASCII characters only: the same result (it maps
    each character on its own) without its per-character Python loop over the ASCII around them."""
    from unidecode import unidecode  # only the nvidia preprocessing needs it

    return _NON_ASCII.sub(lambda run: unidecode(run.group()), text)


def nvidia_preprocess(text: str, max_words: int | None = None) -> str:
    """The NVIDIA suite's cleaning: strip tags, transliterate, unescape, collapse whitespace, pad."""
    text = strip_tags(text)
    text = transliterate(text)
    text = html.unescape(text)
    words = text.split()
    if max_words is not None:
        words = words[:max_words]
    return PREFIX + " ".join(words) + SUFFIX


def openai_preprocess(text: str) -> str:
    """OpenAI's release: unescape, newlines to spaces, strip, pad."""
    text = html.unescape(text).replace("\n", " ").strip()
    return PREFIX + text + SUFFIX


PREPROCESSORS: dict[str, Callable[[str], str]] = {
    "nvidia": nvidia_preprocess,
    "openai": openai_preprocess,
}


def get_preprocessor(name: str) -> Callable[[str], str]:
    try:
        return PREPROCESSORS[name]
    except KeyError:
        raise UsageError(f"unknown preprocessing {name!r}; choose one of {sorted(PREPROCESSORS)}") from None


def encode_bytes(text: str, preprocess: str = "nvidia") -> bytes:
    """Preprocess ``text`` and return its UTF-8 bytes (token id = byte value)."""
    # surrogateescape keeps undecodable input bytes as the bytes they were (byte-level model).
    return get_preprocessor(preprocess)(text).encode("utf-8", errors="surrogateescape")


def encode(text: str, preprocess: str = "nvidia") -> np.ndarray:
    """``encode_bytes`` as a uint8 array."""
    return np.frombuffer(encode_bytes(text, preprocess), dtype=np.uint8)


def text_slice(data: bytes) -> slice:
    """The part of preprocessed ``data`` that is the text itself: without ``PREFIX`` and ``SUFFIX``."""
    start = len(PREFIX) if data.startswith(PREFIX.encode()) else 0
    end = len(data) - len(SUFFIX) if data.endswith(SUFFIX.encode()) else len(data)
    return slice(start, max(start, end))


def decode(tokens) -> str:
    """Bytes back to text; invalid UTF-8 shows as replacement characters, never an exception."""
    return bytes(int(t) & 0xFF for t in tokens).decode("utf-8", errors="replace")
