/* kiln's CPU kernels (x86-64 with AVX2, FMA and F16C): group-quantized linear layers, and the
 * small per-layer ops of a decode step.
 *
 * Quantized weights are rows of blocks, each block 32 consecutive input features:
 *   int4: 20 bytes {float16 d, float16 m, 16 bytes of codes}   w = d * code + m, code 0..15
 *         byte j holds code j in its low nibble and code j + 16 in its high one
 *   int8: 34 bytes {float16 d, 32 signed codes}                w = d * code
 * (ggml's Q4_1 and Q8_0 layouts: one stream of memory per row, scales beside their codes.)
 * Up to four rows of activations (a decode step of up to four sequences) are quantized per
 * group of 32 to int16 on the fly (see quantize_activations), so each block's dot product runs
 * on integers (vpdpwssd with AVX512-VNNI, vpmaddwd without): that step is bound by streaming
 * the weights, and these blocks stream the fewest bytes; each row's arithmetic is the same
 * whatever else is in the batch, so its result is too. More rows (a larger batch of decodes, a
 * short prefill) are multiplied in float: each block is dequantized once into registers and
 * FMA'd into every row. Either way results match a float matmul over the dequantized weights
 * to ~1e-4, so which path computed a token does not change it.
 *
 * Every function takes its thread count and runs on kiln's own pool of threads (below), not
 * OpenMP's: libgomp counts every team ever started in the process, and once that count passes
 * the CPU count (torch's team in the main thread plus ours in the engine thread, on 2 cores) it
 * stops spinning at barriers and sleeps in the kernel instead, which cost the served decode
 * step ~15%. The pool's threads spin at barriers, yield the CPU when a wait runs long, and sleep
 * between calls.
 *
 * kiln_llama_decode runs a whole decode step as one job: the threads stay awake across layers
 * and meet at five barriers per layer; the small ops between linear layers (residual adds,
 * norms, activation quantization) are repeated by every thread on its own copy rather than
 * done by one while the others wait.
 */
#define _DEFAULT_SOURCE /* madvise */
#include <errno.h>
#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#define GROUP 32

/* ---- kiln's thread pool -------------------------------------------------------------------
 * pool_run(job, arg, n) runs job(arg, tid, n) on the calling thread (tid 0) and n - 1 workers.
 * Workers spin for SPIN_NS after a job, so the next one (the head after the layers, the next
 * token) starts without a wake-up, then sleep on a condition variable. One job runs at a time
 * (run_lock): the engine thread and the main thread may both call in. */

typedef void (*pool_job)(void *arg, int tid, int n);

#define MAX_WORKERS 255
#define SPIN_NS 200000L /* 0.2 ms: spans the Python work between two decode steps' calls */

static struct {
    pthread_mutex_t run_lock, sleep_lock;
    pthread_cond_t wake;
    int workers; /* started */
    unsigned first_generation[MAX_WORKERS + 1]; /* the job count each worker starts after */
    atomic_uint generation; /* bumped once per job */
    atomic_int sleepers, finished;
    pool_job job;
    void *arg;
    int n;
} pool = {
    .run_lock = PTHREAD_MUTEX_INITIALIZER,
    .sleep_lock = PTHREAD_MUTEX_INITIALIZER,
    .wake = PTHREAD_COND_INITIALIZER,
};

static long long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (long long)t.tv_sec * 1000000000LL + t.tv_nsec;
}

/* Spin until *word != seen, yielding the CPU every 1024 polls: when other processes hold the
 * cores, a waiter that only spun would burn the slice the thread it waits for needs. */
static unsigned spin_until_changed(atomic_uint *word, unsigned seen, long long deadline) {
    unsigned value;
    for (unsigned polls = 1; (value = atomic_load_explicit(word, memory_order_acquire)) == seen;
         polls++) {
        _mm_pause();
        if ((polls & 1023) == 0) {
            if (deadline && now_ns() > deadline) break;
            sched_yield();
        }
    }
    return value;
}

static void *pool_worker(void *arg) {
    const int tid = (int)(intptr_t)arg;
    /* Not the generation now: the job this worker was started for may already be published. */
    unsigned seen = pool.first_generation[tid];
    for (;;) {
        unsigned current = spin_until_changed(&pool.generation, seen, now_ns() + SPIN_NS);
        if (current == seen) {
            /* sleepers is raised before generation is read again (both sequentially
             * consistent), so either this thread sees the new job or pool_run sees a sleeper
             * and signals under the lock this thread waits with. */
            pthread_mutex_lock(&pool.sleep_lock);
            atomic_fetch_add(&pool.sleepers, 1);
            while ((current = atomic_load(&pool.generation)) == seen)
                pthread_cond_wait(&pool.wake, &pool.sleep_lock);
            atomic_fetch_sub(&pool.sleepers, 1);
            pthread_mutex_unlock(&pool.sleep_lock);
        }
        seen = current;
        /* Every started worker reports every job, its own share or none: pool_run waits for
         * all of them, so none can still be reading this job's fields when the next is set. */
        if (tid < pool.n) pool.job(pool.arg, tid, pool.n);
        atomic_fetch_add_explicit(&pool.finished, 1, memory_order_release);
    }
    return NULL;
}

/* After fork() only the forking thread exists in the child: start a fresh pool there. */
static void pool_after_fork_in_child(void) {
    pthread_mutex_init(&pool.run_lock, NULL);
    pthread_mutex_init(&pool.sleep_lock, NULL);
    pthread_cond_init(&pool.wake, NULL);
    pool.workers = 0;
    atomic_store(&pool.sleepers, 0);
}

static pthread_once_t pool_once = PTHREAD_ONCE_INIT;
static void pool_register_fork_handler(void) {
    pthread_atfork(NULL, NULL, pool_after_fork_in_child);
}

static void pool_run(pool_job job, void *arg, int n) {
    if (n > MAX_WORKERS + 1) n = MAX_WORKERS + 1;
    if (n <= 1) {
        job(arg, 0, 1);
        return;
    }
    pthread_once(&pool_once, pool_register_fork_handler);
    pthread_mutex_lock(&pool.run_lock);
    while (pool.workers < n - 1) {
        pthread_t thread;
        pool.first_generation[pool.workers + 1] = atomic_load(&pool.generation);
        if (pthread_create(&thread, NULL, pool_worker, (void *)(intptr_t)(pool.workers + 1)))
            break; /* out of threads: run with those there are */
        pthread_detach(thread);
        pool.workers++;
    }
    if (pool.workers < n - 1) n = pool.workers + 1;
    pool.job = job, pool.arg = arg, pool.n = n;
    atomic_store_explicit(&pool.finished, 0, memory_order_relaxed);
    atomic_fetch_add(&pool.generation, 1); /* publishes job, arg and n */
    if (atomic_load(&pool.sleepers) > 0) {
        pthread_mutex_lock(&pool.sleep_lock);
        pthread_cond_broadcast(&pool.wake);
        pthread_mutex_unlock(&pool.sleep_lock);
    }
    job(arg, 0, n);
    for (unsigned polls = 1;
         atomic_load_explicit(&pool.finished, memory_order_acquire) < pool.workers; polls++) {
        _mm_pause();
        if ((polls & 1023) == 0) sched_yield();
    }
    pthread_mutex_unlock(&pool.run_lock);
}

/* A barrier for the n threads of one job: the last to arrive starts the next phase. */
typedef struct {
    atomic_uint arrived, phase;
} barrier;

static void barrier_wait(barrier *b, int n) {
    if (n <= 1) return;
    const unsigned phase = atomic_load_explicit(&b->phase, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == (unsigned)n - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
    } else {
        spin_until_changed(&b->phase, phase, 0);
    }
}

/* Thread tid's share [*lo, *hi) of `count` items split in n contiguous parts. */
static inline void share(int64_t count, int tid, int n, int64_t *lo, int64_t *hi) {
    const int64_t base = count / n, extra = count % n;
    *lo = tid * base + (tid < extra ? tid : extra);
    *hi = *lo + base + (tid < extra ? 1 : 0);
}

typedef struct {
    uint16_t d, m;
    uint8_t qs[GROUP / 2];
} block_int4;

typedef struct {
    uint16_t d;
    int8_t qs[GROUP];
} __attribute__((packed)) block_int8;

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

/* Weight bytes a thread asks for ahead of the block it multiplies. Each thread streams its own
 * contiguous range of rows, but the hardware prefetcher alone kept a decode step waiting on
 * memory: on a 2-core Xeon VM, SmolLM2's 8-bit LM head (28.7 MB) took 2.0 ms once the layers
 * before it had pushed it out of cache, against 0.7 ms while cached. Prefetching this far
 * ahead, a decode step's layers took 3.5-3.6 ms instead of 8.7-11.8 and the head 0.83 instead
 * of 2.3 (LLM.generate, 128 tokens, median step, builds alternating; 512 bytes ahead gave 5.6
 * and 1.8 ms, 2048 3.9 and 1.1, 8192 3.7 and 0.80, 16384 3.8 and 0.87). */
#define PREFETCH_WEIGHT_BYTES 4096

static inline const char *block_address(int bits, const void *w, int64_t index) {
    return bits == 4 ? (const char *)((const block_int4 *)w + index)
                     : (const char *)((const block_int8 *)w + index);
}

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}

static inline float hmax(__m256 v) {
    __m128 a = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_max_ps(a, _mm_movehl_ps(a, a));
    return _mm_cvtss_f32(_mm_max_ss(a, _mm_movehdup_ps(a)));
}

/* The 32 codes of a block as bytes, in order. */
static inline __m256i int4_codes(const block_int4 *b) {
    const __m128i packed = _mm_loadu_si128((const __m128i *)b->qs);
    const __m256i both = _mm256_set_m128i(_mm_srli_epi16(packed, 4), packed);
    return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

/* x [M][K] -> xq [M][K] int16, xd [M][G] scales (max |x| / 32767), xsum [M][G] float sums.
 * 16-bit activations err by ~1e-5 of the group's largest value: far below what moves a greedy
 * choice (int8 activations, llama.cpp's, err by ~0.4%, enough to flip SmolLM2's near-ties),
 * while the dot products still run on integers. Rounds to nearest even, as lrintf does. */
static void quantize_activations(const float *x, int64_t M, int64_t K, int16_t *xq, float *xd,
                                 float *xsum) {
    const int64_t groups = M * (K / GROUP);
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int64_t i = 0; i < groups; i++) {
        const float *v = x + i * GROUP;
        __m256 part[4], amax = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            part[k] = _mm256_loadu_ps(v + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, part[k]));
        }
        const float top = hmax(amax);
        const __m256 inv = _mm256_set1_ps(top > 0.0f ? 32767.0f / top : 0.0f);
        const __m256i q01 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(part[0], inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(part[1], inv)));
        const __m256i q23 = _mm256_packs_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(part[2], inv)),
                                               _mm256_cvtps_epi32(_mm256_mul_ps(part[3], inv)));
        /* packs interleaves the 128-bit lanes of its two inputs: put the features back in order */
        _mm256_storeu_si256((__m256i *)(xq + i * GROUP), _mm256_permute4x64_epi64(q01, 0xD8));
        _mm256_storeu_si256((__m256i *)(xq + i * GROUP + 16), _mm256_permute4x64_epi64(q23, 0xD8));
        xd[i] = top / 32767.0f;
        xsum[i] = hsum(_mm256_add_ps(_mm256_add_ps(part[0], part[1]),
                                     _mm256_add_ps(part[2], part[3])));
    }
}

/* A block's 32 codes as two vectors of 16 bytes (codes 0..15, then 16..31; unsigned for
 * int4, signed for int8), its scale and offset (0 for int8). */
static inline void block_codes(int bits, const void *w, int64_t index, __m128i *low,
                               __m128i *high, float *d, float *m) {
    if (bits == 4) {
        const block_int4 *b = (const block_int4 *)w + index;
        const __m128i packed = _mm_loadu_si128((const __m128i *)b->qs);
        const __m128i mask = _mm_set1_epi8(0x0F);
        *low = _mm_and_si128(packed, mask);
        *high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        *d = half_to_float(b->d), *m = half_to_float(b->m);
    } else {
        const block_int8 *b = (const block_int8 *)w + index;
        *low = _mm_loadu_si128((const __m128i *)b->qs);
        *high = _mm_loadu_si128((const __m128i *)(b->qs + 16));
        *d = half_to_float(b->d), *m = 0.0f;
    }
}

/* A block's 32 codes as two vectors of 16 int16 (codes 0..15, then 16..31), its scale and
 * offset (0 for int8). */
static inline void load_block(int bits, const void *w, int64_t index, __m256i codes[2],
                              float *d, float *m) {
    __m128i low, high;
    block_codes(bits, w, index, &low, &high, d, m);
    if (bits == 4)
        codes[0] = _mm256_cvtepu8_epi16(low), codes[1] = _mm256_cvtepu8_epi16(high);
    else
        codes[0] = _mm256_cvtepi8_epi16(low), codes[1] = _mm256_cvtepi8_epi16(high);
}

/* A block's 32 weights as four vectors of 8 floats (d * code + m: the exact dequantized values). */
static inline void block_weights(int bits, const void *w, int64_t index, __m256 out[4]) {
    __m256i codes[2];
    float d, m;
    load_block(bits, w, index, codes, &d, &m);
    const __m256 scale = _mm256_set1_ps(d), offset = _mm256_set1_ps(m);
    for (int half = 0; half < 2; half++) {
        const __m128i low = _mm256_castsi256_si128(codes[half]);
        const __m128i high = _mm256_extracti128_si256(codes[half], 1);
        out[2 * half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(low)), scale,
                                        offset);
        out[2 * half + 1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(high)),
                                            scale, offset);
    }
}

#if defined(__AVX512F__)
/* A block's 32 weights as two vectors of 16 floats: the same values as block_weights. */
static inline void block_weights16(int bits, const void *w, int64_t index, __m512 out[2]) {
    __m128i low, high;
    float d, m;
    block_codes(bits, w, index, &low, &high, &d, &m);
    if (bits == 4) {
        out[0] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(low));
        out[1] = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(high));
    } else {
        out[0] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(low));
        out[1] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(high));
    }
    const __m512 scale = _mm512_set1_ps(d), offset = _mm512_set1_ps(m);
    out[0] = _mm512_fmadd_ps(out[0], scale, offset);
    out[1] = _mm512_fmadd_ps(out[1], scale, offset);
}

/* The float row path's vectors: 16 floats with AVX-512, else 8. */
typedef __m512 fvec;
#define FVEC_FLOATS 16
#define fvec_zero _mm512_setzero_ps
#define fvec_load _mm512_loadu_ps
#define fvec_store _mm512_storeu_ps
#define fvec_fmadd _mm512_fmadd_ps
#define fvec_sum _mm512_reduce_add_ps
#define block_fvecs block_weights16
#else
typedef __m256 fvec;
#define FVEC_FLOATS 8
#define fvec_zero _mm256_setzero_ps
#define fvec_load _mm256_loadu_ps
#define fvec_store _mm256_storeu_ps
#define fvec_fmadd _mm256_fmadd_ps
#define fvec_sum hsum
#define block_fvecs block_weights
#endif

/* Output feature n for ROWS float activation rows from m0: each
 * block is dequantized once into registers and multiplied into every row with float FMAs. For a
 * batch of decodes this beats integer dot products, whose per-block conversions and scalings
 * are paid once per row, and it is exact up to float rounding. ROWS is a compile-time constant
 * in each caller, so the accumulators stay in registers. A row's arithmetic is the same whatever
 * ROWS is. With AVX-512, 16-float vectors, half the FMAs per block: CPUKernels.linear over
 * SmolLM2's 121 quantized layers, 2 threads of a Xeon VM, against the 8-float version
 * alternating, took 1.21x less time at 8 rows and 1.22x at 16 (two accumulators per row were no
 * faster). */
static inline __attribute__((always_inline)) void float_rows(int bits, const void *w, int64_t n,
                                                             int64_t G, const float *x,
                                                             int64_t m0, const int ROWS,
                                                             int64_t N, float *y) {
    const int64_t K = G * GROUP;
    fvec acc[8];
    for (int r = 0; r < ROWS; r++) acc[r] = fvec_zero();
    for (int64_t g = 0; g < G; g++) {
        fvec wv[GROUP / FVEC_FLOATS];
        _mm_prefetch(block_address(bits, w, n * G + g) + PREFETCH_WEIGHT_BYTES, _MM_HINT_T0);
        block_fvecs(bits, w, n * G + g, wv);
        for (int r = 0; r < ROWS; r++) {
            const float *xg = x + (m0 + r) * K + g * GROUP;
            fvec a = acc[r];
            for (int i = 0; i < GROUP / FVEC_FLOATS; i++)
                a = fvec_fmadd(wv[i], fvec_load(xg + FVEC_FLOATS * i), a);
            acc[r] = a;
        }
    }
    for (int r = 0; r < ROWS; r++) y[(m0 + r) * N + n] = fvec_sum(acc[r]);
}

/* Output feature n for all M rows: passes of 8, then the rest in one pass (each pass
 * dequantizes the block again: 5 rows as 4 + 1 took 1.89x as long as in one pass with AVX-512,
 * measured as above). */
static void float_feature(int bits, const void *w, int64_t n, int64_t G, const float *x,
                          int64_t M, int64_t N, float *y) {
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) float_rows(bits, w, n, G, x, m0, 8, N, y);
    switch (M - m0) {
    case 7: float_rows(bits, w, n, G, x, m0, 7, N, y); break;
    case 6: float_rows(bits, w, n, G, x, m0, 6, N, y); break;
    case 5: float_rows(bits, w, n, G, x, m0, 5, N, y); break;
    case 4: float_rows(bits, w, n, G, x, m0, 4, N, y); break;
    case 3: float_rows(bits, w, n, G, x, m0, 3, N, y); break;
    case 2: float_rows(bits, w, n, G, x, m0, 2, N, y); break;
    case 1: float_rows(bits, w, n, G, x, m0, 1, N, y); break;
    default: break;
    }
}

/* The integer dot product of a block's codes with 32 int16 activations, as 8 int32 partial
 * sums. AVX512-VNNI does multiply-and-add in one instruction; the sums are exact integers
 * either way (|code| <= 127, |x| <= 32767, 32 terms), so both give identical results. */
static inline __m256i block_dot(const __m256i codes[2], const int16_t *x) {
    const __m256i x0 = _mm256_loadu_si256((const __m256i *)x);
    const __m256i x1 = _mm256_loadu_si256((const __m256i *)(x + 16));
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
    return _mm256_dpwssd_epi32(_mm256_dpwssd_epi32(_mm256_setzero_si256(), codes[0], x0),
                               codes[1], x1);
#else
    return _mm256_add_epi32(_mm256_madd_epi16(codes[0], x0), _mm256_madd_epi16(codes[1], x1));
#endif
}

/* Quantized activation rows (see quantize_activations): xq [M][K], xd and xsum [M][K / 32]. */
typedef struct {
    const int16_t *xq;
    const float *xd, *xsum;
    int64_t K;
} int_rows_in;

/* Output feature n for ROWS activation rows from m0. Each block's codes are unpacked once and
 * multiplied into every row on integers; a row's arithmetic is the same whatever ROWS is (even
 * and odd blocks into two accumulators, so consecutive blocks overlap), so a sequence's result
 * does not depend on what else is in its batch. ROWS is a compile-time constant in each
 * caller, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void int_rows(int bits, const void *w, int64_t n,
                                                           const int_rows_in *in, int64_t m0,
                                                           const int ROWS, int64_t N,
                                                           float *y) {
    const int64_t K = in->K, G = K / GROUP;
    __m256 acc0[4], acc1[4];
    float offset[4];
    for (int r = 0; r < ROWS; r++)
        acc0[r] = acc1[r] = _mm256_setzero_ps(), offset[r] = 0.0f;
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
        __m256i c0[2], c1[2];
        float d0, mo0, d1, mo1;
        _mm_prefetch(block_address(bits, w, n * G + g) + PREFETCH_WEIGHT_BYTES, _MM_HINT_T0);
        load_block(bits, w, n * G + g, c0, &d0, &mo0);
        load_block(bits, w, n * G + g + 1, c1, &d1, &mo1);
        for (int r = 0; r < ROWS; r++) {
            const int64_t row = m0 + r;
            const int16_t *x = in->xq + row * K + g * GROUP;
            const float *xd = in->xd + row * G + g, *xs = in->xsum + row * G + g;
            acc0[r] = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xd[0]),
                                      _mm256_cvtepi32_ps(block_dot(c0, x)), acc0[r]);
            acc1[r] = _mm256_fmadd_ps(_mm256_set1_ps(d1 * xd[1]),
                                      _mm256_cvtepi32_ps(block_dot(c1, x + GROUP)), acc1[r]);
            if (bits == 4) offset[r] += mo0 * xs[0] + mo1 * xs[1];
        }
    }
    for (; g < G; g++) {
        __m256i c0[2];
        float d0, mo0;
        load_block(bits, w, n * G + g, c0, &d0, &mo0);
        for (int r = 0; r < ROWS; r++) {
            const int64_t row = m0 + r;
            acc0[r] = _mm256_fmadd_ps(
                _mm256_set1_ps(d0 * in->xd[row * G + g]),
                _mm256_cvtepi32_ps(block_dot(c0, in->xq + row * K + g * GROUP)), acc0[r]);
            if (bits == 4) offset[r] += mo0 * in->xsum[row * G + g];
        }
    }
    for (int r = 0; r < ROWS; r++)
        y[(m0 + r) * N + n] = hsum(_mm256_add_ps(acc0[r], acc1[r])) + offset[r];
}

/* Up to this many rows multiply on integers; more in float (float_rows). Measured with
 * CPUKernels.linear on SmolLM2's q/k/v/gate/up (3072 x 576) and down (576 x 1536) int4 layers,
 * 2 threads of an AMD EPYC with AVX512-VNNI, the float path against the integer one interleaved:
 * integers were 1.36-1.63x faster at 2 rows, 1.59-2.12x at 3, 1.04-1.06x at 4, but 0.71-0.88x
 * at 8 and 0.81-0.93x at 16 (each row pays its own scaling there, float FMAs share the block's
 * dequantization across rows). */
#define MAX_INT_ROWS 4

/* Activation rows of a float pass that L1 holds beside the weights streaming by. */
#define L1_ROWS_BYTES 24576

/* Features [lo, hi) of y [M][N] = x @ W.T for quantized W [N][K / 32 blocks] and quantized
 * activation rows x, feature by feature, the rows in passes of up to MAX_INT_ROWS. */
static inline __attribute__((always_inline)) void int_features_of(
    const int bits, const int_rows_in *in, int64_t M, const void *w, int64_t N, float *y,
    int64_t lo, int64_t hi) {
    for (int64_t n = lo; n < hi; n++) {
        int64_t m0 = 0;
        for (; m0 + 4 <= M; m0 += 4) int_rows(bits, w, n, in, m0, 4, N, y);
        switch (M - m0) {
        case 3: int_rows(bits, w, n, in, m0, 3, N, y); break;
        case 2: int_rows(bits, w, n, in, m0, 2, N, y); break;
        case 1: int_rows(bits, w, n, in, m0, 1, N, y); break;
        default: break;
        }
    }
}

/* int_features with the bit width a compile-time constant in each branch, so the block loader's
 * choice and the int8 path's (zero) offsets cost nothing per block. */
static void int_features(int bits, const int_rows_in *in, int64_t M, const void *w, int64_t N,
                         float *y, int64_t lo, int64_t hi) {
    if (bits == 4)
        int_features_of(4, in, M, w, N, y, lo, hi);
    else
        int_features_of(8, in, M, w, N, y, lo, hi);
}

/* One thread's scratch for quantized activation rows (see scratch_alloc). */
typedef struct {
    int16_t *xq;
    float *xd, *xsum;
} row_scratch;

/* A linear layer's activation rows as its features take them (rows_features): up to
 * MAX_INT_ROWS rows quantized into a thread's scratch, more as they are, in float. */
typedef struct {
    const float *x;
    int64_t M, K;
    int_rows_in q; /* when M <= MAX_INT_ROWS */
} rows_in;

static rows_in prepare_rows(const float *x, int64_t M, int64_t K, const row_scratch *s) {
    rows_in in = {x, M, K, {0}};
    if (M <= MAX_INT_ROWS) {
        quantize_activations(x, M, K, s->xq, s->xd, s->xsum);
        in.q = (int_rows_in){s->xq, s->xd, s->xsum, K};
    }
    return in;
}

/* Features [lo, hi) of y [M][N] = x [M][K] @ W.T for a quantized W: on integers up to
 * MAX_INT_ROWS rows, in float for more. */
static void rows_features(int bits, const rows_in *in, const void *w, int64_t N, float *y,
                          int64_t lo, int64_t hi) {
    const int64_t M = in->M, K = in->K, G = K / GROUP;
    if (M <= MAX_INT_ROWS) {
        int_features(bits, &in->q, M, w, N, y, lo, hi);
        return;
    }
    /* Passes of 8 (or, for wide rows, 4) rows over all the features, so that a pass's rows
     * stay in L1 while the weights stream by: with one feature at a time over all rows, 16
     * rows of SmolLM2's 576 features (36 KB) thrashed L1 and the gate/up and LM head layers
     * ran 1.2-1.3x slower (CPUKernels.linear, 16 rows, interleaved). */
    const float *x = in->x;
    const int rows = 8 * K * (int64_t)sizeof(float) <= L1_ROWS_BYTES ? 8 : 4;
    int64_t m0 = 0;
    for (; m0 + rows <= M; m0 += rows)
        for (int64_t n = lo; n < hi; n++)
            if (rows == 8)
                float_rows(bits, w, n, G, x, m0, 8, N, y);
            else
                float_rows(bits, w, n, G, x, m0, 4, N, y);
    if (m0 < M)
        for (int64_t n = lo; n < hi; n++)
            float_feature(bits, w, n, G, x + m0 * K, M - m0, N, y + m0 * N);
}

/* Features [lo, hi) of y [M][N] = x [M][K] @ W.T for a quantized W. */
static void linear_part(int bits, const float *x, int64_t M, int64_t K, const void *w, int64_t N,
                        float *y, int64_t lo, int64_t hi, const row_scratch *scratch) {
    const rows_in in = prepare_rows(x, M, K, scratch);
    rows_features(bits, &in, w, N, y, lo, hi);
}

/* n row_scratch in one allocation (NULL when out of memory), each for the activation rows of
 * calls with `rows` rows of up to `width` features (only up to MAX_INT_ROWS are quantized). */
static row_scratch *scratch_alloc(int n, int64_t rows, int64_t width) {
    if (rows > MAX_INT_ROWS) rows = MAX_INT_ROWS;
    const size_t groups = (size_t)(rows * (width / GROUP)) + 1;
    const size_t each = sizeof(int16_t) * (size_t)(rows * width) + 2 * sizeof(float) * groups;
    row_scratch *s = malloc(sizeof(row_scratch) * (size_t)n + each * (size_t)n + 64);
    if (!s) return NULL;
    char *p = (char *)(s + n);
    for (int t = 0; t < n; t++) {
        s[t].xd = (float *)p, p += sizeof(float) * groups;
        s[t].xsum = (float *)p, p += sizeof(float) * groups;
        s[t].xq = (int16_t *)p, p += sizeof(int16_t) * (size_t)(rows * width);
    }
    return s;
}

typedef struct {
    int bits;
    const float *x;
    int64_t M, K, N;
    const void *w;
    float *y;
    row_scratch *scratch;
} linear_job;

static void run_linear(void *arg, int tid, int n) {
    const linear_job *j = arg;
    int64_t lo, hi;
    share(j->N, tid, n, &lo, &hi);
    linear_part(j->bits, j->x, j->M, j->K, j->w, j->N, j->y, lo, hi, j->scratch + tid);
}

/* y [M][N] = x [M][K] @ W.T. Returns 0, or -1 when the scratch memory cannot be allocated. */
int kiln_quantized_linear(int bits, const float *x, int64_t M, int64_t K, const void *w,
                          int64_t N, float *y, int threads) {
    if (threads < 1) threads = 1;
    linear_job job = {bits, x, M, K, N, w, y, scratch_alloc(threads, M, K)};
    if (!job.scratch) return -1;
    pool_run(run_linear, &job, threads);
    free(job.scratch);
    return 0;
}

typedef struct {
    int bits;
    const void *w;
    int64_t blocks;
    float *out;
} dequantize_job;

static void run_dequantize(void *arg, int tid, int n) {
    const dequantize_job *j = arg;
    int64_t lo, hi;
    share(j->blocks, tid, n, &lo, &hi);
    for (int64_t i = lo; i < hi; i++) {
        fvec wv[GROUP / FVEC_FLOATS];
        block_fvecs(j->bits, j->w, i, wv);
        for (int k = 0; k < GROUP / FVEC_FLOATS; k++)
            fvec_store(j->out + i * GROUP + FVEC_FLOATS * k, wv[k]);
    }
}

/* out [N][K] = W as floats: for large batches (prefill), where a float matmul is faster. */
void kiln_dequantize(int bits, const void *w, int64_t N, int64_t K, float *out, int threads) {
    dequantize_job job = {bits, w, N * (K / GROUP), out};
    pool_run(run_dequantize, &job, threads);
}

/* ---- decode-step helpers: the small per-layer ops whose PyTorch dispatch costs more than
 * their arithmetic at one token (float32 only) ---------------------------------------------- */

/* rows [B][E]: out = x / rms(x) * weight */
static void rms_norm_rows(const float *x, const float *weight, int64_t B, int64_t E, float eps,
                          float *out) {
    for (int64_t b = 0; b < B; b++) {
        const float *xr = x + b * E;
        float squares = 0.0f;
#pragma omp simd reduction(+ : squares)
        for (int64_t i = 0; i < E; i++) squares += xr[i] * xr[i];
        const float inv = 1.0f / sqrtf(squares / (float)E + eps);
        for (int64_t i = 0; i < E; i++) out[b * E + i] = xr[i] * inv * weight[i];
    }
}

/* For each of `rows` rows: residual += x (when residual is given), then
 * x = residual / rms(residual) * weight; without residual, x = x / rms(x) * weight.
 * Llama's RMSNorm in float32, fused with the residual add before it (as vLLM's
 * fused_add_rms_norm). */
void kiln_add_rms_norm(float *x, float *residual, const float *weight, int64_t rows,
                       int64_t dim, float eps) {
    if (residual)
        for (int64_t i = 0; i < rows * dim; i++) residual[i] += x[i];
    /* Each element is read before it is written, so normalising in place is safe. */
    rms_norm_rows(residual ? residual : x, weight, rows, dim, eps, x);
}

static int64_t longest_context(const int64_t *starts, int64_t B) {
    int64_t longest = 1;
    for (int64_t b = 0; b < B; b++)
        if (starts[b + 1] - starts[b] > longest) longest = starts[b + 1] - starts[b];
    return longest;
}

/* e^x for 8 floats, within ~2 ulp of expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by Cephes'
 * degree-6 polynomial, 2^n put in the exponent bits. Inputs are clamped to where the result
 * is a normal float; a NaN stays NaN where the caller divides by it (silu below). glibc's
 * vector expf needs -ffast-math, which would also let the compiler reorder every sum here. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    const __m256i bits = _mm256_slli_epi32(
        _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

/* Scratch floats one thread's attention_part needs: every query head of a key/value head's
 * group scores the whole context, in rows padded to whole vectors; rounded up to whole cache
 * lines, so that two threads' scratch never share one. */
static int64_t attention_scratch(int64_t longest, int64_t H, int64_t KV) {
    return ((H / KV) * (longest + 8) + 15) & ~(int64_t)15;
}

/* Cached rows are gathered through each sequence's slots, an order the hardware prefetcher
 * cannot guess, so rows this far ahead are requested while the current one is used: 16
 * sequences of 90 tokens in scattered 16-slot blocks, SmolLM2's heads, 30 layers' caches (too
 * big for L3) took 10.1 ms with against 13.4 ms without (best of 5, interleaved). */
#define PREFETCH_ROWS 8

static inline void prefetch_row(const float *row, int64_t n) {
    for (int64_t i = 0; i < n; i += 16) _mm_prefetch((const char *)(row + i), _MM_HINT_T0);
}

/* a . b over n floats (n a multiple of 8). */
static inline float dot8(const float *a, const float *b, int64_t n) {
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    if (i < n) s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    return hsum(_mm256_add_ps(s0, s1));
}

/* row[0..len) = e^(row - max) in place (len padded with -inf up to whole vectors); returns
 * their sum. */
static float softmax_numerators(float *row, int64_t len) {
    const int64_t padded = (len + 7) & ~(int64_t)7;
    for (int64_t t = len; t < padded; t++) row[t] = -INFINITY;
    __m256 top = _mm256_set1_ps(-INFINITY);
    for (int64_t t = 0; t < padded; t += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(row + t));
    const __m256 best = _mm256_set1_ps(hmax(top));
    __m256 total = _mm256_setzero_ps();
    for (int64_t t = 0; t < padded; t += 8) {
        /* exp8 clamps -inf to a tiny normal number: the padding is zeroed explicitly */
        const __m256 x = _mm256_loadu_ps(row + t);
        const __m256 e = _mm256_and_ps(exp8(_mm256_sub_ps(x, best)),
                                       _mm256_cmp_ps(x, _mm256_set1_ps(-INFINITY), _CMP_NEQ_OQ));
        _mm256_storeu_ps(row + t, e);
        total = _mm256_add_ps(total, e);
    }
    return hsum(total);
}

/* One query token per sequence against its cached keys and values (a decode step), for a batch
 * of sequences. Each (sequence, key/value head) pair is one item, handed out in order from
 * *next so long and short contexts balance across threads; the H / KV query heads that share
 * the key/value head (grouped-query attention) are done together, so each cached key and value
 * row is read once for all of them.
 *   q        [B][H][D] at a stride of q_stride floats per sequence: this step's queries
 *   cache    [2][slots][KV][D]      the layer's paged cache (keys, then values)
 *   slots    [total context] int64  each sequence's cache slots in order, concatenated
 *   starts   [B + 1] int64          sequence b's slots are slots[starts[b] .. starts[b+1])
 *   window   attend to the last `window` tokens only (0: all)
 *   out      [B][H][D]
 *   scores   attention_scratch(longest context, H, KV) floats: this thread's scratch
 * D must be a multiple of 8 (every Llama-family head size is). */
static void attention_part(const float *q, int64_t q_stride, const float *cache,
                           int64_t num_slots, const int64_t *slots, const int64_t *starts,
                           int64_t B, int64_t H, int64_t KV, int64_t D, float scale,
                           int64_t window, float *out, float *scores, atomic_llong *next) {
    const float *values = cache + num_slots * KV * D;
    const int64_t group = H / KV;
    for (;;) {
        const int64_t item = atomic_fetch_add_explicit(next, 1, memory_order_relaxed);
        if (item >= B * KV) break;
        const int64_t b = item / KV, kvh = item % KV;
        int64_t first = starts[b], len = starts[b + 1] - starts[b];
        if (window > 0 && len > window) first += len - window, len = window;
        const int64_t stride = len + 8; /* one padded row of scores per query head */
        const float *qh = q + b * q_stride + kvh * group * D;
        for (int64_t t = 0; t < len; t++) {
            const float *k = cache + (slots[first + t] * KV + kvh) * D;
            if (t + PREFETCH_ROWS < len)
                prefetch_row(cache + (slots[first + t + PREFETCH_ROWS] * KV + kvh) * D, D);
            for (int64_t g = 0; g < group; g++)
                scores[g * stride + t] = dot8(qh + g * D, k, D) * scale;
        }
        for (int64_t g = 0; g < group; g++) {
            float *row = scores + g * stride;
            const float inv = 1.0f / softmax_numerators(row, len);
            float *o = out + (b * H + kvh * group + g) * D;
            /* 64 output dims at a time in registers, over every cached value row */
            for (int64_t d0 = 0; d0 < D; d0 += 64) {
                const int64_t width = D - d0 < 64 ? D - d0 : 64;
                __m256 acc[8];
                for (int i = 0; i < 8; i++) acc[i] = _mm256_setzero_ps();
                for (int64_t t = 0; t < len; t++) {
                    const __m256 p = _mm256_set1_ps(row[t]);
                    const float *v = values + (slots[first + t] * KV + kvh) * D + d0;
                    if (t + PREFETCH_ROWS < len)
                        prefetch_row(
                            values + (slots[first + t + PREFETCH_ROWS] * KV + kvh) * D + d0,
                            width);
                    for (int i = 0; i < width / 8; i++)
                        acc[i] = _mm256_fmadd_ps(p, _mm256_loadu_ps(v + 8 * i), acc[i]);
                }
                for (int i = 0; i < width / 8; i++)
                    _mm256_storeu_ps(o + d0 + 8 * i, _mm256_mul_ps(acc[i], _mm256_set1_ps(inv)));
            }
        }
    }
}

typedef struct {
    const float *q, *cache;
    int64_t num_slots;
    const int64_t *slots, *starts;
    int64_t B, H, KV, D;
    float scale;
    int64_t window;
    float *out, *scores;
    int64_t scores_each; /* floats of scores per thread */
    atomic_llong next;
} attention_job;

static void run_attention(void *arg, int tid, int n) {
    attention_job *j = arg;
    (void)n;
    attention_part(j->q, j->H * j->D, j->cache, j->num_slots, j->slots, j->starts, j->B, j->H,
                   j->KV, j->D, j->scale, j->window, j->out, j->scores + tid * j->scores_each,
                   &j->next);
}

int kiln_decode_attention(const float *q, const float *cache, int64_t num_slots,
                          const int64_t *slots, const int64_t *starts, int64_t B, int64_t H,
                          int64_t KV, int64_t D, float scale, int64_t window, float *out,
                          int threads) {
    if (threads < 1) threads = 1;
    const int64_t scratch = attention_scratch(longest_context(starts, B), H, KV);
    attention_job job = {q, cache, num_slots, slots, starts, B, H, KV, D, scale, window, out,
                         malloc(sizeof(float) * (size_t)(scratch * threads)), scratch};
    if (!job.scores) return -1;
    atomic_init(&job.next, 0);
    pool_run(run_attention, &job, threads);
    free(job.scores);
    return 0;
}

/* Rotate heads [h0, h1) of token t's fused q/k/v row in place where they are q or k heads
 * (Llama's layout: dim i pairs with dim i + D/2, all D dims rotate), and copy those that are k
 * or v heads to the token's cache slot. Heads count q heads first, then KV k heads, then KV v.
 *   row   [H + 2 KV][D];  c, s: the step's cos and sin rows for t, see kiln_rope_and_cache */
static void rope_and_cache_heads(float *row, int64_t h0, int64_t h1, int64_t H, int64_t KV,
                                 int64_t D, const float *c, const float *s, int64_t slot,
                                 float *cache, int64_t num_slots) {
    const int64_t half = D / 2;
    for (int64_t head = h0; head < h1; head++) {
        float *x = row + head * D;
        if (head < H + KV) {
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = x[i], b = x[i + half];
                x[i] = a * c[i] - b * s[half + i];
                x[i + half] = b * c[i] + a * s[half + i];
            }
        }
        if (head >= H) {
            const int64_t kv = head - H; /* 0..KV-1 keys, KV..2KV-1 values */
            const int64_t plane = kv < KV ? 0 : num_slots;
            float *dst = cache + ((plane + slot) * KV + kv % KV) * D;
            for (int64_t i = 0; i < D; i++) dst[i] = x[i];
        }
    }
}

/* Rotate the query and key heads of this step's fused q/k/v rows in place, then write each
 * token's keys and values to its cache slot.
 *   qkv   [T][H + 2 KV][D]
 *   cos, sin  [T][D]: the tables at full width (the first half of cos and the second half of
 *         sin are the angles' cosines and sines; see RotaryEmbedding.cos_sin)
 *   slots [T] int64; cache [2][num_slots][KV][D] */
void kiln_rope_and_cache(float *qkv, int64_t T, int64_t H, int64_t KV, int64_t D,
                         const float *cos, const float *sin, const int64_t *slots, float *cache,
                         int64_t num_slots) {
    const int64_t width = (H + 2 * KV) * D;
    for (int64_t t = 0; t < T; t++)
        rope_and_cache_heads(qkv + t * width, 0, H + 2 * KV, H, KV, D, cos + t * D, sin + t * D,
                             slots[t], cache, num_slots);
}

/* out[i] = silu(gate[i]) * up[i] = gate / (1 + e^-gate) * up for i < count: 8 at a time, the
 * tail through a padded copy, so that every element gets the same arithmetic wherever it is. */
static void silu_times(const float *gate, const float *up, int64_t count, float *out) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    int64_t i = 0;
    for (; i + 8 <= count; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        const __m256 e = exp8(_mm256_xor_ps(g, sign));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)),
                                                _mm256_loadu_ps(up + i)));
    }
    if (i < count) {
        float g8[8] = {0}, u8[8] = {0}, o8[8];
        for (int64_t k = 0; k < count - i; k++) g8[k] = gate[i + k], u8[k] = up[i + k];
        silu_times(g8, u8, 8, o8);
        for (int64_t k = 0; k < count - i; k++) out[i + k] = o8[k];
    }
}

/* out [T][I] = silu(gate) * up, where gate_up [T][2 I] holds gate then up (Llama's MLP). */
void kiln_silu_mul(const float *gate_up, int64_t T, int64_t I, float *out) {
    for (int64_t t = 0; t < T; t++)
        silu_times(gate_up + t * 2 * I, gate_up + t * 2 * I + I, I, out + t * I);
}

/* ---- a whole decode step of a Llama model, in one call -----------------------------------
 * Python's per-op dispatch costs ~10-30 us per call, about as much as the arithmetic of one
 * decode token at SmolLM2's size; this runs every layer's ops (norm, q/k/v, rotary and cache
 * write, attention, o, add + norm, gate/up, silu * up, down) without returning to Python, as
 * one job of the pool. */

typedef struct {
    const float *norm1, *norm2;
    int qkv_bits;
    const void *qkv;
    const float *qkv_bias; /* NULL: none */
    int o_bits;
    const void *o;
    int gate_up_bits;
    const void *gate_up;
    int down_bits;
    const void *down;
    float *cache; /* [2][num_slots][KV][D] */
} kiln_llama_layer;

typedef struct {
    float *hidden, *residual;
    const kiln_llama_layer *layers;
    int64_t num_layers;
    float eps;
    int64_t B, E, H, KV, D, I;
    const float *cos, *sin;
    const int64_t *new_slots;
    int64_t num_slots;
    const int64_t *slots, *starts;
    float scale;
    int64_t window, scores_each; /* floats of own_scores per thread */
    /* shared between the threads */
    float *qkv_out, *attn, *gate_up_out, *act;
    atomic_llong *attention_next; /* [num_layers] */
    barrier barrier;
    /* one per thread: residual stream (thread 0 uses `residual`), normed rows, scores */
    float *own_residual, *own_normed, *own_scores;
    row_scratch *scratch;
} decode_job;

/* Thread tid's whole decode step. Between barriers each thread writes only its own outputs
 * (a share of a linear layer's features, or its attention items), and reads shared buffers
 * only after the barrier that completes them; the residual stream and the norms of it are
 * recomputed by every thread in its own copy, which costs less than another barrier. */
static void run_llama_decode(void *arg, int tid, int n) {
    decode_job *j = arg;
    const int64_t B = j->B, E = j->E, H = j->H, KV = j->KV, D = j->D, I = j->I;
    const int64_t width = (H + 2 * KV) * D;
    float *residual = tid == 0 ? j->residual : j->own_residual + (tid - 1) * B * E;
    float *normed = j->own_normed + tid * B * E;
    const row_scratch *scratch = j->scratch + tid;
    int64_t head_lo, head_hi, e_lo, e_hi, i_lo, i_hi;
    share(H + 2 * KV, tid, n, &head_lo, &head_hi); /* q/k/v split by whole heads for rotary */
    share(E, tid, n, &e_lo, &e_hi);
    share(I, tid, n, &i_lo, &i_hi);

    for (int64_t l = 0; l < j->num_layers; l++) {
        const kiln_llama_layer *layer = j->layers + l;
        if (l == 0) {
            for (int64_t i = 0; i < B * E; i++) residual[i] = j->hidden[i];
        } else {
            for (int64_t i = 0; i < B * E; i++) residual[i] += j->hidden[i];
        }
        rms_norm_rows(residual, layer->norm1, B, E, j->eps, normed);

        /* q/k/v for this thread's heads, then their rotary and cache writes */
        linear_part(layer->qkv_bits, normed, B, E, layer->qkv, width, j->qkv_out, head_lo * D,
                    head_hi * D, scratch);
        for (int64_t b = 0; b < B; b++) {
            float *row = j->qkv_out + b * width;
            if (layer->qkv_bias)
                for (int64_t i = head_lo * D; i < head_hi * D; i++) row[i] += layer->qkv_bias[i];
            rope_and_cache_heads(row, head_lo, head_hi, H, KV, D, j->cos + b * D,
                                 j->sin + b * D, j->new_slots[b], layer->cache, j->num_slots);
        }
        barrier_wait(&j->barrier, n);

        attention_part(j->qkv_out, width, layer->cache, j->num_slots, j->slots, j->starts, B, H,
                       KV, D, j->scale, j->window, j->attn, j->own_scores + tid * j->scores_each,
                       j->attention_next + l);
        barrier_wait(&j->barrier, n);

        linear_part(layer->o_bits, j->attn, B, H * D, layer->o, E, j->hidden, e_lo, e_hi,
                    scratch);
        barrier_wait(&j->barrier, n);

        for (int64_t i = 0; i < B * E; i++) residual[i] += j->hidden[i];
        rms_norm_rows(residual, layer->norm2, B, E, j->eps, normed);
        /* gate features [i_lo, i_hi) and the matching up features, so this thread can finish
         * silu(gate) * up for them without waiting for the others */
        const rows_in mlp_rows = prepare_rows(normed, B, E, scratch); /* for both halves */
        rows_features(layer->gate_up_bits, &mlp_rows, layer->gate_up, 2 * I, j->gate_up_out,
                      i_lo, i_hi);
        rows_features(layer->gate_up_bits, &mlp_rows, layer->gate_up, 2 * I, j->gate_up_out,
                      I + i_lo, I + i_hi);
        for (int64_t b = 0; b < B; b++) {
            const float *g = j->gate_up_out + b * 2 * I, *u = g + I;
            silu_times(g + i_lo, u + i_lo, i_hi - i_lo, j->act + b * I + i_lo);
        }
        barrier_wait(&j->barrier, n);

        linear_part(layer->down_bits, j->act, B, I, layer->down, E, j->hidden, e_lo, e_hi,
                    scratch);
        barrier_wait(&j->barrier, n);
    }
}

/* hidden [B][E] holds the embeddings on entry and the last layer's output on return, residual
 * [B][E] the residual stream before the final norm (the caller adds and normalises).
 * Returns 0, or -1 when the scratch memory cannot be allocated. */
int kiln_llama_decode(float *hidden, float *residual, const kiln_llama_layer *layers,
                      int64_t num_layers, float eps, int64_t B, int64_t E, int64_t H, int64_t KV,
                      int64_t D, int64_t I, const float *cos, const float *sin,
                      const int64_t *new_slots, int64_t num_slots, const int64_t *slots,
                      const int64_t *starts, float scale, int64_t window, int threads) {
    if (threads < 1) threads = 1;
    const int64_t width = (H + 2 * KV) * D;
    const int64_t widest = E > I ? (E > H * D ? E : H * D) : (I > H * D ? I : H * D);
    decode_job j = {hidden, residual, layers, num_layers, eps, B, E, H, KV, D, I, cos, sin,
                    new_slots, num_slots, slots, starts, scale, window,
                    attention_scratch(longest_context(starts, B), H, KV)};
    j.qkv_out = malloc(sizeof(float) * (size_t)(B * width));
    j.attn = malloc(sizeof(float) * (size_t)(B * H * D));
    j.gate_up_out = malloc(sizeof(float) * (size_t)(B * 2 * I));
    j.act = malloc(sizeof(float) * (size_t)(B * I));
    j.attention_next = malloc(sizeof(atomic_llong) * (size_t)num_layers);
    j.own_residual = malloc(sizeof(float) * (size_t)(B * E * threads));
    j.own_normed = malloc(sizeof(float) * (size_t)(B * E * threads));
    j.own_scores = malloc(sizeof(float) * (size_t)(j.scores_each * threads));
    j.scratch = scratch_alloc(threads, B, widest);
    int status = -1;
    if (j.qkv_out && j.attn && j.gate_up_out && j.act && j.attention_next && j.own_residual &&
        j.own_normed && j.own_scores && j.scratch) {
        for (int64_t l = 0; l < num_layers; l++) atomic_init(j.attention_next + l, 0);
        atomic_init(&j.barrier.arrived, 0);
        atomic_init(&j.barrier.phase, 0);
        pool_run(run_llama_decode, &j, threads);
        status = 0;
    }
    free(j.qkv_out), free(j.attn), free(j.gate_up_out), free(j.act), free(j.attention_next);
    free(j.own_residual), free(j.own_normed), free(j.own_scores), free(j.scratch);
    return status;
}

/* ---- page-in of a mapped file ------------------------------------------------------------ */

#ifndef MADV_POPULATE_READ
#define MADV_POPULATE_READ 22 /* Linux 5.14+ */
#endif

/* Read [addr, addr + length) of a file mapping into memory and map every page (madvise
 * MADV_POPULATE_READ), then read a byte of each page. Mapped pages can still cost a lot on
 * their first read: on a 2-core VM, after an artifact's weights (93 MB) were read from disk,
 * the first read of their pages took ~100 ms longer than the next in about 2 starts in 5, with
 * no page fault in the guest (the hypervisor backing the page cache's memory, it seems), and
 * that landed on the first request. Reading them here pays it in the loading thread's
 * background instead. Where the kernel does not know the advice (EINVAL: older than 5.14), the
 * reads fault the pages in; where it failed otherwise (EFAULT, EIO: a file cut short or a read
 * error), nothing is read, as reading such a page would raise SIGBUS in this thread rather
 * than where the model uses it. Returns madvise's result. */
int kiln_populate(const void *addr, int64_t length, int64_t page) {
    const int status = madvise((void *)addr, (size_t)length, MADV_POPULATE_READ);
    if (status != 0 && errno != EINVAL) return status;
    const volatile unsigned char *bytes = addr;
    unsigned char seen = 0;
    for (int64_t i = 0; i < length; i += page) seen ^= bytes[i];
    (void)seen;
    return status;
}
