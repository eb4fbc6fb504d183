/*
 * A fake libcuda.so.1 for Kybernate's tests: the CUDA driver's process checkpoint API
 * (cuCheckpointProcess*, CUDA 12.8+ / driver r570+; GPU remapping of CUDA 13.0 / r580) with the
 * real signatures and the behaviour the real driver shows, without a GPU.
 *
 * Build:  cc -shared -fPIC -O1 -Wall -o DIR/libcuda.so.1 test/fakes/libcuda.c
 *         add -DNO_CHECKPOINT_API to play a driver older than r570 (no cuCheckpoint* symbols).
 *
 * What it does like the real driver (and what a too-kind fake would hide):
 * - Only CUDA processes have checkpoint state. A process is one when its environment (read from
 *   /proc/<tgid>/environ, which survives a CRIU restore as the real driver's state in the
 *   process's memory does) holds FAKE_CUDA_CONTEXT=1. For any other live process every
 *   cuCheckpointProcess* call answers CUDA_ERROR_NOT_INITIALIZED (3), a pid with no process
 *   CUDA_ERROR_INVALID_VALUE (1): CRIU's plugin and NVIDIA's tools skip processes on either.
 *   FAKE_CUDA_GPUS=<index|uuid>,... names the GPUs it uses (default: the first in `gpus`);
 *   FAKE_CUDA_BYTES=<n> the device memory it holds per GPU (default 0).
 * - A process marked FAKE_CUDA_IPC=1 holds CUDA IPC memory, which the driver's checkpoint does
 *   not support (NVIDIA/cuda-checkpoint README, "does not support UVM or IPC memory"): it locks
 *   and unlocks, but cuCheckpointProcessCheckpoint answers CUDA_ERROR_NOT_SUPPORTED (801) and
 *   leaves it LOCKED, as a real driver does for a checkpoint it cannot do
 *   (NVIDIA/cuda-checkpoint#51: lock 0, checkpoint 801, unlock 0).
 * - The restore thread id is a thread of the process (its highest-numbered task).
 * - Lock honours timeoutMs: a process busy for N ms (`delay lock`) fails a lock with a smaller
 *   non-zero timeout with CUDA_ERROR_TIMEOUT after that timeout. Frozen threads (State t/T in
 *   /proc/<tgid>/status, or a frozen cgroup: v2 cgroup.events "frozen 1", v1 freezer.state
 *   FROZEN) cannot be locked: CUDA_ERROR_TIMEOUT after the timeout (at once with timeout 0,
 *   where the real driver would wait for ever).
 * - Checkpoint and restore pass through CHECKPOINTING (4) / RESTORING (5) while they take time
 *   (`delay checkpoint|restore`), as newer drivers report.
 * - A checkpoint "moves" the device memory into the process: the bytes are recorded in `state`
 *   (the fake cannot grow another process's RSS; see FakeCuda::moved_bytes).
 * - A failed call can leave the process elsewhere (`fail` with a then-state): LOCKED,
 *   CHECKPOINTED, FAILED (every later step is refused), or "stuck" (NVIDIA/cuda-checkpoint#44:
 *   reported CHECKPOINTED, every later restore fails with CUDA_ERROR_OPERATING_SYSTEM (304)).
 * - Restore with GPU pairs (CUDA 13.0's CUcheckpointRestoreArgs) needs driver_version >= 13000
 *   (before, those bytes are reserved and must be zero: CUDA_ERROR_INVALID_VALUE). Every GPU the
 *   process holds must be mapped, each GPU at most once, onto a GPU of `gpus` of the same model
 *   (pairs for GPUs it does not hold are allowed, as one map for a whole process tree); the
 *   process's state then lives on the new GPUs.
 *
 * Every file lives next to the loaded .so (found with dladdr), so each test builds its own fake
 * into a temp dir and needs no environment variables of its own:
 *   calls.log       one line per call, "<function> <pid> <result> [extra]", appended with a
 *                   single write() on an O_APPEND fd (several processes log at once); a call
 *                   that takes time also logs "<function>.begin <pid> 0" when it starts
 *   state           "<key> <start> <state> <dumped> <gpus> <moved> <dumped gpus>" lines, shared
 *                   by every process using this fake and guarded by flock. A process is its key, the
 *                   innermost pid from /proc/<pid>/status (NStgid:, else NSpid:; a thread id maps
 *                   to its process), plus its start time (/proc/<tgid>/stat): CRIU restores a
 *                   container with the same in-namespace pids under new host pids. A process
 *                   never seen before whose key belongs to a process that was once checkpointed
 *                   (dumped = 1) is a restored copy of it and starts out checkpointed, with its
 *                   bytes and the GPUs it had when checkpointed (<dumped gpus>: one checkpoint
 *                   can be restored several times, onto other GPUs each time); any other
 *                   unknown process is running.
 *   fail            re-read on every call: "<step> [<pid>|*] [<code> [<then-state>]]" lines; step
 *                   one of init, driver_version, lock, checkpoint, restore, remap (a restore
 *                   with GPU pairs), unlock, get_state, restore_tid; no pid or * = every pid (a
 *                   pid matches the pid passed or the key); code default 999; then-state one of
 *                   running, locked, checkpointed, failed, stuck (default: unchanged).
 *   delay           "<step> <pid>|* <ms>" lines: how long lock (the process is busy), checkpoint
 *                   and restore take.
 *   gpus            the node's GPUs, "<index> <uuid> <model ...>" lines.
 *   driver_version  optional: what cuDriverGetVersion returns (default 12080).
 *
 * Like the driver, restore needs a successful cuInit in the calling process first
 * (CUDA_ERROR_NOT_INITIALIZED otherwise; the real driver also accepts persistence mode).
 */

#define _GNU_SOURCE
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int CUresult;
typedef uint64_t cuuint64_t;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_OPERATING_SYSTEM = 304,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_TIMEOUT = 909,
    CUDA_ERROR_UNKNOWN = 999,
};

typedef enum {
    CU_PROCESS_STATE_RUNNING = 0,
    CU_PROCESS_STATE_LOCKED = 1,
    CU_PROCESS_STATE_CHECKPOINTED = 2,
    CU_PROCESS_STATE_FAILED = 3,
    CU_PROCESS_STATE_CHECKPOINTING = 4,
    CU_PROCESS_STATE_RESTORING = 5,
} CUprocessState;

/* Not a driver state: CHECKPOINTED as reported, but restore can never succeed again. */
#define STATE_STUCK 6

typedef struct {
    char bytes[16];
} CUuuid;

/* The argument structs of cuda.h: 64 bytes each. */
typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    cuuint64_t reserved1[7];
} CUcheckpointLockArgs;

typedef struct {
    cuuint64_t reserved[8];
} CUcheckpointCheckpointArgs;

/* CUDA 13.0: the pairs; CUDA 12.8/12.9 have only reserved bytes here. */
typedef struct {
    CUuuid oldUuid;
    CUuuid newUuid;
} CUcheckpointGpuPair;

typedef struct {
    CUcheckpointGpuPair *gpuPairs;
    unsigned int gpuPairsCount;
    char reserved[52 - sizeof(CUcheckpointGpuPair *)];
    cuuint64_t reserved1;
} CUcheckpointRestoreArgs;

typedef struct {
    cuuint64_t reserved[8];
} CUcheckpointUnlockArgs;

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "lock args are 64 bytes");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "restore args are 64 bytes");
_Static_assert(sizeof(CUcheckpointGpuPair) == 32, "a GPU pair is two UUIDs");

/* Set by a successful cuInit in this process. */
static int initialized;

/* ---- files next to this library ---- */

EXPORT CUresult cuInit(unsigned int flags);

/* Writes "<dir of this .so>/<name>" into buf; returns 0 on success. */
static int fake_path(const char *name, char *buf, size_t size)
{
    Dl_info info;
    if (dladdr((void *)&cuInit, &info) == 0 || info.dli_fname == NULL)
        return -1;
    const char *slash = strrchr(info.dli_fname, '/');
    int n;
    if (slash == NULL)
        n = snprintf(buf, size, "./%s", name);
    else
        n = snprintf(buf, size, "%.*s/%s", (int)(slash - info.dli_fname), info.dli_fname, name);
    return (n < 0 || (size_t)n >= size) ? -1 : 0;
}

static void log_call(const char *function, int pid, CUresult result, const char *extra)
{
    char path[PATH_MAX];
    char line[2048];
    if (fake_path("calls.log", path, sizeof path) != 0)
        return;
    int n;
    if (extra != NULL && extra[0] != '\0')
        n = snprintf(line, sizeof line, "%s %d %d %s\n", function, pid, result, extra);
    else
        n = snprintf(line, sizeof line, "%s %d %d\n", function, pid, result);
    if (n < 0 || (size_t)n >= sizeof line)
        return;
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0)
        return;
    /* One write() on an O_APPEND fd: lines of concurrent processes never interleave. */
    ssize_t w = write(fd, line, (size_t)n);
    (void)w;
    close(fd);
}

static const char *state_words[] = { "running", "locked", "checkpointed", "failed", "checkpointing", "restoring",
                                     "stuck" };
#define STATE_WORDS ((int)(sizeof state_words / sizeof state_words[0]))

static int state_from_word(const char *word)
{
    for (int i = 0; i < STATE_WORDS; i++)
        if (strcmp(word, state_words[i]) == 0)
            return i;
    return -1;
}

/* Whether `p` (a pid field of `fail` or `delay`) names `pid` or `key`. */
static int pid_matches(const char *p, int pid, int key)
{
    if (strcmp(p, "*") == 0)
        return 1;
    char *end;
    long want = strtol(p, &end, 10);
    return *end == '\0' && (want == pid || want == key);
}

/* The injected code for `step` and `pid` (0 when none); *then: the state to leave (-1: unchanged). */
static CUresult injected(const char *step, int pid, int key, int *then)
{
    char path[PATH_MAX];
    *then = -1;
    if (fake_path("fail", path, sizeof path) != 0)
        return 0;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    char line[256];
    CUresult result = 0;
    while (result == 0 && fgets(line, sizeof line, f) != NULL) {
        char s[64], p[32], t[32];
        int code = CUDA_ERROR_UNKNOWN;
        int fields = sscanf(line, "%63s %31s %d %31s", s, p, &code, t);
        if (fields < 1 || s[0] == '#' || strcmp(s, step) != 0)
            continue;
        if (fields >= 2 && !pid_matches(p, pid, key))
            continue;
        result = code;
        if (fields >= 4)
            *then = state_from_word(t);
    }
    fclose(f);
    return result;
}

#ifndef NO_CHECKPOINT_API

/* Milliseconds `step` takes for `pid` (`delay`; 0 when none). */
static long delay_ms(const char *step, int pid, int key)
{
    char path[PATH_MAX];
    if (fake_path("delay", path, sizeof path) != 0)
        return 0;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    char line[256];
    long ms = 0;
    while (fgets(line, sizeof line, f) != NULL) {
        char s[64], p[32];
        long v;
        if (sscanf(line, "%63s %31s %ld", s, p, &v) == 3 && strcmp(s, step) == 0 && pid_matches(p, pid, key)) {
            ms = v;
            break;
        }
    }
    fclose(f);
    return ms;
}

static void sleep_ms(long ms)
{
    if (ms <= 0)
        return;
    struct timespec ts = { ms / 1000, (ms % 1000) * 1000000L };
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
    }
}

#endif /* NO_CHECKPOINT_API */

static int driver_version(void)
{
    int version = 12080;
    char path[PATH_MAX];
    if (fake_path("driver_version", path, sizeof path) == 0) {
        FILE *f = fopen(path, "re");
        if (f != NULL) {
            if (fscanf(f, "%d", &version) != 1)
                version = 12080;
            fclose(f);
        }
    }
    return version;
}

#ifndef NO_CHECKPOINT_API

/* ---- the node's GPUs ---- */

/* Finds a GPU of `gpus` by index or UUID; copies its UUID and model. Returns 0 when found. */
static int gpu_lookup(const char *want, char *uuid, size_t uuid_size, char *model, size_t model_size)
{
    char path[PATH_MAX];
    if (fake_path("gpus", path, sizeof path) != 0)
        return -1;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return -1;
    char line[512];
    int found = -1;
    while (found != 0 && fgets(line, sizeof line, f) != NULL) {
        char index[32], u[128];
        int consumed = 0;
        if (sscanf(line, "%31s %127s %n", index, u, &consumed) < 2)
            continue;
        if (strcmp(want, index) != 0 && strcasecmp(want, u) != 0)
            continue;
        found = 0;
        snprintf(uuid, uuid_size, "%s", u);
        char *m = line + consumed;
        m[strcspn(m, "\n")] = '\0';
        snprintf(model, model_size, "%s", m);
    }
    fclose(f);
    return found;
}

/* "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" of a CUuuid, as nvidia-smi prints it. */
static void uuid_text(const CUuuid *u, char *out, size_t size)
{
    const unsigned char *b = (const unsigned char *)u->bytes;
    snprintf(out, size,
             "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1], b[2], b[3], b[4],
             b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
}

/* ---- processes ---- */

/*
 * The innermost (in-namespace) pid of the process `pid` belongs to: the last field of NStgid:
 * (for a thread id, e.g. a restore thread, its process), else of NSpid:; `pid` if neither is
 * there; -1 without /proc/<pid>. *tgid: the host process id.
 */
static int process_key(int pid, unsigned long long *start, int *tgid_out)
{
    char path[64];
    struct stat st;
    if (pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d", pid);
    if (stat(path, &st) != 0)
        return -1;
    *tgid_out = pid;
    *start = 0;
    snprintf(path, sizeof path, "/proc/%d/status", pid);
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return pid;
    char line[512];
    int tgid_key = -1, pid_key = -1, tgid = pid;
    while (fgets(line, sizeof line, f) != NULL) {
        int *key;
        if (strncmp(line, "Tgid:", 5) == 0) {
            tgid = atoi(line + 5);
            continue;
        }
        if (strncmp(line, "NStgid:", 7) == 0)
            key = &tgid_key;
        else if (strncmp(line, "NSpid:", 6) == 0)
            key = &pid_key;
        else
            continue;
        char *p = strchr(line, ':') + 1, *end;
        for (;;) {
            long v = strtol(p, &end, 10);
            if (end == p)
                break;
            *key = (int)v;
            p = end;
        }
    }
    fclose(f);
    if (tgid > 0)
        *tgid_out = tgid;
    snprintf(path, sizeof path, "/proc/%d/stat", *tgid_out);
    f = fopen(path, "re");
    if (f != NULL) {
        char stat_line[1024];
        if (fgets(stat_line, sizeof stat_line, f) != NULL) {
            /* Field 22 (starttime); the fields after ")" start at field 3. */
            char *p = strrchr(stat_line, ')');
            for (int field = 2; p != NULL && field < 22; field++)
                p = strchr(p + 1, ' ');
            if (p != NULL)
                *start = strtoull(p + 1, NULL, 10);
        }
        fclose(f);
    }
    return tgid_key > 0 ? tgid_key : pid_key > 0 ? pid_key : pid;
}

/* What the process's environment says about its CUDA use. */
struct cuda_env {
    int marked;
    int ipc; /* FAKE_CUDA_IPC=1: holds CUDA IPC memory */
    char gpus[512];
    unsigned long long bytes_per_gpu;
};

static void read_env(int tgid, struct cuda_env *env)
{
    memset(env, 0, sizeof *env);
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/environ", tgid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return;
    /* Callers may be threads of one process (checkpoints run in parallel): no static buffer. */
    enum { ENVIRON_MAX = 65536 };
    char *buf = malloc(ENVIRON_MAX);
    ssize_t n = buf != NULL ? read(fd, buf, ENVIRON_MAX - 1) : -1;
    close(fd);
    if (n <= 0) {
        free(buf);
        return;
    }
    buf[n] = '\0';
    for (char *e = buf; e < buf + n; e += strlen(e) + 1) {
        if (strcmp(e, "FAKE_CUDA_CONTEXT=1") == 0)
            env->marked = 1;
        else if (strcmp(e, "FAKE_CUDA_IPC=1") == 0)
            env->ipc = 1;
        else if (strncmp(e, "FAKE_CUDA_GPUS=", 15) == 0)
            snprintf(env->gpus, sizeof env->gpus, "%s", e + 15);
        else if (strncmp(e, "FAKE_CUDA_BYTES=", 16) == 0)
            env->bytes_per_gpu = strtoull(e + 16, NULL, 10);
    }
    free(buf);
}

/* The UUIDs of the GPUs `env` names (comma-separated; "-" for none). */
static void env_gpus(const struct cuda_env *env, char *out, size_t size)
{
    char names[512], uuid[128], model[256];
    snprintf(names, sizeof names, "%s", env->gpus[0] != '\0' ? env->gpus : "0");
    out[0] = '\0';
    size_t len = 0;
    char *save = NULL;
    for (char *name = strtok_r(names, ",", &save); name != NULL; name = strtok_r(NULL, ",", &save)) {
        if (gpu_lookup(name, uuid, sizeof uuid, model, sizeof model) != 0) {
            if (env->gpus[0] == '\0')
                continue; /* no `gpus` file: a process on no known GPU */
            snprintf(uuid, sizeof uuid, "%s", name);
        }
        int w = snprintf(out + len, size - len, "%s%s", len > 0 ? "," : "", uuid);
        if (w < 0 || (size_t)w >= size - len)
            break;
        len += (size_t)w;
    }
    if (len == 0)
        snprintf(out, size, "-");
}

static int gpu_count(const char *gpus)
{
    if (strcmp(gpus, "-") == 0 || gpus[0] == '\0')
        return 0;
    int n = 1;
    for (const char *p = gpus; *p; p++)
        n += *p == ',';
    return n;
}

/* Whether the threads of `tgid` are stopped or frozen (the driver cannot lock them). */
static int frozen(int tgid)
{
    char path[PATH_MAX], line[512];
    snprintf(path, sizeof path, "/proc/%d/status", tgid);
    FILE *f = fopen(path, "re");
    int is_frozen = 0;
    if (f != NULL) {
        while (fgets(line, sizeof line, f) != NULL) {
            char st;
            if (sscanf(line, "State: %c", &st) == 1) {
                is_frozen = st == 't' || st == 'T';
                break;
            }
        }
        fclose(f);
    }
    if (is_frozen)
        return 1;
    snprintf(path, sizeof path, "/proc/%d/cgroup", tgid);
    f = fopen(path, "re");
    if (f == NULL)
        return 0;
    while (!is_frozen && fgets(line, sizeof line, f) != NULL) {
        line[strcspn(line, "\n")] = '\0';
        char *c1 = strchr(line, ':');
        char *c2 = c1 != NULL ? strchr(c1 + 1, ':') : NULL;
        if (c2 == NULL)
            continue;
        *c2 = '\0';
        const char *controllers = c1 + 1, *cgroup = c2 + 1;
        char file[PATH_MAX], text[256];
        const char *want;
        if (strcmp(line, "0") == 0 && controllers[0] == '\0') {
            snprintf(file, sizeof file, "/sys/fs/cgroup%s/cgroup.events", cgroup);
            want = "frozen 1";
        } else if (strstr(controllers, "freezer") != NULL) {
            snprintf(file, sizeof file, "/sys/fs/cgroup/freezer%s/freezer.state", cgroup);
            want = "FROZEN";
        } else {
            continue;
        }
        FILE *g = fopen(file, "re");
        if (g == NULL)
            continue;
        size_t n = fread(text, 1, sizeof text - 1, g);
        text[n] = '\0';
        fclose(g);
        is_frozen = strstr(text, want) != NULL;
    }
    fclose(f);
    return is_frozen;
}

/* The highest-numbered thread of `tgid` (the driver's restore thread is one of its own). */
static int restore_thread(int tgid)
{
    char path[64];
    snprintf(path, sizeof path, "/proc/%d/task", tgid);
    DIR *d = opendir(path);
    if (d == NULL)
        return tgid;
    int tid = tgid;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        int t = atoi(e->d_name);
        if (t > tid)
            tid = t;
    }
    closedir(d);
    return tid;
}

/* One process's record in `state`. */
struct record {
    int key;
    unsigned long long start;
    int state; /* index into state_words */
    int dumped;
    char gpus[1024];
    unsigned long long moved;
    char dumped_gpus[1024]; /* its GPUs when it was last checkpointed ("-": never) */
};

/* Opens and flocks the state file. */
static int state_open(int how)
{
    char path[PATH_MAX];
    if (fake_path("state", path, sizeof path) != 0)
        return -1;
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);
    if (fd < 0)
        return -1;
    while (flock(fd, how) != 0) {
        if (errno != EINTR) {
            close(fd);
            return -1;
        }
    }
    return fd;
}

/* Reads the whole state file into a NUL-terminated malloc'd buffer. */
static char *state_read(int fd)
{
    struct stat st;
    if (fstat(fd, &st) != 0)
        return NULL;
    char *buf = malloc((size_t)st.st_size + 1);
    if (buf == NULL)
        return NULL;
    ssize_t n = pread(fd, buf, (size_t)st.st_size, 0);
    if (n < 0) {
        free(buf);
        return NULL;
    }
    buf[n] = '\0';
    return buf;
}

static int parse_record(const char *line, struct record *r)
{
    char word[32];
    memset(r, 0, sizeof *r);
    snprintf(r->gpus, sizeof r->gpus, "-");
    snprintf(r->dumped_gpus, sizeof r->dumped_gpus, "-");
    int n = sscanf(line, "%d %llu %31s %d %1023s %llu %1023s", &r->key, &r->start, word, &r->dumped, r->gpus,
                   &r->moved, r->dumped_gpus);
    if (n < 4)
        return -1;
    r->state = state_from_word(word);
    return r->state < 0 ? -1 : 0;
}

/*
 * The record of process (key, start) in `text`, or a new one: a restored copy of a process once
 * checkpointed under its key (checkpointed, with its GPUs and bytes), else a running process on
 * the GPUs its environment names.
 */
static void state_lookup(const char *text, int key, unsigned long long start, const struct cuda_env *env,
                         struct record *out)
{
    int found = 0, copied = 0;
    struct record r;
    for (const char *line = text; line != NULL && *line != '\0';) {
        if (parse_record(line, &r) == 0 && r.key == key) {
            if (r.start == start) {
                *out = r;
                found = 1;
            } else if (r.dumped && !found) {
                *out = r;
                copied = 1;
            }
        }
        line = strchr(line, '\n');
        if (line != NULL)
            line++;
    }
    if (found)
        return;
    if (copied) {
        out->start = start;
        out->state = CU_PROCESS_STATE_CHECKPOINTED;
        out->dumped = 1;
        /* The GPUs its checkpoint was taken on, not those an earlier restored copy moved to. */
        if (out->dumped_gpus[0] != '\0' && strcmp(out->dumped_gpus, "-") != 0)
            snprintf(out->gpus, sizeof out->gpus, "%s", out->dumped_gpus);
        return;
    }
    memset(out, 0, sizeof *out);
    out->key = key;
    out->start = start;
    out->state = CU_PROCESS_STATE_RUNNING;
    env_gpus(env, out->gpus, sizeof out->gpus);
}

/* Rewrites the state file with `rec`; returns 0 on success. */
static int state_store(int fd, const char *text, const struct record *rec)
{
    size_t cap = strlen(text) + sizeof rec->gpus + sizeof rec->dumped_gpus + 128;
    char *out = malloc(cap);
    if (out == NULL)
        return -1;
    size_t len = 0;
    const char *line = text;
    while (line != NULL && *line != '\0') {
        const char *next = strchr(line, '\n');
        size_t n = next != NULL ? (size_t)(next - line) : strlen(line);
        int k;
        unsigned long long st;
        if (!(sscanf(line, "%d %llu", &k, &st) == 2 && k == rec->key && st == rec->start) && n > 0) {
            memcpy(out + len, line, n);
            len += n;
            out[len++] = '\n';
        }
        line = next != NULL ? next + 1 : NULL;
    }
    int now_dumped = rec->state == CU_PROCESS_STATE_CHECKPOINTED || rec->state == STATE_STUCK;
    int dumped = rec->dumped || now_dumped;
    const char *gpus = rec->gpus[0] ? rec->gpus : "-";
    const char *dumped_gpus = now_dumped ? gpus : rec->dumped_gpus[0] ? rec->dumped_gpus : "-";
    len += (size_t)snprintf(out + len, cap - len, "%d %llu %s %d %s %llu %s\n", rec->key, rec->start,
                            state_words[rec->state], dumped, gpus, rec->moved, dumped_gpus);
    int rc = (ftruncate(fd, 0) == 0 && pwrite(fd, out, len, 0) == (ssize_t)len) ? 0 : -1;
    free(out);
    return rc;
}

/* A process the calls act on. */
struct target {
    int pid, key, tgid;
    unsigned long long start;
    struct cuda_env env;
};

/* Reads (lock = LOCK_SH) or updates (LOCK_EX, with `update`) the record of `t`. */
static CUresult with_record(const struct target *t, int how, CUresult (*update)(struct record *, void *), void *arg,
                            struct record *out)
{
    int fd = state_open(how);
    char *text = fd < 0 ? NULL : state_read(fd);
    CUresult result = CUDA_SUCCESS;
    if (text == NULL) {
        result = CUDA_ERROR_UNKNOWN;
    } else {
        struct record rec;
        state_lookup(text, t->key, t->start, &t->env, &rec);
        if (update != NULL) {
            result = update(&rec, arg);
            if (result == CUDA_SUCCESS && state_store(fd, text, &rec) != 0)
                result = CUDA_ERROR_UNKNOWN;
        }
        if (out != NULL)
            *out = rec;
    }
    free(text);
    if (fd >= 0)
        close(fd); /* releases the flock */
    return result;
}

static CUresult set_state(struct record *rec, void *arg)
{
    rec->state = *(int *)arg;
    return CUDA_SUCCESS;
}

/* Validates the pid: a live process (else INVALID_VALUE) with a CUDA context (else NOT_INITIALIZED). */
static CUresult find_target(int pid, struct target *t)
{
    memset(t, 0, sizeof *t);
    t->pid = pid;
    t->key = process_key(pid, &t->start, &t->tgid);
    if (t->key < 0)
        return CUDA_ERROR_INVALID_VALUE;
    read_env(t->tgid, &t->env);
    return t->env.marked ? CUDA_SUCCESS : CUDA_ERROR_NOT_INITIALIZED;
}

/* Applies an injected failure for `step`: its code, and the state it leaves the process in. */
static CUresult inject(const struct target *t, const char *step)
{
    int then = -1;
    CUresult code = injected(step, t->pid, t->key, &then);
    if (code != 0 && then >= 0)
        with_record(t, LOCK_EX, set_state, &then, NULL);
    return code;
}

/* The driver's answer for a state word that is not a driver state. */
static int reported_state(int state)
{
    return state == STATE_STUCK ? CU_PROCESS_STATE_CHECKPOINTED : state;
}

struct step_args {
    int from, to;
    unsigned long long moved; /* checkpoint: bytes it moves */
    const char *pairs_old[64];
    const char *pairs_new[64];
    char pair_text[64][2][64];
    int pairs;
};

static CUresult step_update(struct record *rec, void *arg)
{
    struct step_args *a = arg;
    if (rec->state == STATE_STUCK && a->from == CU_PROCESS_STATE_CHECKPOINTED)
        return CUDA_ERROR_OPERATING_SYSTEM;
    if (rec->state != a->from)
        return CUDA_ERROR_ILLEGAL_STATE;
    rec->state = a->to;
    if (a->to == CU_PROCESS_STATE_CHECKPOINTED)
        rec->moved = a->moved;
    return CUDA_SUCCESS;
}

/*
 * A restore's GPU pairs against the process's GPUs and the node's: 0 or the driver's error.
 * Like the driver ("must contain all checkpointed devices": cuda-checkpoint --device-map), every
 * GPU the process holds must be mapped; the map may name more GPUs (CRIU's plugin hands every
 * process of a tree the same map: checkpoint-restore/criu#2836), each checked like the others.
 */
static CUresult check_pairs(const struct record *rec, struct step_args *a, char *out_gpus, size_t size)
{
    for (int i = 0; i < a->pairs; i++) {
        char u_old[128], m_old[256], u_new[128], m_new[256];
        for (int j = 0; j < i; j++) {
            if (strcasecmp(a->pairs_old[j], a->pairs_old[i]) == 0)
                return CUDA_ERROR_INVALID_VALUE; /* mapped twice */
            if (strcasecmp(a->pairs_new[j], a->pairs_new[i]) == 0)
                return CUDA_ERROR_INVALID_VALUE; /* two GPUs onto one */
        }
        if (gpu_lookup(a->pairs_old[i], u_old, sizeof u_old, m_old, sizeof m_old) != 0)
            return CUDA_ERROR_INVALID_DEVICE;
        if (gpu_lookup(a->pairs_new[i], u_new, sizeof u_new, m_new, sizeof m_new) != 0)
            return CUDA_ERROR_INVALID_DEVICE; /* no such target GPU */
        if (strcmp(m_old, m_new) != 0)
            return CUDA_ERROR_INVALID_DEVICE; /* another chip: the driver restores onto the same model only */
    }
    char held[1024];
    snprintf(held, sizeof held, "%s", rec->gpus);
    out_gpus[0] = '\0';
    size_t len = 0;
    char *save = NULL;
    for (char *g = strtok_r(held, ",", &save); g != NULL; g = strtok_r(NULL, ",", &save)) {
        if (strcmp(g, "-") == 0)
            continue;
        int match = -1;
        for (int i = 0; i < a->pairs && match < 0; i++)
            if (strcasecmp(a->pairs_old[i], g) == 0)
                match = i;
        if (match < 0)
            return CUDA_ERROR_INVALID_VALUE; /* a GPU of the process left unmapped */
        char u_new[128], m_new[256];
        if (gpu_lookup(a->pairs_new[match], u_new, sizeof u_new, m_new, sizeof m_new) != 0)
            return CUDA_ERROR_INVALID_DEVICE;
        int w = snprintf(out_gpus + len, size - len, "%s%s", len > 0 ? "," : "", u_new);
        if (w < 0 || (size_t)w >= size - len)
            return CUDA_ERROR_UNKNOWN;
        len += (size_t)w;
    }
    return CUDA_SUCCESS;
}

struct restore_update {
    struct step_args *a;
    int remap;
};

static CUresult restore_update(struct record *rec, void *arg)
{
    struct restore_update *u = arg;
    if (rec->state == STATE_STUCK)
        return CUDA_ERROR_OPERATING_SYSTEM;
    if (rec->state != u->a->from)
        return CUDA_ERROR_ILLEGAL_STATE;
    if (u->remap) {
        char gpus[1024];
        CUresult r = check_pairs(rec, u->a, gpus, sizeof gpus);
        if (r != CUDA_SUCCESS)
            return r;
        snprintf(rec->gpus, sizeof rec->gpus, "%s", gpus[0] ? gpus : "-");
    }
    rec->state = u->a->to;
    return CUDA_SUCCESS;
}

#endif /* NO_CHECKPOINT_API */

/* ---- the exported driver API ---- */

EXPORT CUresult cuInit(unsigned int flags)
{
    int then;
    CUresult result = injected("init", 0, 0, &then);
    if (result == 0 && flags != 0)
        result = CUDA_ERROR_INVALID_VALUE;
    if (result == 0)
        initialized = 1;
    log_call("cuInit", 0, result, NULL);
    return result;
}

EXPORT CUresult cuDriverGetVersion(int *driverVersion)
{
    int then;
    CUresult result = injected("driver_version", 0, 0, &then);
    if (result == 0 && driverVersion == NULL)
        result = CUDA_ERROR_INVALID_VALUE;
    if (result == 0)
        *driverVersion = driver_version();
    log_call("cuDriverGetVersion", 0, result, NULL);
    return result;
}

struct error_text {
    CUresult code;
    const char *name;
    const char *description;
};

static const struct error_text errors[] = {
    { CUDA_SUCCESS, "CUDA_SUCCESS", "no error" },
    { CUDA_ERROR_INVALID_VALUE, "CUDA_ERROR_INVALID_VALUE", "invalid argument" },
    { CUDA_ERROR_OUT_OF_MEMORY, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory" },
    { CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error" },
    { CUDA_ERROR_INVALID_DEVICE, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal" },
    { CUDA_ERROR_OPERATING_SYSTEM, "CUDA_ERROR_OPERATING_SYSTEM", "OS call failed or operation not supported on this OS" },
    { CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state" },
    { CUDA_ERROR_NOT_SUPPORTED, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported" },
    { CUDA_ERROR_TIMEOUT, "CUDA_ERROR_TIMEOUT", "timeout reached" },
    { CUDA_ERROR_UNKNOWN, "CUDA_ERROR_UNKNOWN", "unknown error" },
};

/* Like the driver: unknown codes give CUDA_ERROR_INVALID_VALUE and *pStr = NULL. */
static CUresult error_text(const char *function, CUresult error, const char **pStr, int name)
{
    char extra[32];
    snprintf(extra, sizeof extra, "error=%d", error);
    CUresult result = CUDA_ERROR_INVALID_VALUE;
    if (pStr != NULL) {
        *pStr = NULL;
        for (size_t i = 0; i < sizeof errors / sizeof errors[0]; i++) {
            if (errors[i].code == error) {
                *pStr = name ? errors[i].name : errors[i].description;
                result = CUDA_SUCCESS;
            }
        }
    }
    log_call(function, 0, result, extra);
    return result;
}

EXPORT CUresult cuGetErrorName(CUresult error, const char **pStr)
{
    return error_text("cuGetErrorName", error, pStr, 1);
}

EXPORT CUresult cuGetErrorString(CUresult error, const char **pStr)
{
    return error_text("cuGetErrorString", error, pStr, 0);
}

#ifndef NO_CHECKPOINT_API

/* Logs and returns `result`. */
static CUresult done(const char *function, int pid, CUresult result, const char *extra)
{
    log_call(function, pid, result, extra);
    return result;
}

EXPORT CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
{
    static const char *fn = "cuCheckpointProcessLock";
    unsigned timeout = args != NULL ? args->timeoutMs : 0u;
    char extra[32];
    snprintf(extra, sizeof extra, "timeout=%u", timeout);
    struct target t;
    CUresult r = find_target(pid, &t);
    if (r == CUDA_SUCCESS)
        r = inject(&t, "lock");
    if (r != CUDA_SUCCESS)
        return done(fn, pid, r, extra);
    struct record rec;
    if (with_record(&t, LOCK_SH, NULL, NULL, &rec) != CUDA_SUCCESS)
        return done(fn, pid, CUDA_ERROR_UNKNOWN, extra);
    if (rec.state != CU_PROCESS_STATE_RUNNING)
        return done(fn, pid, CUDA_ERROR_ILLEGAL_STATE, extra);
    /* Locking waits for the process's threads to reach the driver: frozen ones never do. */
    if (frozen(t.tgid)) {
        sleep_ms((long)timeout);
        char why[48];
        snprintf(why, sizeof why, "%s frozen", extra);
        return done(fn, pid, CUDA_ERROR_TIMEOUT, why);
    }
    long busy = delay_ms("lock", pid, t.key);
    if (busy > 0) {
        log_call("cuCheckpointProcessLock.begin", pid, 0, extra);
        if (timeout > 0 && (long)timeout < busy) {
            sleep_ms((long)timeout);
            return done(fn, pid, CUDA_ERROR_TIMEOUT, extra);
        }
        sleep_ms(busy);
    }
    struct step_args a = { .from = CU_PROCESS_STATE_RUNNING, .to = CU_PROCESS_STATE_LOCKED };
    return done(fn, pid, with_record(&t, LOCK_EX, step_update, &a, NULL), extra);
}

/* Checkpoint and restore: through the transient state while they take time. */
static CUresult slow_step(const struct target *t, const char *function, const char *step, int from, int via)
{
    long ms = delay_ms(step, t->pid, t->key);
    if (ms <= 0)
        return CUDA_SUCCESS;
    struct record rec;
    if (with_record(t, LOCK_SH, NULL, NULL, &rec) != CUDA_SUCCESS)
        return CUDA_ERROR_UNKNOWN;
    if (rec.state != from)
        return CUDA_SUCCESS; /* the state check below answers */
    char name[96];
    snprintf(name, sizeof name, "%s.begin", function);
    log_call(name, t->pid, 0, NULL);
    with_record(t, LOCK_EX, set_state, &via, NULL);
    sleep_ms(ms);
    with_record(t, LOCK_EX, set_state, &from, NULL);
    return CUDA_SUCCESS;
}

EXPORT CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
{
    static const char *fn = "cuCheckpointProcessCheckpoint";
    (void)args;
    struct target t;
    CUresult r = find_target(pid, &t);
    if (r == CUDA_SUCCESS)
        r = inject(&t, "checkpoint");
    struct record rec;
    /* IPC memory: refused once locked (before that, the state check answers), state unchanged. */
    if (r == CUDA_SUCCESS && t.env.ipc && with_record(&t, LOCK_SH, NULL, NULL, &rec) == CUDA_SUCCESS &&
        rec.state == CU_PROCESS_STATE_LOCKED)
        return done(fn, pid, CUDA_ERROR_NOT_SUPPORTED, "cuda-ipc");
    if (r == CUDA_SUCCESS)
        r = slow_step(&t, fn, "checkpoint", CU_PROCESS_STATE_LOCKED, CU_PROCESS_STATE_CHECKPOINTING);
    if (r != CUDA_SUCCESS)
        return done(fn, pid, r, NULL);
    with_record(&t, LOCK_SH, NULL, NULL, &rec);
    struct step_args a = { .from = CU_PROCESS_STATE_LOCKED, .to = CU_PROCESS_STATE_CHECKPOINTED };
    a.moved = t.env.bytes_per_gpu * (unsigned long long)gpu_count(rec.gpus);
    char extra[64];
    snprintf(extra, sizeof extra, "bytes=%llu", a.moved);
    return done(fn, pid, with_record(&t, LOCK_EX, step_update, &a, NULL), extra);
}

EXPORT CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args)
{
    static const char *fn = "cuCheckpointProcessRestore";
    struct step_args a = { .from = CU_PROCESS_STATE_CHECKPOINTED, .to = CU_PROCESS_STATE_LOCKED };
    char extra[1800] = "";
    int remap = 0, bad_args = 0;
    if (args != NULL) {
        const unsigned char *bytes = (const unsigned char *)args;
        int any = 0;
        for (size_t i = 0; i < sizeof *args; i++)
            any |= bytes[i] != 0;
        if (driver_version() < 13000) {
            bad_args = any; /* CUDA 12.x: all reserved, must be zero */
        } else {
            for (size_t i = offsetof(CUcheckpointRestoreArgs, reserved); i < sizeof *args; i++)
                bad_args |= bytes[i] != 0;
            if (args->gpuPairsCount > 0 && args->gpuPairs == NULL)
                bad_args = 1;
            if (args->gpuPairsCount > 64)
                bad_args = 1;
            if (!bad_args && args->gpuPairsCount > 0) {
                remap = 1;
                a.pairs = (int)args->gpuPairsCount;
                size_t len = (size_t)snprintf(extra, sizeof extra, "pairs=");
                for (int i = 0; i < a.pairs; i++) {
                    uuid_text(&args->gpuPairs[i].oldUuid, a.pair_text[i][0], sizeof a.pair_text[i][0]);
                    uuid_text(&args->gpuPairs[i].newUuid, a.pair_text[i][1], sizeof a.pair_text[i][1]);
                    a.pairs_old[i] = a.pair_text[i][0];
                    a.pairs_new[i] = a.pair_text[i][1];
                    int w = snprintf(extra + len, sizeof extra - len, "%s%s>%s", i > 0 ? "," : "", a.pairs_old[i],
                                     a.pairs_new[i]);
                    if (w > 0 && (size_t)w < sizeof extra - len)
                        len += (size_t)w;
                }
            }
        }
    }
    struct target t;
    CUresult r = find_target(pid, &t);
    if (r == CUDA_SUCCESS && bad_args)
        r = CUDA_ERROR_INVALID_VALUE;
    if (r == CUDA_SUCCESS)
        r = inject(&t, "restore");
    if (r == CUDA_SUCCESS && remap)
        r = inject(&t, "remap");
    if (r == CUDA_SUCCESS && !initialized)
        r = CUDA_ERROR_NOT_INITIALIZED;
    if (r == CUDA_SUCCESS)
        r = slow_step(&t, fn, "restore", CU_PROCESS_STATE_CHECKPOINTED, CU_PROCESS_STATE_RESTORING);
    if (r != CUDA_SUCCESS)
        return done(fn, pid, r, extra);
    struct restore_update u = { &a, remap };
    return done(fn, pid, with_record(&t, LOCK_EX, restore_update, &u, NULL), extra);
}

EXPORT CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
{
    static const char *fn = "cuCheckpointProcessUnlock";
    (void)args;
    struct target t;
    CUresult r = find_target(pid, &t);
    if (r == CUDA_SUCCESS)
        r = inject(&t, "unlock");
    if (r != CUDA_SUCCESS)
        return done(fn, pid, r, NULL);
    struct step_args a = { .from = CU_PROCESS_STATE_LOCKED, .to = CU_PROCESS_STATE_RUNNING };
    return done(fn, pid, with_record(&t, LOCK_EX, step_update, &a, NULL), NULL);
}

EXPORT CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state)
{
    static const char *fn = "cuCheckpointProcessGetState";
    if (state == NULL)
        return done(fn, pid, CUDA_ERROR_INVALID_VALUE, NULL);
    struct target t;
    CUresult r = find_target(pid, &t);
    if (r == CUDA_SUCCESS)
        r = inject(&t, "get_state");
    struct record rec;
    if (r == CUDA_SUCCESS)
        r = with_record(&t, LOCK_SH, NULL, NULL, &rec);
    if (r == CUDA_SUCCESS)
        *state = (CUprocessState)reported_state(rec.state);
    return done(fn, pid, r, NULL);
}

EXPORT CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)
{
    static const char *fn = "cuCheckpointProcessGetRestoreThreadId";
    if (tid == NULL)
        return done(fn, pid, CUDA_ERROR_INVALID_VALUE, NULL);
    struct target t;
    CUresult r = find_target(pid, &t);
    if (r == CUDA_SUCCESS)
        r = inject(&t, "restore_tid");
    if (r == CUDA_SUCCESS)
        *tid = restore_thread(t.tgid);
    return done(fn, pid, r, NULL);
}

#endif /* NO_CHECKPOINT_API */
