// The fused CUDA kernels of tinyllm's decode step (compiled at run time by CuPy/NVRTC).
//
// Batch-1 decode reads every weight once per token and does two FLOPs per weight, so it
// is bound by memory bandwidth: the kernels below exist to read weights with wide
// (16-byte) loads, keep everything else out of device memory, and be few (each launch
// and each kernel's ramp-up/tail costs a few microseconds, as much as reading an 8 MB
// matrix). Every kernel mirrors the rounding of the readable CuPy operation it replaces
// (16-bit storage, fp32 arithmetic), so the fast path agrees with model.py to the last bit
// where the summation order allows.
//
// Shape letters as in tinyllm/config.py. Weights are stored (out, in), row-major, in the
// model's element type T: fp16 (__half) or bf16 (__nv_bfloat16). Every kernel that computes
// on them is a template on T (the embedding only copies 16-bit values); both types are 16
// bits, so loads, shared-memory layouts and tensor-core fragments are the same, and only the
// conversions to and from fp32 and the mma instruction's type name differ.

#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define FULL_MASK 0xffffffffu
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over the whole block (blockDim.x a multiple of 32); every thread gets the result.
__device__ float block_sum(float v, float* red) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();  // red may still be read by a previous call
    if (lane == 0) red[wid] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? red[threadIdx.x] : 0.f;
    if (wid == 0) v = warp_sum(v);
    if (threadIdx.x == 0) red[32] = v;
    __syncthreads();
    return red[32];
}

__device__ float block_max(float v, float* red) {
    v = warp_max(v);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) red[wid] = v;
    __syncthreads();
    v = (threadIdx.x < (blockDim.x >> 5)) ? red[threadIdx.x] : -INFINITY;
    if (wid == 0) v = warp_max(v);
    if (threadIdx.x == 0) red[32] = v;
    __syncthreads();
    return red[32];
}

// The element type T's conversions (fp32 <-> T, rounding to nearest even) and its pair
// type, two elements in one 32-bit register (what a 16-byte load holds four of).
__device__ __forceinline__ float to_f(__half h) { return __half2float(h); }
__device__ __forceinline__ float to_f(__nv_bfloat16 h) { return __bfloat162float(h); }
__device__ __forceinline__ float2 to_f2(__half2 h) { return __half22float2(h); }
// bf16 is the top half of an fp32: two shifts/masks, no conversion instruction (and unlike
// __bfloat1622float2's inline asm, ptxas can interleave them with the FMAs: no extra registers)
__device__ __forceinline__ float2 to_f2(__nv_bfloat162 h) {
    const unsigned u = *reinterpret_cast<const unsigned*>(&h);
    return make_float2(__uint_as_float(u << 16), __uint_as_float(u & 0xffff0000u));
}
template <typename T> __device__ __forceinline__ T from_f(float f);
template <> __device__ __forceinline__ __half from_f<__half>(float f) { return __float2half_rn(f); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float f) { return __float2bfloat16_rn(f); }
template <typename T> struct Pair;
template <> struct Pair<__half> {
    static constexpr bool bf16 = false;
    using type = __half2;
    static __device__ __forceinline__ __half2 make(float a, float b) { return __floats2half2_rn(a, b); }
};
template <> struct Pair<__nv_bfloat16> {
    static constexpr bool bf16 = true;
    using type = __nv_bfloat162;
    static __device__ __forceinline__ __nv_bfloat162 make(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

// silu(gate) * up, each step rounded to T as CuPy evaluates the readable op in fp16 (in bf16,
// CuPy takes `1.0 + e` and the division in fp32 and the op rounds silu once: an ulp apart at times)
template <typename T>
__device__ __forceinline__ T silu_mul(T g, T up) {
    const T e = from_f<T>(expf(-to_f(g)));
    const T d = from_f<T>(1.f + to_f(e));
    return __hmul(__hdiv(g, d), up);
}

// Weights are streamed once per token: load them through the read-only path and ask L1
// not to keep them, so the activations that every warp re-reads stay cached.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// ---------------------------------------------------------------------------------------
// Programmatic dependent launch (Hopper): a kernel launched with the PDL attribute may
// start while the kernel before it is still running. It must call pdl_wait() before it
// reads anything the previous kernel wrote (or writes anything it reads); what comes
// before (weights, old cache entries) overlaps the previous kernel's tail. Each kernel
// calls pdl_launch_dependents() first thing, so the next one is launched as soon as all
// of this one's blocks are running. Without the attribute both are no-ops.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: ); }

// ---------------------------------------------------------------------------------------
// Embedding: one row of the table per token, the ids read from device memory; a copy of
// 16-bit values, the same for either element type.
// An id outside [0, V) gives a row of zeros, never a read past the table: the sampling
// kernel leaves V where logits name no token (NaN), and a step queued behind that one has
// already read it as its input before the host refuses the id.
// blockIdx.y: which token.   token: [B] -> out: [B, D]
extern "C" __global__ void embedding(const unsigned short* __restrict__ table, const long long* __restrict__ token,
                                     unsigned short* __restrict__ out, int D, long long V) {
    asm volatile("griddepcontrol.launch_dependents;" ::: );  // let layer 0's GEMV start loading weights
    const long long row = token[blockIdx.y];
    const bool inside = row >= 0 && row < V;
    out += (size_t)blockIdx.y * D;
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < D; i += gridDim.x * blockDim.x)
        out[i] = inside ? table[row * D + i] : (unsigned short)0;
}

// ---------------------------------------------------------------------------------------
// RMSNorm of rows: out = T(T(x * inv_rms) * w), inv_rms = 1 / sqrt(mean(x^2) + eps) in fp32.
// One block per row.  x: [rows, D] -> [rows, D]
// Where D is a multiple of 8 and the rows are 16-byte aligned, each thread loads its share of
// the row as 16-byte vectors (up to NORM_VECS of them) once and keeps them in registers for
// the second pass: a row is one round trip to memory, not two of 2-byte loads. Launched
// programmatically inside a captured step, the weights' loads overlap the kernel before it.
#define NORM_VECS 8
template <typename T>
__global__ void __launch_bounds__(512) rms_norm_rows(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ out, int D,
                              float eps) {
    using P = typename Pair<T>::type;
    __shared__ float red[33];
    pdl_launch_dependents();
    const T* xr = x + (size_t)blockIdx.x * D;
    T* o = out + (size_t)blockIdx.x * D;
    const int n_vec = D / 8;
    const bool vec = (D & 7) == 0 && n_vec <= NORM_VECS * (int)blockDim.x
                     && ((reinterpret_cast<size_t>(xr) | reinterpret_cast<size_t>(o) | reinterpret_cast<size_t>(w)) & 15) == 0;
    if (vec) {
        uint4 wv[NORM_VECS], xv[NORM_VECS];
#pragma unroll
        for (int u = 0; u < NORM_VECS; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i < n_vec) wv[u] = reinterpret_cast<const uint4*>(w)[i];
        }
        pdl_wait();  // x is the previous kernel's output
        float ss = 0.f;
#pragma unroll
        for (int u = 0; u < NORM_VECS; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i < n_vec) {
                xv[u] = reinterpret_cast<const uint4*>(xr)[i];
                const P* h = reinterpret_cast<const P*>(&xv[u]);
#pragma unroll
                for (int j = 0; j < 4; j++) { const float2 f = to_f2(h[j]); ss += f.x * f.x + f.y * f.y; }
            }
        }
        ss = block_sum(ss, red);
        const float inv = 1.f / sqrtf(ss / D + eps);
#pragma unroll
        for (int u = 0; u < NORM_VECS; u++) {
            const int i = threadIdx.x + u * blockDim.x;
            if (i < n_vec) {
                const P* h = reinterpret_cast<const P*>(&xv[u]);
                const P* g = reinterpret_cast<const P*>(&wv[u]);
                uint4 ov;
                P* r = reinterpret_cast<P*>(&ov);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float2 f = to_f2(h[j]);
                    r[j] = __hmul2(Pair<T>::make(f.x * inv, f.y * inv), g[j]);
                }
                reinterpret_cast<uint4*>(o)[i] = ov;
            }
        }
        return;
    }
    pdl_wait();
    float ss = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) { float f = to_f(xr[i]); ss += f * f; }
    ss = block_sum(ss, red);
    const float inv = 1.f / sqrtf(ss / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        o[i] = __hmul(from_f<T>(to_f(xr[i]) * inv), w[i]);
}

// ---------------------------------------------------------------------------------------
// A prompt's element-wise steps, one launch each instead of the 5 to 8 CuPy calls of the
// readable op (a prefill is host-bound: every call costs ~20 us of Python and launch).
// Each rounds exactly like the readable op it replaces.

// RoPE of R token rows x N heads: out = T(x1*cos - x2*sin), T(x2*cos + x1*sin) in
// fp32 without FMA (as NumPy/CuPy compute `x1 * cos - x2 * sin` then cast).
// x: row r at x + r * row_stride, heads contiguous [N, E];  cos, sin: [cos_rows, E/2]
// (cos_rows = R: a row each; else row r uses r % Tn);  out: [R, N, E] contiguous.
template <typename T>
__global__ void rope_rows(const T* __restrict__ x, long long row_stride, int N, int E,
                          const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                          int cos_rows, int Tn, long long R, T* __restrict__ out) {
    const int half = E / 2;
    const long long total = R * N * half;
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < total;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long r = idx / (N * half);
        const int n = (int)((idx / half) % N), i = (int)(idx % half);
        const long long c_row = (cos_rows == R) ? r : r % Tn;
        const float c = cos_t[c_row * half + i], s = sin_t[c_row * half + i];
        const T* xr = x + r * row_stride + (long long)n * E;
        const float x1 = to_f(xr[i]), x2 = to_f(xr[i + half]);
        T* o = out + (r * N + n) * E;
        o[i] = from_f<T>(__fsub_rn(__fmul_rn(x1, c), __fmul_rn(x2, s)));
        o[i + half] = from_f<T>(__fadd_rn(__fmul_rn(x2, c), __fmul_rn(x1, s)));
    }
}

// Softmax of each row of x [rows, S] (fp32), in place: one block per row.
extern "C" __global__ void softmax_rows(float* x, int S) {
    __shared__ float red[33];
    float* row = x + (size_t)blockIdx.x * S;
    float m = -INFINITY;
    for (int i = threadIdx.x; i < S; i += blockDim.x) m = fmaxf(m, row[i]);
    m = block_max(m, red);
    float sum = 0.f;
    for (int i = threadIdx.x; i < S; i += blockDim.x) { const float e = expf(row[i] - m); row[i] = e; sum += e; }
    sum = block_sum(sum, red);
    for (int i = threadIdx.x; i < S; i += blockDim.x) row[i] /= sum;
}

// A prompt block's attention weights, in place: x [rows, S] holds the scores in T, row r for
// query r % t of the block's t new tokens, which sees keys 0 .. pos + r % t (the causal mask);
// each row becomes its softmax over those keys (fp32 inside, rounded to T once), 0 past them.
// One kernel for what the readable op does in five passes over fp32 copies (cast, mask, max,
// exp and sum, cast back). One block per row.
template <typename T>
__global__ void causal_softmax_rows(T* x, int S, int t, int pos) {
    __shared__ float red[33];
    T* row = x + (size_t)blockIdx.x * S;
    const int n = min(S, pos + (int)(blockIdx.x % t) + 1);
    float m = -INFINITY;
    for (int i = threadIdx.x; i < n; i += blockDim.x) m = fmaxf(m, to_f(row[i]));
    m = block_max(m, red);
    float sum = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += expf(to_f(row[i]) - m);
    sum = block_sum(sum, red);
    for (int i = threadIdx.x; i < S; i += blockDim.x)
        row[i] = from_f<T>(i < n ? expf(to_f(row[i]) - m) / sum : 0.f);
}

// SiLU(gate) * up for R rows of [gate | up], rounding each step to T (silu_mul) like CuPy's
// `gate / (1.0 + exp(-gate)) * up`.  gate_up: [R, 2F] -> out: [R, F]
template <typename T>
__global__ void swiglu_rows(const T* __restrict__ gate_up, T* __restrict__ out, int F, long long R) {
    for (long long idx = blockIdx.x * (long long)blockDim.x + threadIdx.x; idx < R * F;
         idx += (long long)gridDim.x * blockDim.x) {
        const long long r = idx / F;
        const int j = (int)(idx % F);
        out[idx] = silu_mul(gate_up[r * 2 * F + j], gate_up[r * 2 * F + F + j]);
    }
}


// ---------------------------------------------------------------------------------------
// GEMV with fp32 accumulation: y[n] = sum_k W[n, k] * h[k].  One warp per output row (or
// S warps, for rows too long for one warp's registers: GemvSplit); each lane issues all its
// 16-byte weight loads before anything else (K is a compile-time constant, so the loop
// unrolls and the loads stay in registers).
//
//   NORM:  h = rms_norm(x) * norm_w, fused: y = inv_rms * sum_k W[n, k] * (x[k] * norm_w[k]),
//          where each warp gets sum(x^2) from the x values it reads anyway: no extra
//          pass (a split row's warps add theirs with their partial sums; h is never
//          rounded to T here, unlike the readable path: the results differ by one
//          rounding of T, ~1e-3 relative in fp16)
//   EPI 0: out[n] = T(y[n])
//   EPI 1: out[n] = res[n] + T(y[n])                       (the residual connection)
//   EPI 2: rows n and n + N: out[n] = silu(T(y[n])) * T(y[n + N])   (gate | up)
enum { EPI_STORE = 0, EPI_RESIDUAL = 1, EPI_SWIGLU = 2 };

// out[i] from the fp32 sums y (and u, the up row, for EPI_SWIGLU), per epilogue
template <int EPI, typename T>
__device__ __forceinline__ void epilogue(float y, float u, const T* __restrict__ res, T* __restrict__ out, size_t i) {
    if (EPI == EPI_SWIGLU) {
        out[i] = silu_mul(from_f<T>(y), from_f<T>(u));
    } else {
        const T yh = from_f<T>(y);
        out[i] = (EPI == EPI_RESIDUAL) ? __hadd(__ldcg(res + i), yh) : yh;
    }
}

// A lane holds its share of a weight row in registers (the loads issue before any
// arithmetic). Past 24 16-byte vectors per lane (96 registers), ptxas spills them to local
// memory, which costs more than splitting the row: then S warps share a row, each over
// a contiguous part of K (the last part shorter when S does not divide the row), and their
// sums meet in shared memory (fixed order: the bits depend on K only). S = 1 for every row
// that fits.
template <int K, int EPI>
struct GemvSplit {
    static constexpr int MATS = (EPI == EPI_SWIGLU) ? 2 : 1;
    static constexpr int NV = K / 8;                 // 16-byte vectors in a row
    static constexpr bool fits(int s) { return (((NV + s - 1) / s + 31) / 32) * MATS <= 24; }
    static constexpr int S = fits(1) ? 1 : fits(2) ? 2 : fits(4) ? 4 : 8;
    static constexpr int NVP = (NV + S - 1) / S;     // vectors per warp's part of the row (at most)
    static constexpr int PER_LANE = (NVP + 31) / 32;
};

template <int N>
struct Row {  // one lane's share of (a part of) a weight row, held in registers
    uint4 v[N];
};

// vectors [0, n) of a part (n = NVP, or fewer for the last part of a split row)
template <int PER_LANE, typename T>
__device__ __forceinline__ void load_row(Row<PER_LANE>& r, const T* __restrict__ wpart, int n, int lane) {
    const uint4* w = reinterpret_cast<const uint4*>(wpart);
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int c = i * 32 + lane;
        if (c < n) r.v[i] = load_stream(w + c);
    }
}

template <typename T>
__device__ __forceinline__ void fma8(const uint4& w, const float (&h)[8], float& acc) {
    const typename Pair<T>::type* w2 = reinterpret_cast<const typename Pair<T>::type*>(&w);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 a = to_f2(w2[j]);
        acc = fmaf(a.x, h[2 * j], acc);
        acc = fmaf(a.y, h[2 * j + 1], acc);
    }
}

// One 16-byte vector of x as eight fp32 values; with NORM, times the norm weights' vector g,
// the squares (of x, before the weights) added to ss
template <typename T, bool NORM>
__device__ __forceinline__ void x_values(const uint4& xr, const uint4* g, float (&h)[8], float& ss) {
    using T2 = typename Pair<T>::type;
    const T2* x2 = reinterpret_cast<const T2*>(&xr);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 f = to_f2(x2[j]);
        h[2 * j] = f.x; h[2 * j + 1] = f.y;
    }
    if (NORM) {
        const uint4 nr = *g;
        const T2* n2 = reinterpret_cast<const T2*>(&nr);
#pragma unroll
        for (int j = 0; j < 4; j++) {
            const float2 w = to_f2(n2[j]);
            ss = fmaf(h[2 * j], h[2 * j], ss);
            ss = fmaf(h[2 * j + 1], h[2 * j + 1], ss);
            h[2 * j] *= w.x; h[2 * j + 1] *= w.y;
        }
    }
}

template <typename T, int K, bool NORM, int EPI>
__global__ void __launch_bounds__(512) gemv(const T* __restrict__ W, const T* __restrict__ x,
                                             const T* __restrict__ norm_w, float eps,
                                             const T* __restrict__ res, T* __restrict__ out, int N) {
    static_assert(K % 8 == 0, "K must be a multiple of 8 (16-byte rows)");
    using P = GemvSplit<K, EPI>;
    constexpr int S = P::S, NV = P::NV, NVP = P::NVP, PER_LANE = P::PER_LANE;
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * ((blockDim.x >> 5) / S) + warp / S;
    const int first = (warp % S) * NVP;   // this warp's first vector of the row
    const int n_here = NV - first < NVP ? NV - first : NVP;  // and how many it takes
    const bool active = row < N;
    // a split row's warps all reach the barrier below: rows past N load row N - 1 (dropped)
    const size_t lrow = active ? row : N - 1;
    Row<PER_LANE> wa, wb;
    if (active || S > 1) {
        load_row<PER_LANE>(wa, W + lrow * K + first * 8, n_here, lane);
        if (EPI == EPI_SWIGLU) load_row<PER_LANE>(wb, W + (lrow + N) * K + first * 8, n_here, lane);
    }
    // the "memory" clobber in pdl_wait keeps every activation load behind the weight loads
    pdl_wait();
    // x, written by the previous kernel, is read once per block into shared memory with
    // L2-only loads (ld.global.cg): an L1 line cached before this kernel may be stale when
    // kernels overlap, and every warp of the block reads all of x
    __shared__ __align__(16) T xs[K];
    for (int i = threadIdx.x; i < NV; i += blockDim.x)
        reinterpret_cast<uint4*>(xs)[i] = __ldcg(reinterpret_cast<const uint4*>(x) + i);
    __syncthreads();
    // (the branch keeps ptxas from sinking the weight loads to their first use)
    if (S == 1 && !active) return;
    const uint4* xv = reinterpret_cast<const uint4*>(xs) + first;
    const uint4* nv = reinterpret_cast<const uint4*>(norm_w) + first;
    float acc_a = 0.f, acc_b = 0.f, ss = 0.f;
#pragma unroll
    for (int i = 0; i < PER_LANE; i++) {
        const int c = i * 32 + lane;
        if (c < n_here) {
            float h[8];
            x_values<T, NORM>(xv[c], nv + c, h, ss);
            fma8<T>(wa.v[i], h, acc_a);
            if (EPI == EPI_SWIGLU) fma8<T>(wb.v[i], h, acc_b);
        }
    }
    float y = warp_sum(acc_a);
    float u = (EPI == EPI_SWIGLU) ? warp_sum(acc_b) : 0.f;
    float sq = NORM ? warp_sum(ss) : 0.f;
    if (S > 1) {  // the parts of a split row, summed in order by the row's first warp
        __shared__ float parts[16][3];
        if (lane == 0) { parts[warp][0] = y; parts[warp][1] = u; parts[warp][2] = sq; }
        __syncthreads();
        if (warp % S != 0 || !active) return;
        y = u = sq = 0.f;
#pragma unroll
        for (int p = 0; p < S; p++) { y += parts[warp + p][0]; u += parts[warp + p][1]; sq += parts[warp + p][2]; }
    }
    if (NORM) {
        const float inv = 1.f / sqrtf(sq / K + eps);
        y *= inv;
        u *= inv;
    }
    if (lane == 0) epilogue<EPI>(y, u, res, out, row);
}

// ---------------------------------------------------------------------------------------
// gemv_stream: the same product, with the weights streamed through shared memory.
//
// `gemv` holds a row in registers, so the bytes a block has in flight are bounded by its
// registers, and the blocks that fit on an SM are few: a layer's small matrices end before
// memory is busy, and the next launch's first wave waits for free registers. Here every warp
// streams its own rows through a ring of `slots` pieces in shared memory (4 KB each, SwiGLU:
// the gate piece and the up piece), filled by the copy engine (one cp.async.bulk per piece,
// issued by lane 0, completing on the slot's mbarrier), so a warp keeps `slots` pieces in
// flight while it multiplies the oldest, at the cost of no registers. The grid is persistent
// (what fits on the GPU at once); warp g of G takes rows g, g + G, ... Before pdl_wait a
// warp already asks for its first pieces: the weights do not depend on the kernel before.
//
// x (normed, when NORM: h = x * g, the 1/rms applied to the sums as in `gemv`) is staged once
// per block as fp32, each 16-byte vector's first and second four values in two arrays, so a
// warp's reads of one vector per lane are contiguous. A row is summed by one warp in the
// order of `gemv` (lane l: vectors l, l + 32, ... in turn; then the warp's butterfly), so a
// row's bits depend on K only, never on the grid.
constexpr int STREAM_WARPS = 8;
constexpr int STREAM_PIECE = 4096;  // bytes of one row piece (256 16-byte vectors)

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void mbar_init(unsigned bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" :: "r"(bar) : "memory");
}

__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile("{\n"
                 ".reg .pred done;\n"
                 "WAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n"
                 "}" :: "r"(bar), "r"(parity) : "memory");
}

// bytes from global src into shared dst, completing on the mbarrier (which expects them)
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
    asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];"
                 :: "r"(dst), "l"(src), "r"(bytes), "r"(bar) : "memory");
}

template <typename T, int K, bool NORM, int EPI>
__global__ void __launch_bounds__(STREAM_WARPS * 32) gemv_stream(
        const T* __restrict__ W, const T* __restrict__ x, const T* __restrict__ norm_w, float eps,
        const T* __restrict__ res, T* __restrict__ out, int N, int slots) {
    static_assert(K % 8 == 0, "K must be a multiple of 8 (16-byte rows)");
    constexpr int MATS = (EPI == EPI_SWIGLU) ? 2 : 1;
    constexpr int NV = K / 8;                              // 16-byte vectors in a row
    constexpr int PV = STREAM_PIECE / 16;                  // vectors in a piece
    constexpr int PIECES = (NV + PV - 1) / PV;
    constexpr int PER_LANE = ((NV < PV ? NV : PV) + 31) / 32;
    extern __shared__ __align__(128) unsigned char smem[];
    float4* xa = reinterpret_cast<float4*>(smem);          // x[8v .. 8v + 3]
    float4* xb = xa + NV;                                  // x[8v + 4 .. 8v + 7]
    __shared__ float red[33];
    unsigned long long* bars = reinterpret_cast<unsigned long long*>(smem + 32 * NV);
    uint4* ring = reinterpret_cast<uint4*>(smem + 32 * NV + ((8 * STREAM_WARPS * slots + 127) & ~127));
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int g = blockIdx.x * STREAM_WARPS + warp, G = gridDim.x * STREAM_WARPS;
    const int units = (g < N ? (N - 1 - g) / G + 1 : 0) * PIECES;  // (row, piece) pairs, in order
    const unsigned bar0 = smem_addr(bars + warp * slots);
    uint4* wring = ring + (size_t)warp * slots * MATS * PV;
    auto vectors = [](int piece) { return (NV - piece * PV) < PV ? (NV - piece * PV) : PV; };  // (the last is shorter)
    auto issue = [&](int u) {  // lane 0: unit u into its slot
        const int slot = u % slots, piece = u % PIECES;
        const size_t row = g + (size_t)(u / PIECES) * G;
        const unsigned bytes = vectors(piece) * 16, bar = bar0 + 8 * slot;
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" :: "r"(bar), "r"(bytes * MATS) : "memory");
#pragma unroll
        for (int m = 0; m < MATS; m++)
            bulk_copy(smem_addr(wring + (slot * MATS + m) * PV), W + (row + m * (size_t)N) * K + (size_t)piece * PV * 8,
                      bytes, bar);
    };
    if (lane == 0 && units > 0) {
        for (int i = 0; i < slots; i++) mbar_init(bar0 + 8 * i);
        asm volatile("fence.mbarrier_init.release.cluster;\n fence.proxy.async.shared::cta;" ::: "memory");
        for (int u = 0; u < slots && u < units; u++) issue(u);
    }
    pdl_wait();
    // x, written by the previous kernel, through L2 only (see gemv)
    float ss = 0.f;
    for (int v = threadIdx.x; v < NV; v += blockDim.x) {
        float h[8];
        x_values<T, NORM>(__ldcg(reinterpret_cast<const uint4*>(x) + v), reinterpret_cast<const uint4*>(norm_w) + v, h, ss);
        xa[v] = make_float4(h[0], h[1], h[2], h[3]);
        xb[v] = make_float4(h[4], h[5], h[6], h[7]);
    }
    const float inv = NORM ? 1.f / sqrtf(block_sum(ss, red) / K + eps) : 1.f;  // (block_sum syncs)
    if (!NORM) __syncthreads();
    __syncwarp();
    float acc_a = 0.f, acc_b = 0.f;
    for (int u = 0; u < units; u++) {
        const int slot = u % slots, piece = u % PIECES;
        mbar_wait(bar0 + 8 * slot, (u / slots) & 1);
        const uint4* wv = wring + slot * MATS * PV;
        const int nv = vectors(piece);
#pragma unroll
        for (int i = 0; i < PER_LANE; i++) {
            const int c = i * 32 + lane;
            if (c < nv) {
                const float4 a = xa[piece * PV + c], b = xb[piece * PV + c];
                const float h[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
                fma8<T>(wv[c], h, acc_a);
                if (EPI == EPI_SWIGLU) fma8<T>(wv[PV + c], h, acc_b);
            }
        }
        __syncwarp();  // every lane is done with the slot before the copy engine refills it
        if (lane == 0 && u + slots < units) {
            asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
            issue(u + slots);
        }
        if (piece == PIECES - 1) {
            const float y = warp_sum(acc_a) * inv;
            const float up = (EPI == EPI_SWIGLU) ? warp_sum(acc_b) * inv : 0.f;
            if (lane == 0) epilogue<EPI>(y, up, res, out, g + (size_t)(u / PIECES) * G);
            acc_a = acc_b = 0.f;
        }
    }
}

// ---------------------------------------------------------------------------------------
// The same GEMV for B tokens at once (continuous batching, B <= 8 * NT): Y[b, n] =
// sum_k W[n, k] * X[b, k]. The weights are still read once, but each weight now meets B
// inputs, and on CUDA cores the fp16->fp32 conversions alone would cost more than the
// memory. So this kernel runs on the tensor cores: one mma.m16n8k16 multiplies a 16x16
// tile of W by a 16x8 tile of X^T (8 tokens), T in, fp32 accumulate.
//
// The tile layout trick: a dot product may visit k in any order, as long as W and X use
// the same one. mma wants each thread to hold, for rows g and g+8 of the tile (g = lane/4),
// the k indices {2t, 2t+1, 2t+8, 2t+9} (t = lane%4). Instead of gathering those, each
// thread loads 8 consecutive k (one 16-byte vector, coalesced: 4 threads read 64 bytes of
// a row) and hands its halves 0-3 and 4-7 to two mmas as if they were those indices; the
// X fragment (token g's inputs, from shared memory) is loaded at the same k. Per 64-wide
// k tile a thread loads two vectors per row and issues four mmas.
//
// Block: 16 output rows (EPI_SWIGLU: 16 gate and the 16 matching up rows), 8 warps that
// split K between them (tiles w, w+8, ...); their partial sums meet in shared memory.
// X (normed when NORM, and rounded to T: mma's input) is staged once per block in
// dynamic shared memory, its rows padded by 32 halves so that the 8 threads of a
// quarter-warp hit distinct banks. Rows b >= B of the tile are zeros.
//   W: [N, K] ([2N, K] for EPI_SWIGLU);  X: [B, K];  res, out: [B, N]
template <typename T = __half>
__device__ __forceinline__ void mma_16816(float (&d)[4], unsigned a0, unsigned a1, unsigned a2, unsigned a3,
                                          unsigned b0, unsigned b1) {
    if constexpr (Pair<T>::bf16) {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    } else {
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                     "{%8, %9}, {%0, %1, %2, %3};"
                     : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                     : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
    }
}

// the mma accumulators [matrix][8-token tile][4] and the per-token sums of squares, zeroed
template <int MATS, int NT>
__device__ __forceinline__ void zero_sums(float (&acc)[MATS][NT][4], float (&ss)[NT]) {
#pragma unroll
    for (int n = 0; n < NT; n++) {
        ss[n] = 0.f;
#pragma unroll
        for (int m = 0; m < MATS; m++)
#pragma unroll
            for (int i = 0; i < 4; i++) acc[m][n][i] = 0.f;
    }
}

constexpr int ROWS_WARPS = 8;   // warps per block of gemv_rows
constexpr int ROWS_PAD = 32;    // halves of padding per staged X row
constexpr int ROWS_SMEM = 200 * 1024;  // the dynamic shared memory a block may take (of 227 KB)

// K is staged in chunks of KC columns, KC a multiple of 8 warps x 64: as many whole rounds
// of tiles as fit beside the partial sums, so that B tokens fit whatever K is.
// (The block's dynamic shared memory, bytes: NT*8*(KC + ROWS_PAD)*2 + MATS*ROWS_WARPS*16*NT*8*4
// + NT*8*4; kernels.py computes the same.)
template <int K, int EPI, int NT>
struct RowsChunk {
    static constexpr int TILES = K / 64, PER_WARP = (TILES + ROWS_WARPS - 1) / ROWS_WARPS;
    static constexpr int MATS = (EPI == EPI_SWIGLU) ? 2 : 1;
    static constexpr int PART = MATS * ROWS_WARPS * 16 * NT * 8 * 4 + NT * 8 * 4;
    static constexpr int ROUND = NT * 8 * ROWS_WARPS * 64 * 2;            // bytes of X per round of tiles
    static constexpr int FIT = (ROWS_SMEM - PART - NT * 8 * ROWS_PAD * 2) / ROUND;
    static constexpr int CT = FIT < 1 ? 1 : (FIT > PER_WARP ? PER_WARP : FIT);  // tiles per warp per chunk
    static constexpr int KC = CT * ROWS_WARPS * 64;                       // columns per chunk
    static constexpr int CHUNKS = (PER_WARP + CT - 1) / CT;
};

// Stage columns [k0, k0 + cols) of every token's X (T, times the norm weight when NORM)
// into xs; one warp per token, each lane over the same 16-byte vectors, in the same order,
// as a single pass over K would take them, so ss (each lane's running sum of squares,
// carried across chunks) adds in one order whatever the chunk size. Every block stages all
// of X from L2, and with many tokens that is many round trips if loaded a vector at a time
// through registers; so a lane first starts every copy of its vectors (cp.async: global ->
// shared, no registers), waits once, and then normalizes its own vectors in place.
// cp.async: global -> shared without registers; src_bytes = 0 writes 16 zero bytes
__device__ __forceinline__ void copy_async16(void* dst, const void* src, int src_bytes = 16) {
    const unsigned d = static_cast<unsigned>(__cvta_generic_to_shared(dst));
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(d), "l"(src), "r"(src_bytes));
}

template <bool NORM, int K, int XS, int NT, typename T>
__device__ __forceinline__ void stage_rows(const T* __restrict__ X, const T* __restrict__ norm_w,
                                           T* xs, float (&ss)[NT], int k0, int cols, int B, int warp, int lane) {
    using T2 = typename Pair<T>::type;
    const int n = cols / 8;  // 16-byte vectors per row
#pragma unroll
    for (int s = 0; s < NT; s++) {
        const int b = warp + ROWS_WARPS * s;
        uint4* dst = reinterpret_cast<uint4*>(xs + b * XS);
        if (b >= B) {
            for (int i = lane; i < n; i += 32) dst[i] = make_uint4(0, 0, 0, 0);
            continue;
        }
        const uint4* src = reinterpret_cast<const uint4*>(X + (size_t)b * K + k0);
        for (int i = lane; i < n; i += 32) copy_async16(dst + i, src + i);
    }
    asm volatile("cp.async.wait_all;" ::: "memory");
    if (!NORM) return;
    const uint4* nsrc = reinterpret_cast<const uint4*>(norm_w + k0);
    for (int i = lane; i < n; i += 32) {
        const uint4 nw = nsrc[i];
        const T2* n2 = reinterpret_cast<const T2*>(&nw);
#pragma unroll
        for (int s = 0; s < NT; s++) {
            const int b = warp + ROWS_WARPS * s;
            if (b >= B) continue;
            uint4* dst = reinterpret_cast<uint4*>(xs + b * XS) + i;
            uint4 v = *dst;
            T2* v2 = reinterpret_cast<T2*>(&v);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 f = to_f2(v2[j]), w2 = to_f2(n2[j]);
                ss[s] = fmaf(f.x, f.x, fmaf(f.y, f.y, ss[s]));
                v2[j] = Pair<T>::make(f.x * w2.x, f.y * w2.y);
            }
            *dst = v;
        }
    }
}

template <typename T, int K, bool NORM, int EPI, int NT>
__global__ void __launch_bounds__(ROWS_WARPS * 32) gemv_rows(
        const T* __restrict__ W, const T* __restrict__ X, const T* __restrict__ norm_w, float eps,
        const T* __restrict__ res, T* __restrict__ out, int N, int B) {
    static_assert(K % 64 == 0, "K must be a multiple of 64 (whole k tiles)");
    using C = RowsChunk<K, EPI, NT>;
    constexpr int TILES = C::TILES, PER_WARP = C::PER_WARP, CT = C::CT, KC = C::KC, MATS = C::MATS;
    constexpr int G = (EPI == EPI_SWIGLU) ? 2 : 4;   // k tiles whose weights are loaded before any mma
    constexpr int XS = KC + ROWS_PAD;                // staged row stride, halves
    extern __shared__ __align__(16) unsigned char smem[];
    T* xs = reinterpret_cast<T*>(smem);                                             // [NT*8][XS]
    float* part = reinterpret_cast<float*>(smem + NT * 8 * XS * 2);                 // [MATS][WARPS][16][NT*8]
    float* inv = part + MATS * ROWS_WARPS * 16 * NT * 8;                            // [NT*8]
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int row0 = blockIdx.x * 16;
    // this thread's two weight rows, per matrix (gate, up); rows past N read row 0 (results dropped)
    const T* wrow[MATS][2];
#pragma unroll
    for (int m = 0; m < MATS; m++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = row0 + g + 8 * h;
            wrow[m][h] = W + ((size_t)m * N + (r < N ? r : 0)) * K + 8 * t;
        }
    }
    float acc[MATS][NT][4], ss[NT];
    zero_sums(acc, ss);

    // warp w takes tiles w, w + 8, ...: its j-th is tile j * 8 + w, in chunk j / CT
#pragma unroll 1
    for (int c = 0; c < C::CHUNKS; c++) {
        const int j_end = (c + 1) * CT < PER_WARP ? (c + 1) * CT : PER_WARP;
#pragma unroll
        for (int j0 = c * CT; j0 < j_end; j0 += G) {
            uint4 wv[G][MATS][2][2];  // [tile][matrix][row g / g+8][k +0 / +32]
#pragma unroll
            for (int i = 0; i < G; i++) {
                const int tile = (j0 + i) * ROWS_WARPS + warp;
                if (j0 + i < j_end && tile < TILES) {
#pragma unroll
                    for (int m = 0; m < MATS; m++)
#pragma unroll
                        for (int h = 0; h < 2; h++)
#pragma unroll
                            for (int p = 0; p < 2; p++)
                                wv[i][m][h][p] = load_stream(reinterpret_cast<const uint4*>(wrow[m][h] + tile * 64 + 32 * p));
                }
            }
            if (j0 == c * CT) {
                // this chunk's first weights are on their way: wait for X (the previous kernel
                // wrote it; every warp's reads of the last chunk are done) and stage its columns
                if (c == 0) pdl_wait();
                else __syncthreads();
                const int k0 = c * KC, cols = K - k0 < KC ? K - k0 : KC;
                stage_rows<NORM, K, XS, NT>(X, norm_w, xs, ss, k0, cols, B, warp, lane);
                if (NORM && c == C::CHUNKS - 1) {
#pragma unroll
                    for (int s = 0; s < NT; s++) {
                        const float total = warp_sum(ss[s]);
                        if (lane == 0) inv[warp + ROWS_WARPS * s] = 1.f / sqrtf(total / K + eps);
                    }
                }
                __syncthreads();
            }
#pragma unroll
            for (int i = 0; i < G; i++) {
                const int tile = (j0 + i) * ROWS_WARPS + warp;
                if (j0 + i < j_end && tile < TILES) {
                    const int col = (tile - c * CT * ROWS_WARPS) * 64;  // within the chunk
#pragma unroll
                    for (int n = 0; n < NT; n++) {
                        const T* xr = xs + (n * 8 + g) * XS + col + 8 * t;
                        const uint4 xa = *reinterpret_cast<const uint4*>(xr);
                        const uint4 xb = *reinterpret_cast<const uint4*>(xr + 32);
#pragma unroll
                        for (int m = 0; m < MATS; m++) {
                            const uint4 &lo = wv[i][m][0][0], &hi = wv[i][m][1][0];
                            const uint4 &lo2 = wv[i][m][0][1], &hi2 = wv[i][m][1][1];
                            // A registers: (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
                            mma_16816<T>(acc[m][n], lo.x, hi.x, lo.y, hi.y, xa.x, xa.y);
                            mma_16816<T>(acc[m][n], lo.z, hi.z, lo.w, hi.w, xa.z, xa.w);
                            mma_16816<T>(acc[m][n], lo2.x, hi2.x, lo2.y, hi2.y, xb.x, xb.y);
                            mma_16816<T>(acc[m][n], lo2.z, hi2.z, lo2.w, hi2.w, xb.z, xb.w);
                        }
                    }
                }
            }
        }
    }
    // partial sums of the 8 warps -> shared memory. Accumulator layout: (row g, tokens 2t, 2t+1), (row g+8, same)
    constexpr int COLS = NT * 8;
#pragma unroll
    for (int m = 0; m < MATS; m++)
#pragma unroll
        for (int n = 0; n < NT; n++) {
            float* p = part + ((m * ROWS_WARPS + warp) * 16) * COLS + n * 8 + 2 * t;
            p[g * COLS] = acc[m][n][0];
            p[g * COLS + 1] = acc[m][n][1];
            p[(g + 8) * COLS] = acc[m][n][2];
            p[(g + 8) * COLS + 1] = acc[m][n][3];
        }
    __syncthreads();
    for (int i = threadIdx.x; i < 16 * COLS; i += ROWS_WARPS * 32) {
        const int r = i / COLS, b = i % COLS, n_out = row0 + r;
        if (b >= B || n_out >= N) continue;
        float y = 0.f, u = 0.f;
#pragma unroll
        for (int w = 0; w < ROWS_WARPS; w++) {
            y += part[(w * 16 + r) * COLS + b];
            if (EPI == EPI_SWIGLU) u += part[((ROWS_WARPS + w) * 16 + r) * COLS + b];
        }
        if (NORM) { y *= inv[b]; u *= inv[b]; }
        epilogue<EPI>(y, u, res, out, (size_t)b * N + n_out);
    }
}

// ---------------------------------------------------------------------------------------
// gemm_rows: the same product, fragments and epilogues, tiled the other way round, for big
// matrices (kernels.py `rows_kernel` picks per matrix shape, never per B). gemv_rows gives
// each block 16 rows and all of X, and its 8 warps wait for their weights between tiles;
// at Llama-3-8B's sizes that leaves the tensor cores idle most of the time. Here a block
// is 64 output rows (EPI_SWIGLU: 64 gate rows and the 64 matching up rows) over a range of
// K: the grid is (N / 64, S), and block (i, s) takes columns [s * KS, (s + 1) * KS), 64 at
// a time: each 64-column tile of its weights and of the B tokens' X is copied into shared
// memory with cp.async, TILE_STAGES tiles ahead of the one being multiplied, so the memory
// system always has the next tiles in flight while the tensor cores work. Its 8 warps
// split the tile's products: warp (group, half) multiplies 16 of the rows by half of the
// 8-token tiles. Two warps per row group rather than one warp for all the tokens: a warp
// waits between its mmas, and the SM needs more warps to issue from.
//
// KS comes from the matrix's shape alone (rows_split in kernels.py), never from B: S
// splits give the GPU enough blocks when N is small, and the order in which a row's sum
// is added up, hence its bits, is the same at every batch size. With S > 1 each block
// writes its fp32 partial sums to a workspace, and the last of the S blocks of a row tile
// to finish (a counter in device memory says which) adds them in order s = 0, 1, ... and
// runs the epilogue.
//
// NORM: X is multiplied by the norm weight as its fragments leave shared memory (rounded
// to T: mma's input), and 1/rms is applied to the sums at the end; each token's sum of
// squares is taken by one warp of the block from the same fragments, over the block's
// range, the S ranges then added in order.
//   W: [N, K] ([2N, K] for EPI_SWIGLU);  X: [B, K];  res, out: [B, N]
//   ws: fp32, S * MATS * B * N partial sums, then S * (N / 64) * B sums of squares;
//   counters: N / 64 ints, zero between launches (the last block resets its own)
constexpr int TILE_GROUPS = 4;  // gemm_rows: 16-row groups per block (64 output rows)
constexpr int TILE_HALVES = 2;  // and the token tiles in halves: a warp per (group, half)
constexpr int TILE_WARPS = TILE_GROUPS * TILE_HALVES;
constexpr int TILE_STAGES = 4;  // 64-column tiles of W and X in flight per block

// A 64-column tile of 16 rows sits in shared memory in the order the warp reads it: chunk
// (row g + 8h, columns 8(t + 4p) .. +7) at 16-byte slot ((h * 2 + p) * 8 + g) * 4 + t, so
// each of the warp's four 16-byte loads reads 512 contiguous bytes (no bank conflicts).
// The copy goes the other way round: thread i takes row i / 8, chunk i % 8 (8 threads read
// a row's 128 bytes, coalesced).
__device__ __forceinline__ int tile_slot(int row16, int chunk) {
    return (((row16 >> 3) * 2 + (chunk >> 2)) * 8 + (row16 & 7)) * 4 + (chunk & 3);
}

// Columns [k0, k0 + 64) of `rows` rows of M (row stride K) into a tile set (16-row tiles one
// after another); rows past `valid` read row 0 (weights: results dropped) or zeros (tokens)
template <int K, int ROWS, typename T>
__device__ __forceinline__ void copy_tile(uint4* dst, const T* __restrict__ M, int first, int valid, int k0,
                                          bool zeros) {
#pragma unroll
    for (int i = 0; i < (ROWS * 8 + TILE_WARPS * 32 - 1) / (TILE_WARPS * 32); i++) {
        const int v = threadIdx.x + i * TILE_WARPS * 32, r = v >> 3, c = v & 7;
        if (ROWS * 8 % (TILE_WARPS * 32) != 0 && v >= ROWS * 8) break;
        const bool ok = first + r < valid;
        copy_async16(dst + (r >> 4) * 128 + tile_slot(r & 15, c),
                     M + (size_t)(ok ? first + r : 0) * K + k0 + c * 8, ok || !zeros ? 16 : 0);
    }
}

template <typename T>
__device__ __forceinline__ void hmul8(uint4& x, const uint4& w) {
    using T2 = typename Pair<T>::type;
    T2* x2 = reinterpret_cast<T2*>(&x);
    const T2* w2 = reinterpret_cast<const T2*>(&w);
#pragma unroll
    for (int j = 0; j < 4; j++) x2[j] = __hmul2(x2[j], w2[j]);
}

template <typename T>
__device__ __forceinline__ float sumsq8(const uint4& x, float ss) {
    const typename Pair<T>::type* x2 = reinterpret_cast<const typename Pair<T>::type*>(&x);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 f = to_f2(x2[j]);
        ss = fmaf(f.x, f.x, fmaf(f.y, f.y, ss));
    }
    return ss;
}

template <typename T, int K, bool NORM, int EPI, int NT>
__global__ void __launch_bounds__(TILE_WARPS * 32, 2) gemm_rows(
        const T* __restrict__ W, const T* __restrict__ X, const T* __restrict__ norm_w, float eps,
        const T* __restrict__ res, T* __restrict__ out, int N, int B, int KS, float* __restrict__ ws,
        int* __restrict__ counters) {
    static_assert(K % 64 == 0, "K must be a multiple of 64 (whole k tiles)");
    constexpr int MATS = (EPI == EPI_SWIGLU) ? 2 : 1;
    constexpr int WT = MATS * 64 * 8, XT = NT * 8 * 8;  // 16-byte chunks per stage: weights, tokens
    constexpr int NW = (NT + TILE_HALVES - 1) / TILE_HALVES;  // 8-token tiles per warp
    extern __shared__ __align__(16) unsigned char smem[];
    uint4* stage = reinterpret_cast<uint4*>(smem);                              // [STAGES][WT + XT]
    float* ss_all = reinterpret_cast<float*>(stage + TILE_STAGES * (WT + XT));   // [NT*8]
    int* last = reinterpret_cast<int*>(ss_all + NT * 8);
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int wr = warp % TILE_GROUPS, n0 = (warp / TILE_GROUPS) * NW;  // rows 16 wr.., token tiles n0..
    const int tile_row = blockIdx.x, split = blockIdx.y, S = gridDim.y;
    const int k_begin = split * KS, k_end = K < k_begin + KS ? K : k_begin + KS;
    const int tiles = (k_end - k_begin) / 64;
    const int row0 = tile_row * 64 + wr * 16;
    float acc[MATS][NW][4];
    float ss[NW];  // this lane's share of token (n0+i)*8+g's sum of squares (warp wr == i % GROUPS only)
    zero_sums(acc, ss);

    // The pipeline: tile j's weights and tokens go to stage j % STAGES, STAGES - 1 tiles ahead
    // of the one being multiplied. The first tiles' weights are requested before waiting for
    // the previous kernel (they are not its output); one commit group per tile (the first
    // also holds the early weights), so "wait until at most STAGES - 2 groups are pending"
    // means "tile j has landed".
    auto copy_w = [&](int j) {
#pragma unroll
        for (int m = 0; m < MATS; m++)
            copy_tile<K, 64>(stage + (j % TILE_STAGES) * (WT + XT) + m * 512, W + (size_t)m * N * K,
                             tile_row * 64, N, k_begin + j * 64, false);
    };
    auto copy_x = [&](int j) {
        copy_tile<K, NT * 8>(stage + (j % TILE_STAGES) * (WT + XT) + WT, X, 0, B, k_begin + j * 64, true);
    };
#pragma unroll
    for (int j = 0; j < TILE_STAGES - 1; j++)
        if (j < tiles) copy_w(j);
    pdl_wait();  // X is the previous kernel's output
#pragma unroll
    for (int j = 0; j < TILE_STAGES - 1; j++) {
        if (j < tiles) copy_x(j);
        asm volatile("cp.async.commit_group;" ::: "memory");
    }
#pragma unroll 1
    for (int j = 0; j < tiles; j++) {
        asm volatile("cp.async.wait_group %0;" ::"n"(TILE_STAGES - 2) : "memory");
        __syncthreads();  // tile j is in for every thread, and every warp is done with tile j - 1
        const int ahead = j + TILE_STAGES - 1;  // into the stage tile j - 1 used
        if (ahead < tiles) { copy_w(ahead); copy_x(ahead); }
        asm volatile("cp.async.commit_group;" ::: "memory");
        const uint4* ws_ = stage + (j % TILE_STAGES) * (WT + XT);
        const uint4* wt = ws_ + wr * 128 + lane;   // this warp's 16 rows
        const uint4* xt = ws_ + WT + lane;
        uint4 na, nb;
        if (NORM) {
            const int col = k_begin + j * 64 + 8 * t;
            na = *reinterpret_cast<const uint4*>(norm_w + col);
            nb = *reinterpret_cast<const uint4*>(norm_w + col + 32);
        }
        uint4 wv[MATS][2][2];  // [matrix][row g / g+8][k +0 / +32]
#pragma unroll
        for (int m = 0; m < MATS; m++)
#pragma unroll
            for (int h = 0; h < 2; h++)
#pragma unroll
                for (int p = 0; p < 2; p++) wv[m][h][p] = wt[m * 512 + (h * 2 + p) * 32];
        uint4 xv[NW][2];  // [token tile][k +0 / +32]
#pragma unroll
        for (int i = 0; i < NW; i++) {
            if (n0 + i >= NT) continue;
            xv[i][0] = xt[(n0 + i) * 64];  // 64 slots per 8 tokens
            xv[i][1] = xt[(n0 + i) * 64 + 32];
            if (NORM) {
                if (i % TILE_GROUPS == wr) ss[i] = sumsq8<T>(xv[i][1], sumsq8<T>(xv[i][0], ss[i]));
                hmul8<T>(xv[i][0], na);
                hmul8<T>(xv[i][1], nb);
            }
        }
        // the four 16-wide k steps in order (each sum's order), and within a step every
        // (matrix, token tile) product: independent mmas, issued back to back
#pragma unroll
        for (int q = 0; q < 4; q++)
#pragma unroll
            for (int i = 0; i < NW; i++) {
                if (n0 + i >= NT) continue;
                const uint4& x = xv[i][q >> 1];
                const unsigned b0 = (q & 1) ? x.z : x.x, b1 = (q & 1) ? x.w : x.y;
#pragma unroll
                for (int m = 0; m < MATS; m++) {
                    // A registers: (row g, k 2t..), (row g+8, k 2t..), (row g, k 2t+8..), (row g+8, k 2t+8..)
                    const uint4 &lo = wv[m][0][q >> 1], &hi = wv[m][1][q >> 1];
                    if (q & 1) mma_16816<T>(acc[m][i], lo.z, hi.z, lo.w, hi.w, b0, b1);
                    else mma_16816<T>(acc[m][i], lo.x, hi.x, lo.y, hi.y, b0, b1);
                }
            }
    }
    asm volatile("cp.async.wait_group 0;" ::: "memory");
    // tokens' sums of squares over this block's columns: the 4 lanes of a token, in a fixed order
    if (NORM) {
#pragma unroll
        for (int i = 0; i < NW; i++) {
            if (i % TILE_GROUPS != wr || n0 + i >= NT) continue;
            float v = ss[i];
            v += __shfl_xor_sync(0xffffffffu, v, 1);
            v += __shfl_xor_sync(0xffffffffu, v, 2);
            if (t == 0) ss_all[(n0 + i) * 8 + g] = v;
        }
        __syncthreads();
    }
    // accumulator layout: (row g, tokens 2t, 2t+1), (row g+8, the same tokens)
    if (S == 1) {
#pragma unroll
        for (int n = 0; n < NW; n++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int b = (n0 + n) * 8 + 2 * t + (i & 1), r = row0 + g + 8 * (i >> 1);
                if (n0 + n >= NT || b >= B || r >= N) continue;
                float y = acc[0][n][i], u = (EPI == EPI_SWIGLU) ? acc[MATS - 1][n][i] : 0.f;
                if (NORM) {
                    const float inv = 1.f / sqrtf(ss_all[b] / K + eps);
                    y *= inv; u *= inv;
                }
                epilogue<EPI>(y, u, res, out, (size_t)b * N + r);
            }
        return;
    }
    float* part = ws + (size_t)split * MATS * B * N;
#pragma unroll
    for (int m = 0; m < MATS; m++)
#pragma unroll
        for (int n = 0; n < NW; n++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int b = (n0 + n) * 8 + 2 * t + (i & 1), r = row0 + g + 8 * (i >> 1);
                if (n0 + n < NT && b < B && r < N) part[((size_t)m * B + b) * N + r] = acc[m][n][i];
            }
    float* sums = ws + (size_t)S * MATS * B * N + (size_t)tile_row * S * B;  // [S][B] of this row tile
    if (NORM)
        for (int b = threadIdx.x; b < B; b += TILE_WARPS * 32) sums[split * B + b] = ss_all[b];
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *last = atomicAdd(counters + tile_row, 1) == S - 1;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    for (int i = threadIdx.x; i < 64 * B; i += TILE_WARPS * 32) {
        const int r = tile_row * 64 + i % 64, b = i / 64;
        if (r >= N) continue;
        float y = 0.f, u = 0.f, sq = 0.f;
        for (int s = 0; s < S; s++) {
            y += __ldcg(ws + ((size_t)s * MATS * B + b) * N + r);
            if (EPI == EPI_SWIGLU) u += __ldcg(ws + ((size_t)(s * MATS + 1) * B + b) * N + r);
            if (NORM) sq += __ldcg(sums + s * B + b);
        }
        if (NORM) {
            const float inv = 1.f / sqrtf(sq / K + eps);
            y *= inv; u *= inv;
        }
        epilogue<EPI>(y, u, res, out, (size_t)b * N + r);
    }
    if (threadIdx.x == 0) counters[tile_row] = 0;
}

// ---------------------------------------------------------------------------------------
// Decode attention for one new token, grouped-query, split over the cache ("split-K",
// flash-decoding): block (c, j, z) handles positions [c*CHUNK, (c+1)*CHUNK) of KV head j
// for R of the n_rep query heads that share it (heads z*R .. z*R+R-1 of the group): more,
// smaller blocks, because one token's attention is latency-bound, not bandwidth-bound.
// The position is read from device memory, so one captured graph serves every step;
// chunks past the position are skipped (a block takes chunks blockIdx.x, + gridDim.x, ...).
//
// Fused in: RoPE of q and k (when `rotate`), the write of the new k and v into the
// cache at `pos`, and the merge of the chunks' partial softmaxes, done by the last
// block of each KV head to finish (a counter in device memory says which is last).
// CHUNK (positions per block = threads per block) is 256 for E = 64 and 128 for E = 128,
// so that a block's values fit in shared memory; contexts up to CHUNK need no merge.
//
// Several sequences at once (continuous batching): blockIdx.z also selects the sequence
// `seq`, which has its own position pos_ptr[seq]; its q, k, v sit qkv_stride elements after
// the previous sequence's. One sequence: seq = 0, slot 0. Two layouts of the cache:
//   rows   (table == nullptr): row slot_ptr[seq] of a batched cache [B, K, S_cap, E], rows
//          slot_stride elements apart
//   paged  (kv_cache.py BlockPool): blocks [N, K, CHUNK, E], slot_stride elements apart;
//          chunk c of sequence seq is block table[seq * table_stride + c], so each chunk a
//          block reads is one block, found with one load; S_cap: the positions a table row
//          can name (the scratch's chunks)

// The phases below run in this order in every block; the kernel, after them, shows the
// barriers between them. Shapes per block; t is the thread, s = first + t its key.

// 1. Issue every load of the cache first: older positions, written by earlier steps, so
// these loads overlap the previous kernel. pos's row is not in the cache yet (phase 2).
//   kc, vc: the chunk's [n_here, E] (this KV head's, from position first on)
//   kreg: key row first + t, [E] of T (t < n_here only)
//   vreg: the chunk's values [n_here, E] as CHUNK * E/8 16-byte vectors, vector i*CHUNK + t
//         here (zeros past n_here)
template <int E, int CHUNK, typename T>
__device__ __forceinline__ void load_cached_kv(uint4 (&kreg)[E / 8], uint4 (&vreg)[E / 8], const T* kc,
                                               const T* vc, int first, int n_here, int pos, int t) {
    constexpr int ROW_VECS = E / 8;          // 16-byte vectors per key/value row
    if (t < n_here && first + t != pos) {
#pragma unroll
        for (int i = 0; i < ROW_VECS; i++) kreg[i] = __ldcg(reinterpret_cast<const uint4*>(kc + (size_t)t * E) + i);
    }
#pragma unroll
    for (int i = 0; i < ROW_VECS; i++) {
        const int idx = i * CHUNK + t, row = idx / ROW_VECS, col = idx % ROW_VECS;
        vreg[i] = (row < n_here && first + row != pos)
            ? __ldcg(reinterpret_cast<const uint4*>(vc + (size_t)row * E) + col) : make_uint4(0, 0, 0, 0);
    }
}

// 2a. pos's share of vreg is the new value itself, from the QKV output (only after pdl_wait)
//   v_new: [K, E], row j (this KV head's)
template <int E, int CHUNK, typename T>
__device__ __forceinline__ void load_new_value(uint4 (&vreg)[E / 8], const T* v_new, int j, int first, int pos,
                                               int t) {
    constexpr int ROW_VECS = E / 8;
#pragma unroll
    for (int i = 0; i < ROW_VECS; i++) {
        const int idx = i * CHUNK + t, row = idx / ROW_VECS, col = idx % ROW_VECS;
        if (first + row == pos) vreg[i] = __ldcg(reinterpret_cast<const uint4*>(v_new + (size_t)j * E) + col);
    }
}

// 2b. RoPE of one pair (e, e + E/2) of row r: query head head0 + r for r < R, else the new
// key; into fp32 shared memory for the scores, rounded like the readable path:
// T(x1*cos - x2*sin), no FMA. One block per KV head (query group z == 0 of the chunk
// that holds_pos) also stores the rotated key and the value at pos, for later steps.
//   q: [H, E], kn, vn: [E] (this KV head's);  cs, sn: [E/2] (row pos)
//   sq: [R][E], skn: [E] fp32;  kc, vc: the chunk's [CHUNK, E], row at = pos - first written
template <int E, int R, typename T>
__device__ __forceinline__ void rope_pair(float (&sq)[R][E], float (&skn)[E], const T* q, int head0,
                                          const T* kn, const T* vn, const float* cs, const float* sn,
                                          int rotate, bool holds_pos, int z, T* kc, T* vc, int at, int r,
                                          int e) {
    constexpr int HALF = E / 2;
    const T* x = (r < R) ? q + (size_t)(head0 + r) * E : kn;
    const float x1 = to_f(__ldcg(x + e)), x2 = to_f(__ldcg(x + e + HALF));
    float y1 = x1, y2 = x2;
    if (rotate) {
        y1 = to_f(from_f<T>(__fsub_rn(__fmul_rn(x1, cs[e]), __fmul_rn(x2, sn[e]))));
        y2 = to_f(from_f<T>(__fadd_rn(__fmul_rn(x2, cs[e]), __fmul_rn(x1, sn[e]))));
    }
    if (r < R) { sq[r][e] = y1; sq[r][e + HALF] = y2; }
    else {
        skn[e] = y1; skn[e + HALF] = y2;
        if (holds_pos && z == 0) {
            kc[(size_t)at * E + e] = from_f<T>(y1);
            kc[(size_t)at * E + e + HALF] = from_f<T>(y2);
            vc[(size_t)at * E + e] = __ldcg(vn + e);
            vc[(size_t)at * E + e + HALF] = __ldcg(vn + e + HALF);
        }
    }
}

// 2c. the chunk's values into shared memory, where phase 5 reads them by column
//   vreg (CHUNK * E/8 vectors over the block) -> sv: [CHUNK][E] of T (rows past n_here: zeros)
template <int E, int CHUNK, typename T>
__device__ __forceinline__ void stage_values(T (&sv)[CHUNK][E], const uint4 (&vreg)[E / 8], int t) {
#pragma unroll
    for (int i = 0; i < E / 8; i++) {
        const int idx = i * CHUNK + t;
        reinterpret_cast<uint4*>(&sv[0][0])[idx] = vreg[i];
    }
}

// 3. the scores of all R heads for key s: T(q.k) like the matmul in T, then * scale;
// -inf past the chunk's end, so that the key drops out of the softmax. Key pos is the new
// key (skn, fp32 from the rotation); any other is the cache row in kreg (T).
//   sq: [R][E], skn: [E], kreg: [E] of T -> sc: [R]
template <int E, int R, typename T>
__device__ __forceinline__ void chunk_scores(float (&sc)[R], const float (&sq)[R][E], const float (&skn)[E],
                                             const uint4 (&kreg)[E / 8], bool has_key, bool is_new, float scale) {
#pragma unroll
    for (int r = 0; r < R; r++) sc[r] = 0.f;
    if (has_key) {
        if (is_new) {
#pragma unroll
            for (int e = 0; e < E; e++) {
#pragma unroll
                for (int r = 0; r < R; r++) sc[r] = fmaf(sq[r][e], skn[e], sc[r]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < E / 8; i++) {
                const typename Pair<T>::type* k2 = reinterpret_cast<const typename Pair<T>::type*>(&kreg[i]);
#pragma unroll
                for (int jj = 0; jj < 4; jj++) {
                    const float2 kf = to_f2(k2[jj]);
#pragma unroll
                    for (int r = 0; r < R; r++)
                        sc[r] = fmaf(sq[r][i * 8 + 2 * jj + 1], kf.y, fmaf(sq[r][i * 8 + 2 * jj], kf.x, sc[r]));
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) sc[r] = to_f(from_f<T>(sc[r])) * scale;
    } else {
#pragma unroll
        for (int r = 0; r < R; r++) sc[r] = -INFINITY;
    }
}

// 4. the chunk's softmax statistics for all R heads at once, warp shuffles and one exchange
// through red each: m = the chunk's max score, p = exp(score - m) into sp, l = this warp's
// sum of p, left in red: the block sum is read after phase 5's barrier, needing none of its own.
//   sc: [R] -> m: [R] (the chunk's), l: [R] (the warp's);  sp: [R][CHUNK];  red: [WARPS][R]
template <int R, int CHUNK>
__device__ __forceinline__ void chunk_softmax(float (&m)[R], float (&l)[R], float (&sp)[R][CHUNK],
                                              float (&red)[CHUNK / 32][R], const float (&sc)[R], int n_here,
                                              int t, int lane, int warp) {
#pragma unroll
    for (int r = 0; r < R; r++) { m[r] = warp_max(sc[r]); }
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) red[warp][r] = m[r];
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; r++) {
        float mm = red[0][r];
#pragma unroll
        for (int w = 1; w < CHUNK / 32; w++) mm = fmaxf(mm, red[w][r]);
        m[r] = mm;
        const float p = (t < n_here) ? expf(sc[r] - mm) : 0.f;
        sp[r][t] = p;
        l[r] = warp_sum(p);
    }
    __syncthreads();  // everyone has read red (max) and written sp
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) red[warp][r] = l[r];
    }
}

// 5. the chunk's unnormalised output, fp32: thread (g, e) = (t / E, t % E) sums keys
// g, g + GROUPS, ... of column e for every head; GROUPS = CHUNK / E (2 for E = 64, 1 for 128)
//   sp: [R][CHUNK] probabilities, sv: [CHUNK][E] -> o: [R] (column e, group g's share)
template <int E, int R, int CHUNK, typename T>
__device__ __forceinline__ void chunk_output(float (&o)[R], const float (&sp)[R][CHUNK],
                                             const T (&sv)[CHUNK][E], int n_here, int e, int g) {
#pragma unroll
    for (int r = 0; r < R; r++) o[r] = 0.f;
    for (int kk = g; kk < n_here; kk += CHUNK / E) {
        const float v = to_f(sv[kk][e]);
#pragma unroll
        for (int r = 0; r < R; r++) o[r] = fmaf(sp[r][kk], v, o[r]);
    }
}

// element i = (r, ee) of the chunk's output, the GROUPS shares added in order
//   sp: [R][CHUNK] as [R][GROUPS][E] (the shares, in the probabilities' space)
template <int E, int R, int CHUNK>
__device__ __forceinline__ float chunk_output_sum(const float (&sp)[R][CHUNK], int r, int ee) {
    float sum = 0.f;
#pragma unroll
    for (int gg = 0; gg < CHUNK / E; gg++) sum += sp[r][gg * E + ee];
    return sum;
}

// 6. the split-K merge: a block's chunk partials are visible to all before its arrival is
// counted, and only the last block to arrive (of this sequence, KV head and query group)
// goes on to merge; the fences order the partials' writes and reads around the counter
//   counters[gi]: this group's, counting the n_chunks arrivals; is_last: shared
__device__ __forceinline__ bool last_to_arrive(unsigned int* counters, int gi, int n_chunks, int& is_last, int t) {
    __threadfence();
    __syncthreads();
    if (t == 0) is_last = (atomicAdd(&counters[gi], 1u) == (unsigned)(n_chunks - 1));
    __syncthreads();
    if (!is_last) return false;
    __threadfence();
    return true;
}

// 7. merge the n_chunks partials in chunk order, in fp32, rescaling each to the overall max:
// out = sum_c exp(m_c - m) o_c / sum_c exp(m_c - m) l_c, rounded to T once
//   part_o, part_ml at group gi: po0: [n_total_chunks, R, E], pml0: [n_total_chunks, R, (m, l)]
//   -> out: [R * E] from head0's row
template <int E, int R, int CHUNK, typename T>
__device__ __forceinline__ void merge_chunks(T* out, int head0, const float* part_o, const float* part_ml, int gi,
                                             int n_total_chunks, int n_chunks, int t) {
    const float* po0 = part_o + (size_t)gi * n_total_chunks * R * E;
    const float* pml0 = part_ml + (size_t)gi * n_total_chunks * R * 2;
    for (int i = t; i < R * E; i += CHUNK) {
        const int r = i / E;
        float mm = -INFINITY;
        for (int cc = 0; cc < n_chunks; cc++) mm = fmaxf(mm, __ldcg(pml0 + (cc * R + r) * 2));
        float ll = 0.f, acc = 0.f;
        for (int cc = 0; cc < n_chunks; cc++) {
            const float w = expf(__ldcg(pml0 + (cc * R + r) * 2) - mm);
            ll += w * __ldcg(pml0 + (cc * R + r) * 2 + 1);
            acc += w * __ldcg(po0 + (size_t)cc * R * E + i);
        }
        out[(size_t)head0 * E + i] = from_f<T>(acc / ll);
    }
}

//   q: [H, E], k_new, v_new: [K, E] (views of the QKV output), cos/sin: [S_max, E/2]
//   k_cache, v_cache: this layer's, rows or blocks (above);  out: [H * E]    (per sequence)
//   part_o: [.., n_total_chunks, R, E], part_ml: [.., n_total_chunks, R, 2], counters: [..]
//           (per block group gi)
template <typename T, int E, int R, int CHUNK, bool LOOP>
__global__ void __launch_bounds__(CHUNK) decode_attention(
        const T* __restrict__ q, const T* __restrict__ k_new, const T* __restrict__ v_new,
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, const int* __restrict__ pos_ptr,
        T* k_cache, T* v_cache, int S_cap, float scale, int rotate, int n_rep,
        float* part_o, float* part_ml, unsigned int* counters, T* __restrict__ out,
        const int* __restrict__ slot_ptr, long long qkv_stride, long long slot_stride,
        const int* __restrict__ table, int table_stride) {
    constexpr int HALF = E / 2;
    constexpr int ROW_VECS = E / 8;          // 16-byte vectors per key/value row
    constexpr int WARPS = CHUNK / 32;
    pdl_launch_dependents();
    const int groups = n_rep / R;                   // blocks per KV head and sequence
    const int j = blockIdx.y, seq = blockIdx.z / groups, z = blockIdx.z % groups, t = threadIdx.x;
    int c = blockIdx.x;
    const int head0 = j * n_rep + z * R;            // this block's first query head
    const int gi = (seq * gridDim.y + j) * groups + z;  // its index in the scratch and counters
    const int lane = t & 31, warp = t >> 5;
    // position, slot and block table: written before this step began, so safe to read
    // before pdl_wait
    const int pos = __ldcg(pos_ptr + seq);
    q += seq * qkv_stride;
    k_new += seq * qkv_stride;
    v_new += seq * qkv_stride;
    out += (size_t)seq * gridDim.y * n_rep * E;
    const bool paged = table != nullptr;
    if (paged) {
        table += (size_t)seq * table_stride;
    } else {
        const long long slot = __ldcg(slot_ptr + seq);
        k_cache += slot * slot_stride;
        v_cache += slot * slot_stride;
    }
    const int n_keys = pos + 1;
    const int n_chunks = (n_keys + CHUNK - 1) / CHUNK;
    // rotate & 2: a first pass that only writes the new k and v into the cache (its writing
    // block; phase 2b), so that rows of one sequence later in the same step find them there
    const bool write_only = (rotate & 2) != 0;
    rotate &= 1;
    const int n_total_chunks = (S_cap + CHUNK - 1) / CHUNK;

    __shared__ __align__(16) T sv[CHUNK][E];          // the chunk's values
    __shared__ float sq[R][E];                        // this KV head's R query heads, rotated
    __shared__ float skn[E];                          // the new key, rotated
    __shared__ float sp[R][CHUNK];                    // probabilities, then partial outputs
    __shared__ float red[WARPS][R];
    __shared__ int is_last;
    const size_t head = (size_t)j * (paged ? CHUNK : S_cap) * E;  // this KV head's rows in a row or block
    bool waited = false;

    // LOOP: chunks c, c + gridDim.x, ...: the grid has fewer x-blocks than the cache has
    // chunks (a big batch fills the GPU with sequences and heads; blocks past the context
    // would be launched only to return), and each chunk is computed the same whichever block
    // takes it. Without LOOP a block takes chunk blockIdx.x only: straight-line code, which
    // needs fewer registers than the loop.
#pragma unroll 1
    for (; c < n_chunks; c += gridDim.x) {
        if (write_only && (c != n_chunks - 1 || z != 0)) {
            if (!LOOP) break;
            continue;
        }
        const int first = c * CHUNK;                       // this chunk's first position
        const int n_here = min(CHUNK, n_keys - first);     // positions in this chunk
        const bool holds_pos = (c == n_chunks - 1);        // the chunk where the new token goes
        // this chunk's keys and values, [n_here, E] from position first on
        const size_t at = paged ? (size_t)__ldcg(table + c) * slot_stride + head : head + (size_t)first * E;
        T* kc = k_cache + at;
        T* vc = v_cache + at;

        uint4 kreg[ROW_VECS], vreg[ROW_VECS];
        load_cached_kv<E, CHUNK>(kreg, vreg, kc, vc, first, n_here, pos, t);                    // 1.
        if (!waited) pdl_wait();  // from here on: q, k, v of this step, written by the QKV GEMV
        waited = true;
        load_new_value<E, CHUNK>(vreg, v_new, j, first, pos, t);                                // 2a.
        const float* cs = cos_t + (size_t)pos * HALF;
        const float* sn = sin_t + (size_t)pos * HALF;
        for (int i = t; i < (R + 1) * HALF; i += CHUNK)  // 2b. pairs of the R query heads, then of the new key
            rope_pair<E, R, T>(sq, skn, q, head0, k_new + (size_t)j * E, v_new + (size_t)j * E, cs, sn, rotate,
                               holds_pos, z, kc, vc, pos - first, i / HALF, i % HALF);
        if (write_only) return;
        stage_values<E, CHUNK>(sv, vreg, t);                                                    // 2c.
        __syncthreads();

        float sc[R], m[R], l[R], o[R];
        chunk_scores<E, R, T>(sc, sq, skn, kreg, t < n_here, first + t == pos, scale);            // 3.
        chunk_softmax<R, CHUNK>(m, l, sp, red, sc, n_here, t, lane, warp);                      // 4.
        const int e = t % E, g = t / E;
        chunk_output<E, R, CHUNK>(o, sp, sv, n_here, e, g);                                     // 5.
        __syncthreads();  // everyone has read sp (probabilities) and written red (l per warp)
#pragma unroll
        for (int r = 0; r < R; r++) {  // l: the chunk's sum of p
            float ll = 0.f;
#pragma unroll
            for (int w = 0; w < WARPS; w++) ll += red[w][r];
            l[r] = ll;
        }
#pragma unroll
        for (int r = 0; r < R; r++) sp[r][g * E + e] = o[r];  // reuse sp: [R][CHUNK] as [R][CHUNK / E][E]
        __syncthreads();

        if (n_chunks == 1) {  // the whole context in one chunk: normalise and done
            for (int i = t; i < R * E; i += CHUNK) {
                const int r = i / E;
                out[(size_t)head0 * E + i] = from_f<T>(chunk_output_sum<E, R, CHUNK>(sp, r, i % E) / l[r]);
            }
            return;
        }
        // otherwise the chunk's partials: o unnormalised, and (m, l) per head
        float* po = part_o + ((size_t)gi * n_total_chunks + c) * R * E;
        float* pml = part_ml + ((size_t)gi * n_total_chunks + c) * R * 2;
        for (int i = t; i < R * E; i += CHUNK) po[i] = chunk_output_sum<E, R, CHUNK>(sp, i / E, i % E);
        if (t == 0) {
#pragma unroll
            for (int r = 0; r < R; r++) { pml[2 * r] = m[r]; pml[2 * r + 1] = l[r]; }
        }

        if (last_to_arrive(counters, gi, n_chunks, is_last, t)) {                               // 6.
            merge_chunks<E, R, CHUNK>(out, head0, part_o, part_ml, gi, n_total_chunks, n_chunks, t);  // 7.
            if (t == 0) counters[gi] = 0;  // ready for the next layer / step
        }
        if (!LOOP) break;
        __syncthreads();  // the shared arrays are rewritten by the next chunk
    }
    // a block that computed nothing still waits: the kernel after this one, launched
    // programmatically, must not see it finished before the kernel before it
    if (!waited) pdl_wait();
}

// ---------------------------------------------------------------------------------------
// Choosing the next token on the device: one block of 1024 threads over the V logits,
// following tinyllm/sampler.py's rules so that the same u picks the same token (up to
// fp32-vs-fp64 rounding of probabilities that sit exactly on a boundary).
//
// temperature <= 0: argmax (the first index of the maximum, like numpy.argmax).
// Otherwise w_i = exp(l_i / T - max / T) (so the largest w is 1) and every filter is a
// threshold on w: top-k keeps w >= the k-th largest w; top-p keeps the largest w whose
// mass reaches top_p of what top-k kept; min-p keeps w >= min_p. The draw walks the kept
// tokens from most to least likely and takes the first whose running sum exceeds
// u x total, u drawn on the host from the seeded generator.
//
// No sort is needed: each threshold is found by bisection over the float's bit pattern
// (for positive floats, integer order is float order), so after ~30 block-wide counts
// it is exactly one of the w values. The result goes to token[0] (the next step's
// input) and history[pos + 1], and pos += 1: the device advances itself.
#define SAMPLE_THREADS 1024

__device__ float mass_ge(const float* w, int V, float thr, bool count, float* red) {
    float acc = 0.f;
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) if (w[i] >= thr) acc += count ? 1.f : w[i];
    return block_sum(acc, red);
}

// The largest tau >= floor_thr with mass_ge(tau) >= goal (strict: > goal); floor_thr if none.
__device__ float bisect_threshold(const float* w, int V, float floor_thr, bool count, float goal, bool strict,
                                  float* red) {
    unsigned lo = __float_as_uint(floor_thr), hi = __float_as_uint(1.f) + 1u;
    while (hi - lo > 1u) {
        const unsigned mid = lo + (hi - lo) / 2u;
        const float m = mass_ge(w, V, __uint_as_float(mid), count, red);
        if (strict ? (m > goal) : (m >= goal)) lo = mid; else hi = mid;
    }
    return __uint_as_float(lo);
}

// The lowest index whose w equals value (V if none).
__device__ int first_equal(const float* w, int V, float value, int* sidx) {
    int best = V;
    for (int i = threadIdx.x; i < V; i += SAMPLE_THREADS) if (w[i] == value) { best = i; break; }
    sidx[threadIdx.x] = best;
    __syncthreads();
    for (int stride = SAMPLE_THREADS / 2; stride > 0; stride >>= 1) {
        if (threadIdx.x < stride) sidx[threadIdx.x] = min(sidx[threadIdx.x], sidx[threadIdx.x + stride]);
        __syncthreads();
    }
    const int r = sidx[0];
    __syncthreads();
    return r;
}

// The token chosen from one row of logits (every thread gets it).
// params: temperature, top_k, top_p, min_p, u;  w: [V] scratch
__device__ int choose_token(const float* __restrict__ logits, int V, const float* __restrict__ params, float* w,
                            float* red, float* sval, int* sidx) {
    const int t = threadIdx.x;
    const float temperature = params[0];
    int best = V;
    float bv = -INFINITY;
    for (int i = t; i < V; i += SAMPLE_THREADS) if (logits[i] > bv) { bv = logits[i]; best = i; }
    sval[t] = bv; sidx[t] = best;
    __syncthreads();
    for (int stride = SAMPLE_THREADS / 2; stride > 0; stride >>= 1) {
        if (t < stride) {
            const float ov = sval[t + stride]; const int oi = sidx[t + stride];
            if (ov > sval[t] || (ov == sval[t] && oi < sidx[t])) { sval[t] = ov; sidx[t] = oi; }
        }
        __syncthreads();
    }
    int chosen = sidx[0];
    const float mx = sval[0];
    __syncthreads();
    if (temperature > 0.f) {
        const int top_k = (int)params[1];
        const float top_p = params[2], min_p = params[3], u = params[4];
        const float mx_t = mx / temperature;
        for (int i = t; i < V; i += SAMPLE_THREADS) w[i] = expf(logits[i] / temperature - mx_t);
        __syncthreads();
        float thr = 0.f;
        if (top_k > 0 && top_k < V) thr = bisect_threshold(w, V, 0.f, true, (float)top_k, false, red);
        if (top_p < 1.f) {
            const float kept = mass_ge(w, V, thr, false, red);
            thr = bisect_threshold(w, V, thr, false, top_p * kept, false, red);
        }
        if (min_p > 0.f) thr = fmaxf(thr, min_p);
        const float total = mass_ge(w, V, thr, false, red);
        const float tau = bisect_threshold(w, V, thr, false, u * total, true, red);
        const int pick = first_equal(w, V, tau, sidx);
        if (pick < V) chosen = pick;  // else rounding put u x total past the end: keep the argmax
    }
    return chosen;
}

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_token(
        const float* __restrict__ logits, int V, const float* __restrict__ params, float* w,
        long long* token, long long* history, int* pos_ptr) {
    __shared__ float red[33];
    __shared__ float sval[SAMPLE_THREADS];
    __shared__ int sidx[SAMPLE_THREADS];
    const int chosen = choose_token(logits, V, params, w, red, sval, sidx);
    if (threadIdx.x == 0) {
        const int pos = pos_ptr[0];
        token[0] = chosen;
        history[pos + 1] = chosen;
        pos_ptr[0] = pos + 1;
    }
}

// B sequences, one block each: row b of logits [B, V] with its own params [B, 5]; the
// choice goes to token[b] (the next step's input) and chosen[b] (for the host), and the
// position of each of the first live[0] sequences advances.
extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_rows(
        const float* __restrict__ logits, int V, const float* __restrict__ params, float* w,
        long long* token, long long* chosen_out, int* pos_ptr, const int* live) {
    __shared__ float red[33];
    __shared__ float sval[SAMPLE_THREADS];
    __shared__ int sidx[SAMPLE_THREADS];
    const int b = blockIdx.x;
    const int chosen = choose_token(logits + (size_t)b * V, V, params + 5 * b, w + (size_t)b * V, red, sval, sidx);
    if (threadIdx.x == 0) {
        token[b] = chosen;
        chosen_out[b] = chosen;
        if (b < live[0]) pos_ptr[b] += 1;  // rows past `live` pad the batch up to its graph: they stay put
    }
}

// The host's per-step inputs, written by a kernel (no host-to-device copy, no sync).
extern "C" __global__ void set_step(long long* token, int* pos_ptr, float* params, long long tok, int pos,
                                    float u, int write_token) {
    if (write_token) { token[0] = tok; pos_ptr[0] = pos; }
    params[4] = u;
}
