/* Thread pool: worker threads sleep on a condition variable between loops (no spinning, which would
 * take cores from OpenBLAS's threads); a loop's chunks are claimed through an atomic counter. */
#include <pthread.h>
#include <stdlib.h>

#include "pool.h"

typedef struct {
    Pool *pool;
    int tid;
} Worker;

struct Pool {
    int n;               /* threads, the caller included */
    pthread_t *threads;  /* (n - 1) */
    Worker *workers;     /* (n - 1) */
    pthread_mutex_t mu;
    pthread_cond_t go, done;
    unsigned long gen;   /* bumped for every loop */
    int busy;            /* workers still inside the current loop */
    int quit;
    /* the current loop */
    RangeFn fn;
    void *ctx;
    int64_t n_items, grain, next; /* next: first unclaimed item (atomic) */
};

static void run_chunks(Pool *p, int tid) {
    for (;;) {
        int64_t lo = __atomic_fetch_add(&p->next, p->grain, __ATOMIC_RELAXED);
        if (lo >= p->n_items) return;
        int64_t hi = lo + p->grain < p->n_items ? lo + p->grain : p->n_items;
        p->fn(p->ctx, lo, hi, tid);
    }
}

static void *worker_main(void *arg) {
    Worker *w = arg;
    Pool *p = w->pool;
    unsigned long seen = 0;
    pthread_mutex_lock(&p->mu);
    for (;;) {
        while (p->gen == seen && !p->quit) pthread_cond_wait(&p->go, &p->mu);
        if (p->quit) break;
        seen = p->gen;
        pthread_mutex_unlock(&p->mu);
        run_chunks(p, w->tid);
        pthread_mutex_lock(&p->mu);
        if (--p->busy == 0) pthread_cond_signal(&p->done);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

Pool *pool_new(int n) {
    if (n < 2) return NULL;
    Pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->threads = malloc(sizeof(pthread_t) * (size_t)(n - 1));
    p->workers = malloc(sizeof(Worker) * (size_t)(n - 1));
    if (!p->threads || !p->workers || pthread_mutex_init(&p->mu, NULL)) {
        free(p->threads); free(p->workers); free(p);
        return NULL;
    }
    pthread_cond_init(&p->go, NULL);
    pthread_cond_init(&p->done, NULL);
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
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n - 1; i++) pthread_join(p->threads[i], NULL);
    pthread_cond_destroy(&p->go);
    pthread_cond_destroy(&p->done);
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
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->ctx = ctx;
    p->n_items = n;
    p->grain = grain;
    p->next = 0;
    p->busy = p->n - 1;
    p->gen++;
    pthread_cond_broadcast(&p->go);
    pthread_mutex_unlock(&p->mu);
    run_chunks(p, 0);
    pthread_mutex_lock(&p->mu); /* the workers read fn and ctx: wait until every one has left the loop */
    while (p->busy) pthread_cond_wait(&p->done, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
