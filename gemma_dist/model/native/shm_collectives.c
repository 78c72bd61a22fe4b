/* Collectives between the tensor-parallel ranks of one host through a shared-memory segment.
 *
 * gloo's all-reduce over loopback TCP measured 0.9-1.7 ms per call on a 2-core machine, whatever
 * the size; a replica's forward makes one per row-parallel layer (37 a step for Gemma 3 270M). Here
 * a call is a copy into this rank's slot, a flag, a wait for the peers' flags and a read of their
 * slots: microseconds when the ranks arrive together.
 *
 * Segment layout (the Python side, gemma_dist/model/shm_group.py, creates and maps it):
 *   header: MAX_RANKS lines of 64 bytes, line r = {int64 seq: calls rank r has published,
 *           int64 pid: rank r's process (to notice a dead peer)};
 *   slots:  2 x size slots of `capacity` bytes; call k uses parity k % 2, slot (k % 2) * size + r.
 * Why two parities: a rank enters call k + 2 (overwriting its parity-k slot) only after every peer
 * published call k + 1, which each does only after it finished reading call k's slots.
 *
 * Waiting spins briefly, then yields the CPU (ranks may share cores with each other and with the
 * coordinator), and every ~1 ms checks that the peers' processes still exist: a dead peer ends the
 * wait at once (-1), a live but silent one after `timeout_s` (-2). Called through ctypes with the
 * GIL released (a stuck peer must not freeze the caller's other threads).
 *
 * Built by gemma_dist/model/native/__init__.py.
 */
#include <errno.h>
#include <immintrin.h>
#include <sched.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define MAX_RANKS 64
#define LINE 64

typedef struct {
    int64_t seq;
    int64_t pid;
    char pad[LINE - 2 * sizeof(int64_t)];
} rank_line;

static rank_line *line_of(void *base, int r) { return (rank_line *)((char *)base + (int64_t)r * LINE); }

static char *slot_of(void *base, int size, int64_t capacity, int64_t call, int r) {
    return (char *)base + (int64_t)MAX_RANKS * LINE + ((call % 2) * size + r) * capacity;
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* Size of the segment for `size` ranks with `capacity`-byte slots. */
int64_t shm_segment_bytes(int size, int64_t capacity) { return (int64_t)MAX_RANKS * LINE + 2 * size * capacity; }

int shm_max_ranks(void) { return MAX_RANKS; }

/* Record this rank's process id (once, after mapping the segment). */
void shm_register(void *base, int rank, int64_t pid) { line_of(base, rank)->pid = pid; }

/* Whether process `pid` has ended: gone, or a zombie its parent has not reaped yet (/proc/PID/stat's
 * state Z or X; without /proc, whether kill(pid, 0) finds it). */
static int process_ended(int64_t pid) {
    char path[64], buffer[512];
    snprintf(path, sizeof path, "/proc/%lld/stat", (long long)pid);
    FILE *stat = fopen(path, "r");
    if (stat == NULL) return kill((pid_t)pid, 0) != 0 && errno == ESRCH;
    const size_t got = fread(buffer, 1, sizeof buffer - 1, stat);
    fclose(stat);
    buffer[got] = 0;
    const char *close_paren = strrchr(buffer, ')');  /* "pid (name) S ...": the name may hold spaces */
    return close_paren != NULL && close_paren[1] == ' ' && (close_paren[2] == 'Z' || close_paren[2] == 'X');
}

/* Wait until every rank published call `call`: 0, -1 (a peer's process is gone) or -2 (timeout). */
static int wait_for_peers(void *base, int size, int64_t call, double timeout_s) {
    double started = -1.0, checked = 0.0;
    for (int r = 0; r < size; r++) {
        rank_line *peer = line_of(base, r);
        int64_t spins = 0;
        while (__atomic_load_n(&peer->seq, __ATOMIC_ACQUIRE) < call) {
            if (++spins < 2000) {
                _mm_pause();
                continue;
            }
            sched_yield();
            const double t = now_s();
            if (started < 0.0) started = checked = t;
            if (t - checked > 1e-3) {
                checked = t;
                const int64_t pid = __atomic_load_n(&peer->pid, __ATOMIC_ACQUIRE);
                if (pid > 0 && process_ended(pid)) return -1;
                if (t - started > timeout_s) return -2;
            }
        }
    }
    return 0;
}

/* Publish this rank's `nbytes` (at most `capacity`) as its next call and wait for the peers' own;
 * returns the call number (> 0) or a wait_for_peers error (< 0). */
static int64_t exchange(void *base, int rank, int size, int64_t capacity, const void *data, int64_t nbytes,
                        double timeout_s) {
    rank_line *mine = line_of(base, rank);
    const int64_t call = mine->seq + 1;
    memcpy(slot_of(base, size, capacity, call, rank), data, (size_t)nbytes);
    __atomic_store_n(&mine->seq, call, __ATOMIC_RELEASE);
    const int status = wait_for_peers(base, size, call, timeout_s);
    return status < 0 ? status : call;
}

/* x (n fp32) = the sum over ranks of each rank's x, added in rank order (so every rank computes the
 * same values), in chunks of `capacity` bytes. Returns 0, -1 or -2 (see wait_for_peers). */
int shm_all_reduce_f32(void *base, int rank, int size, int64_t capacity, float *x, int64_t n, double timeout_s) {
    const int64_t per_call = capacity / (int64_t)sizeof(float);
    for (int64_t start = 0; start < n; start += per_call) {
        const int64_t count = n - start < per_call ? n - start : per_call;
        const int64_t call = exchange(base, rank, size, capacity, x + start, count * (int64_t)sizeof(float),
                                      timeout_s);
        if (call < 0) return (int)call;
        const float *first = (const float *)slot_of(base, size, capacity, call, 0);
        float *out = x + start;
        int64_t i = 0;
        for (; i + 8 <= count; i += 8) {
            __m256 acc = _mm256_loadu_ps(first + i);
            for (int r = 1; r < size; r++)
                acc = _mm256_add_ps(acc, _mm256_loadu_ps((const float *)slot_of(base, size, capacity, call, r) + i));
            _mm256_storeu_ps(out + i, acc);
        }
        for (; i < count; i++) {
            float acc = first[i];
            for (int r = 1; r < size; r++) acc += ((const float *)slot_of(base, size, capacity, call, r))[i];
            out[i] = acc;
        }
    }
    return 0;
}

/* out (size x nbytes) = every rank's `nbytes` of data, in rank order (nbytes <= capacity).
 * Returns 0, -1 or -2 (see wait_for_peers). */
int shm_all_gather(void *base, int rank, int size, int64_t capacity, const void *data, int64_t nbytes, void *out,
                   double timeout_s) {
    const int64_t call = exchange(base, rank, size, capacity, data, nbytes, timeout_s);
    if (call < 0) return (int)call;
    for (int r = 0; r < size; r++)
        memcpy((char *)out + r * nbytes, slot_of(base, size, capacity, call, r), (size_t)nbytes);
    return 0;
}
