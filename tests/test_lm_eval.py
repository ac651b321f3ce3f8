"""`afpq_jax.lm_eval` through lm-eval itself: local tasks written by the test (a JSON multiple-choice set, a
rolling-loglikelihood set, a generation set), each number checked against a direct computation with our model."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import afpq_jax as aq
from tests.support import FIXTURES

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # the tasks' JSON files are local; nothing is fetched
lm_eval = pytest.importorskip("lm_eval")
from afpq_jax.lm_eval import AfpqLM  # noqa: E402

# One xdist worker runs this file (--dist loadgroup): its module fixture (an lm-eval run of three tasks: 8 s)
# is built once.
pytestmark = pytest.mark.xdist_group("test_lm_eval")

WORDS = ("the a cat dog sat ran on under mat log big small red blue and then it was is very quick slow fox "
         "jumps over lazy tree house").split()
MC = [{"question": "the cat sat on the", "choices": ["mat", "log", "big red house"], "answer": 0},
      {"question": "the quick fox jumps over the", "choices": ["lazy dog", "tree", "a"], "answer": 1},
      {"question": "a big dog", "choices": ["ran", "was very slow", "is"], "answer": 2},
      {"question": "it was", "choices": ["red", "blue and small"], "answer": 0}]
GEN = [{"question": "the cat sat on the", "answer": "mat"}, {"question": "a big dog ran under", "answer": "the"}]
ROLLING = [{"text": "the cat sat on the mat and then the dog ran under the big red house"},
           {"text": " ".join(WORDS * 2)}]  # 62 tokens: several windows at max_length 16


def _tokenizer():
    """Word-level, with Gemma's habit: BOS (id 1, the fixture's bos_token_id) before every encoded text."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(["<pad>", "<bos>", "<eos>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>",
                                   pad_token="<pad>")


def _tasks(root: Path) -> Path:
    (root / "mc.json").write_text("\n".join(json.dumps(d) for d in MC))
    (root / "gen.json").write_text("\n".join(json.dumps(d) for d in GEN))  # one prompt length: one program
    (root / "rolling.json").write_text("\n".join(json.dumps(d) for d in ROLLING))
    common = "test_split: test\ndataset_path: json\n"
    (root / "afpq_mc.yaml").write_text(
        f"task: afpq_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'mc.json'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: '{{choices}}'\n"
        "doc_to_target: '{{answer}}'\nmetric_list:\n  - metric: acc\n")
    (root / "afpq_rolling.yaml").write_text(
        f"task: afpq_rolling\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'rolling.json'}\n"
        "output_type: loglikelihood_rolling\ndoc_to_text: ''\ndoc_to_target: '{{text}}'\n"
        "metric_list:\n  - metric: word_perplexity\n")
    (root / "afpq_gen.yaml").write_text(
        f"task: afpq_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {root / 'gen.json'}\n"
        "output_type: generate_until\ndoc_to_text: '{{question}}'\ndoc_to_target: '{{answer}}'\n"
        "generation_kwargs:\n  until: ['.']\n  max_gen_toks: 5\nmetric_list:\n  - metric: exact_match\n")
    return root


@nnx.jit
def _forward(model, ids):
    return model(ids)


def _loglik(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """Direct: one unpadded forward pass over ``ids``; the last ``n_cont`` tokens' log-probabilities summed."""
    logits = np.asarray(_forward(model, jnp.asarray([ids[:-1]], jnp.int32)), np.float64)[0]
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    span = range(len(ids) - 1 - n_cont, len(ids) - 1)
    return (sum(logp[i, ids[i + 1]] for i in span), all(np.argmax(logits[i]) == ids[i + 1] for i in span))


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    from lm_eval.tasks import TaskManager
    root = _tasks(tmp_path_factory.mktemp("tasks"))
    model, tok = aq.load(FIXTURES / "gemma3"), _tokenizer()
    lm = AfpqLM(model=model, tokenizer=tok, batch_size=4, max_length=16)
    out = lm_eval.simple_evaluate(model=lm, tasks=["afpq_mc", "afpq_rolling", "afpq_gen"], log_samples=True,
                                  task_manager=TaskManager(include_path=str(root), include_defaults=False))
    return model, tok, lm, out


def test_multiple_choice_logliks_are_the_model_s(results):
    """Each choice's score is log p(choice | BOS + question) by one direct forward pass; acc follows."""
    model, tok, _, out = results
    samples = out["samples"]["afpq_mc"]
    correct = 0
    for s in sorted(samples, key=lambda s: s["doc_id"]):
        doc = MC[s["doc_id"]]
        want = []
        for choice in doc["choices"]:
            ctx = tok(doc["question"])["input_ids"]  # with BOS
            whole = tok(doc["question"] + " " + choice)["input_ids"]
            want.append(_loglik(model, whole, len(whole) - len(ctx)))
        got = [tuple(r[0]) for r in s["resps"]]
        np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5)
        assert [g[1] for g in got] == [w[1] for w in want]
        correct += int(np.argmax([w[0] for w in want]) == doc["answer"])
    assert out["results"]["afpq_mc"]["acc,none"] == pytest.approx(correct / len(MC))


def test_rolling_loglikelihood_sums_disjoint_windows(results):
    """Word perplexity from the whole text's log-likelihood: BOS, then windows of at most 16 tokens (lm-eval's
    layout), each scored by a direct unpadded forward pass."""
    from lm_eval import utils
    model, tok, _, out = results
    total_ll, total_words = 0.0, 0
    for doc in ROLLING:
        ids = tok(doc["text"], add_special_tokens=False)["input_ids"]
        windows = map(utils.make_disjoint_window, utils.get_rolling_token_windows(ids, 1, 16, 1))
        ll = sum(_loglik(model, ctx + cont, len(cont))[0] for ctx, cont in windows)
        sample = next(s for s in out["samples"]["afpq_rolling"] if s["doc"]["text"] == doc["text"])
        assert sample["resps"][0][0] == pytest.approx(ll, rel=1e-5)
        total_ll, total_words = total_ll + ll, total_words + len(doc["text"].split())
    assert len(ROLLING[1]["text"].split()) > 3 * 16  # several windows
    assert out["results"]["afpq_rolling"]["word_perplexity,none"] == pytest.approx(
        math.exp(-total_ll / total_words), rel=1e-5)


def test_generation_is_aq_generate_cut_at_the_stop_string(results):
    model, tok, _, out = results
    for s in out["samples"]["afpq_gen"]:
        prompt = tok(GEN[s["doc_id"]]["question"])["input_ids"]
        new = aq.generate(model, np.asarray([prompt]), max_new_tokens=5, eos_token_id=2)[0].tolist()
        new = new[:new.index(2)] if 2 in new else new
        assert s["resps"][0][0] == tok.decode(new, skip_special_tokens=True).split(".")[0]


def test_batching_and_padding_do_not_change_scores(results):
    """The same requests one at a time (no padding, other length buckets) and four to a batch."""
    from lm_eval.api.instance import Instance
    model, tok, lm, _ = results
    reqs = [Instance("loglikelihood", {}, (d["question"], " " + c), 0) for d in MC for c in d["choices"]]
    batched = lm.loglikelihood(reqs, disable_tqdm=True)
    single = AfpqLM(model=model, tokenizer=tok, batch_size=1, max_length=16).loglikelihood(reqs, disable_tqdm=True)
    np.testing.assert_allclose([b[0] for b in batched], [s[0] for s in single], rtol=1e-5)
    assert [b[1] for b in batched] == [s[1] for s in single]


def test_root_evaluate_runs_a_task_on_a_model_object(results, tmp_path):
    from lm_eval.tasks import TaskManager
    model, tok, _, out = results
    again = aq.evaluate(model, ["afpq_mc"], tokenizer=tok, batch_size=2, max_length=16,
                        task_manager=TaskManager(include_path=str(_tasks(tmp_path)), include_defaults=False))
    assert again["results"]["afpq_mc"]["acc,none"] == out["results"]["afpq_mc"]["acc,none"]


def test_bad_model_args_are_named():
    with pytest.raises(aq.InputError, match=r"unknown afpq model_args \['temperature'\]"):
        AfpqLM.create_from_arg_string(f"pretrained={FIXTURES / 'gemma3'},temperature=0.5")
    with pytest.raises(aq.InputError, match="one of pretrained"):
        AfpqLM()
    with pytest.raises(aq.InputError, match="batch_size must be an integer, got 'eight'"):
        AfpqLM.create_from_arg_string(f"pretrained={FIXTURES / 'gemma3'},batch_size=eight")


def test_command_line_flags_and_model_args_agree_on_batch_size(monkeypatch, tmp_path):
    """lm-eval's command line always passes its --batch_size (default 1), --max_batch_size and --device: the
    model_args value wins, the flag fills in; "auto" takes what fits the logits budget."""
    import shutil
    shutil.copytree(FIXTURES / "gemma3", tmp_path / "gemma3")
    _tokenizer().save_pretrained(tmp_path / "gemma3")
    flags = {"batch_size": 1, "max_batch_size": None, "device": None}
    path = f"pretrained={tmp_path / 'gemma3'}"
    assert AfpqLM.create_from_arg_string(f"{path},batch_size=4", flags).batch_size == 4
    assert AfpqLM.create_from_arg_string(path, flags).batch_size == 1
    assert AfpqLM.create_from_arg_string(path, {**flags, "batch_size": "auto:4"}).batch_size == 8  # tiny vocab
    from afpq_jax import lm_eval as adapter
    model = aq.load(FIXTURES / "gemma3")
    row = 16 * model.cfg.vocab_size * 4  # float32 logits of one 16-token sequence
    monkeypatch.setattr(adapter, "LOGITS_BUDGET", 3 * row)
    assert AfpqLM(model=model, tokenizer=_tokenizer(), max_length=16).batch_size == 3


def test_generation_stops_samples_per_request_and_refuses_what_it_cannot_do(results):
    from lm_eval.api.instance import Instance
    model, tok, lm, _ = results
    assert lm.stop_token_ids[0] == 2 and set(np.atleast_1d(model.cfg.eos_token_id)) <= set(lm.stop_token_ids)
    from afpq_jax import lm_eval as adapter
    sample = {"until": ["never"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0, "top_k": 0}
    reqs = [Instance("generate_until", {}, ("the cat sat on the", sample), i) for i in range(2)]

    def sampled_tokens(lm_):
        got = []

        def recording(*a, **k):
            got.append(adapter.generate.__wrapped__(*a, **k).tolist())
            return np.asarray(got[-1])
        recording.__wrapped__ = adapter.generate
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(adapter, "generate", recording)
            lm_.generate_until(reqs, disable_tqdm=True)
        return got

    def fresh(seed):
        return AfpqLM(model=model, tokenizer=tok, batch_size=4, max_length=16, seed=seed)

    first, second = sampled_tokens(fresh(0))
    assert first != second  # two samples of one prompt: two keys (one key gave humaneval 64 equal samples)
    assert sampled_tokens(fresh(0)) == [first, second]  # the seed fixes them
    assert sampled_tokens(fresh(1))[0] != first
    for bad, name in (({"repetition_penalty": 1.1}, "repetition_penalty"), ({"num_beams": 4}, "num_beams")):
        with pytest.raises(aq.InputError, match=f"cannot honour the generation settings \\['{name}'\\]"):
            lm.generate_until([Instance("generate_until", {}, ("the cat", {"until": ["."], **bad}), 0)])
    with pytest.raises(aq.InputError, match="continuation of 17 tokens does not fit max_length 16"):
        lm.loglikelihood([Instance("loglikelihood", {}, ("the", " cat" * 17), 0)])
