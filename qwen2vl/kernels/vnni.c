/* Quantized matrix products for decode on CPUs with AVX512-VNNI (qwen2vl.kernels builds and loads this file).

Both kernels quantize the input to int8 in blocks along a row (scale max|x| / 127 over the block, round half to
even): int4 per weight group, int8 per 64 inputs. A block's scale belongs to its inputs alone, so a tensor-parallel
rank holding whole blocks of a row computes exactly the 1-rank products of its part (and an outlier costs only its
block precision, as in llama.cpp's Q8 activations). They multiply with VPDPBUSD (four u8 x s8 products summed into each int32 lane) and rescale in float32. They read the
weight once per call however many rows (at most a few: decode steps), in layouts that are plain tensors, so the
load cache can store them and a load maps them instead of packing them.

w4_linear: int4 weights, asymmetric, in groups of g inputs: w[n][k] = (q - 8) * s[n][k/g] + z[n][k/g], q in 0..15.
  Layout "vnni16" (qwen2vl.kernels.pack_int4): rows in blocks of 16, a block's inputs in steps of 8, 64 bytes a
  step: byte 4*j + t holds row 16*b + j at input 8*i + t in its low nibble and at input 8*i + 4 + t in its high one.
  So one 64-byte load, masked (low) or shifted (high), is the u8 operand of VPDPBUSD for 16 rows, and four input
  bytes broadcast to every lane are the s8 operand.
  Worked example, K = 16: block 0 is 2 steps of 64 bytes; step 1, byte 4*3 + 2 = 14 holds q[3][10] (low nibble) and
  q[3][14] (high nibble).
  Scales: sz[b][G][16][2] bf16 (block b's rows' scale s and zero z, pairs, group by group: torch's (G, N, 2)
  scales_and_zeros with the rows in blocks of 16 moved outermost), so a block reads them in order.
  y[m][n] = sum_gi sx[m][gi] * (s * sum_{k in gi} q * xq[m][k] + (z - 8 s) * sum_{k in gi} xq[m][k]).

w8_linear: int8 weights, symmetric per row (w[n][k] = q[n][k] * sw[n]), the plain (N, K) matrix torch._int_mm
  reads for prefills too. The input is offset to u8 (xq + 128) and sum_k q[n][k] (also by VPDPBUSD) takes the
  offset out again, block by block: y[m][n] = sw[n] * sum_b sx[m][b] * (float)(sum_{k in b} (xq + 128) q -
  128 sum_{k in b} q) (+ bias).

Threads: OpenMP, the same runtime torch uses (qwen2vl.kernels links torch's libgomp), num_threads from the caller.
*/
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static inline __m512 load16(const void *x, int bf16, int64_t k) {
    if (bf16) {
        __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)x + k));
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_loadu_ps((const float *)x + k);
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, as torch converts */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* One row of K inputs (K % qb == 0, qb % 16 == 0) -> int8 q (offset 128 as u8 when offset) and, per block of qb
   inputs, its scale (max |x| / 127 over the block) and the sum of its q (before the offset). */
static void quant_row(const void *x, int bf16, int64_t K, int64_t qb, int offset, int8_t *q, float *sx,
                      int32_t *qsum) {
    const __m512i off = _mm512_set1_epi32(offset ? 128 : 0);
    for (int64_t b = 0; b < K; b += qb) {
        __m512 amax = _mm512_setzero_ps();
        for (int64_t k = b; k < b + qb; k += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(load16(x, bf16, k)));
        float m = _mm512_reduce_max_ps(amax);
        float s = (m > 1e-12f ? m : 1e-12f) / 127.0f;
        __m512 vs = _mm512_set1_ps(s);
        __m512i acc = _mm512_setzero_si512();
        for (int64_t k = b; k < b + qb; k += 16) {
            __m512i v = _mm512_cvtps_epi32(_mm512_div_ps(load16(x, bf16, k), vs));  /* nearest even, |v| <= 127 */
            acc = _mm512_add_epi32(acc, v);
            _mm_storeu_si128((__m128i *)(q + k), _mm512_cvtepi32_epi8(_mm512_add_epi32(v, off)));
        }
        sx[b / qb] = s;
        qsum[b / qb] = _mm512_reduce_add_epi32(acc);
    }
}

static void quant_rows(const void *x, int bf16, int64_t M, int64_t K, int64_t qb, int offset, int8_t *q, float *sx,
                       int32_t *qsum, int nthreads) {
    const int64_t B = K / qb;
    const size_t esz = bf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (M >= 8)
    for (int64_t m = 0; m < M; m++)
        quant_row((const char *)x + m * K * esz, bf16, K, qb, offset, q + m * K, sx + m * B, qsum + m * B);
}

static inline void store16(void *y, int bf16, int64_t i, __m512 v) {
    if (bf16) {
        float f[16];
        _mm512_storeu_ps(f, v);
        uint16_t *o = (uint16_t *)y + i;
        for (int j = 0; j < 16; j++) o[j] = to_bf16(f[j]);
    } else {
        _mm512_storeu_ps((float *)y + i, v);
    }
}

static inline int32_t load4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* Rows m0..m0+MR of the output for row block b (16 outputs). */
static inline __attribute__((always_inline)) void w4_block(
    const uint8_t *wb, const uint16_t *szb, const int8_t *xq, const float *sx, const int32_t *gsum, int64_t K,
    int64_t g, const int MR, const float *bias, void *y, int ybf16, int64_t N, int64_t n0) {
    const int64_t G = K / g;
    const __m512i mask = _mm512_set1_epi8(0x0f);
    __m512 yacc[4];
    for (int r = 0; r < MR; r++) yacc[r] = _mm512_setzero_ps();
    for (int64_t gi = 0; gi < G; gi++) {
        __m512i alo[4], ahi[4];
        for (int r = 0; r < MR; r++) alo[r] = ahi[r] = _mm512_setzero_si512();
        const uint8_t *wp = wb + gi * (g / 8) * 64;
        const int8_t *xp = xq + gi * g;
        for (int64_t i = 0; i < g / 8; i++) {
            _mm_prefetch((const char *)(wp + i * 64) + 2048, _MM_HINT_T0);
            __m512i v = _mm512_loadu_si512((const void *)(wp + i * 64));
            __m512i lo = _mm512_and_si512(v, mask);
            __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
            for (int r = 0; r < MR; r++) {
                const int8_t *xr = xp + r * K + i * 8;
                alo[r] = _mm512_dpbusd_epi32(alo[r], lo, _mm512_set1_epi32(load4(xr)));
                ahi[r] = _mm512_dpbusd_epi32(ahi[r], hi, _mm512_set1_epi32(load4(xr + 4)));
            }
        }
        __m512i p = _mm512_loadu_si512((const void *)(szb + gi * 32));  /* s0 z0 s1 z1 ... s15 z15 */
        __m512 s = _mm512_castsi512_ps(_mm512_slli_epi32(p, 16));
        __m512 z = _mm512_castsi512_ps(_mm512_and_si512(p, _mm512_set1_epi32((int)0xffff0000u)));
        __m512 lo8 = _mm512_fnmadd_ps(_mm512_set1_ps(8.0f), s, z);  /* z - 8 s: w = q * s + lo8 */
        for (int r = 0; r < MR; r++) {  /* the group's s * sum q xq + lo8 * sum xq, times its activation scale */
            __m512 a = _mm512_cvtepi32_ps(_mm512_add_epi32(alo[r], ahi[r]));
            __m512 t = _mm512_fmadd_ps(lo8, _mm512_set1_ps((float)gsum[r * G + gi]), _mm512_mul_ps(a, s));
            yacc[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sx[r * G + gi]), yacc[r]);
        }
    }
    for (int r = 0; r < MR; r++) {
        __m512 v = yacc[r];
        if (bias) v = _mm512_add_ps(v, _mm512_loadu_ps(bias + n0));
        store16(y, ybf16, r * N + n0, v);
    }
}

/* x (M, K) float32 or bf16 -> y (M, N) float32 or bf16 (+ bias, float32 (N,) or NULL). K % g == 0, g % 16 == 0,
   N % 16 == 0. */
int w4_linear(const void *x, int xbf16, int64_t M, int64_t K, const uint8_t *w, const uint16_t *sz, int64_t N,
              int64_t g, const float *bias, void *y, int ybf16, int nthreads) {
    if (K % g || g % 16 || N % 16) return 1;
    const int64_t G = K / g;
    int8_t *xq = (int8_t *)malloc((size_t)(M * K + 64));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(M * G));
    int32_t *gsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * G));
    if (!xq || !sx || !gsum) { free(xq); free(sx); free(gsum); return 2; }
    quant_rows(x, xbf16, M, K, g, 0, xq, sx, gsum, nthreads);
    const int64_t nb = N / 16;
    const size_t esz = ybf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t *wb = w + b * K * 8;  /* 16 rows x K nibbles */
        const uint16_t *szb = sz + b * G * 32;
        for (int64_t m = 0; m < M; m += 4) {
            const int8_t *xm = xq + m * K;
            const int32_t *gm = gsum + m * G;
            char *ym = (char *)y + m * N * esz;
            switch (M - m >= 4 ? 4 : M - m) {
                case 4: w4_block(wb, szb, xm, sx + m * G, gm, K, g, 4, bias, ym, ybf16, N, b * 16); break;
                case 3: w4_block(wb, szb, xm, sx + m * G, gm, K, g, 3, bias, ym, ybf16, N, b * 16); break;
                case 2: w4_block(wb, szb, xm, sx + m * G, gm, K, g, 2, bias, ym, ybf16, N, b * 16); break;
                default: w4_block(wb, szb, xm, sx + m * G, gm, K, g, 1, bias, ym, ybf16, N, b * 16); break;
            }
        }
    }
    free(xq); free(sx); free(gsum);
    return 0;
}

/* Rows m0..m0+MR of the output for weight rows n0..n0+4; activation blocks of 64 inputs (one step). */
static inline __attribute__((always_inline)) void w8_block(
    const int8_t *w, const uint8_t *xu, const float *sx, const float *sw, int64_t K, const int MR,
    const float *bias, void *y, int ybf16, int64_t N, int64_t n0) {
    const __m512i ones = _mm512_set1_epi8(1);
    const int64_t B = K / 64;
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < MR; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 64) {
        __m512i wv[4], off[4];
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char *)(w + (n0 + i) * K + k) + 1024, _MM_HINT_T0);
            wv[i] = _mm512_loadu_si512((const void *)(w + (n0 + i) * K + k));
            off[i] = _mm512_slli_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), ones, wv[i]), 7);  /* 128 sum q */
        }
        for (int r = 0; r < MR; r++) {
            __m512i xv = _mm512_loadu_si512((const void *)(xu + r * K + k));
            __m512 s = _mm512_set1_ps(sx[r * B + k / 64]);
            for (int i = 0; i < 4; i++) {
                __m512i d = _mm512_sub_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), xv, wv[i]), off[i]);
                acc[i][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(d), s, acc[i][r]);
            }
        }
    }
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < MR; r++) {
            float v = _mm512_reduce_add_ps(acc[i][r]) * sw[n0 + i];
            if (bias) v += bias[n0 + i];
            if (ybf16) ((uint16_t *)y)[r * N + n0 + i] = to_bf16(v);
            else ((float *)y)[r * N + n0 + i] = v;
        }
}

/* x (M, K) float32 or bf16 -> y (M, N) float32 or bf16 (+ bias). K % 64 == 0, N % 4 == 0. */
int w8_linear(const void *x, int xbf16, int64_t M, int64_t K, const int8_t *w, const float *sw, int64_t N,
              const float *bias, void *y, int ybf16, int nthreads) {
    if (K % 64 || N % 4) return 1;
    const int64_t B = K / 64;
    uint8_t *xu = (uint8_t *)malloc((size_t)(M * K + 64));
    float *sx = (float *)malloc(sizeof(float) * (size_t)(M * B));
    int32_t *qsum = (int32_t *)malloc(sizeof(int32_t) * (size_t)(M * B));
    if (!xu || !sx || !qsum) { free(xu); free(sx); free(qsum); return 2; }
    quant_rows(x, xbf16, M, K, 64, 1, (int8_t *)xu, sx, qsum, nthreads);
    const size_t esz = ybf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        for (int64_t m = 0; m < M; m += 4) {
            const uint8_t *xm = xu + m * K;
            const float *sm = sx + m * B;
            char *ym = (char *)y + m * N * esz;
            switch (M - m >= 4 ? 4 : M - m) {
                case 4: w8_block(w, xm, sm, sw, K, 4, bias, ym, ybf16, N, n0); break;
                case 3: w8_block(w, xm, sm, sw, K, 3, bias, ym, ybf16, N, n0); break;
                case 2: w8_block(w, xm, sm, sw, K, 2, bias, ym, ybf16, N, n0); break;
                default: w8_block(w, xm, sm, sw, K, 1, bias, ym, ybf16, N, n0); break;
            }
        }
    }
    free(xu); free(sx); free(qsum);
    return 0;
}

/* Rows m0..m0+MR of the output for bf16 weight rows n0..n0+4 (VDPBF16PS: pairs of bf16 products summed into
   float32 lanes). Only these two functions use AVX512-BF16 (a target of their own: the rest of the file runs on
   CPUs with VNNI alone, and qwen2vl.kernels calls them only where the CPU has it). */
static inline __attribute__((always_inline, target("avx512bf16"))) void w16_block(
    const uint16_t *w, const uint16_t *x, int64_t K, const int MR, const float *bias, void *y, int ybf16, int64_t N,
    int64_t n0) {
    __m512 acc[4][4];
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < MR; r++) acc[i][r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        __m512i wv[4];
        for (int i = 0; i < 4; i++) {
            _mm_prefetch((const char *)(w + (n0 + i) * K + k) + 1024, _MM_HINT_T0);
            wv[i] = _mm512_loadu_si512((const void *)(w + (n0 + i) * K + k));
        }
        for (int r = 0; r < MR; r++) {
            __m512bh xv = (__m512bh)_mm512_loadu_si512((const void *)(x + r * K + k));
            for (int i = 0; i < 4; i++) acc[i][r] = _mm512_dpbf16_ps(acc[i][r], xv, (__m512bh)wv[i]);
        }
    }
    for (int i = 0; i < 4; i++)
        for (int r = 0; r < MR; r++) {
            float v = _mm512_reduce_add_ps(acc[i][r]);
            if (bias) v += bias[n0 + i];
            if (ybf16) ((uint16_t *)y)[r * N + n0 + i] = to_bf16(v);
            else ((float *)y)[r * N + n0 + i] = v;
        }
}

/* x bf16 (M, K) -> y (M, N) bf16 or float32 (+ bias): the plain bf16 (N, K) weight. K % 32 == 0, N % 4 == 0. */
__attribute__((target("avx512bf16"))) int w16_linear(const uint16_t *x, int64_t M, int64_t K, const uint16_t *w, int64_t N, const float *bias, void *y,
               int ybf16, int nthreads) {
    if (K % 32 || N % 4) return 1;
    const size_t esz = ybf16 ? 2 : 4;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t n0 = 0; n0 < N; n0 += 4) {
        for (int64_t m = 0; m < M; m += 4) {
            const uint16_t *xm = x + m * K;
            char *ym = (char *)y + m * N * esz;
            switch (M - m >= 4 ? 4 : M - m) {
                case 4: w16_block(w, xm, K, 4, bias, ym, ybf16, N, n0); break;
                case 3: w16_block(w, xm, K, 3, bias, ym, ybf16, N, n0); break;
                case 2: w16_block(w, xm, K, 2, bias, ym, ybf16, N, n0); break;
                default: w16_block(w, xm, K, 1, bias, ym, ybf16, N, n0); break;
            }
        }
    }
    return 0;
}
