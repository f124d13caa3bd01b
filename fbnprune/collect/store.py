"""The activation store: a tokens x neurons matrix on disk, chunked, in reduced precision.

A zarr (v3) group, ``activations.zarr/``::

    layer_000, layer_001, ...   one array per layer, shape (n_tokens, width), chunks of
                                (chunk_tokens, width): tokens x one layer
    sample_index                int32 (n_tokens,): which sample each row came from
    attrs                       format, dtype, site, layer_widths, tokens_per_second, clipped

Values are stored uncompressed (zstd saves ~9% on float16 activations, whose mantissas are
noise, and makes every read of the matrix ~3x slower; discovery reads it a dozen times) as
float16 (default; 2 bytes a value), bfloat16 (its bit pattern in uint16:
the top half of the float32, rounded to nearest even; float32's range, 3 significant digits)
or float32. Readers always return float32. float16 saturates at +-65504: larger values are
clipped (counted in ``attrs["clipped"]``) rather than stored as infinities that would poison
the PCA.

Rows are in the order they were written (collection order: samples of similar length
together), not necessarily sample order; ``sample_index`` says which sample each row came
from, and nothing downstream depends on the order of rows.

``StoreWriter`` fills the store batch by batch (``append``: whole rows, all layers, buffered
until a chunk of rows is complete, so every chunk is written once) or layer by layer
(``append_layer``: one layer's rows after another's, buffered the same way; ``write_layer``:
one layer's values for a range of rows). ``ActivationStore`` reads it back
as numpy (whole or one layer at a time) or as a lazy ``dask.array``. (This module needs
neither torch nor transformers: ``fbnprune.collect.to_store`` holds the ``Activations`` face.)
"""

from __future__ import annotations

import functools
import logging
import shutil
from pathlib import Path
from typing import Any, Literal

import numpy as np

from fbnprune.errors import FbnpruneError
from fbnprune.rundir.layout import ACTIVATIONS_STORE

logger = logging.getLogger(__name__)

StoreDtype = Literal["float16", "bfloat16", "float32"]
FORMAT = "fbnprune-activations/1"
STORE_NAME = ACTIVATIONS_STORE  # the store's folder name in a run directory
# what one chunk of the widest layer holds (stored bytes), and the writer's row buffer
CHUNK_BYTES = 16 * 2**20
BUFFER_BYTES = 256 * 2**20
_STORED = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
_FLOAT16_MAX = float(np.finfo(np.float16).max)


class StoreError(FbnpruneError, ValueError):
    """A store that cannot be written or read as asked."""


def encode(values: np.ndarray, dtype: StoreDtype) -> tuple[np.ndarray, int]:
    """``values`` in the stored representation, and how many were clipped to float16's range."""
    values = np.asarray(values, dtype=np.float32)
    if dtype == "float32":
        return values, 0
    if dtype == "float16":
        over = np.abs(values) > _FLOAT16_MAX
        clipped = int(np.count_nonzero(over))
        if clipped:
            values = np.clip(values, -_FLOAT16_MAX, _FLOAT16_MAX)
        return values.astype(np.float16), clipped
    bits = np.ascontiguousarray(values).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16), 0


def decode(stored: np.ndarray, dtype: StoreDtype) -> np.ndarray:
    """Stored values back as float32."""
    if dtype == "bfloat16":
        return (np.asarray(stored, dtype=np.uint16).astype(np.uint32) << np.uint32(16)).view(
            np.float32
        )
    return np.asarray(stored, dtype=np.float32)


def default_chunk_tokens(layer_widths: list[int], dtype: StoreDtype) -> int:
    """Rows per chunk: about ``CHUNK_BYTES`` for the widest layer, and the writer's buffer of
    one chunk of rows over all layers (float32) within ``BUFFER_BYTES``."""
    itemsize = np.dtype(_STORED[dtype]).itemsize
    by_chunk = CHUNK_BYTES // (max(layer_widths) * itemsize)
    by_buffer = BUFFER_BYTES // (sum(layer_widths) * 4)
    return max(16, min(by_chunk, by_buffer))


class StoreWriter:
    """Writes an activation store at ``path``, atomically: into ``.NAME.tmp`` first, renamed
    to ``path`` by ``commit``; leaving the ``with`` block without a commit removes it.

    Args:
        path: the store folder (by convention ``.../activations.zarr``).
        n_tokens: rows of the matrix.
        layer_widths: neurons per layer.
        site: ``hidden`` or ``output`` (recorded).
        dtype: stored precision.
        chunk_tokens: rows per chunk (``default_chunk_tokens`` if None).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        n_tokens: int,
        layer_widths: list[int],
        site: str,
        dtype: StoreDtype = "float16",
        chunk_tokens: int | None = None,
    ) -> None:
        import zarr

        if dtype not in _STORED:
            raise StoreError(f"store dtype must be one of {sorted(_STORED)}, got {dtype!r}")
        if n_tokens < 1 or not layer_widths or min(layer_widths) < 1:
            raise StoreError(f"cannot store {n_tokens} tokens x layers {layer_widths}")
        self.path = Path(path)
        self.n_tokens, self.layer_widths, self.site, self.dtype = (
            n_tokens,
            list(layer_widths),
            site,
            dtype,
        )
        self.chunk_tokens = min(n_tokens, chunk_tokens or default_chunk_tokens(layer_widths, dtype))
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        shutil.rmtree(self._tmp, ignore_errors=True)
        self._group = zarr.open_group(self._tmp, mode="w")
        self._layers = [
            self._group.create_array(
                layer_name(i),
                shape=(n_tokens, w),
                chunks=(self.chunk_tokens, w),
                dtype=_STORED[dtype],
                fill_value=0,
                compressors=None,
            )
            for i, w in enumerate(self.layer_widths)
        ]
        self._cols = np.concatenate([[0], np.cumsum(self.layer_widths)]).astype(int)
        self._buffer = np.empty((self.chunk_tokens, int(self._cols[-1])), dtype=np.float32)
        self._buffered = 0
        self._next_row = 0  # first row of the buffer
        self.sample_index = np.full(n_tokens, -1, dtype=np.int32)
        self.clipped = 0
        self._committed = False
        # append_layer: the layer being filled, its buffered rows and their first row
        self._layer = -1
        self._layer_buffer = np.empty((0, 0), dtype=np.float32)
        self._layer_buffered = self._layer_start = 0

    def __enter__(self) -> StoreWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._committed:
            self.abort()

    @property
    def rows_written(self) -> int:
        return self._next_row + self._buffered

    def append(self, rows: np.ndarray, sample: int | np.ndarray) -> None:
        """Append whole rows (r, n_neurons) of every layer; ``sample``: their sample (one
        number, or one per row)."""
        rows = np.asarray(rows)
        if rows.ndim != 2 or rows.shape[1] != self._buffer.shape[1]:
            raise StoreError(f"rows of shape {rows.shape}: expected (r, {self._buffer.shape[1]})")
        start = self.rows_written
        if start + len(rows) > self.n_tokens:
            raise StoreError(f"{start + len(rows)} rows written to a store of {self.n_tokens}")
        self.sample_index[start : start + len(rows)] = sample
        done = 0
        while done < len(rows):
            take = min(len(rows) - done, self.chunk_tokens - self._buffered)
            self._buffer[self._buffered : self._buffered + take] = rows[done : done + take]
            self._buffered += take
            done += take
            if self._buffered == self.chunk_tokens:
                self._flush()

    def _flush(self) -> None:
        n, start = self._buffered, self._next_row
        if n == 0:
            return
        for layer, array in enumerate(self._layers):
            block = self._buffer[:n, self._cols[layer] : self._cols[layer + 1]]
            stored, clipped = encode(block, self.dtype)
            self.clipped += clipped
            array[start : start + n] = stored
        self._next_row += n
        self._buffered = 0

    def write_layer(
        self, layer: int, start: int, values: np.ndarray, sample: int | np.ndarray | None = None
    ) -> None:
        """Write one layer's values (r, width) at rows ``start:start + r`` (layer-by-layer
        collection; rows aligned to ``chunk_tokens`` write whole chunks). ``sample``, if
        given, records the rows' samples."""
        values = np.asarray(values)
        if values.ndim != 2 or values.shape[1] != self.layer_widths[layer]:
            raise StoreError(
                f"layer {layer}: values of shape {values.shape}, expected "
                f"(r, {self.layer_widths[layer]})"
            )
        stored, clipped = encode(values, self.dtype)
        self.clipped += clipped
        self._layers[layer][start : start + len(values)] = stored
        if sample is not None:
            self.sample_index[start : start + len(values)] = sample
        self._next_row = max(self._next_row, start + len(values))

    def append_layer(self, layer: int, rows: np.ndarray, sample: int | np.ndarray) -> None:
        """Append rows (r, width) to one layer's array: layer after layer, every layer's rows
        in the same order (``sample``, their sample, is recorded with the first layer's)."""
        rows = np.asarray(rows)
        if layer != self._layer:
            self._flush_layer()
            if self._layer >= 0 and self._layer_start != self.n_tokens:
                raise StoreError(
                    f"layer {self._layer}: {self._layer_start} of "
                    f"{self.n_tokens} rows appended before layer {layer}"
                )
            self._layer, self._layer_start = layer, 0
            self._layer_buffer = np.empty(
                (self.chunk_tokens, self.layer_widths[layer]), dtype=np.float32
            )
        start = self._layer_start + self._layer_buffered
        if start + len(rows) > self.n_tokens:
            raise StoreError(f"{start + len(rows)} rows appended to a store of {self.n_tokens}")
        if layer == 0:
            self.sample_index[start : start + len(rows)] = sample
        done = 0
        while done < len(rows):
            take = min(len(rows) - done, self.chunk_tokens - self._layer_buffered)
            self._layer_buffer[self._layer_buffered : self._layer_buffered + take] = rows[
                done : done + take
            ]
            self._layer_buffered += take
            done += take
            if self._layer_buffered == self.chunk_tokens:
                self._flush_layer()

    def _flush_layer(self) -> None:
        if self._layer_buffered:
            self.write_layer(
                self._layer, self._layer_start, self._layer_buffer[: self._layer_buffered]
            )
            self._layer_start += self._layer_buffered
            self._layer_buffered = 0

    def commit(self, *, tokens_per_second: float = float("nan")) -> ActivationStore:
        """Write the remaining rows and the bookkeeping, and move the store into place."""
        self._flush()
        self._flush_layer()
        if (self.sample_index < 0).any():
            raise StoreError(
                f"{int((self.sample_index < 0).sum())} of {self.n_tokens} rows were never written"
            )
        self._group.create_array(
            "sample_index", data=self.sample_index, chunks=(max(1, min(self.n_tokens, 2**20)),)
        )
        self._group.attrs.update(
            {
                "format": FORMAT,
                "dtype": self.dtype,
                "site": self.site,
                "layer_widths": self.layer_widths,
                "n_tokens": self.n_tokens,
                "chunk_tokens": self.chunk_tokens,
                "clipped": self.clipped,
                "tokens_per_second": float(tokens_per_second),
            }
        )
        if self.clipped:
            logger.warning(
                "store: %d values beyond float16's range were clipped to +-%g",
                self.clipped,
                _FLOAT16_MAX,
            )
        shutil.rmtree(self.path, ignore_errors=True)
        self._tmp.rename(self.path)
        self._committed = True
        return ActivationStore(self.path)

    def abort(self) -> None:
        shutil.rmtree(self._tmp, ignore_errors=True)


def layer_name(layer: int) -> str:
    return f"layer_{layer:03d}"


class ActivationStore:
    """A committed activation store, read back as float32.

    Attributes:
        path: the store folder.
        dtype: stored precision.
        site: ``hidden`` or ``output``.
        layer_widths: neurons per layer.
        shape: (n_tokens, n_neurons).
        chunk_tokens: rows per stored chunk.
        tokens_per_second: collection speed.
    """

    def __init__(self, path: str | Path) -> None:
        import zarr

        self.path = Path(path)
        try:
            self._group = zarr.open_group(self.path, mode="r")
        except FileNotFoundError as exc:
            raise StoreError(f"no activation store at {self.path}") from exc
        attrs: dict[str, Any] = dict(self._group.attrs)
        if attrs.get("format") != FORMAT:
            raise StoreError(
                f"{self.path} is not an fbnprune activation store "
                f"(format {attrs.get('format')!r}, expected {FORMAT!r})"
            )
        self.dtype: StoreDtype = attrs["dtype"]
        self.site: str = attrs["site"]
        self.layer_widths: list[int] = list(attrs["layer_widths"])
        self.chunk_tokens: int = attrs["chunk_tokens"]
        self.clipped: int = attrs["clipped"]
        self.tokens_per_second: float = attrs["tokens_per_second"]
        self.shape = (int(attrs["n_tokens"]), sum(self.layer_widths))

    def __repr__(self) -> str:
        return f"ActivationStore({str(self.path)!r}, shape={self.shape}, dtype={self.dtype})"

    def _array(self, name: str) -> Any:  # a zarr Array (the group's items are typed broadly)
        return self._group[name]

    @functools.cached_property
    def sample_index(self) -> np.ndarray:
        return np.asarray(self._array("sample_index")[:], dtype=np.int32)

    @property
    def stored_bytes(self) -> int:
        """Bytes of the values, uncompressed, in the stored precision."""
        return self.shape[0] * self.shape[1] * np.dtype(_STORED[self.dtype]).itemsize

    def layer(self, layer: int, rows: slice = slice(None)) -> np.ndarray:
        """One layer's columns (float32, (n_rows, width)): selection and reconstruction read
        one layer at a time."""
        return decode(self._array(layer_name(layer))[rows], self.dtype)

    def numpy(self, rows: slice = slice(None)) -> np.ndarray:
        """The whole matrix (or ``rows`` of it) in memory as float32: for sizes that fit."""
        n = len(range(*rows.indices(self.shape[0])))
        out = np.empty((n, self.shape[1]), dtype=np.float32)
        col = 0
        for layer, width in enumerate(self.layer_widths):
            out[:, col : col + width] = self.layer(layer, rows)
            col += width
        return out

    def dask(self, chunk_tokens: int | None = None):  # -> dask.array.Array
        """The matrix as a lazy float32 ``dask.array``: one column block per layer, row blocks
        of ``chunk_tokens`` (a multiple of the stored chunk is read without waste; default
        the stored chunk)."""
        import dask.array as da

        blocks = [self.layer_dask(i, chunk_tokens) for i in range(len(self.layer_widths))]
        return da.concatenate(blocks, axis=1)

    def layer_dask(self, layer: int, chunk_tokens: int | None = None):  # -> dask.array.Array
        """One layer's chunk column as a lazy float32 ``dask.array`` (rows as ``dask``)."""
        import dask.array as da

        rows = chunk_tokens or self.chunk_tokens
        stored = da.from_zarr(
            str(self.path), component=layer_name(layer), chunks=(rows, self.layer_widths[layer])
        )
        if self.dtype == "bfloat16":
            return stored.map_blocks(decode, "bfloat16", dtype=np.float32)
        return stored.astype(np.float32)
