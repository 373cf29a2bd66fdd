// The fused CUDA kernels of tinyllm's decode step (compiled at run time by CuPy/NVRTC).
//
// Batch-1 decode reads every weight once per token and does two FLOPs per weight, so it
// is bound by memory bandwidth: the kernels below exist to read weights with wide
// (16-byte) loads, keep everything else out of device memory, and be few (each launch
// and each kernel's ramp-up/tail costs a few microseconds, as much as reading an 8 MB
// matrix). Every kernel mirrors the rounding of the readable CuPy operation it replaces
// (fp16 storage, fp32 arithmetic), so the fast path agrees with model.py to the last bit
// where the summation order allows.
//
// Shape letters as in tinyllm/config.py. Weights are stored (out, in), fp16, row-major.

#include <cuda_fp16.h>

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

__device__ __forceinline__ float h2f(__half h) { return __half2float(h); }
__device__ __forceinline__ __half f2h(float f) { return __float2half_rn(f); }

// Weights are streamed once per token: load them through the read-only path and ask L1
// not to keep them, so the activations that every warp re-reads stay cached.
__device__ __forceinline__ uint4 load_stream(const uint4* p) {
    uint4 r;
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w) : "l"(p));
    return r;
}

// ---------------------------------------------------------------------------------------
// Embedding: one row of the table, the token id read from device memory.   -> [D]
extern "C" __global__ void embedding(const __half* __restrict__ table, const long long* __restrict__ token,
                                     __half* __restrict__ out, int D) {
    const long long row = token[0];
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < D; i += gridDim.x * blockDim.x)
        out[i] = table[row * D + i];
}

// ---------------------------------------------------------------------------------------
// RMSNorm of rows: out = fp16(fp16(x * inv_rms) * w), inv_rms = 1 / sqrt(mean(x^2) + eps) in fp32.
// One block per row.  x: [rows, D] -> [rows, D]
extern "C" __global__ void rms_norm_rows(const __half* __restrict__ x, const __half* __restrict__ w,
                                         __half* __restrict__ out, int D, float eps) {
    __shared__ float red[33];
    const __half* xr = x + (size_t)blockIdx.x * D;
    float ss = 0.f;
    for (int i = threadIdx.x; i < D; i += blockDim.x) { float f = h2f(xr[i]); ss += f * f; }
    ss = block_sum(ss, red);
    const float inv = 1.f / sqrtf(ss / D + eps);
    for (int i = threadIdx.x; i < D; i += blockDim.x)
        out[(size_t)blockIdx.x * D + i] = __hmul(f2h(h2f(xr[i]) * inv), w[i]);
}

// ---------------------------------------------------------------------------------------
// GEMV with fp32 accumulation: y[n] = sum_k W[n, k] * h[k].  One warp per output row;
// each lane issues all its 16-byte weight loads before the first multiply (K is a
// compile-time constant, so the loop unrolls and the loads stay in registers).
//
//   NORM:  h = rms_norm(x, norm_w) computed in the prologue (each block re-derives the
//          norm of x, 2*K bytes from L2, instead of a separate kernel and a round trip)
//   EPI 0: out[n] = fp16(y[n])
//   EPI 1: out[n] = res[n] + fp16(y[n])                    (the residual connection)
//   EPI 2: rows n and n + N: out[n] = silu(fp16(y[n])) * fp16(y[n + N])   (gate | up)
enum { EPI_STORE = 0, EPI_RESIDUAL = 1, EPI_SWIGLU = 2 };

template <int K>
struct Row {  // one lane's share of a weight row, held in registers
    static constexpr int NV = K / 8;                 // 16-byte vectors in a row
    static constexpr int PER_LANE = (NV + 31) / 32;
    uint4 v[PER_LANE];
};

template <int K>
__device__ __forceinline__ void load_row(Row<K>& r, const __half* __restrict__ wrow, int lane) {
    const uint4* w = reinterpret_cast<const uint4*>(wrow);
#pragma unroll
    for (int i = 0; i < Row<K>::PER_LANE; i++) {
        const int c = i * 32 + lane;
        if (c < Row<K>::NV) r.v[i] = load_stream(w + c);
    }
}

template <int K>
__device__ __forceinline__ float dot_row(const Row<K>& r, const uint4* __restrict__ hv, int lane) {
    float acc = 0.f;
#pragma unroll
    for (int i = 0; i < Row<K>::PER_LANE; i++) {
        const int c = i * 32 + lane;
        if (c < Row<K>::NV) {
            const uint4 xv = hv[c];
            const __half2* w2 = reinterpret_cast<const __half2*>(&r.v[i]);
            const __half2* x2 = reinterpret_cast<const __half2*>(&xv);
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 a = __half22float2(w2[j]), b = __half22float2(x2[j]);
                acc = fmaf(a.x, b.x, acc);
                acc = fmaf(a.y, b.y, acc);
            }
        }
    }
    return warp_sum(acc);
}

template <int K, bool NORM, int EPI>
__global__ void __launch_bounds__(256) gemv(const __half* __restrict__ W, const __half* __restrict__ x,
                                             const __half* __restrict__ norm_w, float eps,
                                             const __half* __restrict__ res, __half* __restrict__ out, int N) {
    static_assert(K % 8 == 0, "K must be a multiple of 8 (16-byte rows)");
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + warp;
    const uint4* hv = reinterpret_cast<const uint4*>(x);
    __shared__ __align__(16) __half hs[NORM ? K : 8];
    if (NORM) {
        __shared__ float red[33];
        float ss = 0.f;
        for (int i = threadIdx.x; i < K; i += blockDim.x) { float f = h2f(x[i]); ss += f * f; }
        ss = block_sum(ss, red);
        const float inv = 1.f / sqrtf(ss / K + eps);
        for (int i = threadIdx.x; i < K; i += blockDim.x) hs[i] = __hmul(f2h(h2f(x[i]) * inv), norm_w[i]);
        __syncthreads();
        hv = reinterpret_cast<const uint4*>(hs);
    }
    if (row >= N) return;
    // every weight load of this lane is issued before the first multiply: the "memory"
    // clobber keeps the activation loads (and so the math) behind them
    Row<K> wa, wb;
    load_row<K>(wa, W + (size_t)row * K, lane);
    if (EPI == EPI_SWIGLU) load_row<K>(wb, W + (size_t)(row + N) * K, lane);
    asm volatile("" ::: "memory");
    const float y = dot_row<K>(wa, hv, lane);
    if (EPI == EPI_SWIGLU) {
        const float u = dot_row<K>(wb, hv, lane);
        if (lane == 0) {
            // mirrors `gate / (1.0 + exp(-gate)) * up` evaluated in fp16 by CuPy
            const __half g = f2h(y), up = f2h(u);
            const __half e = f2h(expf(-h2f(g)));
            const __half d = f2h(1.f + h2f(e));
            out[row] = __hmul(__hdiv(g, d), up);
        }
    } else if (lane == 0) {
        const __half yh = f2h(y);
        out[row] = (EPI == EPI_RESIDUAL) ? __hadd(res[row], yh) : yh;
    }
}

// ---------------------------------------------------------------------------------------
// Decode attention for one new token, grouped-query, split over the cache ("split-K",
// flash-decoding): block (c, j) handles positions [c*CHUNK, (c+1)*CHUNK) of KV head j
// for its R query heads. The position is read from device memory, so one captured
// graph serves every step; chunks past the position return at once.
//
// Fused in: RoPE of q and k (when `rotate`), the write of the new k and v into the
// cache at `pos`, and the merge of the chunks' partial softmaxes, done by the last
// block of each KV head to finish (a counter in device memory says which is last).
//
//   q: [H, E], k_new, v_new: [K, E] (views of the QKV output), cos/sin: [S_max, E/2]
//   k_cache, v_cache: [K, S_cap, E] (this layer's);  out: [H * E]
#define CHUNK 128

template <int E, int R>
__global__ void __launch_bounds__(CHUNK) decode_attention(
        const __half* __restrict__ q, const __half* __restrict__ k_new, const __half* __restrict__ v_new,
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, const int* __restrict__ pos_ptr,
        __half* k_cache, __half* v_cache, int S_cap, float scale, int rotate,
        float* part_o, float* part_ml, unsigned int* counters, __half* __restrict__ out) {
    constexpr int HALF = E / 2;
    const int c = blockIdx.x, j = blockIdx.y, t = threadIdx.x;
    const int pos = pos_ptr[0];
    const int n_keys = pos + 1;
    const int n_chunks = (n_keys + CHUNK - 1) / CHUNK;
    if (c >= n_chunks) return;

    __shared__ float sq[R][E];        // this KV head's R query heads (rotated), fp32
    __shared__ float sp[R][CHUNK];    // scores, then probabilities
    __shared__ float red[33];
    __shared__ float sm[R], sl[R];
    __shared__ int is_last;
    const float* cs = cos_t + (size_t)pos * HALF;
    const float* sn = sin_t + (size_t)pos * HALF;

    // RoPE, rounded like the readable path: fp16(x1*cos - x2*sin) without FMA contraction
    for (int i = t; i < R * HALF; i += CHUNK) {
        const int r = i / HALF, e = i % HALF;
        const __half* qh = q + (size_t)(j * R + r) * E;
        const float x1 = h2f(qh[e]), x2 = h2f(qh[e + HALF]);
        if (rotate) {
            sq[r][e] = h2f(f2h(__fsub_rn(__fmul_rn(x1, cs[e]), __fmul_rn(x2, sn[e]))));
            sq[r][e + HALF] = h2f(f2h(__fadd_rn(__fmul_rn(x2, cs[e]), __fmul_rn(x1, sn[e]))));
        } else {
            sq[r][e] = x1;
            sq[r][e + HALF] = x2;
        }
    }
    __half* kc = k_cache + (size_t)j * S_cap * E;
    __half* vc = v_cache + (size_t)j * S_cap * E;
    if (c == n_chunks - 1) {  // the chunk that holds `pos` writes the new key and value
        for (int e = t; e < HALF; e += CHUNK) {
            const float x1 = h2f(k_new[j * E + e]), x2 = h2f(k_new[j * E + e + HALF]);
            if (rotate) {
                kc[(size_t)pos * E + e] = f2h(__fsub_rn(__fmul_rn(x1, cs[e]), __fmul_rn(x2, sn[e])));
                kc[(size_t)pos * E + e + HALF] = f2h(__fadd_rn(__fmul_rn(x2, cs[e]), __fmul_rn(x1, sn[e])));
            } else {
                kc[(size_t)pos * E + e] = k_new[j * E + e];
                kc[(size_t)pos * E + e + HALF] = k_new[j * E + e + HALF];
            }
        }
        for (int e = t; e < E; e += CHUNK) vc[(size_t)pos * E + e] = v_new[j * E + e];
    }
    __syncthreads();  // the new key/value and sq are visible to the whole block

    // scores: one key per thread; fp16(q.k) like the fp16 matmul, then fp32 * scale
    const int s = c * CHUNK + t;
    if (s < n_keys) {
        const uint4* kr = reinterpret_cast<const uint4*>(kc + (size_t)s * E);
        float acc[R];
#pragma unroll
        for (int r = 0; r < R; r++) acc[r] = 0.f;
#pragma unroll
        for (int v8 = 0; v8 < E / 8; v8++) {
            const uint4 kv = kr[v8];
            const __half2* k2 = reinterpret_cast<const __half2*>(&kv);
#pragma unroll
            for (int jj = 0; jj < 4; jj++) {
                const float2 kf = __half22float2(k2[jj]);
#pragma unroll
                for (int r = 0; r < R; r++)
                    acc[r] = fmaf(sq[r][v8 * 8 + 2 * jj], kf.x, fmaf(sq[r][v8 * 8 + 2 * jj + 1], kf.y, acc[r]));
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) sp[r][t] = h2f(f2h(acc[r])) * scale;
    } else {
#pragma unroll
        for (int r = 0; r < R; r++) sp[r][t] = -INFINITY;
    }
    // chunk-local softmax statistics per query head
#pragma unroll
    for (int r = 0; r < R; r++) {
        const float m = block_max(sp[r][t], red);
        const float p = (s < n_keys) ? expf(sp[r][t] - m) : 0.f;
        const float l = block_sum(p, red);
        sp[r][t] = p;
        if (t == 0) { sm[r] = m; sl[r] = l; }
    }
    __syncthreads();
    // partial output: thread (g, e) sums its share of the chunk's keys for every head
    constexpr int GROUPS = CHUNK / E;  // 2 for E = 64, 1 for E = 128
    const int e = t % E, g = t / E;
    float o[R];
#pragma unroll
    for (int r = 0; r < R; r++) o[r] = 0.f;
    if (g < GROUPS) {
        const int end = min(CHUNK, n_keys - c * CHUNK);
        for (int kk = g; kk < end; kk += GROUPS) {
            const float v = h2f(vc[(size_t)(c * CHUNK + kk) * E + e]);
#pragma unroll
            for (int r = 0; r < R; r++) o[r] = fmaf(sp[r][kk], v, o[r]);
        }
    }
    __syncthreads();
    // reduce over the GROUPS, reusing sp as scratch ([R][CHUNK] >= [R][GROUPS*E])
#pragma unroll
    for (int r = 0; r < R; r++) if (g < GROUPS) sp[r][g * E + e] = o[r];
    __syncthreads();
    const int n_total_chunks = (S_cap + CHUNK - 1) / CHUNK;
    float* po = part_o + ((size_t)j * n_total_chunks + c) * R * E;
    float* pml = part_ml + ((size_t)j * n_total_chunks + c) * R * 2;
    for (int i = t; i < R * E; i += CHUNK) {
        const int r = i / E, ee = i % E;
        float sum = 0.f;
#pragma unroll
        for (int gg = 0; gg < GROUPS; gg++) sum += sp[r][gg * E + ee];
        po[i] = sum;
    }
    if (t < R) { pml[2 * t] = sm[t]; pml[2 * t + 1] = sl[t]; }

    // the last block of this KV head to finish merges all chunks
    __threadfence();
    __syncthreads();
    if (t == 0) is_last = (atomicAdd(&counters[j], 1u) == (unsigned)(n_chunks - 1));
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const float* po0 = part_o + (size_t)j * n_total_chunks * R * E;
    const float* pml0 = part_ml + (size_t)j * n_total_chunks * R * 2;
    for (int i = t; i < R * E; i += CHUNK) {
        const int r = i / E;
        float m = -INFINITY;
        for (int cc = 0; cc < n_chunks; cc++) m = fmaxf(m, __ldcg(pml0 + (cc * R + r) * 2));
        float l = 0.f, acc = 0.f;
        for (int cc = 0; cc < n_chunks; cc++) {
            const float w = expf(__ldcg(pml0 + (cc * R + r) * 2) - m);
            l += w * __ldcg(pml0 + (cc * R + r) * 2 + 1);
            acc += w * __ldcg(po0 + (size_t)cc * R * E + i);
        }
        out[(size_t)j * R * E + i] = f2h(acc / l);
    }
    if (t == 0) counters[j] = 0;  // ready for the next layer / step
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

extern "C" __global__ void __launch_bounds__(SAMPLE_THREADS) sample_token(
        const float* __restrict__ logits, int V, const float* __restrict__ params, float* w,
        long long* token, long long* history, int* pos_ptr) {
    // params: temperature, top_k, top_p, min_p, u
    __shared__ float red[33];
    __shared__ float sval[SAMPLE_THREADS];
    __shared__ int sidx[SAMPLE_THREADS];
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
    if (t == 0) {
        const int pos = pos_ptr[0];
        token[0] = chosen;
        history[pos + 1] = chosen;
        pos_ptr[0] = pos + 1;
    }
}

// The host's per-step inputs, written by a kernel (no host-to-device copy, no sync).
extern "C" __global__ void set_step(long long* token, int* pos_ptr, float* params, long long tok, int pos,
                                    float u, int write_token) {
    if (write_token) { token[0] = tok; pos_ptr[0] = pos; }
    params[4] = u;
}
