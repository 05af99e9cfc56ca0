/* unixcat: stdin/stdout <-> a unix stream socket, the harness's QMP client inside an L1
 * (L1's busybox nc has no unix sockets and dropbear forwards TCP only).  Exits when the
 * socket closes; on stdin EOF it half-closes the socket and drains the rest.  Built
 * statically on the host by harness.nested.l1.helper_binary() and copied into L1. */
#include <errno.h>
#include <poll.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

static int put(int fd, const char *b, ssize_t n) {
    while (n > 0) {
        ssize_t w = write(fd, b, (size_t)n);
        if (w < 0 && errno == EINTR) continue;
        if (w <= 0) return -1;
        b += w; n -= w;
    }
    return 0;
}

int main(int argc, char **argv) {
    struct sockaddr_un a;
    char buf[65536];
    int s, in_open = 1;
    if (argc != 2 || strlen(argv[1]) >= sizeof(a.sun_path)) {
        fprintf(stderr, "usage: unixcat SOCKET\n");
        return 2;
    }
    memset(&a, 0, sizeof(a));
    a.sun_family = AF_UNIX;
    strcpy(a.sun_path, argv[1]);
    s = socket(AF_UNIX, SOCK_STREAM, 0);
    if (s < 0 || connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
        fprintf(stderr, "unixcat: %s: %s\n", argv[1], strerror(errno));
        return 1;
    }
    for (;;) {
        struct pollfd p[2] = {{s, POLLIN, 0}, {0, POLLIN, 0}};
        if (poll(p, in_open ? 2 : 1, -1) < 0) {
            if (errno == EINTR) continue;
            return 1;
        }
        if (p[0].revents) {
            ssize_t n = read(s, buf, sizeof(buf));
            if (n <= 0) return 0;
            if (put(1, buf, n) < 0) return 1;
        }
        if (in_open && p[1].revents) {
            ssize_t n = read(0, buf, sizeof(buf));
            if (n <= 0) { in_open = 0; shutdown(s, SHUT_WR); continue; }
            if (put(s, buf, n) < 0) return 1;
        }
    }
}
