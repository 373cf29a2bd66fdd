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
    asm volatile("griddepcontrol.launch_dependents;" ::: );  // let layer 0's GEMV start loading weights
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
// Programmatic dependent launch (Hopper): a kernel launched with the PDL attribute may
// start while the kernel before it is still running. It must call pdl_wait() before it
// reads anything the previous kernel wrote (or writes anything it reads); what comes
// before (weights, old cache entries) overlaps the previous kernel's tail. Each kernel
// calls pdl_launch_dependents() first thing, so the next one is launched as soon as all
// of this one's blocks are running. Without the attribute both are no-ops.
__device__ __forceinline__ void pdl_wait() { asm volatile("griddepcontrol.wait;" ::: "memory"); }
__device__ __forceinline__ void pdl_launch_dependents() { asm volatile("griddepcontrol.launch_dependents;" ::: ); }

// ---------------------------------------------------------------------------------------
// GEMV with fp32 accumulation: y[n] = sum_k W[n, k] * h[k].  One warp per output row;
// each lane issues all its 16-byte weight loads before anything else (K is a
// compile-time constant, so the loop unrolls and the loads stay in registers).
//
//   NORM:  h = rms_norm(x) * norm_w, fused: y = inv_rms * sum_k W[n, k] * (x[k] * norm_w[k]),
//          where each warp gets sum(x^2) from the x values it reads anyway: no extra
//          pass, no block-wide reduction (h is never rounded to fp16 here, unlike the
//          readable path: the results differ by fp16 rounding, ~1e-3 relative)
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

__device__ __forceinline__ void fma8(const uint4& w, const float (&h)[8], float& acc) {
    const __half2* w2 = reinterpret_cast<const __half2*>(&w);
#pragma unroll
    for (int j = 0; j < 4; j++) {
        const float2 a = __half22float2(w2[j]);
        acc = fmaf(a.x, h[2 * j], acc);
        acc = fmaf(a.y, h[2 * j + 1], acc);
    }
}

template <int K, bool NORM, int EPI>
__global__ void __launch_bounds__(512) gemv(const __half* __restrict__ W, const __half* __restrict__ x,
                                             const __half* __restrict__ norm_w, float eps,
                                             const __half* __restrict__ res, __half* __restrict__ out, int N) {
    static_assert(K % 8 == 0, "K must be a multiple of 8 (16-byte rows)");
    pdl_launch_dependents();
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row = blockIdx.x * (blockDim.x >> 5) + warp;
    const bool active = row < N;
    Row<K> wa, wb;
    if (active) {
        load_row<K>(wa, W + (size_t)row * K, lane);
        if (EPI == EPI_SWIGLU) load_row<K>(wb, W + (size_t)(row + N) * K, lane);
    }
    // the "memory" clobber in pdl_wait keeps every activation load behind the weight loads
    pdl_wait();
    // x, written by the previous kernel, is read once per block into shared memory with
    // L2-only loads (ld.global.cg): an L1 line cached before this kernel may be stale when
    // kernels overlap, and every warp of the block reads all of x
    __shared__ __align__(16) __half xs[K];
    for (int i = threadIdx.x; i < Row<K>::NV; i += blockDim.x)
        reinterpret_cast<uint4*>(xs)[i] = __ldcg(reinterpret_cast<const uint4*>(x) + i);
    __syncthreads();
    // (the branch keeps ptxas from sinking the weight loads to their first use)
    if (!active) return;
    const uint4* xv = reinterpret_cast<const uint4*>(xs);
    const uint4* nv = reinterpret_cast<const uint4*>(norm_w);
    float acc_a = 0.f, acc_b = 0.f, ss = 0.f;
#pragma unroll
    for (int i = 0; i < Row<K>::PER_LANE; i++) {
        const int c = i * 32 + lane;
        if (c < Row<K>::NV) {
            const uint4 xr = xv[c];
            const __half2* x2 = reinterpret_cast<const __half2*>(&xr);
            float h[8];
#pragma unroll
            for (int j = 0; j < 4; j++) {
                const float2 f = __half22float2(x2[j]);
                h[2 * j] = f.x; h[2 * j + 1] = f.y;
            }
            if (NORM) {
                const uint4 nr = nv[c];
                const __half2* n2 = reinterpret_cast<const __half2*>(&nr);
#pragma unroll
                for (int j = 0; j < 4; j++) {
                    const float2 g = __half22float2(n2[j]);
                    ss = fmaf(h[2 * j], h[2 * j], ss);
                    ss = fmaf(h[2 * j + 1], h[2 * j + 1], ss);
                    h[2 * j] *= g.x; h[2 * j + 1] *= g.y;
                }
            }
            fma8(wa.v[i], h, acc_a);
            if (EPI == EPI_SWIGLU) fma8(wb.v[i], h, acc_b);
        }
    }
    float y = warp_sum(acc_a);
    float u = (EPI == EPI_SWIGLU) ? warp_sum(acc_b) : 0.f;
    if (NORM) {
        const float inv = 1.f / sqrtf(warp_sum(ss) / K + eps);
        y *= inv;
        u *= inv;
    }
    if (lane == 0) {
        if (EPI == EPI_SWIGLU) {
            // mirrors `gate / (1.0 + exp(-gate)) * up` evaluated in fp16 by CuPy
            const __half g = f2h(y), up = f2h(u);
            const __half e = f2h(expf(-h2f(g)));
            const __half d = f2h(1.f + h2f(e));
            out[row] = __hmul(__hdiv(g, d), up);
        } else {
            const __half yh = f2h(y);
            out[row] = (EPI == EPI_RESIDUAL) ? __hadd(__ldcg(res + row), yh) : yh;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Decode attention for one new token, grouped-query, split over the cache ("split-K",
// flash-decoding): block (c, j, z) handles positions [c*CHUNK, (c+1)*CHUNK) of KV head j
// for R of the n_rep query heads that share it (heads z*R .. z*R+R-1 of the group): more,
// smaller blocks, because one token's attention is latency-bound, not bandwidth-bound. The position is read from device memory, so one captured
// graph serves every step; chunks past the position return at once.
//
// Fused in: RoPE of q and k (when `rotate`), the write of the new k and v into the
// cache at `pos`, and the merge of the chunks' partial softmaxes, done by the last
// block of each KV head to finish (a counter in device memory says which is last).
// CHUNK (positions per block = threads per block) is 256 for E = 64 and 128 for E = 128,
// so that a block's values fit in shared memory; contexts up to CHUNK need no merge.
//
//   q: [H, E], k_new, v_new: [K, E] (views of the QKV output), cos/sin: [S_max, E/2]
//   k_cache, v_cache: [K, S_cap, E] (this layer's);  out: [H * E]
template <int E, int R, int CHUNK>
__global__ void __launch_bounds__(CHUNK) decode_attention(
        const __half* __restrict__ q, const __half* __restrict__ k_new, const __half* __restrict__ v_new,
        const float* __restrict__ cos_t, const float* __restrict__ sin_t, const int* __restrict__ pos_ptr,
        __half* k_cache, __half* v_cache, int S_cap, float scale, int rotate, int n_rep,
        float* part_o, float* part_ml, unsigned int* counters, __half* __restrict__ out) {
    constexpr int HALF = E / 2;
    constexpr int ROW_VECS = E / 8;          // 16-byte vectors per key/value row
    constexpr int WARPS = CHUNK / 32;
    pdl_launch_dependents();
    const int c = blockIdx.x, j = blockIdx.y, z = blockIdx.z, t = threadIdx.x;
    const int head0 = j * n_rep + z * R;            // this block's first query head
    const int gi = j * gridDim.z + z;                // its index in the scratch and counters
    const int lane = t & 31, warp = t >> 5;
    const int pos = __ldcg(pos_ptr);  // written before this step began: safe before pdl_wait
    const int n_keys = pos + 1;
    const int n_chunks = (n_keys + CHUNK - 1) / CHUNK;
    if (c >= n_chunks) { pdl_wait(); return; }
    const int first = c * CHUNK;                       // this chunk's first position
    const int n_here = min(CHUNK, n_keys - first);     // positions in this chunk
    const bool holds_pos = (c == n_chunks - 1);        // the chunk where the new token goes

    __shared__ __align__(16) __half sv[CHUNK][E];     // the chunk's values
    __shared__ float sq[R][E];                        // this KV head's R query heads, rotated
    __shared__ float skn[E];                          // the new key, rotated
    __shared__ float sp[R][CHUNK];                    // probabilities, then partial outputs
    __shared__ float red[WARPS][R];
    __shared__ int is_last;
    __half* kc = k_cache + (size_t)j * S_cap * E;
    __half* vc = v_cache + (size_t)j * S_cap * E;

    // 1. issue every load of the cache first (older positions: written by earlier steps,
    // so this overlaps the previous kernel): this thread's key row, its share of the values
    const int s = first + t;
    uint4 kreg[ROW_VECS];
    if (t < n_here && s != pos) {
#pragma unroll
        for (int i = 0; i < ROW_VECS; i++) kreg[i] = __ldcg(reinterpret_cast<const uint4*>(kc + (size_t)s * E) + i);
    }
    uint4 vreg[ROW_VECS];
#pragma unroll
    for (int i = 0; i < ROW_VECS; i++) {
        const int idx = i * CHUNK + t, row = idx / ROW_VECS, col = idx % ROW_VECS;
        vreg[i] = (row < n_here && first + row != pos)
            ? __ldcg(reinterpret_cast<const uint4*>(vc + (size_t)(first + row) * E) + col) : make_uint4(0, 0, 0, 0);
    }
    pdl_wait();  // from here on: q, k, v of this step, written by the QKV GEMV
#pragma unroll
    for (int i = 0; i < ROW_VECS; i++) {
        const int idx = i * CHUNK + t, row = idx / ROW_VECS, col = idx % ROW_VECS;
        if (first + row == pos) vreg[i] = __ldcg(reinterpret_cast<const uint4*>(v_new + (size_t)j * E) + col);
    }
    // 2. RoPE of q (and of the new k), rounded like the readable path: fp16(x1*cos - x2*sin), no FMA
    const float* cs = cos_t + (size_t)pos * HALF;
    const float* sn = sin_t + (size_t)pos * HALF;
    for (int i = t; i < (R + 1) * HALF; i += CHUNK) {
        const int r = i / HALF, e = i % HALF;
        const __half* x = (r < R) ? q + (size_t)(head0 + r) * E : k_new + (size_t)j * E;
        const float x1 = h2f(__ldcg(x + e)), x2 = h2f(__ldcg(x + e + HALF));
        float y1 = x1, y2 = x2;
        if (rotate) {
            y1 = h2f(f2h(__fsub_rn(__fmul_rn(x1, cs[e]), __fmul_rn(x2, sn[e]))));
            y2 = h2f(f2h(__fadd_rn(__fmul_rn(x2, cs[e]), __fmul_rn(x1, sn[e]))));
        }
        if (r < R) { sq[r][e] = y1; sq[r][e + HALF] = y2; }
        else {
            skn[e] = y1; skn[e + HALF] = y2;
            if (holds_pos && z == 0) {  // the new key and value go into the cache for later steps
                kc[(size_t)pos * E + e] = f2h(y1);
                kc[(size_t)pos * E + e + HALF] = f2h(y2);
                vc[(size_t)pos * E + e] = __ldcg(v_new + (size_t)j * E + e);
                vc[(size_t)pos * E + e + HALF] = __ldcg(v_new + (size_t)j * E + e + HALF);
            }
        }
    }
#pragma unroll
    for (int i = 0; i < ROW_VECS; i++) {
        const int idx = i * CHUNK + t;
        reinterpret_cast<uint4*>(&sv[0][0])[idx] = vreg[i];
    }
    __syncthreads();

    // 3. scores of all R heads for this thread's key: fp16(q.k) like the fp16 matmul, then * scale
    float sc[R];
#pragma unroll
    for (int r = 0; r < R; r++) sc[r] = 0.f;
    if (t < n_here) {
        if (s == pos) {
#pragma unroll
            for (int e = 0; e < E; e++) {
#pragma unroll
                for (int r = 0; r < R; r++) sc[r] = fmaf(sq[r][e], skn[e], sc[r]);
            }
        } else {
#pragma unroll
            for (int i = 0; i < ROW_VECS; i++) {
                const __half2* k2 = reinterpret_cast<const __half2*>(&kreg[i]);
#pragma unroll
                for (int jj = 0; jj < 4; jj++) {
                    const float2 kf = __half22float2(k2[jj]);
#pragma unroll
                    for (int r = 0; r < R; r++)
                        sc[r] = fmaf(sq[r][i * 8 + 2 * jj + 1], kf.y, fmaf(sq[r][i * 8 + 2 * jj], kf.x, sc[r]));
                }
            }
        }
#pragma unroll
        for (int r = 0; r < R; r++) sc[r] = h2f(f2h(sc[r])) * scale;
    } else {
#pragma unroll
        for (int r = 0; r < R; r++) sc[r] = -INFINITY;
    }
    // 4. chunk softmax statistics for all heads at once: warp shuffles, one exchange
    float m[R], l[R];
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
        for (int w = 1; w < WARPS; w++) mm = fmaxf(mm, red[w][r]);
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
    // 5. partial output from shared memory: thread (g, e) sums a share of the keys for every head
    constexpr int GROUPS = CHUNK / E;  // 2 for E = 64, 1 for E = 128
    const int e = t % E, g = t / E;
    float o[R];
#pragma unroll
    for (int r = 0; r < R; r++) o[r] = 0.f;
    for (int kk = g; kk < n_here; kk += GROUPS) {
        const float v = h2f(sv[kk][e]);
#pragma unroll
        for (int r = 0; r < R; r++) o[r] = fmaf(sp[r][kk], v, o[r]);
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; r++) {
        float ll = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; w++) ll += red[w][r];
        l[r] = ll;
    }
#pragma unroll
    for (int r = 0; r < R; r++) sp[r][g * E + e] = o[r];  // reuse sp: [R][CHUNK] >= [R][GROUPS * E]
    __syncthreads();

    if (n_chunks == 1) {  // the whole context in one chunk: normalise and done
        for (int i = t; i < R * E; i += CHUNK) {
            const int r = i / E, ee = i % E;
            float sum = 0.f;
#pragma unroll
            for (int gg = 0; gg < GROUPS; gg++) sum += sp[r][gg * E + ee];
            out[(size_t)head0 * E + i] = f2h(sum / l[r]);
        }
        return;
    }
    const int n_total_chunks = (S_cap + CHUNK - 1) / CHUNK;
    float* po = part_o + ((size_t)gi * n_total_chunks + c) * R * E;
    float* pml = part_ml + ((size_t)gi * n_total_chunks + c) * R * 2;
    for (int i = t; i < R * E; i += CHUNK) {
        const int r = i / E, ee = i % E;
        float sum = 0.f;
#pragma unroll
        for (int gg = 0; gg < GROUPS; gg++) sum += sp[r][gg * E + ee];
        po[i] = sum;
    }
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < R; r++) { pml[2 * r] = m[r]; pml[2 * r + 1] = l[r]; }
    }

    // 6. the last block of this KV head to finish merges all chunks
    __threadfence();
    __syncthreads();
    if (t == 0) is_last = (atomicAdd(&counters[gi], 1u) == (unsigned)(n_chunks - 1));
    __syncthreads();
    if (!is_last) return;
    __threadfence();
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
        out[(size_t)head0 * E + i] = f2h(acc / ll);
    }
    if (t == 0) counters[gi] = 0;  // ready for the next layer / step
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
