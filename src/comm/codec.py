"""What crosses the network, encoded as it would be sent, and its exact size in bytes.

A similarity upload is symmetric with a zero diagonal, so a client sends its strict upper
triangle only. Encodings (`comm.*` in the config):

- `format`: `csr` (row pointers + column indices) or `coo` (one linear index per entry into the
  m(m-1)/2 upper-triangle pairs); every index uses the smallest unsigned type that fits.
- `topk`: keep, of each row, only the k largest entries (an entry survives when it is among the
  top k of its row or of its column, so the upload stays symmetric); null keeps all >= sigma.
- `bits`: 32 (fp32 values), 16 (fp16), 8 or 4 (uniform quantisation of the kept values over
  [lo, hi], round to nearest, 4-bit codes packed two per byte, lo and hi sent as two fp32).
- `delta`: also encode the change against the client's previous upload (entries added or
  re-quantised as a sparse upload, removed positions as linear upper-triangle indices with a
  uint32 count) and send whichever is smaller, plus one flag byte.

The simulation applies the same quantisation to the values the server sums, so the server
aggregates exactly what it would receive. Byte counts come from the formulas below, which the
tests check against real encodings built with numpy (`encode_upper`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from omegaconf import DictConfig

HEADER_BYTES = 9  # format/bits byte, m and nnz as uint32


def index_bytes(n: int) -> int:
    """Bytes of the smallest unsigned integer type holding every value in [0, n)."""
    for size in (1, 2, 4):
        if n <= 2 ** (8 * size):
            return size
    return 8


def value_bytes(nnz: int, bits: int) -> int:
    """Bytes of `nnz` values at `bits` (8/4-bit carry lo and hi as two fp32)."""
    if bits == 32:
        return 4 * nnz
    if bits == 16:
        return 2 * nnz
    if bits == 8:
        return nnz + 8
    if bits == 4:
        return (nnz + 1) // 2 + 8
    raise ValueError(f"comm.bits={bits}; expected 32, 16, 8 or 4")


def sparse_bytes(nnz: int, m: int, fmt: str, bits: int) -> int:
    """Size of an encoded strict-upper-triangle sparse m x m matrix with `nnz` entries."""
    if fmt == "csr":
        index = (m + 1) * index_bytes(nnz + 1) + nnz * index_bytes(m)
    elif fmt == "coo":
        index = nnz * index_bytes(m * (m - 1) // 2)
    else:
        raise ValueError(f"comm.format={fmt!r}; expected csr or coo")
    return HEADER_BYTES + index + value_bytes(nnz, bits)


def labels_bytes(m: int, n_labels: int) -> int:
    """Community labels of m items, each in the smallest type holding n_labels values."""
    return 4 + m * index_bytes(max(n_labels, 1))


def embedding_bytes(m: int, d: int) -> int:
    """What embedding sharing (PFedRec, FedAvg) sends per client and direction: an fp32 m x d table."""
    return 4 * m * d


def table_rows_bytes(rows: int, m: int, d: int) -> int:
    """Size of `rows` rows of an m x d fp32 table sent with their row indices, or of the dense table when that is
    smaller (the lossless sparse table)."""
    return min(HEADER_BYTES + rows * (index_bytes(m) + 4 * d), 4 * m * d)


def shared_traffic(tensors: list[torch.Tensor], uploaders: int, clients: int) -> dict[str, float]:
    """Parameter sharing (FedAvg-style baselines): each uploader sends, and each chosen client
    receives, one client's shared tensors in fp32."""
    per = float(sum(4 * t.numel() for t in tensors))
    out = {"comm/upload_bytes_mean": per if uploaders else 0.0, "comm/upload_bytes_total": per * uploaders}
    if tensors:
        out |= {"comm/download_bytes_mean": per, "comm/download_bytes_total": per * clients}
    return out


def quantise(values: torch.Tensor, lo: float, hi: float, bits: int) -> torch.Tensor:
    """Values as the receiver decodes them after uniform `bits`-bit quantisation over [lo, hi]."""
    if bits == 32:
        return values
    if bits == 16:
        return values.half().to(values.dtype)
    levels = 2**bits - 1
    codes = torch.round((values.double().clamp(lo, hi) - lo) / max(hi - lo, 1e-12) * levels)  # as encoded
    lo32, hi32 = float(np.float32(lo)), float(np.float32(hi))  # as the payload stores the range
    return (lo32 + codes * (max(hi32 - lo32, 1e-12) / levels)).to(values.dtype)  # as decoded, to the last bit


@dataclass(frozen=True)
class Encoding:
    """The configured upload/download encoding (`comm.*`)."""

    format: str = "csr"
    topk: int | None = None
    bits: int = 32
    delta: bool = False
    tables: str = "dense"  # shared item tables: dense | rows (only the changed rows, with their indices)

    @classmethod
    def from_cfg(cls, comm: DictConfig) -> Encoding:
        topk = None if comm.topk is None else int(comm.topk)
        return cls(str(comm.format), topk, int(comm.bits), bool(comm.delta), str(comm.tables))

    def upload_bytes(self, nnz: int, m: int) -> int:
        return sparse_bytes(nnz, m, self.format, self.bits)


def delta_entries(
    prev_idx: torch.Tensor, prev_val: torch.Tensor, idx: torch.Tensor, val: torch.Tensor
) -> tuple[int, int]:
    """(upserts, removals) of a delta upload: positions added or whose value changed, positions dropped.

    Both index arrays are sorted linear positions of the strict upper triangle.
    """
    if prev_idx.numel() == 0:
        return int(idx.numel()), 0
    pos = torch.searchsorted(prev_idx, idx).clamp(max=prev_idx.numel() - 1)
    common = prev_idx[pos] == idx
    changed = int((prev_val[pos][common] != val[common]).sum())
    removed = int(prev_idx.numel()) - int(common.sum())
    return int((~common).sum()) + changed, removed


def delta_bytes(upserts: int, removals: int, m: int, fmt: str, bits: int) -> int:
    """Size of a delta upload: the upserts as a sparse upload, the removals as linear indices."""
    return sparse_bytes(upserts, m, fmt, bits) + 4 + removals * index_bytes(m * (m - 1) // 2)


_UTYPE = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}
BITS = (32, 16, 8, 4)


class PayloadError(ValueError):
    """A received payload that does not decode to a valid similarity upload (the reason is the message)."""


def upper_position(rows: np.ndarray, cols: np.ndarray, m: int) -> np.ndarray:
    """Row-major position [k] of each entry (rows[i] < cols[i]) in the strict upper triangle of an m x m matrix."""
    return rows * m - rows * (rows + 1) // 2 + (cols - rows - 1)


def encode_entries(
    m: int, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, fmt: str, bits: int, lo: float = 0.0, hi: float = 1.0
) -> bytes:
    """The wire encoding of strict-upper-triangle entries (row < col) of an m x m matrix.

    Layout: 1 flag byte (format * 64 + bits), m and nnz as uint32, the index arrays (CSR: row
    pointers then columns; COO: linear upper-triangle positions), then the values. Entries are
    sent in row-major order. The Flower app sends this; the byte formulas above are its sizes.
    """
    rows, cols, vals = np.asarray(rows, np.int64), np.asarray(cols, np.int64), np.asarray(vals, np.float64)
    order = np.lexsort((cols, rows))
    rows, cols, vals = rows[order], cols[order], vals[order]
    nnz = len(rows)
    if fmt not in ("csr", "coo"):
        raise ValueError(f"comm.format={fmt!r}; expected csr or coo")
    if bits not in BITS:
        raise ValueError(f"comm.bits={bits}; expected one of {BITS}")
    head = np.array([(0 if fmt == "csr" else 1) * 64 + bits], dtype=np.uint8).tobytes()
    head += np.array([m, nnz], dtype=np.uint32).tobytes()
    if fmt == "csr":
        ptr = np.zeros(m + 1, dtype=np.int64)
        np.add.at(ptr, rows + 1, 1)
        index = np.cumsum(ptr).astype(_UTYPE[index_bytes(nnz + 1)]).tobytes()
        index += cols.astype(_UTYPE[index_bytes(m)]).tobytes()
    else:
        index = upper_position(rows, cols, m).astype(_UTYPE[index_bytes(m * (m - 1) // 2)]).tobytes()
    if bits == 32:
        body = vals.astype(np.float32).tobytes()
    elif bits == 16:
        body = vals.astype(np.float32).astype(np.float16).tobytes()
    else:
        levels = 2**bits - 1
        codes = np.round((np.clip(vals, lo, hi) - lo) / max(hi - lo, 1e-12) * levels).astype(np.uint8)
        if bits == 4:
            codes = np.append(codes, np.uint8(0)) if len(codes) % 2 else codes
            codes = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
        body = np.array([lo, hi], dtype=np.float32).tobytes() + codes.tobytes()
    return head + index + body


def decode_entries(
    payload: bytes, m_expected: int | None = None, max_bytes: int | None = None
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of `encode_entries`: (m, rows, cols, values as the receiver sees them).

    Every field is checked before use; a payload that is truncated, oversized, announces another
    m, or holds an index outside the strict upper triangle or a value outside [-1, 1] raises
    `PayloadError` saying which.
    """
    n = len(payload)
    if max_bytes is not None and n > max_bytes:
        raise PayloadError(f"payload of {n} bytes exceeds the limit of {max_bytes} bytes")
    if n < HEADER_BYTES:
        raise PayloadError(f"payload of {n} bytes is shorter than the {HEADER_BYTES}-byte header")
    flag = payload[0]
    fmt, bits = {0: "csr", 1: "coo"}.get(flag // 64), flag % 64
    if fmt is None or bits not in BITS:
        raise PayloadError(f"unknown format byte {flag} (expected format*64 + bits, format 0/1, bits {BITS})")
    m, nnz = (int(x) for x in np.frombuffer(payload[1:9], dtype=np.uint32))
    if m_expected is not None and m != m_expected:
        raise PayloadError(f"payload announces m={m} items, expected {m_expected}")
    if nnz > m * (m - 1) // 2:
        raise PayloadError(f"payload announces {nnz} entries, more than the {m * (m - 1) // 2} upper-triangle pairs")
    if n != sparse_bytes(nnz, m, fmt, bits):
        raise PayloadError(
            f"payload has {n} bytes; a {fmt} upload of {nnz} entries at {bits} bits has "
            f"{sparse_bytes(nnz, m, fmt, bits)}"
        )
    at = HEADER_BYTES
    if fmt == "csr":
        size = index_bytes(nnz + 1)
        ptr = np.frombuffer(payload[at : at + (m + 1) * size], dtype=_UTYPE[size]).astype(np.int64)
        at += (m + 1) * size
        size = index_bytes(m)
        cols = np.frombuffer(payload[at : at + nnz * size], dtype=_UTYPE[size]).astype(np.int64)
        at += nnz * size
        if ptr[0] != 0 or ptr[-1] != nnz or (np.diff(ptr) < 0).any():
            raise PayloadError("CSR row pointers are not a non-decreasing sequence from 0 to nnz")
        rows = np.repeat(np.arange(m), np.diff(ptr))
    else:
        size = index_bytes(m * (m - 1) // 2)
        lin = np.frombuffer(payload[at : at + nnz * size], dtype=_UTYPE[size]).astype(np.int64)
        at += nnz * size
        if nnz and lin.max() >= m * (m - 1) // 2:
            raise PayloadError(f"COO position {int(lin.max())} outside the {m * (m - 1) // 2} upper-triangle pairs")
        starts = np.concatenate([[0], np.cumsum(np.arange(m - 1, 0, -1))])
        rows = np.searchsorted(starts, lin, side="right") - 1
        cols = lin - starts[rows] + rows + 1
    if nnz and ((cols <= rows).any() or (cols >= m).any()):
        raise PayloadError("an entry lies outside the strict upper triangle (column <= row or >= m)")
    if nnz > 1 and len(np.unique(rows * m + cols)) != nnz:
        raise PayloadError("an upper-triangle position is sent twice")
    if bits == 32:
        vals = np.frombuffer(payload[at : at + 4 * nnz], dtype=np.float32).astype(np.float64)
    elif bits == 16:
        vals = np.frombuffer(payload[at : at + 2 * nnz], dtype=np.float16).astype(np.float64)
    else:
        lo, hi = (float(x) for x in np.frombuffer(payload[at : at + 8], dtype=np.float32))
        if not (np.isfinite([lo, hi]).all() and -1.0 <= lo <= hi <= 1.0):
            raise PayloadError(f"quantisation range [{lo}, {hi}] is not inside [-1, 1]")
        raw = np.frombuffer(payload[at + 8 :], dtype=np.uint8)
        codes = raw if bits == 8 else np.stack([raw & 15, raw >> 4], 1).reshape(-1)[:nnz]
        vals = lo + codes.astype(np.float64) * (max(hi - lo, 1e-12) / (2**bits - 1))
    if nnz and not (np.isfinite(vals).all() and np.abs(vals).max() <= 1.0):
        raise PayloadError("a similarity value is not finite or lies outside [-1, 1]")
    return m, rows, cols, vals


def encode_upper(matrix: np.ndarray, fmt: str, bits: int, lo: float = 0.0, hi: float = 1.0) -> bytes:
    """`encode_entries` of the nonzero strict-upper-triangle entries of a dense matrix."""
    rows, cols = np.nonzero(np.triu(matrix, 1))
    return encode_entries(matrix.shape[0], rows, cols, matrix[rows, cols], fmt, bits, lo, hi)


def decode_upper(payload: bytes, m_expected: int | None = None, dtype: type = np.float64) -> np.ndarray:
    """Inverse of `encode_upper`: the symmetric dense matrix [m, m] of `dtype` (values as the receiver sees them;
    zero diagonal); `m_expected`: refuse a payload of another size (`decode_entries`). A Flower node decodes S_g in
    float32 (Lastfm-2k's m x m is 0.6 GB so, 1.2 GB in float64)."""
    m, rows, cols, vals = decode_entries(payload, m_expected=m_expected)
    out = np.zeros((m, m), dtype=dtype)
    out[rows, cols] = vals
    return out + out.T


class Ledger:
    """Byte counts of one run's traffic, and each client's previous upload for delta encoding."""

    def __init__(self, encoding: Encoding, n_items: int):
        self.encoding, self.m = encoding, n_items
        self.previous: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.row_changed = torch.zeros(n_items, dtype=torch.long)  # the round each shared table row last changed
        self.downloaded: dict[int, int] = {}  # client -> the round it last downloaded the shared table

    def table_traffic(
        self,
        round_: int,
        clients: torch.Tensor,
        changed_rows: list[int],
        before: torch.Tensor,
        after: torch.Tensor,
        other_bytes: int,
    ) -> dict[str, float]:
        """`comm.tables=rows`: the bytes of a parameter-sharing round when tables travel as their changed rows.

        Each uploader sends the rows of its item table that differ from the server's table it started from
        (`changed_rows`, one count per uploader), each chosen client `clients` receives the rows of the server's
        table `before` [m, d] (what the round starts from) that changed since its last download (all of them the
        first time), and both directions carry the other shared tensors densely (`other_bytes`). `after` is the
        server's new table, whose changed rows date from this round.
        """
        m, d = before.shape
        up = [float(table_rows_bytes(n, m, d) + other_bytes) for n in changed_rows]
        # rows changed since each client's last download (at the start of that round; all rows the first time)
        last = torch.tensor([self.downloaded.get(c, -1) for c in clients.tolist()], dtype=torch.long)
        older = torch.searchsorted(torch.sort(self.row_changed).values, last.clamp(min=0))
        rows = torch.where(last < 0, m, m - older)
        down = [float(table_rows_bytes(int(n), m, d) + other_bytes) for n in rows]
        self.downloaded.update(dict.fromkeys(clients.tolist(), round_))
        self.row_changed[(after.cpu() != before.cpu()).any(1)] = round_
        return {
            "comm/upload_bytes_mean": sum(up) / len(up) if up else 0.0,
            "comm/upload_bytes_total": sum(up),
            "comm/upload_rows_mean": sum(changed_rows) / len(changed_rows) if changed_rows else 0.0,
            "comm/download_bytes_mean": sum(down) / len(down) if down else 0.0,
            "comm/download_bytes_total": sum(down),
        }

    def similarity_uploads(
        self, clients: list[int], nnz: torch.Tensor, entries: list[tuple[torch.Tensor, torch.Tensor]] | None
    ) -> torch.Tensor:
        """Bytes each client in `clients` sends; `nnz` counts the full matrix (twice the upper triangle)."""
        enc, m = self.encoding, self.m
        sizes = torch.tensor([enc.upload_bytes(int(n) // 2, m) for n in nnz], dtype=torch.float64)
        if enc.delta and entries is not None:
            for i, client in enumerate(clients):
                idx, val = entries[i]
                if client in self.previous:
                    ups, rem = delta_entries(*self.previous[client], idx, val)
                    sizes[i] = min(float(sizes[i]), float(delta_bytes(ups, rem, m, enc.format, enc.bits)))
                sizes[i] += 1  # the full/delta flag
                self.previous[client] = (idx, val)
        return sizes

    def state_dict(self) -> dict:
        return {"previous": self.previous, "row_changed": self.row_changed, "downloaded": self.downloaded}

    def load_state_dict(self, state: dict) -> None:
        self.previous = dict(state.get("previous", {}))
        self.row_changed = state.get("row_changed", self.row_changed)
        self.downloaded = dict(state.get("downloaded", {}))
