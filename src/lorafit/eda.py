"""Easy Data Augmentation (Wei & Zou 2019, "EDA"): four word-level edits of a text, and the WordNet they draw on.

`Eda(wordnet, ...).augment(text, n, seed)` makes n edited copies of `text`. As in the paper's code, each copy
applies one operation, the operations are pooled (n // 4 + 1 copies of each enabled one) and a seeded
shuffle picks n: synonym replacement (SR) replaces max(1, alpha_sr * words) distinct words by a WordNet
synonym, random insertion (RI) inserts a synonym of a random word at a random place max(1, alpha_ri * words)
times, random swap (RS) swaps two random words max(1, alpha_rs * words) times, random deletion (RD) drops
each word with probability p_rd (keeping one if it would drop all). Unlike the paper's code, the text is
not lower-cased and stripped of punctuation: words are whitespace-separated tokens, a synonym takes the
case of the word it replaces, and punctuation around a word stays. Stop words (a fixed list, the paper's)
are never replaced and never give synonyms to insert. The edits depend only on the seed and the text.

`wordnet()` finds WordNet for nltk's reader: nltk's own data (`python -m nltk.downloader wordnet`), else
Debian's database (`apt-get install wordnet-base`: /usr/share/wordnet, or $WNSEARCHDIR), copied once
into the lorafit cache with the `lexnames` file nltk needs and Debian leaves out.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

from . import atomic
from .errors import UserError
from .sources import cache_dir

__all__ = ["Eda", "wordnet", "wordnet_version", "synonym_replacement", "random_insertion", "random_swap", "random_deletion",
           "STOP_WORDS", "NO_WORDNET"]

NO_WORDNET = ("data.augment.kind=eda needs the WordNet database, which is not installed: "
              "apt-get install wordnet-base (or set $WNSEARCHDIR to its folder), or python -m nltk.downloader wordnet")

#: Debian's WordNet folder (package wordnet-base); $WNSEARCHDIR, WordNet's own setting, comes first.
DEBIAN_WORDNET = Path("/usr/share/wordnet")

#: The WordNet 3.0 lexicographer files (lexnames(5WN)): number, name, part of speech (1 noun, 2 verb,
#: 3 adjective, 4 adverb). nltk's reader opens this file; Debian's database does not ship it.
LEXNAMES = ("adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body "
            "noun.cognition noun.communication noun.event noun.feeling noun.food noun.group noun.location "
            "noun.motive noun.object noun.person noun.phenomenon noun.plant noun.possession noun.process "
            "noun.quantity noun.relation noun.shape noun.state noun.substance noun.time verb.body verb.change "
            "verb.cognition verb.communication verb.competition verb.consumption verb.contact verb.creation "
            "verb.emotion verb.motion verb.perception verb.possession verb.social verb.stative verb.weather adj.ppl").split()
_POS_NUMBER = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
_DATABASE = [f"{kind}.{pos}" for kind in ("index", "data") for pos in ("noun", "verb", "adj", "adv")]

#: The paper's stop words (nltk's English list as its code has it), fixed here so augmentations do not
#: depend on which nltk data is installed.
STOP_WORDS = frozenset(
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers "
    "herself it its itself they them their theirs themselves what which who whom this that these those am is are "
    "was were be been being have has had having do does did doing a an the and but if or because as until while "
    "of at by for with about against between into through during before after above below to from up down in out "
    "on off over under again further then once here there when where why how all any both each few more most "
    "other some such no nor not only own same so than too very s t can will just don should now".split())

_WORD = re.compile(r"^(\W*)([^\W\d_]+)(\W*)$")  # a token: punctuation, a word of letters, punctuation

_READERS: dict[str, object] = {}


# -- WordNet ------------------------------------------------------------------------------------

def wordnet():
    """nltk's WordNetCorpusReader over the first WordNet found (see the module docstring); UserError if none."""
    try:
        import nltk
        from nltk.corpus.reader.wordnet import WordNetCorpusReader
    except ImportError:
        raise UserError("data.augment.kind=eda needs nltk: pip install nltk") from None
    try:
        root = nltk.data.find("corpora/wordnet")
    except LookupError:
        folder = _system_wordnet()
        if folder is None:
            raise UserError(NO_WORDNET) from None
        root = _reader_folder(folder)
        # nltk opens files only under its data path: adding the folder is how nltk authorises a corpus elsewhere.
        if str(root) not in nltk.data.path:
            nltk.data.path.append(str(root))
        root = str(root)
    key = str(Path(root).resolve()) if isinstance(root, str) else str(root)  # a cache reached through a link: one reader
    if key not in _READERS:
        class Reader(WordNetCorpusReader):
            def map_wn(self, version="wordnet"):
                # The map from nltk's own WordNet to this one serves the multilingual data (unused here);
                # nltk builds it for any database not named like its own, and fails where nltk's is absent.
                return None

        with warnings.catch_warnings():  # "the multilingual functions are not available": not used here
            warnings.simplefilter("ignore")
            _READERS[key] = Reader(root, None)
    return _READERS[key]


def _system_wordnet() -> Path | None:
    for folder in (os.environ.get("WNSEARCHDIR"), DEBIAN_WORDNET):
        if folder and all((Path(folder) / name).is_file() for name in _DATABASE):
            return Path(folder)
    return None


def _reader_folder(source: Path) -> Path:
    """A copy of the WordNet database in `source` plus `lexnames`, in the lorafit cache, made once.

    A copy, not links: nltk refuses to open a file whose real path lies outside the corpus folder. The
    folder's name is a digest of the source files' paths, sizes and times, so an updated database gets
    a new copy. Each file is written atomically and `lexnames` last, so a folder with `lexnames` is
    complete, whichever concurrent process wrote which file.
    """
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    files = [source / name for name in WordNetCorpusReader._FILES if name != "lexnames" and (source / name).is_file()]
    stamp = "\n".join(f"{f.resolve()}\t{f.stat().st_size}\t{f.stat().st_mtime_ns}" for f in files)
    folder = cache_dir() / "wordnet" / hashlib.sha256(stamp.encode("utf-8")).hexdigest()[:16]
    if (folder / "lexnames").is_file():
        return folder
    for file in files:
        with atomic.file(folder / file.name) as tmp:
            shutil.copyfile(file, tmp)
    lines = [f"{i:02d}\t{name}\t{_POS_NUMBER[name.split('.')[0]]}\n" for i, name in enumerate(LEXNAMES)]
    atomic.write_text(folder / "lexnames", "".join(lines))
    return folder


def wordnet_version(reader) -> str:
    return str(reader.get_version())


# -- the four operations ------------------------------------------------------------------------

def _core(token: str) -> tuple[str, str, str] | None:
    """(leading punctuation, word, trailing punctuation) of a token that is one word of letters; else None."""
    match = _WORD.match(token)
    return match.groups() if match else None  # type: ignore[return-value]


def _eligible(token: str) -> str | None:
    """The lower-cased word of a token SR and RI may use: letters only, not a stop word."""
    parts = _core(token)
    if parts is None or len(parts[1]) < 2 or parts[1].lower() in STOP_WORDS:
        return None
    return parts[1].lower()


def _like(synonym: str, word: str) -> str:
    """`synonym` in the case of `word`: all capitals, a capital first, or as WordNet has it (lower case)."""
    if word.isupper() and len(word) > 1:
        return synonym.upper()
    if word[0].isupper():
        return synonym[0].upper() + synonym[1:]
    return synonym


def synonym_replacement(words: list[str], n: int, rng: random.Random, synonyms: Callable[[str], list[str]]) -> list[str]:
    """Replace up to `n` distinct eligible words (every occurrence of each) by one random synonym each."""
    candidates = sorted({w for w in map(_eligible, words) if w is not None})
    rng.shuffle(candidates)
    out = list(words)
    replaced = 0
    for word in candidates:
        choices = synonyms(word)
        if not choices:
            continue
        synonym = rng.choice(choices)
        for i, token in enumerate(out):
            parts = _core(token)
            if parts is not None and parts[1].lower() == word:
                out[i] = parts[0] + _like(synonym, parts[1]) + parts[2]
        replaced += 1
        if replaced >= n:
            break
    return " ".join(out).split(" ")  # a synonym of several words becomes several words


def random_insertion(words: list[str], n: int, rng: random.Random, synonyms: Callable[[str], list[str]]) -> list[str]:
    """`n` times: a synonym of a random eligible word (one with synonyms) inserted at a random place."""
    out = list(words)
    for _ in range(n):
        sources = [w for w in map(_eligible, out) if w is not None and synonyms(w)]
        if not sources:
            break
        out.insert(rng.randint(0, len(out)), rng.choice(synonyms(rng.choice(sources))))
    return " ".join(out).split(" ")


def random_swap(words: list[str], n: int, rng: random.Random) -> list[str]:
    """`n` times: swap two words at random places (as the paper: up to 3 tries to find a second place)."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i = rng.randint(0, len(out) - 1)
        j, tries = i, 0
        while j == i and tries <= 3:
            j, tries = rng.randint(0, len(out) - 1), tries + 1
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: list[str], p: float, rng: random.Random) -> list[str]:
    """Drop each word with probability `p`; a one-word text stays, and one word survives if all would go."""
    if len(words) <= 1:
        return list(words)
    out = [w for w in words if rng.random() > p]
    return out or [rng.choice(words)]


# -- a text's augmentations ---------------------------------------------------------------------

class Eda:
    """The EDA augmenter: `augment(text, n, seed)` -> n edited copies (before any duplicate is dropped)."""

    def __init__(self, reader, alpha_sr: float, alpha_ri: float, alpha_rs: float, p_rd: float):
        self.reader = reader
        self.rates = {"sr": alpha_sr, "ri": alpha_ri, "rs": alpha_rs, "rd": p_rd}
        self._synonyms: dict[str, list[str]] = {}

    def synonyms(self, word: str) -> list[str]:
        """WordNet synonyms of `word` (lemmas of its synsets, in lower case, letters and spaces only), sorted."""
        if word not in self._synonyms:
            found = set()
            for synset in self.reader.synsets(word):
                for lemma in synset.lemmas():
                    name = lemma.name().replace("_", " ").replace("-", " ").lower()
                    if name != word and all(c.isalpha() or c == " " for c in name):
                        found.add(" ".join(name.split()))
            self._synonyms[word] = sorted(found)
        return self._synonyms[word]

    def augment(self, text: str, n: int, seed: int) -> list[str]:
        rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}\0{text}".encode("utf-8")).digest()[:8], "big"))
        words = text.split()
        count = len(words)
        enabled = [op for op, rate in self.rates.items() if rate > 0]
        pool = [op for op in enabled for _ in range(n // len(enabled) + 1)]
        rng.shuffle(pool)
        out = []
        for op in pool[:n]:
            rate = self.rates[op]
            if op == "sr":
                edited = synonym_replacement(words, max(1, int(rate * count)), rng, self.synonyms)
            elif op == "ri":
                edited = random_insertion(words, max(1, int(rate * count)), rng, self.synonyms)
            elif op == "rs":
                edited = random_swap(words, max(1, int(rate * count)), rng)
            else:
                edited = random_deletion(words, rate, rng)
            out.append(" ".join(edited))
        return out
