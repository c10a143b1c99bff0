// Byte-level BPE merging for kiln's compiled tokenizers (kiln/text/compiled_tokenizer.py).
//
// Why this exists: parsing a 49k-token tokenizer.json with `tokenizers` takes 60-100 ms and
// holds the GIL, the largest part of an exported model's warm start. An artifact stores its
// tokenizer's merges as arrays instead; this file builds the pair table from them in about a
// millisecond and merges each pre-tokenized piece the way `tokenizers`' BPE model does, so the
// ids are the same: a min-heap of candidate merges ordered by (rank, position), an entry
// skipped when the pair at its position no longer merges into the entry's token.
//
// Pre-tokenization, added tokens and post-processing stay with `tokenizers` (cheap to load
// without the vocabulary); only the model's merging is here.

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    uint64_t *keys;   // (left << 32 | right) + 1; 0 marks an empty slot
    int32_t *ranks;
    int32_t *merged;
    uint64_t mask;
    int32_t byte_ids[256];  // -1: a byte with no token of its own
    int32_t unk_id;         // what such a byte becomes; -1: nothing (it is dropped)
    int32_t fuse_unk;       // a run of such bytes becomes one unk_id
} kiln_bpe;

static uint64_t slot_of(uint64_t key, uint64_t mask) {
    return (key * 0x9E3779B97F4A7C15ull >> 17) & mask;
}

static int lookup(const kiln_bpe *bpe, int32_t left, int32_t right, int32_t *rank,
                  int32_t *merged) {
    uint64_t key = ((uint64_t)(uint32_t)left << 32 | (uint32_t)right) + 1;
    for (uint64_t s = slot_of(key, bpe->mask);; s = (s + 1) & bpe->mask) {
        if (bpe->keys[s] == key) {
            *rank = bpe->ranks[s];
            *merged = bpe->merged[s];
            return 1;
        }
        if (bpe->keys[s] == 0) return 0;
    }
}

void kiln_bpe_free(kiln_bpe *bpe) {
    if (bpe == NULL) return;
    free(bpe->keys);
    free(bpe->ranks);
    free(bpe->merged);
    free(bpe);
}

// merges: [count, 3] (left id, right id, merged id), in rank order; a pair listed twice keeps
// its last rank, as `tokenizers` does. byte_ids: the token of each single byte (-1: none),
// unk_id and fuse_unk: what becomes of a byte with none, as in `tokenizers`' BPE.
kiln_bpe *kiln_bpe_new(const int32_t *merges, int64_t count, const int32_t *byte_ids,
                       int32_t unk_id, int32_t fuse_unk) {
    kiln_bpe *bpe = calloc(1, sizeof(kiln_bpe));
    if (bpe == NULL) return NULL;
    uint64_t size = 16;
    while (size < (uint64_t)count * 2) size <<= 1;
    bpe->mask = size - 1;
    bpe->keys = calloc(size, sizeof(uint64_t));
    bpe->ranks = malloc(size * sizeof(int32_t));
    bpe->merged = malloc(size * sizeof(int32_t));
    if (bpe->keys == NULL || bpe->ranks == NULL || bpe->merged == NULL) {
        kiln_bpe_free(bpe);
        return NULL;
    }
    memcpy(bpe->byte_ids, byte_ids, sizeof(bpe->byte_ids));
    bpe->unk_id = unk_id;
    bpe->fuse_unk = fuse_unk;
    for (int64_t i = 0; i < count; i++) {
        const int32_t *m = merges + 3 * i;
        uint64_t key = ((uint64_t)(uint32_t)m[0] << 32 | (uint32_t)m[1]) + 1;
        uint64_t s = slot_of(key, bpe->mask);
        while (bpe->keys[s] != 0 && bpe->keys[s] != key) s = (s + 1) & bpe->mask;
        bpe->keys[s] = key;
        bpe->ranks[s] = (int32_t)i;
        bpe->merged[s] = m[2];
    }
    return bpe;
}

typedef struct {
    int32_t rank, pos, merged;
} candidate;

static int before(candidate a, candidate b) {
    return a.rank != b.rank ? a.rank < b.rank : a.pos < b.pos;
}

static void push(candidate *heap, int64_t *size, candidate c) {
    int64_t i = (*size)++;
    while (i > 0) {
        int64_t parent = (i - 1) / 2;
        if (!before(c, heap[parent])) break;
        heap[i] = heap[parent];
        i = parent;
    }
    heap[i] = c;
}

static candidate pop(candidate *heap, int64_t *size) {
    candidate top = heap[0], last = heap[--(*size)];
    int64_t i = 0;
    for (;;) {
        int64_t child = 2 * i + 1;
        if (child >= *size) break;
        if (child + 1 < *size && before(heap[child + 1], heap[child])) child++;
        if (!before(heap[child], last)) break;
        heap[i] = heap[child];
        i = child;
    }
    heap[i] = last;
    return top;
}

// Pushes the merge of the symbols at `left` and `right`, if their pair merges.
static void offer(const kiln_bpe *bpe, const int32_t *id, candidate *heap, int64_t *size,
                  int32_t left, int32_t right) {
    candidate c;
    if (lookup(bpe, id[left], id[right], &c.rank, &c.merged)) {
        c.pos = left;
        push(heap, size, c);
    }
}

// Merges one piece of `length` bytes into `out`; returns the number of ids. `scratch` holds
// 4 * length int32s (ids, links, alive flags), `heap` up to 3 * length candidates.
static int64_t merge_piece(const kiln_bpe *bpe, const uint8_t *bytes, int32_t length,
                           int32_t *out, int32_t *scratch, candidate *heap) {
    int32_t *id = scratch, *prev = scratch + length, *next = scratch + 2 * length;
    int32_t *alive = scratch + 3 * length;
    int64_t size = 0;
    int32_t symbols = 0, unknown_before = 0;
    for (int32_t i = 0; i < length; i++) {
        int32_t token = bpe->byte_ids[bytes[i]];
        int unknown = token < 0;
        if (unknown) {
            token = bpe->unk_id;
            if (token < 0 || (bpe->fuse_unk && unknown_before)) continue;
        }
        unknown_before = unknown;
        id[symbols++] = token;
    }
    if (symbols == 0) return 0;
    for (int32_t i = 0; i < symbols; i++) {
        prev[i] = i - 1;
        next[i] = i + 1 < symbols ? i + 1 : -1;
        alive[i] = 1;
    }
    for (int32_t i = 0; i + 1 < symbols; i++) offer(bpe, id, heap, &size, i, i + 1);
    while (size > 0) {
        candidate top = pop(heap, &size);
        int32_t pos = top.pos;
        if (!alive[pos] || next[pos] < 0) continue;
        int32_t right = next[pos], rank, merged;
        // A stale entry: the pair here changed since it was pushed.
        if (!lookup(bpe, id[pos], id[right], &rank, &merged) || merged != top.merged) continue;
        id[pos] = top.merged;
        alive[right] = 0;
        next[pos] = next[right];
        if (next[pos] >= 0) prev[next[pos]] = pos;
        if (prev[pos] >= 0) offer(bpe, id, heap, &size, prev[pos], pos);
        if (next[pos] >= 0) offer(bpe, id, heap, &size, pos, next[pos]);
    }
    int64_t count = 0;
    for (int32_t i = 0; i >= 0; i = next[i]) out[count++] = id[i];
    return count;
}

// Merges each of `count` pieces of `bytes` (piece i is bytes[spans[2i]:spans[2i + 1]], the
// pieces in order and apart) into `out`, which holds as many ids as the pieces have bytes (a
// piece never gives more ids than bytes), and the number of ids of piece i into counts[i].
// Returns the number of ids, or -1 when out of memory.
int64_t kiln_bpe_encode(const kiln_bpe *bpe, const uint8_t *bytes, const int64_t *spans,
                        int64_t count, int32_t *out, int64_t *counts) {
    int64_t longest = 0;
    for (int64_t i = 0; i < count; i++)
        if (spans[2 * i + 1] - spans[2 * i] > longest) longest = spans[2 * i + 1] - spans[2 * i];
    if (longest == 0) {
        memset(counts, 0, count * sizeof(int64_t));
        return 0;
    }
    int32_t *scratch = malloc(4 * longest * sizeof(int32_t));
    // Each merge pushes at most two candidates and there are fewer merges than bytes.
    candidate *heap = malloc(3 * longest * sizeof(candidate));
    if (scratch == NULL || heap == NULL) {
        free(scratch);
        free(heap);
        return -1;
    }
    int64_t written = 0;
    for (int64_t i = 0; i < count; i++) {
        int32_t length = (int32_t)(spans[2 * i + 1] - spans[2 * i]);
        counts[i] = length > 0 ? merge_piece(bpe, bytes + spans[2 * i], length, out + written,
                                             scratch, heap)
                               : 0;
        written += counts[i];
    }
    free(scratch);
    free(heap);
    return written;
}
