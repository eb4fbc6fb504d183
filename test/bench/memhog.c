/* memhog MIB READY_FILE: dirties MIB MiB of anonymous memory, writes READY_FILE, then sleeps
 * until killed. Every 8-byte word gets the next value of a xorshift64 generator, so no page is
 * zero or equal to another (CRIU can neither skip nor share them).
 * Built by test/bench/checkpoint.sh: gcc -O2 -static -o memhog memhog.c */
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* The buffer escapes through this, so the compiler cannot drop the writes. */
uint64_t *volatile memhog_keep;

static void die(const char *what) {
    fprintf(stderr, "memhog: %s: %s\n", what, strerror(errno));
    exit(1);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: memhog MIB READY_FILE\n");
        return 1;
    }
    char *end;
    errno = 0;
    unsigned long long mib = strtoull(argv[1], &end, 10);
    if (errno || *end || mib == 0 || mib > (1ULL << 20)) {
        fprintf(stderr, "memhog: bad size in MiB: %s\n", argv[1]);
        return 1;
    }
    size_t words = (size_t)(mib << 20) / sizeof(uint64_t);
    uint64_t *buf = malloc(words * sizeof(uint64_t));
    if (!buf)
        die("malloc");
    uint64_t x = 0x9e3779b97f4a7c15ULL ^ (uint64_t)getpid();
    for (size_t i = 0; i < words; i++) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        buf[i] = x;
    }
    memhog_keep = buf;
    FILE *f = fopen(argv[2], "w");
    if (!f)
        die(argv[2]);
    if (fputs("ready\n", f) == EOF || fclose(f) == EOF)
        die(argv[2]);
    for (;;)
        pause();
}
