/*
 * hived KVM probe: decide whether /dev/kvm can really run an ordinary guest.
 *
 * Opening /dev/kvm and asking for the API version is not enough: a
 * paravirtualised KVM (PVM) answers every query like a real one, but a
 * hardware-virtualised guest never runs on it (qemu -enable-kvm just hangs).
 * So this probe builds a one-page real-mode VM, runs it, and checks that it
 * does exactly what its four instructions say:
 *
 *     mov dx, 0x3f8 ; mov al, 'K' ; out dx, al ; hlt
 *
 * i.e. a KVM_EXIT_IO (out, port 0x3f8, byte 'K') followed by a KVM_EXIT_HLT.
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
 * All constants and structures come from <linux/kvm.h>.
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

#define HIVED_KVM_REASON_LEN 256
#define HIVED_KVM_MAX_EXITS 8
#define HIVED_KVM_MAX_EXT 16

/* Guest layout: one page of RAM at guest-physical 0x1000, code at its start. */
#define HIVED_GUEST_ADDR 0x1000u
#define HIVED_GUEST_SIZE 0x1000u
#define HIVED_GUEST_PORT 0x3f8u
#define HIVED_GUEST_BYTE 'K'
/* Three pages just below 4 GiB, the address QEMU and Firecracker use. */
#define HIVED_TSS_ADDR 0xfffbd000ul

struct hived_kvm_result {
    int present;                    /* device opened */
    int api_version;                /* KVM_GET_API_VERSION, -1 if not read */
    int n_ext;                      /* entries used in ext[] */
    int ext[HIVED_KVM_MAX_EXT];     /* KVM_CHECK_EXTENSION (>0: yes), -1 unknown */
    int vm_created;
    int vcpu_created;
    int guest_runs;                 /* saw OUT 0x3f8 'K' then HLT */
    int timed_out;
    int n_exits;                    /* entries used in exits[] */
    int exits[HIVED_KVM_MAX_EXITS]; /* kvm_run.exit_reason of each KVM_RUN */
    int err;                        /* errno of what failed, 0 if nothing */
    double elapsed_ms;
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

static double hived_now_ms(void)
{
    struct timespec ts;

    clock_gettime(CLOCK_MONOTONIC, &ts);
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

/* Describe an exit that is not the one expected at this point. */
static void hived_bad_exit(struct hived_kvm_result *out, const struct kvm_run *run,
                           const char *expected)
{
    int r = (int)run->exit_reason;
    const char *name = hived_kvm_exit_name(r);

    out->err = 0;
    switch (r) {
    case KVM_EXIT_INTERNAL_ERROR:
        hived_reason(out, "unexpected exit reason %d (%s, suberror %u), expected %s", r, name,
                     run->internal.suberror, expected);
        break;
    case KVM_EXIT_FAIL_ENTRY:
        hived_reason(out, "unexpected exit reason %d (%s, hardware reason 0x%llx), expected %s",
                     r, name, (unsigned long long)run->fail_entry.hardware_entry_failure_reason,
                     expected);
        break;
    case KVM_EXIT_UNKNOWN:
        hived_reason(out, "unexpected exit reason %d (%s, hardware reason 0x%llx), expected %s",
                     r, name, (unsigned long long)run->hw.hardware_exit_reason, expected);
        break;
    case KVM_EXIT_SHUTDOWN:
        hived_reason(out, "unexpected exit reason %d (%s: guest triple-faulted), expected %s", r,
                     name, expected);
        break;
    case KVM_EXIT_MMIO:
        hived_reason(out, "unexpected exit reason %d (%s at 0x%llx), expected %s", r, name,
                     (unsigned long long)run->mmio.phys_addr, expected);
        break;
    default:
        hived_reason(out, "unexpected exit reason %d (%s), expected %s", r, name, expected);
        break;
    }
}

/* ---- the probe ---------------------------------------------------------- */

static int hived_has_cap(const struct hived_kvm_result *out, long cap)
{
    int i;

    for (i = 0; i < HIVED_N_CAPS; i++)
        if (hived_caps[i].cap == cap)
            return out->ext[i] > 0;
    return 0;
}

static const unsigned char hived_guest_code[] = {
    0xba, HIVED_GUEST_PORT & 0xff, HIVED_GUEST_PORT >> 8, /* mov dx, 0x3f8 */
    0xb0, HIVED_GUEST_BYTE,                               /* mov al, 'K'   */
    0xee,                                                 /* out dx, al    */
    0xf4,                                                 /* hlt           */
};

/*
 * Returns 0 if the guest ran, -1 otherwise (out->reason says why).
 * out is always fully written (if non-NULL).  Never blocks longer than about
 * timeout_ms unless the kernel itself ignores signals.
 */
int hived_kvm_probe(const char *dev_path, int timeout_ms, struct hived_kvm_result *out)
{
    int kvm = -1, vm = -1, vcpu = -1, i, r, mmap_size = 0, stage = 0;
    void *mem = MAP_FAILED;
    struct kvm_run *run = MAP_FAILED;
    struct hived_alarm alarm_state = {0};
    struct kvm_userspace_memory_region region;
    struct kvm_sregs sregs;
    struct kvm_regs regs;
    double start = hived_now_ms();

    if (!out)
        return -1;
    memset(out, 0, sizeof(*out));
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

    kvm = open(dev_path, O_RDWR | O_CLOEXEC);
    if (kvm < 0) {
        out->err = errno;
        hived_reason(out, "cannot open %s: %s (%s)", dev_path, hived_ename(errno),
                     strerror(errno));
        goto done;
    }
    out->present = 1;

    /* Safe: KVM_GET_API_VERSION takes no argument and only returns an int. */
    r = ioctl(kvm, KVM_GET_API_VERSION, 0);
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
        r = ioctl(kvm, KVM_CHECK_EXTENSION, hived_caps[i].cap);
        out->ext[i] = r < 0 ? -1 : r;
    }

    if (hived_alarm_arm(&alarm_state, timeout_ms) < 0) {
        out->err = errno;
        hived_reason(out, "cannot arm the probe timer: %s (%s)", hived_ename(errno),
                     strerror(errno));
        goto done;
    }

    /* Safe: KVM_CREATE_VM takes the machine type by value (0 = default). */
    vm = ioctl(kvm, KVM_CREATE_VM, 0UL);
    if (vm < 0) {
        hived_fail(out, "KVM_CREATE_VM", errno, timeout_ms);
        goto done;
    }
    out->vm_created = 1;

    /* Intel without unrestricted guest needs a TSS to emulate real mode. */
    if (hived_has_cap(out, KVM_CAP_SET_TSS_ADDR)) {
        /* Safe: KVM_SET_TSS_ADDR takes a guest-physical address by value. */
        if (ioctl(vm, KVM_SET_TSS_ADDR, HIVED_TSS_ADDR) < 0) {
            hived_fail(out, "KVM_SET_TSS_ADDR", errno, timeout_ms);
            goto done;
        }
    }

    mem = mmap(NULL, HIVED_GUEST_SIZE, PROT_READ | PROT_WRITE,
               MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED) {
        hived_fail(out, "mmap of guest memory", errno, timeout_ms);
        goto done;
    }
    memcpy(mem, hived_guest_code, sizeof(hived_guest_code)); /* fits: 7 bytes into a page */

    memset(&region, 0, sizeof(region));
    region.slot = 0;
    region.guest_phys_addr = HIVED_GUEST_ADDR;
    region.memory_size = HIVED_GUEST_SIZE;
    region.userspace_addr = (uintptr_t)mem; /* Safe: the ABI carries host pointers as __u64. */
    /* Safe: &region is a live, fully initialised struct of the type the ioctl reads. */
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0) {
        hived_fail(out, "KVM_SET_USER_MEMORY_REGION", errno, timeout_ms);
        goto done;
    }

    /* Safe: KVM_CREATE_VCPU takes the vCPU id by value. */
    vcpu = ioctl(vm, KVM_CREATE_VCPU, 0UL);
    if (vcpu < 0) {
        hived_fail(out, "KVM_CREATE_VCPU", errno, timeout_ms);
        goto done;
    }
    out->vcpu_created = 1;

    /* Safe: KVM_GET_VCPU_MMAP_SIZE takes no argument and only returns an int. */
    mmap_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (mmap_size < 0) {
        hived_fail(out, "KVM_GET_VCPU_MMAP_SIZE", errno, timeout_ms);
        goto done;
    }
    if ((size_t)mmap_size < sizeof(struct kvm_run)) {
        hived_reason(out, "KVM_GET_VCPU_MMAP_SIZE returned %d, smaller than struct kvm_run (%zu)",
                     mmap_size, sizeof(struct kvm_run));
        goto done;
    }
    /* Safe: the vCPU fd maps at least mmap_size >= sizeof(struct kvm_run) bytes, page aligned. */
    run = (struct kvm_run *)mmap(NULL, (size_t)mmap_size, PROT_READ | PROT_WRITE, MAP_SHARED,
                                 vcpu, 0);
    if (run == MAP_FAILED) {
        hived_fail(out, "mmap of the vCPU run area", errno, timeout_ms);
        goto done;
    }
    hived_run = run;
    if (hived_fired) /* deadline passed before the handler could see the run area */
        run->immediate_exit = 1;

    /* Safe: &sregs is a live struct kvm_sregs the kernel fills in. */
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0) {
        hived_fail(out, "KVM_GET_SREGS", errno, timeout_ms);
        goto done;
    }
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    /* Safe: &sregs is the struct just read back, with only cs changed. */
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0) {
        hived_fail(out, "KVM_SET_SREGS", errno, timeout_ms);
        goto done;
    }
    memset(&regs, 0, sizeof(regs));
    regs.rip = HIVED_GUEST_ADDR;
    regs.rflags = 0x2; /* bit 1 is reserved and must be set */
    /* Safe: &regs is a live, fully initialised struct kvm_regs. */
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0) {
        hived_fail(out, "KVM_SET_REGS", errno, timeout_ms);
        goto done;
    }

    for (;;) {
        if (hived_fired) {
            r = -1;
            errno = EINTR;
        } else {
            /* Safe: KVM_RUN takes no argument; results land in the mapped run area. */
            r = ioctl(vcpu, KVM_RUN, 0UL);
        }
        if (r < 0) {
            int e = errno;

            if ((e == EINTR || e == EAGAIN) && !hived_fired)
                continue; /* another signal; our deadline has not passed */
            if (e == EINTR && hived_fired) {
                out->timed_out = 1;
                out->err = ETIMEDOUT;
                if (stage == 0)
                    hived_reason(out,
                                 "KVM_RUN timed out after %d ms: vCPU never exited "
                                 "(paravirtualised KVM?)",
                                 timeout_ms);
                else
                    hived_reason(out,
                                 "KVM_RUN timed out after %d ms: guest did OUT but never "
                                 "reached HLT",
                                 timeout_ms);
                goto done;
            }
            hived_fail(out, "KVM_RUN", e, timeout_ms);
            goto done;
        }
        if (out->n_exits < HIVED_KVM_MAX_EXITS)
            out->exits[out->n_exits++] = (int)run->exit_reason;

        if (stage == 0) {
            unsigned char byte;

            if (run->exit_reason != KVM_EXIT_IO) {
                hived_bad_exit(out, run, "KVM_EXIT_IO");
                goto done;
            }
            if (run->io.direction != KVM_EXIT_IO_OUT || run->io.size != 1 ||
                run->io.count != 1 || run->io.port != HIVED_GUEST_PORT) {
                hived_reason(out,
                             "KVM_EXIT_IO is not the guest's OUT: direction %u size %u count %u "
                             "port 0x%x (expected out, 1, 1, 0x%x)",
                             run->io.direction, run->io.size, run->io.count, run->io.port,
                             HIVED_GUEST_PORT);
                goto done;
            }
            if (run->io.data_offset >= (__u64)mmap_size) {
                hived_reason(out, "KVM_EXIT_IO data offset %llu outside the %d-byte run area",
                             (unsigned long long)run->io.data_offset, mmap_size);
                goto done;
            }
            /* Safe: data_offset was just checked to lie inside the mapped run area. */
            byte = *((const unsigned char *)run + run->io.data_offset);
            if (byte != HIVED_GUEST_BYTE) {
                hived_reason(out, "guest wrote 0x%02x to port 0x%x, expected 0x%02x ('K')", byte,
                             HIVED_GUEST_PORT, HIVED_GUEST_BYTE);
                goto done;
            }
            stage = 1;
            continue;
        }
        if (run->exit_reason != KVM_EXIT_HLT) {
            hived_bad_exit(out, run, "KVM_EXIT_HLT");
            goto done;
        }
        out->guest_runs = 1;
        hived_reason(out, "guest ran: OUT 0x%x '%c' then HLT", HIVED_GUEST_PORT,
                     HIVED_GUEST_BYTE);
        break;
    }

done:
    hived_alarm_disarm(&alarm_state); /* also clears hived_run */
    hived_run = NULL;
    if (run != MAP_FAILED)
        munmap(run, (size_t)mmap_size);
    if (vcpu >= 0)
        close(vcpu);
    if (vm >= 0)
        close(vm);
    if (mem != MAP_FAILED)
        munmap(mem, HIVED_GUEST_SIZE); /* after the VM is gone: nothing maps it any more */
    if (kvm >= 0)
        close(kvm);
    out->elapsed_ms = hived_now_ms() - start;
    pthread_mutex_unlock(&hived_probe_lock);
    return out->guest_runs ? 0 : -1;
}
