/* hived-buildinit: PID 1 of a build container (static; bound read-only at /.hived/init).
 *
 * In its own PID namespace a process is that namespace's init, and the kernel drops
 * every signal its own namespace sends it without a handler: a build's
 * `kill -TERM $$` would do nothing and it could never die by a signal. So the build
 * runs as this process's child (PID 2), and this init
 *   - forwards TERM, INT, HUP, QUIT, USR1, USR2 to it,
 *   - reaps every orphan,
 *   - when the build ends, writes one line to fd 3 (a pipe to the cell daemon, which
 *     it handed to crun with --preserve-fds 1): "status <wait status>" or, when exec
 *     failed, "exec <errno>" ("chdir <errno>" when the build's cwd cannot be entered);
 *     then exits, which ends the namespace and every process left in it.
 * usage: hived-buildinit PROGRAM [ARG...]
 *        hived-buildinit            (a pre-made container, hived/cell/premade.py: waits
 *                                    for the build on fd 4, see read_command)
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define REPORT_FD 3
#define COMMAND_FD 4
#define COMMAND_MAX (64 << 20) /* the cell daemon's frames are far smaller */

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

static void report(const char *what, int value) {
    char line[64];
    int n = snprintf(line, sizeof line, "%s %d\n", what, value);
    if (write(REPORT_FD, line, (size_t)n) < 0) {
        /* nobody listening: the exit status below is all the cell daemon gets */
    }
}

/* A pre-made container's init is started while the cell is warm, before any build
 * exists; the cell daemon writes the build on fd 4 and closes it: NUL-terminated strings
 * "cwd", "<argc>", argc arguments, then each environment entry "KEY=VALUE". The build
 * then starts exactly as if crun had been given it: its cwd, its argv, only its env.
 * Returns 0, or -1 when fd 4 held no well-formed command. */
static int read_command(char **cwd, char ***args, char ***envp) {
    size_t cap = 1 << 16, len = 0;
    char *buf = malloc(cap);
    if (!buf)
        return -1;
    for (;;) {
        if (len == cap) {
            if (cap >= COMMAND_MAX)
                return -1;
            cap *= 2;
            char *bigger = realloc(buf, cap);
            if (!bigger)
                return -1;
            buf = bigger;
        }
        ssize_t n = read(COMMAND_FD, buf + len, cap - len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0)
            return -1;
        if (n == 0)
            break;
        len += (size_t)n;
    }
    close(COMMAND_FD);
    if (len == 0 || buf[len - 1] != '\0')
        return -1;
    size_t count = 0; /* strings in buf: every one is NUL-terminated, so this bounds both lists */
    for (size_t i = 0; i < len; i++)
        count += buf[i] == '\0';
    char **strings = calloc(count + 1, sizeof *strings);
    if (!strings)
        return -1;
    size_t k = 0;
    for (char *p = buf; p < buf + len; p += strlen(p) + 1)
        strings[k++] = p;
    if (count < 3)
        return -1;
    char *end;
    long argc = strtol(strings[1], &end, 10);
    if (*end || argc < 1 || (size_t)argc > count - 2)
        return -1;
    *cwd = strings[0];
    *args = calloc((size_t)argc + 1, sizeof **args);
    if (!*args)
        return -1;
    memcpy(*args, strings + 2, (size_t)argc * sizeof **args);
    *envp = strings + 2 + argc; /* to the end: strings[count] is NULL (calloc) */
    return 0;
}

int main(int argc, char **argv) {
    fcntl(REPORT_FD, F_SETFD, FD_CLOEXEC); /* the build must not inherit it */
    char **command = argv + 1;
    if (argc < 2) {
        char *cwd;
        if (fcntl(COMMAND_FD, F_GETFD) < 0 || read_command(&cwd, &command, &environ) != 0) {
            fprintf(stderr, "usage: %s PROGRAM [ARG...], or the build on fd %d\n", argv[0], COMMAND_FD);
            return 126;
        }
        if (chdir(cwd) != 0) {
            int err = errno;
            fprintf(stderr, "hived-buildinit: cannot enter %s: %s\n", cwd, strerror(err));
            report("chdir", err);
            return 127;
        }
    }
    sigset_t all, old;
    sigemptyset(&all);
    for (size_t i = 0; i < sizeof forwarded / sizeof forwarded[0]; i++)
        sigaddset(&all, forwarded[i]);
    sigaddset(&all, SIGCHLD);
    sigprocmask(SIG_BLOCK, &all, &old);

    int execpipe[2];
    if (pipe2(execpipe, O_CLOEXEC) != 0) {
        perror("hived-buildinit: pipe");
        return 126;
    }
    pid_t child = fork();
    if (child < 0) {
        perror("hived-buildinit: fork");
        return 126;
    }
    if (child == 0) {
        sigprocmask(SIG_SETMASK, &old, NULL);
        setpgid(0, 0);
        execvp(command[0], command); /* PATH from the build's own environment */
        int err = errno;
        if (write(execpipe[1], &err, sizeof err) < 0) {
            /* the parent then sees a plain exit 127 */
        }
        fprintf(stderr, "hived-buildinit: cannot run %s: %s\n", command[0], strerror(err));
        _exit(127);
    }
    close(execpipe[1]);
    int err = 0;
    ssize_t got = read(execpipe[0], &err, sizeof err);
    close(execpipe[0]);
    if (got == (ssize_t)sizeof err) {
        waitpid(child, NULL, 0);
        report("exec", err);
        return 127;
    }
    for (;;) {
        siginfo_t info;
        int sig = sigwaitinfo(&all, &info);
        if (sig < 0)
            continue;
        if (sig != SIGCHLD) {
            kill(child, sig);
            continue;
        }
        int status;
        pid_t pid;
        while ((pid = waitpid(-1, &status, WNOHANG)) > 0) {
            if (pid == child) {
                report("status", status);
                return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
            }
        }
    }
}
