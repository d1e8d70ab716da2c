/* fn-probe: the benchmarks' job, the same program for farmnode and for the systemd floor.
 *
 *   fn-probe stamp FILE   first thing at exec: CLOCK_REALTIME, then /proc/self/cgroup,
 *                         both written to FILE ("<seconds.nanoseconds>\n<cgroup lines>")
 *   fn-probe seq N        the lines "1" .. "N" on stdout (like seq(1), fully buffered)
 *   fn-probe tick S       one short line a second for S seconds (a quiet, long task)
 *   fn-probe -b N ...     Blender-like render output for the progress-parsing job type:
 *                         N-1 "Fra:1 ... | Sample k/1000" lines (k rises 0..999), then "Saved:"
 *                         (the blender job type runs "<blender> -b <file> -s 1 -e 1 ..."; the
 *                         .blend file name carries N)
 *
 * Built statically on the host (bench/run.py) and copied into the container.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static char outbuf[1 << 16];

static int stamp(const char *path) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    char cg[4096];
    size_t n = 0;
    FILE *f = fopen("/proc/self/cgroup", "r");
    if (f) {
        n = fread(cg, 1, sizeof cg - 1, f);
        fclose(f);
    }
    cg[n] = 0;
    FILE *out = fopen(path, "w");
    if (!out)
        return 2;
    fprintf(out, "%lld.%09ld\n%s", (long long)ts.tv_sec, ts.tv_nsec, cg);
    return fclose(out) == 0 ? 0 : 3;
}

int main(int argc, char **argv) {
    if (argc == 3 && strcmp(argv[1], "stamp") == 0)
        return stamp(argv[2]);
    setvbuf(stdout, outbuf, _IOFBF, sizeof outbuf);
    if (argc == 3 && strcmp(argv[1], "seq") == 0) {
        long long n = atoll(argv[2]);
        for (long long i = 1; i <= n; i++)
            printf("%lld\n", i);
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (argc >= 3 && strcmp(argv[1], "-b") == 0) {
        const char *base = strrchr(argv[2], '/');
        long long n = atoll(base ? base + 1 : argv[2]);
        for (long long i = 0; i < n - 1; i++)
            printf("Fra:1 Mem:12.00M (Peak 12.00M) | Time:00:%02lld.%02lld | Sample %lld/1000\n",
                   (i / 100) % 60, i % 100, i * 1000 / (n > 1 ? n - 1 : 1));
        printf("Saved: '/tmp/fn-probe-0001.png'\n");
        return fflush(stdout) == 0 ? 0 : 1;
    }
    if (argc == 3 && strcmp(argv[1], "tick") == 0) {
        long n = atol(argv[2]);
        struct timespec second = {1, 0};
        for (long i = 1; i <= n; i++) {
            printf("tick %ld\n", i);
            fflush(stdout);
            nanosleep(&second, NULL);
        }
        return 0;
    }
    fprintf(stderr, "usage: fn-probe stamp FILE | seq N | tick S | -b N\n");
    return 64;
}
