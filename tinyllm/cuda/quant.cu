// Block-quantized weights multiplied as they are (compiled with kernels.cu, after it).
//
// A GGUF matrix [N, K] stays in its blocks (tinyllm/quant.py: the file's bits, split into
// aligned planes): 4.5 to 8.5 bits a weight instead of fp16's 16, and a decode step, which
// reads every weight once, reads that much less. Nothing is expanded in memory: each
// thread turns the few bytes it loaded into fp16 weights in registers and hands them to
// the tensor cores (mma.m16n8k16, fp32 accumulate), exactly as gemv_rows hands fp16 weights.
//
// Work split (as gemv_rows): a block computes 16 output rows (EPI_SWIGLU: 16 gate rows and
// their 16 up rows) for B <= 8 tokens; its 8 warps split the row's "units" (a unit is what
// one thread dequantizes at a time: one 32-weight block, or a 16-byte slice of a K-quant
// super-block); their partial sums meet in shared memory, added in a fixed order, so a
// token's result depends on neither B nor its neighbours. Thread (g, t) of a warp (g =
// lane / 4, t = lane % 4) takes unit 4w + t + 32i of rows g and g + 8.
//
// The mma trick: a dot product may visit k in any order, as long as weights and inputs use
// the same one. mma wants from each thread, per row, two pairs of k (its A registers); a
// 32-bit word of 4-bit weights turns most cheaply into the pairs {0, 2} and {1, 3} of its
// bytes' nibbles. So the inputs X are staged in shared memory already permuted into the
// order in which the weights come out of their bytes (`src` below says, for every slot,
// which k it holds), and each thread reads its B registers as one 8-byte load.
//
// Rounding: a weight is rebuilt in fp16 (d * q, d * q + m, or (d * sc) * q - dmin * m with
// the scale products rounded to fp16), then multiplied in fp32 by the tensor cores. The
// readable path (quant.py) rebuilds in fp32 and rounds once to fp16; the two differ by at
// most an fp16 rounding of the scale: the tests hold them to a tolerance, not to bits.

enum { Q8_0 = 0, Q4_0 = 1, Q4_1 = 2, Q4_K = 3, Q6_K = 4 };

// fp16 pairs from bytes, exactly: 0x6400 is 1024.0 in fp16, whose ulp is 1, so the
// half with bit pattern 0x6400 | v is 1024 + v for v < 1024; subtracting 1024 + offset
// leaves v - offset. `nibbles(w, s)`: the nibbles at bits s and s + 16 (bytes 0 and 2 when
// s = 0 or 4, bytes 1 and 3 when s = 8 or 12).
__device__ __forceinline__ __half2 nibbles(unsigned w, int s) {
    const unsigned v = ((w >> s) & 0x000F000Fu) | 0x64006400u;
    return *reinterpret_cast<const __half2*>(&v);
}
// bytes 0 and 2 (odd = false) or 1 and 3 (odd = true) of w, each below 1024 + 256
__device__ __forceinline__ __half2 bytes2(unsigned w, bool odd) {
    const unsigned v = __byte_perm(w, 0x64646464u, odd ? 0x4341u : 0x4240u);
    return *reinterpret_cast<const __half2*>(&v);
}
__device__ __forceinline__ unsigned h2u(__half2 h) { return *reinterpret_cast<const unsigned*>(&h); }
__device__ __forceinline__ __half2 h2(float v) { return __float2half2_rn(v); }

// The four k of slot s (0..3) in a thread's share of one mma: pair {0, 2}, then {1, 3}.
__device__ __forceinline__ int slot_k(int s) { return (s & 1) * 2 + (s >> 1); }

// ---- the formats ------------------------------------------------------------------------
// Each format says: UNIT (weights per unit), MMAS (mmas per unit), Unit (what a thread loads
// for one unit of one row), load(), weights(j) (the two A registers of this row for mma j)
// and src(u, j, s) (the k, within the row, of slot s of mma j of unit u).
struct Planes {
    const unsigned char* q;      // the quants
    const unsigned char* qh;     // Q6_K: the high bits
    const void* scale;           // fp16 block scales (Q4_1: (d, m) pairs)
    const unsigned char* meta;   // K-quants: per super-block header / scales
};

template <int KIND, int K> struct QFormat;

// Q8_0: 32 int8 weights and one fp16 scale d per block; w = d * q.
template <int K> struct QFormat<Q8_0, K> {
    static constexpr int UNIT = 32, MMAS = 8;
    struct Unit { uint4 q[2]; __half2 d; };
    static __device__ __forceinline__ void load(Unit& x, const Planes& p, size_t row, int u) {
        const uint4* q = reinterpret_cast<const uint4*>(p.q + row * K + u * 32);
        x.q[0] = load_stream(q);
        x.q[1] = load_stream(q + 1);
        x.d = __half2half2(reinterpret_cast<const __half*>(p.scale)[row * (K / 32) + u]);
    }
    static __device__ __forceinline__ void weights(const Unit& x, int j, unsigned& a0, unsigned& a2) {
        const unsigned w = reinterpret_cast<const unsigned*>(x.q)[j] ^ 0x80808080u;  // q + 128, as unsigned bytes
        a0 = h2u(__hmul2(__hsub2(bytes2(w, false), h2(1152.f)), x.d));
        a2 = h2u(__hmul2(__hsub2(bytes2(w, true), h2(1152.f)), x.d));
    }
    static __device__ __forceinline__ int src(int u, int j, int s) { return u * 32 + 4 * j + slot_k(s); }
    static __device__ __forceinline__ int dst_group(int q) { return 4 * q; }
};

// Q4_0 / Q4_1: 32 4-bit weights in 16 bytes (byte i: weight i in the low nibble, weight
// i + 16 in the high one) and d (Q4_1: d and m); w = d * (q - 8) or d * q + m.
template <int KIND, int K> struct Q4Block {
    static constexpr int UNIT = 32, MMAS = 8;
    struct Unit { uint4 q; __half2 d, m; };
    static __device__ __forceinline__ void load(Unit& x, const Planes& p, size_t row, int u) {
        x.q = load_stream(reinterpret_cast<const uint4*>(p.q + row * (K / 2) + u * 16));
        if (KIND == Q4_1) {
            const __half2 dm = reinterpret_cast<const __half2*>(p.scale)[row * (K / 32) + u];
            x.d = __low2half2(dm);
            x.m = __high2half2(dm);
        } else {
            x.d = __half2half2(reinterpret_cast<const __half*>(p.scale)[row * (K / 32) + u]);
        }
    }
    // mma j: word j / 2 of the 16 bytes, low nibbles (j even) or high ones
    static __device__ __forceinline__ void weights(const Unit& x, int j, unsigned& a0, unsigned& a2) {
        const unsigned w = reinterpret_cast<const unsigned*>(&x.q)[j >> 1];
        const int s = (j & 1) * 4;
        if (KIND == Q4_1) {
            a0 = h2u(__hfma2(__hsub2(nibbles(w, s), h2(1024.f)), x.d, x.m));
            a2 = h2u(__hfma2(__hsub2(nibbles(w, s + 8), h2(1024.f)), x.d, x.m));
        } else {
            a0 = h2u(__hmul2(__hsub2(nibbles(w, s), h2(1032.f)), x.d));
            a2 = h2u(__hmul2(__hsub2(nibbles(w, s + 8), h2(1032.f)), x.d));
        }
    }
    static __device__ __forceinline__ int src(int u, int j, int s) {
        return u * 32 + (j & 1) * 16 + 4 * (j >> 1) + slot_k(s);
    }
    static __device__ __forceinline__ int dst_group(int q) {  // weights 4q..4q+3: word q % 4, high half or not
        const int e = q % 8;
        return (q / 8) * 32 + 4 * (2 * (e % 4) + e / 4);
    }
};
template <int K> struct QFormat<Q4_0, K> : Q4Block<Q4_0, K> {};
template <int K> struct QFormat<Q4_1, K> : Q4Block<Q4_1, K> {};

// Q4_K: super-blocks of 256 weights: a 16-byte header (d, dmin, twelve bytes packing eight
// 6-bit scales and mins) and 128 bytes of nibbles. Bytes 32c..32c+31 hold weights
// 64c + i (low nibble, sub-block 2c) and 64c + 32 + i (high, sub-block 2c + 1);
// w = (d * sc) * q - dmin * m. A unit is 16 of those bytes: 32 weights, two sub-blocks.
template <int K> struct QFormat<Q4_K, K> {
    static constexpr int UNIT = 32, MMAS = 8;
    struct Unit { uint4 q; uint4 head; int v; };
    static __device__ __forceinline__ void load(Unit& x, const Planes& p, size_t row, int u) {
        x.q = load_stream(reinterpret_cast<const uint4*>(p.q + row * (K / 2) + u * 16));
        x.head = __ldg(reinterpret_cast<const uint4*>(p.meta + (row * (K / 256) + u / 8) * 16));  // 8 units share it
        x.v = u % 8;
    }
    // the 6-bit scale and min of sub-block b (0..7) from the twelve packed bytes, held as the
    // words s0, s1, s2 (shifts, not byte indexing: a register cannot be indexed at run time)
    static __device__ __forceinline__ void scale_min(unsigned s0, unsigned s1, unsigned s2, int b, int& s, int& m) {
        const int sh = 8 * (b & 3);
        const unsigned a = (s0 >> sh) & 0xFF, c = (s1 >> sh) & 0xFF, e = (s2 >> sh) & 0xFF;
        if (b < 4) {
            s = a & 63;
            m = c & 63;
        } else {
            s = (e & 0xF) | ((a >> 6) << 4);
            m = (e >> 4) | ((c >> 6) << 4);
        }
    }
    static __device__ __forceinline__ void weights(const Unit& x, int j, unsigned& a0, unsigned& a2) {
        const __half2 dd = *reinterpret_cast<const __half2*>(&x.head.x);  // (d, dmin)
        const float d = __low2float(dd), dmin = __high2float(dd);
        const int b = 2 * (x.v >> 1) + (j & 1);  // low nibbles: sub-block 2c, high: 2c + 1
        int s, m;
        scale_min(x.head.y, x.head.z, x.head.w, b, s, m);
        const __half2 ds = h2(d * s), dm = h2(-dmin * m);
        const unsigned w = reinterpret_cast<const unsigned*>(&x.q)[j >> 1];
        const int sh = (j & 1) * 4;
        a0 = h2u(__hfma2(__hsub2(nibbles(w, sh), h2(1024.f)), ds, dm));
        a2 = h2u(__hfma2(__hsub2(nibbles(w, sh + 8), h2(1024.f)), ds, dm));
    }
    static __device__ __forceinline__ int src(int u, int j, int s) {
        const int v = u % 8;
        return (u / 8) * 256 + 64 * (v >> 1) + 16 * (v & 1) + 32 * (j & 1) + 4 * (j >> 1) + slot_k(s);
    }
    static __device__ __forceinline__ int dst_group(int q) {  // chunk c, nibble half, 16-byte half h, word i
        const int sb = q / 64, r = q % 64, c = r / 16, high = (r % 16) / 8, h = (r % 8) / 4, i = r % 4;
        return (sb * 8 + 2 * c + h) * 32 + 4 * (2 * i + high);
    }
};

// Q6_K: super-blocks of 256 weights: ql (128 bytes of low nibbles), qh (64 bytes of 2-bit
// highs), sixteen int8 scales, d. Half n (128 weights) uses ql[64n..], qh[32n..]: for
// l < 32, byte ql[l] and ql[l + 32] with the four 2-bit fields of qh[l] give weights
// l, l + 32, l + 64, l + 96 (scales l/16, +2, +4, +6); w = (d * sc) * (q - 32).
// A unit is l in [16j, 16j + 16) of half n: 64 weights from 48 bytes.
template <int K> struct QFormat<Q6_K, K> {
    static constexpr int UNIT = 64, MMAS = 16;
    struct Unit { uint4 lo, hi, qh; unsigned sc; __half d; };
    static __device__ __forceinline__ void load(Unit& x, const Planes& p, size_t row, int u) {
        const int sb = u / 4, n = (u % 4) >> 1, j = u & 1;
        const unsigned char* ql = p.q + row * (K / 2) + sb * 128 + 64 * n + 16 * j;
        x.lo = load_stream(reinterpret_cast<const uint4*>(ql));
        x.hi = load_stream(reinterpret_cast<const uint4*>(ql + 32));
        x.qh = load_stream(reinterpret_cast<const uint4*>(p.qh + row * (K / 4) + sb * 64 + 32 * n + 16 * j));
        const unsigned char* sc = p.meta + (row * (K / 256) + sb) * 16 + 8 * n + j;
        x.sc = sc[0] | (sc[2] << 8) | (sc[4] << 16) | ((unsigned)sc[6] << 24);  // scales of l, +32, +64, +96
        x.d = reinterpret_cast<const __half*>(p.scale)[row * (K / 256) + sb];
    }
    // mma j: word j / 4 of the three vectors, field j % 4 (weights l, l + 32, l + 64, l + 96)
    static __device__ __forceinline__ void weights(const Unit& x, int j, unsigned& a0, unsigned& a2) {
        const int i = j >> 2, f = j & 3;
        const unsigned l = reinterpret_cast<const unsigned*>(f & 1 ? &x.hi : &x.lo)[i];
        const unsigned h = reinterpret_cast<const unsigned*>(&x.qh)[i];
        const unsigned low4 = (f & 2 ? l >> 4 : l) & 0x0F0F0F0Fu;
        const unsigned high2 = ((h >> (2 * f)) & 0x03030303u) << 4;
        const unsigned q = low4 | high2;  // four 6-bit values, one per byte
        const float sc = (float)(signed char)((x.sc >> (8 * f)) & 0xFF);
        const __half2 ds = h2(__half2float(x.d) * sc);
        a0 = h2u(__hmul2(__hsub2(bytes2(q, false), h2(1056.f)), ds));
        a2 = h2u(__hmul2(__hsub2(bytes2(q, true), h2(1056.f)), ds));
    }
    static __device__ __forceinline__ int src(int u, int j, int s) {
        const int sb = u / 4, n = (u % 4) >> 1, jj = u & 1;
        return sb * 256 + 128 * n + 16 * jj + 4 * (j >> 2) + 32 * (j & 3) + slot_k(s);
    }
    static __device__ __forceinline__ int dst_group(int q) {  // half n, field f, 16-weight half jj, word i
        const int sb = q / 64, r = q % 64, n = r / 32, f = (r % 32) / 8, jj = (r % 8) / 4, i = r % 4;
        return (sb * 4 + 2 * n + jj) * 64 + 4 * (4 * i + f);
    }
};

// ---- X for the quantized kernels ----------------------------------------------------------
// Inputs 4i..4i+3 (v) as an mma slot takes them: normed (NORM: fp16(x * norm_w), the sums
// scaled by 1/rms afterwards, as gemv_rows does) and in the order (x0, x2, x1, x3)
template <bool NORM>
__device__ __forceinline__ uint2 quad_for_mma(uint2 v, const __half* __restrict__ norm_w, int i) {
    if (NORM) {
        const uint2 nw = reinterpret_cast<const uint2*>(norm_w)[i];
        __half2* v2 = reinterpret_cast<__half2*>(&v);
        const __half2* n2 = reinterpret_cast<const __half2*>(&nw);
#pragma unroll
        for (int j = 0; j < 2; j++) {
            const float2 f = __half22float2(v2[j]), w2 = __half22float2(n2[j]);
            v2[j] = __floats2half2_rn(f.x * w2.x, f.y * w2.y);
        }
    }
    return make_uint2(__byte_perm(v.x, v.y, 0x5410), __byte_perm(v.x, v.y, 0x7632));
}

// X [B, K] staged in shared memory for gemv_qs (rows XS halves apart), each group of four in
// place, by quad_for_mma. A thread's loads all issue before its first store: X comes from L2,
// and a round trip per load would cost more than the whole multiply of a small matrix.
template <int K, bool NORM, int THREADS>
__device__ __forceinline__ void stage_x_quads(const __half* __restrict__ X, const __half* __restrict__ norm_w,
                                              __half* xs, int XS, int B) {
    constexpr int IT = (K / 4 + THREADS - 1) / THREADS;
    for (int b = 0; b < B; b++) {
        const uint2* xg = reinterpret_cast<const uint2*>(X + (size_t)b * K);
        uint2 xv[IT];
#pragma unroll
        for (int it = 0; it < IT; it++) {
            const int i = it * THREADS + threadIdx.x;
            xv[it] = i < K / 4 ? __ldcg(xg + i) : make_uint2(0, 0);
        }
#pragma unroll
        for (int it = 0; it < IT; it++) {
            const int i = it * THREADS + threadIdx.x;
            if (i >= K / 4) break;
            *reinterpret_cast<uint2*>(xs + b * XS + 4 * i) = quad_for_mma<NORM>(xv[it], norm_w, i);
        }
    }
}

// inv[b] = 1 / rms of token b's raw inputs, by warp b: its sum of squares in gemv_rows's order.
// UNROLL: loads in flight at once (each a trip to L2), against the registers it costs.
template <int K, int UNROLL>
__device__ __forceinline__ void token_inv_rms(const __half* __restrict__ X, float eps, float* inv, int b, int lane) {
    float ss = 0.f;
    const uint4* xv = reinterpret_cast<const uint4*>(X + (size_t)b * K);
#pragma unroll UNROLL
    for (int i = lane; i < K / 8; i += 32) {
        const uint4 v = __ldcg(xv + i);
        const __half2* v2 = reinterpret_cast<const __half2*>(&v);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float2 f = __half22float2(v2[j]);
            ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
        }
    }
    ss = warp_sum(ss);
    if (lane == 0) inv[b] = 1.f / sqrtf(ss / K + eps);
}

// ---- the warps' partial sums, added ---------------------------------------------------------
// A warp's mma accumulators (rows g, g + 8 of the tile; tokens 2t, 2t + 1) into part[m][warp][16][8]
template <int MATS, int WARPS>
__device__ __forceinline__ void store_partials(float* part, const float (&acc)[MATS][4], int warp, int g, int t) {
#pragma unroll
    for (int m = 0; m < MATS; m++) {
        float* o = part + ((m * WARPS + warp) * 16) * 8 + 2 * t;
        o[g * 8] = acc[m][0];
        o[g * 8 + 1] = acc[m][1];
        o[(g + 8) * 8] = acc[m][2];
        o[(g + 8) * 8 + 1] = acc[m][3];
    }
}

// Thread r * 8 + b (< 128) finishes row row0 + r of token b: the warps' partial sums added in
// a fixed order (a token's bits depend on neither B nor its neighbours), scaled by its 1/rms
// (NORM), through the epilogue (EPI_SWIGLU: the up rows are matrix 1)
template <int MATS, int WARPS, bool NORM, int EPI>
__device__ __forceinline__ void finish_rows(const float* part, const float* inv, const __half* __restrict__ res,
                                            __half* __restrict__ out, int row0, int N, int B) {
    if (threadIdx.x >= 16 * 8) return;
    const int r = threadIdx.x / 8, b = threadIdx.x % 8, n_out = row0 + r;
    if (b >= B || n_out >= N) return;
    float y = 0.f, u = 0.f;
#pragma unroll
    for (int w = 0; w < WARPS; w++) {
        y += part[(w * 16 + r) * 8 + b];
        if (EPI == EPI_SWIGLU) u += part[((WARPS + w) * 16 + r) * 8 + b];
    }
    if (NORM) { y *= inv[b]; u *= inv[b]; }
    epilogue<EPI>(y, u, res, out, (size_t)b * N + n_out);
}

// ---- the kernel -------------------------------------------------------------------------
constexpr int Q_WARPS = 8, Q_PAD = 8;  // warps per block; halves of padding per staged X row

// Y[b, n] = sum_k W[n, k] X[b, k] for B <= 8 tokens, W block-quantized, with gemv's
// RMSNorm prologue (NORM: X is staged as fp16(x * norm_w) and the sums are scaled by each
// token's 1/rms, as gemv_rows does) and epilogues.
//   planes of W: [N, ...] ([2N, ...] for EPI_SWIGLU);  X: [B, K];  res, out: [B, N]
// Dynamic shared memory: B * (K + Q_PAD) * 2 + MATS * 8 * 16 * 8 * 4 + 8 * 4 bytes.
template <int KIND, int K, bool NORM, int EPI>
__global__ void __launch_bounds__(Q_WARPS * 32) gemv_q(
        const unsigned char* q, const unsigned char* qh, const void* scale, const unsigned char* meta,
        const __half* __restrict__ X, const __half* __restrict__ norm_w, float eps,
        const __half* __restrict__ res, __half* __restrict__ out, int N, int B) {
    using F = QFormat<KIND, K>;
    const Planes p{q, qh, scale, meta};
    static_assert(K % F::UNIT == 0 && (KIND < Q4_K || K % 256 == 0), "K must hold whole blocks");
    constexpr int U = K / F::UNIT;                      // units per row
    constexpr int MATS = (EPI == EPI_SWIGLU) ? 2 : 1;
    constexpr int XS = K + Q_PAD;
    extern __shared__ __align__(16) unsigned char smem[];
    __half* xs = reinterpret_cast<__half*>(smem);                                  // [B][XS], permuted
    float* part = reinterpret_cast<float*>(smem + ((B * XS * 2 + 15) / 16) * 16);  // [MATS][WARPS][16][8]
    float* inv = part + MATS * Q_WARPS * 16 * 8;                                   // [8]
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    size_t rows[MATS][2];  // this thread's rows g and g + 8 (past N: row 0, results dropped)
#pragma unroll
    for (int m = 0; m < MATS; m++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = row0 + g + 8 * h;
            rows[m][h] = (size_t)m * N + (r < N ? r : 0);
        }
    // A thread's units: u = 4 * warp + t + 32 * i, for step i < STEPS, taken in rounds of P
    // steps whose loads all issue before any arithmetic (as gemv's do: the memory system
    // needs many loads in flight), P as large as ~96 registers of weights allow. The first
    // round's loads also overlap the wait for X. A thread past the row's last unit (K not a
    // multiple of 128) holds zero weights and feeds zero inputs: every thread of a warp
    // takes part in each mma.
    constexpr int STEPS = (U + Q_WARPS * 4 - 1) / (Q_WARPS * 4);
    constexpr int UNIT_REGS = sizeof(typename F::Unit) / 4;
    constexpr int FIT = 96 / (UNIT_REGS * 2 * MATS);
    constexpr int P = FIT < 1 ? 1 : (FIT > STEPS ? STEPS : FIT);
    typename F::Unit w[P][MATS][2];
    auto load_round = [&](int first) {
#pragma unroll
        for (int i = 0; i < P; i++) {
            const int u = warp * 4 + t + Q_WARPS * 4 * (first + i);
#pragma unroll
            for (int m = 0; m < MATS; m++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    if (u < U) F::load(w[i][m][h], p, rows[m][h], u);
                    else w[i][m][h] = typename F::Unit{};
                }
        }
    };
    load_round(0);
    pdl_wait();
    // stage X, permuted: every 4 consecutive inputs feed one mma's 4 slots, in slot order
    // (0, 2, 1, 3); dst_group says where. (Loads and stores interleaved, unlike gemv_qs's
    // stage_x_quads: the weights of the first round are held in registers meanwhile.)
    for (int b = 0; b < B; b++) {
        const uint2* xg = reinterpret_cast<const uint2*>(X + (size_t)b * K);
#pragma unroll
        for (int it = 0; it < (K / 4 + Q_WARPS * 32 - 1) / (Q_WARPS * 32); it++) {
            const int i = it * Q_WARPS * 32 + threadIdx.x;
            if (i >= K / 4) break;
            *reinterpret_cast<uint2*>(xs + b * XS + F::dst_group(i)) = quad_for_mma<NORM>(__ldcg(xg + i), norm_w, i);
        }
    }
    if (NORM && warp < B) token_inv_rms<K, 4>(X, eps, inv, warp, lane);
    __syncthreads();
    float acc[MATS][4];
#pragma unroll
    for (int m = 0; m < MATS; m++)
#pragma unroll
        for (int i = 0; i < 4; i++) acc[m][i] = 0.f;
    const bool has_token = g < B;
#pragma unroll 1
    for (int first = 0; first < STEPS; first += P) {
        if (first) load_round(first);
#pragma unroll
        for (int i = 0; i < P; i++) {
            const int ub = warp * 4 + Q_WARPS * 4 * (first + i), u = ub + t;
            if (ub >= U) break;  // (the same for the whole warp)
            const bool feeds = has_token && u < U;
            const uint2* xb = reinterpret_cast<const uint2*>(xs + g * XS + u * F::UNIT);
#pragma unroll
            for (int j = 0; j < F::MMAS; j++) {
                const uint2 b = feeds ? xb[j] : make_uint2(0, 0);
#pragma unroll
                for (int m = 0; m < MATS; m++) {
                    unsigned a0, a1, a2, a3;
                    F::weights(w[i][m][0], j, a0, a2);
                    F::weights(w[i][m][1], j, a1, a3);
                    mma_16816(acc[m], a0, a1, a2, a3, b.x, b.y);
                }
            }
        }
    }
    store_partials<MATS, Q_WARPS>(part, acc, warp, g, t);
    __syncthreads();
    finish_rows<MATS, Q_WARPS, NORM, EPI>(part, inv, res, out, row0, N, B);
}

// The same weights expanded to fp16, W[n, k] for a prompt's matmul (cuBLAS): one thread per
// unit of one row, weights rebuilt as gemv_q rebuilds them.  out: [N, K]
template <int KIND, int K>
__global__ void dequantize_q(const unsigned char* q, const unsigned char* qh, const void* scale,
                             const unsigned char* meta, __half* __restrict__ out, int N) {
    using F = QFormat<KIND, K>;
    const Planes p{q, qh, scale, meta};
    constexpr int U = K / F::UNIT;
    const size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (size_t)N * U) return;
    const size_t row = i / U;
    const int u = i % U;
    typename F::Unit x;
    F::load(x, p, row, u);
    __half* o = out + row * K;
#pragma unroll
    for (int j = 0; j < F::MMAS; j++) {  // slots (0, 2, 1, 3) hold weights k, k + 1, k + 2, k + 3
        unsigned a0, a2;
        F::weights(x, j, a0, a2);
        *reinterpret_cast<uint2*>(o + F::src(u, j, 0)) = make_uint2(__byte_perm(a0, a2, 0x5410), __byte_perm(a0, a2, 0x7632));
    }
}

// ---- gemv_qs: the block's scale after the mma --------------------------------------------
// gemv_q spends most of its instructions rebuilding fp16 weights: per pair of weights a mask,
// a subtraction and a multiplication by the block's scale. Scale and offset are shared by the
// 32 weights of a block, so they can wait until after the mma, provided that one mma's 16 k
// come from one block of each of its rows. The tensor cores then multiply the quants as they
// come out of a lop3 (the fp16 number 1024 + q, exact), and per block and row
//     sum_k w_k x_k = c1 * (sum_k (1024 + q_k) x_k + OFF * sum_k x_k) + c3 * sum_k x_k
// in fp32, with c1, c3 from the block's scale (and minimum) and sum_k x_k from a table of
// per-block input sums staged beside X:
//     Q4_0  w = d (q - 8)             c1 = d      OFF = -1032
//     Q4_1  w = d q + m               c1 = d      OFF = -1024   c3 = m
//     Q8_0  w = d q, held as q + 128  c1 = d      OFF = -1152
//     Q4_K  w = (d sc) q - dmin mn    c1 = d sc   OFF = -1024   c3 = -dmin mn
// The large offset costs some fp32 precision in the sum (about 2^-13 of a block's partial
// sum here, against fp16's 2^-11 in the output); no fp16 weight is ever formed, so nothing
// is rounded to fp16 before the mma.
//
// An mma's k are spread over the four lanes t of a quad: each must hold a quarter of the
// same block of its row, which is a 4 x 4 transpose of what coalesced loads deliver.
// ldmatrix does it on the way: the weights go global -> shared with cp.async (no registers;
// issued before the wait for X, QS_STAGES stages ahead) and come back through ldmatrix, which
// gives lane (g, t) word t of each 16-byte row it reads: bytes 4t..4t+3 of a block of row g.
// Word t of a 4-bit block holds weights 4t..4t+3 (low nibbles) and 16 + 4t.. (high); the
// pairs (4t, 4t + 2) and (4t + 1, 4t + 3) are what one lop3 extracts, so X is staged with
// each group of four inputs in the order (0, 2, 1, 3).
//
// Work split: a tile is 16 rows (EPI_SWIGLU: 16 gate and 16 up rows) for B <= 8 tokens;
// warp w takes the stages w, w + 8, ... of the tile's rows (a stage: 128 bytes of quants per
// row, 256 weights of 4 bits or 128 of 8), and the warps' partial sums meet in shared memory
// in a fixed order: a token's result depends on neither B nor its neighbours. A block takes
// the tiles blockIdx.x, + gridDim.x, ... (the grid: as many blocks as fit on the GPU at
// once), and a warp's copies run on from one tile into the next: memory stays busy while
// the block adds up a tile, where a block per tile would load, then compute, then exit.
constexpr int QS_WARPS = 8, QS_STAGES = 2, QS_ROW = 144, QS_XPAD = 16;  // QS_ROW: 128 bytes + 16: ldmatrix's 8 rows on distinct banks

template <bool V> struct Flag { static constexpr bool value = V; };

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* p) {
    const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(p));
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(a));
}
__device__ __forceinline__ void copy_async8(void* dst, const void* src) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.ca.shared.global [%0], [%1], 8;" ::"r"(d), "l"(src));
}
// (w >> s) & 0x000F000F | 0x64006400 in one lop3 (the compiler splits it in two)
__device__ __forceinline__ unsigned nibble_pair(unsigned w, int s) {
    unsigned r;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(w >> s), "r"(0x000F000Fu), "r"(0x64006400u));
    return r;
}

// The A registers of one mma from 4-bit words: words h of rows g and g + 8 (v[2h], v[2h + 1]),
// the nibbles at bit s (pairs of bytes 0, 2) and s + 8 (bytes 1, 3)
__device__ __forceinline__ void nibble_a(const unsigned (&v)[4], int h, int s, unsigned& a0, unsigned& a1,
                                         unsigned& a2, unsigned& a3) {
    a0 = nibble_pair(v[2 * h], s);
    a1 = nibble_pair(v[2 * h + 1], s);
    a2 = nibble_pair(v[2 * h], s + 8);
    a3 = nibble_pair(v[2 * h + 1], s + 8);
}

// WEIGHTS: weights of a row per stage; META: bytes of scales per row per stage (from the
// plane meta_plane(), whose rows are META * stages long); SUBS: 32-weight blocks per 32
// bytes of quants; OFF and MIN (whether c3 is there): the formula above; coef(m, b, c1, c3)
// for block b of the stage, m the row's scales. a(v, e, i, ...): the A registers of mma i (0, 1) of block e of the four
// words v that ldmatrix gave (rows g, g + 8 of the first 16 bytes, then of the next 16).
// QUAD_COEF: coef is costly enough to share (Q4_K: six-bit fields unpacked, integers turned
// into floats): lane t of a quad computes blocks 2t and 2t + 1 of its two rows once per stage,
// and the quad's lanes take the rest from it by shuffle, instead of each lane computing all
// eight (needs SUBS = 2 and eight blocks a stage: block 2j + e is then lane j's).
template <int KIND> struct QsFormat;
template <int KIND> struct Qs4 {  // Q4_0, Q4_1: byte i of a block holds weights i and i + 16
    static constexpr int WEIGHTS = 256, META = KIND == Q4_1 ? 32 : 16, SUBS = 2;
    static constexpr bool MIN = KIND == Q4_1;
    static constexpr bool QUAD_COEF = false;
    static constexpr float OFF = KIND == Q4_1 ? -1024.f : -1032.f;
    static __device__ __forceinline__ const unsigned char* meta_plane(const Planes& p) {
        return reinterpret_cast<const unsigned char*>(p.scale);
    }
    static __device__ __forceinline__ void a(const unsigned (&v)[4], int e, int i, unsigned& a0, unsigned& a1,
                                             unsigned& a2, unsigned& a3) {
        nibble_a(v, e, 4 * i, a0, a1, a2, a3);  // block e: half e; weights 0..15 low nibbles, 16..31 high
    }
    static __device__ __forceinline__ void coef(const unsigned char* m, int b, float& c1, float& c3) {
        if (KIND == Q4_1) {
            const float2 dm = __half22float2(reinterpret_cast<const __half2*>(m)[b]);
            c1 = dm.x;
            c3 = dm.y;
        } else {
            c1 = __half2float(reinterpret_cast<const __half*>(m)[b]);
            c3 = 0.f;
        }
    }
};
template <> struct QsFormat<Q4_0> : Qs4<Q4_0> {};
template <> struct QsFormat<Q4_1> : Qs4<Q4_1> {};
template <> struct QsFormat<Q8_0> {  // 32 int8 a block: a block per 32 bytes
    static constexpr int WEIGHTS = 128, META = 8, SUBS = 1;
    static constexpr bool MIN = false;
    static constexpr bool QUAD_COEF = false;
    static constexpr float OFF = -1152.f;
    static __device__ __forceinline__ const unsigned char* meta_plane(const Planes& p) {
        return reinterpret_cast<const unsigned char*>(p.scale);
    }
    static __device__ __forceinline__ void a(const unsigned (&v)[4], int, int i, unsigned& a0, unsigned& a1,
                                             unsigned& a2, unsigned& a3) {
        const unsigned w0 = v[2 * i] ^ 0x80808080u, w1 = v[2 * i + 1] ^ 0x80808080u;  // q + 128, as unsigned bytes
        a0 = __byte_perm(w0, 0x64646464u, 0x4240);
        a1 = __byte_perm(w1, 0x64646464u, 0x4240);
        a2 = __byte_perm(w0, 0x64646464u, 0x4341);
        a3 = __byte_perm(w1, 0x64646464u, 0x4341);
    }
    static __device__ __forceinline__ void coef(const unsigned char* m, int b, float& c1, float& c3) {
        c1 = __half2float(reinterpret_cast<const __half*>(m)[b]);
        c3 = 0.f;
    }
};
template <> struct QsFormat<Q4_K> {  // 32 bytes hold sub-block 2c (low nibbles) and 2c + 1 (high)
    static constexpr int WEIGHTS = 256, META = 16, SUBS = 2;
    static constexpr bool MIN = true, QUAD_COEF = true;
    static constexpr float OFF = -1024.f;
    static __device__ __forceinline__ const unsigned char* meta_plane(const Planes& p) { return p.meta; }
    static __device__ __forceinline__ void a(const unsigned (&v)[4], int e, int i, unsigned& a0, unsigned& a1,
                                             unsigned& a2, unsigned& a3) {
        nibble_a(v, i, 4 * e, a0, a1, a2, a3);  // sub-block e: nibble e; weights 16i.. in half i
    }
    static __device__ __forceinline__ void coef(const unsigned char* m, int b, float& c1, float& c3) {
        const uint4 h = *reinterpret_cast<const uint4*>(m);
        const float2 dd = __half22float2(*reinterpret_cast<const __half2*>(&h.x));  // (d, dmin)
        int s, mn;
        QFormat<Q4_K, 256>::scale_min(h.y, h.z, h.w, b, s, mn);
        c1 = dd.x * s;
        c3 = -dd.y * mn;
    }
};

// Y[b, n] = sum_k W[n, k] X[b, k] for B <= 8 tokens (as gemv_q, same arguments and epilogues).
// Dynamic shared memory (q_shared in kernels.py): the warps' stage rings, X [B][K + QS_XPAD]
// permuted, the per-block input sums [K / 32][8], the partial sums and 1/rms.
template <int KIND, int K, bool NORM, int EPI>
__global__ void __launch_bounds__(QS_WARPS * 32) gemv_qs(
        const unsigned char* q, const unsigned char* qh, const void* scale, const unsigned char* meta,
        const __half* __restrict__ X, const __half* __restrict__ norm_w, float eps,
        const __half* __restrict__ res, __half* __restrict__ out, int N, int B) {
    using F = QsFormat<KIND>;
    static_assert(K % F::WEIGHTS == 0, "K must hold whole stages");
    constexpr int MATS = (EPI == EPI_SWIGLU) ? 2 : 1;
    constexpr int NS = K / F::WEIGHTS;                 // stages per row
    constexpr int QROW = NS * 128, MROW = NS * F::META; // bytes per row of the quants and the scales
    constexpr int BPS = F::WEIGHTS / 32;               // blocks per stage
    constexpr int SLOT = 16 * QS_ROW + 16 * F::META;   // one stage of one matrix's 16 rows
    constexpr int XS = K + QS_XPAD;
    const Planes p{q, qh, scale, meta};
    const unsigned char* mplane = F::meta_plane(p);
    extern __shared__ __align__(16) unsigned char smem[];
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    unsigned char* ring = smem + warp * (QS_STAGES * MATS * SLOT);
    __half* xs = reinterpret_cast<__half*>(smem + QS_WARPS * QS_STAGES * MATS * SLOT);
    float* xsum = reinterpret_cast<float*>(xs + B * XS);  // [K / 32][8]
    float* part = xsum + (K / 32) * 8;                     // [MATS][WARPS][16][8]
    float* inv = part + MATS * QS_WARPS * 16 * 8;          // [8]
    pdl_launch_dependents();
    const int tiles = (N + 15) / 16, my_tiles = (tiles - blockIdx.x + gridDim.x - 1) / gridDim.x;
    const int mine = (NS - warp + QS_WARPS - 1) / QS_WARPS;  // this warp's stages of a tile: warp + 8 i
    const int total = my_tiles * mine;
    // item n of this warp's sequence (tile n / mine of the block, stage warp + 8 (n % mine))
    // into a slot of its ring: 16 rows x 128 bytes of quants (4 copies of 16 bytes a lane),
    // then 16 rows x META bytes of scales (rows past N read row 0; dropped at the end)
    auto issue = [&](int n, int slot) {
        const int row0 = (blockIdx.x + gridDim.x * (n / mine)) * 16, s = warp + QS_WARPS * (n % mine);
#pragma unroll
        for (int m = 0; m < MATS; m++) {
            unsigned char* dst = ring + (slot * MATS + m) * SLOT;
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const int r = (lane >> 3) + 4 * c, col = lane & 7;
                const size_t row = (size_t)m * N + (row0 + r < N ? row0 + r : 0);
                copy_async16(dst + r * QS_ROW + col * 16, q + row * QROW + s * 128 + col * 16);
            }
            constexpr int CH = F::META < 16 ? F::META : 16, PER_ROW = F::META / CH;
            if (lane < 16 * PER_ROW) {
                const int r = lane / PER_ROW, c = lane % PER_ROW;
                const size_t row = (size_t)m * N + (row0 + r < N ? row0 + r : 0);
                const unsigned char* src = mplane + row * MROW + s * F::META + c * CH;
                unsigned char* d = dst + 16 * QS_ROW + r * F::META + c * CH;
                if (CH == 16) copy_async16(d, src);
                else copy_async8(d, src);
            }
        }
    };
#pragma unroll
    for (int i = 0; i < QS_STAGES; i++) {
        if (i < total) issue(i, i);
        asm volatile("cp.async.commit_group;" ::: "memory");  // (empty groups too: the count stays fixed)
    }
    pdl_wait();
    stage_x_quads<K, NORM, QS_WARPS * 32>(X, norm_w, xs, XS, B);
    if (NORM && warp < B) token_inv_rms<K, 8>(X, eps, inv, warp, lane);
    __syncthreads();
    // the input sums of every 32-weight block, per token (tokens >= B: 0), in k order
    for (int i = threadIdx.x; i < (K / 32) * 8; i += QS_WARPS * 32) {
        const int blk = i >> 3, b = i & 7;
        float s = 0.f;
        if (b < B) {
            const uint4* xv = reinterpret_cast<const uint4*>(xs + b * XS + 32 * blk);
#pragma unroll
            for (int c = 0; c < 4; c++) {
                const uint4 v = xv[c];
                const __half2* v2 = reinterpret_cast<const __half2*>(&v);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float2 f = __half22float2(v2[j]);
                    s += f.x;
                    s += f.y;
                }
            }
        }
        xsum[i] = s;
    }
    __syncthreads();
    // the tiles, twice over: for one token (ONE: lanes g > 0 and odd tokens only feed zeros, so
    // their sums are skipped; token 0's arithmetic is the same in both) and for several
    const int lrow = (lane & 7) + 8 * ((lane >> 3) & 1), lhalf = lane >> 4;  // this lane's ldmatrix row
    auto tiles_loop = [&](auto one) {
        constexpr bool ONE = decltype(one)::value;
        int n = 0;  // this warp's next item
#pragma unroll 1
        for (int tt = 0; tt < my_tiles; tt++) {
            float acc[MATS][4];
#pragma unroll
            for (int m = 0; m < MATS; m++)
#pragma unroll
                for (int i = 0; i < 4; i++) acc[m][i] = 0.f;
#pragma unroll 1
            for (int i = 0; i < mine; i++, n++) {
                asm volatile("cp.async.wait_group %0;" ::"n"(QS_STAGES - 1) : "memory");
                __syncwarp();
                const int s = warp + QS_WARPS * i, slot = n % QS_STAGES;
                const unsigned char* base = ring + slot * MATS * SLOT;
                float qc[MATS][2][2][2];  // QUAD_COEF: blocks 2t + e of rows g, g + 8 ([m][h][e]: c1, c3)
                if constexpr (F::QUAD_COEF) {
                    static_assert(F::SUBS == 2 && BPS == 8, "block 2j + e must be lane j's");
#pragma unroll
                    for (int m = 0; m < MATS; m++)
#pragma unroll
                        for (int h = 0; h < 2; h++)
#pragma unroll
                            for (int e = 0; e < 2; e++)
                                F::coef(base + m * SLOT + 16 * QS_ROW + (g + 8 * h) * F::META, 2 * t + e,
                                        qc[m][h][e][0], qc[m][h][e][1]);
                }
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    unsigned v[MATS][4];
#pragma unroll
                    for (int m = 0; m < MATS; m++) ldmatrix_x4(v[m], base + m * SLOT + lrow * QS_ROW + 32 * j + 16 * lhalf);
#pragma unroll
                    for (int e = 0; e < F::SUBS; e++) {
                        const int blk = F::SUBS * j + e, kb = s * F::WEIGHTS + 32 * blk;
                        const uint2* xb = reinterpret_cast<const uint2*>(xs + g * XS + kb + 4 * t);
                        const bool feeds = ONE ? g == 0 : g < B;
                        const uint2 x0 = feeds ? xb[0] : make_uint2(0, 0), x1 = feeds ? xb[4] : make_uint2(0, 0);
                        const float2 sx = *reinterpret_cast<const float2*>(xsum + (s * BPS + blk) * 8 + 2 * t);
#pragma unroll
                        for (int m = 0; m < MATS; m++) {
                            float y[4] = {0.f, 0.f, 0.f, 0.f};
                            unsigned a0, a1, a2, a3;
                            F::a(v[m], e, 0, a0, a1, a2, a3);
                            mma_16816(y, a0, a1, a2, a3, x0.x, x0.y);
                            F::a(v[m], e, 1, a0, a1, a2, a3);
                            mma_16816(y, a0, a1, a2, a3, x1.x, x1.y);
                            const unsigned char* mrow = base + m * SLOT + 16 * QS_ROW;
                            float c1g, c3g, c1h, c3h;
                            if constexpr (F::QUAD_COEF) {
                                const int src = (lane & ~3) | j;  // the quad's lane that has block blk
                                c1g = __shfl_sync(0xffffffffu, qc[m][0][e][0], src);
                                c3g = __shfl_sync(0xffffffffu, qc[m][0][e][1], src);
                                c1h = __shfl_sync(0xffffffffu, qc[m][1][e][0], src);
                                c3h = __shfl_sync(0xffffffffu, qc[m][1][e][1], src);
                            } else {
                                F::coef(mrow + g * F::META, blk, c1g, c3g);
                                F::coef(mrow + (g + 8) * F::META, blk, c1h, c3h);
                            }
                            const float c1[4] = {c1g, c1g, c1h, c1h}, c3[4] = {c3g, c3g, c3h, c3h};
                            const float sxi[4] = {sx.x, sx.y, sx.x, sx.y};
#pragma unroll
                            for (int q = 0; q < 4; q++) {
                                if (ONE && (q & 1)) continue;  // token 2t + 1: never token 0
                                if (F::MIN) acc[m][q] = fmaf(c3[q], sxi[q], acc[m][q]);
                                acc[m][q] = fmaf(c1[q], fmaf(F::OFF, sxi[q], y[q]), acc[m][q]);
                            }
                        }
                    }
                }
                __syncwarp();  // every lane done with the slot before it is refilled
                if (n + QS_STAGES < total) issue(n + QS_STAGES, slot);
                asm volatile("cp.async.commit_group;" ::: "memory");
            }
            store_partials<MATS, QS_WARPS>(part, acc, warp, g, t);
            __syncthreads();
            finish_rows<MATS, QS_WARPS, NORM, EPI>(part, inv, res, out, (blockIdx.x + gridDim.x * tt) * 16, N, B);
            __syncthreads();  // the partial sums read before the next tile's overwrite them
        }
    };
    if (B == 1) tiles_loop(Flag<true>{});
    else tiles_loop(Flag<false>{});
}
