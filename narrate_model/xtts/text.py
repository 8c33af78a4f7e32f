"""XTTS-v2 text front end: cleaning, BPE token ids, per-language length limits and sentence chunks.

Reproduces coqui-tts 0.28's ``VoiceBpeTokenizer`` (the GPT was trained on its output, so its quirks are kept)
and the ``Xtts.inference`` path, which strips and lower-cases each sentence before encoding. Sentence splitting is
our own: offline and deterministic, where upstream needs spaCy.
"""
from __future__ import annotations

import functools
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CheckpointError, NarrateInputError
from .text_numbers import expand_abbreviations, expand_numbers, expand_symbols, language_name

logger = logging.getLogger(__name__)

SUPPORTED_LANGUAGES: tuple[str, ...] = (
    "en", "es", "fr", "de", "it", "pt", "pl", "tr", "ru", "nl", "cs", "ar", "zh-cn", "hu", "ko", "ja", "hi")

# Characters per sentence above which XTTS's audio tends to get cut short (upstream only warns).
_CHAR_LIMITS = {"en": 250, "de": 253, "fr": 273, "es": 239, "it": 213, "pt": 203, "pl": 224, "zh": 82, "ar": 166,
                "cs": 186, "ru": 182, "nl": 251, "tr": 226, "ja": 71, "hu": 224, "ko": 95, "hi": 150}
_DEFAULT_CHAR_LIMIT = 250
# GPT text positions: upstream asserts fewer than 402 ids per sentence (start and stop tokens come on top).
MAX_TEXT_TOKENS = 402
_BASES = {code.split("-")[0]: code for code in SUPPORTED_LANGUAGES}
_WHITESPACE_RE = re.compile(r"\s+")


def _base_language(lang: str) -> str:
    """'zh-cn' -> 'zh'; region suffixes are ignored like upstream (lang.split('-')[0])."""
    base = str(lang).strip().lower().split("-")[0]
    if base not in _BASES:
        raise NarrateInputError(
            "language", f"unsupported language {lang!r}; XTTS-v2 speaks {' '.join(SUPPORTED_LANGUAGES)}")
    return base


def char_limit(lang: str) -> int:
    return _CHAR_LIMITS.get(_base_language(lang), _DEFAULT_CHAR_LIMIT)


def _warn_if_long(text: str, lang: str) -> None:
    limit = char_limit(lang)
    if len(text) > limit:  # upstream only warns too: nothing is truncated
        logger.warning("a %d-character text is over the %d XTTS handles well for %s; the audio may be cut short "
                       "(split it into sentences): %.50s...", len(text), limit, language_name(_base_language(lang)),
                       text)


def clean_text(text: str, lang: str) -> str:
    """Upstream ``preprocess_text``: the text exactly as the BPE sees it, before the language tag.

    Hindi goes through the multilingual cleaners as in coqui-tts 0.28 (older coqui-ai/TTS only lower-cased it).
    """
    base = _base_language(lang)
    if base == "ja":
        return _romaji(text).lower()
    text = text.replace('"', "")
    # Turkish capitals whose default lower() is wrong ("İ" -> "i" + U+0307). Quirk kept: the inference path has
    # already lower-cased the text, so there this never fires and the combining dot reaches the BPE.
    if base == "tr":
        text = text.replace("İ", "i").replace("Ö", "ö").replace("Ü", "ü")
    text = text.lower()
    text = expand_numbers(text, base)
    text = expand_abbreviations(text, base)
    text = expand_symbols(text, base)
    text = _WHITESPACE_RE.sub(" ", text).strip()
    if base == "zh":
        text = _pinyin(text)
    elif base == "ko":
        text = _hangul_romanize(text)
    return text


# Romanisers for zh / ja / ko are optional dependencies, imported only when those languages are used.
def _missing(lang: str, packages: str, error: Exception) -> NarrateInputError:
    return NarrateInputError(
        "language", f"{language_name(lang)} text needs extra packages ({type(error).__name__}: {error}); "
                    f"install {packages} to narrate {language_name(lang)} text")


def _pinyin(text: str) -> str:
    try:
        import pypinyin
    except ImportError as error:
        raise _missing("zh", "pypinyin (pip install pypinyin)", error) from error
    syllables = pypinyin.pinyin(text, style=pypinyin.Style.TONE3, heteronym=False, neutral_tone_with_five=True)
    return "".join(choices[0] for choices in syllables)


def _hangul_romanize(text: str) -> str:
    try:
        from ko_speech_tools import hangul_romanize
    except ImportError as error:
        raise _missing("ko", "ko-speech-tools (pip install ko-speech-tools)", error) from error
    return hangul_romanize(text)


@functools.cache
def _cutlet():
    import cutlet
    return cutlet.Cutlet()  # builds its MeCab tagger over UniDic once


def _romaji(text: str) -> str:
    try:
        katsu = _cutlet()
    except (ImportError, RuntimeError) as error:  # fugashi raises RuntimeError when no dictionary is installed
        raise _missing("ja", "cutlet, fugashi and unidic-lite (pip install cutlet fugashi unidic-lite)",
                       error) from error
    return katsu.romaji(text)


# --------------------------------------------------------------------------------------------------------------
# BPE
# --------------------------------------------------------------------------------------------------------------
def bpe_input(cleaned: str, lang: str) -> str:
    """The string handed to the BPE: language tag ([zh-cn] for Chinese) + cleaned text, spaces as [SPACE]."""
    return f"[{_BASES[_base_language(lang)]}]{cleaned}".replace(" ", "[SPACE]")


_REQUIRED_TOKENS = ("[STOP]", "[UNK]", "[SPACE]", "[START]", "[en]")


class XttsTokenizer:
    """The checkpoint's ``vocab.json`` (a Hugging Face ``tokenizers`` BPE file) with XTTS's encode / decode."""

    def __init__(self, vocab_path):
        from tokenizers import Tokenizer

        path = Path(vocab_path)
        if not path.is_file():
            raise CheckpointError(f"XTTS vocab file not found: {path} (expected the vocab.json of XTTS-v2)")
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as error:
            raise CheckpointError(
                f"{path} is not a Hugging Face tokenizers file ({type(error).__name__}: {error}); expected the "
                f"vocab.json of XTTS-v2") from error
        model = type(self.tokenizer.model).__name__
        vocab = self.tokenizer.get_vocab(with_added_tokens=True)
        missing = [token for token in _REQUIRED_TOKENS if token not in vocab]
        if model != "BPE" or missing:
            raise CheckpointError(
                f"{path} is not an XTTS BPE vocab: model {model} (expected BPE), missing special tokens "
                f"{missing} ({len(missing)} of {len(_REQUIRED_TOKENS)}); expected the vocab.json of XTTS-v2")
        self.path = path
        self.vocab_size = max(vocab.values()) + 1  # upstream get_number_tokens(): the GPT's text embedding rows
        self.start_id = vocab["[START]"]
        self.stop_id = vocab["[STOP]"]
        self.unk_id, self.space_id = vocab["[UNK]"], vocab["[SPACE]"]
        self._tags = {code: f"[{code}]" in vocab for code in SUPPORTED_LANGUAGES}

    def encode(self, text: str, lang: str) -> list[int]:
        """Upstream ``VoiceBpeTokenizer.encode``: clean, prefix the language tag, spaces as [SPACE], BPE ids."""
        _warn_if_long(text, lang)
        return self.encode_cleaned(clean_text(text, lang), lang)

    def encode_cleaned(self, cleaned: str, lang: str) -> list[int]:
        """BPE ids of text already passed through :func:`clean_text`."""
        code = _BASES[_base_language(lang)]
        if not self._tags[code]:  # e.g. [hu] / [ko] / [hi] exist only in the v2 vocab; upstream encodes anyway
            self._tags[code] = True  # warn once
            logger.warning("%s has no [%s] token (an XTTS v1 vocab?): the tag is encoded as plain text",
                           self.path.name, code)
        return self.tokenizer.encode(bpe_input(cleaned, code)).ids

    def decode(self, ids) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        text = self.tokenizer.decode(ids, skip_special_tokens=False).replace(" ", "")
        return text.replace("[SPACE]", " ").replace("[STOP]", "").replace("[UNK]", "")


# --------------------------------------------------------------------------------------------------------------
# Sentence chunks
# --------------------------------------------------------------------------------------------------------------
_CLOSERS = "\"'”’»)\\]」』）"
_BREAKS = (  # cut after each match, coarsest first; whitespace stays with the piece before the cut
    # sentence ends: . ! ? … (and Arabic ؟, Devanagari ।) before a space, CJK 。！？ anywhere, line breaks
    re.compile(rf"[.!?…؟।]+[{_CLOSERS}]*(?:\s+|$)|[。！？｡]+[{_CLOSERS}]*\s*|\s*\n\s*"),
    # clause punctuation: , ; : – — (and Arabic ،) before a space, CJK 、，；： anywhere
    re.compile(rf"[,;:–—،]+[{_CLOSERS}]*\s+|[、，；：]+[{_CLOSERS}]*\s*"),
    re.compile(r"\s+"),  # between words
)


def _pieces(text: str, pattern: re.Pattern) -> list[str]:
    cuts = [m.end() for m in pattern.finditer(text) if 0 < m.end() < len(text)]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:]) if a < b]


def _pack(text: str, limit: int, level: int = 0) -> list[str]:
    """Greedily pack the pieces cut at ``_BREAKS[level]`` into chunks of at most ``limit`` characters."""
    if len(text.strip()) <= limit:
        return [text]
    if level == len(_BREAKS):  # one word longer than the limit: cut it (keeping the space that follows it)
        word = text.strip()
        parts = [word[i:i + limit] for i in range(0, len(word), limit)]
        parts[-1] += text[len(text.rstrip()):]
        return parts
    chunks, current = [], ""
    for piece in _pieces(text, _BREAKS[level]):
        if len((current + piece).strip()) <= limit:
            current += piece
            continue
        if current.strip():
            chunks.append(current)
        current = piece
        if len(piece.strip()) > limit:
            *done, current = _pack(piece, limit, level + 1)
            chunks.extend(done)
    if current.strip():
        chunks.append(current)
    return chunks


def split_sentences(text: str, lang: str, limit: int | None = None) -> list[str]:
    """Split text into chunks of at most ``limit`` characters (default: the language's XTTS limit).

    Cuts at sentence ends first, then at clause punctuation, then between words; a single word longer than the
    limit (or a run of CJK text without punctuation) is cut inside. Only whitespace at the cuts is dropped.
    """
    limit = char_limit(lang) if limit is None else int(limit)
    if limit < 1:
        raise NarrateInputError("limit", f"the chunk limit must be at least 1 character, got {limit}")
    chunks = (chunk.strip() for chunk in _pack(text, limit))
    return [chunk for chunk in chunks if chunk]


# --------------------------------------------------------------------------------------------------------------
# The text stage
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TextTokens:
    """What the synthesizer needs from a text: one id list per chunk, each spoken as one GPT generation."""
    text: str  # the input text, stripped
    language: str  # the code from SUPPORTED_LANGUAGES (e.g. "zh-cn")
    chunks: list[str]  # the text cut into chunks under the language's limit (raw, before cleaning)
    ids: list[list[int]]  # BPE ids per chunk, from chunk.strip().lower() as upstream inference encodes them
    cleaned: list[str] = field(default_factory=list)  # per chunk, the cleaned text the ids spell (for display)
    warnings: list[str] = field(default_factory=list)  # what the user should know about this text
    max_codes: int | None = None  # the short-text guard's bound on the codes per chunk (None: the model's own)


# Guards of the pack's own (not upstream XTTS): what is not worth speaking, and short texts. XTTS is known to run on
# after a text of a few words (it tends to make at least ~3 s of audio; coqui-ai/TTS#3516, idiap/coqui-ai-TTS#310),
# so a text of at most SHORT_TEXT_WORDS words gets a bound on its codes that real speech never reaches: 1 s plus
# 0.3 s per character (speech runs at 12-15 letters or 4-6 CJK characters a second).
SHORT_TEXT_WORDS = 3
CODES_PER_SECOND = 22050 / 1024  # XTTS-v2: one GPT code per 1024 samples at 22.05 kHz
MOSTLY_UNKNOWN = 0.5  # share of [UNK] among the text tokens above which the text is flagged


def speakable(cleaned: str) -> bool:
    """Whether a cleaned chunk holds anything to say: a letter or a digit (not only emoji, symbols, punctuation)."""
    return any(ch.isalnum() for ch in cleaned)


def short_text_code_limit(text: str) -> int | None:
    """The codes a text of at most SHORT_TEXT_WORDS words may take, or None for longer texts."""
    if len(text.split()) > SHORT_TEXT_WORDS:
        return None
    characters = sum(not ch.isspace() for ch in text)
    return math.ceil(CODES_PER_SECOND * (1 + 0.3 * characters))


def tokenize(tokenizer: XttsTokenizer, text: str, lang: str, split: bool = True,
             max_tokens: int = MAX_TEXT_TOKENS) -> TextTokens:
    """Validate, split into chunks under the language's limit (when ``split``), and encode each chunk."""
    if not isinstance(text, str) or not text.strip():
        raise NarrateInputError("text", "the text is empty; type the words to narrate")
    code = _BASES[_base_language(lang)]
    text = text.strip()
    chunks = split_sentences(text, code) if split else [text]
    kept, ids, cleaned = [], [], []
    for chunk in chunks:
        _warn_if_long(chunk, code)
        words = clean_text(chunk.strip().lower(), code)  # Xtts.inference lower-cases before encoding
        if not speakable(words):  # e.g. a chunk of nothing but quote marks, emoji or punctuation
            continue
        chunk_ids = tokenizer.encode_cleaned(words, code)
        if len(chunk_ids) >= max_tokens:
            raise NarrateInputError(
                "text", f"a {'chunk' if split else 'text'} of {len(chunk_ids)} tokens is over XTTS's limit of "
                        f"{max_tokens - 1}: {chunk[:60]!r}...; "
                        + ("use shorter sentences" if split else "turn sentence splitting on or shorten the text"))
        kept.append(chunk)
        ids.append(chunk_ids)
        cleaned.append(words)
    if not kept:
        raise NarrateInputError("text", f"nothing speakable is left of {text[:60]!r} after cleaning (no letters or "
                                        f"digits: emoji, symbols and punctuation are not spoken); type words")
    warnings = []
    text_ids = [i for chunk in ids for i in chunk[1:] if i != tokenizer.space_id]  # without language tag, spaces
    unknown = sum(i == tokenizer.unk_id for i in text_ids)
    if unknown > MOSTLY_UNKNOWN * len(text_ids):
        warnings.append(f"{unknown} of the text's {len(text_ids)} tokens are unknown to the model ([UNK]: characters "
                        f"its vocabulary lacks); the speech will be mostly noise. Is the language right?")
    max_codes = short_text_code_limit(text)
    if max_codes is not None:
        warnings.append(f"a short text (at most {SHORT_TEXT_WORDS} words): XTTS tends to run on after very short "
                        f"texts, so the speech is limited to {max_codes} codes ({max_codes / CODES_PER_SECOND:.1f} s)")
    return TextTokens(text=text, language=code, chunks=kept, ids=ids, cleaned=cleaned, warnings=warnings,
                      max_codes=max_codes)
