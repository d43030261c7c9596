/* Float32 products x [T, K] @ W[N, K].T for a weight held in column panels: W's columns n (rows of the
 * stored [N, K] matrix) in panels of 16, panel p holding W[16p .. 16p+15, k] for every k as [K][16],
 * contiguous; a last panel of fewer than 16 columns holds [K][width]. tpimpi/native/__init__.py builds
 * this file with the machine's C compiler and calls it through ctypes (tpimpi.layers.linear).
 *
 * Why: decode is a stream over the weights. Each weight vector loaded here is multiplied into every row
 * (up to 8, or 6 at a time when there are more) before the next is loaded, so a few rows cost little more
 * than one; BLAS's small-M GEMM repacks the weights on every call instead (BENCHMARKS.md). Each output
 * element is a sum over k in order, the same for any T, grouping or thread count: a row's result does not
 * depend on the rows beside it.
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <string.h>

#define NB 16 /* columns per panel */
typedef float v8 __attribute__((vector_size(32)));

/* rows x[0..R-1] (row stride ldx) times one panel wp [K][NB] -> out rows (stride ldo), `width` columns */
#define GROUP(R)                                                                                           \
    static void group##R(const float *x, size_t ldx, const float *wp, size_t K, size_t width, float *out,  \
                         size_t ldo) {                                                                     \
        v8 acc[R][2];                                                                                      \
        for (int t = 0; t < R; t++) {                                                                      \
            acc[t][0] = (v8){0};                                                                           \
            acc[t][1] = (v8){0};                                                                           \
        }                                                                                                  \
        if (width == NB) {                                                                                 \
            for (size_t k = 0; k < K; k++) {                                                               \
                v8 w0, w1;                                                                                 \
                memcpy(&w0, wp + k * NB, sizeof w0);                                                       \
                memcpy(&w1, wp + k * NB + 8, sizeof w1);                                                   \
                for (int t = 0; t < R; t++) {                                                              \
                    float xv = x[t * ldx + k];                                                             \
                    acc[t][0] += xv * w0;                                                                  \
                    acc[t][1] += xv * w1;                                                                  \
                }                                                                                          \
            }                                                                                              \
        } else { /* the last, narrower panel: [K][width] */                                                \
            for (size_t k = 0; k < K; k++) {                                                               \
                float w[NB] = {0};                                                                         \
                memcpy(w, wp + k * width, width * sizeof(float));                                          \
                v8 w0, w1;                                                                                 \
                memcpy(&w0, w, sizeof w0);                                                                 \
                memcpy(&w1, w + 8, sizeof w1);                                                             \
                for (int t = 0; t < R; t++) {                                                              \
                    float xv = x[t * ldx + k];                                                             \
                    acc[t][0] += xv * w0;                                                                  \
                    acc[t][1] += xv * w1;                                                                  \
                }                                                                                          \
            }                                                                                              \
        }                                                                                                  \
        for (int t = 0; t < R; t++) {                                                                      \
            float o[NB];                                                                                   \
            memcpy(o, &acc[t][0], sizeof acc[t][0]);                                                       \
            memcpy(o + 8, &acc[t][1], sizeof acc[t][1]);                                                   \
            memcpy(out + t * ldo, o, width * sizeof(float));                                               \
        }                                                                                                  \
    }
GROUP(1) GROUP(2) GROUP(3) GROUP(4) GROUP(5) GROUP(6) GROUP(7) GROUP(8)

typedef void (*group_fn)(const float *, size_t, const float *, size_t, size_t, float *, size_t);
static const group_fn groups[9] = {0, group1, group2, group3, group4, group5, group6, group7, group8};

struct job {
    const float *x, *wp;
    size_t T, K, ldx, N, ldo, p0, p1;
    float *out;
};

/* panels p0..p1-1: up to 8 rows in one pass over a panel (a few accumulators spill, but the weights
 * stream once), up to 16 in two passes; more 6 at a time, which keeps every accumulator in a register
 * (16 AVX2 registers) and is as fast as BLAS for long prompts (BENCHMARKS.md) */
static void *run(void *arg) {
    const struct job *j = arg;
    size_t rows = j->T <= 8 ? j->T : j->T <= 16 ? (j->T + 1) / 2 : 6;
    for (size_t p = j->p0; p < j->p1; p++) {
        size_t c0 = p * NB, width = j->N - c0 < NB ? j->N - c0 : NB;
        const float *wp = j->wp + c0 * j->K;
        for (size_t t = 0; t < j->T; t += rows) {
            size_t R = j->T - t < rows ? j->T - t : rows;
            groups[R](j->x + t * j->ldx, j->ldx, wp, j->K, width, j->out + t * j->ldo + c0, j->ldo);
        }
    }
    return NULL;
}

#define MAX_THREADS 64
#define SPIN 20000 /* polls of a waiting thread before it sleeps: products come back to back in a step */

/* A pool of threads kept between calls (starting a thread per call cost more than a small product). The
 * caller posts one job per thread and bumps `generation`; each worker runs its job and counts down
 * `pending`. Waiting is a short spin, then a condition variable. */
static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t posted = PTHREAD_COND_INITIALIZER, finished = PTHREAD_COND_INITIALIZER;
static struct job jobs[MAX_THREADS];
static _Atomic unsigned long generation;
static _Atomic int pending, active; /* jobs not done this generation; workers given a job this generation */
static int workers;                 /* threads started, job slots 1..workers */
static unsigned long born[MAX_THREADS]; /* the generation before each worker's first job */

static void *worker(void *arg) {
    int me = (int)(size_t)arg;
    unsigned long seen = born[me];
    for (;;) {
        for (int i = 0; i < SPIN && atomic_load(&generation) == seen; i++) __asm__ __volatile__("" ::: "memory");
        if (atomic_load(&generation) == seen) {
            pthread_mutex_lock(&lock);
            while (atomic_load(&generation) == seen) pthread_cond_wait(&posted, &lock);
            pthread_mutex_unlock(&lock);
        }
        seen = atomic_load(&generation);
        if (me < atomic_load(&active)) {
            run(&jobs[me]);
            if (atomic_fetch_sub(&pending, 1) == 1) {
                pthread_mutex_lock(&lock);
                pthread_cond_signal(&finished);
                pthread_mutex_unlock(&lock);
            }
        }
    }
    return NULL;
}

static void forget_workers(void) { workers = 0; } /* a forked child has none of its parent's threads */

/* out [T, ldo] <- x [T, ldx] @ W.T for the panels wp of W [N, K]; the panels split among `threads`
 * threads (this one and threads-1 of the pool). Callers on several threads at once (ranks run as threads
 * in the tests) are safe: while one holds the pool, the others multiply on their own thread. Returns the
 * number of threads used. */
int tpimpi_panels_mm(const float *x, size_t T, size_t K, size_t ldx, const float *wp, size_t N, float *out,
                     size_t ldo, int threads) {
    static pthread_mutex_t caller = PTHREAD_MUTEX_INITIALIZER;
    static int atfork;
    size_t P = (N + NB - 1) / NB;
    if (threads > MAX_THREADS) threads = MAX_THREADS;
    if ((size_t)threads > P) threads = (int)P;
    if (threads <= 1 || pthread_mutex_trylock(&caller) != 0) {
        struct job alone = {x, wp, T, K, ldx, N, ldo, 0, P, out};
        run(&alone);
        return 1;
    }
    if (!atfork) atfork = pthread_atfork(NULL, NULL, forget_workers) == 0;
    while (workers < threads - 1) { /* start what is missing; run with fewer if the system refuses */
        pthread_t tid;
        born[workers + 1] = atomic_load(&generation);
        if (pthread_create(&tid, NULL, worker, (void *)(size_t)(workers + 1)) != 0) break;
        pthread_detach(tid);
        workers++;
    }
    if (threads > workers + 1) threads = workers + 1;
    for (int i = 0; i < threads; i++)
        jobs[i] = (struct job){x, wp, T, K, ldx, N, ldo, P * i / threads, P * (i + 1) / threads, out};
    if (threads > 1) {
        atomic_store(&pending, threads - 1);
        atomic_store(&active, threads);
        pthread_mutex_lock(&lock);
        atomic_fetch_add(&generation, 1);
        pthread_cond_broadcast(&posted);
        pthread_mutex_unlock(&lock);
    }
    run(&jobs[0]);
    if (threads > 1) {
        for (int i = 0; i < SPIN && atomic_load(&pending) > 0; i++) __asm__ __volatile__("" ::: "memory");
        if (atomic_load(&pending) > 0) {
            pthread_mutex_lock(&lock);
            while (atomic_load(&pending) > 0) pthread_cond_wait(&finished, &lock);
            pthread_mutex_unlock(&lock);
        }
    }
    pthread_mutex_unlock(&caller);
    return threads;
}
