"""lm-evaluation-harness on afpq-jax models: ``python -m afpq_jax.lm_eval --model afpq --model_args
pretrained=DIR,batch_size=8 --tasks ...`` (or ``afpq-lm-eval``: lm-eval's own command line with the ``afpq``
model registered; lm-eval's ``lm_eval`` command cannot import models from other packages) and `evaluate`
(``afpq_jax.evaluate(model, tasks=[...])``).

`AfpqLM` is an ``lm_eval.api.model.TemplateLM`` registered as ``afpq``: ``loglikelihood`` (from lm-eval's
context / continuation split), ``loglikelihood_rolling`` (lm-eval's disjoint rolling windows) and
``generate_until`` run on our compiled forward pass and `afpq_jax.generate`; ``pretrained`` is anything
`afpq_jax.load` reads (a converted checkpoint, GPTQ / AWQ / compressed-tensors, an HF directory or GGUF, a
built-in model name, a Hub id). Sequences are batched right-padded to a power-of-two length: a causal model's
positions never see the padding after them, so padding does not change a score, and the few lengths keep
compilations few. A tokenizer that starts texts with BOS (Gemma) has it at the start of every context, as
lm-eval's HF model does for Gemma; rolling windows are the text's tokens after one BOS (lm-eval's HF model
encodes the text with its BOS and prefixes another: its ``word_perplexity`` on Gemma is not comparable).
Needs the ``eval`` extra (``pip install afpq-jax[eval]``).

Known limit: ``generate_until`` runs one request at a time for its whole ``max_gen_toks`` (or until an end
token), one compiled program per prompt length; the stop strings cut the text afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

try:
    from lm_eval import utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as e:  # the optional extra
    raise ImportError("afpq_jax.lm_eval needs lm-evaluation-harness: pip install 'afpq-jax[eval]' "
                      "(lm-eval==0.4.13)") from e

from afpq_jax._src import cli, validation
from afpq_jax._src.checkpoint import load
from afpq_jax._src.errors import InputError
from afpq_jax._src.generation import generate
from afpq_jax._src.io.sources import local_path
from afpq_jax._src.io.tokenizers import bos_prefix, load_tokenizer
from afpq_jax._src.models import CausalLM

__all__ = ["AfpqLM", "evaluate", "main"]

MIN_BUCKET = 16  # shortest padded length: tiny multiple-choice requests share one program
LOGITS_BUDGET = 4 << 30  # bytes of float32 logits per batch when batch_size is "auto" (Gemma's 262k vocabulary)
MAX_AUTO_BATCH = 8
# generation settings lm-eval tasks pass that generate_until reads (anything else is refused, not ignored)
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p", "top_k", "num_beams")


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(MIN_BUCKET, 1 << (n - 1).bit_length()))


@functools.partial(jax.jit, static_argnums=0)
def _token_scores(graphdef, state, ids, targets):
    """Per position: log p(target) and whether target is the argmax. ids, targets: (B, L) int32. The logits are
    the one (B, L, vocab) array: log p = logit - logsumexp, no second one for log_softmax."""
    logits = nnx.merge(graphdef, state)(ids).astype(jnp.float32)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets


@register_model("afpq")
class AfpqLM(TemplateLM):
    """An afpq-jax model for lm-eval. ``pretrained``: a path `afpq_jax.load` reads (or a built-in model name);
    or ``model`` (a `CausalLM`) with ``tokenizer`` (its Hugging Face tokenizer, or the path to load it from).
    ``batch_size``: sequences per forward pass; "auto" (the default, also "auto:N") takes the most, up to 8,
    whose float32 logits fit 4 GiB (Gemma 3's 262k vocabulary at 2,048 tokens: 1). ``max_length``: tokens per
    forward pass (default: the model's context, at most 2048); ``max_gen_toks``: the generation default when a
    task gives none; ``seed``: sampled generation's PRNG seed (each request its own key). ``device`` and
    ``max_batch_size`` (lm-eval's flags) are accepted and ignored: JAX places the model."""

    def __init__(self, pretrained: str | None = None, *, batch_size: int | str | None = "auto",
                 max_length: int | None = None, max_gen_toks: int = 256, model: CausalLM | None = None,
                 tokenizer: Any = None, dtype: str | None = None, seed: int = 0, device: str | None = None,
                 max_batch_size: int | None = None, **unknown: Any):
        super().__init__()
        if unknown:
            raise InputError(f"unknown afpq model_args {sorted(unknown)}; the afpq model takes pretrained, "
                             f"batch_size, max_length, max_gen_toks, dtype, seed")
        if (pretrained is None) == (model is None):
            raise InputError("give the afpq model one of pretrained=PATH (model_args) or model=CausalLM")
        auto = batch_size is None or str(batch_size).startswith("auto")  # numbers checked before any loading
        batch_size = None if auto else validation.integer(_int(batch_size, "batch_size"), "batch_size")
        max_length = None if max_length is None else validation.integer(_int(max_length, "max_length"),
                                                                         "max_length")
        self.max_gen_toks = validation.integer(_int(max_gen_toks, "max_gen_toks"), "max_gen_toks")
        self.seed = _int(seed, "seed")
        if pretrained is not None:  # a Hub id resolves to its downloaded snapshot: the tokenizer is read from it too
            path = (cli.builtin_model_dir(pretrained) if cli.builtin_model(pretrained) else
                    str(local_path(pretrained)))
            model = load(path, **({"dtype": dtype} if dtype else {}))
            tokenizer = path if tokenizer is None else tokenizer
        if tokenizer is None:
            raise InputError("an afpq model given as model=CausalLM needs tokenizer= (a tokenizer or its path)")
        self.model = model
        self.tokenizer = load_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer
        self._max_length = min(2048, model.cfg.max_seq_len) if max_length is None else max_length
        row = self._max_length * model.cfg.vocab_size * 4  # float32 logits of one sequence
        self.batch_size = max(1, min(MAX_AUTO_BATCH, LOGITS_BUDGET // row)) if auto else batch_size
        self._generated = 0  # requests generated so far: each sampled one gets its own key
        self.bos = bos_prefix(self.tokenizer)
        self._graphdef, self._state = nnx.split(model)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> AfpqLM:
        """lm-eval's constructor from ``--model_args`` (and its own flags: ``--batch_size``, ``--device``); a value
        in ``--model_args`` wins over the flag lm-eval always passes (its ``--batch_size`` defaults to 1)."""
        args = lm_utils.simple_parse_args_string(arg_string)
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None and k not in args}
        return cls(**args, **extra)

    # ---- what TemplateLM asks for ----
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return eos if eos is not None else self.model.cfg.vocab_size - 1

    @property
    def prefix_token_id(self) -> int:
        return self.bos if self.bos is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """The tokenizer's ids; by default with its BOS (if it adds one) unless the text already starts with it."""
        if add_special_tokens is None:
            add_special_tokens = self.bos is not None and not string.startswith(self.tokenizer.bos_token or "\0")
        return list(self.tokenizer(string, add_special_tokens=add_special_tokens)["input_ids"])

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None
                              ) -> list[tuple[float, bool]]:
        """(sum log p(continuation | context), whether every continuation token is the argmax) per request
        ``((context, continuation), context_ids, continuation_ids)``; the sequence is cut from the left to
        ``max_length + 1`` tokens, as lm-eval's HF model does."""
        rows = []
        for _, ctx, cont in requests:
            if not cont:
                raise InputError("lm-eval gave an empty continuation to score")
            if len(cont) > self.max_length:
                raise InputError(f"a continuation of {len(cont)} tokens does not fit max_length {self.max_length}; "
                                 f"raise max_length (model_args)")
            full = (list(ctx) + list(cont))[-(self.max_length + 1):]
            rows.append((full[:-1], full[1:], len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        bs = override_bs or self.batch_size
        for start in tqdm(range(0, len(order), bs), desc="loglikelihood", disable=disable_tqdm, leave=False):
            chunk = order[start:start + bs]
            length = _bucket(len(rows[chunk[0]][0]), self.max_length)
            ids = np.zeros((bs, length), np.int32)  # whole-batch shape: one program per length bucket
            targets = np.zeros((bs, length), np.int32)
            for r, i in enumerate(chunk):
                inp, tgt, _ = rows[i]
                ids[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
            logp, greedy = (np.asarray(a) for a in _token_scores(self._graphdef, self._state, jnp.asarray(ids),
                                                                 jnp.asarray(targets)))
            for r, i in enumerate(chunk):
                inp, _, n = rows[i]
                span = slice(len(inp) - n, len(inp))
                out[i] = (float(np.sum(logp[r, span], dtype=np.float64)), bool(np.all(greedy[r, span])))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Total log-likelihood of each whole text over lm-eval's disjoint rolling windows (the first
        conditioned on the prefix token: BOS, or EOS for tokenizers without one)."""
        windows, owner = [], []  # every text's windows in one batched pass (a short text fills no batch alone)
        for i, (text,) in enumerate(r.args for r in requests):
            for ctx, cont in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        out = [0.0] * len(requests)
        for i, (ll, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            out[i] += ll
        return out

    @property
    def stop_token_ids(self) -> list[int]:
        """Ids that end a generation: the tokenizer's EOS and every id of the model config's ``eos_token_id``
        (Gemma 3: <eos> and <end_of_turn>)."""
        ids = [self.tokenizer.eos_token_id, *np.atleast_1d(np.asarray(self.model.cfg.eos_token_id or [], int))]
        return list(dict.fromkeys(int(i) for i in ids if i is not None))

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with ``do_sample``: ``temperature``, ``top_k``, ``top_p``; each request its own
        key from ``seed``) continuations, cut at the first end token (`stop_token_ids`) and then at the first of
        ``until`` (default: the end-of-text token's string). One request at a time: `afpq_jax.generate` takes
        equal-length prompts. Settings other than `GEN_KWARGS` (or beam search) are refused, not ignored."""
        out = []
        stops = self.stop_token_ids
        for context, kwargs in tqdm([r.args for r in requests], desc="generate_until", disable=disable_tqdm,
                                    leave=False):
            kwargs = dict(kwargs or {})
            unknown = sorted(set(kwargs) - set(GEN_KWARGS))
            if unknown or int(kwargs.get("num_beams", 1)) != 1:
                raise InputError(f"the afpq model cannot honour the generation settings "
                                 f"{unknown or ['num_beams']}; it reads {', '.join(GEN_KWARGS)} (num_beams 1)")
            until = kwargs.get("until") or [self.tok_decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", self.max_gen_toks))
            sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
            sampling = ({"temperature": float(kwargs.get("temperature", 1.0)),
                         "top_k": int(kwargs["top_k"]) if kwargs.get("top_k") else None,  # HF: 0 = no top-k
                         "top_p": float(kwargs["top_p"]) if kwargs.get("top_p") is not None else None,
                         "key": jax.random.fold_in(jax.random.key(self.seed), self._generated)} if sample else {})
            self._generated += 1
            ids = self.tok_encode(context)[-max(1, self.max_length - max_new):]
            new = generate(self.model, np.asarray([ids], np.int32), max_new_tokens=max_new,
                           eos_token_id=stops or None, **sampling)
            tokens = list(np.asarray(new)[0])
            cut = next((j for j, t in enumerate(tokens) if t in stops), len(tokens))
            tokens = tokens[:cut]
            text = self.tok_decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            out.append(text)
        return out


def evaluate(model: CausalLM | str, tasks: Sequence[str | dict], *, tokenizer: Any = None,
             batch_size: int | str = "auto",
             max_length: int | None = None, **simple_evaluate_kwargs: Any) -> dict:
    """lm-eval's ``simple_evaluate`` on ``model`` (a `CausalLM` with ``tokenizer``, or a path `afpq_jax.load`
    reads): its results dict (``results[task][metric]``). ``simple_evaluate_kwargs``: num_fewshot, limit,
    task_manager (e.g. ``lm_eval.tasks.TaskManager(include_path=...)`` for local task files), ..."""
    from lm_eval import simple_evaluate

    lm = (AfpqLM(pretrained=model, batch_size=batch_size, max_length=max_length) if isinstance(model, str) else
          AfpqLM(model=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length))
    return simple_evaluate(model=lm, tasks=list(tasks), **simple_evaluate_kwargs)


def _int(value: Any, name: str) -> int:
    """A model_args value (lm-eval passes numbers from the command line as int, or as str) as an int."""
    try:
        return int(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be an integer, got {value!r}") from None


def main() -> None:
    """lm-eval's command line (``lm_eval ...``) with the ``afpq`` model registered."""
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()
