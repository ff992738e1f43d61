"""Text generation from an onnxruntime-genai model folder (model.onnx + data, genai_config.json, tokenizer
files, chat template, and ``libqcompile_ops.so`` when the graph uses ``qcompile.*`` ops).

    import qcompile
    result = qcompile.generate("out/", "The capital of France is", max_new_tokens=32)
    print(result.text, result.prefill_tokens_per_s, result.decode_tokens_per_s)

    stream = qcompile.generate_stream("out/", "Once upon a time")
    for piece in stream:            # text pieces as the tokens come
        print(piece, end="", flush=True)
    print(stream.result.speed_line())

Greedy decoding is the default (``temperature=0``): the same prompt always gives the same text, which is
what a quantized model is compared by. ``temperature > 0`` samples, limited by ``top_p`` and ``top_k``
(``top_k=0``: no limit), from ``seed`` when one is given.

Timing: prefill = prompt tokens / time to the first new token (the prompt's forward pass plus picking
that token); decode = the new tokens after the first / the time they took (one forward pass each). Time
the caller spends between streamed pieces is not counted.

This module is not named ``generate.py``: importing a submodule binds its name on the package, which
would replace the ``qcompile.generate`` function with the module.
"""
from __future__ import annotations

import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from qcompile.errors import QCompileError

GENAI_CONFIG = "genai_config.json"


def _og() -> Any:
    try:
        import onnxruntime_genai as og
    except ImportError as e:
        raise QCompileError(f"generation needs onnxruntime-genai ({e}); install it with "
                            "`pip install 'onnxruntime-genai>=0.18'`") from None
    return og


# ---- options ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class GenerationOptions:
    """How to pick new tokens. ``temperature=0`` is greedy (``top_p``, ``top_k`` and ``seed`` are unused)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise QCompileError(f"max-new-tokens must be a whole number of at least 1 (got {self.max_new_tokens})")
        if not self.temperature >= 0 or math.isinf(self.temperature):  # also rejects NaN
            raise QCompileError(f"temperature must be 0 (greedy) or more (got {self.temperature})")
        if not 0 < self.top_p <= 1:
            raise QCompileError(f"top-p must be in (0, 1] (got {self.top_p})")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise QCompileError(f"top-k must be a whole number, 0 (no limit) or more (got {self.top_k})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def search_options(self, prompt_tokens: int, context_length: int, *, force_length: bool = False) -> dict[str, Any]:
        """Keyword arguments for ``og.GeneratorParams.set_search_options``. ``force_length`` suppresses the
        end-of-sequence token so exactly ``max_new_tokens`` come (benchmarks compare equal lengths)."""
        max_length = min(prompt_tokens + self.max_new_tokens, context_length)
        opts: dict[str, Any] = {"max_length": max_length, "do_sample": not self.greedy}
        if force_length:
            opts["min_length"] = max_length
        if not self.greedy:
            opts.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
            if self.seed is not None:
                opts["random_seed"] = int(self.seed)
        return opts


# ---- the model folder ------------------------------------------------------------------------------------


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
        return True
    except ValueError:
        return False


def _library_hint() -> str:
    from qcompile.runtime import OpsLibraryNotFoundError, ops_library_path

    try:
        return f"copy it from {ops_library_path()}"
    except OpsLibraryNotFoundError:
        return "copy it from a qcompile build (tools/build_ops.sh or pip install .)"


def check_folder(folder: str | Path) -> dict[str, Any]:
    """The folder's ``genai_config.json`` after checking that genai can load what it names, so that a broken
    folder fails with one line saying what is missing instead of a runtime error from deep inside genai."""
    folder = Path(folder)
    if not folder.exists():
        raise QCompileError(f"{folder}: no such folder")
    if not folder.is_dir():
        raise QCompileError(f"{folder} is not a folder (expected an onnxruntime-genai model folder)")
    cfg_path = folder / GENAI_CONFIG
    if not cfg_path.is_file():
        raise QCompileError(f"{folder} is not an onnxruntime-genai model folder (no {GENAI_CONFIG})")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
        decoder = config["model"]["decoder"]
        onnx_name = decoder.get("filename", "model.onnx")
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise QCompileError(f"{cfg_path} is not a valid genai config ({type(e).__name__}: {e})") from None
    onnx_path = folder / onnx_name
    if not onnx_path.is_file():
        raise QCompileError(f"{folder}: {GENAI_CONFIG} names {onnx_name}, which is missing")
    from qcompile.runtime import LIBRARY_NAME, needs_ops_library

    lib = (decoder.get("session_options") or {}).get("custom_ops_library")
    try:
        needs = needs_ops_library(onnx_path)
    except Exception as e:  # a truncated or foreign file: say so here rather than inside genai
        raise QCompileError(f"{onnx_path} is not a readable ONNX model ({type(e).__name__})") from None
    if needs and not lib:
        raise QCompileError(f"the folder uses qcompile ops but {GENAI_CONFIG} names no custom_ops_library; "
                            f"recompile it, or {_library_hint()} into {folder} and add "
                            f"\"custom_ops_library\": \"{LIBRARY_NAME}\" to model.decoder.session_options")
    if lib:
        lib_path = folder / lib
        if Path(lib).is_absolute() or not _inside(lib_path, folder):
            raise QCompileError(f"{cfg_path}: custom_ops_library {lib!r} must be a path inside the model folder")
        if not lib_path.is_file():
            raise QCompileError(f"the folder uses qcompile ops but {lib} is missing; recompile or "
                                f"{_library_hint()} to {lib_path}")
    return config


class GenaiModel:
    """A loaded model folder: the genai model and tokenizer, reused across prompts (loading takes seconds)."""

    def __init__(self, folder: str | Path, *, threads: int | None = None):
        self.folder = Path(folder)
        self.config = check_folder(self.folder)
        og = _og()
        try:
            cfg = og.Config(str(self.folder))
            if threads is not None:
                if threads < 1:
                    raise QCompileError(f"threads must be at least 1 (got {threads})")
                cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
            self.model = og.Model(cfg)
            self.tokenizer = og.Tokenizer(self.model)
        except RuntimeError as e:
            raise QCompileError(f"{self.folder}: onnxruntime-genai cannot load the model: {e}") from None
        self.context_length = int(self.config["model"].get("context_length")
                                  or self.config.get("search", {}).get("max_length") or 2048)
        self.eos_token_ids = {int(t) for t in self.tokenizer.eos_token_ids}

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` as genai's tokenizer makes them (no chat template)."""
        return [int(t) for t in self.tokenizer.encode(text)]

    def chat_prompt(self, messages: Sequence[dict[str, str]]) -> str:
        """``messages`` ([{"role": ..., "content": ...}]) rendered with the folder's chat template, ready for
        the assistant's reply."""
        try:
            return self.tokenizer.apply_chat_template(json.dumps(list(messages)), add_generation_prompt=True)
        except RuntimeError as e:
            if "empty chat template" in str(e).lower():
                raise QCompileError(f"{self.folder} has no chat template (chat_template.jinja, or chat_template in "
                                    "tokenizer_config.json); use --prompt") from None
            raise QCompileError(f"{self.folder}: the chat template failed: {e}") from None

    def prompt_ids(self, prompt: str | Sequence[int]) -> list[int]:
        """Token ids of a prompt (text or ids), checked to be non-empty and to leave room for one new token."""
        if isinstance(prompt, str):
            if not prompt.strip():
                raise QCompileError("the prompt is empty")
            ids = self.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise QCompileError("the prompt is empty")
        if len(ids) >= self.context_length:
            raise QCompileError(f"the prompt has {len(ids)} tokens but the model's context holds "
                                f"{self.context_length}, and at least one new token must fit")
        return ids

    def stream(self, prompt: str | Sequence[int], options: GenerationOptions | None = None, *,
               force_length: bool = False) -> "GenerationStream":
        """A :class:`GenerationStream` for ``prompt`` (text, or token ids to skip the tokenizer)."""
        return GenerationStream(self, self.prompt_ids(prompt), options or GenerationOptions(),
                                force_length=force_length)


# ---- one generation --------------------------------------------------------------------------------------


@dataclasses.dataclass
class GenerationResult:
    """What came out, and how fast. ``token_ids`` are the new tokens (an end-of-sequence token included)."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    first_token_s: float
    decode_s: float
    finish_reason: str  # "eos", "length" (max_new_tokens) or "context" (the model's context is full)

    @property
    def new_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.first_token_s if self.first_token_s > 0 else math.inf

    @property
    def decode_tokens_per_s(self) -> float | None:
        """None when only one token came (there is no decode step to time)."""
        n = self.new_tokens - 1
        if n < 1:
            return None
        return n / self.decode_s if self.decode_s > 0 else math.inf

    def speed_line(self) -> str:
        decode = self.decode_tokens_per_s
        d = f"{decode:.1f} tokens/s ({self.new_tokens - 1} tokens)" if decode is not None else "n/a (1 token)"
        return (f"prefill {self.prefill_tokens_per_s:.1f} tokens/s ({self.prompt_tokens} tokens, first token after "
                f"{1000 * self.first_token_s:.0f} ms), decode {d}")

    def __str__(self) -> str:
        return self.text


class GenerationStream:
    """Iterate for the text pieces as tokens come; ``result`` holds the whole generation once it ends."""

    def __init__(self, model: GenaiModel, prompt_ids: list[int], options: GenerationOptions, *,
                 force_length: bool = False):
        self.model = model
        self.prompt_ids = prompt_ids
        self.options = options
        self.force_length = force_length
        self.result: GenerationResult | None = None

    def __iter__(self) -> Iterator[str]:
        og = _og()
        m = self.model
        params = og.GeneratorParams(m.model)
        search = self.options.search_options(len(self.prompt_ids), m.context_length, force_length=self.force_length)
        params.set_search_options(**search)
        gen = og.Generator(m.model, params)
        decoder = m.tokenizer.create_stream()
        tokens: list[int] = []
        pieces: list[str] = []
        paused = 0.0  # time the consumer held us between pieces
        t0 = time.perf_counter()
        t_first = t0
        gen.append_tokens(self.prompt_ids)  # the prompt's forward pass
        while not gen.is_done():
            gen.generate_next_token()  # picks a token (and, after the first, runs the previous one forward)
            token = int(gen.get_next_tokens()[0])
            if not tokens:
                t_first = time.perf_counter()
            tokens.append(token)
            if token in m.eos_token_ids:
                continue
            piece = decoder.decode(token)
            if piece:
                pieces.append(piece)
                t_yield = time.perf_counter()
                yield piece
                paused += time.perf_counter() - t_yield
        t_end = time.perf_counter()
        if tokens and tokens[-1] in m.eos_token_ids:
            reason = "eos"
        elif len(tokens) >= self.options.max_new_tokens:
            reason = "length"
        else:
            reason = "context"
        self.result = GenerationResult(text="".join(pieces), token_ids=tokens, prompt_tokens=len(self.prompt_ids),
                                       first_token_s=t_first - t0, decode_s=t_end - t_first - paused,
                                       finish_reason=reason)

    def run(self) -> GenerationResult:
        """Consume the whole stream and return its result."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result


# ---- the API ---------------------------------------------------------------------------------------------


def _model(folder: str | Path | GenaiModel, threads: int | None) -> GenaiModel:
    return folder if isinstance(folder, GenaiModel) else GenaiModel(folder, threads=threads)


def generate_stream(folder: str | Path | GenaiModel, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
                    temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
                    threads: int | None = None) -> GenerationStream:
    """A stream of the continuation of ``prompt`` from the model folder ``folder`` (or a loaded
    :class:`GenaiModel`, to reuse it): iterate it for text pieces, then read ``.result``."""
    options = GenerationOptions(max_new_tokens, temperature, top_p, top_k, seed)
    return _model(folder, threads).stream(prompt, options)


def generate(folder: str | Path | GenaiModel, prompt: str | Sequence[int], *, max_new_tokens: int = 256,
             temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             threads: int | None = None, on_text: Callable[[str], None] | None = None) -> GenerationResult:
    """The continuation of ``prompt`` (``.text``) with its token ids and speeds; ``on_text`` is called with
    each piece of text as it comes. Greedy unless ``temperature > 0``."""
    stream = generate_stream(folder, prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                             top_k=top_k, seed=seed, threads=threads)
    for piece in stream:
        if on_text is not None:
            on_text(piece)
    assert stream.result is not None
    return stream.result


def fit_conversation(model: GenaiModel, messages: list[dict[str, str]], room: int) -> list[int]:
    """Token ids of the conversation rendered by the chat template, dropping its oldest messages (system
    messages stay, and so does the newest) until ``room`` tokens of the context stay free for the reply."""
    while True:
        ids = model.encode(model.chat_prompt(messages))
        droppable = [i for i, m in enumerate(messages[:-1]) if m.get("role") != "system"]
        if len(ids) + room <= model.context_length or not droppable:
            return ids
        del messages[droppable[0]]


# ---- command line ----------------------------------------------------------------------------------------


def _write(text: str) -> None:
    import sys

    sys.stdout.write(text)
    sys.stdout.flush()


def _reply(stream: GenerationStream) -> tuple[str, bool]:
    """Stream one reply to stdout and its speed line to stderr: ``(text, finished)``; Ctrl-C stops the reply
    and keeps what came."""
    import sys

    pieces: list[str] = []
    try:
        for piece in stream:
            pieces.append(piece)
            _write(piece)
    except KeyboardInterrupt:
        _write("\n")
        print("[stopped]", file=sys.stderr)
        return "".join(pieces), False
    _write("\n")
    assert stream.result is not None
    print(stream.result.speed_line(), file=sys.stderr, flush=True)
    return stream.result.text, True


def _chat(model: GenaiModel, options: GenerationOptions, system: str | None) -> int:
    """Read a line, reply, repeat. Each turn runs the whole conversation through a fresh generator: simple,
    and exactly what the template renders; its prefill line shows that cost as the conversation grows."""
    import sys

    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    model.chat_prompt(messages + [{"role": "user", "content": "hi"}])  # no template: fail before the first turn
    tty = sys.stdin.isatty()
    if tty:
        print(f"chatting with {model.folder} (Ctrl-D or Ctrl-C at the prompt quits)", file=sys.stderr)
    while True:
        try:
            line = input("> ") if tty else sys.stdin.readline()
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt
            _write("\n")
            return 0
        if not tty and not line:  # end of piped input (from a terminal, "" is an empty line)
            return 0
        if not line.strip():
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        room = min(options.max_new_tokens, model.context_length // 2)
        try:
            stream = model.stream(fit_conversation(model, messages, room), options)
        except QCompileError as e:
            print(f"qcompile: error: {e}", file=sys.stderr)
            messages.pop()
            continue
        messages.append({"role": "assistant", "content": _reply(stream)[0]})


def cli_generate(args: Any) -> int:
    """``qcompile generate OUT (--prompt TEXT | --chat)``: options are checked before the model loads."""
    options = GenerationOptions(args.max_new_tokens, args.temperature, args.top_p, args.top_k, args.seed)
    if args.prompt is not None and not args.prompt.strip():
        raise QCompileError("the prompt is empty")
    model = GenaiModel(args.folder, threads=args.threads)
    if args.chat:
        return _chat(model, options, args.system)
    _text, finished = _reply(model.stream(args.prompt, options))
    return 0 if finished else 130
