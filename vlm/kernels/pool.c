/* Thread pool (see pool.h).
 *
 * A job is published as one 64-bit ticket: generation << 32 | units still to claim. A
 * thread claims a unit by decrementing the ticket with a CAS, so a successful claim also
 * proves the job it read is still the current one (the caller cannot publish the next job
 * before every unit of this one is done). The caller counts finished units, never
 * workers, so a worker that wakes late finds nothing left and delays nobody.
 */
#define _GNU_SOURCE
#include "pool.h"

#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

/* How long an idle worker spins before sleeping: longer than the gaps between the kernel
 * calls of one decode step, so the pool stays awake while a model runs. */
#define SPIN_NS 300000
/* Pauses the caller spins waiting for the other threads' last units before yielding. */
#define WAIT_SPINS 2000
/* A job whose caller waited this long, and more than two of its own units' time, for a
 * worker's last unit had a worker preempted mid-unit. Two such stalls within STALL_WINDOW_NS
 * mean a machine shared with other processes, where every call risks a scheduler time slice
 * of delay and one thread is faster: jobs then run on the caller alone for BACKOFF_NS, and
 * threads are tried again. A lone stall is a virtual machine's hiccup (0.1-0.7 ms, about one
 * per 512-token prefill on a quiet 2-vCPU VM): backing off on each made the prefill's median
 * 4% slower. */
#define STALL_NS 100000
#define STALL_WINDOW_NS 10000000
#define BACKOFF_NS 50000000

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static struct {
    /* written by every thread: kept on their own cache lines */
    uint64_t ticket __attribute__((aligned(64)));
    int done __attribute__((aligned(64)));
    /* the job, written by the caller before it publishes the ticket */
    vlm_task fn __attribute__((aligned(64)));
    void *ctx;
    int units;
    int want;    /* threads requested, the caller included */
    int running; /* workers alive */
    int started; /* workers for `want` have been created */
    int sleepers;
    int quit;
    uint64_t alone_until; /* run jobs on the caller alone until this time (see STALL_NS) */
    uint64_t last_stall;  /* when the last stall was seen (see STALL_WINDOW_NS) */
    pthread_t *workers;
    pthread_mutex_t mu; /* guards sleeping and waking */
    pthread_cond_t cv;
    pthread_mutex_t call_mu; /* one job at a time */
} pool = {.want = 1, .mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER,
          .call_mu = PTHREAD_MUTEX_INITIALIZER};

/* Claim one unit of the current job: its index, or -1 with *seen set to the empty ticket. */
static int claim(uint64_t *seen) {
    uint64_t t = __atomic_load_n(&pool.ticket, __ATOMIC_ACQUIRE);
    while ((uint32_t)t) {
        if (__atomic_compare_exchange_n(&pool.ticket, &t, t - 1, 1, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
            return pool.units - (int)(uint32_t)t;
    }
    *seen = t;
    return -1;
}

/* Run units until none is left; returns the empty ticket seen last, *ran the units run. */
static uint64_t work(int *ran) {
    uint64_t seen = 0;
    int u;
    *ran = 0;
    while ((u = claim(&seen)) >= 0) {
        pool.fn(pool.ctx, u);
        __atomic_add_fetch(&pool.done, 1, __ATOMIC_RELEASE);
        ++*ran;
    }
    return seen;
}

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Wait until the ticket differs from `seen`; 0 when told to quit. */
static int wait_for_job(uint64_t seen) {
    const uint64_t until = now_ns() + SPIN_NS;
    for (unsigned i = 1;; i++) {
        if (__atomic_load_n(&pool.ticket, __ATOMIC_ACQUIRE) != seen) return 1;
        if (__atomic_load_n(&pool.quit, __ATOMIC_ACQUIRE)) return 0;
        cpu_relax();
        if (i % 256 == 0 && now_ns() > until) break;
    }
    pthread_mutex_lock(&pool.mu);
    /* seq_cst pairs with the caller's seq_cst ticket store and sleepers load: either the
     * caller sees this sleeper and signals, or this load sees the new ticket. */
    __atomic_add_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
    while (__atomic_load_n(&pool.ticket, __ATOMIC_SEQ_CST) == seen && !pool.quit)
        pthread_cond_wait(&pool.cv, &pool.mu);
    __atomic_sub_fetch(&pool.sleepers, 1, __ATOMIC_SEQ_CST);
    const int quit = pool.quit;
    pthread_mutex_unlock(&pool.mu);
    return !quit;
}

static void *worker_main(void *arg) {
    int ran;
    (void)arg;
    while (wait_for_job(work(&ran))) {
    }
    return NULL;
}

static void stop_workers(void) {
    pthread_mutex_lock(&pool.mu);
    __atomic_store_n(&pool.quit, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 0; i < pool.running; i++) pthread_join(pool.workers[i], NULL);
    free(pool.workers);
    pool.workers = NULL;
    pool.running = 0;
    pool.quit = 0;
    pool.started = 0;
}

static void start_workers(void) {
    pool.workers = calloc((size_t)pool.want, sizeof(pthread_t));
    if (!pool.workers) return;
    while (pool.running < pool.want - 1 && !pthread_create(&pool.workers[pool.running], NULL, worker_main, NULL))
        pool.running++;
    pool.started = 1;
}

/* A forked child has only the forking thread: forget the parent's workers (they do not
 * exist there) and let the next job start new ones. */
static void after_fork_child(void) {
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&pool.call_mu, NULL);
    pool.workers = NULL;
    pool.running = 0;
    pool.started = 0;
    pool.sleepers = 0;
    pool.ticket &= ~(uint64_t)0xffffffffu;
    pool.quit = 0;
}

static pthread_once_t atfork_once = PTHREAD_ONCE_INIT;
static void register_atfork(void) { pthread_atfork(NULL, NULL, after_fork_child); }

void vlm_pool_set_threads(int n) {
    pthread_once(&atfork_once, register_atfork);
    pthread_mutex_lock(&pool.call_mu);
    if (n < 1) n = 1;
    if (n != pool.want) {
        stop_workers();
        pool.want = n;
    }
    pthread_mutex_unlock(&pool.call_mu);
}

int vlm_pool_threads(void) { return pool.want; }

void vlm_pool_run(vlm_task fn, void *ctx, int units) {
    if (units <= 0) return;
    const uint64_t start = now_ns();
    const int alone = start < __atomic_load_n(&pool.alone_until, __ATOMIC_RELAXED);
    if (units == 1 || pool.want == 1 || alone || pthread_mutex_trylock(&pool.call_mu)) {
        for (int u = 0; u < units; u++) fn(ctx, u);
        return;
    }
    if (!pool.started) start_workers();
    pool.fn = fn;
    pool.ctx = ctx;
    pool.units = units;
    __atomic_store_n(&pool.done, 0, __ATOMIC_RELAXED);
    const uint64_t gen = (__atomic_load_n(&pool.ticket, __ATOMIC_RELAXED) >> 32) + 1;
    __atomic_store_n(&pool.ticket, gen << 32 | (uint32_t)units, __ATOMIC_SEQ_CST);
    if (__atomic_load_n(&pool.sleepers, __ATOMIC_SEQ_CST)) {
        pthread_mutex_lock(&pool.mu);
        pthread_cond_broadcast(&pool.cv);
        pthread_mutex_unlock(&pool.mu);
    }
    int ran;
    work(&ran);
    const uint64_t own = now_ns();
    /* The last units finish within microseconds unless their thread was preempted: then
     * yield the core instead of spinning against it. */
    for (unsigned i = 1; __atomic_load_n(&pool.done, __ATOMIC_ACQUIRE) != units; i++) {
        if (i < WAIT_SPINS)
            cpu_relax();
        else
            sched_yield();
    }
    const uint64_t waited = now_ns() - own;
    if (waited > STALL_NS && (ran == 0 || waited > 2 * (own - start) / ran)) {
        if (own - pool.last_stall < STALL_WINDOW_NS)
            __atomic_store_n(&pool.alone_until, own + BACKOFF_NS, __ATOMIC_RELAXED);
        pool.last_stall = own;
    }
    pthread_mutex_unlock(&pool.call_mu);
}
