"""Block-quantized matrices: a GGUF file's weights kept as the file stores them.

A quantized GGUF stores each row of a matrix in blocks: a few weights share a float16
scale (and sometimes a minimum), and each weight is a small integer. Multiplying by the
blocks directly reads 2-4x fewer bytes than multiplying by the float16 matrix they expand
to, and a decode step is bound by the bytes it reads. Here are the five block formats
tinyllm keeps, the layout it keeps them in, and the readable expansion (`dequantize`)
that is the reference for the GPU kernels that multiply without expanding.

The block formats (little-endian; f16 is an IEEE half; one block covers 32 or 256
consecutive weights of a row):

    Q8_0  32 weights, 34 bytes    | d f16 | q[32] int8                        |    x = d * q
    Q4_0  32 weights, 18 bytes    | d f16 | qs[16]: two 4-bit q per byte      |    x = d * (q - 8)
    Q4_1  32 weights, 20 bytes    | d f16 | m f16 | qs[16]                    |    x = d * q + m

        byte j of qs holds element j in its low nibble and element j + 16 in its high one:
        qs[0] = (q16 << 4) | q0,  qs[1] = (q17 << 4) | q1, ...

    Q4_K  256 weights, 144 bytes  | d f16 | dmin f16 | scales[12] | qs[128] |
        8 sub-blocks of 32 weights, each with a 6-bit scale sc and a 6-bit minimum m,
        packed into the 12 scale bytes:
            sub-block j < 4:   sc = scales[j] & 63          m = scales[j + 4] & 63
            sub-block j >= 4:  sc = (scales[j + 4] & 15) | (scales[j - 4] >> 6) << 4
                               m  = (scales[j + 4] >> 4) | (scales[j] >> 6) << 4
        qs is 4 chunks of 32 bytes; chunk c's low nibbles are sub-block 2c (elements
        64c .. 64c+31), its high nibbles sub-block 2c + 1 (elements 64c+32 .. 64c+63).
                                                                 x = d * sc * q - dmin * m

    Q6_K  256 weights, 210 bytes  | ql[128] | qh[64] | scales[16] int8 | d f16 |
        a 6-bit q is 4 low bits (a nibble of ql) and 2 high bits (a pair of qh); the block
        is two halves of 128 weights, half h using ql[64h:64h+64] and qh[32h:32h+32].
        For l in 0..31 of a half:
            element l       low nibble of ql[l]       bits 0-1 of qh[l]
            element l + 32  low nibble of ql[l + 32]  bits 2-3 of qh[l]
            element l + 64  high nibble of ql[l]      bits 4-5 of qh[l]
            element l + 96  high nibble of ql[l + 32] bits 6-7 of qh[l]
        every 16 consecutive weights share one of the 16 int8 scales.
                                                                 x = d * scales[i // 16] * (q - 32)

The planes. A `QuantizedMatrix` holds a linear weight [N, K] (out, in) as a few arrays,
"planes", each one field of every block gathered together (a structure of arrays), so
that every plane starts aligned and a kernel can read it with wide loads. The bits are
exactly the file's; only their order in memory changes. This layout is a contract with
the CUDA kernels (tinyllm/cuda):

    kind   plane   dtype    shape             what
    q8_0   q       int8     [N, K]            the weights, block after block
           scale   float16  [N, K/32]         d
    q4_0   q       uint8    [N, K/2]          each block's 16 qs bytes, as in the file
           scale   float16  [N, K/32]         d
    q4_1   q       uint8    [N, K/2]          as q4_0
           scale   float16  [N, K/32, 2]      (d, m)
    q4_k   q       uint8    [N, K/2]          each superblock's 128 qs bytes, as in the file
           meta    uint8    [N, K/256, 16]    the block's first 16 bytes: d, dmin, scales[12]
    q6_k   q       uint8    [N, K/2]          ql, 128 bytes per superblock
           qh      uint8    [N, K/4]          64 bytes per superblock
           meta    int8     [N, K/256, 16]    the 16 scales
           scale   float16  [N, K/256]        d

Every plane's first axis is the row, so stacking matrices (QKV) and reordering rows (the
GGUF Q/K permutation) act on every plane the same way along axis 0.
"""
from __future__ import annotations

import numpy as np

from .backend import array_module, to_numpy

# kind -> (weights per block, bytes per block)
BLOCKS = {"q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20), "q4_k": (256, 144), "q6_k": (256, 210)}
F16 = np.dtype("<f2")  # the file's halves are little-endian


def plane_layout(kind: str, n: int, k: int) -> dict:
    """The planes of a `kind` matrix [N, K]: name -> (dtype, shape). The contract above, as data."""
    if kind not in BLOCKS:
        raise ValueError(f"quantization kind {kind!r} is not one of {', '.join(BLOCKS)}")
    if k % BLOCKS[kind][0]:
        raise ValueError(f"{kind}: row length {k} is not a multiple of the block ({BLOCKS[kind][0]})")
    blocks = k // BLOCKS[kind][0]
    if kind == "q8_0":
        return {"q": (np.int8, (n, k)), "scale": (np.float16, (n, blocks))}
    if kind == "q4_0":
        return {"q": (np.uint8, (n, k // 2)), "scale": (np.float16, (n, blocks))}
    if kind == "q4_1":
        return {"q": (np.uint8, (n, k // 2)), "scale": (np.float16, (n, blocks, 2))}
    if kind == "q4_k":
        return {"q": (np.uint8, (n, k // 2)), "meta": (np.uint8, (n, blocks, 16))}
    return {"q": (np.uint8, (n, k // 2)), "qh": (np.uint8, (n, k // 4)),
            "meta": (np.int8, (n, blocks, 16)), "scale": (np.float16, (n, blocks))}


class QuantizedMatrix:
    """A linear weight [N, K] (out, in) kept block-quantized, as `planes` (see the module
    docstring); `dtype` is the compute dtype it multiplies in and expands to."""

    ndim = 2

    def __init__(self, kind: str, shape: tuple, planes: dict, dtype=np.float16):
        n, k = (int(s) for s in shape)
        layout = plane_layout(kind, n, k)
        if set(planes) != set(layout):
            raise ValueError(f"{kind}: planes {sorted(planes)}, expected {sorted(layout)}")
        for name, (plane_dtype, plane_shape) in layout.items():
            p = planes[name]
            if p.dtype != plane_dtype or tuple(p.shape) != plane_shape:
                raise ValueError(f"{kind} plane {name!r}: {p.dtype} {list(p.shape)}, "
                                 f"expected {np.dtype(plane_dtype).name} {list(plane_shape)}")
        self.kind = kind
        self.shape = (n, k)
        self.planes = planes
        self._dtype = np.dtype(dtype)

    @property
    def dtype(self):
        return self._dtype

    @property
    def nbytes(self) -> int:
        return sum(int(p.nbytes) for p in self.planes.values())

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.nbytes / (self.shape[0] * self.shape[1])

    def __repr__(self):
        return (f"QuantizedMatrix({self.kind}, {list(self.shape)}, {self.bits_per_weight:.2f} bits per weight, "
                f"computes in {self.dtype.name})")

    # ---- from the file, between devices, rows ------------------------------------------------
    @classmethod
    def from_gguf(cls, raw, kind: str, n: int, k: int, dtype=np.float16) -> "QuantizedMatrix":
        """Split a GGUF tensor's block bytes (uint8, N rows of K/block blocks) into planes."""
        plane_layout(kind, n, k)  # a known kind, whole blocks
        per_block, block_bytes = BLOCKS[kind]
        raw = np.asarray(raw)
        if raw.dtype != np.uint8 or raw.size != n * (k // per_block) * block_bytes:
            raise ValueError(f"{kind} [{n}, {k}] needs {n * (k // per_block) * block_bytes} bytes in whole blocks, "
                             f"got {raw.dtype} of {raw.size}")
        blocks = raw.reshape(n, k // per_block, block_bytes)  # [N, blocks, bytes of one block]

        def field(start, stop, dtype=np.uint8):
            """Bytes start:stop of every block, gathered into one contiguous plane."""
            return np.ascontiguousarray(blocks[:, :, start:stop]).view(dtype)

        if kind == "q8_0":
            planes = {"q": field(2, 34, np.int8).reshape(n, k), "scale": field(0, 2, F16).reshape(n, -1)}
        elif kind == "q4_0":
            planes = {"q": field(2, 18).reshape(n, k // 2), "scale": field(0, 2, F16).reshape(n, -1)}
        elif kind == "q4_1":
            planes = {"q": field(4, 20).reshape(n, k // 2), "scale": field(0, 4, F16)}
        elif kind == "q4_k":
            planes = {"q": field(16, 144).reshape(n, k // 2), "meta": field(0, 16)}
        else:
            planes = {"q": field(0, 128).reshape(n, k // 2), "qh": field(128, 192).reshape(n, k // 4),
                      "meta": field(192, 208, np.int8), "scale": field(208, 210, F16).reshape(n, -1)}
        return cls(kind, (n, k), planes, dtype)

    def to(self, xp, dtype=None) -> "QuantizedMatrix":
        """The same matrix with its planes on `xp`'s device (numpy: the host), computing in
        `dtype` (default: its own)."""
        move = to_numpy if xp is np else xp.asarray
        return QuantizedMatrix(self.kind, self.shape, {name: move(p) for name, p in self.planes.items()},
                               self.dtype if dtype is None else dtype)

    @classmethod
    def concat(cls, parts: list) -> "QuantizedMatrix":
        """Matrices of one kind and row length stacked row-wise (QKV, gate/up): [sum N, K]."""
        first = parts[0]
        if len(parts) == 1:
            return first
        for p in parts[1:]:
            if p.kind != first.kind or p.shape[1] != first.shape[1]:
                raise ValueError(f"cannot stack a {p.kind} {list(p.shape)} matrix under a "
                                 f"{first.kind} {list(first.shape)} one")
        xp = array_module(first.planes["q"])
        planes = {name: xp.concatenate([p.planes[name] for p in parts], axis=0) for name in first.planes}
        return cls(first.kind, (sum(p.shape[0] for p in parts), first.shape[1]), planes, first.dtype)

    def take_rows(self, index) -> "QuantizedMatrix":
        """Rows `index` (an integer array of length N'), in that order: [N', K]."""
        xp = array_module(self.planes["q"])
        index = xp.asarray(index)
        return QuantizedMatrix(self.kind, (len(index), self.shape[1]),
                               {name: p[index] for name, p in self.planes.items()}, self.dtype)

    def scales_finite(self) -> bool:
        """Whether every float16 field (d, m, dmin) is finite: the integers cannot be NaN, so
        a matrix whose scales are finite expands to finite weights."""
        xp = array_module(self.planes["q"])
        if self.kind == "q4_k":
            halves = self._d_dmin(xp)
        else:
            halves = self.planes["scale"]
        return bool(xp.isfinite(halves).all())

    def max_abs_bound(self) -> float:
        """An upper bound on |weight| over the matrix, from each block's scales and the largest
        integer its format holds, in float32 (no expansion): below float16's largest value
        (65504), every weight rebuilt in float16 is finite."""
        xp = array_module(self.planes["q"])
        f32 = xp.float32
        if self.kind == "q8_0":
            bound = xp.abs(self.planes["scale"].astype(f32)) * 128
        elif self.kind == "q4_0":
            bound = xp.abs(self.planes["scale"].astype(f32)) * 8
        elif self.kind == "q4_1":
            dm = xp.abs(self.planes["scale"].astype(f32))                        # [N, K/32, 2]
            bound = dm[:, :, 0] * 15 + dm[:, :, 1]
        elif self.kind == "q4_k":
            dd = xp.abs(self._d_dmin(xp).astype(f32))                            # [N, S, 2]
            bound = (dd[:, :, 0] * 15 + dd[:, :, 1]) * 63
        else:  # q6_k
            bound = xp.abs(self.planes["scale"].astype(f32)) * 128 * 32
        return float(bound.max()) if bound.size else 0.0

    # ---- the readable expansion: the reference for every fast kernel ---------------------------
    def dequantize(self, dtype=None):
        """The matrix [N, K] in `dtype` (default: the compute dtype), computed in float32 with
        the formulas of the module docstring, on the planes' own device."""
        xp = array_module(self.planes["q"])
        n, k = self.shape
        p, f32 = self.planes, xp.float32
        if self.kind == "q8_0":
            d = p["scale"].astype(f32)[:, :, None]                               # [N, K/32, 1]
            x = d * p["q"].reshape(n, -1, 32).astype(f32)                        # [N, K/32, 32]
        elif self.kind in ("q4_0", "q4_1"):
            qs = p["q"].reshape(n, -1, 16)                                       # [N, K/32, 16] bytes
            q = xp.concatenate([qs & 0xF, qs >> 4], axis=-1).astype(f32)         # -> [N, K/32, 32]: low nibbles first
            if self.kind == "q4_0":
                x = p["scale"].astype(f32)[:, :, None] * (q - 8)
            else:
                dm = p["scale"].astype(f32)                                      # [N, K/32, 2]
                x = dm[:, :, 0:1] * q + dm[:, :, 1:2]
        elif self.kind == "q4_k":
            dd = self._d_dmin(xp).astype(f32)                                    # [N, S, 2]: (d, dmin)
            sc, m = self._q4_k_scales_mins(xp)                                   # [N, S, 8] each
            qs = p["q"].reshape(n, -1, 4, 32)                                    # [N, S, chunk, 32] bytes
            q = xp.stack([qs & 0xF, qs >> 4], axis=3).reshape(n, -1, 8, 32)      # sub-block 2c: low nibbles, 2c+1: high
            scale = dd[:, :, 0:1] * sc.astype(f32)                               # [N, S, 8]: d * sc per sub-block
            minimum = dd[:, :, 1:2] * m.astype(f32)                              # [N, S, 8]: dmin * m
            x = scale[..., None] * q.astype(f32) - minimum[..., None]            # [N, S, 8, 32]
        else:  # q6_k
            ql = p["q"].reshape(n, -1, 2, 64)                                    # [N, S, half, 64] bytes
            qh = p["qh"].reshape(n, -1, 2, 32)                                   # [N, S, half, 32] bytes
            low = xp.concatenate([ql & 0xF, ql >> 4], axis=-1)                   # [N, S, half, 128]: elements 0-63, 64-127
            high = xp.concatenate([(qh >> s) & 3 for s in (0, 2, 4, 6)], axis=-1)  # [N, S, half, 128]: 32 per bit pair
            q = (low | (high << 4)).astype(f32) - 32                            # [N, S, half, 128]
            scale = p["scale"].astype(f32)[:, :, None] * p["meta"].astype(f32)   # [N, S, 16]: d * scales
            x = scale[..., None] * q.reshape(n, -1, 16, 16)                      # [N, S, 16, 16]
        return x.reshape(n, k).astype(self.dtype if dtype is None else dtype)

    def _d_dmin(self, xp):
        """q4_k: the two halves at the head of each superblock's meta bytes.  [N, S, 2] float16"""
        return xp.ascontiguousarray(self.planes["meta"][:, :, 0:4]).view(xp.float16)

    def _q4_k_scales_mins(self, xp):
        """q4_k: the 8 sub-blocks' 6-bit scales and minimums from the 12 packed bytes.  [N, S, 8] each"""
        s = self.planes["meta"][:, :, 4:16]
        first, second, third = s[:, :, 0:4], s[:, :, 4:8], s[:, :, 8:12]
        # sub-blocks 0-3: the low 6 bits of bytes 0-3 (scales) and 4-7 (minimums)
        # sub-blocks 4-7: 4 bits from bytes 8-11, the top 2 bits from the spare bits of bytes 0-7
        sc = xp.concatenate([first & 63, (third & 0xF) | ((first >> 6) << 4)], axis=-1)
        m = xp.concatenate([second & 63, (third >> 4) | ((second >> 6) << 4)], axis=-1)
        return sc, m


def weight_formats(weights) -> dict:
    """How a model holds its linear weights (the 4 stacked matrices of each layer and the LM
    head): matrices per block kind kept, and per dense dtype. What `--quantized` did, in the
    CLI's JSON."""
    counts: dict = {}
    for w in [m for layer in weights.layers for m in (layer.wqkv, layer.wo, layer.w_gate_up, layer.w_down)] + [
            weights.output]:
        key = w.kind if isinstance(w, QuantizedMatrix) else np.dtype(w.dtype).name
        counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))
