/*
 * probe_floor: the kernel's uprobe floor. Fires one SDT probe of provider
 * `python`, with the arguments pydtrace passes (CPython's layout), in a loop,
 * so that a consumer counting it under the same bpftrace program as a Python
 * workload measures what a uprobe hit costs by itself.
 *
 *   probe_floor entry|line|gc|instance|cfunction [--wait]
 *
 * Speaks the benchmark harness's line protocol on stdin/stdout (see
 * benches/child.py): READY {"pid", "library"}; "go" -> waits until a consumer
 * raised the probe's semaphore (the other side of the tracer's BEGIN
 * handshake) when started with --wait, then LIVE {}; "run N" -> N events (for gc: N/2 start and done pairs; for
 * instance: N/4 rounds of new-start, new-done, delete-start, delete-done; for
 * cfunction: N/2 entry and return pairs),
 * DONE {"ns", "cpu", "gc": 0} (wall-clock and thread CPU nanoseconds).
 *
 * The probe sites come from <sys/sdt.h> (Debian: systemtap-sdt-dev) with
 * semaphores, as pydtrace's own emitter writes them; like pydtrace's probe
 * functions, the sites do not test the semaphore: the nop is always there.
 */
#define _SDT_HAS_SEMAPHORES 1
#include <sys/sdt.h>

#ifdef PROBE_NOP5
/* The variant with a 5-byte nop at the probe site (the one pydtrace's emitter writes
 * is the 1-byte nop sys/sdt.h writes): kernels with optimized uprobes (x86_64, 6.18
 * here) turn a hit nop5 into a call to a trampoline instead of an int3 trap. */
#undef _SDT_NOP
#define _SDT_NOP .nops 5
#endif

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SEMAPHORE(name) \
    __extension__ volatile unsigned short python_##name##_semaphore __attribute__((unused, section(".probes")))
SEMAPHORE(function__entry);
SEMAPHORE(line);
SEMAPHORE(gc__start);
SEMAPHORE(gc__done);
SEMAPHORE(instance__new__start);
SEMAPHORE(instance__new__done);
SEMAPHORE(instance__delete__start);
SEMAPHORE(instance__delete__done);
SEMAPHORE(cfunction__entry);
SEMAPHORE(cfunction__return);

/* The strings live on the heap, like the UTF-8 buffers of CPython's str objects. */
static char *filename, *funcname, *cname, *cqualname;

static uint64_t clock_ns(clockid_t clock) {
    struct timespec ts;
    clock_gettime(clock, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t now_ns(void) { return clock_ns(CLOCK_MONOTONIC); }


/* One function per probe, arguments in registers: as pydtrace's probe functions are. */
__attribute__((noinline)) static void fire_entry(const char *file, const char *func, int32_t line) {
    STAP_PROBE3(python, function__entry, file, func, line);
}

__attribute__((noinline)) static void fire_line(const char *file, const char *func, int32_t line) {
    STAP_PROBE3(python, line, file, func, line);
}

__attribute__((noinline)) static void fire_gc_start(int32_t generation) {
    STAP_PROBE1(python, gc__start, generation);
}

__attribute__((noinline)) static void fire_gc_done(int64_t collected) {
    STAP_PROBE1(python, gc__done, collected);
}

__attribute__((noinline)) static void fire_instance(const char *cls, const char *file) {
    STAP_PROBE2(python, instance__new__start, cls, file);
}
__attribute__((noinline)) static void fire_instance_new_done(const char *cls, const char *file) {
    STAP_PROBE2(python, instance__new__done, cls, file);
}
__attribute__((noinline)) static void fire_instance_delete_start(const char *cls, const char *file) {
    STAP_PROBE2(python, instance__delete__start, cls, file);
}
__attribute__((noinline)) static void fire_instance_delete_done(const char *cls, const char *file) {
    STAP_PROBE2(python, instance__delete__done, cls, file);
}

__attribute__((noinline)) static void fire_cfunction_entry(const char *file, const char *name, int32_t line,
                                                           const char *qualname) {
    STAP_PROBE4(python, cfunction__entry, file, name, line, qualname);
}
__attribute__((noinline)) static void fire_cfunction_return(const char *file, const char *name, int32_t line,
                                                            const char *qualname) {
    STAP_PROBE4(python, cfunction__return, file, name, line, qualname);
}

static int enabled(const char *kind) {
    if (!strcmp(kind, "entry")) return python_function__entry_semaphore != 0;
    if (!strcmp(kind, "line")) return python_line_semaphore != 0;
    if (!strcmp(kind, "instance"))
        return python_instance__new__start_semaphore && python_instance__new__done_semaphore &&
               python_instance__delete__start_semaphore && python_instance__delete__done_semaphore;
    if (!strcmp(kind, "cfunction"))
        return python_cfunction__entry_semaphore && python_cfunction__return_semaphore;
    return python_gc__start_semaphore != 0 && python_gc__done_semaphore != 0;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s entry|line|gc|instance|cfunction [--wait]\n", argv[0]);
        return 2;
    }
    const char *kind = argv[1];
    int wait = argc > 2 && !strcmp(argv[2], "--wait");
    filename = strdup("/srv/checkout/benches/workloads.py"); /* a path of a checkout's length */
    funcname = strdup("calls.<locals>.leaf");
    cname = strdup("append");
    cqualname = strdup("list.append");
    char exe[4096];
    ssize_t len = readlink("/proc/self/exe", exe, sizeof exe - 1);
    exe[len > 0 ? len : 0] = 0;
    setvbuf(stdout, NULL, _IOLBF, 0);
    printf("READY {\"pid\": %d, \"library\": \"%s\"}\n", (int)getpid(), exe);

    char line[256];
    while (fgets(line, sizeof line, stdin)) {
        if (!strncmp(line, "go", 2)) {
            if (wait) {
                uint64_t deadline = now_ns() + 60ull * 1000000000u;
                struct timespec nap = {0, 1000000};
                while (!enabled(kind)) {
                    if (now_ns() > deadline) {
                        printf("ERROR {\"message\": \"the probe's semaphore was not raised\"}\n");
                        return 3;
                    }
                    nanosleep(&nap, NULL);
                }
            }
            printf("LIVE {}\n");
        } else if (!strncmp(line, "run ", 4)) {
            long n = atol(line + 4);
            uint64_t cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID);
            uint64_t start = now_ns();
            if (!strcmp(kind, "entry")) {
                for (long i = 0; i < n; i++) fire_entry(filename, funcname, (int32_t)i);
            } else if (!strcmp(kind, "instance")) {
                for (long i = 0; i < n; i += 4) {
                    fire_instance(funcname, filename);
                    fire_instance_new_done(funcname, filename);
                    fire_instance_delete_start(funcname, filename);
                    fire_instance_delete_done(funcname, filename);
                }
            } else if (!strcmp(kind, "cfunction")) {
                for (long i = 0; i < n; i += 2) {
                    fire_cfunction_entry(filename, cname, (int32_t)i, cqualname);
                    fire_cfunction_return(filename, cname, (int32_t)i, cqualname);
                }
            } else if (!strcmp(kind, "line")) {
                for (long i = 0; i < n; i++) fire_line(filename, funcname, (int32_t)i);
            } else {
                for (long i = 0; i < n; i += 2) {
                    fire_gc_start((int32_t)((i >> 1) % 3));
                    fire_gc_done(i);
                }
            }
            uint64_t elapsed = now_ns() - start;
            cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID) - cpu;
            printf("DONE {\"ns\": %llu, \"cpu\": %llu, \"gc\": 0}\n", (unsigned long long)elapsed,
                   (unsigned long long)cpu);
        } else if (!strncmp(line, "state", 5)) {
            printf("STATE {}\n");
        } else {
            printf("ERROR {\"message\": \"unknown command\"}\n");
            return 3;
        }
    }
    return 0;
}
