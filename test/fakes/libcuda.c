/*
 * A fake libcuda.so.1 for Kybernate's tests: the CUDA driver's process checkpoint API
 * (cuCheckpointProcess*, CUDA 12.8+ / driver r570+) with the real signatures and the state
 * machine the driver documents, without a GPU.
 *
 * Build:  cc -shared -fPIC -O1 -Wall -o DIR/libcuda.so.1 test/fakes/libcuda.c
 *         add -DNO_CHECKPOINT_API to play a driver older than r570 (no cuCheckpoint* symbols).
 *
 * Every file lives next to the loaded .so (found with dladdr), so each test builds its own fake
 * into a temp dir and needs no environment variables:
 *   calls.log       one line per call, "<function> <pid> <result> [extra]", appended with a
 *                   single write() on an O_APPEND fd (several processes log at once)
 *   state           "<key> <start> <state> <dumped>" lines, shared by every process using this
 *                   fake and guarded by flock. A process is its key, the innermost pid from
 *                   /proc/<pid>/status (NStgid:, else NSpid:; a thread id maps to its process),
 *                   plus its start time (/proc/<tgid>/stat): CRIU restores a container with the
 *                   same in-namespace pids under new host pids, and the real driver keeps the
 *                   state inside the process's memory. So a process never seen before whose key
 *                   belongs to a process that was once checkpointed (dumped = 1) is a restored
 *                   copy of it and starts out checkpointed, as the real one would (its memory
 *                   was dumped while checkpointed); any other unknown process is running.
 *   fail            re-read on every call: "<step> [<pid>|*] [<code>]" lines (a code needs a pid
 *                   or * before it); step one of init, driver_version, lock, checkpoint, restore,
 *                   unlock, get_state, restore_tid; no pid or * = every pid (a pid matches the
 *                   pid passed or the key); code default 999 (CUDA_ERROR_UNKNOWN). A failed call
 *                   changes no state and is logged with its code.
 *   driver_version  optional: what cuDriverGetVersion returns (default 12080)
 *
 * Like the driver, restore needs a successful cuInit in the calling process first
 * (CUDA_ERROR_NOT_INITIALIZED otherwise; the real driver also accepts persistence mode).
 */

#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#define EXPORT __attribute__((visibility("default")))

typedef int CUresult;
typedef uint64_t cuuint64_t;

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_ILLEGAL_STATE = 401,
    CUDA_ERROR_TIMEOUT = 909,
    CUDA_ERROR_UNKNOWN = 999,
};

typedef enum {
    CU_PROCESS_STATE_RUNNING = 0,
    CU_PROCESS_STATE_LOCKED = 1,
    CU_PROCESS_STATE_CHECKPOINTED = 2,
    CU_PROCESS_STATE_FAILED = 3,
} CUprocessState;

/* The argument structs of cuda.h (CUDA 12.8+): 64 bytes each. */
typedef struct {
    unsigned int timeoutMs;
    unsigned int reserved0;
    cuuint64_t reserved1[7];
} CUcheckpointLockArgs;

typedef struct {
    cuuint64_t reserved[8];
} CUcheckpointCheckpointArgs;

typedef struct {
    cuuint64_t reserved[8];
} CUcheckpointRestoreArgs;

typedef struct {
    cuuint64_t reserved[8];
} CUcheckpointUnlockArgs;

_Static_assert(sizeof(CUcheckpointLockArgs) == 64, "lock args are 64 bytes");
_Static_assert(sizeof(CUcheckpointRestoreArgs) == 64, "restore args are 64 bytes");

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
    char line[512];
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

/* The injected code for `step` and `pid` (0 when none). */
static CUresult injected(const char *step, int pid, int key)
{
    char path[PATH_MAX];
    if (fake_path("fail", path, sizeof path) != 0)
        return 0;
    FILE *f = fopen(path, "re");
    if (f == NULL)
        return 0;
    char line[256];
    CUresult result = 0;
    while (result == 0 && fgets(line, sizeof line, f) != NULL) {
        char s[64], p[32];
        int code = CUDA_ERROR_UNKNOWN;
        int fields = sscanf(line, "%63s %31s %d", s, p, &code);
        if (fields < 1 || s[0] == '#' || strcmp(s, step) != 0)
            continue;
        if (fields >= 2 && strcmp(p, "*") != 0) {
            char *end;
            long want = strtol(p, &end, 10);
            if (*end != '\0' || (want != pid && want != key))
                continue;
        }
        result = code;
    }
    fclose(f);
    return result;
}

#ifndef NO_CHECKPOINT_API

/* ---- processes (the checkpoint API only) ---- */

static const char *state_words[] = { "running", "locked", "checkpointed", "failed" };

/*
 * The innermost (in-namespace) pid of the process `pid` belongs to: the last field of NStgid:
 * (the same as NSpid: for a process; for a thread id, e.g. a restore thread, its process), else of
 * NSpid:; `pid` if neither is there; -1 without /proc/<pid>.
 */
static int process_key(int pid, unsigned long long *start)
{
    char path[64];
    struct stat st;
    if (pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d", pid);
    if (stat(path, &st) != 0)
        return -1;
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
    *start = 0;
    snprintf(path, sizeof path, "/proc/%d/stat", tgid > 0 ? tgid : pid);
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

/*
 * The state of process (key, start) in `text`; *dumped tells whether it was ever checkpointed.
 * Unknown: checkpointed when another process with its key was (a restored copy), else running.
 */
static CUprocessState state_lookup(const char *text, int key, unsigned long long start, int *dumped)
{
    CUprocessState state = CU_PROCESS_STATE_RUNNING, copy = CU_PROCESS_STATE_RUNNING;
    int found = 0;
    *dumped = 0;
    const char *line = text;
    while (line != NULL && *line != '\0') {
        int k, d;
        unsigned long long st;
        char word[32];
        if (sscanf(line, "%d %llu %31s %d", &k, &st, word, &d) == 4 && k == key) {
            if (st == start) {
                found = 1;
                *dumped = d;
                for (int i = 0; i < 4; i++)
                    if (strcmp(word, state_words[i]) == 0)
                        state = (CUprocessState)i;
            } else if (d) {
                copy = CU_PROCESS_STATE_CHECKPOINTED;
            }
        }
        line = strchr(line, '\n');
        if (line != NULL)
            line++;
    }
    if (!found) {
        state = copy;
        *dumped = copy == CU_PROCESS_STATE_CHECKPOINTED;
    }
    return state;
}

/* Rewrites the state file with process (key, start) set to `state`; returns 0 on success. */
static int state_store(int fd, const char *text, int key, unsigned long long start, CUprocessState state,
                       int dumped)
{
    size_t cap = strlen(text) + 64;
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
        if (!(sscanf(line, "%d %llu", &k, &st) == 2 && k == key && st == start) && n > 0) {
            memcpy(out + len, line, n);
            len += n;
            out[len++] = '\n';
        }
        line = next != NULL ? next + 1 : NULL;
    }
    len += (size_t)snprintf(out + len, cap - len, "%d %llu %s %d\n", key, start, state_words[state],
                            dumped || state == CU_PROCESS_STATE_CHECKPOINTED);
    int rc = (ftruncate(fd, 0) == 0 && pwrite(fd, out, len, 0) == (ssize_t)len) ? 0 : -1;
    free(out);
    return rc;
}

/*
 * One checkpoint-API call: validates the pid, applies failure injection, and moves the process
 * from `from` to `to` (from < 0: read-only, the state is returned in *state_out).
 */
static CUresult transition(const char *function, const char *step, int pid, int from, int to, const char *extra,
                           CUprocessState *state_out)
{
    unsigned long long start = 0;
    int key = process_key(pid, &start);
    if (key < 0) {
        log_call(function, pid, CUDA_ERROR_INVALID_VALUE, extra);
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUresult result = injected(step, pid, key);
    if (result == 0 && strcmp(step, "restore") == 0 && !initialized)
        result = CUDA_ERROR_NOT_INITIALIZED;
    if (result != 0) {
        log_call(function, pid, result, extra);
        return result;
    }
    int fd = state_open(from < 0 ? LOCK_SH : LOCK_EX);
    char *text = fd < 0 ? NULL : state_read(fd);
    if (text == NULL) {
        result = CUDA_ERROR_UNKNOWN;
    } else {
        int dumped = 0;
        CUprocessState state = state_lookup(text, key, start, &dumped);
        if (from < 0) {
            if (state_out != NULL)
                *state_out = state;
        } else if ((int)state != from) {
            result = CUDA_ERROR_ILLEGAL_STATE;
        } else if (state_store(fd, text, key, start, (CUprocessState)to, dumped) != 0) {
            result = CUDA_ERROR_UNKNOWN;
        }
    }
    free(text);
    if (fd >= 0)
        close(fd); /* releases the flock */
    log_call(function, pid, result, extra);
    return result;
}

#endif /* NO_CHECKPOINT_API */

/* ---- the exported driver API ---- */

EXPORT CUresult cuInit(unsigned int flags)
{
    CUresult result = injected("init", 0, 0);
    if (result == 0 && flags != 0)
        result = CUDA_ERROR_INVALID_VALUE;
    if (result == 0)
        initialized = 1;
    log_call("cuInit", 0, result, NULL);
    return result;
}

EXPORT CUresult cuDriverGetVersion(int *driverVersion)
{
    CUresult result = injected("driver_version", 0, 0);
    if (result == 0 && driverVersion == NULL)
        result = CUDA_ERROR_INVALID_VALUE;
    if (result == 0) {
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
        *driverVersion = version;
    }
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
    { CUDA_ERROR_NOT_INITIALIZED, "CUDA_ERROR_NOT_INITIALIZED", "initialization error" },
    { CUDA_ERROR_ILLEGAL_STATE, "CUDA_ERROR_ILLEGAL_STATE", "the operation cannot be performed in the present state" },
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

EXPORT CUresult cuCheckpointProcessLock(int pid, CUcheckpointLockArgs *args)
{
    char extra[32];
    snprintf(extra, sizeof extra, "timeout=%u", args != NULL ? args->timeoutMs : 0u);
    return transition("cuCheckpointProcessLock", "lock", pid, CU_PROCESS_STATE_RUNNING, CU_PROCESS_STATE_LOCKED,
                      extra, NULL);
}

EXPORT CUresult cuCheckpointProcessCheckpoint(int pid, CUcheckpointCheckpointArgs *args)
{
    (void)args;
    return transition("cuCheckpointProcessCheckpoint", "checkpoint", pid, CU_PROCESS_STATE_LOCKED,
                      CU_PROCESS_STATE_CHECKPOINTED, NULL, NULL);
}

EXPORT CUresult cuCheckpointProcessRestore(int pid, CUcheckpointRestoreArgs *args)
{
    (void)args;
    return transition("cuCheckpointProcessRestore", "restore", pid, CU_PROCESS_STATE_CHECKPOINTED,
                      CU_PROCESS_STATE_LOCKED, NULL, NULL);
}

EXPORT CUresult cuCheckpointProcessUnlock(int pid, CUcheckpointUnlockArgs *args)
{
    (void)args;
    return transition("cuCheckpointProcessUnlock", "unlock", pid, CU_PROCESS_STATE_LOCKED, CU_PROCESS_STATE_RUNNING,
                      NULL, NULL);
}

EXPORT CUresult cuCheckpointProcessGetState(int pid, CUprocessState *state)
{
    if (state == NULL) {
        log_call("cuCheckpointProcessGetState", pid, CUDA_ERROR_INVALID_VALUE, NULL);
        return CUDA_ERROR_INVALID_VALUE;
    }
    return transition("cuCheckpointProcessGetState", "get_state", pid, -1, -1, NULL, state);
}

EXPORT CUresult cuCheckpointProcessGetRestoreThreadId(int pid, int *tid)
{
    if (tid == NULL) {
        log_call("cuCheckpointProcessGetRestoreThreadId", pid, CUDA_ERROR_INVALID_VALUE, NULL);
        return CUDA_ERROR_INVALID_VALUE;
    }
    CUresult result = transition("cuCheckpointProcessGetRestoreThreadId", "restore_tid", pid, -1, -1, NULL, NULL);
    if (result == CUDA_SUCCESS)
        *tid = pid;
    return result;
}

#endif /* NO_CHECKPOINT_API */
