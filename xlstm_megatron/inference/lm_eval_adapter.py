"""An lm-evaluation-harness (`lm_eval`) model for checkpoints of ours, registered as "xlstm-megatron".

    lm = XLSTMMegatronLM(load="runs/demo")             # or: simple_evaluate(model="xlstm-megatron",
    lm_eval.simple_evaluate(model=lm, tasks=[...])     #         model_args="load=runs/demo", ...)

The checkpoint is loaded with `inference.loading` (TP 1, PP 1: one process; dist checkpoints reshard) and its
tokenizer is the one the run trained with (or `tokenizer_model=...`). Model args (`--model_args k=v,...`):

- `load` (required), `iteration`: the checkpoint, as for `xlstm-megatron generate`.
- `batch_size`: sequences per forward. Scoring pads on the right: a causal (recurrent) model's logits at the real
  positions do not depend on what follows them.
- `max_length`: the context window (default: the run's `--seq-length`). Longer inputs keep their last `max_length`
  tokens, as lm_eval's Hugging Face model does.
- `rolling`: how `loglikelihood_rolling` scores a document longer than `max_length`.
  `windows` (default, lm_eval's definition, comparable with other models): disjoint windows of predicted tokens,
  each with as much preceding context as fits in `max_length`. `state` (recurrent patterns only): one pass over
  the document in chunks of `max_length` tokens, carrying the recurrent state, so every token is conditioned on the
  whole document before it (each token is read once).
- `seed`: seed of sampled generation.

Log-probabilities are normalised over the model's whole (padded) vocabulary, as the training loss is; "greedy" and
generation consider only the tokenizer's ids, as `generate` does. `generate_until` decodes with the constant-memory
recurrent `generate` (recurrent patterns only) and stops at the end-of-document token, after `max_gen_toks` tokens,
or at the first stop string (the text is cut before it). Stop strings are checked between rounds of 16, 32, 64, ...
new tokens: each round re-prefills prompt + tokens so far, so a stopped row does not decode up to `max_gen_toks`.

The module imports without `lm_eval` (an optional dependency: `pip install 'xlstm-megatron[eval]'`); the class
then still works on request objects that have lm_eval's `.args` tuple.
"""

from __future__ import annotations

import os
import socket
from argparse import Namespace
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from xlstm_megatron.runs.errors import ConfigError

try:
    from lm_eval.api.model import LM as _LMBase
    from lm_eval.api.registry import register_model
except ImportError:  # optional dependency: the adapter still works on plain request objects
    _LMBase = object  # type: ignore[assignment,misc]
    register_model = None

MODEL_NAME = "xlstm-megatron"
ROLLING_MODES = ("windows", "state")
FIRST_ROUND = 16  # new tokens in the first generation round (see the module docstring)

Pair = tuple[list[int], list[int]]  # (context ids, continuation ids)


def rolling_windows(tokens: Sequence[int], prefix: int, max_length: int) -> list[Pair]:
    """lm_eval's rolling windows (`get_rolling_token_windows` with context_len 1, made disjoint): each token is
    predicted once; a window predicts up to `max_length` tokens from at most `max_length` inputs, the first of
    which is `prefix` at the document start."""
    seq = [prefix, *tokens]  # tokens[i] = seq[i + 1] is predicted from seq[: i + 1]
    pairs, done = [], 0
    while done < len(tokens):
        end = min(done + max_length, len(tokens))
        pairs.append((seq[max(0, end - max_length) : done + 1], seq[done + 1 : end + 1]))
        done = end
    return pairs


def _ensure_parallel(seed: int) -> None:
    """Megatron's parallel state at TP 1 / PP 1 in this one process (lm_eval's own CLI starts none)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from xlstm_megatron.runs.launch import init_parallel, launch_env

    if dist.is_initialized() and ps.model_parallel_is_initialized():
        if ps.get_tensor_model_parallel_world_size() != 1 or ps.get_pipeline_model_parallel_world_size() != 1:
            raise ConfigError("the lm-eval model runs at TP=1, PP=1; initialise Megatron's parallel state so")
        return
    if launch_env().world_size > 1:
        raise ConfigError("the lm-eval model runs in one process; start it without torchrun/srun")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        os.environ.setdefault(key, "0" if "RANK" in key else "1")
    init_parallel(1, 1, seed=seed)


def _cut_at_stop(text: str, until: Sequence[str]) -> str:
    cuts = [i for i in (text.find(s) for s in until if s) if i >= 0]
    return text[: min(cuts)] if cuts else text


class XLSTMMegatronLM(_LMBase):
    """lm_eval's three request types on a checkpoint of ours (see the module docstring)."""

    def __init__(
        self,
        load: str,
        iteration: int | None = None,
        batch_size: int | str | None = 1,
        max_length: int | None = None,
        rolling: str = "windows",
        seed: int = 1234,
        tokenizer_model: str | None = None,
        tokenizer_type: str = "HuggingFaceTokenizer",
        **_lm_eval_extras: Any,  # max_batch_size, device: lm_eval passes them to every model
    ) -> None:
        from xlstm_megatron.data.tokenizer import check_tokenizer_matches_model
        from xlstm_megatron.inference.cli import _tokenizer_spec
        from xlstm_megatron.inference.generate import check_generation_support
        from xlstm_megatron.inference.loading import load_model, resolve_checkpoint
        from xlstm_megatron.runs.checkpoint import saved_args
        from xlstm_megatron.runs.model import xlstm_config_from_args

        super().__init__()
        if rolling not in ROLLING_MODES:
            raise ConfigError(f"rolling={rolling!r}; use one of {', '.join(ROLLING_MODES)}")
        if str(batch_size).startswith("auto"):
            raise ConfigError("batch_size=auto is not supported; pass a number")
        self.batch_size = int(batch_size or 1)
        self.rolling, self.seed = rolling, int(seed)
        source = resolve_checkpoint(load, None if iteration is None else int(iteration), tensor_parallel=1)
        if rolling == "state":
            check_generation_support(xlstm_config_from_args(source.args))
        self.max_length = int(max_length or source.args.seq_length)
        if self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("batch_size and max_length must be >= 1")
        flags = Namespace(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model, vocab_file=None,
                          merge_file=None, eod_token=None)
        self.tokenizer = _tokenizer_spec(flags, saved_args(source.path)).load()  # the one `generate` uses
        check_tokenizer_matches_model(self.tokenizer, source.vocab_size)
        _ensure_parallel(self.seed)
        self.model = load_model(source)
        self._device = next(self.model.parameters()).device

    @property
    def eod(self) -> int:
        return self.tokenizer.eod_id

    # --- scoring ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def _logits(self, tokens: Tensor, context: Any = None) -> Tensor:
        """fp32 logits (B, S, V) of a (B, S) batch (a full forward, or continuing a recurrent `context`)."""
        logits = self.model(tokens.to(self._device), None, None, inference_context=context,
                            runtime_gather_output=True)
        if context is not None:
            context.increment_sequence_len_offset(tokens.shape[1])
        return logits.float()

    def _score(self, pairs: Sequence[Pair]) -> list[tuple[float, bool]]:
        """(sum of continuation log-probs, whether greedy decoding yields the continuation) per pair; batched by
        length (longest first), right-padded."""
        rows = []
        for context, continuation in pairs:
            whole = (context + continuation)[-(self.max_length + 1) :]
            rows.append((whole[:-1], whole[-min(len(continuation), self.max_length) :] if continuation else []))
        results: list[tuple[float, bool]] = [(0.0, True)] * len(rows)
        order = sorted((i for i, (_, target) in enumerate(rows) if target), key=lambda i: -len(rows[i][0]))
        vocab = self.tokenizer.vocab_size
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            width = len(rows[batch[0]][0])
            tokens = torch.full((len(batch), width), self.eod, dtype=torch.long)
            for b, i in enumerate(batch):
                tokens[b, : len(rows[i][0])] = torch.tensor(rows[i][0])
            logits = self._logits(tokens)  # stays on the device: only the sums come back
            for b, i in enumerate(batch):
                inputs, target = rows[i]
                step = logits[b, len(inputs) - len(target) : len(inputs)]
                target_t = torch.tensor(target, device=step.device)
                logprob = F.log_softmax(step, dim=-1).gather(-1, target_t[:, None]).sum().item()
                results[i] = (logprob, bool((step[:, :vocab].argmax(-1) == target_t).all()))
        return results

    def _encode_pair(self, context: str, continuation: str) -> Pair:
        """lm_eval's split: trailing spaces of the context go to the continuation; the pair is encoded as one text so
        the continuation's ids are those the whole text tokenizes to. An empty context is the end-of-document id."""
        if not context:
            return [self.eod], self.tokenizer.encode(continuation)
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        if not context:  # the context was only whitespace
            return [self.eod], self.tokenizer.encode(continuation)
        whole, head = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
        return head, whole[len(head) :]

    def loglikelihood(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """Per request `.args == (context, continuation)`: (log P(continuation | context), is greedy)."""
        return self._score([self._encode_pair(*r.args) for r in requests])

    def loglikelihood_rolling(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[float]:
        """Per request `.args == (text,)`: log P(text | end-of-document), windowed or stateful (see `rolling`)."""
        docs = [self.tokenizer.encode(r.args[0]) for r in requests]
        if self.rolling == "state":
            return [self._stateful_logprob(doc) for doc in docs]
        windows = [rolling_windows(doc, self.eod, self.max_length) for doc in docs]
        scores = iter(self._score([w for doc_windows in windows for w in doc_windows]))
        return [sum(next(scores)[0] for _ in doc_windows) for doc_windows in windows]

    def _stateful_logprob(self, doc: list[int]) -> float:
        from xlstm_megatron.layers.recurrent_context import RecurrentInferenceContext

        seq = torch.tensor([[self.eod, *doc]])
        context, total = RecurrentInferenceContext(), 0.0
        for start in range(0, len(doc), self.max_length):
            logits = self._logits(seq[:, start : min(start + self.max_length, len(doc))], context)[0]
            target = seq[0, start + 1 : start + 1 + logits.shape[0]].to(logits.device)
            total += F.log_softmax(logits, dim=-1).gather(-1, target[:, None]).sum().item()
        return total

    # --- generation ------------------------------------------------------------------------------------------------

    def generate_until(self, requests: Sequence[Any], disable_tqdm: bool = False) -> list[str]:
        """Per request `.args == (context, gen_kwargs)`: the continuation, cut before the first `until` string.
        gen_kwargs: until (str or list), max_gen_toks (256), do_sample, temperature, top_k, top_p."""
        results: list[str] = [""] * len(requests)
        groups: dict[str, list[int]] = {}  # requests with the same generation settings share batches
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        for indices in groups.values():
            kwargs = dict(requests[indices[0]].args[1])
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                texts = self._generate([requests[i].args[0] for i in batch], kwargs)
                for i, text in zip(batch, texts, strict=True):
                    results[i] = text
        return results

    def _generate(self, contexts: Sequence[str], kwargs: dict[str, Any]) -> list[str]:
        from xlstm_megatron.inference.generate import generate

        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = int(kwargs.get("max_gen_toks", 256))
        do_sample = bool(kwargs.get("do_sample", float(kwargs.get("temperature", 0.0)) > 0))
        sampling = dict(temperature=float(kwargs.get("temperature", 1.0)) if do_sample else 0.0,
                        top_k=int(kwargs.get("top_k") or 0), top_p=float(kwargs.get("top_p") or 1.0))
        prompts = [(self.tokenizer.encode(c) or [self.eod])[-self.max_length :] for c in contexts]
        new: list[list[int]] = [[] for _ in contexts]
        texts = [""] * len(contexts)
        active, size, round_ = list(range(len(contexts))), FIRST_ROUND, 0
        while active and max_gen > 0:
            count = min(size, max_gen - len(new[active[0]]))  # active rows have equally many new tokens
            out = generate(self.model, [prompts[i] + new[i] for i in active], count, stop_tokens=[self.eod],
                           seed=self.seed + round_, vocab_limit=self.tokenizer.vocab_size,
                           prefill_chunk_size=self.max_length, **sampling)
            still = []
            for i, tokens in zip(active, out.tokens, strict=True):
                new[i] += tokens
                ended = bool(tokens) and tokens[-1] == self.eod
                text = self.tokenizer.decode(new[i][:-1] if ended else new[i])
                texts[i] = _cut_at_stop(text, until)
                if not (ended or len(new[i]) >= max_gen or texts[i] != text):
                    still.append(i)
            active, size, round_ = still, size * 2, round_ + 1
        return texts


if register_model is not None:
    register_model(MODEL_NAME)(XLSTMMegatronLM)
