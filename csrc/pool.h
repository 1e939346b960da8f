/* A small thread pool for the loops between matrix products (norms, activations, rotary embeddings,
 * residual adds, attention of short sequences). One pool per forward call: no global state. */
#ifndef FACTRACE_POOL_H
#define FACTRACE_POOL_H
#include <stdint.h>

/* fn(ctx, lo, hi, tid): process items lo .. hi-1 on thread tid (0 = the caller, < pool_threads) */
typedef void (*RangeFn)(void *ctx, int64_t lo, int64_t hi, int tid);
typedef struct Pool Pool;

/* A pool of n threads (the caller and n - 1 workers); NULL when n < 2 or no thread can be started
 * (every pool_* function accepts NULL and then runs serially on the caller). */
Pool *pool_new(int n);
void pool_free(Pool *p);
int pool_threads(const Pool *p);

/* Runs fn over items 0 .. n-1 in chunks of `grain` items handed out in order to whichever thread is
 * free; returns when all are done. Runs fn(ctx, 0, n, 0) directly when n <= grain or p is NULL. */
void pool_for(Pool *p, int64_t n, int64_t grain, RangeFn fn, void *ctx);
#endif
