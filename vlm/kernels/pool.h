/* A persistent thread pool: workers are created once and wait for jobs, spinning briefly
 * (decode issues a kernel call every few microseconds) before sleeping on a condvar. */
#ifndef VLM_POOL_H
#define VLM_POOL_H

typedef void (*vlm_task)(void *ctx, int unit);

/* Total threads used by a job, the calling thread included (>= 1). Takes effect on the
 * next job; must not be called while a job runs. */
void vlm_pool_set_threads(int n);
int vlm_pool_threads(void);

/* Run fn(ctx, u) for u in [0, units) on the pool and the calling thread; returns when all
 * are done. Units are claimed dynamically, so a descheduled worker delays no one. A call
 * made while another thread's job is running runs its units inline. */
void vlm_pool_run(vlm_task fn, void *ctx, int units);

#endif
