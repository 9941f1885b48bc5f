/* The pod sandbox's process for the test cluster (tests/cluster/image.py pause builds it with
 * `gcc -static` into the pause image): it holds the pod's namespaces open and does nothing else.
 * Like Kubernetes' own pause: sleeps in pause(), exits 0 on SIGINT or SIGTERM, and, as PID 1 of a
 * pod that shares its PID namespace, reaps the zombies it inherits. */
#define _GNU_SOURCE
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

static void say(const char *text) {
  ssize_t unused = write(STDERR_FILENO, text, strlen(text));
  (void)unused;
}

static void on_down(int signo) {
  say(signo == SIGINT ? "pause: SIGINT, exiting\n" : "pause: SIGTERM, exiting\n");
  _exit(0);
}

static void on_child(int signo) {
  (void)signo;
  int saved = errno;
  while (waitpid(-1, NULL, WNOHANG) > 0) {
  }
  errno = saved;
}

int main(int argc, char **argv) {
  if (argc > 1 && (strcmp(argv[1], "-v") == 0 || strcmp(argv[1], "--version") == 0)) {
    say("pause (bitsfarm tests/cluster/pause.c)\n");
    return 0;
  }
  if (getpid() != 1) say("pause: warning: not PID 1\n");

  struct sigaction down;
  memset(&down, 0, sizeof down);
  down.sa_handler = on_down;
  sigemptyset(&down.sa_mask);
  if (sigaction(SIGINT, &down, NULL) < 0 || sigaction(SIGTERM, &down, NULL) < 0) return 1;

  struct sigaction child;
  memset(&child, 0, sizeof child);
  child.sa_handler = on_child;
  child.sa_flags = SA_NOCLDSTOP | SA_RESTART;
  sigemptyset(&child.sa_mask);
  if (sigaction(SIGCHLD, &child, NULL) < 0) return 2;

  for (;;) pause();
  return 42; /* not reached */
}
