"""A GGUF file's header (key/value metadata and tensor table) read in one pass.

The `gguf` package's GGUFReader builds a numpy view for every element of every array while it reads
the header: for a 151,936-token vocabulary (tokens, token types, merges) that takes ~9 s on a small
CPU, against ~0.3 s here. The package still does the rest (tensor types and their block sizes,
dequantization). Only the little-endian GGUF versions 2 and 3 (everything llama.cpp writes since
2023) are read.

Format: magic "GGUF", u32 version, u64 tensor count, u64 key/value count; each key/value: a string
key (u64 length + UTF-8), a u32 value type, the value (an array: u32 element type, u64 count, the
elements); each tensor: name, u32 dimension count, u64 dimensions (innermost first), u32 type, u64
offset into the data section, which starts at the next multiple of `general.alignment` (32 if not
given) after the table.
"""

from __future__ import annotations

import mmap
import os
import struct

import numpy as np

# value type -> (struct format, size); 8 is a string, 9 an array
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<?", 10: "<u8",
          11: "<i8", 12: "<f8"}


class GGUFHeaderError(ValueError):
    """The header cannot be read (damaged, truncated, or a version not read here)."""


class Field:
    """One metadata value; `contents()` as the `gguf` package's fields give it (str, int, float,
    bool, or a list of them)."""

    __slots__ = ("name", "value")

    def __init__(self, name: str, value):
        self.name, self.value = name, value

    def contents(self):
        return self.value


class TensorInfo:
    """One tensor's entry, with the attributes of the `gguf` package's ReaderTensor that we use."""

    __slots__ = ("name", "tensor_type", "shape", "n_elements", "n_bytes", "data_offset", "_file")

    def __init__(self, name, tensor_type, shape, n_elements, n_bytes, data_offset, file):
        self.name, self.tensor_type, self.shape = name, tensor_type, shape
        self.n_elements, self.n_bytes, self.data_offset, self._file = n_elements, n_bytes, data_offset, file

    @property
    def data(self) -> np.ndarray:
        """The tensor's bytes from a memory map, as the `gguf` package lays them out: float types as
        their values (outermost dimension first), quantized ones as rows of blocks (uint8); empty when
        the file ends before the tensor does."""
        from gguf import GGMLQuantizationType as Q

        size = os.path.getsize(self._file)
        if self.data_offset + self.n_bytes > size:
            return np.empty(0, dtype=np.uint8)
        raw = np.memmap(self._file, dtype=np.uint8, mode="r", offset=self.data_offset, shape=(self.n_bytes,))
        dims = tuple(int(d) for d in reversed(self.shape))
        floats = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8, Q.I16: np.int16,
                  Q.I32: np.int32, Q.I64: np.int64}
        if self.tensor_type in floats:
            return raw.view(floats[self.tensor_type]).reshape(dims)
        return raw.reshape(*dims[:-1], -1)


class HeaderReader:
    """`fields` (name -> Field) and `tensors` (TensorInfo, in file order) of a GGUF file."""

    def __init__(self, path: str):
        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            self._buf, self._pos = m, 0
            try:
                if self._take(4) != b"GGUF":
                    raise GGUFHeaderError("bad magic bytes")
                version = self._scalar(4)
                if version not in (2, 3):
                    raise GGUFHeaderError(f"GGUF version {version} (only versions 2 and 3 are read)")
                n_tensors, n_kv = self._scalar(10), self._scalar(10)
                self.fields = {}
                for _ in range(n_kv):
                    key = self._string()
                    self.fields[key] = Field(key, self._value(self._scalar(4)))
                entries = []
                for _ in range(n_tensors):
                    name = self._string()
                    dims = [self._scalar(10) for _ in range(self._scalar(4))]
                    entries.append((name, dims, self._scalar(4), self._scalar(10)))
                align = int(self.fields["general.alignment"].value) if "general.alignment" in self.fields else 32
                start = -(-self._pos // align) * align
            except (struct.error, IndexError, UnicodeDecodeError, OverflowError, MemoryError) as e:
                raise GGUFHeaderError(f"the header ends early or is damaged ({type(e).__name__})") from e
            finally:
                self._buf = None
        self.tensors = []
        for name, dims, type_id, offset in entries:
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError) as e:
                raise GGUFHeaderError(f"tensor {name}: unknown type {type_id}") from e
            n = int(np.prod(dims, dtype=np.int64)) if dims else 1
            self.tensors.append(TensorInfo(name, qtype, np.array(dims, dtype=np.uint64), n,
                                           n // block * type_size, start + offset, path))

    # ---- reading ---------------------------------------------------------------------------
    def _take(self, n: int) -> bytes:
        if self._pos + n > len(self._buf):
            raise IndexError("past the end of the file")
        b = self._buf[self._pos:self._pos + n]
        self._pos += n
        return b

    def _scalar(self, vtype: int):
        fmt, size = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, self._buf, self._pos)
        self._pos += size
        return v

    def _string(self) -> str:
        return self._take(self._scalar(10)).decode("utf-8")

    def _value(self, vtype: int):
        if vtype == 8:
            return self._string()
        if vtype == 9:
            etype, count = self._scalar(4), self._scalar(10)
            if etype in _NUMPY:
                dtype = np.dtype(_NUMPY[etype])
                arr = np.frombuffer(self._take(count * dtype.itemsize), dtype=dtype)
                return arr.tolist()
            return [self._value(etype) for _ in range(count)]
        if vtype not in _SCALARS:
            raise GGUFHeaderError(f"unknown value type {vtype}")
        return self._scalar(vtype)
