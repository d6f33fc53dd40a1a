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
 *     failed, "exec <errno>"; then exits, which ends the namespace and every process
 *     left in it.
 * usage: hived-buildinit PROGRAM [ARG...]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

#define REPORT_FD 3

static const int forwarded[] = {SIGTERM, SIGINT, SIGHUP, SIGQUIT, SIGUSR1, SIGUSR2};

static void report(const char *what, int value) {
    char line[64];
    int n = snprintf(line, sizeof line, "%s %d\n", what, value);
    if (write(REPORT_FD, line, (size_t)n) < 0) {
        /* nobody listening: the exit status below is all the cell daemon gets */
    }
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s PROGRAM [ARG...]\n", argv[0]);
        return 126;
    }
    fcntl(REPORT_FD, F_SETFD, FD_CLOEXEC); /* the build must not inherit it */
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
        execvp(argv[1], argv + 1);
        int err = errno;
        if (write(execpipe[1], &err, sizeof err) < 0) {
            /* the parent then sees a plain exit 127 */
        }
        fprintf(stderr, "hived-buildinit: cannot run %s: %s\n", argv[1], strerror(err));
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
