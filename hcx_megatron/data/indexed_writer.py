"""Writer of megatron-core's indexed dataset format (`.bin/.idx`) with numpy only (no torch import).

Byte-identical to `megatron.core.datasets.indexed_dataset.IndexedDatasetBuilder` (0.16.1) for
`add_document(ids, [len(ids)])` + `finalize` with multimodal=False — tests/test_preprocess.py writes the same
documents with both and compares the files.  The format (`_IndexWriter`):

  .bin  the documents' ids, concatenated, in the dataset dtype
  .idx  b"MMIDIDX\\x00\\x00", <Q 1 (version), <B dtype code, <Q sequence count, <Q document count,
        int32 sequence lengths, int64 sequence byte offsets, int64 document indices (starting with 0)

Preprocessing uses it so that the CLI never imports torch (~5-20 s of start-up on a loaded machine);
merging and reading still go through megatron-core.
"""

from __future__ import annotations

import struct
from typing import Sequence

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
# megatron.core.datasets.indexed_dataset.DType
DTYPE_CODES = {np.dtype(n): c for n, c in (("uint8", 1), ("int8", 2), ("int16", 3), ("int32", 4), ("int64", 5),
                                            ("float64", 6), ("float32", 7), ("uint16", 8))}


def optimal_dtype(cardinality: int | None) -> type:
    """megatron-core's DType.optimal_dtype: uint16 below 65,500 ids, else int32."""
    return np.uint16 if cardinality is not None and cardinality < 65500 else np.int32


class IndexedDatasetWriter:
    def __init__(self, bin_path: str, dtype=np.int32):
        self.dtype = np.dtype(dtype)
        if self.dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {self.dtype} has no megatron-core DType code")
        self.data_file = open(bin_path, "wb", buffering=1 << 20)
        self.sequence_lengths: list[int] = []
        self.document_indices: list[int] = [0]

    def add_document(self, ids, lengths: Sequence[int]) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.data_file.write(arr.tobytes(order="C"))
        self.sequence_lengths.extend(lengths)
        self.document_indices.append(len(self.sequence_lengths))

    def finalize(self, idx_path: str) -> None:
        self.data_file.close()
        lengths = np.asarray(self.sequence_lengths, dtype=np.int64)
        pointers = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1] * self.dtype.itemsize, out=pointers[1:])
        with open(idx_path, "wb") as f:
            f.write(INDEX_HEADER)
            f.write(struct.pack("<Q", 1))
            f.write(struct.pack("<B", DTYPE_CODES[self.dtype]))
            f.write(struct.pack("<Q", len(lengths)))
            f.write(struct.pack("<Q", len(self.document_indices)))
            f.write(lengths.astype(np.int32).tobytes(order="C"))
            f.write(pointers.tobytes(order="C"))
            f.write(np.asarray(self.document_indices, dtype=np.int64).tobytes(order="C"))

    def close(self) -> None:
        self.data_file.close()
