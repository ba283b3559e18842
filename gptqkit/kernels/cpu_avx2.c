#define _POSIX_C_SOURCE 200809L /* clock_gettime, pthread_atfork under -std=c99 */
/* 4-bit GPTQ matmul for few rows (decode) on x86-64 with AVX2, FMA and F16C.

   Entry points: gptq_q4_matmul (fp32 activations, the `avx2` kernel), gptq_matmul_q8 (activations rounded to
   int8, `avx2-q8`, which also reads 2-, 3- and 8-bit codes), gptq_gemm_bf16 (their bf16 prefill
   GEMM on AVX512-BF16 CPUs, compiled under a target attribute), gptq_dequant (W for the prefill GEMM elsewhere,
   any bits), bf16_matmul (a dense bf16 GEMV for an lm_head kept in bf16, gptqkit.dense), decode_attention
   (gptqkit.attention), and rope_decode_attention, rms_norm and silu_mul (gptqkit.fused).

   Reads the checkpoint tensors as they are: no int4 copy of the weight is made, so a loaded model holds its
   4-bit codes once. Built by cpu_avx2.py with the C compiler at hand and called through ctypes.

   Threads: the decode entry points (the two matmuls, the bf16 GEMV, the attention) run on this file's own pool (see
   "The pool" below), which lets a worker read the next layers' codes while the caller is back in Python; the
   prefill dequantization runs on OpenMP, which resolves to the libgomp.so.1 that torch has already loaded, so it
   shares torch's threads like the GEMM it feeds.

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
#include <time.h>

#include <pthread.h>
#include <sched.h>

#ifdef _OPENMP
#include <omp.h>
#endif

/* Thread t of a team of T and its share [lo, hi) of n items split evenly. */
typedef struct {
    int t, T, lo, hi;
} share_t;

static inline share_t share_in(int n, int t, int T) {
    const share_t s = {t, T, (int)((long)n * t / T), (int)((long)n * (t + 1) / T)};
    return s;
}

/* The same inside an OpenMP parallel region (OpenMP may give fewer threads than asked, so shares follow the team
   actually running). */
static inline share_t share_of(int n) {
#ifdef _OPENMP
    return share_in(n, omp_get_thread_num(), omp_get_num_threads());
#else
    return share_in(n, 0, 1);
#endif
}

/* ---------------------------------------------------------------------------------------------------------------
   The pool: T - 1 worker threads, the caller being thread 0. pool_run(fn, arg, T, pf, own) runs fn(arg, t, T) on
   every thread and returns when all are done, like an OpenMP parallel region; then worker 1 goes on to read the
   regions in pf (the next calls' codes, see q4_matmul) into the cache while the caller is back in Python, one 16 KB
   step at a time, looking for the next job between steps. A caller done before the workers reads `own` the same
   way while it waits. OpenMP cannot do that: a parallel region ends when all its threads do.

   On the 1.1B shape (2 threads, avx2-q8 g128) decode spends 8-10 ms per token outside its 88 matmul calls
   (Python, small torch ops, attention, lm_head), in gaps of 30-150 us. Measured in fresh processes, 4 alternating
   rounds of 32 tokens: with read-ahead the matmuls took 15.5-17.3 ms per token, without it 18.6-22.0 ms on this
   pool and 15.6-17.7 ms on OpenMP's static halves; whole tokens 31.0-39.5, 34.3-42.0 and 33.5-42.8 ms. The reads
   slow the Python in between by about 2 ms per token (see READ_AHEAD_BYTES), and this VM's speed varied by 30%
   between processes, so the benchmark's end-to-end numbers did not separate the two designs.

   A worker spins for SPIN_NS after its last job or read, then sleeps on a condition variable: decode's gaps keep it
   awake, while prefill (the dequantization and torch's GEMMs, all on OpenMP threads) finds it asleep. A call
   made while another thread holds the pool (a second Python thread) runs alone on its caller. A forked child
   starts without workers and makes its own. */

#define MAX_THREADS 64
#define SPIN_NS 2000000L
#define PF_MAX 48      /* regions in one read-ahead list */
#define PF_STEP 16384  /* bytes read between looks for a job */
/* A waiting worker lets other threads have its core every YIELD_STEPS read steps (256 KB) and every 1024 pauses
   (~20 us): a torch op that Python runs between two C calls in a parallel region (even a 128-element cos) otherwise
   waited for the core until the worker's SPIN_NS ran out, 2 ms, on a machine with as many cores as threads. */
#define YIELD_STEPS 16

typedef void (*task_fn)(void *arg, int t, int T);

typedef struct {
    int count;
    const char *p[PF_MAX];
    size_t n[PF_MAX];
} prefetch_t;

static struct {
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int started;           /* workers running: threads 1 .. started */
    unsigned long seq;     /* job number (atomic) */
    unsigned long start_seq[MAX_THREADS];
    task_fn fn;
    void *arg;
    int T;
    prefetch_t pf;         /* worker 1's reading after this job (count 0: it keeps its current list) */
    int pending;           /* workers yet to finish the job (atomic) */
    int sleeping;          /* workers waiting on cv (atomic) */
    int busy;              /* a caller holds the pool (atomic) */
    int reading;           /* worker 1 is in a read step (atomic) */
    unsigned long forget;  /* pool_forget calls (atomic): worker 1 drops its read-ahead list when this moves */
    int atfork;            /* the fork handler is registered */
} pool = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};

static long now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long)ts.tv_sec * 1000000000L + ts.tv_nsec;
}

/* Reads the next PF_STEP bytes of list pf from region *pi, offset *po, and moves them on. Loads, not prefetch hints:
   _MM_HINT_T0 / T1 left the matmuls 1.2-2.3 ms per token slower. */
static void read_step(const prefetch_t *pf, int *pi, size_t *po) {
    const char *b = pf->p[*pi] + *po;
    const size_t len = pf->n[*pi] - *po < PF_STEP ? pf->n[*pi] - *po : PF_STEP;
    __m256i acc = _mm256_setzero_si256();
    for (size_t i = 0; i < len; i += 64) acc = _mm256_or_si256(acc, _mm256_loadu_si256((const __m256i *)(b + i)));
    __asm__ volatile("" : : "x"(acc)); /* keep the loads */
    *po += len;
    if (*po >= pf->n[*pi]) ++*pi, *po = 0;
}

static void *worker_main(void *arg) {
    const int me = (int)(long)arg;
    unsigned long last = pool.start_seq[me]; /* the job being posted when it was started is its first */
    prefetch_t pf = {0};
    int pi = 0;
    size_t po = 0;
    unsigned long forgot = __atomic_load_n(&pool.forget, __ATOMIC_SEQ_CST);
    for (;;) {
        unsigned long s;
        long idle_since = now_ns();
        int spins = 0, steps = 0;
        while ((s = __atomic_load_n(&pool.seq, __ATOMIC_ACQUIRE)) == last) {
            if (pi < pf.count) {
                /* read one step, unless pool_forget was called: the memory may be freed once it returns */
                __atomic_store_n(&pool.reading, 1, __ATOMIC_SEQ_CST);
                if (__atomic_load_n(&pool.forget, __ATOMIC_SEQ_CST) != forgot) {
                    forgot = __atomic_load_n(&pool.forget, __ATOMIC_SEQ_CST);
                    pi = pf.count;
                    __atomic_store_n(&pool.reading, 0, __ATOMIC_SEQ_CST);
                    continue;
                }
                read_step(&pf, &pi, &po);
                __atomic_store_n(&pool.reading, 0, __ATOMIC_RELEASE);
                idle_since = now_ns();
                if (++steps % YIELD_STEPS == 0) sched_yield();
                continue;
            }
            _mm_pause();
            if (++spins % 1024 == 0) sched_yield(); /* see YIELD_STEPS */
            if (spins % 256 == 0 && now_ns() - idle_since > SPIN_NS) {
                pthread_mutex_lock(&pool.mu);
                __atomic_add_fetch(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
                while (__atomic_load_n(&pool.seq, __ATOMIC_SEQ_CST) == last) pthread_cond_wait(&pool.cv, &pool.mu);
                __atomic_sub_fetch(&pool.sleeping, 1, __ATOMIC_SEQ_CST);
                pthread_mutex_unlock(&pool.mu);
                idle_since = now_ns();
            }
        }
        last = s;
        if (me < pool.T) pool.fn(pool.arg, me, pool.T);
        if (me == 1 && pool.pf.count) {
            pf = pool.pf;
            pi = 0;
            po = 0;
            forgot = __atomic_load_n(&pool.forget, __ATOMIC_SEQ_CST);
        }
        __atomic_sub_fetch(&pool.pending, 1, __ATOMIC_ACQ_REL);
    }
    return NULL;
}

static void pool_after_fork(void) { /* in the child: the workers are gone, the locks may be held */
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pool.started = 0;
    pool.pending = 0;
    pool.sleeping = 0;
    pool.busy = 0;
    pool.reading = 0;
}

/* Drop worker 1's read-ahead list and return once it is not reading: called before memory that a list may point
   into is freed (cpu_avx2.py calls it when a plan that others read ahead is collected). */
void pool_forget(void) {
    __atomic_add_fetch(&pool.forget, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&pool.reading, __ATOMIC_SEQ_CST)) _mm_pause();
}

/* Returns the number of threads that ran fn. own: what the caller reads while it waits for the workers to finish
   (may be NULL). */
static int pool_run(task_fn fn, void *arg, int T, const prefetch_t *pf, const prefetch_t *own) {
    if (T > MAX_THREADS) T = MAX_THREADS;
    if (T <= 1 || __atomic_exchange_n(&pool.busy, 1, __ATOMIC_ACQUIRE)) {
        fn(arg, 0, 1);
        return 1;
    }
    if (!pool.atfork) pool.atfork = pthread_atfork(NULL, NULL, pool_after_fork) == 0;
    while (pool.started < T - 1) {
        pthread_t th;
        pthread_attr_t at;
        pthread_attr_init(&at);
        pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
        pool.start_seq[pool.started + 1] = pool.seq;
        const int rc = pthread_create(&th, &at, worker_main, (void *)(long)(pool.started + 1));
        pthread_attr_destroy(&at);
        if (rc != 0) break;
        pool.started++;
    }
    if (T > pool.started + 1) T = pool.started + 1;
    pool.fn = fn;
    pool.arg = arg;
    pool.T = T;
    pool.pf.count = 0;
    if (pf) pool.pf = *pf;
    __atomic_store_n(&pool.pending, pool.started, __ATOMIC_RELAXED);
    __atomic_add_fetch(&pool.seq, 1, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleeping, __ATOMIC_SEQ_CST) > 0) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    fn(arg, 0, T);
    int pi = 0;
    size_t po = 0;
    while (__atomic_load_n(&pool.pending, __ATOMIC_ACQUIRE) > 0) {
        if (own && pi < own->count)
            read_step(own, &pi, &po);
        else
            _mm_pause();
    }
    __atomic_store_n(&pool.busy, 0, __ATOMIC_RELEASE);
    return T;
}

/* The codes are read once per token, so their prefetches are non-temporal (NTA): the cache keeps more of what is
   read again every token, which the 500 MB of a 1.1B token's codes otherwise push out: the KV cache, the
   interpreter's objects between the calls and the read-ahead of the next call (the pool). On the 1.1B shape +head
   (VNNI build, plain read at 78-81 GB/s) a token took 3.0-5.6% less time over three A/B runs in one process (the
   matmuls 0.30 ms less, the rest of the token 0.36 ms less), the AVX2 build 1.3% less and a 3-bit SmolLM2-135M 2%
   less; the scales' and zeros' prefetches as well made no difference. */
#define STREAM _MM_HINT_NTA

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
            if ((n & 15) == 0) _mm_prefetch((const char *)(row + N + n), STREAM);
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

/* End of a run of group g: y[m, n] += scale[g, n] * (acc[m, n] - zero[g, n] * sx[m]), sx[m] the sum of x over the
   run's rows (sg, zg: group g's rows of scales and zeros). */
static inline void flush_run(float *y, const float *acc, const float *sx, const uint16_t *sg, const uint8_t *zg,
                             int M, int N) {
    for (int n = 0; n < N; n += 8) {
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sg + n)));
        const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + n))));
        for (int m = 0; m < M; m++) {
            float *o = y + (size_t)m * N + n;
            const __m256 d = _mm256_fnmadd_ps(z, _mm256_set1_ps(sx[m]), _mm256_loadu_ps(acc + (size_t)m * N + n));
            _mm256_storeu_ps(o, _mm256_fmadd_ps(sc, d, _mm256_loadu_ps(o)));
        }
    }
}

#define QB_CHUNKS 4 /* the avx2-q8 kernel's activation block: 4 chunks of 8 inputs (see the int8 section) */

/* Activations prepared once per call and read by every thread: the fp32 path uses x and xs; the int8 path
   (q8 != 0) uses xl, xh, sb and d (see the int8 section below). */
typedef struct {
    int q8;                /* 0: fp32 activations; else the int8 path over codes of q8 bits (2, 3, 4 or 8) */
    const float *x, *xs;   /* [M, K]: x, and x[m, k] * 16^-(k % 8) */
    int32_t *xl, *xh, *sb; /* [M, C]: activation bytes of each chunk's even / odd rows; sum of its x8 */
    float *d;              /* [M, B]: int8 block scales */
    int B;
    int8_t *x8;            /* [M, K]: x8 in input order, for 2, 3 and 8 bits (NULL for 4) */
} acts_t;

static void run_q8(const acts_t *a, int M, int C, const int32_t *qw, int N, int a0, int a1, float *acc, float *sx,
                   float *y, int fresh, const uint16_t *sg, const uint8_t *zg);
/* qweight row that holds 8-row chunk c of codes of `bits` (a whole row: c even for 2 bits, c % 4 == 0 for 3) */
static inline size_t word_row(int c, int bits) { return (size_t)c * (size_t)bits / 4; }
static void q8_prepare(const acts_t *a, int M, int K, int b0, int b1);

/* Decode's matmuls split the rows (K) into SEGMENTS segments of whole units (one 8-row chunk, or for the int8 path
   one activation block of QB_CHUNKS chunks, which its thread rounds): thread 0 takes segments from the front, the
   other threads from the back, one at a time, so a worker that read the back segments ahead in the caller's Python
   gap (see the pool) finishes those fast and takes more. Each segment flushes into its own partial output, and the
   partials are added up a fixed binary tree over the segments (pairs, then pairs of pairs): whichever thread
   finishes the second child of a node adds the two, so the adds are spread over the threads and mostly read their
   own cache, and the result does not depend on which thread took which segment (the same bits from run to run).
   A run of one group cut by a segment edge is fine: the flush
   y += scale * (acc - zero * sum x) is linear, so each piece flushes with the sum of x over its own rows.

   Rows, not columns: each segment is one contiguous block of qweight rows per layer, which the hardware prefetcher
   follows at full DRAM speed (a split by columns gives short row segments and a jump per row: measured about half
   the bandwidth on a 1.1B model). Eight segments: on the 1.1B shape 8, 12 and 16 gave the same speed within noise;
   fewer leave a thread idle longer at the end, more add partials to sum. */
#define SEGMENTS 8
/* Bytes read ahead after each call. The reads evict what the caller's Python keeps in the shared L3 (a pointer chase
   over 4 MB went from 20 to 150 ns per hop with the other core streaming), so more is not always better: on the
   2-core AVX2 EPYC of the first measurements, in one process, interleaved against 8 MB, 2-3 MB gave the matmuls
   16.9 ms per token against 16.2 and the rest of the token 10.7-11.1 ms against 12.3. On a Zen 5 EPYC with a 32 MiB
   L3, 6 MB took 1.2-3% less time per token than 3 MB on the 1.1B shape (three A/B runs in one process each; 10 and
   16 MB no better than 6, none at all 2% worse than 3). Most calls ask for less anyway: at most 60% of each of the
   next two calls is planned (plan_read_ahead), so the budget binds before gate/up and lm_head. */
#define READ_AHEAD_BYTES (6L << 20)
/* What the caller reads of the next call's front segments, the ones it takes first, while it waits for the workers
   to finish theirs at the end of a call: that wait was ~1 ms per 1.1B token (88 calls) on the Zen 5 EPYC, and
   reading up to 1 MB there (its L2) took 1.5-2.2% off each token (three A/B runs in one process, 12-16 rounds;
   512 KB the same). */
#define CALLER_READ_BYTES (1L << 20)

static void segments(int U, int threads, int *S, int *seg) {
    const int want = threads > 1 ? (U < SEGMENTS ? U : SEGMENTS) : 1;
    *seg = want > 0 ? (U + want - 1) / want : 1;
    *S = U > 0 ? (U + *seg - 1) / *seg : 0;
}

/* A call that comes next in decode (gptqkit's chain of a model's calls, cpu_avx2.py): its layers, K, and which path
   (q8: 0 for fp32, else the int8 path's code bits; it sets the unit and where a chunk's codes start), so the
   read-ahead can take the segments the workers will take first. */
typedef struct {
    int nl, K, q8;
    const int32_t *const *qws;
    const int *Ns;
} next_t;

/* Append to pf the segments of call g that the workers take first, the back ones (front = 0: from the last down,
   60% of the call), or those the caller takes first (front = 1: from the first up, the other 40%), segment by
   segment, each with its layers' rows in call order, up to `budget` bytes; returns the bytes added. */
static long plan_read_ahead(const next_t *g, int threads, int front, prefetch_t *pf, long budget) {
    const int C = g->K / 8, unit = g->q8 ? QB_CHUNKS : 1, U = (C + unit - 1) / unit;
    int S, seg;
    segments(U, threads, &S, &seg);
    const int split = S * 4 / 10, step = front ? 1 : -1;
    long used = 0;
    for (int sg = front ? 0 : S - 1; (front ? sg < split : sg >= split) && used < budget; sg += step) {
        const int c0 = sg * seg * unit, c1 = (sg + 1) * seg * unit < C ? (sg + 1) * seg * unit : C;
        for (int l = 0; l < g->nl && used < budget && pf->count < PF_MAX; l++) {
            const int bits = g->q8 ? g->q8 : 4;
            pf->p[pf->count] = (const char *)(g->qws[l] + word_row(c0, bits) * g->Ns[l]);
            pf->n[pf->count] = (word_row(c1, bits) - word_row(c0, bits)) * g->Ns[l] * sizeof(int32_t);
            used += (long)pf->n[pf->count++];
        }
    }
    return used;
}

typedef struct {
    const acts_t *a;
    int M, K, C, nl, R, unit, U, S, seg;
    const int32_t *const *qws;
    const int *Ns;
    const uint16_t *const *scs;
    const uint8_t *const *zs;
    const int32_t *runs, *rgroup;
    float *y, *part;    /* segment 0's partial is y, segment s > 0's is part + (s - 1) * MS */
    size_t MS;          /* M * (Ns[0] + ... + Ns[nl-1]) */
    int Nmax, width;    /* width: the tree's leaves, S rounded up to a power of two */
    unsigned long ends; /* atomic: segments not yet taken, [front, back) as front | back << 32 */
    int arrived[SEGMENTS * 2]; /* atomic: children done, per tree node (heap numbering, the root is 1) */
    int failed;         /* atomic */
} mm_job;

static inline float *partial(const mm_job *j, int sg) { return sg == 0 ? j->y : j->part + (size_t)(sg - 1) * j->MS; }

/* Segment sg is done: go up the tree from its leaf. Node [a, a + 2w) adds its right child's partial (segments
   a + w ..) into its left child's (a ..) once both are done; the thread that completes the second child does it. A
   node whose right child lies past S is its left child unchanged. The root's sum ends in segment 0's partial, y. */
static void mm_combine(mm_job *j, int sg) {
    for (int a = sg, w = 1; w < j->width; w *= 2) {
        const int pa = a & ~(2 * w - 1), right = pa + w;
        a = pa;
        if (right >= j->S) continue;
        if (__atomic_add_fetch(&j->arrived[j->width / (2 * w) + pa / (2 * w)], 1, __ATOMIC_ACQ_REL) == 1) return;
        float *l = partial(j, pa);
        const float *r = partial(j, right);
        for (size_t i = 0; i < j->MS; i++) l[i] += r[i];
    }
}

static int mm_take(mm_job *j, int back) {
    unsigned long e = __atomic_load_n(&j->ends, __ATOMIC_RELAXED);
    for (;;) {
        const unsigned f = (unsigned)(e & 0xffffffffu), b = (unsigned)(e >> 32);
        if (f >= b) return -1;
        const unsigned nf = back ? f : f + 1, nb = back ? b - 1 : b;
        if (__atomic_compare_exchange_n(&j->ends, &e, (unsigned long)nf | (unsigned long)nb << 32, 1,
                                        __ATOMIC_RELAXED, __ATOMIC_RELAXED))
            return (int)(back ? nb : f);
    }
}

static void mm_task(void *arg, int t, int T) {
    (void)T;
    mm_job *j = (mm_job *)arg;
    const acts_t *a = j->a;
    const int M = j->M, K = j->K, C = j->C;
    const size_t MNmax = (size_t)M * j->Nmax;
    float *acc = (float *)malloc(sizeof(float) * (MNmax + (size_t)M));
    if (!acc) {
        __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        return;
    }
    float *sx = acc + MNmax;
    int sg;
    while ((sg = mm_take(j, t > 0)) >= 0) {
        const int u0 = sg * j->seg, u1 = (sg + 1) * j->seg < j->U ? (sg + 1) * j->seg : j->U;
        const int c0 = u0 * j->unit, c1 = u1 * j->unit < C ? u1 * j->unit : C;
        if (a->q8) q8_prepare(a, M, K, u0, u1);
        float *yl = partial(j, sg);
        if (!a->q8) memset(yl, 0, sizeof(float) * j->MS); /* the int8 path's first run of a layer writes it */
        for (int l = 0; l < j->nl; yl += (size_t)M * j->Ns[l], l++) {
            const int32_t *qw = j->qws[l];
            const int N = j->Ns[l];
            const size_t MN = (size_t)M * N;
            int r = 0;
            while (r < j->R && j->runs[r + 1] <= c0) r++;
            for (const int r0 = r; r < j->R && j->runs[r] < c1; r++) {
                const int a0 = j->runs[r] > c0 ? j->runs[r] : c0, a1 = j->runs[r + 1] < c1 ? j->runs[r + 1] : c1;
                const int g = j->rgroup[r];
                if (a->q8) { /* flushes its own pieces */
                    run_q8(a, M, C, qw, N, a0, a1, acc, sx, yl, r == r0, j->scs[l] + (size_t)g * N,
                           j->zs[l] + (size_t)g * N);
                    continue;
                }
                memset(acc, 0, sizeof(float) * MN);
                for (int m = 0; m < M; m++) {
                    float s = 0.0f;
                    for (int k = 8 * a0; k < 8 * a1; k++) s += a->x[(size_t)m * K + k];
                    sx[m] = s;
                }
                if (M == 1)
                    run_accumulate_1(a->xs, qw, N, a0, a1, acc);
                else
                    run_accumulate(a->xs, M, K, qw, N, a0, a1, acc);
                flush_run(yl, acc, sx, j->scs[l] + (size_t)g * N, j->zs[l] + (size_t)g * N, M, N);
            }
        }
        mm_combine(j, sg);
    }
    free(acc);
}

/* Layers 0 .. nl-1 that read the same x (q/k/v, gate/up: decode makes one call for them all): layer l has
   qws[l], Ns[l] columns, scales scs[l] and zeros zs[l], and the same rows' groups (runs, rgroup); its output
   [M, Ns[l]] is written at y + M * (Ns[0] + ... + Ns[l-1]), overwriting. next[0 .. nnext-1]: the calls that come
   after this one (may be none), read ahead by a worker after this call. Returns 0, or -1 when scratch memory cannot
   be had. */
static int q4_matmul(const acts_t *a, int M, int K, int nl, const int32_t *const *qws, const int *Ns,
                     const uint16_t *const *scs, const uint8_t *const *zs, const int32_t *runs,
                     const int32_t *rgroup, int R, float *y, int threads, const next_t *next, int nnext) {
    const int C = K / 8, unit = a->q8 ? QB_CHUNKS : 1, U = (C + unit - 1) / unit;
    if (threads < 1) threads = 1;
    mm_job j;
    memset(&j, 0, sizeof j);
    j.a = a, j.M = M, j.K = K, j.C = C, j.nl = nl, j.R = R, j.unit = unit, j.U = U;
    j.qws = qws, j.Ns = Ns, j.scs = scs, j.zs = zs, j.runs = runs, j.rgroup = rgroup, j.y = y;
    segments(U, threads, &j.S, &j.seg);
    j.ends = (unsigned long)j.S << 32;
    j.width = 1;
    while (j.width < j.S) j.width *= 2;
    for (int l = 0; l < nl; l++) {
        j.MS += (size_t)M * Ns[l];
        j.Nmax = Ns[l] > j.Nmax ? Ns[l] : j.Nmax;
    }
    if (j.S > 1 && !(j.part = (float *)malloc(sizeof(float) * (size_t)(j.S - 1) * j.MS))) return -1;
    if (j.S == 0) memset(y, 0, sizeof(float) * j.MS);
    prefetch_t pf = {0};
    long budget = READ_AHEAD_BYTES;
    for (int i = 0; i < nnext && budget > 0; i++) budget -= plan_read_ahead(&next[i], threads, 0, &pf, budget);
    prefetch_t own = {0};
    if (nnext > 0) plan_read_ahead(&next[0], threads, 1, &own, CALLER_READ_BYTES);
    pool_run(mm_task, &j, threads, &pf, &own);
    free(j.part);
    return j.failed ? -1 : 0;
}

/* x [M, K] fp32; layers and y as q4_matmul. Returns 0, or -1 when scratch memory cannot be had. */
int gptq_q4_matmul(const float *x, int M, int K, int nl, const int32_t *const *qws, const int *Ns,
                   const uint16_t *const *scs, const uint8_t *const *zs, const int32_t *runs, const int32_t *rgroup,
                   int R, float *y, int threads, const next_t *next, int nnext) {
    float *xs = (float *)malloc(sizeof(float) * ((size_t)M * K + 1));
    if (!xs) return -1;
    for (size_t i = 0; i < (size_t)M * K; i++) xs[i] = x[i] * INV16[(i % (size_t)K) & 7];
    const acts_t a = {0, x, xs, NULL, NULL, NULL, NULL, 0, NULL};
    const int rc = q4_matmul(&a, M, K, nl, qws, Ns, scs, zs, runs, rgroup, R, y, threads, next, nnext);
    free(xs);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
   The same product with activations rounded to int8 (the `avx2-q8` kernel), as llama.cpp's Q4 x Q8 dot products:
   integer multiply-adds need about a third of the instructions of the fp32 path above, which is what keeps a 2-core
   AVX2 CPU below the DRAM speed on decode.

   x is split into blocks of QB = 32 consecutive inputs (4 chunks of 8 rows, counted from k = 0); block b gets
   d[b] = max|x| / 127 and x8[k] = round(x[k] / d[b]) in -127 .. 127. Runs are cut at block edges, so each piece
   lies in one block and one group:

       y[n] += scale[g, n] * (sum_b d[b] * sum_k x8[k] q[k, n]  -  zero[g, n] * sum_b d[b] * sum_k x8[k])

   The inner sums are exact in integers. A qweight word holds bytes (q1 q0) (q3 q2) (q5 q4) (q7 q6); w & 0x0F0F0F0F
   gives the bytes q0 q2 q4 q6 and (w >> 4) & 0x0F0F0F0F gives q1 q3 q5 q7, each an unsigned byte that
   _mm256_maddubs_epi16 multiplies with the signed activation bytes in the same order and adds in pairs. A pair is
   at most 2 * 15 * 127 = 3810, and 4 chunks * 2 halves of pairs sum to at most 30480, inside int16: a piece of up to
   4 chunks is summed in int16, widened to int32 once, and scaled by d[b] in fp32. */


/* Where a piece's sums go. A run of one group is cut into pieces at block edges; its row's acc [N] carries
   acc + d[b] * (integer sums) from piece to piece, the first piece starting from zero, and the last one adds the run
   into y, y += scale * (acc - zero * sx), instead of storing acc. These are the steps and roundings of a zeroed
   acc, accumulating pieces and flush_run, without the round trips of acc through memory that a separate zeroing
   and flush pass take (see piece_q8 for what it gained). */
typedef struct {
    int first, last; /* the run's first / last piece */
    int fresh;       /* y holds nothing yet (the segment's first run of this layer): y = 0 + ... */
    float *y;        /* the row's output [N] */
    const uint16_t *sg;
    const uint8_t *zg; /* the group's scales and zeros [N] */
    float sx;          /* the sum of x over the run's rows (sum of d[b] * sum x8) */
} piece_end;

/* Columns n .. n+7 of a piece: f its integer sums as floats, facc the row's acc at n. */
static inline void piece_end8(float *facc, __m256 f, float d, const piece_end *e, int n) {
    f = _mm256_fmadd_ps(_mm256_set1_ps(d), f, e->first ? _mm256_setzero_ps() : _mm256_loadu_ps(facc));
    if (!e->last) {
        _mm256_storeu_ps(facc, f);
        return;
    }
    const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(e->sg + n)));
    const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(e->zg + n))));
    const __m256 y = e->fresh ? _mm256_setzero_ps() : _mm256_loadu_ps(e->y + n);
    _mm256_storeu_ps(e->y + n, _mm256_fmadd_ps(sc, _mm256_fnmadd_ps(z, _mm256_set1_ps(e->sx), f), y));
}

/* Each step of a piece also asks for the lines Q8_PREFETCH bytes further along each of its rows (both lines of the
   VNNI build's 128 bytes; one line every other step of the AVX2 build's 32): the hardware prefetchers alone left
   one core's four streams short of what DRAM gives. With the VNNI build on the 1.1B shape decode took 6% less time
   per token while that Zen 5 EPYC's plain 2-thread read ran at 47 GB/s, and 10-13% less while it ran at 77-80 (the
   level moves with the other tenants); 1.5-3 KiB ahead did the same, 1 and 4 KiB less well, one line per row
   instead of two gained nothing, and prefetching into L2 only (T1) gained less.

   Within the last Q8_PREFETCH bytes of a row the address is the same place in the row nc further on: the next
   piece of the run, or of the next run, starts there (a segment's pieces go down the rows), so it starts with its
   first lines on the way instead of waiting for them. That took another 5.3% off each token (VNNI build, 14 rounds
   alternating in one process, every round faster), and the AVX2 build's prefetch with it 12% (10 rounds, the same
   machine).

   Since the prefetches are non-temporal (STREAM), 1.5 KiB ahead is better than 2: 3.4% less time per 1.1B +head
   token while the plain read ran at 52 GB/s and 7.9% less at 81 (18 rounds alternating in one process, 11 and 7 at
   those levels); 1 KiB 2.9% and 4.1%, 3 KiB the same as 2. */
#define Q8_PREFETCH 1536
/* The run's flush reads its group's scales and zeros rows (N fp16, N bytes), which no stream brought in: perf put
   11-12% of piece_q8's samples on that load. The run's first piece now asks for them (into L2, as it reads its own
   codes), and the last piece for those 1 KB / 512 B ahead of where it flushes. A/B in one process on the 1.1B shape,
   10-20 rounds each: VNNI build 0.997, 0.984, 0.985 and 0.991 of the time per token (at 46-50 GB/s, the last run
   half at 74), AVX2 build 0.975 (49 GB/s, every round at or below 1). Nothing else changes: the results are the
   same bits. */

/* That prefetch, at column n of a piece: pf_flush on the run's first piece (if it is not also its last) */
static inline void prefetch_flush(const piece_end *e, int n, int pf_flush) {
    if (pf_flush) {
        _mm_prefetch((const char *)(e->sg + n), _MM_HINT_T1);
        _mm_prefetch((const char *)(e->zg + n), _MM_HINT_T1);
    } else if (e->last) {
        _mm_prefetch((const char *)(e->sg + n) + 1024, _MM_HINT_T0);
        _mm_prefetch((const char *)(e->zg + n) + 512, _MM_HINT_T0);
    }
}

static inline size_t q8_ahead(int n, int N, int nc) {
    return Q8_PREFETCH + (4 * (size_t)n + Q8_PREFETCH >= 4 * (size_t)N ? 4 * (size_t)(nc - 1) * N : 0);
}

/* Piece of nc <= 4 chunks from c0 for one row, its sums going where e says (facc: the row's acc). xl/xh: per chunk
   the activation bytes of its even / odd rows as one int32. N is a multiple of 8 (4-bit qzeros pack 8 columns). */
#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
/* Built a second time with -mavx512vnni (cpu_avx2.py, where the CPU has it): vpdpbusd multiplies the unsigned code
   bytes by the signed activation bytes and adds groups of 4 into int32 lanes in one instruction, replacing
   maddubs + add (and the int16 bound), over 16 columns per instruction. Same integer sums, same fp32 steps after
   them: the result is bit-identical to the AVX2 build.

   32 columns per step, two independent sums: 128 contiguous bytes of each of the piece's 4 rows per step instead of
   64 (a standalone loop over 2048-column rows went from 40 to 45 GB/s, against 52 for a plain read, on a 2-thread
   Zen 5 EPYC). With piece_end's flush this made decode 4-6% faster per token on the 1.1B shape (two builds
   alternated in one process, 25 rounds of 16 tokens). Tried there and not kept: one pass over a whole group's 16
   rows with the sums in registers (16 streams per thread, 20% slower), and a row at a time over column tiles
   (each DRAM page opened once per tile, 30-70% slower on the 5632-column layers).

   Each set of 16 columns keeps two sums, of the low and of the high nibbles' products, added once the piece's rows
   are in: a sum's chain of dependent vpdpbusd is then nc long instead of 2 * nc. At a plain read of 79-83 GB/s
   decode took 2.5% less time per token (1.1B shape, +head; two A/B runs in one process, 14 and 16 rounds), while
   four sums per set (chains of 2) took 2% more than two. Tried on the same machine and not kept (standalone C loop
   of the 1.1B shape's 88 decode calls):
   - a piece's rows read one after the other, the sums of the rows so far kept in an int32 row in L1/L2: one stream
     per thread in address order (which a plain read of 4 interleaved rows reaches only 64 of 81 GB/s of), 3-6%
     faster while that read ran at 47-49 GB/s but 12-15% slower at 73-80, where the extra loads and stores per
     line cost more than the order gained (the gate/up call alone 5.5-5.9 ms per token against 4.5);
   - 128 or 256 columns a step (longer bursts of each row): no faster, 256 slower. */

/* Columns n .. n+15 of a piece, as piece_end8. */
static inline void piece_end16(float *facc, __m512i s, __m512 dv, __m512 sxv, const piece_end *e, int n) {
    const __m512 f = _mm512_fmadd_ps(dv, _mm512_cvtepi32_ps(s), e->first ? _mm512_setzero_ps() : _mm512_loadu_ps(facc));
    if (!e->last) {
        _mm512_storeu_ps(facc, f);
        return;
    }
    const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(e->sg + n)));
    const __m512 z = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(e->zg + n))));
    const __m512 y = e->fresh ? _mm512_setzero_ps() : _mm512_loadu_ps(e->y + n);
    _mm512_storeu_ps(e->y + n, _mm512_fmadd_ps(sc, _mm512_fnmadd_ps(z, sxv, f), y));
}

static inline void piece_q8(const int32_t *qw, int N, int c0, int nc, const int32_t *xl, const int32_t *xh,
                            float d, float *facc, const piece_end *e) {
    const __m512i mask = _mm512_set1_epi32(0x0F0F0F0F);
    __m512i bl[QB_CHUNKS], bh[QB_CHUNKS];
    for (int i = 0; i < nc; i++) {
        bl[i] = _mm512_set1_epi32(xl[c0 + i]);
        bh[i] = _mm512_set1_epi32(xh[c0 + i]);
    }
    const __m512 dv = _mm512_set1_ps(d), sxv = _mm512_set1_ps(e->sx);
    const int pf_flush = e->first && !e->last;
    int n = 0;
    for (; n + 32 <= N; n += 32) {
        __m512i s = _mm512_setzero_si512(), s2 = _mm512_setzero_si512();
        __m512i t = _mm512_setzero_si512(), t2 = _mm512_setzero_si512();
        const size_t ahead = q8_ahead(n, N, nc);
        prefetch_flush(e, n, pf_flush);
        for (int i = 0; i < nc; i++) {
            const int32_t *r = qw + (size_t)(c0 + i) * N + n;
            _mm_prefetch((const char *)r + ahead, STREAM);
            _mm_prefetch((const char *)r + ahead + 64, STREAM);
            const __m512i w = _mm512_loadu_si512((const void *)r), w2 = _mm512_loadu_si512((const void *)(r + 16));
            s = _mm512_dpbusd_epi32(s, _mm512_and_si512(w, mask), bl[i]);
            t = _mm512_dpbusd_epi32(t, _mm512_and_si512(_mm512_srli_epi32(w, 4), mask), bh[i]);
            s2 = _mm512_dpbusd_epi32(s2, _mm512_and_si512(w2, mask), bl[i]);
            t2 = _mm512_dpbusd_epi32(t2, _mm512_and_si512(_mm512_srli_epi32(w2, 4), mask), bh[i]);
        }
        piece_end16(facc + n, _mm512_add_epi32(s, t), dv, sxv, e, n);
        piece_end16(facc + n + 16, _mm512_add_epi32(s2, t2), dv, sxv, e, n + 16);
    }
    for (; n + 16 <= N; n += 16) {
        __m512i s = _mm512_setzero_si512();
        for (int i = 0; i < nc; i++) {
            const __m512i w = _mm512_loadu_si512((const void *)(qw + (size_t)(c0 + i) * N + n));
            s = _mm512_dpbusd_epi32(s, _mm512_and_si512(w, mask), bl[i]);
            s = _mm512_dpbusd_epi32(s, _mm512_and_si512(_mm512_srli_epi32(w, 4), mask), bh[i]);
        }
        piece_end16(facc + n, s, dv, sxv, e, n);
    }
    if (n < N) { /* the last 8 columns */
        const __m256i m8 = _mm512_castsi512_si256(mask);
        __m256i s = _mm256_setzero_si256();
        for (int i = 0; i < nc; i++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(qw + (size_t)(c0 + i) * N + n));
            s = _mm256_dpbusd_epi32(s, _mm256_and_si256(w, m8), _mm512_castsi512_si256(bl[i]));
            s = _mm256_dpbusd_epi32(s, _mm256_and_si256(_mm256_srli_epi32(w, 4), m8), _mm512_castsi512_si256(bh[i]));
        }
        piece_end8(facc + n, _mm256_cvtepi32_ps(s), d, e, n);
    }
}
#else
static inline void piece_q8(const int32_t *qw, int N, int c0, int nc, const int32_t *xl, const int32_t *xh,
                            float d, float *facc, const piece_end *e) {
    const __m256i mask = _mm256_set1_epi32(0x0F0F0F0F), ones = _mm256_set1_epi16(1);
    __m256i bl[QB_CHUNKS], bh[QB_CHUNKS];
    for (int i = 0; i < nc; i++) {
        bl[i] = _mm256_set1_epi32(xl[c0 + i]);
        bh[i] = _mm256_set1_epi32(xh[c0 + i]);
    }
    const int pf_flush = e->first && !e->last;
    for (int n = 0; n < N; n += 8) {
        __m256i s = _mm256_setzero_si256();
        const size_t ahead = q8_ahead(n, N, nc);
        if ((n & 31) == 0) prefetch_flush(e, n, pf_flush); /* a line of scales a step of 32 columns */
        for (int i = 0; i < nc; i++) {
            const int32_t *row = qw + (size_t)(c0 + i) * N;
            if ((n & 15) == 0) _mm_prefetch((const char *)(row + n) + ahead, STREAM);
            const __m256i w = _mm256_loadu_si256((const __m256i *)(row + n));
            const __m256i lo = _mm256_and_si256(w, mask), hi = _mm256_and_si256(_mm256_srli_epi32(w, 4), mask);
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo, bl[i]));
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi, bh[i]));
        }
        piece_end8(facc + n, _mm256_cvtepi32_ps(_mm256_madd_epi16(s, ones)), d, e, n);
    }
}
#endif

/* ---------------------------------------------------------------------------------------------------------------
   2-, 3- and 8-bit codes on the int8 path. GPTQ packs
   qweight along K, 32 / bits rows per int32 word for 2 and 8 bits and 32 rows in 3 words for 3 bits, so a chunk of 8
   rows is word_row(c + 1, bits) - word_row(c, bits) rows of qweight and a piece's rows are one contiguous block, as
   for 4 bits. The same pieces, runs, flush and segments as piece_q8; only the integer sums differ. Each is vpdpbusd
   of the code bytes (unsigned) with activation bytes (signed): a word shifted right by s and masked to the low
   `bits` bits of each byte leaves in byte b the code whose bits start at 8b + s, and the activation dword of that
   step holds those codes' x8 in the same bytes and 0 in the others (whatever the mask left there is multiplied by 0).

     8 bits: byte j of word r is row 4r + j: the word is multiplied as it is, by x8[4r .. 4r+3].
     2 bits: row 16r + j sits at bits 2j; shift 2t leaves rows 16r + 4b + t in bytes b = 0..3.
     3 bits: 32 rows in words w0, w1, w2; row i of word i's ten (rows 0-9, 11-20, 22-31) sits at bit 3m + i. A shift
             by i + t leaves in byte b the row m with 3m = 8b + t (THREE_BIT below: t = 0..7 take all ten). Rows 10
             and 21 straddle two words: (w0 >> 30 | w1 << 2) and (w1 >> 31 | w2 << 1) hold them in byte 0.

   A piece sums at most 32 rows, |sum| <= 32 * 255 * 127, inside int32; the results are exact, as for 4 bits. The
   AVX2 build multiplies with maddubs instead, which adds pairs into int16 (see sums_b there), and gives the same
   integers. */

/* For shift i + t of 3-bit word i: row m (of the word's ten) in each byte, -1 for none */
static const signed char THREE_BIT[8][4] = {{0, -1, -1, 8}, {-1, 3, -1, -1}, {-1, -1, 6, -1}, {1, -1, -1, 9},
                                            {-1, 4, -1, -1}, {-1, -1, 7, -1}, {2, -1, -1, -1}, {-1, 5, -1, -1}};

static inline int32_t act_bytes(int8_t b0, int8_t b1, int8_t b2, int8_t b3) {
    return (int32_t)((uint32_t)(uint8_t)b0 | (uint32_t)(uint8_t)b1 << 8 | (uint32_t)(uint8_t)b2 << 16 |
                     (uint32_t)(uint8_t)b3 << 24);
}

/* The activation dwords of a piece's steps, in the order sums_b takes them; returns how many. xb: the piece's x8. */
static int piece_acts(int bits, const int8_t *xb, int nr, int32_t *act) {
    int n = 0;
    if (bits == 8) {
        for (int r = 0; r < nr; r++) act[n++] = act_bytes(xb[4 * r], xb[4 * r + 1], xb[4 * r + 2], xb[4 * r + 3]);
    } else if (bits == 2) {
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < 4; t++)
                act[n++] = act_bytes(xb[16 * r + t], xb[16 * r + 4 + t], xb[16 * r + 8 + t], xb[16 * r + 12 + t]);
    } else {
        static const int first[3] = {0, 11, 22};
        for (int i = 0; i < 3; i++)
            for (int t = 0; t < 8; t++) {
                int8_t b[4];
                for (int k = 0; k < 4; k++) b[k] = THREE_BIT[t][k] < 0 ? 0 : xb[first[i] + THREE_BIT[t][k]];
                act[n++] = act_bytes(b[0], b[1], b[2], b[3]);
            }
        act[n++] = act_bytes(xb[10], 0, 0, 0);
        act[n++] = act_bytes(xb[21], 0, 0, 0);
    }
    return n;
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#define B_ACT(i) _mm512_set1_epi32(act[i])
/* 16 words, or those in `lanes` and zeros (a full mask is a plain load: measured faster than the masked one) */
static inline __attribute__((always_inline)) __m512i b_load(__mmask16 lanes, const int32_t *p) {
    return lanes == 0xFFFF ? _mm512_loadu_si512((const void *)p) : _mm512_maskz_loadu_epi32(lanes, p);
}
/* Integer sums (2 or 3 bits) of H (1 or 2) sets of 16 columns from n (the lanes in `lanes` of each) over a
   piece's nr qweight rows from w (its first row at column 0) into s[0 .. H-1], asking for the lines `ahead` bytes
   on in each row. Two sets read 128 contiguous bytes of each row per step, as piece_q8 does. */
static inline __attribute__((always_inline)) void sums_b(const int bits, const int H, const int32_t *w, int N, int nr,
                                                         int n, const int32_t *act, __mmask16 lanes, size_t ahead,
                                                         __m512i *s) {
    for (int h = 0; h < H; h++) s[h] = _mm512_setzero_si512();
    if (bits == 2) {
        const __m512i m = _mm512_set1_epi32(0x03030303);
        for (int r = 0; r < nr; r++) {
            const int32_t *p = w + (size_t)r * N + n;
            for (int h = 0; h < H; h++) {
                _mm_prefetch((const char *)(p + 16 * h) + ahead, STREAM);
                const __m512i v = b_load(lanes, p + 16 * h);
                s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(v, m), B_ACT(4 * r));
                s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(_mm512_srli_epi32(v, 2), m), B_ACT(4 * r + 1));
                s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(_mm512_srli_epi32(v, 4), m), B_ACT(4 * r + 2));
                s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(_mm512_srli_epi32(v, 6), m), B_ACT(4 * r + 3));
            }
        }
    } else {
        const __m512i m = _mm512_set1_epi32(0x07070707);
        for (int h = 0; h < H; h++) {
            const int32_t *p = w + n + 16 * h;
            for (int i = 0; i < 3; i++) _mm_prefetch((const char *)(p + (size_t)i * N) + ahead, STREAM);
            const __m512i w0 = b_load(lanes, p), w1 = b_load(lanes, p + N),
                          w2 = b_load(lanes, p + 2 * (size_t)N);
            /* shifts 0..7 of w0, 1..8 of w1, 2..9 of w2 (compile-time counts: the loop unrolls) */
            for (int t = 0; t < 8; t++) {
                s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(_mm512_srli_epi32(w0, t), m), B_ACT(t));
                s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(_mm512_srli_epi32(w1, t + 1), m), B_ACT(8 + t));
                s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(_mm512_srli_epi32(w2, t + 2), m), B_ACT(16 + t));
            }
            const __m512i r10 = _mm512_or_si512(_mm512_srli_epi32(w0, 30), _mm512_slli_epi32(w1, 2));
            const __m512i r21 = _mm512_or_si512(_mm512_srli_epi32(w1, 31), _mm512_slli_epi32(w2, 1));
            s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(r10, m), B_ACT(24));
            s[h] = _mm512_dpbusd_epi32(s[h], _mm512_and_si512(r21, m), B_ACT(25));
        }
    }
}
#undef B_ACT

/* A piece of codes of `bits` (2, 3 or 8), its nr qweight rows from w, act its activation dwords (piece_q8b).
   8 bits take 8 columns a step (256-bit vpdpbusd), as the AVX2 build's loop: 24 layers of 2048 x 5632 read from DRAM
   at 62-64 GB/s against 50-53 with 16 or 32 columns a step (2 threads, in one process); 2 and 3 bits, whose sums
   take more instructions per byte, were faster with 32. */
static inline __attribute__((always_inline)) void piece_bits(const int bits, const int32_t *w, int N, int nr,
                                                              const int32_t *act, float d, float *facc,
                                                              const piece_end *e) {
    const int pf_flush = e->first && !e->last;
    if (bits == 8) {
        for (int n = 0; n < N; n += 8) {
            if ((n & 31) == 0) prefetch_flush(e, n, pf_flush);
            __m256i t = _mm256_setzero_si256();
            for (int r = 0; r < nr; r++) {
                const int32_t *p = w + (size_t)r * N + n;
                if ((n & 15) == 0) _mm_prefetch((const char *)p + q8_ahead(n, N, nr), STREAM);
                t = _mm256_dpbusd_epi32(t, _mm256_loadu_si256((const __m256i *)p), _mm256_set1_epi32(act[r]));
            }
            piece_end8(facc + n, _mm256_cvtepi32_ps(t), d, e, n);
        }
        return;
    }
    const __m512 dv = _mm512_set1_ps(d), sxv = _mm512_set1_ps(e->sx);
    __m512i s[2];
    int n = 0;
    for (; n + 32 <= N; n += 32) {
        prefetch_flush(e, n, pf_flush);
        sums_b(bits, 2, w, N, nr, n, act, 0xFFFF, q8_ahead(n, N, nr), s);
        piece_end16(facc + n, s[0], dv, sxv, e, n);
        piece_end16(facc + n + 16, s[1], dv, sxv, e, n + 16);
    }
    for (; n + 16 <= N; n += 16) {
        if ((n & 31) == 0) prefetch_flush(e, n, pf_flush);
        sums_b(bits, 1, w, N, nr, n, act, 0xFFFF, q8_ahead(n, N, nr), s);
        piece_end16(facc + n, s[0], dv, sxv, e, n);
    }
    if (n < N) { /* the last 8 columns */
        sums_b(bits, 1, w, N, nr, n, act, 0x00FF, 0, s);
        piece_end8(facc + n, _mm256_cvtepi32_ps(_mm512_castsi512_si256(s[0])), d, e, n);
    }
}

#else
#define B_ACT(i) _mm256_set1_epi32(act[i])
/* Integer sums of columns n .. n+7 over a piece's nr qweight rows from w, as the VNNI build's. maddubs multiplies
   the code bytes by the activation bytes and adds pairs into int16 lanes, which add up a piece in int16: 2- and 3-bit
   codes (<= 7) put at most 32 * 7 * 127 = 28448 in a lane. 8-bit codes would overflow a pair (2 * 255 * 127), so
   their low and high nibbles are summed apart (a piece is 16 rows for 8 bits: 16 * 15 * 127 per lane) and the high
   sums weighted by 16 when widened to int32. */
static inline __attribute__((always_inline)) __m256i sums_b(const int bits, const int32_t *w, int N, int nr, int n,
                                                            const int32_t *act, size_t ahead) {
    const __m256i ones = _mm256_set1_epi16(1);
    __m256i s = _mm256_setzero_si256();
    if (bits == 8) {
        const __m256i m = _mm256_set1_epi32(0x0F0F0F0F);
        __m256i hi = _mm256_setzero_si256();
        for (int r = 0; r < nr; r++) {
            const int32_t *p = w + (size_t)r * N + n;
            if ((n & 15) == 0) _mm_prefetch((const char *)p + ahead, STREAM);
            const __m256i v = _mm256_loadu_si256((const __m256i *)p);
            s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(v, m), B_ACT(r)));
            hi = _mm256_add_epi16(hi, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(v, 4), m), B_ACT(r)));
        }
        return _mm256_add_epi32(_mm256_madd_epi16(s, ones), _mm256_madd_epi16(hi, _mm256_set1_epi16(16)));
    }
    if (bits == 2) {
        const __m256i m = _mm256_set1_epi32(0x03030303);
        for (int r = 0; r < nr; r++) {
            const int32_t *p = w + (size_t)r * N + n;
            if ((n & 15) == 0) _mm_prefetch((const char *)p + ahead, STREAM);
            const __m256i v = _mm256_loadu_si256((const __m256i *)p);
            for (int t = 0; t < 4; t++)
                s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(v, 2 * t), m),
                                                             B_ACT(4 * r + t)));
        }
        return _mm256_madd_epi16(s, ones);
    }
    const __m256i m = _mm256_set1_epi32(0x07070707);
    const int32_t *p = w + n;
    if ((n & 15) == 0)
        for (int i = 0; i < 3; i++) _mm_prefetch((const char *)(p + (size_t)i * N) + ahead, STREAM);
    const __m256i w0 = _mm256_loadu_si256((const __m256i *)p), w1 = _mm256_loadu_si256((const __m256i *)(p + N)),
                  w2 = _mm256_loadu_si256((const __m256i *)(p + 2 * (size_t)N));
    for (int t = 0; t < 8; t++) {
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(w0, t), m), B_ACT(t)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(w1, t + 1), m), B_ACT(8 + t)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi32(w2, t + 2), m),
                                                     B_ACT(16 + t)));
    }
    const __m256i r10 = _mm256_or_si256(_mm256_srli_epi32(w0, 30), _mm256_slli_epi32(w1, 2));
    const __m256i r21 = _mm256_or_si256(_mm256_srli_epi32(w1, 31), _mm256_slli_epi32(w2, 1));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(r10, m), B_ACT(24)));
    s = _mm256_add_epi16(s, _mm256_maddubs_epi16(_mm256_and_si256(r21, m), B_ACT(25)));
    return _mm256_madd_epi16(s, ones);
}
#undef B_ACT

static inline __attribute__((always_inline)) void piece_bits(const int bits, const int32_t *w, int N, int nr,
                                                              const int32_t *act, float d, float *facc,
                                                              const piece_end *e) {
    const int pf_flush = e->first && !e->last;
    for (int n = 0; n < N; n += 8) {
        if ((n & 31) == 0) prefetch_flush(e, n, pf_flush);
        piece_end8(facc + n, _mm256_cvtepi32_ps(sums_b(bits, w, N, nr, n, act, q8_ahead(n, N, nr))), d, e, n);
    }
}
#endif

/* piece_q8 for codes of `bits` (2, 3 or 8): chunks c0 .. c0+nc-1 (whole qweight rows), x8 the row's activations.
   Each width gets its own inlined piece_bits (constant bits: the loops over shifts unroll). */
static void piece_q8b(int bits, const int32_t *qw, int N, int c0, int nc, const int8_t *x8, float d, float *facc,
                      const piece_end *e) {
    const size_t r0 = word_row(c0, bits);
    const int nr = (int)(word_row(c0 + nc, bits) - r0);
    int32_t act[26];
    piece_acts(bits, x8 + 8 * (size_t)c0, nr, act);
    const int32_t *w = qw + r0 * N;
    if (bits == 8)
        piece_bits(8, w, N, nr, act, d, facc, e);
    else if (bits == 2)
        piece_bits(2, w, N, nr, act, d, facc, e);
    else
        piece_bits(3, w, N, nr, act, d, facc, e);
}


/* A run's chunks a0 .. a1-1 of group g (sg, zg its scales and zeros) cut at block edges, added into y [M, N]
   (written instead where fresh):
   acc [M, N] holds the sums scaled by d[b] between pieces, sx [M] the same for the sum of x. */
static void run_q8(const acts_t *a, int M, int C, const int32_t *qw, int N, int a0, int a1, float *acc, float *sx,
                   float *y, int fresh, const uint16_t *sg, const uint8_t *zg) {
    /* pieces of at most 4 qweight rows, the streams one core's prefetchers keep up with: a block's 4 chunks for 2,
       3 (one 3-row piece) and 4 bits, half a block for 8 bits (4 rows of 4 inputs each instead of 8 rows: with 32
       columns a step, 24 layers of 2048 x 5632 read from DRAM took 0.32-0.33 ms each instead of 0.35-0.36 on 2
       cores) */
    const int span = a->q8 == 8 ? QB_CHUNKS / 2 : QB_CHUNKS;
    for (int p0 = a0; p0 < a1;) {
        const int edge = (p0 / span + 1) * span, p1 = edge < a1 ? edge : a1;
        const int b = p0 / QB_CHUNKS;
        for (int m = 0; m < M; m++) {
            const float db = a->d[(size_t)m * a->B + b];
            int s = 0;
            for (int c = p0; c < p1; c++) s += a->sb[(size_t)m * C + c];
            sx[m] = (p0 == a0 ? 0.0f : sx[m]) + db * (float)s; /* the whole run's by its last piece, which needs it */
            const int32_t *l = a->xl + (size_t)m * C, *h = a->xh + (size_t)m * C;
            const piece_end e = {p0 == a0, p1 == a1, fresh, y + (size_t)m * N, sg, zg, sx[m]};
            if (a->q8 != 4)
                piece_q8b(a->q8, qw, N, p0, p1 - p0, a->x8 + (size_t)m * 8 * C, db, acc + (size_t)m * N, &e);
            /* the whole-block call gets a constant count, so the compiler unrolls it */
            else if (p1 - p0 == QB_CHUNKS)
                piece_q8(qw, N, p0, QB_CHUNKS, l, h, db, acc + (size_t)m * N, &e);
            else
                piece_q8(qw, N, p0, p1 - p0, l, h, db, acc + (size_t)m * N, &e);
        }
        p0 = p1;
    }
}

/* Rows 0 .. M-1, activation blocks b0 .. b1-1: d[b] = max|x| / 127 and x8 = round(x / d[b]) half away from zero,
   stored as the packed bytes xl, xh and the sums sb of each chunk. A whole block of 32 inputs is rounded with
   AVX2 in the same fp32 steps as the scalar loop that takes a last, shorter block, so both give the same bytes. */
static void q8_prepare(const acts_t *a, int M, int K, int b0, int b1) {
    const int C = K / 8, B = a->B;
    const __m256 sign = _mm256_set1_ps(-0.0f), half = _mm256_set1_ps(0.5f);
    /* within each 128-bit lane: the even bytes, then the odd ones */
    const __m256i evens_odds = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                                0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
    for (int m = 0; m < M; m++) {
        const float *xm = a->x + (size_t)m * K;
        int32_t *xl = a->xl + (size_t)m * C, *xh = a->xh + (size_t)m * C, *sb = a->sb + (size_t)m * C;
        for (int b = b0; b < b1; b++) {
            const int k0 = b * 8 * QB_CHUNKS, k1 = k0 + 8 * QB_CHUNKS < K ? k0 + 8 * QB_CHUNKS : K;
            const int c = k0 / 8;
            if (k1 - k0 == 8 * QB_CHUNKS) {
                const __m256 v0 = _mm256_loadu_ps(xm + k0), v1 = _mm256_loadu_ps(xm + k0 + 8),
                             v2 = _mm256_loadu_ps(xm + k0 + 16), v3 = _mm256_loadu_ps(xm + k0 + 24);
                const __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
                __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
                m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
                m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
                const float amax = _mm_cvtss_f32(m4);
                a->d[(size_t)m * B + b] = amax / 127.0f;
                const __m256 inv = _mm256_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
#define Q8_ROUND(v) _mm256_cvttps_epi32(_mm256_add_ps(_mm256_mul_ps(v, inv), \
                        _mm256_or_ps(_mm256_and_ps(_mm256_mul_ps(v, inv), sign), half)))
                const __m256i r0 = Q8_ROUND(v0), r1 = Q8_ROUND(v1), r2 = Q8_ROUND(v2), r3 = Q8_ROUND(v3);
#undef Q8_ROUND
                /* int8 per lane: chunks 0-3's inputs 0-3 (low lane) and inputs 4-7 (high lane) */
                const __m256i q = _mm256_shuffle_epi8(
                    _mm256_packs_epi16(_mm256_packs_epi32(r0, r1), _mm256_packs_epi32(r2, r3)), evens_odds);
                if (a->x8) /* the dwords of q are rows 0-3, 8-11, 16-19, 24-27 | 4-7, 12-15, 20-23, 28-31 */
                    _mm256_storeu_si256((__m256i *)(a->x8 + (size_t)m * K + k0),
                                        _mm256_permutevar8x32_epi32(_mm256_packs_epi16(
                                            _mm256_packs_epi32(r0, r1), _mm256_packs_epi32(r2, r3)),
                                            _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
                const __m128i lo = _mm256_castsi256_si128(q), hi = _mm256_extracti128_si256(q, 1);
                _mm_storeu_si128((__m128i *)(xl + c), _mm_unpacklo_epi16(lo, hi)); /* q0 q2 q4 q6 per chunk */
                _mm_storeu_si128((__m128i *)(xh + c), _mm_unpackhi_epi16(lo, hi)); /* q1 q3 q5 q7 */
                const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(r0, r1), _mm256_hadd_epi32(r2, r3));
                _mm_storeu_si128((__m128i *)(sb + c),
                                 _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1)));
                continue;
            }
            float amax = 0.0f;
            for (int k = k0; k < k1; k++) {
                const float v = xm[k] < 0.0f ? -xm[k] : xm[k];
                amax = v > amax ? v : amax;
            }
            const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
            a->d[(size_t)m * B + b] = amax / 127.0f;
            for (int cc = k0 / 8; cc < k1 / 8; cc++) {
                int8_t q[8];
                int sum = 0;
                for (int j = 0; j < 8; j++) {
                    const float v = xm[8 * cc + j] * inv; /* |v| <= 127; rounded half away from zero */
                    q[j] = (int8_t)(int)(v + (v < 0.0f ? -0.5f : 0.5f));
                    sum += q[j];
                }
                if (a->x8) memcpy(a->x8 + (size_t)m * K + 8 * (size_t)cc, q, 8);
                const uint32_t l = (uint8_t)q[0] | (uint32_t)(uint8_t)q[2] << 8 | (uint32_t)(uint8_t)q[4] << 16 |
                                   (uint32_t)(uint8_t)q[6] << 24;
                const uint32_t h = (uint8_t)q[1] | (uint32_t)(uint8_t)q[3] << 8 | (uint32_t)(uint8_t)q[5] << 16 |
                                   (uint32_t)(uint8_t)q[7] << 24;
                xl[cc] = (int32_t)l;
                xh[cc] = (int32_t)h;
                sb[cc] = sum;
            }
        }
    }
}

/* Codes of `bits` (2, 3, 4 or 8; qws[l] GPTQ qweight [K * bits / 32, N]), other arguments as gptq_q4_matmul, runs
   in 8-row chunks as there (whole qweight rows: even chunks for 2 bits, multiples of 4 for 3). Returns 0, -1 when
   scratch memory cannot be had, -2 for other bits. The activations are rounded
   by the threads that read them (q8_prepare, called from q4_matmul's parallel region). */
int gptq_matmul_q8(int bits, const float *x, int M, int K, int nl, const int32_t *const *qws, const int *Ns,
                   const uint16_t *const *scs, const uint8_t *const *zs, const int32_t *runs, const int32_t *rgroup,
                   int R, float *y, int threads, const next_t *next, int nnext) {
    if (bits != 2 && bits != 3 && bits != 4 && bits != 8) return -2;
    const int C = K / 8, B = (C + QB_CHUNKS - 1) / QB_CHUNKS;
    /* per row m: xl, xh [C] packed activation bytes; sb [C] sum of x8 over each chunk; d [B] block scales; then
       x8 [K] for bits other than 4 */
    const size_t head = sizeof(int32_t) * ((size_t)M * 3 * C + 1) + sizeof(float) * (size_t)M * B;
    int32_t *xl = (int32_t *)malloc(head + (bits != 4 ? (size_t)M * K + 32 : 0));
    if (!xl) return -1;
    int32_t *xh = xl + (size_t)M * C, *sb = xh + (size_t)M * C;
    const acts_t a = {bits, x, NULL, xl, xh, sb, (float *)(sb + (size_t)M * C), B,
                      bits != 4 ? (int8_t *)xl + head : NULL};
    const int rc = q4_matmul(&a, M, K, nl, qws, Ns, scs, zs, runs, rgroup, R, y, threads, next, nnext);
    free(xl);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
   Dequantization for prefill: many rows make the product compute-bound, so the dense GEMM (oneDNN, bf16 where the
   CPU has it) wins, and what is left to do fast is W itself. This writes rows of W with one pass over qw, in place
   of the eight torch ops per chunk the `cpu` kernel's generic path needs.

   out [8 * (c1 - c0), n1 - n0] row-major, W for the 8-row chunks c0 .. c1-1 of qw (in qw's row order: the caller
   gathers x the same way for act-order) and columns n0 .. n1-1 (n0 a multiple of 8), W[k, n] = scale[g, n] *
   (q[k, n] - zero[g, n]) in fp32, which is the reference kernel's formula and rounding. bf16 != 0 stores it rounded
   to bf16 (nearest even), else as fp32. Threads take contiguous blocks of chunks. */

static inline void store_row(void *out, size_t at, __m256 v, int bf16) {
    if (!bf16) {
        _mm256_storeu_ps((float *)out + at, v);
        return;
    }
    /* round to nearest even on the bits: u + 0x7FFF + (bit 16 of u), then the top 16 bits (finite values) */
    __m256i u = _mm256_castps_si256(v);
    u = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), _mm256_and_si256(_mm256_srli_epi32(u, 16),
                                                                                          _mm256_set1_epi32(1))));
    u = _mm256_srli_epi32(u, 16);
    /* packus works per 128-bit lane: [a0..a3 a0..a3 | a4..a7 a4..a7]; 0xD8 brings a0..a7 into the low half */
    const __m256i p = _mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xD8);
    _mm_storeu_si128((__m128i *)((uint16_t *)out + at), _mm256_castsi256_si128(p));
}

/* Codes of `bits` (2, 3, 4 or 8): qweight is, in each column, a stream of K * bits bits in little-endian words, so
   row k's code starts at bit p = k * bits, in word p / 32 (for 3 bits it may end in the next word). */
int gptq_dequant(int bits, const int32_t *qw, int N, const uint16_t *scales, const uint8_t *zeros, const int32_t *runs,
                 const int32_t *rgroup, int R, int c0, int c1, int n0, int n1, void *out, int bf16, int threads) {
    if (threads < 1) threads = 1;
    const size_t ld = (size_t)(n1 - n0);
#pragma omp parallel num_threads(threads)
    {
        const share_t sh = share_of(c1 - c0);
        const int t0 = c0 + sh.lo, t1 = c0 + sh.hi;
        int r = 0;
        while (r < R && runs[r + 1] <= t0) r++;
        for (int c = t0; c < t1; c++) {
            while (runs[r + 1] <= c) r++;
            const uint16_t *sg = scales + (size_t)rgroup[r] * N;
            const uint8_t *zg = zeros + (size_t)rgroup[r] * N;
            const size_t row0 = (size_t)8 * (c - c0) * ld;
            const __m256i mask = _mm256_set1_epi32((1 << bits) - 1);
            for (int n = n0; n < n1; n += 8) {
                const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(sg + n)));
                const __m256 z = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(zg + n))));
                for (int j = 0; j < 8; j++) {
                    const size_t p = (size_t)(8 * c + j) * bits;
                    const int sh = (int)(p % 32);
                    const int32_t *w = qw + p / 32 * N + n;
                    __m256i v = _mm256_srl_epi32(_mm256_loadu_si256((const __m256i *)w), _mm_cvtsi32_si128(sh));
                    if (sh + bits > 32) /* the code's high bits begin the next word */
                        v = _mm256_or_si256(v, _mm256_sll_epi32(_mm256_loadu_si256((const __m256i *)(w + N)),
                                                                _mm_cvtsi32_si128(32 - sh)));
                    const __m256 q = _mm256_cvtepi32_ps(_mm256_and_si256(v, mask));
                    store_row(out, row0 + (size_t)j * ld + (n - n0), _mm256_mul_ps(_mm256_sub_ps(q, z), sc), bf16);
                }
            }
        }
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------------------------------
   y[M, N] = x[M, K] @ w[N, K]^T with w in bf16 (an lm_head kept in bf16 by gptqkit.dense) and x, y in fp32.

   On AVX2 there are no bf16 instructions and torch's bf16 GEMV converts more than it reads (measured ~9 GB/s on the
   1.1B shape's 131 MB head). A bf16 is the top half of an fp32, so 16 weights in one 256-bit load become two fp32
   vectors with one shift (even elements: w << 16) and one mask (odd elements: w & 0xFFFF0000); x is split once into
   its even and odd elements per 16 to match. Threads take contiguous blocks of rows of w. */

static inline float hsum(__m256 v) {
    const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    const __m128 t = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(t, _mm_shuffle_ps(t, t, 1)));
}

typedef struct {
    const float *x, *xe, *xo; /* xe, xo [M, K16 / 2]: per 16 inputs, the 8 even and the 8 odd ones */
    int M, K, K16, N;
    const uint16_t *w;
    float *y;
} bf_job;

static void bf_task(void *arg, int t, int T);

int bf16_matmul(const float *x, int M, int K, const uint16_t *w, int N, float *y, int threads) {
    const int K16 = K / 16 * 16;
    float *xe = (float *)malloc(sizeof(float) * (size_t)M * K16 + 4);
    if (!xe) return -1;
    float *xo = xe + (size_t)M * K16 / 2;
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K16; k += 2) {
            xe[(size_t)m * K16 / 2 + k / 2] = x[(size_t)m * K + k];
            xo[(size_t)m * K16 / 2 + k / 2] = x[(size_t)m * K + k + 1];
        }
    bf_job j = {x, xe, xo, M, K, K16, N, w, y};
    pool_run(bf_task, &j, threads, NULL, NULL);
    free(xe);
    return 0;
}

/* Thread t's contiguous block of rows of w. */
static void bf_task(void *arg, int t, int T) {
    const bf_job *j = (const bf_job *)arg;
    const float *x = j->x, *xe = j->xe, *xo = j->xo;
    const int M = j->M, K = j->K, K16 = j->K16, N = j->N;
    const uint16_t *w = j->w;
    float *y = j->y;
    const share_t sh = share_in(N, t, T);
    const __m256i hi = _mm256_set1_epi32((int)0xFFFF0000u);
    for (int n = sh.lo; n < sh.hi; n++) {
        const uint16_t *wr = w + (size_t)n * K;
        for (int m = 0; m < M; m++) {
            const float *e = xe + (size_t)m * K16 / 2, *o = xo + (size_t)m * K16 / 2;
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(),
                   a3 = _mm256_setzero_ps();
            int k = 0;
#ifdef __AVX512F__
            /* the AVX-512 build (the VNNI one): the same even/odd split on 32 weights per load, half the
               instructions per byte; the 16 lanes fold into the 8-lane sums below */
            {
                const __m512i hi16 = _mm512_set1_epi32((int)0xFFFF0000u);
                __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps();
                for (; k + 32 <= K16; k += 32) {
                    if (m == 0) /* as the codes' (STREAM): 3.4% less time per 1.1B token with the bf16 lm_head */
                        _mm_prefetch((const char *)(wr + k) + 2048, STREAM);
                    const __m512i v = _mm512_loadu_si512((const void *)(wr + k));
                    /* word i of v holds weights k + 2i (low half) and k + 2i + 1: x's even / odd elements i */
                    const __m512 xe16 = _mm512_loadu_ps(e + k / 2), xo16 = _mm512_loadu_ps(o + k / 2);
                    b0 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(v, 16)), xe16, b0);
                    b1 = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(v, hi16)), xo16, b1);
                }
                const __m512 b = _mm512_add_ps(b0, b1);
                a0 = _mm256_add_ps(_mm512_castps512_ps256(b),
                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(b), 1)));
            }
#endif
            for (; k + 32 <= K16; k += 32) {
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wr + k));
                const __m256i v1 = _mm256_loadu_si256((const __m256i *)(wr + k + 16));
                a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(e + k / 2), a0);
                a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi)), _mm256_loadu_ps(o + k / 2), a1);
                a2 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v1, 16)), _mm256_loadu_ps(e + k / 2 + 8),
                                     a2);
                a3 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v1, hi)), _mm256_loadu_ps(o + k / 2 + 8),
                                     a3);
            }
            for (; k < K16; k += 16) {
                const __m256i v0 = _mm256_loadu_si256((const __m256i *)(wr + k));
                a0 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_slli_epi32(v0, 16)), _mm256_loadu_ps(e + k / 2), a0);
                a1 = _mm256_fmadd_ps(_mm256_castsi256_ps(_mm256_and_si256(v0, hi)), _mm256_loadu_ps(o + k / 2), a1);
            }
            float s = hsum(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
            for (; k < K; k++) {
                const uint32_t b = (uint32_t)wr[k] << 16;
                float f;
                memcpy(&f, &b, 4);
                s += f * x[(size_t)m * K + k];
            }
            y[(size_t)m * N + n] = s;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
   Attention of one new token (decode) against the cached keys and values, for gptqkit.attention: per query head h
   (key/value head g = h / (H / Hkv), grouped-query attention) out[h] = softmax(scale * K_g q_h) V_g in fp32.

   torch's SDPA takes 100-160 us per layer for this on 2 cores (32 heads, 4 key/value heads, 520 positions: its
   flash kernel is built for blocks of queries); the work is ~1 MB of reads and ~4 MFLOP, a few tens of us.

   q [H, D] and out [H, D] contiguous; key (g, l, d) at k[g * ksh + l * ksl + d], likewise v (the cache's views
   [Hkv, L, D], unit stride along D), fp32, or bf16 where kv16 (a bf16 cache: half the bytes per cached position,
   widened in registers, exact). D a multiple of 8. Threads take contiguous ranges of query heads, so the
   heads of one key/value head mostly share a thread and its cached K_g, V_g. The AVX-512 build takes those heads
   together (attend_group512): on 22 such layers held in L3 (1.1B shape, 2 threads) a call took 54-64 us against
   81-97 us a head at a time, and 220-280 against 350-430 us at 2048 positions. Its scores take two heads per pass
   over 8 positions, so each widened row of K serves both: with the softmax's vector max, one warm call (32 heads, 4
   key/value heads, 544 positions, bf16 cache) went from 48 to 35 us on one thread and 26 to 20 us on two, and a
   token of the 1.1B shape got 1.5% faster (alternating builds in one process, 12 rounds). */

/* exp(x) for x <= 0 (x - max of a softmax): x = n ln2 + r, |r| <= ln2 / 2, exp(r) by its Taylor series to r^7
   (truncation below 1e-8 relative), 2^n put into the exponent bits; x below -87 gives 2^-126 * exp(r). */
static inline __m256 exp_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x); /* ln2 in two parts (Cody-Waite) */
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.0f / 5040);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 720));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 120));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 24));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f / 6));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0.5f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.0f));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}


/* max of 8 floats */
static inline float hmax(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

/* [sum(a0), sum(a1), ..., sum(a7)] */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

/* 8 (16) cached floats from element i of a fp32 (kb = 0) or bf16 (kb = 1) cache; bf16 widens exactly (its bits
   are the high half of the fp32). kb is a constant where inlined. */
static inline __attribute__((always_inline)) __m256 kv8(const void *p, size_t i, const int kb) {
    if (kb)
        return _mm256_castsi256_ps(
            _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i))), 16));
    return _mm256_loadu_ps((const float *)p + i);
}

static inline __attribute__((always_inline)) float kv1(const void *p, size_t i, const int kb) {
    if (kb) {
        const uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, sizeof f);
        return f;
    }
    return ((const float *)p)[i];
}

/* fp32 -> bf16 rounded to nearest even, as torch's .to(torch.bfloat16) for finite values (NaN stays a NaN) */
static inline uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u >> 16) | 0x40); /* quiet NaN */
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* out[h, d0 .. d0+W) = sum_l p[l] v[l, d0 ..] * inv, W = 8 * NC (a constant where inlined, so acc stays in
   registers) */
static inline __attribute__((always_inline)) void weigh_values(const float *p, int L, const void *vg, long vsl,
                                                               int d0, int nc, float inv, float *o, const int kb) {
    __m256 acc[8];
    for (int c = 0; c < nc; c++) acc[c] = _mm256_setzero_ps();
    for (int l = 0; l < L; l++) {
        const __m256 pl = _mm256_broadcast_ss(p + l);
        const size_t vl = (size_t)l * vsl + d0;
        for (int c = 0; c < nc; c++) acc[c] = _mm256_fmadd_ps(pl, kv8(vg, vl + 8 * c, kb), acc[c]);
    }
    for (int c = 0; c < nc; c++) _mm256_storeu_ps(o + d0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
}

typedef struct {
    const float *q;
    const void *k, *v; /* float, or uint16_t bf16 bits where kv16 */
    int kv16;
    int H, D, Q, L;
    long ksh, ksl, vsh, vsl;
    float scale;
    float *out;
    int failed; /* atomic */
} at_job;

static void at_task(void *arg, int t, int T);

/* Returns 0, -1 when scratch memory cannot be had, -2 for shapes it does not take (the caller checks first). */
int decode_attention(const float *q, int H, int D, const void *k, const void *v, int kv16, int Hkv, int L,
                     long ksh, long ksl, long vsh, long vsl, float scale, float *out, int threads) {
    if (D % 8 != 0 || Hkv < 1 || H % Hkv != 0 || L < 1) return -2;
    at_job j = {q, k, v, kv16 != 0, H, D, H / Hkv, L, ksh, ksl, vsh, vsl, scale, out, 0};
    pool_run(at_task, &j, threads > H ? H : threads, NULL, NULL);
    return j.failed ? -1 : 0;
}

/* s[0 .. L) <- exp(s - max s) in place; returns their sum, added 8 lanes at a time in position order. The max is
   found 8 lanes at a time too: a scalar loop took ~7 us more per call of 32 heads over 544 positions on one thread
   (48 us in all). 16 exps per step in the AVX-512 build saved only another 0.6 us per call on two threads. */
static float softmax_unnormalised(float *s, int L) {
    int l = 0;
    __m256 m8 = _mm256_set1_ps(s[0]);
    for (; l + 8 <= L; l += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + l));
    float mx = hmax(m8);
    for (; l < L; l++) mx = s[l] > mx ? s[l] : mx;
    const __m256 mv = _mm256_set1_ps(mx);
    __m256 sv = _mm256_setzero_ps();
    for (l = 0; l + 8 <= L; l += 8) {
        const __m256 e = exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s + l), mv));
        _mm256_storeu_ps(s + l, e);
        sv = _mm256_add_ps(sv, e);
    }
    float sum = hsum(sv);
    if (l < L) { /* the last L % 8 positions through the same exp */
        float tail[8] = {0};
        memcpy(tail, s + l, sizeof(float) * (size_t)(L - l));
        _mm256_storeu_ps(tail, exp_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), mv)));
        for (; l < L; l++) sum += (s[l] = tail[l % 8]);
    }
    return sum;
}

#ifdef __AVX512F__
/* The AVX-512 build, D a multiple of 16: the query heads [h0, h1) of key/value head g together, so each row of K_g
   and V_g is loaded once for all of them (the per-head loop below reads K_g and V_g once per query head: 8 times
   on the 1.1B shape, 32 query heads over 4). s: scratch [h1 - h0, L]. */

/* kv8's 16 floats */
static inline __attribute__((always_inline)) __m512 kv16x(const void *p, size_t i, const int kb) {
    if (kb)
        return _mm512_castsi512_ps(_mm512_slli_epi32(
            _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i))), 16));
    return _mm512_loadu_ps((const float *)p + i);
}

/* o[hh, d0 .. d0 + 16 NC) = inv[hh] * sum_l p[hh, l] v[l, d0 ..] for NH heads; NH, NC constant where inlined, so
   the NH * NC accumulators stay in registers */
static inline __attribute__((always_inline)) void weigh_heads(const float *p, int L, const void *vg, long vsl,
                                                              int d0, int NH, int NC, const float *inv, float *o,
                                                              int D, const int kb) {
    __m512 acc[4][4];
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++) acc[h][c] = _mm512_setzero_ps();
    for (int l = 0; l < L; l++) {
        const size_t vl = (size_t)l * vsl + d0;
        __m512 vv[4];
        for (int c = 0; c < NC; c++) vv[c] = kv16x(vg, vl + 16 * c, kb);
        for (int h = 0; h < NH; h++) {
            const __m512 pl = _mm512_set1_ps(p[(size_t)h * L + l]);
            for (int c = 0; c < NC; c++) acc[h][c] = _mm512_fmadd_ps(pl, vv[c], acc[h][c]);
        }
    }
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++)
            _mm512_storeu_ps(o + (size_t)h * D + d0 + 16 * c, _mm512_mul_ps(acc[h][c], _mm512_set1_ps(inv[h])));
}

static inline __m256 fold512(__m512 a) {
    return _mm256_add_ps(_mm512_castps512_ps256(a), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(a), 1)));
}

/* s[hh * L + l .. + 8) = scale * q_(h + hh) . k_(l ..) for NH = 1 or 2 heads from h (a constant where inlined): per
   score the same products and sums in the same order for any NH */
static inline __attribute__((always_inline)) void score_block(const at_job *j, size_t kg, int l, int h, const int NH,
                                                              float *s, const int kb) {
    const int D = j->D;
    __m512 a[2][8];
    for (int hh = 0; hh < NH; hh++)
        for (int i = 0; i < 8; i++) a[hh][i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 16) {
        __m512 k[8];
        for (int i = 0; i < 8; i++) k[i] = kv16x(j->k, kg + (size_t)(l + i) * j->ksl + d, kb);
        for (int hh = 0; hh < NH; hh++) {
            const __m512 qd = _mm512_loadu_ps(j->q + (size_t)(h + hh) * D + d);
            for (int i = 0; i < 8; i++) a[hh][i] = _mm512_fmadd_ps(qd, k[i], a[hh][i]);
        }
    }
    for (int hh = 0; hh < NH; hh++) {
        __m256 b[8];
        for (int i = 0; i < 8; i++) b[i] = fold512(a[hh][i]);
        _mm256_storeu_ps(s + (size_t)hh * j->L + l, _mm256_mul_ps(hsum8x8(b), _mm256_set1_ps(j->scale)));
    }
}

/* The bf16 cache's even/odd widening: a 32-bit word of two bf16 holds element 2i in its low half and 2i+1 in its high
   half, so one 64-byte load of 32 elements widens exactly by a shift (the evens) and a mask (the odds), two ops for
   32 floats where kv16x takes four. A dot product over d does not care which lanes its terms sit in, so q is
   permuted the same way once per group (qp: per 32 dimensions, their 16 even then 16 odd), and the weighted values
   are accumulated per even/odd lane and interleaved once at the end. 22 layers of the 1.1B shape's attention (32
   heads over 4, D = 64, bf16 cache, 2 threads, alternating builds): 0.61-0.67 ms against 0.68-0.75 at 512
   positions, 2.04-2.24 against 2.50-2.67 at 2048; whole 1.1B tokens (+lm_head, 82 GB/s, 10-12 rounds alternating
   in one process) 0.981 of the time at 512 positions and 0.967 at 2048. */
static inline __attribute__((always_inline)) void score_block_eo(const at_job *j, const float *qp, size_t kg, int l,
                                                                 int hq, const int NH, float *s) {
    const int D = j->D;
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 a[2][8];
    for (int hh = 0; hh < NH; hh++)
        for (int i = 0; i < 8; i++) a[hh][i] = _mm512_setzero_ps();
    for (int d = 0; d < D; d += 32) {
        __m512i w[8];
        for (int i = 0; i < 8; i++)
            w[i] = _mm512_loadu_si512((const void *)((const uint16_t *)j->k + kg + (size_t)(l + i) * j->ksl + d));
        __m512 qe[2], qo[2];
        for (int hh = 0; hh < NH; hh++) {
            qe[hh] = _mm512_loadu_ps(qp + (size_t)(hq + hh) * D + d);
            qo[hh] = _mm512_loadu_ps(qp + (size_t)(hq + hh) * D + d + 16);
        }
        for (int i = 0; i < 8; i++) {
            const __m512 ke = _mm512_castsi512_ps(_mm512_slli_epi32(w[i], 16));
            for (int hh = 0; hh < NH; hh++) a[hh][i] = _mm512_fmadd_ps(qe[hh], ke, a[hh][i]);
            const __m512 ko = _mm512_castsi512_ps(_mm512_and_si512(w[i], hi));
            for (int hh = 0; hh < NH; hh++) a[hh][i] = _mm512_fmadd_ps(qo[hh], ko, a[hh][i]);
        }
    }
    for (int hh = 0; hh < NH; hh++) {
        __m256 b[8];
        for (int i = 0; i < 8; i++) b[i] = fold512(a[hh][i]);
        _mm256_storeu_ps(s + (size_t)hh * j->L + l, _mm256_mul_ps(hsum8x8(b), _mm256_set1_ps(j->scale)));
    }
}

/* weigh_heads for a bf16 cache (D % 32 == 0): NC = 2 halves of 32 dimensions from d0, or 1 where only 32 remain */
static inline __attribute__((always_inline)) void weigh_heads_eo(const float *p, int L, const uint16_t *vg, long vsl,
                                                                 int d0, int NH, int NC, const float *inv, float *o,
                                                                 int D) {
    const __m512i hi = _mm512_set1_epi32((int)0xFFFF0000u);
    __m512 acc[4][4]; /* [head][even0, odd0, even1, odd1] */
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < 2 * NC; c++) acc[h][c] = _mm512_setzero_ps();
    for (int l = 0; l < L; l++) {
        const uint16_t *vl = vg + (size_t)l * vsl + d0;
        __m512 vv[4];
        for (int c = 0; c < NC; c++) {
            const __m512i w = _mm512_loadu_si512((const void *)(vl + 32 * c));
            vv[2 * c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
            vv[2 * c + 1] = _mm512_castsi512_ps(_mm512_and_si512(w, hi));
        }
        for (int h = 0; h < NH; h++) {
            const __m512 pl = _mm512_set1_ps(p[(size_t)h * L + l]);
            for (int c = 0; c < 2 * NC; c++) acc[h][c] = _mm512_fmadd_ps(pl, vv[c], acc[h][c]);
        }
    }
    const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    for (int h = 0; h < NH; h++)
        for (int c = 0; c < NC; c++) {
            const __m512 e = _mm512_mul_ps(acc[h][2 * c], _mm512_set1_ps(inv[h]));
            const __m512 od = _mm512_mul_ps(acc[h][2 * c + 1], _mm512_set1_ps(inv[h]));
            float *oh = o + (size_t)h * D + d0 + 32 * c;
            _mm512_storeu_ps(oh, _mm512_permutex2var_ps(e, lo_idx, od));
            _mm512_storeu_ps(oh + 16, _mm512_permutex2var_ps(e, hi_idx, od));
        }
}

static inline __attribute__((always_inline)) void attend_group512(const at_job *j, int g, int h0, int h1, float *s,
                                                                  const int kb) {
    const int D = j->D, L = j->L, nh = h1 - h0;
    const size_t kg = (size_t)g * j->ksh, vo = (size_t)g * j->vsh; /* element offsets of K_g, V_g */
    const void *vg = kb ? (const void *)((const uint16_t *)j->v + vo) : (const void *)((const float *)j->v + vo);
    const long ksl = j->ksl, vsl = j->vsl;
    /* scores, 8 positions at a time: their 8 rows of K_g (2 KB at D = 64) stay in L1 across the heads, each row
       widened once per pair of heads */
    int l = 0;
    if (kb && D % 32 == 0) {
        float *qp = s + (size_t)j->Q * L; /* q of heads h0 .. h1 permuted even/odd per 32 dimensions */
        for (int h = 0; h < nh; h++)
            for (int d = 0; d < D; d += 32)
                for (int i = 0; i < 16; i++) {
                    qp[(size_t)h * D + d + i] = j->q[(size_t)(h0 + h) * D + d + 2 * i];
                    qp[(size_t)h * D + d + 16 + i] = j->q[(size_t)(h0 + h) * D + d + 2 * i + 1];
                }
        for (; l + 8 <= L; l += 8) {
            int h = 0;
            for (; h + 2 <= nh; h += 2) score_block_eo(j, qp, kg, l, h, 2, s + (size_t)h * L);
            if (h < nh) score_block_eo(j, qp, kg, l, h, 1, s + (size_t)h * L);
        }
    }
    for (; l + 8 <= L; l += 8) {
        int h = 0;
        for (; h + 2 <= nh; h += 2) score_block(j, kg, l, h0 + h, 2, s + (size_t)h * L, kb);
        if (h < nh) score_block(j, kg, l, h0 + h, 1, s + (size_t)h * L, kb);
    }
    for (; l < L; l++)
        for (int h = 0; h < nh; h++) {
            const float *qh = j->q + (size_t)(h0 + h) * D;
            __m512 a = _mm512_setzero_ps();
            for (int d = 0; d < D; d += 16)
                a = _mm512_fmadd_ps(_mm512_loadu_ps(qh + d), kv16x(j->k, kg + (size_t)l * ksl + d, kb), a);
            s[(size_t)h * L + l] = _mm512_reduce_add_ps(a) * j->scale;
        }
    float inv[4];
    /* weighted values, 4 heads and 64 dimensions per pass */
    for (int hb = 0; hb < nh; hb += 4) {
        const int NH = nh - hb < 4 ? nh - hb : 4;
        for (int h = 0; h < NH; h++) inv[h] = 1.0f / softmax_unnormalised(s + (size_t)(hb + h) * L, L);
        const float *p = s + (size_t)hb * L;
        float *o = j->out + (size_t)(h0 + hb) * D;
        if (kb && D % 32 == 0) {
            for (int d0 = 0; d0 < D; d0 += 64) {
                const int NC = (D - d0) / 32 < 2 ? 1 : 2;
                const uint16_t *vgb = (const uint16_t *)vg;
                if (NC == 2) switch (NH) {
                    case 4: weigh_heads_eo(p, L, vgb, vsl, d0, 4, 2, inv, o, D); break;
                    case 3: weigh_heads_eo(p, L, vgb, vsl, d0, 3, 2, inv, o, D); break;
                    case 2: weigh_heads_eo(p, L, vgb, vsl, d0, 2, 2, inv, o, D); break;
                    default: weigh_heads_eo(p, L, vgb, vsl, d0, 1, 2, inv, o, D);
                }
                else weigh_heads_eo(p, L, vgb, vsl, d0, NH, 1, inv, o, D);
            }
            continue;
        }
        for (int d0 = 0; d0 < D; d0 += 64) {
            const int NC = (D - d0) / 16 < 4 ? (D - d0) / 16 : 4;
            if (NC == 4) switch (NH) {
                case 4: weigh_heads(p, L, vg, vsl, d0, 4, 4, inv, o, D, kb); break;
                case 3: weigh_heads(p, L, vg, vsl, d0, 3, 4, inv, o, D, kb); break;
                case 2: weigh_heads(p, L, vg, vsl, d0, 2, 4, inv, o, D, kb); break;
                default: weigh_heads(p, L, vg, vsl, d0, 1, 4, inv, o, D, kb);
            }
            else weigh_heads(p, L, vg, vsl, d0, NH, NC, inv, o, D, kb);
        }
    }
}
#endif

/* Thread t's contiguous range of query heads, for a fp32 (kb = 0) or bf16 (kb = 1) cache. */
static inline __attribute__((always_inline)) void at_range(at_job *j, int t, int T, const int kb) {
    const float *q = j->q;
    const void *k = j->k, *v = j->v;
    const int H = j->H, D = j->D, Q = j->Q, L = j->L;
    const long ksh = j->ksh, ksl = j->ksl, vsh = j->vsh, vsl = j->vsl;
    const float scale = j->scale;
    float *out = j->out;
    const share_t sh = share_in(H, t, T);
#ifdef __AVX512F__
    if (D % 16 == 0) {
        float *s = (float *)malloc(sizeof(float) * ((size_t)L + (size_t)D) * (size_t)Q); /* scores, then qp */
        if (!s) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
        for (int h0 = sh.lo; s && h0 < sh.hi;) {
            const int g = h0 / Q, h1 = (g + 1) * Q < sh.hi ? (g + 1) * Q : sh.hi;
            attend_group512(j, g, h0, h1, s, kb);
            h0 = h1;
        }
        free(s);
        return;
    }
#endif
    float *s = (float *)malloc(sizeof(float) * (size_t)L);
    if (!s) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    for (int h = sh.lo; s && h < sh.hi; h++) {
        const float *qh = q + (size_t)h * D;
        const size_t kg = (size_t)(h / Q) * ksh, vo = (size_t)(h / Q) * vsh;
        const void *vg = kb ? (const void *)((const uint16_t *)v + vo) : (const void *)((const float *)v + vo);
        /* scores, 8 positions at a time: eight dot products reduced together */
        int l = 0;
        for (; l + 8 <= L; l += 8) {
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = _mm256_setzero_ps();
            for (int d = 0; d < D; d += 8) {
                const __m256 qd = _mm256_loadu_ps(qh + d);
                for (int i = 0; i < 8; i++)
                    a[i] = _mm256_fmadd_ps(qd, kv8(k, kg + (size_t)(l + i) * ksl + d, kb), a[i]);
            }
            _mm256_storeu_ps(s + l, _mm256_mul_ps(hsum8x8(a), _mm256_set1_ps(scale)));
        }
        for (; l < L; l++) {
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += qh[d] * kv1(k, kg + (size_t)l * ksl + d, kb);
            s[l] = dot * scale;
        }
        const float sum = softmax_unnormalised(s, L);
        /* weighted values, 64 dimensions per pass */
        int d0 = 0;
        for (; d0 + 64 <= D; d0 += 64) weigh_values(s, L, vg, vsl, d0, 8, 1.0f / sum, out + (size_t)h * D, kb);
        if (d0 < D) weigh_values(s, L, vg, vsl, d0, (D - d0) / 8, 1.0f / sum, out + (size_t)h * D, kb);
    }
    free(s);
}

static void at_task(void *arg, int t, int T) {
    at_job *j = (at_job *)arg;
    if (j->kv16)
        at_range(j, t, T, 1);
    else
        at_range(j, t, T, 0);
}

/* ---------------------------------------------------------------------------------------------------------------
   A decode step of rotary attention (gptqkit.fused.DecodeAttention): the new token's q and k rotated, k and v
   written into the cache at position T, then decode_attention over the T + 1 positions. In transformers' Llama
   attention these are ~20 torch ops per layer (views, transposes, rotate_half's slices and cat, four multiplies, two
   adds, the cache's copies) that cost ~4 ms of a 30 ms token on the 1.1B shape, where the matmuls keep torch's
   code and data out of the caches.

   q [H, D], kn, vn [Hkv, D] the projections' rows; cs, sn [D] the position's cos and sin. The rotation is
   transformers' apply_rotary_pos_emb: y = x * cos + rotate_half(x) * sin, rotate_half(x) = [-x[D/2:], x[:D/2]],
   with the same roundings (a product each, then their sum; this file is built without FMA contraction), so the
   cache holds exactly what the torch ops would write. kc, vc: the cache buffers, key (g, l, d) at
   kc[g * ksh + l * ksl + d], room for position T; fp32, or bf16 where kv16 (the new k and v rounded to nearest
   even, as the cache's copy_ rounds them). Returns what decode_attention returns. */

static void rope_row(const float *x, const float *cs, const float *sn, int D, float *y) {
    const int h = D / 2;
    for (int i = 0; i < h; i++) {
        const float a = x[i] * cs[i], b = -x[i + h] * sn[i];
        y[i] = a + b;
    }
    for (int i = h; i < D; i++) {
        const float a = x[i] * cs[i], b = x[i - h] * sn[i];
        y[i] = a + b;
    }
}

int rope_decode_attention(const float *q, const float *kn, const float *vn, const float *cs, const float *sn,
                          int H, int D, int Hkv, void *kc, void *vc, int kv16, int T, long ksh, long ksl, long vsh,
                          long vsl, float scale, float *out, int threads) {
    if (D % 8 != 0 || Hkv < 1 || H % Hkv != 0 || T < 0) return -2;
    float *qr = (float *)malloc(sizeof(float) * ((size_t)H + 1) * (size_t)D), *kr = qr + (size_t)H * D;
    if (!qr) return -1;
    for (int h = 0; h < H; h++) rope_row(q + (size_t)h * D, cs, sn, D, qr + (size_t)h * D);
    for (int g = 0; g < Hkv; g++) {
        const size_t ko = (size_t)g * ksh + (size_t)T * ksl, vo = (size_t)g * vsh + (size_t)T * vsl;
        if (!kv16) {
            rope_row(kn + (size_t)g * D, cs, sn, D, (float *)kc + ko);
            memcpy((float *)vc + vo, vn + (size_t)g * D, sizeof(float) * (size_t)D);
            continue;
        }
        rope_row(kn + (size_t)g * D, cs, sn, D, kr);
        for (int d = 0; d < D; d++) {
            ((uint16_t *)kc)[ko + d] = to_bf16(kr[d]);
            ((uint16_t *)vc)[vo + d] = to_bf16(vn[(size_t)g * D + d]);
        }
    }
    const int rc = decode_attention(qr, H, D, kc, vc, kv16, Hkv, T + 1, ksh, ksl, vsh, vsl, scale, out, threads);
    free(qr);
    return rc;
}

/* ---------------------------------------------------------------------------------------------------------------
   RMSNorm of decode rows (gptqkit.fused): y[m, :] = w * (x[m, :] * (1 / sqrt(mean(x[m, :]^2) + eps))), fp32, with
   transformers' Llama/Mistral/Qwen2 order of roundings (x * rsqrt first, then * w); only the order of the sum of
   squares differs from torch's. In torch the formula is six ops, ~30 us per call on 2 cores, 45 calls per token of
   a 22-block model; here it is one pass over a few KB on the caller's thread. */

void rms_norm(const float *x, int M, int K, const float *w, float eps, int offset, float *y) {
    for (int m = 0; m < M; m++) {
        const float *xr = x + (size_t)m * K;
        float *yr = y + (size_t)m * K;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        int k = 0;
        for (; k + 16 <= K; k += 16) {
            const __m256 u = _mm256_loadu_ps(xr + k), v = _mm256_loadu_ps(xr + k + 8);
            a0 = _mm256_fmadd_ps(u, u, a0);
            a1 = _mm256_fmadd_ps(v, v, a1);
        }
        float ss = hsum(_mm256_add_ps(a0, a1));
        for (; k < K; k++) ss += xr[k] * xr[k];
        const float r = 1.0f / _mm_cvtss_f32(_mm_sqrt_ss(_mm_set_ss(ss / (float)K + eps))); /* no libm */
        const __m256 rv = _mm256_set1_ps(r);
        if (offset) { /* Gemma: (x * r) * (1 + w), 1 + w rounded first as torch's (1.0 + w.float()) */
            for (k = 0; k + 8 <= K; k += 8)
                _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + k), rv),
                                                       _mm256_add_ps(_mm256_set1_ps(1.0f), _mm256_loadu_ps(w + k))));
            for (; k < K; k++) yr[k] = (xr[k] * r) * (1.0f + w[k]);
            continue;
        }
        for (k = 0; k + 8 <= K; k += 8)
            _mm256_storeu_ps(yr + k, _mm256_mul_ps(_mm256_loadu_ps(w + k), _mm256_mul_ps(_mm256_loadu_ps(xr + k), rv)));
        for (; k < K; k++) yr[k] = w[k] * (xr[k] * r);
    }
}

/* ---------------------------------------------------------------------------------------------------------------
   The gated MLP's act(g) * u for decode rows (gptqkit.fused), act_mul: SiLU (below) or Gemma's tanh GELU
   (gelu_tanh_mul8) over n floats, on the caller's thread; two torch ops otherwise, each several times its warm cost
   between two matmuls. SiLU: y = g / (1 + exp(-g)) * u, exp(-g) exp_nonpositive's series on min(-g, 88), valid up
   to 88 (2^127); below g = -88, where silu(g) < 1e-36, the result is 0 (NaN stays NaN). */

/* silu(x) * u for 8 floats */
static inline __m256 silu_mul8(__m256 x, __m256 u) {
    const __m256 e = exp_nonpositive(_mm256_min_ps(_mm256_xor_ps(x, _mm256_set1_ps(-0.0f)), _mm256_set1_ps(88.0f)));
    const __m256 s = _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    return _mm256_mul_ps(_mm256_and_ps(s, _mm256_cmp_ps(x, _mm256_set1_ps(-88.0f), _CMP_NLT_UQ)), u);
}

/* gelu_tanh(x) * u for 8 floats: 0.5 x (1 + tanh(z)), z = sqrt(2 / pi) (x + 0.044715 x^3) (torch's
   approximate="tanh", Gemma's gelu_pytorch_tanh). With e = exp(-2 |z|) <= 1 from exp_nonpositive, 1 + tanh(z) is
   2 / (1 + e) for z >= 0 and 2 e / (1 + e) for z < 0: no cancellation where tanh(z) nears -1 (x below about -3,
   where 1 + tanh in float32 loses every digit), no overflow (e goes to 0), NaN stays NaN. */
static inline __m256 gelu_tanh_mul8(__m256 x, __m256 u) {
    const __m256 x3 = _mm256_mul_ps(_mm256_mul_ps(x, x), x);
    const __m256 z = _mm256_mul_ps(_mm256_set1_ps(0.7978845608f), _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), x3, x));
    const __m256 e = exp_nonpositive(_mm256_mul_ps(_mm256_set1_ps(-2.0f), _mm256_andnot_ps(_mm256_set1_ps(-0.0f), z)));
    const __m256 one = _mm256_set1_ps(1.0f);
    /* z < -43.5: e is exp's floor, 1 + tanh(z) < 1e-37; 0 there (as for x = -1e30, whose x e would not be) */
    const __m256 num = _mm256_andnot_ps(_mm256_cmp_ps(z, _mm256_set1_ps(-43.5f), _CMP_LT_OQ),
                                        _mm256_blendv_ps(one, e, _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ)));
    return _mm256_mul_ps(_mm256_div_ps(_mm256_mul_ps(x, num), _mm256_add_ps(one, e)), u); /* 0.5 x (1 + tanh z) */
}

/* act(g) * u over n floats: act 0 silu, 1 gelu_tanh */
void act_mul(int act, const float *g, const float *u, long n, float *y) {
    long i = 0;
    if (act == 1)
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(y + i, gelu_tanh_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    else
        for (; i + 8 <= n; i += 8)
            _mm256_storeu_ps(y + i, silu_mul8(_mm256_loadu_ps(g + i), _mm256_loadu_ps(u + i)));
    if (i < n) { /* the last n % 8 through the same steps */
        float xs[8] = {0}, us[8] = {0}, ys[8];
        memcpy(xs, g + i, sizeof(float) * (size_t)(n - i));
        memcpy(us, u + i, sizeof(float) * (size_t)(n - i));
        const __m256 xv = _mm256_loadu_ps(xs), uv = _mm256_loadu_ps(us);
        _mm256_storeu_ps(ys, act == 1 ? gelu_tanh_mul8(xv, uv) : silu_mul8(xv, uv));
        memcpy(y + i, ys, sizeof(float) * (size_t)(n - i));
    }
}

/* ---------------------------------------------------------------------------------------------------------------
   Prefill GEMM on CPUs with AVX512-BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids):

       y[M, N] = x[M, K] @ W                                    (gptq_gemm_bf16, qw2 == NULL)
       y[M, N] = act(x @ W) * (x @ W2)                          (the gated MLP's gate and up, qw2 != NULL)

   x bf16 row-major; y fp32, or bf16 (rounded to nearest even) where ybf16; sums in fp32. The codes are
   dequantized straight into the GEMM's packed panels, so W never exists as a dense matrix in memory: a dense bf16
   GEMM (oneDNN) packs its B operand into the same kind of panel from the bf16 weight; here the panel is filled from
   the 2-, 3-, 4- or 8-bit codes instead, and the GEMM that follows is the same work. Against dequantize +
   torch.mm that saves the dense block's trip through memory, the GEMM's own packing of it, and the bf16 result's
   widening to fp32.

   Panels (gb_pack): W rows [k0, k0 + KC) and 64 columns [n, n + 64), in VNNI pairs, the layout vdpbf16ps takes:
   b[p * 64 + i] = bf16(W[k0 + 2p, n + i]) | bf16(W[k0 + 2p + 1, n + i]) << 16, 128 pairs x 64 columns x 4 bytes
   = 32 KiB (in L1). W[k, n] = scale * (q - zero) in fp32 is exact (an 8-bit integer at most times an fp16), then
   rounded to bf16 as gptq_dequant rounds it, so the operands are those of dequantize + torch.mm. Reading 2-, 3-
   and 8-bit codes here too took SmolLM2's prefill at those widths from 0.79-0.82x the bf16 model's speed (dequantize
   in 4 MiB blocks + torch's GEMM) to 0.99-1.01x, as for 4 bits (512-token prompt, 2 threads, one process).

   Tiles (gb_tile): MR = 6 rows of x by 64 columns: 24 zmm accumulators of 16 fp32, per pair of k 4 panel loads
   and 6 broadcasts of x's two bf16 (one 32-bit word) for 24 vdpbf16ps.

   Loops: threads split the 64-column panels; per panel, the rows of x in passes of MC = 512 (the fp32 result panel
   512 x 64 = 128 KiB stays in L2 while K is walked), per pass K in steps of KC: pack, then every tile of the pass.
   Each panel is dequantized once per pass, i.e. once for prompts up to 512 tokens. The gated form computes the
   gate's and the up's panels into scratch and writes act(g) * u into y (act_mul's formulas: act 0 silu, 1
   gelu_tanh). */

#define GB_KC 256
#define GB_MC 512
#define GB_MR 6
#define GB_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

/* Rows 8c + j of `bits`-bit codes, columns n .. n + 16 nv, as gptq_dequant reads them; bits is a constant in each
   caller (gb_pack), so for 4 and 8 bits, whose chunks start at bit 0 of a word, every shift is an immediate. */
static inline __attribute__((always_inline)) GB_TARGET void gb_pack_bits(const int bits, const int32_t *qw, int N,
                                                                          const uint16_t *scales,
                                                                          const uint8_t *zeros, const int32_t *runs,
                                                                          const int32_t *rgroup, int c0, int c1,
                                                                          int n, int nv, uint32_t *b) {
    /* cvtne2ps_pbh(f1, f0) holds bf16(f0) in words 0..15 and bf16(f1) in 16..31; word 2i of a pair lane takes i,
       word 2i + 1 takes 16 + i */
    static const uint16_t order[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i perm = _mm512_loadu_si512(order), mask = _mm512_set1_epi32((1 << bits) - 1);
    int r = 0;
    while (runs[r + 1] <= c0) r++;
    for (int c = c0; c < c1; c++) {
        while (runs[r + 1] <= c) r++;
        const uint16_t *sg = scales + (size_t)rgroup[r] * N + n;
        const uint8_t *zg = zeros + (size_t)rgroup[r] * N + n;
        /* the chunk's first code starts at bit b0 of qweight row w0 (0 for 4 and 8 bits) */
        const size_t first = (size_t)8 * c * bits;
        const int32_t *w0 = qw + first / 32 * N + n;
        const int b0 = (8 * bits) % 32 ? (int)(first % 32) : 0;
        uint32_t *bp = b + (size_t)(c - c0) * 4 * 64; /* a chunk of 8 rows is 4 pairs */
        for (int v = 0; v < nv; v++) {
            const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(sg + 16 * v)));
            const __m512 zs = _mm512_mul_ps(
                _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(zg + 16 * v)))), sc);
            __m512 f[2];
#pragma GCC unroll 8
            for (int j = 0; j < 8; j++) {
                const int p = b0 + j * bits, sh = p % 32;
                const int32_t *w = w0 + (size_t)(p / 32) * N + 16 * v;
                __m512i q = _mm512_srl_epi32(_mm512_loadu_si512(w), _mm_cvtsi32_si128(sh));
                if (sh + bits > 32) /* a 3-bit code's high bits begin the next word */
                    q = _mm512_or_si512(q, _mm512_sll_epi32(_mm512_loadu_si512(w + N), _mm_cvtsi32_si128(32 - sh)));
                /* q * scale - zero * scale: both products exact (8 + 11 significant bits at most), so one rounding
                   of the exact (q - zero) * scale, gptq_dequant's value */
                f[j % 2] = _mm512_fmsub_ps(_mm512_cvtepi32_ps(_mm512_and_si512(q, mask)), sc, zs);
                if (j % 2)
                    _mm512_store_si512(bp + j / 2 * 64 + 16 * v,
                                       _mm512_permutexvar_epi16(perm, (__m512i)_mm512_cvtne2ps_pbh(f[1], f[0])));
            }
        }
    }
}

/* The panel of rows [8 c0, 8 c1) and columns [n, n + 16 nv) (the layout above) from `bits`-bit codes */
static GB_TARGET void gb_pack(int bits, const int32_t *qw, int N, const uint16_t *scales, const uint8_t *zeros,
                              const int32_t *runs, const int32_t *rgroup, int c0, int c1, int n, int nv, uint32_t *b) {
    switch (bits) {
    case 2: gb_pack_bits(2, qw, N, scales, zeros, runs, rgroup, c0, c1, n, nv, b); break;
    case 3: gb_pack_bits(3, qw, N, scales, zeros, runs, rgroup, c0, c1, n, nv, b); break;
    case 8: gb_pack_bits(8, qw, N, scales, zeros, runs, rgroup, c0, c1, n, nv, b); break;
    default: gb_pack_bits(4, qw, N, scales, zeros, runs, rgroup, c0, c1, n, nv, b);
    }
}

/* c[i, 16 v + l] (+)= sum over the P pairs of a's row i with the panel's column, i < mr, v < nv; c is zeroed first
   where first. */
static inline __attribute__((always_inline)) GB_TARGET void gb_tile(const uint16_t *a, size_t lda, const uint32_t *b,
                                                                     int P, float *c, size_t ldc, int first,
                                                                     const int mr, const int nv) {
    __m512 acc[GB_MR][4];
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) acc[i][v] = first ? _mm512_setzero_ps() : _mm512_loadu_ps(c + i * ldc + 16 * v);
    for (int p = 0; p < P; p++) {
        __m512bh bv[4];
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) bv[v] = (__m512bh)_mm512_load_si512(b + (size_t)p * 64 + 16 * v);
#pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            int32_t pair;
            memcpy(&pair, a + i * lda + 2 * p, sizeof pair);
            const __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++) acc[i][v] = _mm512_dpbf16_ps(acc[i][v], ai, bv[v]);
        }
    }
#pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) _mm512_storeu_ps(c + i * ldc + 16 * v, acc[i][v]);
}

#define GB_TILE(MR, NV) \
    case (MR) * 8 + (NV): gb_tile(a, lda, b, P, c, ldc, first, MR, NV); break
#define GB_TILES(MR) GB_TILE(MR, 1); GB_TILE(MR, 2); GB_TILE(MR, 3); GB_TILE(MR, 4)

static GB_TARGET void gb_tiles(const uint16_t *a, size_t lda, const uint32_t *b, int P, float *c, size_t ldc,
                               int first, int mr, int nv) {
    switch (mr * 8 + nv) {
        GB_TILES(1); GB_TILES(2); GB_TILES(3); GB_TILES(4); GB_TILES(5); GB_TILES(6);
    }
}

/* The same rounding to bf16 as store_row, on 16 floats */
static inline GB_TARGET void gb_store(void *y, size_t at, __m512 v, int bf16) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)y + at), (__m256i)_mm512_cvtneps_pbh(v));
    else
        _mm512_storeu_ps((float *)y + at, v);
}

/* bits: of the codes (2, 3, 4 or 8; both layers alike). Returns 0, -1 when scratch memory cannot be had, -2 for what
   it does not take (other bits, N % 16, K % 8, a bf16 y without qw2). */
GB_TARGET int gptq_gemm_bf16(int bits, const uint16_t *x, int M, int K, int N, const int32_t *qw,
                             const uint16_t *scales, const uint8_t *zeros, const int32_t *qw2, const uint16_t *scales2,
                             const uint8_t *zeros2, const int32_t *runs, const int32_t *rgroup, void *y, int ybf16,
                             int act, int threads) {
    if ((bits != 2 && bits != 3 && bits != 4 && bits != 8) || N % 16 || K % 8 || (ybf16 && !qw2)) return -2;
    if (threads < 1) threads = 1;
    const int gated = qw2 != NULL, panels = (N + 63) / 64;
    int failed = 0;
#pragma omp parallel num_threads(threads) reduction(| : failed)
    {
        const share_t sh = share_of(panels);
        void *b = NULL, *scratch = NULL; /* the panel, and the gate's and up's result panels */
        if (posix_memalign(&b, 64, (size_t)GB_KC / 2 * 64 * 4) ||
            (gated && posix_memalign(&scratch, 64, (size_t)2 * GB_MC * 64 * 4)))
            failed = 1;
        for (int m0 = 0; m0 < M && !failed; m0 += GB_MC) {
            const int mc = M - m0 < GB_MC ? M - m0 : GB_MC;
            for (int pn = sh.lo; pn < sh.hi; pn++) {
                const int n = 64 * pn, nv = (N - n) / 16 < 4 ? (N - n) / 16 : 4;
                for (int l = 0; l <= gated; l++) {
                    float *c = gated ? (float *)scratch + (size_t)l * GB_MC * 64 : (float *)y + (size_t)m0 * N + n;
                    const size_t ldc = gated ? 64 : (size_t)N;
                    for (int k0 = 0; k0 < K; k0 += GB_KC) {
                        const int kc = K - k0 < GB_KC ? K - k0 : GB_KC;
                        gb_pack(bits, l ? qw2 : qw, N, l ? scales2 : scales, l ? zeros2 : zeros, runs, rgroup, k0 / 8,
                                (k0 + kc) / 8, n, nv, (uint32_t *)b);
                        for (int i = 0; i < mc; i += GB_MR)
                            gb_tiles(x + (size_t)(m0 + i) * K + k0, (size_t)K, (const uint32_t *)b, kc / 2,
                                     c + (size_t)i * ldc, ldc, k0 == 0, mc - i < GB_MR ? mc - i : GB_MR, nv);
                    }
                }
                if (!gated) continue;
                for (int i = 0; i < mc; i++)
                    for (int v = 0; v < nv; v++) {
                        const float *g = (float *)scratch + (size_t)i * 64 + 16 * v, *u = g + (size_t)GB_MC * 64;
                        const __m256 g0 = _mm256_load_ps(g), g1 = _mm256_load_ps(g + 8);
                        const __m256 u0 = _mm256_load_ps(u), u1 = _mm256_load_ps(u + 8);
                        const __m256 lo = act == 1 ? gelu_tanh_mul8(g0, u0) : silu_mul8(g0, u0);
                        const __m256 hi = act == 1 ? gelu_tanh_mul8(g1, u1) : silu_mul8(g1, u1);
                        gb_store(y, (size_t)(m0 + i) * N + n + 16 * v,
                                 _mm512_insertf32x8(_mm512_castps256_ps512(lo), hi, 1), ybf16);
                    }
            }
        }
        free(b);
        free(scratch);
    }
    return failed ? -1 : 0;
}

/* ---------------------------------------------------------------------------------------------------------------
   A LoRA adapter's low-rank term on a projection's decode rows (gptqkit.finetune.QuantLoraLinear, which computes
   base(x) + B(A(x)) * scaling):

       y[m, n] = y[m, n] + (sum_j B[n, j] * t[m, j]) * scale,   t[m, j] = sum_k A[j, k] * x[m, k]

   A [r, K] and B [N, r] are the adapter's lora_A / lora_B weights as they are (fp32, row-major), read in place, so
   an update to them is seen by the next call. Both the module's own decode call and decode_layer's run this one
   function, so the two paths give the same bits. r x K + N x r multiply-adds per row: on SmolLM2-135M with r = 8 on
   every projection about 1.2 M per token, against ~100 M for the 3- or 4-bit matmuls, on the caller's thread. */
typedef struct {
    int r;          /* 0: no adapter on this layer */
    const float *A; /* [r, K] */
    const float *B; /* [N, r] */
    float scale;
} lora_t;

void lora_add(const lora_t *l, const float *x, int M, int K, int N, float *y) {
    const int r = l->r;
    float t[r > 0 ? r : 1];
    for (int m = 0; m < M; m++, x += K, y += N) {
        for (int j = 0; j < r; j++) {
            const float *a = l->A + (size_t)j * K;
            __m256 s = _mm256_setzero_ps();
            int k = 0;
            for (; k + 8 <= K; k += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + k), _mm256_loadu_ps(x + k), s);
            float d = hsum(s);
            for (; k < K; k++) d += a[k] * x[k];
            t[j] = d;
        }
        int n = 0;
        if (r % 8 == 0) /* 8 outputs a step: 8 rows of B times t, 8 lanes a product, summed across by hsum8x8 */
            for (const __m256 sc = _mm256_set1_ps(l->scale); n + 8 <= N; n += 8) {
                __m256 a[8];
                for (int i = 0; i < 8; i++) {
                    const float *b = l->B + (size_t)(n + i) * r;
                    a[i] = _mm256_mul_ps(_mm256_loadu_ps(b), _mm256_loadu_ps(t));
                    for (int j = 8; j < r; j += 8)
                        a[i] = _mm256_fmadd_ps(_mm256_loadu_ps(b + j), _mm256_loadu_ps(t + j), a[i]);
                }
                _mm256_storeu_ps(y + n, _mm256_add_ps(_mm256_loadu_ps(y + n), _mm256_mul_ps(hsum8x8(a), sc)));
            }
        for (; n < N; n++) {
            const float *b = l->B + (size_t)n * r;
            float u = 0.0f;
            for (int j = 0; j < r; j++) u += b[j] * t[j];
            y[n] = y[n] + u * l->scale;
        }
    }
}

/* ---------------------------------------------------------------------------------------------------------------
   A whole pre-norm decoder block for one decoded token (gptqkit.fused.DecodeLayer): Llama's, Mistral's

       h = x + o_proj(attention(rope(q), rope(k), v)),  q|k|v = qkv_proj(rms_norm(x))
       y = h + down_proj(silu(gate) * up),              gate|up = gate_up_proj(rms_norm(h))

   in one call instead of ~12 module calls and ~8 C calls through Python, whose code and data come from DRAM after
   each matmul has streamed megabytes of codes through the caches. Each step is the function the per-module path
   calls (rms_norm, q4_matmul, rope_decode_attention, silu_mul) with the same roundings, and the residual adds are
   one fp32 add each as in torch, so the result is the per-module path's bit for bit. */

/* A layer's bias [N] (Qwen2's q/k/v), as QuantLinear adds it after the matmul, y + bias.to(float32): kind 0 fp32,
   1 fp16, 2 bf16 (each widens exactly), then one fp32 add; p NULL: none. With it Qwen2's blocks and stack run in
   one C call too: a Qwen2-0.5B-shaped 4-bit model (2 threads) took 6.4 ms per token instead of 8.6. */
typedef struct {
    const void *p;
    int kind;
} bias_t;

static void add_bias(const bias_t *b, int N, float *y) {
    for (int n = 0; n < N; n++) {
        float v;
        if (b->kind == 1)
            v = _cvtsh_ss(((const uint16_t *)b->p)[n]);
        else if (b->kind == 2) {
            const uint32_t u = (uint32_t)((const uint16_t *)b->p)[n] << 16;
            memcpy(&v, &u, sizeof v);
        } else
            v = ((const float *)b->p)[n];
        y[n] = y[n] + v;
    }
}

typedef struct { /* one decode matmul: the arguments of gptq_q4_matmul / gptq_matmul_q8 that do not change between
                   tokens; q8: 0 for gptq_q4_matmul, else gptq_matmul_q8's bits */
    int nl, K, width, R, q8;
    const int32_t *const *qws;
    const int *Ns;
    const uint16_t *const *scs;
    const uint8_t *const *zs;
    const int32_t *runs, *rgroup;
    const next_t *next;
    int nnext;
    const bias_t *bias; /* nl entries, or NULL: biases added to each layer's output */
    const lora_t *lora; /* nl entries (r = 0: none), or NULL: adapters' terms added after them */
} mm_args;

typedef struct {
    int hidden, H, Hkv, D, inter;
    float eps1, eps2, scale;
    const float *w1, *w2; /* input_layernorm, post_attention_layernorm weights [hidden] */
    int offset1, offset2; /* the norms' rms_norm offset: 1 for Gemma's (1 + w) */
    int act;              /* the MLP's activation, act_mul's: 0 silu, 1 gelu_tanh */
    mm_args qkv, o, gate_up, down;
} layer_args;

static int mm_call(const mm_args *m, const float *x, float *y, int threads) {
    const int rc = m->q8 ? gptq_matmul_q8(m->q8, x, 1, m->K, m->nl, m->qws, m->Ns, m->scs, m->zs, m->runs, m->rgroup,
                                          m->R, y, threads, m->next, m->nnext)
                         : gptq_q4_matmul(x, 1, m->K, m->nl, m->qws, m->Ns, m->scs, m->zs, m->runs, m->rgroup, m->R,
                                          y, threads, m->next, m->nnext);
    if (rc == 0 && (m->bias || m->lora))
        for (int l = 0; l < m->nl; y += m->Ns[l], l++) {
            if (m->bias && m->bias[l].p) add_bias(&m->bias[l], m->Ns[l], y);
            if (m->lora && m->lora[l].r) lora_add(&m->lora[l], x, 1, m->K, m->Ns[l], y);
        }
    return rc;
}

/* x, y [hidden]; kc, vc, kv16, T and strides as rope_decode_attention; cs, sn [D]. Returns 0, -1 when scratch memory
   cannot be had, -2 for shapes the steps do not take. */
int decode_layer(const layer_args *L, const float *x, const float *cs, const float *sn, void *kc, void *vc, int kv16,
                 int T, long ksh, long ksl, long vsh, long vsl, float *y, int threads) {
    const int E = L->hidden, QD = L->H * L->D, KD = L->Hkv * L->D, I = L->inter;
    if (L->qkv.width != QD + 2 * KD || L->o.width != E || L->gate_up.width != 2 * I || L->down.width != E)
        return -2;
    /* h [E] | qkv [QD + 2 KD] | att [QD] | o [E] | gu [2 I] | a [I] | d [E] */
    float *h = (float *)malloc(sizeof(float) * ((size_t)4 * E + 2 * (size_t)QD + 2 * (size_t)KD + 3 * (size_t)I));
    if (!h) return -1;
    float *qkv = h + E, *att = qkv + QD + 2 * KD, *o = att + QD, *gu = o + E, *a = gu + 2 * I, *d = a + I;
    int rc;
    rms_norm(x, 1, E, L->w1, L->eps1, L->offset1, h);
    if ((rc = mm_call(&L->qkv, h, qkv, threads))) goto out;
    if ((rc = rope_decode_attention(qkv, qkv + QD, qkv + QD + KD, cs, sn, L->H, L->D, L->Hkv, kc, vc, kv16, T, ksh,
                                    ksl, vsh, vsl, L->scale, att, threads)))
        goto out;
    if ((rc = mm_call(&L->o, att, o, threads))) goto out;
    for (int i = 0; i < E; i++) y[i] = x[i] + o[i];
    rms_norm(y, 1, E, L->w2, L->eps2, L->offset2, h);
    if ((rc = mm_call(&L->gate_up, h, gu, threads))) goto out;
    act_mul(L->act, gu, gu + I, I, a);
    if ((rc = mm_call(&L->down, a, d, threads))) goto out;
    for (int i = 0; i < E; i++) y[i] += d[i];
out:
    free(h);
    return rc;
}

/* A decoder stack (gptqkit.fused.DecodeStack) for one decoded token: its n blocks one after another, each as
   decode_layer, then its final RMSNorm (w, eps) into y [hidden]. Block i's arguments are layers[i], its cache
   buffers kc[i], vc[i]; every block's buffers have the same strides. It saves what each block cost in Python
   around its decode_layer call (the stack's loop, the block's checks, its cache views): ~50 us per block on the
   1.1B shape, where decode has just streamed the block's codes through the caches and every Python object is read
   from DRAM again. Returns what decode_layer returns (-2 also for blocks of different widths). */
int decode_stack(const layer_args *const *layers, int n, const float *x, const float *cs, const float *sn,
                 void *const *kc, void *const *vc, int kv16, int T, long ksh, long ksl, long vsh, long vsl,
                 const float *w, float eps, int offset, float *y, int threads) {
    if (n < 1) return -2;
    const int E = layers[0]->hidden;
    for (int i = 1; i < n; i++)
        if (layers[i]->hidden != E) return -2;
    float *h = (float *)malloc(sizeof(float) * 2 * (size_t)E); /* block outputs, alternating halves */
    if (!h) return -1;
    const float *in = x;
    int rc = 0;
    for (int i = 0; i < n && rc == 0; i++) {
        float *out = h + (size_t)(i % 2) * E;
        rc = decode_layer(layers[i], in, cs, sn, kc[i], vc[i], kv16, T, ksh, ksl, vsh, vsl, out, threads);
        in = out;
    }
    if (rc == 0) rms_norm(in, 1, E, w, eps, offset, y);
    free(h);
    return rc;
}
