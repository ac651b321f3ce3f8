"""High-level entry points: `load` any model, `convert` a float model into a packed checkpoint."""

from __future__ import annotations

import dataclasses
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from afpq_jax._src import checkpoint
from afpq_jax._src.io import sources
from afpq_jax._src.layers import QuantScheme
from afpq_jax._src.loading import populate_from_source
from afpq_jax._src.models import CausalLM, config_from_hf, linear_paths

from afpq_jax._src.algorithms.blockwise import METHODS, CalibrationOptions, quantize_blockwise, sample_windows


def load(path: str | os.PathLike, *, dtype=jnp.float32) -> CausalLM:
    """A ready NNX model from a converted afpq-jax checkpoint, a float Hugging Face directory (safetensors or
    Flax msgpack), a GGUF file, or a Hub id (needs network). ``model(input_ids)`` gives float32 logits."""
    if checkpoint.is_converted_checkpoint(path):
        return checkpoint.load(path)
    source = sources.open_source(path)
    return populate_from_source(source, config_from_hf(source.config), dtype=dtype)


def load_tokenizer(path: str | os.PathLike):
    """The tokenizer that belongs to a model path (directory with tokenizer files, or a GGUF file)."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found": we never run torch
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    p = Path(path)
    if p.is_file():
        from afpq_jax._src.io import gguf as gguf_io
        tok = gguf_io.build_tokenizer(gguf_io.read_gguf_tokenizer_metadata(p))
        return PreTrainedTokenizerFast(tokenizer_object=tok)
    if not any((p / f).exists() for f in ("tokenizer.json", "tokenizer.model", "vocab.json")):
        raise sources.CheckpointError(f"{p} has no tokenizer files (tokenizer.json / tokenizer.model); copy them "
                                      f"from the original model")
    return AutoTokenizer.from_pretrained(str(p))


def tokenize(tokenizer, text: str, chunk_chars: int = 100_000) -> np.ndarray:
    """Token ids of a long text as int32, encoded paragraph-aligned chunk by chunk: one fast-tokenizer call on
    a multi-megabyte string holds offsets and masks for every token (measured: +300 MB RSS for 2.3 MB of text)."""
    parts, start = [], 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            cut = text.rfind("\n\n", start, end)
            end = cut + 2 if cut > start else end
        parts.append(np.asarray(tokenizer(text[start:end], add_special_tokens=False)["input_ids"], np.int32))
        start = end
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ConvertOptions:
    """What `convert` does (frozen; validated up front so bad options fail before any work)."""

    scheme: QuantScheme
    method: str = "rtn"
    clip: bool | None = None  # two-sided clipping search; None = on for AWQ, off otherwise
    calibration: CalibrationOptions = dataclasses.field(default_factory=CalibrationOptions)
    calib_text: str | None = None  # UTF-8 file; None = the Wikipedia calibration split
    calib_random: bool = False  # uniformly random token ids (no tokenizer needed; FPTQ found them often enough)
    quantize_lm_head: bool = False
    dtype: str = "float32"

    @property
    def use_clip(self) -> bool:
        return self.method == "awq" if self.clip is None else self.clip

    @property
    def calibrated(self) -> bool:
        return self.method != "rtn" or self.use_clip

    def validate(self) -> None:
        self.scheme.validate()
        self.calibration.validate()
        if self.method == "gptq" and self.clip:
            raise ValueError("the clipping search applies to rtn and awq; GPTQ sets its scales itself (drop --clip)")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; available: {', '.join(METHODS)}")
        if jnp.dtype(self.dtype).name not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")


@dataclasses.dataclass
class ConvertSummary:
    out: Path
    layers: int
    quantized_params: int
    quantized_bytes: int
    float_params: int
    disk_bytes: int
    seconds: float
    phase_seconds: dict = dataclasses.field(default_factory=dict)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes / max(1, self.quantized_params)

    def lines(self) -> list[str]:
        return [f"quantized layers : {self.layers}",
                f"quantized params : {self.quantized_params:,} at {self.bits_per_weight:.3f} bits/weight "
                f"({self.quantized_bytes / 2**20:.1f} MiB)",
                f"float params     : {self.float_params:,} (embeddings, norms, biases, unquantized heads)",
                f"size on disk     : {self.disk_bytes / 2**20:.1f} MiB  ->  {self.out}",
                f"time             : {self.seconds:.1f} s"] + (
                    ["  " + ", ".join(f"{k} {v:.1f}s" for k, v in self.phase_seconds.items())]
                    if self.phase_seconds else [])


def _dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def convert(model_path: str | os.PathLike, out: str | os.PathLike, options: ConvertOptions, *,
            overwrite: bool = False, progress: bool = True) -> ConvertSummary:
    """Quantizes every linear layer of the decoder blocks (and lm_head if asked) and writes a checkpoint."""
    options.validate()
    t0 = time.perf_counter()
    out = Path(out)
    if out.exists() and not overwrite:  # fail before reading gigabytes
        raise FileExistsError(f"output directory {out} already exists; choose another --out or pass --overwrite")
    source = sources.open_source(model_path)
    cfg = config_from_hf(source.config)
    paths = linear_paths(cfg)
    if options.quantize_lm_head and cfg.tie_embeddings:
        raise ValueError("lm_head is tied to the input embeddings in this model; quantizing it is not supported "
                         "(drop --quantize-lm-head)")
    layout = {p: options.scheme for p in paths if p != "lm_head" or options.quantize_lm_head}
    s = options.scheme
    report: dict = {}
    if options.calibrated:
        if options.method == "awq" and cfg.mlp == "gelu":
            cfg = dataclasses.replace(cfg, mlp_act_scale=True)  # BLOOM: fold the GELU->down scale here
        calib = _calibration_windows(model_path, source, cfg, options)
        model, report = quantize_blockwise(source, cfg, layout, options.method, calib, options.calibration,
                                           clip=options.use_clip, dtype=jnp.dtype(options.dtype), progress=progress)
    else:
        def quantize_kernel(path: str, kernel: np.ndarray):
            return jax.block_until_ready(s.quantize(kernel))

        model = populate_from_source(source, cfg, dtype=jnp.dtype(options.dtype), quant=layout,
                                     quantize_kernel=quantize_kernel, progress=progress)
    linears = model.linear_layers()
    q_params = sum(linears[p].in_features * linears[p].out_features for p in layout)
    q_bytes = sum(linears[p].quantized_tensor().nbytes for p in layout)
    float_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    quant_config = {
        "checkpoint_format": checkpoint.CHECKPOINT_FORMAT, "quant_method": "afpq-jax", "method": options.method,
        "clip": options.use_clip, "mlp_act_scale": cfg.mlp_act_scale,
        "calibration": dataclasses.asdict(options.calibration) if options.calibrated else None,
        "report": report,
        **s.to_json(), "dtype": jnp.dtype(options.dtype).name, "lm_head_quantized": "lm_head" in layout,
        "layers": {p: sch.to_json() for p, sch in layout.items()},
        "packing": "bit planes along the input axis, LSB first (afpq_jax/_src/packing.py)",
        "source": str(model_path), "source_kind": source.kind,
        "bits_per_weight": round(8 * q_bytes / max(1, q_params), 4),
    }
    with checkpoint.staging_dir(out, overwrite) as tmp:
        if source.kind == "gguf":
            from afpq_jax._src.io import gguf as gguf_io
            gguf_io.write_hf_tokenizer(source.path, tmp)
        checkpoint.save(model, tmp, hf_config=source.config, quant_config=quant_config,
                        tokenizer_dir=source.tokenizer_dir)
    return ConvertSummary(out=out.absolute(), layers=len(layout), quantized_params=q_params,
                          quantized_bytes=q_bytes, float_params=float_params,
                          disk_bytes=_dir_bytes(out), seconds=time.perf_counter() - t0,
                          phase_seconds=report.get("seconds", {}))


def _calibration_windows(model_path, source, cfg, options: ConvertOptions) -> np.ndarray:
    """Random calibration windows of the calibration text, tokenized with the model's tokenizer."""
    from afpq_jax._src import assets
    c = options.calibration
    seqlen = min(c.seqlen, cfg.max_seq_len)
    if options.calib_random:
        rng = np.random.default_rng(c.seed)
        return rng.integers(0, cfg.vocab_size, (c.samples, seqlen), dtype=np.int32)
    if options.calib_text is not None:
        p = Path(options.calib_text)
        if not p.is_file():
            raise FileNotFoundError(f"--calib-text {p} does not exist")
        text = p.read_text(encoding="utf-8")
    else:
        text = assets.wiki_text()[0]
    tok = load_tokenizer(source.path if source.kind == "gguf" else source.tokenizer_dir or model_path)
    return sample_windows(tokenize(tok, text), c.samples, seqlen, c.seed)

