/* Thread pool: a loop's chunks are claimed one at a time through one atomic word (the loop's generation
 * and its next chunk), by the caller and by whichever workers are awake, so a worker that is descheduled
 * or slow to wake delays at most the one chunk it holds; the caller waits for chunks, never for workers.
 * Idle workers spin for a few microseconds (a forward pass issues loops back to back), then sleep on a
 * condition variable (no long spinning: it would take the core from OpenBLAS or another process).
 *
 * state = generation << 32 | next chunk. An even generation is an open loop, an odd one is closed while
 * the caller rewrites the loop's fields; a worker's claim is a compare-and-swap on state, so it fails
 * when the loop it read the fields of is no longer the open one. */
#define _POSIX_C_SOURCE 200809L
#include <pthread.h>
#include <stdlib.h>
#include <time.h>

#include "pool.h"

#ifndef SPIN_NS
#define SPIN_NS 5000 /* idle spin before sleeping */
#endif

typedef struct {
    Pool *pool;
    int tid;
} Worker;

struct Pool {
    int n;               /* threads, the caller included */
    pthread_t *threads;  /* (n - 1) */
    Worker *workers;     /* (n - 1) */
    pthread_mutex_t mu;
    pthread_cond_t wake;     /* workers: the generation changed (or quit) */
    pthread_cond_t finished; /* caller: the last chunk is done */
    int quit;                /* under mu */
    uint64_t state;          /* atomic: generation << 32 | next chunk */
    int64_t done;            /* atomic: chunks finished in the open loop */
    /* the loop, written while it is closed (atomic accesses: a stale worker may read them meanwhile) */
    RangeFn fn;
    void *ctx;
    int64_t n_items, grain, n_chunks;
};

typedef struct {
    RangeFn fn;
    void *ctx;
    int64_t lo, hi, n_chunks;
} Chunk;

#define LOAD(x) __atomic_load_n(&(x), __ATOMIC_ACQUIRE)
#define STORE(x, v) __atomic_store_n(&(x), (v), __ATOMIC_RELEASE)

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static int64_t now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* claims the next chunk of the open loop into *c; 0 when the loop is closed or has no chunk left */
static int claim(Pool *p, Chunk *c) {
    uint64_t s = LOAD(p->state);
    for (;;) {
        if ((s >> 32) & 1) return 0;
        RangeFn fn = LOAD(p->fn);
        void *ctx = LOAD(p->ctx);
        int64_t n = LOAD(p->n_items), grain = LOAD(p->grain), n_chunks = LOAD(p->n_chunks);
        int64_t next = (int64_t)(uint32_t)s;
        if (next >= n_chunks) return 0;
        if (__atomic_compare_exchange_n(&p->state, &s, s + 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            *c = (Chunk){fn, ctx, next * grain, next * grain + grain < n ? next * grain + grain : n, n_chunks};
            return 1;
        }
    }
}

/* runs chunks until none is left; the worker finishing a loop's last chunk wakes the caller */
static void run_chunks(Pool *p, int tid) {
    Chunk c;
    while (claim(p, &c)) {
        c.fn(c.ctx, c.lo, c.hi, tid);
        if (__atomic_add_fetch(&p->done, 1, __ATOMIC_ACQ_REL) == c.n_chunks && tid != 0) {
            pthread_mutex_lock(&p->mu);
            pthread_cond_signal(&p->finished);
            pthread_mutex_unlock(&p->mu);
        }
    }
}

static uint32_t generation(Pool *p) { return (uint32_t)(LOAD(p->state) >> 32); }

static void *worker_main(void *arg) {
    Worker *w = arg;
    Pool *p = w->pool;
    for (;;) {
        uint32_t seen = generation(p);
        run_chunks(p, w->tid);
        if (generation(p) != seen) continue;
        int64_t t0 = now_ns();
        for (int i = 1; generation(p) == seen; i++) {
            cpu_relax();
            if (i % 64 == 0 && now_ns() - t0 > SPIN_NS) break;
        }
        pthread_mutex_lock(&p->mu);
        while (generation(p) == seen && !p->quit) pthread_cond_wait(&p->wake, &p->mu);
        int quit = p->quit;
        pthread_mutex_unlock(&p->mu);
        if (quit) return NULL;
    }
}

Pool *pool_new(int n) {
    if (n < 2) return NULL;
    Pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->threads = malloc(sizeof(pthread_t) * (size_t)(n - 1));
    p->workers = malloc(sizeof(Worker) * (size_t)(n - 1));
    if (!p->threads || !p->workers || pthread_mutex_init(&p->mu, NULL)) {
        free(p->threads);
        free(p->workers);
        free(p);
        return NULL;
    }
    pthread_cond_init(&p->wake, NULL);
    pthread_cond_init(&p->finished, NULL);
    p->state = 1ull << 32; /* closed, no loop yet */
    p->n = 1;
    for (int i = 0; i < n - 1; i++) {
        p->workers[i] = (Worker){p, i + 1};
        if (pthread_create(&p->threads[i], NULL, worker_main, &p->workers[i])) break;
        p->n++;
    }
    if (p->n < 2) {
        pool_free(p);
        return NULL;
    }
    return p;
}

void pool_free(Pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->quit = 1;
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n - 1; i++) pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->wake);
    pthread_cond_destroy(&p->finished);
    pthread_mutex_destroy(&p->mu);
    free(p->threads);
    free(p->workers);
    free(p);
}

int pool_threads(const Pool *p) { return p ? p->n : 1; }

void pool_for(Pool *p, int64_t n, int64_t grain, RangeFn fn, void *ctx) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    if (!p || n <= grain) {
        fn(ctx, 0, n, 0);
        return;
    }
    if ((n + grain - 1) / grain > 0x7fffffff) grain = (n + 0x7ffffffe) / 0x7fffffff; /* chunk index: 31 bits */
    int64_t n_chunks = (n + grain - 1) / grain;
    uint32_t gen = (uint32_t)(LOAD(p->state) >> 32) | 1; /* closed now, or the drained open loop + 1 */
    __atomic_store_n(&p->state, (uint64_t)gen << 32, __ATOMIC_SEQ_CST); /* close: stale claims fail */
    STORE(p->fn, fn);
    STORE(p->ctx, ctx);
    STORE(p->n_items, n);
    STORE(p->grain, grain);
    STORE(p->n_chunks, n_chunks);
    STORE(p->done, 0);
    STORE(p->state, (uint64_t)(gen + 1) << 32); /* open: generation gen + 1 (even), chunk 0 */
    pthread_mutex_lock(&p->mu);
    pthread_cond_broadcast(&p->wake);
    pthread_mutex_unlock(&p->mu);
    run_chunks(p, 0);
    /* chunks still held by workers: spin briefly, then sleep until the last one signals */
    int64_t t0 = now_ns();
    for (int i = 1; LOAD(p->done) < n_chunks; i++) {
        cpu_relax();
        if (i % 64 == 0 && now_ns() - t0 > SPIN_NS) break;
    }
    pthread_mutex_lock(&p->mu);
    while (LOAD(p->done) < n_chunks) pthread_cond_wait(&p->finished, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
