"""Text preprocessing and byte-level tokenization.

Two variants exist because the released weights were trained with different ones
(see formats.md): ``nvidia`` (the suite's default) and ``openai`` (what OpenAI's weights need).
A checkpoint records the variant it was trained with; featurization reuses it.
"""

from __future__ import annotations

import html
import re
from collections.abc import Callable

import numpy as np

_HTML_TAG = re.compile(r"<.*?>", re.DOTALL)  # shortest match of <...>
PREFIX, SUFFIX = "\n ", " "  # what both preprocessings put around the cleaned text


def nvidia_preprocess(text: str, max_words: int | None = None) -> str:
    """The NVIDIA suite's cleaning: strip tags, transliterate, unescape, collapse whitespace, pad."""
    from unidecode import unidecode  # only this variant needs it

    text = _HTML_TAG.sub(" ", text)
    text = unidecode(text)
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
        raise ValueError(f"unknown preprocessing {name!r}; choose one of {sorted(PREPROCESSORS)}") from None


def encode(text: str, preprocess: str = "nvidia") -> np.ndarray:
    """Preprocess ``text`` and return its UTF-8 bytes as a uint8 array (token id = byte value)."""
    cleaned = get_preprocessor(preprocess)(text)
    # surrogateescape keeps undecodable input bytes as the bytes they were (byte-level model).
    return np.frombuffer(cleaned.encode("utf-8", errors="surrogateescape"), dtype=np.uint8)


def text_slice(data: bytes) -> slice:
    """The part of preprocessed ``data`` that is the text itself: without ``PREFIX`` and ``SUFFIX``."""
    start = len(PREFIX) if data.startswith(PREFIX.encode()) else 0
    end = len(data) - len(SUFFIX) if data.endswith(SUFFIX.encode()) else len(data)
    return slice(start, max(start, end))


def decode(tokens) -> str:
    """Bytes back to text; invalid UTF-8 shows as replacement characters, never an exception."""
    return bytes(int(t) & 0xFF for t in tokens).decode("utf-8", errors="replace")
