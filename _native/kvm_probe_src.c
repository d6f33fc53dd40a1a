/*
 * hived KVM probe: decide whether /dev/kvm can really run an ordinary guest.
 *
 * Opening /dev/kvm and asking for the API version is not enough: a
 * paravirtualised KVM (PVM, kvm_pvm.ko) answers every query like a real one,
 * but it cannot run a non-PVM guest natively.  Measured on such a host: it
 * does run tiny guests, through KVM's instruction emulator, at about
 * 2 million instructions per second (hardware KVM: thousands of millions),
 * so `qemu-system-x86_64 -enable-kvm` looks hung forever (a Linux kernel is
 * still decompressing itself minutes later).  So this probe builds a small
 * VM and checks two things:
 *
 *  1. correctness, in real mode:   mov dx, 0x3f8 ; mov al, 'K' ; out dx, al ; hlt
 *     must give KVM_EXIT_IO (out, port 0x3f8, byte 'K') then KVM_EXIT_HLT;
 *  2. native speed, in 64-bit long mode (what a microVM kernel runs in):
 *         mov ecx, N ; 1: dec ecx ; jnz 1b ; mov edx, 0x3f8 ; mov al, 'L' ;
 *         out dx, al ; hlt
 *     must give KVM_EXIT_IO 'L' then KVM_EXIT_HLT, with the 2*N loop
 *     instructions run at >= HIVED_MIN_MIPS million per second of the
 *     probing thread's CPU time (CPU time, so a busy host that deschedules
 *     the probe does not make a hardware KVM look slow).
 *
 * The probe is bounded in time: a per-thread POSIX timer sends SIGALRM to the
 * probing thread (handler installed WITHOUT SA_RESTART, so KVM_RUN returns
 * EINTR); the handler also sets kvm_run->immediate_exit, closing the race
 * where the signal lands just before KVM_RUN is entered.  The timer re-fires
 * every 50 ms after the deadline, in case one signal was absorbed.  The
 * previous SIGALRM disposition and signal mask are restored before return.
 * Callers that must survive a kernel that blocks uninterruptibly should run
 * the probe in a child process (hived.kvm does).
 *
 * All KVM constants and structures come from <linux/kvm.h>.
 * Built by _native/kvm_build.py (cffi API mode) into hived._kvm.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* strerrorname_np, gettid; Python.h already defines it */
#endif
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <linux/kvm.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid /* glibc < 2.41 lacks the name */
#endif

#define HIVED_KVM_REASON_LEN 320
#define HIVED_KVM_MAX_EXITS 8
#define HIVED_KVM_MAX_EXT 16

/* Speed test: 2 * HIVED_LOOP_N instructions must run at >= HIVED_MIN_MIPS
 * million/s.  Hardware KVM: ~0.1 ms (1000+ M/s); PVM emulation: ~150 ms
 * (~2 M/s).  The threshold sits a factor ~10 above the emulator and ~50
 * below the slowest hardware, nested or not. */
#define HIVED_LOOP_N (1u << 17)
#define HIVED_MIN_MIPS 20

/* Guest layout: 64 KiB of RAM at guest-physical 0. */
#define HIVED_GUEST_SIZE 0x10000u
#define HIVED_CODE16 0x1000u /* real-mode code */
#define HIVED_CODE64 0x1100u /* long-mode code */
#define HIVED_PML4 0x2000u   /* identity map of the first 2 MiB: */
#define HIVED_PDPT 0x3000u   /*   PML4[0] -> PDPT[0] -> PD[0] = 2 MiB page at 0 */
#define HIVED_PD 0x4000u
#define HIVED_GUEST_PORT 0x3f8u
#define HIVED_BYTE16 'K'
#define HIVED_BYTE64 'L'
/* Three pages just below 4 GiB, the address QEMU and Firecracker use. */
#define HIVED_TSS_ADDR 0xfffbd000ul

/* Architectural bits (not in <linux/kvm.h>). */
#define HIVED_CR0_PE (1ull << 0)
#define HIVED_CR0_MP (1ull << 1)
#define HIVED_CR0_ET (1ull << 4)
#define HIVED_CR0_NE (1ull << 5)
#define HIVED_CR0_WP (1ull << 16)
#define HIVED_CR0_AM (1ull << 18)
#define HIVED_CR0_PG (1ull << 31)
#define HIVED_CR4_PAE (1ull << 5)
#define HIVED_EFER_LME (1ull << 8)
#define HIVED_EFER_LMA (1ull << 10)
#define HIVED_PTE_P (1ull << 0)
#define HIVED_PTE_RW (1ull << 1)
#define HIVED_PTE_PS (1ull << 7)

struct hived_kvm_result {
    int present;                    /* device opened */
    int api_version;                /* KVM_GET_API_VERSION, -1 if not read */
    int n_ext;                      /* entries used in ext[] */
    int ext[HIVED_KVM_MAX_EXT];     /* KVM_CHECK_EXTENSION (>0: yes), -1 unknown */
    int vm_created;
    int vcpu_created;
    int real_mode_ok;               /* phase 1: OUT 0x3f8 'K' then HLT */
    int long_mode_ok;               /* phase 2: loop, OUT 0x3f8 'L' then HLT */
    int guest_runs;                 /* both phases, at native speed */
    int timed_out;
    int n_exits;                    /* entries used in exits[] */
    int exits[HIVED_KVM_MAX_EXITS]; /* kvm_run.exit_reason of each KVM_RUN */
    int err;                        /* errno of what failed, 0 if nothing */
    double guest_mips;              /* phase 2 speed, M instr/s of CPU time; 0 if unknown */
    double loop_cpu_ms;             /* phase 2 loop, thread CPU time */
    double elapsed_ms;              /* whole probe, wall clock */
    char reason[HIVED_KVM_REASON_LEN];
};

static const struct {
    const char *name;
    long cap;
} hived_caps[] = {
    {"KVM_CAP_USER_MEMORY", KVM_CAP_USER_MEMORY},
    {"KVM_CAP_SET_TSS_ADDR", KVM_CAP_SET_TSS_ADDR},
    {"KVM_CAP_EXT_CPUID", KVM_CAP_EXT_CPUID},
    {"KVM_CAP_IRQCHIP", KVM_CAP_IRQCHIP},
    {"KVM_CAP_HLT", KVM_CAP_HLT},
#ifdef KVM_CAP_IMMEDIATE_EXIT
    {"KVM_CAP_IMMEDIATE_EXIT", KVM_CAP_IMMEDIATE_EXIT},
#endif
#ifdef KVM_CAP_IRQFD
    {"KVM_CAP_IRQFD", KVM_CAP_IRQFD},
#endif
#ifdef KVM_CAP_IOEVENTFD
    {"KVM_CAP_IOEVENTFD", KVM_CAP_IOEVENTFD},
#endif
#ifdef KVM_CAP_PIT2
    {"KVM_CAP_PIT2", KVM_CAP_PIT2},
#endif
#ifdef KVM_CAP_MP_STATE
    {"KVM_CAP_MP_STATE", KVM_CAP_MP_STATE},
#endif
#ifdef KVM_CAP_XSAVE
    {"KVM_CAP_XSAVE", KVM_CAP_XSAVE},
#endif
#ifdef KVM_CAP_ADJUST_CLOCK
    {"KVM_CAP_ADJUST_CLOCK", KVM_CAP_ADJUST_CLOCK},
#endif
};
#define HIVED_N_CAPS ((int)(sizeof(hived_caps) / sizeof(hived_caps[0])))
_Static_assert(HIVED_N_CAPS <= HIVED_KVM_MAX_EXT, "grow HIVED_KVM_MAX_EXT");

int hived_kvm_n_ext(void)
{
    return HIVED_N_CAPS;
}

const char *hived_kvm_ext_name(int i)
{
    return (i >= 0 && i < HIVED_N_CAPS) ? hived_caps[i].name : NULL;
}

const char *hived_kvm_exit_name(int reason)
{
    switch (reason) {
#define HIVED_EXIT(x) case x: return #x;
    HIVED_EXIT(KVM_EXIT_UNKNOWN)
    HIVED_EXIT(KVM_EXIT_EXCEPTION)
    HIVED_EXIT(KVM_EXIT_IO)
    HIVED_EXIT(KVM_EXIT_HYPERCALL)
    HIVED_EXIT(KVM_EXIT_DEBUG)
    HIVED_EXIT(KVM_EXIT_HLT)
    HIVED_EXIT(KVM_EXIT_MMIO)
    HIVED_EXIT(KVM_EXIT_IRQ_WINDOW_OPEN)
    HIVED_EXIT(KVM_EXIT_SHUTDOWN)
    HIVED_EXIT(KVM_EXIT_FAIL_ENTRY)
    HIVED_EXIT(KVM_EXIT_INTR)
    HIVED_EXIT(KVM_EXIT_SET_TPR)
    HIVED_EXIT(KVM_EXIT_TPR_ACCESS)
    HIVED_EXIT(KVM_EXIT_NMI)
    HIVED_EXIT(KVM_EXIT_INTERNAL_ERROR)
#ifdef KVM_EXIT_SYSTEM_EVENT
    HIVED_EXIT(KVM_EXIT_SYSTEM_EVENT)
#endif
#ifdef KVM_EXIT_X86_RDMSR
    HIVED_EXIT(KVM_EXIT_X86_RDMSR)
    HIVED_EXIT(KVM_EXIT_X86_WRMSR)
#endif
#ifdef KVM_EXIT_X86_BUS_LOCK
    HIVED_EXIT(KVM_EXIT_X86_BUS_LOCK)
#endif
#ifdef KVM_EXIT_NOTIFY
    HIVED_EXIT(KVM_EXIT_NOTIFY)
#endif
#undef HIVED_EXIT
    default:
        return "KVM_EXIT_?";
    }
}

/* ---- bounded time: SIGALRM from a thread-directed POSIX timer ---------- */

static pthread_mutex_t hived_probe_lock = PTHREAD_MUTEX_INITIALIZER;
static volatile sig_atomic_t hived_fired;
static struct kvm_run *volatile hived_run; /* non-NULL only while mapped */
static int hived_timer_token;              /* its address tags our timer's signals */

static void hived_on_alarm(int sig, siginfo_t *info, void *uctx)
{
    struct kvm_run *run = hived_run;

    (void)sig;
    (void)uctx;
    if (info->si_code != SI_TIMER || info->si_value.sival_ptr != &hived_timer_token)
        return; /* someone else's SIGALRM: not our deadline */
    hived_fired = 1;
    /* Safe: hived_run is cleared (with SIGALRM blocked) before the area is unmapped. */
    if (run)
        run->immediate_exit = 1;
}

struct hived_alarm {
    int armed;
    timer_t timer;
    struct sigaction old_action;
    sigset_t old_mask;
};

static int hived_alarm_arm(struct hived_alarm *a, int timeout_ms)
{
    struct sigaction sa;
    struct sigevent sev;
    struct itimerspec its;
    sigset_t only_alrm;

    memset(a, 0, sizeof(*a));
    hived_fired = 0;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = hived_on_alarm;
    sa.sa_flags = SA_SIGINFO; /* no SA_RESTART: KVM_RUN must return EINTR */
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGALRM, &sa, &a->old_action) < 0)
        return -1;
    sigemptyset(&only_alrm);
    sigaddset(&only_alrm, SIGALRM);
    pthread_sigmask(SIG_UNBLOCK, &only_alrm, &a->old_mask);

    memset(&sev, 0, sizeof(sev));
    sev.sigev_notify = SIGEV_THREAD_ID; /* to this thread, the one in KVM_RUN */
    sev.sigev_signo = SIGALRM;
    sev.sigev_notify_thread_id = gettid();
    sev.sigev_value.sival_ptr = &hived_timer_token;
    if (timer_create(CLOCK_MONOTONIC, &sev, &a->timer) < 0)
        goto undo;
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = timeout_ms / 1000;
    its.it_value.tv_nsec = (long)(timeout_ms % 1000) * 1000000L;
    its.it_interval.tv_nsec = 50L * 1000000L; /* keep kicking a stuck vCPU */
    if (timer_settime(a->timer, 0, &its, NULL) < 0) {
        timer_delete(a->timer);
        goto undo;
    }
    a->armed = 1;
    return 0;

undo: {
        int e = errno;
        sigaction(SIGALRM, &a->old_action, NULL);
        pthread_sigmask(SIG_SETMASK, &a->old_mask, NULL);
        errno = e;
        return -1;
    }
}

static void hived_alarm_disarm(struct hived_alarm *a)
{
    sigset_t only_alrm, pending;
    struct timespec zero = {0, 0};

    if (!a->armed)
        return;
    sigemptyset(&only_alrm);
    sigaddset(&only_alrm, SIGALRM);
    pthread_sigmask(SIG_BLOCK, &only_alrm, NULL);
    hived_run = NULL;
    timer_delete(a->timer);
    /* Swallow an expiry that became pending while blocked, so the restored
     * disposition (often SIG_DFL: terminate) never sees our signal. */
    while (sigpending(&pending) == 0 && sigismember(&pending, SIGALRM) == 1) {
        if (sigtimedwait(&only_alrm, NULL, &zero) < 0)
            break;
    }
    sigaction(SIGALRM, &a->old_action, NULL);
    pthread_sigmask(SIG_SETMASK, &a->old_mask, NULL);
    a->armed = 0;
}

/* ---- helpers ------------------------------------------------------------ */

static double hived_now_ms(clockid_t clock)
{
    struct timespec ts;

    clock_gettime(clock, &ts);
    return (double)ts.tv_sec * 1000.0 + (double)ts.tv_nsec / 1e6;
}

static void hived_reason(struct hived_kvm_result *out, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));

static void hived_reason(struct hived_kvm_result *out, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(out->reason, sizeof(out->reason), fmt, ap);
    va_end(ap);
}

static const char *hived_ename(int e)
{
    const char *n = strerrorname_np(e);

    return n ? n : "E?";
}

/* Record a failed call: "<what> failed: EPERM (Operation not permitted)". */
static void hived_fail(struct hived_kvm_result *out, const char *what, int e, int timeout_ms)
{
    out->err = e;
    if (e == EINTR && hived_fired) {
        out->timed_out = 1;
        out->err = ETIMEDOUT;
        hived_reason(out, "%s interrupted: timed out after %d ms", what, timeout_ms);
        return;
    }
    hived_reason(out, "%s failed: %s (%s)", what, hived_ename(e), strerror(e));
}

static void hived_timeout(struct hived_kvm_result *out, int timeout_ms, const char *what)
{
    out->timed_out = 1;
    out->err = ETIMEDOUT;
    hived_reason(out, "KVM_RUN timed out after %d ms: %s", timeout_ms, what);
}

/* Describe an exit that is not the one expected at this point. */
static void hived_bad_exit(struct hived_kvm_result *out, const struct kvm_run *run,
                           const char *phase, const char *expected)
{
    int r = (int)run->exit_reason;
    const char *name = hived_kvm_exit_name(r);

    out->err = 0;
    switch (r) {
    case KVM_EXIT_INTERNAL_ERROR:
        hived_reason(out, "%s: unexpected exit reason %d (%s, suberror %u), expected %s", phase,
                     r, name, run->internal.suberror, expected);
        break;
    case KVM_EXIT_FAIL_ENTRY:
        hived_reason(out,
                     "%s: unexpected exit reason %d (%s, hardware reason 0x%llx), expected %s",
                     phase, r, name,
                     (unsigned long long)run->fail_entry.hardware_entry_failure_reason, expected);
        break;
    case KVM_EXIT_UNKNOWN:
        hived_reason(out,
                     "%s: unexpected exit reason %d (%s, hardware reason 0x%llx), expected %s",
                     phase, r, name, (unsigned long long)run->hw.hardware_exit_reason, expected);
        break;
    case KVM_EXIT_SHUTDOWN:
        hived_reason(out, "%s: unexpected exit reason %d (%s: guest triple-faulted), expected %s",
                     phase, r, name, expected);
        break;
    case KVM_EXIT_MMIO:
        hived_reason(out, "%s: unexpected exit reason %d (%s at 0x%llx), expected %s", phase, r,
                     name, (unsigned long long)run->mmio.phys_addr, expected);
        break;
    default:
        hived_reason(out, "%s: unexpected exit reason %d (%s), expected %s", phase, r, name,
                     expected);
        break;
    }
}

/* ---- the guest ---------------------------------------------------------- */

static const unsigned char hived_code16[] = {
    0xba, HIVED_GUEST_PORT & 0xff, HIVED_GUEST_PORT >> 8, /* mov dx, 0x3f8 */
    0xb0, HIVED_BYTE16,                                   /* mov al, 'K'   */
    0xee,                                                 /* out dx, al    */
    0xf4,                                                 /* hlt           */
};

static const unsigned char hived_code64[] = {
    0xb9, HIVED_LOOP_N & 0xff, (HIVED_LOOP_N >> 8) & 0xff, /* mov ecx, N       */
    (HIVED_LOOP_N >> 16) & 0xff, HIVED_LOOP_N >> 24,
    0xff, 0xc9,                                            /* 1: dec ecx       */
    0x75, 0xfc,                                            /* jnz 1b           */
    0xba, HIVED_GUEST_PORT & 0xff, HIVED_GUEST_PORT >> 8,  /* mov edx, 0x3f8   */
    0x00, 0x00,
    0xb0, HIVED_BYTE64,                                    /* mov al, 'L'      */
    0xee,                                                  /* out dx, al       */
    0xf4,                                                  /* hlt              */
};

struct hived_vm {
    int kvm, vm, vcpu, mmap_size;
    unsigned char *mem;  /* guest RAM, MAP_FAILED if not mapped */
    struct kvm_run *run; /* vCPU run area, MAP_FAILED if not mapped */
};

static int hived_has_cap(const struct hived_kvm_result *out, long cap)
{
    int i;

    for (i = 0; i < HIVED_N_CAPS; i++)
        if (hived_caps[i].cap == cap)
            return out->ext[i] > 0;
    return 0;
}

/* KVM_RUN until the vCPU exits, riding out foreign signals.  0: it exited
 * (recorded in out->exits); -1: failed (errno) or our deadline passed. */
static int hived_kvm_run(struct hived_vm *v, struct hived_kvm_result *out)
{
    for (;;) {
        int r;

        if (hived_fired) {
            errno = EINTR;
            return -1;
        }
        /* Safe: KVM_RUN takes no argument; results land in the mapped run area. */
        r = ioctl(v->vcpu, KVM_RUN, 0UL);
        if (r >= 0) {
            if (out->n_exits < HIVED_KVM_MAX_EXITS)
                out->exits[out->n_exits++] = (int)v->run->exit_reason;
            return 0;
        }
        if ((errno == EINTR || errno == EAGAIN) && !hived_fired)
            continue; /* another signal; our deadline has not passed */
        return -1;
    }
}

/* 0 if the last exit is the guest's one-byte OUT of `byte` to HIVED_GUEST_PORT. */
static int hived_expect_out(const struct hived_vm *v, struct hived_kvm_result *out,
                            const char *phase, unsigned char byte)
{
    const struct kvm_run *run = v->run;
    unsigned char got;

    if (run->exit_reason != KVM_EXIT_IO) {
        hived_bad_exit(out, run, phase, "KVM_EXIT_IO");
        return -1;
    }
    if (run->io.direction != KVM_EXIT_IO_OUT || run->io.size != 1 || run->io.count != 1 ||
        run->io.port != HIVED_GUEST_PORT) {
        hived_reason(out,
                     "%s: KVM_EXIT_IO is not the guest's OUT: direction %u size %u count %u "
                     "port 0x%x (expected out, 1, 1, 0x%x)",
                     phase, run->io.direction, run->io.size, run->io.count, run->io.port,
                     HIVED_GUEST_PORT);
        return -1;
    }
    if (run->io.data_offset >= (__u64)v->mmap_size) {
        hived_reason(out, "%s: KVM_EXIT_IO data offset %llu outside the %d-byte run area", phase,
                     (unsigned long long)run->io.data_offset, v->mmap_size);
        return -1;
    }
    /* Safe: data_offset was just checked to lie inside the mapped run area. */
    got = *((const unsigned char *)run + run->io.data_offset);
    if (got != byte) {
        hived_reason(out, "%s: guest wrote 0x%02x to port 0x%x, expected 0x%02x ('%c')", phase,
                     got, HIVED_GUEST_PORT, byte, byte);
        return -1;
    }
    return 0;
}

static int hived_expect_hlt(const struct hived_vm *v, struct hived_kvm_result *out,
                            const char *phase)
{
    if (v->run->exit_reason != KVM_EXIT_HLT) {
        hived_bad_exit(out, v->run, phase, "KVM_EXIT_HLT");
        return -1;
    }
    return 0;
}

/* Identity-map the first 2 MiB and switch the vCPU's registers to 64-bit mode. */
static void hived_long_mode_sregs(struct hived_vm *v, struct kvm_sregs *s)
{
    /* Safe: each table is a page-aligned page inside the HIVED_GUEST_SIZE mapping. */
    uint64_t *pml4 = (uint64_t *)(void *)(v->mem + HIVED_PML4);
    uint64_t *pdpt = (uint64_t *)(void *)(v->mem + HIVED_PDPT); /* Safe: as above. */
    uint64_t *pd = (uint64_t *)(void *)(v->mem + HIVED_PD);     /* Safe: as above. */
    struct kvm_segment seg;

    pml4[0] = HIVED_PDPT | HIVED_PTE_P | HIVED_PTE_RW;
    pdpt[0] = HIVED_PD | HIVED_PTE_P | HIVED_PTE_RW;
    pd[0] = 0 | HIVED_PTE_P | HIVED_PTE_RW | HIVED_PTE_PS;

    s->cr3 = HIVED_PML4;
    s->cr4 = HIVED_CR4_PAE;
    s->cr0 = HIVED_CR0_PE | HIVED_CR0_MP | HIVED_CR0_ET | HIVED_CR0_NE | HIVED_CR0_WP |
             HIVED_CR0_AM | HIVED_CR0_PG;
    s->efer = HIVED_EFER_LME | HIVED_EFER_LMA;

    memset(&seg, 0, sizeof(seg));
    seg.base = 0;
    seg.limit = 0xffffffff;
    seg.selector = 1 << 3;
    seg.present = 1;
    seg.type = 11; /* code: execute, read, accessed */
    seg.dpl = 0;
    seg.db = 0;
    seg.s = 1;
    seg.l = 1;
    seg.g = 1;
    s->cs = seg;
    seg.type = 3; /* data: read, write, accessed */
    seg.selector = 2 << 3;
    s->ds = s->es = s->fs = s->gs = s->ss = seg;
}

/* Phase 1: real mode, OUT 'K' then HLT.  0 on success. */
static int hived_phase_real(struct hived_vm *v, struct hived_kvm_result *out, int timeout_ms)
{
    static const char phase[] = "real-mode guest";
    struct kvm_sregs sregs;
    struct kvm_regs regs;

    /* Safe: &sregs is a live struct kvm_sregs the kernel fills in. */
    if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0) {
        hived_fail(out, "KVM_GET_SREGS", errno, timeout_ms);
        return -1;
    }
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    /* Safe: &sregs is the struct just read back, with only cs changed. */
    if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0) {
        hived_fail(out, "KVM_SET_SREGS (real mode)", errno, timeout_ms);
        return -1;
    }
    memset(&regs, 0, sizeof(regs));
    regs.rip = HIVED_CODE16;
    regs.rflags = 0x2; /* bit 1 is reserved and must be set */
    /* Safe: &regs is a live, fully initialised struct kvm_regs. */
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0) {
        hived_fail(out, "KVM_SET_REGS (real mode)", errno, timeout_ms);
        return -1;
    }

    if (hived_kvm_run(v, out) < 0) {
        if (hived_fired)
            hived_timeout(out, timeout_ms, "vCPU never exited (paravirtualised KVM?)");
        else
            hived_fail(out, "KVM_RUN", errno, timeout_ms);
        return -1;
    }
    if (hived_expect_out(v, out, phase, HIVED_BYTE16) < 0)
        return -1;
    if (hived_kvm_run(v, out) < 0) {
        if (hived_fired)
            hived_timeout(out, timeout_ms, "real-mode guest did OUT but never reached HLT");
        else
            hived_fail(out, "KVM_RUN", errno, timeout_ms);
        return -1;
    }
    if (hived_expect_hlt(v, out, phase) < 0)
        return -1;
    out->real_mode_ok = 1;
    return 0;
}

/* Phase 2: 64-bit mode, a 2*N-instruction loop, OUT 'L' then HLT, at native speed. */
static int hived_phase_long(struct hived_vm *v, struct hived_kvm_result *out, int timeout_ms)
{
    static const char phase[] = "64-bit guest";
    struct kvm_sregs sregs;
    struct kvm_regs regs;
    double cpu0, wall0, cpu_ms, wall_ms, insns = 2.0 * HIVED_LOOP_N;
    int r;

    /* Safe: &sregs is a live struct kvm_sregs the kernel fills in. */
    if (ioctl(v->vcpu, KVM_GET_SREGS, &sregs) < 0) {
        hived_fail(out, "KVM_GET_SREGS", errno, timeout_ms);
        return -1;
    }
    hived_long_mode_sregs(v, &sregs);
    /* Safe: &sregs is the struct just read back, with modes, tables and segments set. */
    if (ioctl(v->vcpu, KVM_SET_SREGS, &sregs) < 0) {
        hived_fail(out, "KVM_SET_SREGS (64-bit mode)", errno, timeout_ms);
        return -1;
    }
    memset(&regs, 0, sizeof(regs));
    regs.rip = HIVED_CODE64;
    regs.rsp = HIVED_GUEST_SIZE;
    regs.rflags = 0x2;
    /* Safe: &regs is a live, fully initialised struct kvm_regs. */
    if (ioctl(v->vcpu, KVM_SET_REGS, &regs) < 0) {
        hived_fail(out, "KVM_SET_REGS (64-bit mode)", errno, timeout_ms);
        return -1;
    }

    cpu0 = hived_now_ms(CLOCK_THREAD_CPUTIME_ID);
    wall0 = hived_now_ms(CLOCK_MONOTONIC);
    r = hived_kvm_run(v, out);
    cpu_ms = hived_now_ms(CLOCK_THREAD_CPUTIME_ID) - cpu0;
    wall_ms = hived_now_ms(CLOCK_MONOTONIC) - wall0;
    if (cpu_ms <= 0.0)
        cpu_ms = wall_ms; /* no thread CPU clock: fall back to wall time */
    if (cpu_ms < 1e-3)
        cpu_ms = 1e-3;
    out->loop_cpu_ms = cpu_ms;
    if (r < 0) {
        int e = errno;
        char what[200];

        if (!hived_fired) {
            hived_fail(out, "KVM_RUN", e, timeout_ms);
            return -1;
        }
        /* Safe: &regs is a live struct kvm_regs the kernel fills in (vCPU is not running). */
        if (ioctl(v->vcpu, KVM_GET_REGS, &regs) == 0 && regs.rcx <= HIVED_LOOP_N) {
            double done = (double)(HIVED_LOOP_N - regs.rcx);

            out->guest_mips = 2.0 * done / (cpu_ms * 1000.0);
            if (out->guest_mips < HIVED_MIN_MIPS)
                snprintf(what, sizeof(what),
                         "64-bit guest ran %.0f of %u loop iterations (~%.1f M instr/s, need >= "
                         "%d): instructions are emulated, not run natively "
                         "(paravirtualised KVM?)",
                         done, HIVED_LOOP_N, out->guest_mips, HIVED_MIN_MIPS);
            else
                snprintf(what, sizeof(what),
                         "64-bit guest ran %.0f of %u loop iterations (~%.1f M instr/s) before "
                         "the deadline: timeout too short?",
                         done, HIVED_LOOP_N, out->guest_mips);
        } else {
            snprintf(what, sizeof(what), "64-bit guest never exited (paravirtualised KVM?)");
        }
        hived_timeout(out, timeout_ms, what);
        return -1;
    }
    out->guest_mips = insns / (cpu_ms * 1000.0);
    if (hived_expect_out(v, out, phase, HIVED_BYTE64) < 0)
        return -1;
    /* Safe: &regs is a live struct kvm_regs the kernel fills in (vCPU is not running). */
    if (ioctl(v->vcpu, KVM_GET_REGS, &regs) < 0) {
        hived_fail(out, "KVM_GET_REGS", errno, timeout_ms);
        return -1;
    }
    if (regs.rcx != 0) {
        hived_reason(out, "64-bit guest reached its OUT with rcx=%llu, expected 0",
                     (unsigned long long)regs.rcx);
        return -1;
    }
    if (hived_kvm_run(v, out) < 0) {
        if (hived_fired)
            hived_timeout(out, timeout_ms, "64-bit guest did OUT but never reached HLT");
        else
            hived_fail(out, "KVM_RUN", errno, timeout_ms);
        return -1;
    }
    if (hived_expect_hlt(v, out, phase) < 0)
        return -1;
    out->long_mode_ok = 1;
    if (out->guest_mips < HIVED_MIN_MIPS) {
        hived_reason(out,
                     "guest runs, but only at %.1f M instr/s (need >= %d; %u-iteration loop took "
                     "%.1f ms of CPU): instructions are emulated, not run natively "
                     "(paravirtualised KVM?)",
                     out->guest_mips, HIVED_MIN_MIPS, HIVED_LOOP_N, cpu_ms);
        return -1;
    }
    return 0;
}

/* ---- the probe ---------------------------------------------------------- */

/*
 * Returns 0 if the guest ran natively, -1 otherwise (out->reason says why).
 * out is always fully written (if non-NULL).  Never blocks much longer than
 * timeout_ms unless the kernel itself ignores signals.
 */
int hived_kvm_probe(const char *dev_path, int timeout_ms, struct hived_kvm_result *out)
{
    struct hived_vm v = {-1, -1, -1, 0, MAP_FAILED, MAP_FAILED};
    struct hived_alarm alarm_state;
    struct kvm_userspace_memory_region region;
    double start = hived_now_ms(CLOCK_MONOTONIC);
    int i, r;

    if (!out)
        return -1;
    memset(out, 0, sizeof(*out));
    memset(&alarm_state, 0, sizeof(alarm_state));
    out->api_version = -1;
    out->n_ext = HIVED_N_CAPS;
    for (i = 0; i < HIVED_KVM_MAX_EXT; i++)
        out->ext[i] = -1;
    if (!dev_path || !*dev_path) {
        out->err = EINVAL;
        hived_reason(out, "no device path given");
        return -1;
    }
    if (timeout_ms < 1)
        timeout_ms = 1;
    if (timeout_ms > 600000)
        timeout_ms = 600000;

    pthread_mutex_lock(&hived_probe_lock); /* one probe per process at a time: shared SIGALRM */
    hived_fired = 0;

    v.kvm = open(dev_path, O_RDWR | O_CLOEXEC);
    if (v.kvm < 0) {
        out->err = errno;
        hived_reason(out, "cannot open %s: %s (%s)", dev_path, hived_ename(errno),
                     strerror(errno));
        goto done;
    }
    out->present = 1;

    /* Safe: KVM_GET_API_VERSION takes no argument and only returns an int. */
    r = ioctl(v.kvm, KVM_GET_API_VERSION, 0);
    if (r < 0) {
        hived_fail(out, "KVM_GET_API_VERSION", errno, timeout_ms);
        goto done;
    }
    out->api_version = r;
    if (r != KVM_API_VERSION) {
        hived_reason(out, "KVM API version %d, expected %d", r, KVM_API_VERSION);
        goto done;
    }
    for (i = 0; i < HIVED_N_CAPS; i++) {
        /* Safe: KVM_CHECK_EXTENSION takes the capability number by value. */
        r = ioctl(v.kvm, KVM_CHECK_EXTENSION, hived_caps[i].cap);
        out->ext[i] = r < 0 ? -1 : r;
    }

    if (hived_alarm_arm(&alarm_state, timeout_ms) < 0) {
        out->err = errno;
        hived_reason(out, "cannot arm the probe timer: %s (%s)", hived_ename(errno),
                     strerror(errno));
        goto done;
    }

    /* Safe: KVM_CREATE_VM takes the machine type by value (0 = default). */
    v.vm = ioctl(v.kvm, KVM_CREATE_VM, 0UL);
    if (v.vm < 0) {
        hived_fail(out, "KVM_CREATE_VM", errno, timeout_ms);
        goto done;
    }
    out->vm_created = 1;

    /* Intel without unrestricted guest needs a TSS to emulate real mode. */
    if (hived_has_cap(out, KVM_CAP_SET_TSS_ADDR)) {
        /* Safe: KVM_SET_TSS_ADDR takes a guest-physical address by value. */
        if (ioctl(v.vm, KVM_SET_TSS_ADDR, HIVED_TSS_ADDR) < 0) {
            hived_fail(out, "KVM_SET_TSS_ADDR", errno, timeout_ms);
            goto done;
        }
    }

    /* Safe: a fresh anonymous mapping; its (void *) converts to unsigned char * implicitly. */
    v.mem = mmap(NULL, HIVED_GUEST_SIZE, PROT_READ | PROT_WRITE,
                 MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (v.mem == MAP_FAILED) {
        hived_fail(out, "mmap of guest memory", errno, timeout_ms);
        goto done;
    }
    memcpy(v.mem + HIVED_CODE16, hived_code16, sizeof(hived_code16)); /* fits: 7 bytes */
    memcpy(v.mem + HIVED_CODE64, hived_code64, sizeof(hived_code64)); /* fits: 18 bytes */

    memset(&region, 0, sizeof(region));
    region.slot = 0;
    region.guest_phys_addr = 0;
    region.memory_size = HIVED_GUEST_SIZE;
    region.userspace_addr = (uintptr_t)v.mem; /* Safe: the ABI carries host pointers as __u64. */
    /* Safe: &region is a live, fully initialised struct of the type the ioctl reads. */
    if (ioctl(v.vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
        hived_fail(out, "KVM_SET_USER_MEMORY_REGION", errno, timeout_ms);
        goto done;
    }

    /* Safe: KVM_CREATE_VCPU takes the vCPU id by value. */
    v.vcpu = ioctl(v.vm, KVM_CREATE_VCPU, 0UL);
    if (v.vcpu < 0) {
        hived_fail(out, "KVM_CREATE_VCPU", errno, timeout_ms);
        goto done;
    }
    out->vcpu_created = 1;

    /* Safe: KVM_GET_VCPU_MMAP_SIZE takes no argument and only returns an int. */
    v.mmap_size = ioctl(v.kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (v.mmap_size < 0) {
        hived_fail(out, "KVM_GET_VCPU_MMAP_SIZE", errno, timeout_ms);
        goto done;
    }
    if ((size_t)v.mmap_size < sizeof(struct kvm_run)) {
        hived_reason(out, "KVM_GET_VCPU_MMAP_SIZE returned %d, smaller than struct kvm_run (%zu)",
                     v.mmap_size, sizeof(struct kvm_run));
        goto done;
    }
    /* Safe: the vCPU fd maps mmap_size >= sizeof(struct kvm_run) bytes, page aligned. */
    v.run = (struct kvm_run *)mmap(NULL, (size_t)v.mmap_size, PROT_READ | PROT_WRITE,
                                   MAP_SHARED, v.vcpu, 0);
    if (v.run == MAP_FAILED) {
        hived_fail(out, "mmap of the vCPU run area", errno, timeout_ms);
        goto done;
    }
    hived_run = v.run;
    if (hived_fired) /* deadline passed before the handler could see the run area */
        v.run->immediate_exit = 1;

    if (hived_phase_real(&v, out, timeout_ms) < 0)
        goto done;
    if (hived_phase_long(&v, out, timeout_ms) < 0)
        goto done;
    out->guest_runs = 1;
    hived_reason(out,
                 "guest ran: real-mode OUT 0x%x '%c' + HLT, 64-bit loop at %.0f M instr/s + "
                 "OUT '%c' + HLT",
                 HIVED_GUEST_PORT, HIVED_BYTE16, out->guest_mips, HIVED_BYTE64);

done:
    hived_alarm_disarm(&alarm_state); /* also clears hived_run */
    hived_run = NULL;
    if (v.run != MAP_FAILED)
        munmap(v.run, (size_t)v.mmap_size);
    if (v.vcpu >= 0)
        close(v.vcpu);
    if (v.vm >= 0)
        close(v.vm);
    if (v.mem != MAP_FAILED)
        munmap(v.mem, HIVED_GUEST_SIZE); /* after the VM is gone: nothing maps it any more */
    if (v.kvm >= 0)
        close(v.kvm);
    out->elapsed_ms = hived_now_ms(CLOCK_MONOTONIC) - start;
    pthread_mutex_unlock(&hived_probe_lock);
    return out->guest_runs ? 0 : -1;
}
