/* 4-bit GPTQ matmul for few rows (decode) on x86-64 with AVX2, FMA and F16C.

   Reads the checkpoint tensors as they are: no int4 copy of the weight is made, so a loaded model holds its
   4-bit codes once. Built by cpu_avx2.py with the C compiler at hand and called through ctypes; OpenMP resolves to
   the libgomp.so.1 that torch has already loaded, so this kernel and torch share one thread pool.

       y[M, N] = x[M, K] @ W,   W[k, n] = scale[g, n] * (q[k, n] - zero[g, n]),   g the group of row k

   qw      int32 [K/8, N]  word (r, n) holds q[8r + j, n] in bits 4j .. 4j+3 (GPTQ qweight, packed along K)
   scales  fp16  [G, N]    (GPTQ scales)
   zeros   uint8 [G, N]    true zero points (the v1 "+1" already applied)
   runs    int32 [R + 1]   row chunks of 8: run r covers chunks runs[r] .. runs[r+1]-1, all in group rgroup[r]
   rgroup  int32 [R]

   Per run the sum over k of x[k] * q[k, n] is accumulated in fp32 over integer codes (exact products), then
   y[n] += scale * (acc - zero * sum_k x[k]): one scale multiply per group instead of per weight.

   Unpacking: nibble j is taken by a mask in place, (w & (15 << 4j)) = q * 16^j, converted to float (exact: at
   most 4 significant bits), and multiplied by x[k] * 16^-j, which is x[k] scaled by a power of two (exact). This
   saves the shift per nibble. Nibble 7 is shifted down instead, since 15 << 28 would set the sign bit. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#ifdef _OPENMP
#include <omp.h>
#endif

static const float INV16[8] = {1.0f, 1.0f / 16, 1.0f / 256, 1.0f / 4096, 1.0f / 65536, 1.0f / 1048576,
                               1.0f / 16777216, 1.0f};

/* Chunks c0 .. c1-1 (8 rows each) for all N columns and all M rows, accumulated into acc [M, N]. */
static inline void run_accumulate(const float *xs, int M, int K, const int32_t *qw, int N, int c0, int c1,
                                  float *acc) {
    const __m256i m1 = _mm256_set1_epi32(0xF << 4), m2 = _mm256_set1_epi32(0xF << 8),
                  m3 = _mm256_set1_epi32(0xF << 12), m4 = _mm256_set1_epi32(0xF << 16),
                  m5 = _mm256_set1_epi32(0xF << 20), m6 = _mm256_set1_epi32(0xF << 24), m0 = _mm256_set1_epi32(0xF);
    for (int c = c0; c < c1; c++) {
        const int32_t *row = qw + (size_t)c * N;
        for (int n = 0; n < N; n += 8) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(row + n));
            const __m256 w0 = _mm256_cvtepi32_ps(_mm256_and_si256(w, m0));
            const __m256 w1 = _mm256_cvtepi32_ps(_mm256_and_si256(w, m1));
            const __m256 w2 = _mm256_cvtepi32_ps(_mm256_and_si256(w, m2));
            const __m256 w3 = _mm256_cvtepi32_ps(_mm256_and_si256(w, m3));
            const __m256 w4 = _mm256_cvtepi32_ps(_mm256_and_si256(w, m4));
            const __m256 w5 = _mm256_cvtepi32_ps(_mm256_and_si256(w, m5));
            const __m256 w6 = _mm256_cvtepi32_ps(_mm256_and_si256(w, m6));
            const __m256 w7 = _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 28));
            for (int m = 0; m < M; m++) {
                const float *x = xs + (size_t)m * K + 8 * c;
                float *a = acc + (size_t)m * N + n;
                /* four independent chains, so the FMA latency does not serialise the eight products */
                __m256 p0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 0), w0, _mm256_loadu_ps(a));
                __m256 p1 = _mm256_mul_ps(_mm256_broadcast_ss(x + 1), w1);
                __m256 p2 = _mm256_mul_ps(_mm256_broadcast_ss(x + 2), w2);
                __m256 p3 = _mm256_mul_ps(_mm256_broadcast_ss(x + 3), w3);
                p0 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 4), w4, p0);
                p1 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 5), w5, p1);
                p2 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 6), w6, p2);
                p3 = _mm256_fmadd_ps(_mm256_broadcast_ss(x + 7), w7, p3);
                _mm256_storeu_ps(a, _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3)));
            }
        }
    }
}

/* The same for one row of x (decode): the eight activations of a chunk stay in registers across the whole row. */
static inline void run_accumulate_1(const float *xs, const int32_t *qw, int N, int c0, int c1, float *acc) {
    const __m256i m1 = _mm256_set1_epi32(0xF << 4), m2 = _mm256_set1_epi32(0xF << 8),
                  m3 = _mm256_set1_epi32(0xF << 12), m4 = _mm256_set1_epi32(0xF << 16),
                  m5 = _mm256_set1_epi32(0xF << 20), m6 = _mm256_set1_epi32(0xF << 24), m0 = _mm256_set1_epi32(0xF);
    for (int c = c0; c < c1; c++) {
        const int32_t *row = qw + (size_t)c * N;
        const float *x = xs + 8 * c;
        const __m256 x0 = _mm256_broadcast_ss(x + 0), x1 = _mm256_broadcast_ss(x + 1),
                     x2 = _mm256_broadcast_ss(x + 2), x3 = _mm256_broadcast_ss(x + 3),
                     x4 = _mm256_broadcast_ss(x + 4), x5 = _mm256_broadcast_ss(x + 5),
                     x6 = _mm256_broadcast_ss(x + 6), x7 = _mm256_broadcast_ss(x + 7);
        for (int n = 0; n < N; n += 8) {
            /* one row (N words) ahead of the stream */
            if ((n & 15) == 0) _mm_prefetch((const char *)(row + N + n), _MM_HINT_T0);
            const __m256i w = _mm256_loadu_si256((const __m256i *)(row + n));
            float *a = acc + n;
            __m256 p0 = _mm256_fmadd_ps(x0, _mm256_cvtepi32_ps(_mm256_and_si256(w, m0)), _mm256_loadu_ps(a));
            __m256 p1 = _mm256_mul_ps(x1, _mm256_cvtepi32_ps(_mm256_and_si256(w, m1)));
            __m256 p2 = _mm256_mul_ps(x2, _mm256_cvtepi32_ps(_mm256_and_si256(w, m2)));
            __m256 p3 = _mm256_mul_ps(x3, _mm256_cvtepi32_ps(_mm256_and_si256(w, m3)));
            p0 = _mm256_fmadd_ps(x4, _mm256_cvtepi32_ps(_mm256_and_si256(w, m4)), p0);
            p1 = _mm256_fmadd_ps(x5, _mm256_cvtepi32_ps(_mm256_and_si256(w, m5)), p1);
            p2 = _mm256_fmadd_ps(x6, _mm256_cvtepi32_ps(_mm256_and_si256(w, m6)), p2);
            p3 = _mm256_fmadd_ps(x7, _mm256_cvtepi32_ps(_mm256_srli_epi32(w, 28)), p3);
            _mm256_storeu_ps(a, _mm256_add_ps(_mm256_add_ps(p0, p1), _mm256_add_ps(p2, p3)));
        }
    }
}

/* x [M, K] fp32, y [M, N] fp32 (overwritten). Returns 0, or -1 when scratch memory cannot be had.

   Threads split the rows (K), not the columns: each thread streams one contiguous block of qweight rows, which the
   hardware prefetcher follows at full DRAM speed (a split by columns gives each thread short row segments and a
   jump per row: measured about half the bandwidth on a 1.1B model). A run of one group cut by a thread boundary is
   fine: the flush y += scale * (acc - zero * sum x) is linear, so each thread flushes its part with the sum of x
   over its own rows, into its own partial y; the partials are added at the end. */
int gptq_q4_matmul(const float *x, int M, int K, const int32_t *qw, int N, const uint16_t *scales,
                   const uint8_t *zeros, const int32_t *runs, const int32_t *rgroup, int R, float *y,
                   int threads) {
    const int C = K / 8;
    if (threads < 1) threads = 1;
    if (threads > C) threads = C > 0 ? C : 1;
    /* xs [M, K]: x[m, k] * 16^-(k % 8);  part [threads - 1, M, N]: the other threads' partial outputs */
    const size_t MN = (size_t)M * N;
    float *xs = (float *)malloc(sizeof(float) * ((size_t)M * K + (size_t)(threads - 1) * MN));
    if (!xs) return -1;
    float *part = xs + (size_t)M * K;
    for (size_t i = 0; i < (size_t)M * K; i++) xs[i] = x[i] * INV16[(i % (size_t)K) & 7];
    memset(y, 0, sizeof(float) * MN);
    int failed = 0, used = 1; /* OpenMP may give fewer threads than asked: only those partials exist */
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        T = omp_get_num_threads();
#endif
        if (t == 0) used = T;
        const int c0 = (int)((long)C * t / T), c1 = (int)((long)C * (t + 1) / T);
        float *yo = t == 0 ? y : part + (size_t)(t - 1) * MN;
        float *acc = (float *)malloc(sizeof(float) * (MN + (size_t)M));
        if (!acc) {
            failed = 1;
        } else {
            float *sx = acc + MN;
            if (t > 0) memset(yo, 0, sizeof(float) * MN);
            int r = 0;
            while (r < R && runs[r + 1] <= c0) r++;
            for (; r < R && runs[r] < c1; r++) {
                const int a0 = runs[r] > c0 ? runs[r] : c0, a1 = runs[r + 1] < c1 ? runs[r + 1] : c1;
                const int g = rgroup[r];
                for (int m = 0; m < M; m++) {
                    float s = 0.0f;
                    for (int k = 8 * a0; k < 8 * a1; k++) s += x[(size_t)m * K + k];
                    sx[m] = s;
                }
                memset(acc, 0, sizeof(float) * MN);
                if (M == 1)
                    run_accumulate_1(xs, qw, N, a0, a1, acc);
                else
                    run_accumulate(xs, M, K, qw, N, a0, a1, acc);
                const uint16_t *sg = scales + (size_t)g * N;
                const uint8_t *zg = zeros + (size_t)g * N;
                for (int n = 0; n < N; n += 8) {
                    const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sg + n)));
                    const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + n))));
                    for (int m = 0; m < M; m++) {
                        float *o = yo + (size_t)m * N + n;
                        const __m256 a = _mm256_loadu_ps(acc + (size_t)m * N + n);
                        const __m256 d = _mm256_fnmadd_ps(z, _mm256_set1_ps(sx[m]), a);
                        _mm256_storeu_ps(o, _mm256_fmadd_ps(sc, d, _mm256_loadu_ps(o)));
                    }
                }
            }
            free(acc);
        }
    }
    for (int t = 1; t < used; t++) {
        const float *p = part + (size_t)(t - 1) * MN;
        for (size_t i = 0; i < MN; i++) y[i] += p[i];
    }
    free(xs);
    return failed ? -1 : 0;
}
