/*
 * aio_threads.c - aio=threads: a pool of pthreads doing the system calls.
 *
 * Requests wait in a ring of slots; idle workers take them, run them with
 * aio_execute() and put them on the done ring; the first completion into an
 * empty done ring writes the notifier (the reaper drains the whole ring, so
 * one wake-up covers a batch). Workers are started on demand, up to
 * THREADS_MAX_WORKERS, when more work waits than workers are idle (a worker
 * blocks in its system call, so queue depth N needs N workers).
 * (Included by aio.c.)
 */

#define THREADS_MAX_WORKERS 64  /* QEMU's thread pool holds as many */

struct threads_slot {
    struct pykvm_aio_req req;
    int64_t result;
};

struct threads_engine {
    pthread_mutex_t lock;
    pthread_cond_t work_cond;
    struct threads_slot *slots;     /* depth of them */
    uint32_t *free_slots;           /* stack of free slot indices (submitter only) */
    uint32_t nfree;
    uint32_t *work;                 /* ring of slot indices waiting for a worker */
    uint32_t work_head, work_count;
    uint32_t *done;                 /* ring of finished slot indices */
    uint32_t done_head, done_count; /* done_count is also read without the lock (ready) */
    pthread_t workers[THREADS_MAX_WORKERS];
    uint32_t nworkers, idle;
    int stopping;
};

/* idle counts the workers not running a request (waiting, or about to). */
static void *threads_worker(void *arg)
{
    struct pykvm_aio *aio = arg;
    struct threads_engine *t = aio->priv;

    pthread_mutex_lock(&t->lock);
    for (;;) {
        uint32_t slot;
        int was_empty;

        while (!t->work_count && !t->stopping)
            pthread_cond_wait(&t->work_cond, &t->lock);
        if (!t->work_count)
            break;  /* stopping, and nothing left to do */
        slot = t->work[t->work_head];
        t->work_head = (t->work_head + 1) % aio->depth;
        t->work_count--;
        t->idle--;
        pthread_mutex_unlock(&t->lock);

        t->slots[slot].result = aio_execute(&t->slots[slot].req);

        pthread_mutex_lock(&t->lock);
        t->idle++;
        t->done[(t->done_head + t->done_count) % aio->depth] = slot;
        was_empty = t->done_count == 0;
        __atomic_store_n(&t->done_count, t->done_count + 1, __ATOMIC_RELEASE);
        if (was_empty)
            eventfd_write(aio->notifier, 1);
    }
    pthread_mutex_unlock(&t->lock);
    return NULL;
}

/* Start workers while more requests wait than workers are idle; caller holds the lock. */
static int threads_start_worker(struct pykvm_aio *aio, struct threads_engine *t)
{
    sigset_t all, old;
    int rc;

    /* workers take no signals: Python's handlers run in the main thread */
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &old);
    rc = pthread_create(&t->workers[t->nworkers], NULL, threads_worker, aio);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc)
        return -1;
    t->nworkers++;
    t->idle++;
    return 0;
}

static void threads_spawn(struct pykvm_aio *aio, struct threads_engine *t)
{
    while (t->work_count > t->idle && t->nworkers < THREADS_MAX_WORKERS)
        if (threads_start_worker(aio, t) < 0)
            return;  /* the running workers will get to it */
}

static int threads_init(struct pykvm_aio *aio, char *err, size_t errlen)
{
    struct threads_engine *t = calloc(1, sizeof(*t));
    uint32_t depth = aio->depth;
    int rc;

    if (!t)
        goto nomem;
    t->slots = calloc(depth, sizeof(*t->slots));
    t->free_slots = calloc(depth, sizeof(uint32_t));
    t->work = calloc(depth, sizeof(uint32_t));
    t->done = calloc(depth, sizeof(uint32_t));
    if (!t->slots || !t->free_slots || !t->work || !t->done)
        goto nomem;
    for (uint32_t i = 0; i < depth; i++)
        t->free_slots[i] = depth - 1 - i;
    t->nfree = depth;
    pthread_mutex_init(&t->lock, NULL);
    pthread_cond_init(&t->work_cond, NULL);
    aio->priv = t;
    /* one worker from the start, so that submitted work always has one */
    pthread_mutex_lock(&t->lock);
    rc = threads_start_worker(aio, t);
    pthread_mutex_unlock(&t->lock);
    if (rc < 0) {
        snprintf(err, errlen, "aio=threads: cannot start a thread");
        pthread_mutex_destroy(&t->lock);
        pthread_cond_destroy(&t->work_cond);
        aio->priv = NULL;
        goto nomem_free;
    }
    return 0;
nomem:
    snprintf(err, errlen, "aio=threads: out of memory");
nomem_free:
    if (t) {
        free(t->slots);
        free(t->free_slots);
        free(t->work);
        free(t->done);
        free(t);
    }
    return -1;
}

static int threads_submit(struct pykvm_aio *aio, const struct pykvm_aio_req *reqs, uint32_t n)
{
    struct threads_engine *t = aio->priv;
    uint32_t taken = 0;

    pthread_mutex_lock(&t->lock);
    for (; taken < n && t->nfree; taken++) {
        uint32_t slot = t->free_slots[--t->nfree];

        t->slots[slot].req = reqs[taken];
        t->work[(t->work_head + t->work_count) % aio->depth] = slot;
        t->work_count++;
    }
    aio->in_flight += taken;
    threads_spawn(aio, t);
    if (taken == 1)
        pthread_cond_signal(&t->work_cond);
    else if (taken)
        pthread_cond_broadcast(&t->work_cond);
    pthread_mutex_unlock(&t->lock);
    return (int)taken;
}

static int threads_reap(struct pykvm_aio *aio, struct pykvm_aio_done *out, uint32_t max)
{
    struct threads_engine *t = aio->priv;
    uint32_t n = 0;
    int more;

    pthread_mutex_lock(&t->lock);
    while (n < max && t->done_count) {
        uint32_t slot = t->done[t->done_head];

        t->done_head = (t->done_head + 1) % aio->depth;
        t->done_count--;
        out[n].token = t->slots[slot].req.token;
        out[n].result = t->slots[slot].result;
        t->free_slots[t->nfree++] = slot;
        n++;
    }
    more = t->done_count != 0;
    pthread_mutex_unlock(&t->lock);
    aio->in_flight -= n;
    if (more)
        eventfd_write(aio->notifier, 1);  /* the reaper stopped at max: stay readable */
    return (int)n;
}

static uint32_t threads_ready(struct pykvm_aio *aio)
{
    struct threads_engine *t = aio->priv;

    return __atomic_load_n(&t->done_count, __ATOMIC_ACQUIRE);
}

static void threads_fini(struct pykvm_aio *aio)
{
    struct threads_engine *t = aio->priv;

    pthread_mutex_lock(&t->lock);
    t->stopping = 1;
    pthread_cond_broadcast(&t->work_cond);
    pthread_mutex_unlock(&t->lock);
    for (uint32_t i = 0; i < t->nworkers; i++)
        pthread_join(t->workers[i], NULL);
    pthread_mutex_destroy(&t->lock);
    pthread_cond_destroy(&t->work_cond);
    free(t->slots);
    free(t->free_slots);
    free(t->work);
    free(t->done);
    free(t);
}

static const struct aio_ops aio_threads_ops = {
    .name = "threads",
    .init = threads_init,
    .submit = threads_submit,
    .reap = threads_reap,
    .ready = threads_ready,
    .fini = threads_fini,
};
