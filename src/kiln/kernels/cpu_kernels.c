/* kiln's CPU kernels (x86-64 with AVX2, FMA and F16C): group-quantized linear layers, and the
 * small per-layer ops of a decode step.
 *
 * Quantized weights are rows of blocks, each block 32 consecutive input features:
 *   int4: 20 bytes {float16 d, float16 m, 16 bytes of codes}   w = d * code + m, code 0..15
 *         byte j holds code j in its low nibble and code j + 16 in its high one
 *   int8: 34 bytes {float16 d, 32 signed codes}                w = d * code
 * (ggml's Q4_1 and Q8_0 layouts: one stream of memory per row, scales beside their codes.)
 * One row of activations (a single decode) is quantized per group of 32 to int16 on the fly (see
 * quantize_activations), so each block's dot product runs on integers (vpmaddwd): that step is
 * bound by streaming the weights, and these blocks stream the fewest bytes. Several rows (a batch
 * of decodes, a short prefill) are multiplied in float: each block is dequantized once into
 * registers and FMA'd into every row. Either way results match a float matmul over the
 * dequantized weights to ~1e-4, so which path computed a token does not change it.
 *
 * Every function takes its thread count: OpenMP's is per calling thread, and the engine calls
 * from its own thread, not the one torch.set_num_threads ran in.
 *
 * The `*_team` functions hold only orphaned worksharing constructs (`omp for`, `omp single`):
 * called inside a parallel region every thread of the team takes its share, called outside one
 * a single thread does all of it. The exported functions open one parallel region around them;
 * kiln_llama_decode opens one for a whole decode step, so the threads stay awake across layers
 * instead of being forked and joined ~150 times a token.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#define GROUP 32

typedef struct {
    uint16_t d, m;
    uint8_t qs[GROUP / 2];
} block_int4;

typedef struct {
    uint16_t d;
    int8_t qs[GROUP];
} __attribute__((packed)) block_int8;

static inline float half_to_float(uint16_t h) { return _cvtsh_ss(h); }

static inline float hsum(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
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
 * while the dot products still run on integers (vpmaddwd). */
static void quantize_activations(const float *x, int64_t M, int64_t K, int16_t *xq, float *xd,
                                 float *xsum) {
    const int64_t groups = M * (K / GROUP);
    for (int64_t i = 0; i < groups; i++) {
        const float *v = x + i * GROUP;
        float amax = 0.0f, sum = 0.0f;
        for (int j = 0; j < GROUP; j++) amax = fmaxf(amax, fabsf(v[j])), sum += v[j];
        const float inv = amax > 0.0f ? 32767.0f / amax : 0.0f;
        for (int j = 0; j < GROUP; j++) xq[i * GROUP + j] = (int16_t)lrintf(v[j] * inv);
        xd[i] = amax / 32767.0f;
        xsum[i] = sum;
    }
}

/* A block's 32 codes as two vectors of 16 int16 (codes 0..15, then 16..31), its scale and
 * offset (0 for int8). */
static inline void load_block(int bits, const void *w, int64_t index, __m256i codes[2],
                              float *d, float *m) {
    __m128i low, high;
    if (bits == 4) {
        const block_int4 *b = (const block_int4 *)w + index;
        const __m128i packed = _mm_loadu_si128((const __m128i *)b->qs);
        const __m128i mask = _mm_set1_epi8(0x0F);
        low = _mm_and_si128(packed, mask);
        high = _mm_and_si128(_mm_srli_epi16(packed, 4), mask);
        codes[0] = _mm256_cvtepu8_epi16(low), codes[1] = _mm256_cvtepu8_epi16(high);
        *d = half_to_float(b->d), *m = half_to_float(b->m);
    } else {
        const block_int8 *b = (const block_int8 *)w + index;
        low = _mm_loadu_si128((const __m128i *)b->qs);
        high = _mm_loadu_si128((const __m128i *)(b->qs + 16));
        codes[0] = _mm256_cvtepi8_epi16(low), codes[1] = _mm256_cvtepi8_epi16(high);
        *d = half_to_float(b->d), *m = 0.0f;
    }
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

/* Output feature n for ROWS float activation rows from m0: each
 * block is dequantized once into registers and multiplied into every row with float FMAs. For a
 * batch of decodes this beats integer dot products, whose per-block conversions and scalings
 * are paid once per row, and it is exact up to float rounding. ROWS is a compile-time constant
 * in each caller, so the accumulators stay in registers. */
static inline __attribute__((always_inline)) void float_rows(int bits, const void *w, int64_t n,
                                                             int64_t G, const float *x,
                                                             int64_t m0, const int ROWS,
                                                             int64_t N, float *y) {
    __m256 acc[8];
    for (int r = 0; r < ROWS; r++) acc[r] = _mm256_setzero_ps();
    const int64_t K = G * GROUP;
    for (int64_t g = 0; g < G; g++) {
        __m256 wv[4];
        block_weights(bits, w, n * G + g, wv);
        for (int r = 0; r < ROWS; r++) {
            const float *xg = x + (m0 + r) * K + g * GROUP;
            __m256 a = acc[r];
            for (int i = 0; i < 4; i++) a = _mm256_fmadd_ps(wv[i], _mm256_loadu_ps(xg + 8 * i), a);
            acc[r] = a;
        }
    }
    for (int r = 0; r < ROWS; r++) y[(m0 + r) * N + n] = hsum(acc[r]);
}

/* Output feature n for all M rows, in chunks of 8, 4, 2 and 1 rows. */
static void float_feature(int bits, const void *w, int64_t n, int64_t G, const float *x,
                          int64_t M, int64_t N, float *y) {
    int64_t m0 = 0;
    for (; m0 + 8 <= M; m0 += 8) float_rows(bits, w, n, G, x, m0, 8, N, y);
    if (m0 + 4 <= M) float_rows(bits, w, n, G, x, m0, 4, N, y), m0 += 4;
    if (m0 + 2 <= M) float_rows(bits, w, n, G, x, m0, 2, N, y), m0 += 2;
    if (m0 < M) float_rows(bits, w, n, G, x, m0, 1, N, y);
}

/* Output feature n for a single activation row (decode): two blocks a step into two
 * accumulators, so consecutive blocks' arithmetic overlaps instead of waiting on one chain. */
static float single_row_feature(int bits, const void *w, int64_t n, int64_t G, const int16_t *xq,
                                const float *xd, const float *xsum) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float offset = 0.0f;
    int64_t g = 0;
    for (; g + 1 < G; g += 2) {
        __m256i c0[2], c1[2];
        float d0, m0, d1, m1;
        load_block(bits, w, n * G + g, c0, &d0, &m0);
        load_block(bits, w, n * G + g + 1, c1, &d1, &m1);
        const __m256i *x0 = (const __m256i *)(xq + g * GROUP), *x1 = x0 + 2;
        const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(c0[0], _mm256_loadu_si256(x0)),
                                            _mm256_madd_epi16(c0[1], _mm256_loadu_si256(x0 + 1)));
        const __m256i p1 = _mm256_add_epi32(_mm256_madd_epi16(c1[0], _mm256_loadu_si256(x1)),
                                            _mm256_madd_epi16(c1[1], _mm256_loadu_si256(x1 + 1)));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xd[g]), _mm256_cvtepi32_ps(p0), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_set1_ps(d1 * xd[g + 1]), _mm256_cvtepi32_ps(p1), acc1);
        offset += m0 * xsum[g] + m1 * xsum[g + 1];
    }
    for (; g < G; g++) {
        __m256i c0[2];
        float d0, m0;
        load_block(bits, w, n * G + g, c0, &d0, &m0);
        const __m256i *x0 = (const __m256i *)(xq + g * GROUP);
        const __m256i p0 = _mm256_add_epi32(_mm256_madd_epi16(c0[0], _mm256_loadu_si256(x0)),
                                            _mm256_madd_epi16(c0[1], _mm256_loadu_si256(x0 + 1)));
        acc0 = _mm256_fmadd_ps(_mm256_set1_ps(d0 * xd[g]), _mm256_cvtepi32_ps(p0), acc0);
        offset += m0 * xsum[g];
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + offset;
}

/* y [M][N] = x [M][K] @ W.T for a quantized W [N][K / 32 blocks]: int16 activations for one
 * row, float for more. xq [K], xd and xsum [K / 32] are the single row's scratch. */
static void linear_team(int bits, const float *x, int64_t M, int64_t K, const void *w, int64_t N,
                        float *y, int16_t *xq, float *xd, float *xsum) {
    const int64_t G = K / GROUP;
    if (M > 1) {
#pragma omp for schedule(static)
        for (int64_t n = 0; n < N; n++) float_feature(bits, w, n, G, x, M, N, y);
        return;
    }
#pragma omp single
    quantize_activations(x, 1, K, xq, xd, xsum);
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; n++) y[n] = single_row_feature(bits, w, n, G, xq, xd, xsum);
}

/* linear_team on its own. Returns 0, or -1 when the scratch memory cannot be allocated. */
int kiln_quantized_linear(int bits, const float *x, int64_t M, int64_t K, const void *w,
                          int64_t N, float *y, int threads) {
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)K);
    float *xd = malloc(sizeof(float) * (size_t)(K / GROUP));
    float *xsum = malloc(sizeof(float) * (size_t)(K / GROUP));
    int status = -1;
    if (xq && xd && xsum) {
#pragma omp parallel num_threads(threads)
        linear_team(bits, x, M, K, w, N, y, xq, xd, xsum);
        status = 0;
    }
    free(xq), free(xd), free(xsum);
    return status;
}

/* out [N][K] = W as floats: for large batches (prefill), where a float matmul is faster. */
void kiln_dequantize(int bits, const void *w, int64_t N, int64_t K, float *out, int threads) {
    const int64_t G = K / GROUP;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int64_t i = 0; i < N * G; i++) {
        float *o = out + i * GROUP;
        if (bits == 4) {
            const block_int4 *b = (const block_int4 *)w + i;
            const float d = half_to_float(b->d), m = half_to_float(b->m);
            for (int j = 0; j < GROUP / 2; j++) {
                o[j] = d * (float)(b->qs[j] & 0x0F) + m;
                o[j + GROUP / 2] = d * (float)(b->qs[j] >> 4) + m;
            }
        } else {
            const block_int8 *b = (const block_int8 *)w + i;
            const float d = half_to_float(b->d);
            for (int j = 0; j < GROUP; j++) o[j] = d * (float)b->qs[j];
        }
    }
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

/* One query token per sequence against its cached keys and values (a decode step), for a batch
 * of sequences in one call.
 *   q        [B][H][D]              this step's queries
 *   cache    [2][slots][KV][D]      the layer's paged cache (keys, then values)
 *   slots    [total context] int64  each sequence's cache slots in order, concatenated
 *   starts   [B + 1] int64          sequence b's slots are slots[starts[b] .. starts[b+1])
 *   window   attend to the last `window` tokens only (0: all)
 *   out      [B][H][D]
 * Heads share key/value heads in groups of H / KV (grouped-query attention).
 *   scores   [threads][longest context] scratch, a row per thread of the team */
static void attention_team(const float *q, const float *cache, int64_t num_slots,
                           const int64_t *slots, const int64_t *starts, int64_t B, int64_t H,
                           int64_t KV, int64_t D, float scale, int64_t window, float *out,
                           float *scores_all, int64_t longest) {
    const float *values = cache + num_slots * KV * D;
    const int64_t group = H / KV;
    float *scores = scores_all + (int64_t)omp_get_thread_num() * longest;
#pragma omp for schedule(dynamic, 1) collapse(2)
    for (int64_t b = 0; b < B; b++) {
        for (int64_t h = 0; h < H; h++) {
            int64_t first = starts[b], len = starts[b + 1] - starts[b];
            if (window > 0 && len > window) first += len - window, len = window;
            const int64_t kvh = h / group;
            const float *qh = q + (b * H + h) * D;
            float best = -INFINITY;
            for (int64_t t = 0; t < len; t++) {
                const float *k = cache + (slots[first + t] * KV + kvh) * D;
                float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
                for (int64_t i = 0; i < D; i++) dot += qh[i] * k[i];
                scores[t] = dot * scale;
                if (scores[t] > best) best = scores[t];
            }
            float total = 0.0f;
#pragma omp simd reduction(+ : total)
            for (int64_t t = 0; t < len; t++) {
                scores[t] = expf(scores[t] - best);
                total += scores[t];
            }
            float *o = out + (b * H + h) * D;
            for (int64_t i = 0; i < D; i++) o[i] = 0.0f;
            for (int64_t t = 0; t < len; t++) {
                const float p = scores[t] / total;
                const float *v = values + (slots[first + t] * KV + kvh) * D;
                for (int64_t i = 0; i < D; i++) o[i] += p * v[i];
            }
        }
    }
}

int kiln_decode_attention(const float *q, const float *cache, int64_t num_slots,
                          const int64_t *slots, const int64_t *starts, int64_t B, int64_t H,
                          int64_t KV, int64_t D, float scale, int64_t window, float *out,
                          int threads) {
    const int64_t longest = longest_context(starts, B);
    float *scores = malloc(sizeof(float) * (size_t)(longest * threads));
    if (!scores) return -1;
#pragma omp parallel num_threads(threads)
    attention_team(q, cache, num_slots, slots, starts, B, H, KV, D, scale, window, out, scores,
                   longest);
    free(scores);
    return 0;
}

/* Rotate the query and key heads of this step's fused q/k/v rows in place (Llama's layout: dim
 * i pairs with dim i + D/2, all D dims rotate), then write each token's keys and values to its
 * cache slot.
 *   qkv   [T][H + 2 KV][D]
 *   cos, sin  [T][D]: the tables at full width (the first half of cos and the second half of
 *         sin are the angles' cosines and sines; see RotaryEmbedding.cos_sin)
 *   slots [T] int64; cache [2][num_slots][KV][D] */
void kiln_rope_and_cache(float *qkv, int64_t T, int64_t H, int64_t KV, int64_t D,
                         const float *cos, const float *sin, const int64_t *slots, float *cache,
                         int64_t num_slots) {
    const int64_t half = D / 2, width = (H + 2 * KV) * D;
    for (int64_t t = 0; t < T; t++) {
        float *row = qkv + t * width;
        const float *c = cos + t * D, *s = sin + t * D + half;
        for (int64_t head = 0; head < H + KV; head++) {
            float *x = row + head * D;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float a = x[i], b = x[i + half];
                x[i] = a * c[i] - b * s[i];
                x[i + half] = b * c[i] + a * s[i];
            }
        }
        float *keys = cache + slots[t] * KV * D;
        float *values = cache + (num_slots + slots[t]) * KV * D;
        const float *k = row + H * D, *v = row + (H + KV) * D;
        for (int64_t i = 0; i < KV * D; i++) keys[i] = k[i], values[i] = v[i];
    }
}

/* out [T][I] = silu(gate) * up, where gate_up [T][2 I] holds gate then up (Llama's MLP). */
void kiln_silu_mul(const float *gate_up, int64_t T, int64_t I, float *out) {
    for (int64_t t = 0; t < T; t++) {
        const float *g = gate_up + t * 2 * I, *u = g + I;
        float *o = out + t * I;
#pragma omp simd
        for (int64_t i = 0; i < I; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
    }
}

/* ---- a whole decode step of a Llama model, in one call -----------------------------------
 * Python's per-op dispatch costs ~10-30 us per call, about as much as the arithmetic of one
 * decode token at SmolLM2's size; this runs every layer's nine ops (norm, q/k/v, rotary and
 * cache write, attention, o, add + norm, gate/up, silu * up, down) without returning to Python,
 * inside one parallel region. */

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

/* hidden [B][E] holds the embeddings on entry and the last layer's output on return, residual
 * [B][E] the residual stream before the final norm (the caller adds and normalises). */
int kiln_llama_decode(float *hidden, float *residual, const kiln_llama_layer *layers,
                      int64_t num_layers, float eps, int64_t B, int64_t E, int64_t H, int64_t KV,
                      int64_t D, int64_t I, const float *cos, const float *sin,
                      const int64_t *new_slots, int64_t num_slots, const int64_t *slots,
                      const int64_t *starts, float scale, int64_t window, int threads) {
    const int64_t width = (H + 2 * KV) * D;
    const int64_t widest = E > I ? (E > H * D ? E : H * D) : (I > H * D ? I : H * D);
    const int64_t longest = longest_context(starts, B);
    float *normed = malloc(sizeof(float) * (size_t)(B * E));
    float *qkv_out = malloc(sizeof(float) * (size_t)(B * width));
    float *q = malloc(sizeof(float) * (size_t)(B * H * D));
    float *attn = malloc(sizeof(float) * (size_t)(B * H * D));
    float *gu = malloc(sizeof(float) * (size_t)(B * 2 * I));
    float *act = malloc(sizeof(float) * (size_t)(B * I));
    int16_t *xq = malloc(sizeof(int16_t) * (size_t)widest);
    float *xd = malloc(sizeof(float) * (size_t)(widest / GROUP));
    float *xsum = malloc(sizeof(float) * (size_t)(widest / GROUP));
    float *scores = malloc(sizeof(float) * (size_t)(longest * threads));
    int status = -1;
    if (!normed || !qkv_out || !q || !attn || !gu || !act || !xq || !xd || !xsum || !scores)
        goto done;

#pragma omp parallel num_threads(threads)
    for (int64_t l = 0; l < num_layers; l++) {
        const kiln_llama_layer *layer = layers + l;
#pragma omp single
        {
            if (l == 0) {
                for (int64_t i = 0; i < B * E; i++) residual[i] = hidden[i];
            } else {
                for (int64_t i = 0; i < B * E; i++) residual[i] += hidden[i];
            }
            rms_norm_rows(residual, layer->norm1, B, E, eps, normed);
        }
        linear_team(layer->qkv_bits, normed, B, E, layer->qkv, width, qkv_out, xq, xd, xsum);
#pragma omp single
        {
            if (layer->qkv_bias)
                for (int64_t b = 0; b < B; b++)
                    for (int64_t i = 0; i < width; i++)
                        qkv_out[b * width + i] += layer->qkv_bias[i];
            kiln_rope_and_cache(qkv_out, B, H, KV, D, cos, sin, new_slots, layer->cache,
                                num_slots);
            for (int64_t b = 0; b < B; b++)
                for (int64_t i = 0; i < H * D; i++) q[b * H * D + i] = qkv_out[b * width + i];
        }
        attention_team(q, layer->cache, num_slots, slots, starts, B, H, KV, D, scale, window,
                       attn, scores, longest);
        linear_team(layer->o_bits, attn, B, H * D, layer->o, E, hidden, xq, xd, xsum);
#pragma omp single
        {
            for (int64_t i = 0; i < B * E; i++) residual[i] += hidden[i];
            rms_norm_rows(residual, layer->norm2, B, E, eps, normed);
        }
        linear_team(layer->gate_up_bits, normed, B, E, layer->gate_up, 2 * I, gu, xq, xd, xsum);
#pragma omp single
        kiln_silu_mul(gu, B, I, act);
        linear_team(layer->down_bits, act, B, I, layer->down, E, hidden, xq, xd, xsum);
    }
    status = 0;
done:
    free(normed), free(qkv_out), free(q), free(attn), free(gu), free(act);
    free(xq), free(xd), free(xsum), free(scores);
    return status;
}
