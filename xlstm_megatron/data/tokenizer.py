"""Tokenizers loaded from local files, behind one small interface, plus offline byte-level BPE training.

Interface (:class:`TextTokenizer`): ``encode(str) -> list[int]`` (plain text, no BOS/EOS added), ``decode(ids) -> str``,
``vocab_size`` (max token id + 1: the embedding rows the model needs), ``eod_id``. It also has the attributes
Megatron-Core's ``GPTDatasetConfig``/``GPTDataset`` read (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``,
``tokenize``/``detokenize``), so it can be passed to them directly.

Types (Megatron's ``--tokenizer-type`` names), all offline:

- ``HuggingFaceTokenizer``: a ``tokenizer.json`` file, or a directory holding one (HF ``tokenizers`` library).
- ``GPT2BPETokenizer``: GPT-2 style byte-level BPE from ``vocab.json`` + ``merges.txt``. (Megatron's own loader for
  this type asks the Hugging Face hub for the ``gpt2`` config, so it is not used.)
- ``SentencePieceTokenizer``: a ``.model`` file through Megatron-Core's SentencePiece wrapper; needs the optional
  ``sentencepiece`` package.
- ``NullTokenizer``: Megatron's synthetic tokenizer (text is space-separated ids; EOD = vocab_size - 1), for mock data.

:func:`train_bpe_tokenizer` writes a directory (``tokenizer.json``, ``tokenizer_config.json``,
``tokenizer_metadata.json``) that this module, ``transformers.AutoTokenizer`` and stock Megatron
(``--tokenizer-type HuggingFaceTokenizer --tokenizer-model DIR``) all load to the same ids.

Byte-level BPE is lossless: ``decode(encode(s)) == s`` for every string. Tokenizers with a normalizer (lower-casing,
NFKC, ...) or SentencePiece's whitespace handling need not be.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

from xlstm_megatron.data.errors import DataConfigError

EOD_TOKEN = "<|endoftext|>"
"""End-of-document token of the BPE tokenizers trained here (GPT-2's name for it)."""

# Tried in order when a tokenizer file does not say which token ends a document.
_EOD_CANDIDATES = (EOD_TOKEN, "<|end_of_text|>", "</s>", "<eos>")

TOKENIZER_TYPES = ("HuggingFaceTokenizer", "GPT2BPETokenizer", "SentencePieceTokenizer", "NullTokenizer")


class _Backend(Protocol):
    vocab_size: int
    eod_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything needed to load a tokenizer; small and picklable, so worker processes can rebuild it.

    Args:
        tokenizer_type: one of :data:`TOKENIZER_TYPES`.
        tokenizer_model: ``tokenizer.json`` file or its directory (HuggingFaceTokenizer), ``.model`` file
            (SentencePieceTokenizer).
        vocab_file, merge_file: GPT2BPETokenizer's ``vocab.json`` and ``merges.txt``.
        vocab_size: NullTokenizer's vocabulary size.
        eod_token: the end-of-document token's text, when the files do not say (HF / GPT-2 types).
    """

    tokenizer_type: str
    tokenizer_model: str | None = None
    vocab_file: str | None = None
    merge_file: str | None = None
    vocab_size: int | None = None
    eod_token: str | None = None

    def validate(self) -> None:
        """Raise :class:`DataConfigError` for a wrong type or a missing argument/file; reads no file contents."""
        t = self.tokenizer_type
        if t not in TOKENIZER_TYPES:
            raise DataConfigError(f"unknown tokenizer type {t!r}; use one of {', '.join(TOKENIZER_TYPES)}")
        required = {
            "HuggingFaceTokenizer": {"tokenizer_model": "--tokenizer-model (tokenizer.json or its directory)"},
            "GPT2BPETokenizer": {"vocab_file": "--vocab-file (vocab.json)", "merge_file": "--merge-file (merges.txt)"},
            "SentencePieceTokenizer": {"tokenizer_model": "--tokenizer-model (.model file)"},
            "NullTokenizer": {},
        }[t]
        for field_name, flag in required.items():
            value = getattr(self, field_name)
            if value is None:
                raise DataConfigError(f"{t} needs {flag}")
            if not Path(value).exists():
                raise DataConfigError(f"{t}: {flag.split()[0]} {value!r} does not exist; pass an existing path")
        if t == "HuggingFaceTokenizer":
            _hf_json_path(Path(self.tokenizer_model))
        if t == "NullTokenizer" and (self.vocab_size is None or self.vocab_size < 2):
            raise DataConfigError("NullTokenizer needs --vocab-size >= 2")

    def load(self) -> TextTokenizer:
        """Validate, then build the tokenizer."""
        self.validate()
        t = self.tokenizer_type
        if t == "HuggingFaceTokenizer":
            backend: _Backend = _hf_backend_from_json(Path(self.tokenizer_model), self.eod_token)
        elif t == "GPT2BPETokenizer":
            backend = _hf_backend_from_vocab_merges(Path(self.vocab_file), Path(self.merge_file), self.eod_token)
        elif t == "SentencePieceTokenizer":
            backend = _SentencePieceBackend(self.tokenizer_model)
        else:
            backend = _NullBackend(self.vocab_size)
        return TextTokenizer(backend, self)


def load_tokenizer(tokenizer_type: str, **kwargs) -> TextTokenizer:
    """Shorthand for ``TokenizerSpec(tokenizer_type, **kwargs).load()``."""
    return TokenizerSpec(tokenizer_type, **kwargs).load()


class TextTokenizer:
    """The common tokenizer interface (see module docstring). Build it with :func:`load_tokenizer`."""

    def __init__(self, backend: _Backend, spec: TokenizerSpec) -> None:
        self._backend = backend
        self.spec = spec

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        return self._backend.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; special tokens (such as EOD) are kept as their text."""
        return self._backend.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        """Max token id + 1: the number of embedding rows a model needs (before Megatron's padding)."""
        return self._backend.vocab_size

    @property
    def eod_id(self) -> int:
        """The id appended after each document."""
        return self._backend.eod_id

    # --- what Megatron-Core's datasets read ---------------------------------------------------------------------
    tokenize = encode
    detokenize = decode

    @property
    def eod(self) -> int:
        return self.eod_id

    @property
    def eos(self) -> int:
        return self.eod_id

    @property
    def pad(self) -> int:
        """-1: no pad token. It is Megatron's own sentinel, never a real id, so padding is masked unambiguously."""
        return -1

    @property
    def unique_identifiers(self) -> OrderedDict:
        """Stable description hashed into Megatron's dataset-index cache names."""
        ident = OrderedDict(cls=f"{type(self).__module__}.{type(self).__qualname__}")
        ident.update((k, v) for k, v in asdict(self.spec).items() if v is not None)
        ident["vocab_size"] = self.vocab_size
        ident["eod_id"] = self.eod_id
        return ident

    def __repr__(self) -> str:
        return f"TextTokenizer({self.spec.tokenizer_type}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"


def check_tokenizer_matches_model(tokenizer: TextTokenizer, model_vocab_size: int) -> None:
    """Raise :class:`DataConfigError` if the tokenizer can emit ids the model's embedding has no row for."""
    if tokenizer.vocab_size > model_vocab_size:
        raise DataConfigError(
            f"tokenizer vocab size {tokenizer.vocab_size} exceeds the model's vocab size {model_vocab_size}; "
            f"set the model's vocab size to at least {tokenizer.vocab_size} or use a smaller tokenizer"
        )


# --- HF `tokenizers` backend (tokenizer.json, GPT-2 vocab/merges, trained BPE) -----------------------------------


class _HFBackend:
    def __init__(self, tok, eod_token: str | None, source: str) -> None:
        self._tok = tok
        vocab = tok.get_vocab(with_added_tokens=True)
        self.vocab_size = max(vocab.values()) + 1
        self.eod_id = _resolve_eod(vocab, eod_token, source)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


def _hf_json_path(path: Path) -> Path:
    json_path = path / "tokenizer.json" if path.is_dir() else path
    if not json_path.is_file():
        raise DataConfigError(
            f"no tokenizer.json in {str(path)!r}; for GPT-2 vocab.json/merges.txt use "
            "--tokenizer-type GPT2BPETokenizer --vocab-file ... --merge-file ..."
        )
    return json_path


def _configured_eos(json_path: Path) -> str | None:
    """``eos_token`` of the ``tokenizer_config.json`` beside a ``tokenizer.json``, if any."""
    config = json_path.with_name("tokenizer_config.json")
    if not config.is_file():
        return None
    eos = json.loads(config.read_text(encoding="utf-8")).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos


def _resolve_eod(vocab: dict[str, int], eod_token: str | None, source: str) -> int:
    if eod_token is not None:
        if eod_token not in vocab:
            raise DataConfigError(f"EOD token {eod_token!r} is not in the vocabulary of {source}; pass one that is")
        return vocab[eod_token]
    for candidate in _EOD_CANDIDATES:
        if candidate in vocab:
            return vocab[candidate]
    raise DataConfigError(f"cannot tell the end-of-document token of {source}; pass it with --eod-token")


def _hf_backend_from_json(path: Path, eod_token: str | None) -> _HFBackend:
    from tokenizers import Tokenizer

    json_path = _hf_json_path(path)
    try:
        tok = Tokenizer.from_file(str(json_path))
    except Exception as e:  # the Rust error is multi-line; keep the first line
        raise DataConfigError(f"cannot read tokenizer {str(json_path)!r}: {str(e).splitlines()[0]}") from None
    return _HFBackend(tok, eod_token or _configured_eos(json_path), repr(str(json_path)))


def _byte_level_bpe(model):
    """GPT-2's pipeline around a BPE model: byte-level pre-tokenizer (with GPT-2's split regex) and decoder."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers

    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _hf_backend_from_vocab_merges(vocab_file: Path, merge_file: Path, eod_token: str | None) -> _HFBackend:
    from tokenizers import AddedToken
    from tokenizers.models import BPE

    try:
        tok = _byte_level_bpe(BPE.from_file(str(vocab_file), str(merge_file)))
    except Exception as e:
        raise DataConfigError(
            f"cannot read GPT-2 BPE files {str(vocab_file)!r} / {str(merge_file)!r}: {str(e).splitlines()[0]}"
        ) from None
    backend = _HFBackend(tok, eod_token, repr(str(vocab_file)))
    # As in GPT-2: the EOD text in a document maps to the EOD id instead of being split into byte pieces.
    eod_text = tok.id_to_token(backend.eod_id)
    tok.add_special_tokens([AddedToken(eod_text, special=True, normalized=False)])
    return backend


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path, *, overwrite: bool = False) -> Path:
    """Train a byte-level BPE (GPT-2 style, lossless) on ``texts`` offline and save it as a tokenizer directory.

    Id 0 is :data:`EOD_TOKEN`; ids 1..256 cover every byte, so any text encodes. Writes ``tokenizer.json``,
    ``tokenizer_config.json`` (for ``transformers.AutoTokenizer``) and ``tokenizer_metadata.json`` (for
    ``megatron.core.tokenizers.MegatronTokenizer.from_pretrained(dir)``).

    Args:
        texts: training documents (consumed once).
        vocab_size: vocabulary size including the EOD token, at least 257; a corpus too small to learn that many
            merges gives fewer (``TextTokenizer.vocab_size`` reports the actual size).
        out_dir: output directory; must not hold a ``tokenizer.json`` unless ``overwrite``.

    Returns:
        ``out_dir`` as a Path (load it with ``load_tokenizer("HuggingFaceTokenizer", tokenizer_model=str(out_dir))``).
    """
    from tokenizers import pre_tokenizers, trainers
    from tokenizers.models import BPE

    out_dir = Path(out_dir)
    check_bpe_training_args(vocab_size, out_dir, overwrite)
    tok = _byte_level_bpe(BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, whether seen or not
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOD_TOKEN, "model_max_length": 1 << 30}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    metadata = {"library": "huggingface", "class_name": None, "class_path": None, "model_type": "gpt"}
    (out_dir / "tokenizer_metadata.json").write_text(json.dumps(metadata, indent=2) + "\n", encoding="utf-8")
    # tokenizer.json last and atomically: its presence means the directory is complete.
    tmp = out_dir / "tokenizer.json.tmp"
    tok.save(str(tmp))
    tmp.replace(out_dir / "tokenizer.json")
    return out_dir


def check_bpe_training_args(vocab_size: int | None, out_dir: Path, overwrite: bool) -> None:
    """Raise :class:`DataConfigError` for a BPE training request that would fail or clobber a tokenizer."""
    if vocab_size is None or vocab_size < 257:
        raise DataConfigError(f"BPE training needs --vocab-size >= 257 (256 bytes + EOD), got {vocab_size}")
    if out_dir.exists() and not out_dir.is_dir():
        raise DataConfigError(f"tokenizer output {str(out_dir)!r} is a file; pass a directory")
    if (out_dir / "tokenizer.json").exists() and not overwrite:
        raise DataConfigError(f"{str(out_dir / 'tokenizer.json')!r} already exists; pass --overwrite to replace it")


# --- SentencePiece (Megatron-Core's wrapper) and Null backends ---------------------------------------------------


class _SentencePieceBackend:
    def __init__(self, model_path: str) -> None:
        try:
            import sentencepiece  # noqa: F401  (optional dependency; Megatron's wrapper imports it guarded)
        except ModuleNotFoundError:
            raise DataConfigError("SentencePieceTokenizer needs the sentencepiece package; pip install it") from None
        from megatron.core.tokenizers.text.libraries import SentencePieceTokenizer

        self._sp = SentencePieceTokenizer(model_path)
        self.vocab_size = int(self._sp.vocab_size)
        self.eod_id = int(self._sp.eos_id)
        if self.eod_id < 0:
            raise DataConfigError(f"SentencePiece model {model_path!r} has no EOS piece; train it with eos_id >= 0")

    def encode(self, text: str) -> list[int]:
        return list(self._sp.text_to_ids(text))

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.ids_to_text(list(ids))


class _NullBackend:
    """Megatron's NullTokenizer semantics: ``"5 7 9"`` <-> ``[5, 7, 9]``, EOD = vocab_size - 1."""

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = int(vocab_size)
        self.eod_id = self.vocab_size - 1

    def encode(self, text: str) -> list[int]:
        return [int(x) for x in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        return " ".join(str(i) for i in ids)
